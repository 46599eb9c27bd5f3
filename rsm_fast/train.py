"""``python -m rsm_fast.train`` — train a policy with one RSM preset and write a run directory.

With no arguments: the ``rsm-soft-zo`` preset on the analytic 2-D task (about a minute on a
2-core CPU); the final table compares the fine-tuned samples with the exact tilted target p*.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .config import ConfigError, build_config, describe_fields, preset_data, preset_names
from .rewards import RewardError
from .runlog import RunDir, RunDirError
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
    p.add_argument("--overwrite", action="store_true", help="reuse a run directory that already holds a run")
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


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.list_presets:
        width = max(map(len, preset_names()))
        for name in preset_names():
            print(f"{name:{width}s}  {preset_data(name).get('description', '')}")
        return 0
    try:
        preset = args.preset or (None if args.config else DEFAULT_PRESET)
        overrides = list(args.overrides) + ([f"train.loss_impl={args.loss_impl}"] if args.loss_impl else [])
        overrides += [f"rollout.graphs={'true' if args.graphs == 'on' else 'false'}"] if args.graphs else []
        if args.model is not None:
            overrides += ["task.name=diffusers", f"task.model={args.model}"]
        for flag, key in ((args.task, "task.name"), (args.prompts, "task.prompts"), (args.reward, "task.reward")):
            if flag is not None:
                overrides.append(f"{key}={flag}")
        # CLI flags go first so an explicit --set still wins
        overrides = overrides[len(args.overrides):] + list(args.overrides)
        cfg = build_config(preset, args.config, overrides)
        out = Path(args.out) if args.out else Path("runs") / f"{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
        if args.plots:
            from . import plots
            plots.require_matplotlib()
        run_dir = RunDir(out, overwrite=args.overwrite, tensorboard=args.tensorboard)
        trainer = Trainer(cfg)
        summary = trainer.run(run_dir, progress=not args.quiet)
        if args.plots:
            for f in plots.draw_run(out):
                print(f"plot: {f}")
    except (ConfigError, RunDirError, RewardError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"\n{cfg.preset} on {summary['task']}: {summary['epochs']} epochs  ->  {out}/summary.json")
    print(format_table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
