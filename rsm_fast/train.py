"""``python -m rsm_fast.train`` — train a policy with one RSM preset and write a run directory.

With no arguments: the ``rsm-soft-zo`` preset on the analytic 2-D task (about a minute on a
2-core CPU); the final table compares the fine-tuned samples with the exact tilted target p*.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import checkpoint as C
from . import preflight
from . import rewards as R
from .config import (ConfigError, RunConfig, apply_mapping, build_config, describe_fields, load_yaml, parse_set,
                     preset_data, preset_names, set_dotted, to_dict, validate)
from .interrupts import RunInterrupted, StopController
from .rewards import RewardError
from .rewards.base import one_line
from .rewards.secrets import MASK, redact_config
from .rundir import RunDir, RunDirError, default_out
from .trainer import NonFiniteError, Trainer

DEFAULT_PRESET = "rsm-soft-zo"


def _parser() -> argparse.ArgumentParser:
    keys = "\n".join(f"  {k:28s} {h} [default: {d}]" for k, h, d in describe_fields())
    p = argparse.ArgumentParser(
        prog="python -m rsm_fast.train",
        description="Reward Score Matching: fine-tune a generator toward exp(r/alpha)-tilted samples.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"config keys (for --set and YAML files):\n{keys}",
    )
    p.add_argument("--preset", default=None, help=f"method preset (default {DEFAULT_PRESET}); see --list-presets")
    p.add_argument("--config", default=None, metavar="FILE", help="YAML file merged over the preset")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. --set train.epochs=50 (repeatable)")
    p.add_argument("--out", default=None, metavar="DIR", help="run directory (default runs/<preset>-<time>)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run in --out (the old run is kept until the new one has its first checkpoint)")
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="RUN_DIR",
                   help="continue a killed or stopped run in place from its newest checkpoint (RUN_DIR, else --out, "
                        "else the newest unfinished run under runs/); --set may change only fields that change "
                        "no number (checkpointing, evaluation cadence, reward timeouts, threads)")
    p.add_argument("--list-presets", action="store_true", help="print the presets and exit")
    p.add_argument("--loss-impl", choices=("fused", "reference"), default=None,
                   help="loss implementation: fused custom ops (default) or the plain-torch reference")
    p.add_argument("--task", default=None, help="task.name: toy2d (default), digits-ddim, digits-flow, diffusers")
    p.add_argument("--model", default=None, metavar="PATH|NAME",
                   help="a local diffusers folder or named config (implies --task diffusers)")
    p.add_argument("--prompts", default=None, metavar="FILE", help="task.prompts: .txt or .jsonl prompt file")
    p.add_argument("--reward", default=None, metavar="SPEC", help="task.reward, e.g. jpeg, aesthetic:/dir, digit_logprob:3")
    p.add_argument("--graphs", choices=("on", "off"), default=None,
                   help="replay the rollout's model calls from CUDA graphs (CUDA only; default off)")
    p.add_argument("--tensorboard", action="store_true", help="also log every epoch to TensorBoard (<out>/tb; needs rsm_fast[viz])")
    p.add_argument("--plots", action="store_true",
                   help="after the run draw h(t), K_i over epochs, reward vs hours and reward vs KL (<out>/plots; needs matplotlib)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def format_table(s: dict) -> str:
    rows = [("metric", "value", "target / note")]
    rows.append(("reward mean", f"{s['reward_mean']:.4f}", f"{s['reward_target']:.4f} analytic optimum (ref {s['reward_reference']:.2f})"
                 if "reward_target" in s else ""))
    if "mode_weights" in s:
        mw = " / ".join(f"{v:.4f}" for v in s["mode_weights"])
        mt = " / ".join(f"{v:.4f}" for v in s["mode_weights_target"])
        rows.append(("mode weights", mw, mt))
        rows.append((f"distance to p* ({s['distance_metric']})", f"{s['distance_to_target']:.4f}",
                     f"{s['distance_floor']:.4f} = two exact samples"))
    rows.append(("model evaluations (NFE)", f"{s['nfe']:,}", ", ".join(f"{k} {v:,}" for k, v in s["nfe_by_kind"].items())))
    sec = s["seconds"]
    rows.append(("wall-clock (s)", f"{sec['total']:.1f}",
                 ", ".join(f"{k} {sec.get(k, 0.0):.1f}" for k in ("rollout", "reward", "train", "eval"))))
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    line = lambda r: f"{r[0]:<{w[0]}}  {r[1]:>{w[1]}}  {r[2]}"  # noqa: E731
    return "\n".join([line(rows[0]), "-" * (sum(w) + 4)] + [line(r) for r in rows[1:]])


def _resume_dir(value: str, out: str | None) -> Path:
    """The run ``--resume [RUN_DIR]`` continues: RUN_DIR, else ``--out``, else the newest
    unfinished run under ``runs/``."""
    if value and out and Path(value).resolve() != Path(out).resolve():
        raise ConfigError(f"--resume '{value}' and --out '{out}' name different directories; give one")
    if value or out:
        return Path(value or out)
    runs = [p.parent for p in Path("runs").glob("*/config.yaml") if not (p.parent / "summary.json").exists()]
    if not runs:
        raise RunDirError("--resume: no unfinished run under runs/; name one: --resume RUN_DIR")
    newest = max(runs, key=lambda p: (p / "config.yaml").stat().st_mtime)
    print(f"rsm_fast: resuming the newest unfinished run, {newest}", file=sys.stderr)
    return newest


def _resume_config(out: Path, config_file: str | None, overrides: list[str]):
    """The run's own config.yaml, then ``--config`` and ``--set`` on top (checked against the
    checkpoint afterwards: only fields that change no number may differ)."""
    cfg = RunConfig()
    apply_mapping(cfg, load_yaml(out / "config.yaml"), source=str(out / "config.yaml"))
    if config_file is not None:
        apply_mapping(cfg, load_yaml(config_file), source=str(config_file))
    for expr in overrides:
        set_dotted(cfg, *parse_set(expr))
    validate(cfg)
    if MASK in cfg.task.reward or cfg.task.reward_auth == MASK:
        field = "task.reward" if MASK in cfg.task.reward else "task.reward_auth"
        raise ConfigError(f"config field '{field}' held a secret that was not written to {out / 'config.yaml'}; "
                          f"pass it again (--set {field}=...) or use task.reward_auth_env")
    return cfg


def _check_reward(cfg) -> None:
    """The reward spec, its imports and a reward server's reachability, before a model loads."""
    if not cfg.task.reward:
        return
    if cfg.task.name.startswith("digits"):
        import importlib

        importlib.import_module("rsm_fast.tasks.digits_task")     # registers the digits rewards
    R.preflight(cfg.task.reward, R.RewardOptions.from_task_config(cfg.task))


def _prepare(args, overrides: list[str]):
    """Config, run directory (locked) and, for ``--resume``, the checkpoint state to continue."""
    if args.resume is None:
        preset = args.preset or (None if args.config else DEFAULT_PRESET)
        cfg = build_config(preset, args.config, overrides)
        preflight.check(cfg)            # prompt file, model spec, memory: before any directory or model
        _check_reward(cfg)
        out = Path(args.out) if args.out else default_out(cfg.preset)
        run_dir = RunDir(out, overwrite=args.overwrite, tensorboard=args.tensorboard)
        run_dir.lock()
        return cfg, out, run_dir, None
    if args.preset or args.overwrite:
        raise ConfigError(f"--resume continues a run with its own config; it cannot be combined with "
                          f"{'--preset' if args.preset else '--overwrite'}")
    out = _resume_dir(args.resume, args.out)
    run_dir = RunDir(out, tensorboard=args.tensorboard, resume=True)
    if (out / "summary.json").exists():
        raise RunDirError(f"--resume '{out}': the run is complete (summary.json); nothing to resume")
    cfg = _resume_config(out, args.config, overrides)
    preflight.check(cfg)
    _check_reward(cfg)
    run_dir.lock()
    try:
        found = C.latest(out, warn=lambda m: print(f"rsm_fast: {m}", file=sys.stderr))
        state = None
        if found is None:
            print(f"rsm_fast: {out} has no checkpoint yet: starting it again from epoch 0", file=sys.stderr)
        else:
            path, state = found
            C.check_compatible(state, redact_config(to_dict(cfg)), f"--resume '{out}'")
            print(f"rsm_fast: resuming {out} after epoch {state['epochs_done']} ({path.name})", file=sys.stderr)
    except BaseException:
        run_dir.unlock()
        raise
    return cfg, out, run_dir, state


def _stopped(e: RunInterrupted, out: Path | None) -> int:
    name = str(e)
    found = C.checkpoint_dirs(out) if out is not None else []
    if found:
        newest = found[-1].name
        print(f"rsm_fast: stopped by {name}; checkpoint {out}/checkpoints/{newest}; continue with: "
              f"python -m rsm_fast.train --resume {out}", file=sys.stderr)
    else:
        print(f"rsm_fast: stopped by {name} before the first epoch; nothing to resume", file=sys.stderr)
    return e.exit_code


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.list_presets:
        width = max(map(len, preset_names()))
        for name in preset_names():
            print(f"{name:{width}s}  {preset_data(name).get('description', '')}")
        return 0
    out = None
    with StopController() as stop:
        try:
            overrides = list(args.overrides) + ([f"train.loss_impl={args.loss_impl}"] if args.loss_impl else [])
            overrides += [f"rollout.graphs={'true' if args.graphs == 'on' else 'false'}"] if args.graphs else []
            if args.model is not None:
                overrides += ["task.name=diffusers", f"task.model={args.model}"]
            for flag, key in ((args.task, "task.name"), (args.prompts, "task.prompts"), (args.reward, "task.reward")):
                if flag is not None:
                    overrides.append(f"{key}={flag}")
            # CLI flags go first so an explicit --set still wins
            overrides = overrides[len(args.overrides):] + list(args.overrides)
            if args.plots:
                from . import plots
                plots.require_matplotlib()
            cfg, out, run_dir, state = _prepare(args, overrides)
            try:
                with stop.abandonable():     # loading a model: nothing to save yet
                    trainer = Trainer(cfg)
            except BaseException:
                run_dir.close(ok=False)
                raise
            summary = trainer.run(run_dir, progress=not args.quiet, stop=stop, resume=state)
            if args.plots:
                for f in plots.draw_run(out):
                    print(f"plot: {f}")
        except RunInterrupted as e:
            return _stopped(e, out)
        except (ConfigError, RunDirError, RewardError, C.ResumeError) as e:
            print(f"error: {one_line(e)}", file=sys.stderr)
            return 2
        except NonFiniteError as e:
            print(f"error: {one_line(e)}", file=sys.stderr)
            return 1
        except Exception as e:  # noqa: BLE001 - one line for the user, the traceback kept for a bug report
            return _internal_error(e, out)
    print(f"\n{cfg.preset} on {summary['task']}: {summary['epochs']} epochs  ->  {out}/summary.json")
    print(format_table(summary))
    return 0


def _internal_error(e: Exception, out: Path | None) -> int:
    """An exception nothing anticipated: one ``error:`` line (exit 1); the traceback goes to
    ``<out>/error.log`` (or is printed with ``RSM_FAST_TRACEBACK=1``)."""
    import os
    import traceback

    tb = traceback.format_exc()
    where = ""
    if os.environ.get("RSM_FAST_TRACEBACK") == "1":
        print(tb, file=sys.stderr)
    elif out is not None and out.is_dir():
        try:
            (out / "error.log").write_text(tb)
            where = f" (traceback in {out / 'error.log'})"
        except OSError:
            pass
    print(f"error: internal error: {one_line(f'{type(e).__name__}: {e}', 240)}{where}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
