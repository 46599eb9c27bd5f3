"""Plots of a run directory's per-epoch log (issue 6 item 2): ``python -m rsm_fast.plots RUN [RUN ...]``.

From ``log.jsonl`` (one line per epoch, see :mod:`rsm_fast.diagnostics`) it draws into
``RUN/plots/``:

* ``influence.png`` — the Normalized Influence Metric h(t) per sampling step, in both
  normalisations (per unit of the value-gradient estimate g and per unit of r z), each divided by
  its maximum over steps (spec §3.4 (a)), averaged over epochs; next to it the per-branch variance
  v_i and the clip fraction per step;
* ``branches.png`` — K_i (records per trunk at step i) over epochs: the allocator's moves;
* ``reward_hours.png`` — training reward against cumulative training hours (rollout + reward +
  train phases; GPU-hours on CUDA, CPU-hours on the CPU) and against model evaluations;
* ``reward_kl.png`` — training reward against the KL to the reference along the samples' paths.

Several runs given together are drawn on the same axes (one colour per run) into the first run's
``plots/`` unless ``--out`` says otherwise.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .runlog import RunDirError


def require_matplotlib():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RunDirError("plots need matplotlib: pip install 'rsm_fast[viz]'") from None
    return plt


def read_log(run: Path) -> tuple[list[dict], dict]:
    """The epoch records of a run directory and its config (one-line error when unreadable)."""
    run = Path(run)
    log = run / "log.jsonl"
    if not log.is_file():
        raise RunDirError(f"'{run}' has no log.jsonl (not a run directory)")
    recs = []
    for n, line in enumerate(log.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            recs.append(json.loads(line))
        except json.JSONDecodeError:
            raise RunDirError(f"'{log}' line {n} is not valid JSON") from None
    cfg = {}
    if (run / "config.yaml").is_file():
        import yaml
        cfg = yaml.safe_load((run / "config.yaml").read_text()) or {}
    return [r for r in recs if "per_step" in r or "reward_mean" in r], cfg


def _hours_label(cfg: dict) -> str:
    dev = str(cfg.get("train", {}).get("device", "cpu"))
    return "GPU-hours" if dev.startswith("cuda") else "CPU-hours (wall-clock)"


def _train_hours(rec: dict) -> float:
    s = rec.get("seconds", {})
    return sum(s.get(k, 0.0) for k in ("rollout", "reward", "train", "alloc")) / 3600.0


def _mean_per_step(recs: list[dict], key: str) -> list[float | None]:
    rows = [r["per_step"][key] for r in recs if key in r.get("per_step", {})]
    if not rows:
        return []
    out = []
    for i in range(len(rows[0])):
        vals = [row[i] for row in rows if i < len(row) and row[i] is not None]
        out.append(sum(vals) / len(vals) if vals else None)
    return out


def _norm(v: list) -> tuple[list[int], list[float]]:
    pts = [(i, x) for i, x in enumerate(v) if x is not None]
    top = max((abs(x) for _, x in pts), default=0.0) or 1.0
    return [i for i, _ in pts], [abs(x) / top for _, x in pts]


def draw_runs(runs: list[Path], out: Path) -> list[Path]:
    plt = require_matplotlib()
    data = [(Path(r), *read_log(r)) for r in runs]
    out.mkdir(parents=True, exist_ok=True)
    written = []
    label = lambda run, cfg: f"{cfg.get('preset', run.name)} ({run.name})" if len(data) > 1 else cfg.get("preset", run.name)  # noqa: E731

    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    for run, recs, cfg in data:
        for key, style in (("h_g", "-"), ("h_rz", "--")):
            i, y = _norm(_mean_per_step(recs, key))
            if i:
                ax[0].plot(i, y, style, marker="o", ms=3, label=f"{label(run, cfg)}: {key}")
        for a, key in ((ax[1], "v"), (ax[2], "clip")):
            v = _mean_per_step(recs, key)
            pts = [(i, x) for i, x in enumerate(v) if x is not None]
            if pts:
                a.plot(*zip(*pts), marker="o", ms=3, label=label(run, cfg))
    ax[0].set(title="influence h(t) / max_t h (mean over epochs)", xlabel="sampling step i (0 = noisiest)")
    ax[1].set(title="per-branch variance v_i (sibling spread)", xlabel="sampling step i", yscale="log")
    ax[2].set(title="clip fraction (last inner update)", xlabel="sampling step i")
    for a in ax:
        if a.has_data():
            a.legend(fontsize=7)
    written.append(_save(fig, out / "influence.png", plt))

    fig, axes = plt.subplots(1, len(data), figsize=(5 * len(data), 4), squeeze=False)
    for a, (run, recs, cfg) in zip(axes[0], data):
        K = [r["per_step"]["K"] for r in recs if "K" in r.get("per_step", {})]
        if K:
            grid = [[x if x is not None else 0.0 for x in row] for row in K]
            im = a.imshow(list(map(list, zip(*grid))), aspect="auto", origin="lower", cmap="viridis")
            fig.colorbar(im, ax=a, label="K_i (branches per trunk)")
        a.set(title=f"K_i over epochs: {label(run, cfg)}", xlabel="epoch", ylabel="sampling step i")
    written.append(_save(fig, out / "branches.png", plt))

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for run, recs, cfg in data:
        ys = [r["reward_mean"] for r in recs if "reward_mean" in r]
        ok = [r for r in recs if "reward_mean" in r]
        ax[0].plot([_train_hours(r) for r in ok], ys, label=label(run, cfg))
        ax[1].plot([r.get("nfe", 0) for r in ok], ys, label=label(run, cfg))
    ax[0].set(title="training reward vs hours", xlabel=_hours_label(data[0][2]), ylabel="reward (training batch)")
    ax[1].set(title="training reward vs model evaluations", xlabel="NFE (rollout + reference + train)")
    for a in ax:
        if a.has_data():
            a.legend(fontsize=7)
    written.append(_save(fig, out / "reward_hours.png", plt))

    fig, a = plt.subplots(figsize=(5.5, 4))
    for run, recs, cfg in data:
        ok = [r for r in recs if "reward_mean" in r and "kl" in r]
        a.plot([r["kl"] for r in ok], [r["reward_mean"] for r in ok], marker=".", label=label(run, cfg))
    a.set(title="reward vs KL to the reference", xlabel="KL (nats per sample path)", ylabel="reward (training batch)")
    if a.has_data():
        a.legend(fontsize=7)
    written.append(_save(fig, out / "reward_kl.png", plt))
    return written


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def draw_run(run: Path) -> list[Path]:
    return draw_runs([Path(run)], Path(run) / "plots")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rsm_fast.plots", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="run directories (each with log.jsonl)")
    p.add_argument("--out", type=Path, default=None, help="folder for the PNGs (default <first run>/plots)")
    args = p.parse_args(argv)
    try:
        files = draw_runs(args.runs, args.out or args.runs[0] / "plots")
    except RunDirError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for f in files:
        print(f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
