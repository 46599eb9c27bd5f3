"""Plots of the GPU-hours benchmark (bench/gpu_hours.py); matplotlib is imported lazily."""
from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path


def write_plots(path: Path, rows: list[dict], runs: list[dict], front: dict[str, bool], target: float | None, task: str,
                gpu: bool) -> bool:
    """One PNG, four panels: held-out reward vs training NFE, vs CPU-hours (GPU-hours on CUDA), vs
    wall-clock hours (one thin line per seed, the target dotted), and the final reward vs KL per
    run (small) and per preset median (large; a star if ``front[preset]``, i.e. not dominated)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)", file=sys.stderr)
        return False
    presets = list(dict.fromkeys(r["preset"] for r in rows))
    color = {p: f"C{i % 10}" for i, p in enumerate(presets)}
    fig, ax = plt.subplots(2, 2, figsize=(13, 9.5))
    xs = [("nfe", 1.0, "training model evaluations (NFE)"),
          ("wall_s" if gpu else "cpu_s", 1 / 3600, "GPU-hours (wall-clock)" if gpu else "CPU-hours (process CPU time)"),
          ("wall_s", 1 / 3600, "wall-clock hours")]
    labelled = set()
    curves: dict[tuple, list[dict]] = {}
    for r in rows:
        curves.setdefault((r["preset"], r["seed"]), []).append(r)
    for (p, _), rs in curves.items():
        ev = [r for r in rs if not math.isnan(r["eval_reward"])]
        for a, (key, scale, _) in zip(ax.flat, xs):
            a.plot([r[key] * scale for r in ev], [r["eval_reward"] for r in ev], color=color[p], lw=0.9, alpha=0.75,
                   label=None if p in labelled else p)
        labelled.add(p)
    for a, (_, _, label) in zip(ax.flat, xs):
        if target is not None:            # a reward target (an objective-gain target is not on this axis)
            a.axhline(target, color="k", ls=":", lw=1)
        a.set(xlabel=label, ylabel="held-out reward")
    note = "" if target is None else f"; dotted: target {target:.3g}"
    ax.flat[0].set_title(f"{task}: reward vs NFE (one thin line per seed{note})")
    ax.flat[1].set_title("reward vs " + ("GPU" if gpu else "CPU") + "-hours")
    ax.flat[2].set_title("reward vs wall-clock")
    ax.flat[0].legend(fontsize=8)
    pa = ax.flat[3]
    med = [(p, statistics.median(r["final_reward"] for r in runs if r["preset"] == p),
            statistics.median(r["final_kl"] for r in runs if r["preset"] == p)) for p in presets]
    for p, rw, kl in med:
        seeds = [r for r in runs if r["preset"] == p]
        pa.scatter([r["final_kl"] for r in seeds], [r["final_reward"] for r in seeds], color=color[p], s=12, alpha=0.6)
        pa.scatter([kl], [rw], color=color[p], s=90, marker="*" if front.get(p) else "o", edgecolors="k",
                   label=p + (" (Pareto)" if front.get(p) else ""))
    if all(r["final_kl"] > 0 for r in runs):
        pa.set_xscale("log")
    pa.set(xlabel="KL to the reference at the end (nats per path)", ylabel="final held-out reward",
           title="reward–KL (small: seeds, large: median; star = non-dominated)")
    pa.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
