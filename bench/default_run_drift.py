"""Is the default run's distance to p* the estimator's noise or its objective? (issue 20, item 7)

    python bench/default_run_drift.py --epochs 300 --every 50 --seed 0
    python bench/default_run_drift.py --evaluate RUN_DIR [RUN_DIR ...] --eval-samples 32768

Two phases on the 2-D task, one process:

1. **The ceiling.** ``rsm-soft-fo`` with ``method.fo_value=exact`` (the closed-form Psi* of every
   visited state as the regression target) for ``--ceiling-epochs`` epochs: it lands within ~0.006
   of every exact mode weight (``bench/results/default_run_toy2d_2026-12-06.md``).
2. **Drift.** The default preset (``rsm-soft-zo``) continues from those weights for ``--epochs``
   epochs at a constant ``--lr`` (no warm-up, no decay), evaluated every ``--every`` epochs on the
   run's held-out samples.

If soft zeroth order's fixed point were p* (a consistent, noise-free estimator of Psi*), phase 2
would stay where phase 1 left it. If it drifts away while its own objective J = E[r] - alpha KL
falls, what moves it is the estimator's noise; if it drifts while J rises, its objective's optimum
(the discrete, Gaussian-step policy class) is elsewhere. Prints one markdown row per evaluation.

``--evaluate`` instead re-evaluates finished runs (their ``checkpoint.pt``) on one common, larger
held-out set (``--eval-samples``, the same seed for every run, so their differences are paired):
the 8,192 samples of a run's own summary put about +-0.014 on its reward and J.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from rsm_fast.config import build_config  # noqa: E402
from rsm_fast.trainer import Trainer  # noqa: E402


def row(phase: str, epoch: int, ev: dict, target: list[float]) -> str:
    w = ev["mode_weights"]
    worst = max(abs(a - b) for a, b in zip(w, target))
    return (f"| {phase} | {epoch} | {' / '.join(f'{v:.3f}' for v in w)} | {worst:.3f} | {ev['reward_mean']:.4f} | "
            f"{ev['kl_to_reference']:.3f} | {ev['objective']:.4f} | {ev['objective_gain']:.3f} |")


def evaluate_runs(run_dirs: list[str], n: int, seed: int) -> int:
    tr = Trainer(build_config("rsm-soft-zo", overrides=[f"train.seed={seed}", "train.epochs=1"]))
    print(f"# {n} held-out samples, evaluation seed of train.seed={seed}, the same for every run")
    print("| run | epochs | mode weights | worst Δw | reward | path KL | J | share of J*'s gain |")
    print("|---|---|---|---|---|---|---|---|")
    for d in run_dirs:
        path = Path(d) / "checkpoint.pt"
        if not path.is_file():
            print(f"error: {path}: no checkpoint (a finished run directory holds checkpoint.pt)", file=sys.stderr)
            return 2
        ck = torch.load(path, map_location="cpu", weights_only=False)
        tr.policy.load_state_dict(ck["policy"])
        ev = tr.evaluate(n)
        print(row(d, ck["epochs_done"], ev, ev["mode_weights_target"]), flush=True)
    tr.close()
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ceiling-epochs", type=int, default=300)
    ap.add_argument("--epochs", type=int, default=300, help="phase-2 epochs of rsm-soft-zo")
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--lr", type=float, default=0.002, help="phase 2's constant learning rate")
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--evaluate", nargs="+", metavar="RUN_DIR", help="re-evaluate these runs' checkpoints instead")
    ap.add_argument("--eval-samples", type=int, default=32768)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.evaluate:
        return evaluate_runs(a.evaluate, a.eval_samples, a.seed)
    t0 = time.perf_counter()
    ceiling = Trainer(build_config("rsm-soft-fo", overrides=[
        "method.fo_value=exact", f"train.seed={a.seed}", f"train.epochs={a.ceiling_epochs}"]))
    for _ in range(a.ceiling_epochs):
        ceiling.epoch()
    drift = Trainer(build_config("rsm-soft-zo", overrides=[
        f"train.seed={a.seed}", f"train.epochs={a.epochs}", f"train.lr={a.lr}", "train.lr_schedule=constant",
        f"train.batch_size={a.batch_size}"]))
    drift.policy.load_state_dict(ceiling.policy.state_dict())
    ev = drift.evaluate()
    target = ev["mode_weights_target"]
    print(f"# default-run drift, seed {a.seed}: exact weights {' / '.join(f'{v:.3f}' for v in target)}, "
          f"reward {ev['reward_target']:.4f}, J* {ev['objective_target']:.4f}")
    print("| phase | epoch | mode weights | worst Δw | reward | path KL | J | share of J*'s gain |")
    print("|---|---|---|---|---|---|---|---|")
    print(row("exact Ψ* (end)", a.ceiling_epochs, ev, target), flush=True)
    for e in range(1, a.epochs + 1):
        drift.epoch()
        if e % a.every == 0 or e == a.epochs:
            print(row(f"rsm-soft-zo, lr {a.lr:g} constant", e, drift.evaluate(), target), flush=True)
    print(f"\n{time.perf_counter() - t0:.0f} s in all; torch {torch.__version__}, {a.threads} thread(s)")
    ceiling.close()
    drift.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
