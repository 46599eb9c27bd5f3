"""``python -m rsm_fast.train`` — train a policy with one RSM preset and write a run directory.

With no arguments: the ``rsm-soft-zo`` preset on the analytic 2-D task (about a minute on a
2-core CPU); the final table compares the fine-tuned samples with the exact tilted target p*.
"""
from __future__ import annotations

import argparse
import os
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
from . import distributed as D
from .trainer import NonFiniteError, Trainer

# The default preset (issue 20 item 7): on the 2-D task the trapezoidal soft first order, which
# lands on p* (bench/results/default_run_toy2d_2026-12-06.md); on the image tasks soft zeroth
# order, which needs no reward gradient (the diffusers rewards have none; on digits the
# classifier's input gradient runs the first-order presets away with KL, README "digits-ddim").
DEFAULT_PRESET = "rsm-soft-fo-trap"
DEFAULT_PRESET_IMAGES = "rsm-soft-zo"


def default_preset(overrides: list[str]) -> str:
    """The preset a run without ``--preset`` / ``--config`` gets, by the task it names (``--task``
    and ``--set task.name=...`` arrive here as overrides; the last one wins, as in the config)."""
    names = [value for key, value in map(parse_set, overrides) if key == "task.name"]
    return DEFAULT_PRESET if not names or names[-1] == "toy2d" else DEFAULT_PRESET_IMAGES


def _parser() -> argparse.ArgumentParser:
    keys = "\n".join(f"  {k:28s} {h} [default: {d}]" for k, h, d in describe_fields())
    p = argparse.ArgumentParser(
        prog="python -m rsm_fast.train",
        description="Reward Score Matching: fine-tune a generator toward exp(r/alpha)-tilted samples.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"config keys (for --set and YAML files):\n{keys}",
    )
    p.add_argument("--preset", default=None, help=f"method preset (default {DEFAULT_PRESET} on the 2-D task, "
                   f"{DEFAULT_PRESET_IMAGES} on the image tasks); see --list-presets")
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
    if "objective" in s:
        rows.append(("objective J = E[r] - alpha path KL", f"{s['objective']:.4f}",
                     f"{s['objective_target']:.4f} = J* (ref {s['objective_reference']:.2f}): {s['objective_gain']:.3f} "
                     f"of the gain; path KL {s['kl_to_reference']:.3f} vs {s['kl_target']:.3f} at p*"))
        rows.append(("objective with the samples' marginal KL", f"{s['objective_marginal']:.4f}",
                     f"{s['objective_gain_marginal']:.3f} of the gain; k-NN KL estimate {s['kl_marginal']:.3f} "
                     "(reads ~0.01 high at p*)"))
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


def _elastic_start(args) -> bool:
    """Under torchrun, ``--resume DIR`` where DIR holds no run yet starts it: the same command
    line then serves the first launch and every ``--max-restarts`` restart (elastic restart)."""
    if args.resume is None or not D.launched():
        return False
    target = args.resume or args.out
    return bool(target) and not (Path(target) / "config.yaml").exists()


def _preflight(cfg) -> None:
    """Inputs and memory before anything is written; under torchrun one rank's share of the run."""
    import os

    n = int(os.environ.get("WORLD_SIZE", "1")) if D.launched() else 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if D.launched() else 1
    preflight.check(cfg, world_size=n, local_ranks=local)


def _join(cfg) -> tuple["D.World", str]:
    """This process's rank in torchrun's process group (the one-process world outside torchrun)."""
    tc = cfg.train
    return D.init_from_env(tc.device, tc.dist_backend, tc.dist_timeout)


def _prepare(args, overrides: list[str]):
    """Config, world, run directory (locked; rank 0 only) and, for ``--resume``, the checkpoint
    state to continue. Under torchrun every rank builds the config and joins the process group;
    rank 0 opens the run directory and tells the others its path and the checkpoint to load."""
    if args.resume is None or _elastic_start(args):
        preset = args.preset or (None if args.config else default_preset(overrides))
        cfg = build_config(preset, args.config, overrides)
        _preflight(cfg)                 # prompt file, model spec, memory: before any directory or model
        _check_reward(cfg)
        world, device = _join(cfg)
        target = args.out or args.resume
        out = Path(target) if target else default_out(cfg.preset)
        out = Path(world.broadcast_object(str(out), op="run directory name"))
        run_dir = None
        if world.main:
            run_dir = RunDir(out, overwrite=args.overwrite, tensorboard=args.tensorboard)
            run_dir.lock()
        world.barrier("run directory open")
        return cfg, out, run_dir, None, world, device
    # torchrun --max-restarts relaunches the first command line, --preset included: it must name the run's
    if args.overwrite or (args.preset and not D.launched()):
        raise ConfigError(f"--resume continues a run with its own config; it cannot be combined with "
                          f"{'--overwrite' if args.overwrite else '--preset'}")
    out = _resume_dir(args.resume, args.out)
    if (out / "summary.json").exists():
        raise RunDirError(f"--resume '{out}': the run is complete (summary.json); nothing to resume")
    cfg = _resume_config(out, args.config, overrides)
    if args.preset and args.preset != cfg.preset:
        raise ConfigError(f"--preset {args.preset!r} differs from the run's preset {cfg.preset!r} in {out / 'config.yaml'}")
    _preflight(cfg)
    _check_reward(cfg)
    world, device = _join(cfg)
    run_dir = RunDir(out, tensorboard=args.tensorboard, resume=True) if world.main else None
    if run_dir is not None:
        run_dir.lock()
    try:
        found = C.latest(out, warn=lambda m: print(f"rsm_fast: {m}", file=sys.stderr)) if world.main else None
        path = world.broadcast_object(None if found is None else str(found[0]), op="checkpoint choice")
        state = None
        if path is None:
            if world.main:
                print(f"rsm_fast: {out} has no checkpoint yet: starting it again from epoch 0", file=sys.stderr)
        else:
            state = found[1] if found is not None else C.load_state(Path(path))
            C.check_compatible(state, redact_config(to_dict(cfg)), f"--resume '{out}'")
            if world.main:
                print(f"rsm_fast: resuming {out} after epoch {state['epochs_done']} ({Path(path).name})"
                      + (f" on {world.size} ranks" if world.active else ""), file=sys.stderr)
        world.barrier("run directory open")
    except BaseException:
        if run_dir is not None:
            run_dir.unlock()
        raise
    return cfg, out, run_dir, state, world, device


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
        try:
            for name in preset_names():
                print(f"{name:{width}s}  {preset_data(name).get('description', '')}", flush=True)
        except BrokenPipeError:     # `--list-presets | head`: the reader left; no traceback
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    out, world = None, D.ONE
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
            cfg, out, run_dir, state, world, device = _prepare(args, overrides)
            try:
                with stop.abandonable():     # loading a model: nothing to save yet
                    with D.phase("model load"):
                        trainer = Trainer(cfg, world=world, device=device)
                world.start_training()
            except BaseException:
                if run_dir is not None:
                    run_dir.close(ok=False)
                raise
            summary = trainer.run(run_dir, progress=not args.quiet and world.main, stop=stop, resume=state, out=out)
            if args.plots:
                for f in plots.draw_run(out):
                    print(f"plot: {f}")
        except RunInterrupted as e:
            world = D.current()
            return _finish(world, _stopped(e, out) if world.main else e.exit_code)
        except (ConfigError, RunDirError, RewardError, C.ResumeError) as e:
            world = D.current()
            print(f"error: {_who(world)}{one_line(e)}", file=sys.stderr)
            return _finish(world, 2)
        except (NonFiniteError, D.DistributedError) as e:
            world = D.current()
            who = "" if isinstance(e, D.DistributedError) else _who(world)    # it names rank and phase itself
            print(f"error: {who}{one_line(e, 400)}", file=sys.stderr)
            return _finish(world, 1)
        except Exception as e:  # noqa: BLE001 - one line for the user, the traceback kept for a bug report
            world = D.current()
            if world.active and D.is_collective_failure(e):   # e.g. DDP's all-reduce inside backward
                print(f"error: {world.describe('a collective', e)}", file=sys.stderr)
                return _finish(world, 1)
            return _finish(world, _internal_error(e, out, world))
    if world.main:
        print(f"\n{cfg.preset} on {summary['task']}: {summary['epochs']} epochs  ->  {out}/summary.json")
        print(format_table(summary))
    return _finish(world, 0)


def _who(world: "D.World") -> str:
    return f"rank {world.rank} of {world.size} (phase '{D.current_phase()}'): " if world.active else ""


def _finish(world: "D.World", code: int) -> int:
    """Leave the process group. A rank of a torchrun run ends with ``os._exit`` once its files are
    closed: a failed rank must not wait on peers that are gone in the group's teardown, and a
    finished one must not run the C++ destructors of gloo / DDP at interpreter exit, which abort
    ("terminate called without an active exception") in about half of the runs that used
    ``no_sync`` accumulation. A finished run first meets its peers at a barrier."""
    if world.active:
        D.leave(world, ok=code == 0)
        import os

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _internal_error(e: Exception, out: Path | None, world: "D.World | None" = None) -> int:
    """An exception nothing anticipated: one ``error:`` line (exit 1); the traceback goes to
    ``<out>/error.log`` (or is printed with ``RSM_FAST_TRACEBACK=1``)."""
    import os
    import traceback

    tb = traceback.format_exc()
    where = ""
    if os.environ.get("RSM_FAST_TRACEBACK") == "1":
        print(tb, file=sys.stderr)
    elif out is not None and out.is_dir():
        name = "error.log" if world is None or world.main else f"error-rank{world.rank}.log"
        try:
            (out / name).write_text(tb)
            where = f" (traceback in {out / name})"
        except OSError:
            pass
    who = _who(world) if world is not None else ""
    print(f"error: {who}internal error: {one_line(f'{type(e).__name__}: {e}', 240)}{where}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
