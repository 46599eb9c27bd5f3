"""GPU-hours benchmark: presets on one task under one budget and one seed set (issue 6, item 5).

    python bench/gpu_hours.py --task toy2d --presets tempflow-grpo,tempflow-grpo-k1,rsm-evr,rsm-evr-cost \
        --seeds 0,1,2 --epochs 40 --eval-every 2 --eval-samples 1024 --target 6 --out bench/results/gpu_hours_toy2d

Every (preset, seed) run trains with the same ``--set`` overrides (batch, steps, reward: the same
budget per epoch for presets that share a plan shape), and records per epoch its training model
evaluations (rollout + reference + train, as ``Trainer.nfe`` counts them), wall-clock seconds and
process CPU seconds of the training epochs only, the training batch's reward and KL, and every
``--eval-every`` epochs a held-out evaluation (fixed seed, ``--eval-samples`` samples; its cost is
recorded apart and not charged to the run). Time to target: the first evaluation at or above
``--target``, linearly interpolated in NFE / seconds from the evaluation before it (an evaluation
before training is point 0). A run that never reaches it is reported as not reached (its ratio
is then a bound, written ``>x``).

CPU-hours vs wall-clock: on a shared CPU, wall-clock includes time the process waited for a core;
process CPU time does not (it sums all the process's threads, so run with ``--threads 1``). On a
GPU the column is GPU-hours (wall-clock, the device is exclusive).

Outputs (``--out PREFIX``): ``PREFIX_epochs.csv`` (one row per epoch), ``PREFIX_runs.csv`` (one row
per run), ``PREFIX.md`` (medians, min-max over seeds, speedups vs ``--baseline`` paired by seed,
reward-KL Pareto points, the machine and the command line) and ``PREFIX.png`` (reward vs NFE,
reward vs CPU/GPU-hours, reward vs KL).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

from rsm_fast.config import ConfigError, build_config
from rsm_fast.trainer import Trainer


# ------------------------------------------------------------------------------------------------
def crossing(points: list[tuple[float, ...]], target: float) -> list[float] | None:
    """``points`` = [(reward, x1, x2, ...)] in time order; the x's where reward first reaches
    ``target``, interpolated linearly from the previous point (the first point itself if it is
    already there); None if never reached."""
    for j, p in enumerate(points):
        if p[0] >= target:
            if j == 0:
                return list(p[1:])
            q = points[j - 1]
            f = (target - q[0]) / (p[0] - q[0])
            return [a + f * (b - a) for a, b in zip(q[1:], p[1:])]
    return None


def paired_ratios(base: dict[int, float | None], other: dict[int, float | None]) -> list[tuple[float, str]]:
    """Speedup per seed = baseline cost / preset cost. ``(value, kind)``: kind '' exact, '>' the
    baseline did not reach the target within the budget (its cost is at least the budget, so the
    speedup is at least the value), '<' the preset did not, 'na' neither did."""
    out = []
    for seed in sorted(base):
        b, o = base[seed], other.get(seed)
        if b is not None and o is not None:   # 0 = already at the target before training
            out.append((b / o if o > 0 else (1.0 if b == 0 else math.inf), ""))
        elif b is None and o is not None:
            out.append((math.nan, ">"))
        elif b is not None and o is None:
            out.append((math.nan, "<"))
        else:
            out.append((math.nan, "na"))
    return out


def pareto(points: list[tuple[str, float, float]]) -> list[bool]:
    """Non-dominated flags for (name, reward, kl): higher reward and lower KL are better."""
    flags = []
    for _, r, k in points:
        dom = any((r2 >= r and k2 <= k) and (r2 > r or k2 < k) for _, r2, k2 in points)
        flags.append(not dom)
    return flags


# ------------------------------------------------------------------------------------------------
def run_one(preset: str, seed: int, args, overrides: list[str]) -> tuple[list[dict], dict]:
    sets = [f"task.name={args.task}", f"train.seed={seed}", f"train.threads={args.threads}",
            f"task.eval_samples={args.eval_samples}"] + overrides
    cfg = build_config(preset, None, sets)
    torch.manual_seed(seed)
    tr = Trainer(cfg)
    rows, wall, cpu, eval_s = [], 0.0, 0.0, 0.0

    def evaluate(epoch: int) -> dict:
        nonlocal eval_s
        t0 = time.perf_counter()
        ev = tr.evaluate(args.eval_samples)
        eval_s += time.perf_counter() - t0
        return {"eval_reward": ev["reward_mean"], "eval_kl": ev["kl_to_reference"]}

    train_nfe = lambda: tr.nfe["rollout"] + tr.nfe["reference"] + tr.nfe["train"]  # noqa: E731
    rows.append({"preset": preset, "seed": seed, "epoch": 0, "nfe": 0, "wall_s": 0.0, "cpu_s": 0.0,
                 "train_reward": math.nan, "train_kl": math.nan, **evaluate(0)})
    for e in range(1, args.epochs + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        s = tr.epoch()
        wall += time.perf_counter() - t0
        cpu += time.process_time() - c0
        row = {"preset": preset, "seed": seed, "epoch": e, "nfe": train_nfe(), "wall_s": round(wall, 4),
               "cpu_s": round(cpu, 4), "train_reward": s.get("reward_mean", math.nan), "train_kl": s.get("kl", math.nan),
               "eval_reward": math.nan, "eval_kl": math.nan}
        if e % args.eval_every == 0 or e == args.epochs:
            row.update(evaluate(e))
        rows.append(row)
        if args.budget_nfe and row["nfe"] >= args.budget_nfe:
            if math.isnan(row["eval_reward"]):
                row.update(evaluate(e))
            break
    tr.close()
    evals = [(r["eval_reward"], r["nfe"], r["wall_s"], r["cpu_s"]) for r in rows if not math.isnan(r["eval_reward"])]
    hit = crossing(evals, args.target)
    last = [r for r in rows if not math.isnan(r["eval_reward"])][-1]
    run = {"preset": preset, "seed": seed, "epochs": rows[-1]["epoch"], "nfe": rows[-1]["nfe"], "wall_s": rows[-1]["wall_s"],
           "cpu_s": rows[-1]["cpu_s"], "eval_s": round(eval_s, 3), "final_reward": last["eval_reward"],
           "final_kl": last["eval_kl"], "reached": hit is not None,
           "nfe_to_target": None if hit is None else hit[0], "wall_to_target": None if hit is None else hit[1],
           "cpu_to_target": None if hit is None else hit[2]}
    return rows, run


# ------------------------------------------------------------------------------------------------
def _fmt(vals: list[float], digits: int = 3) -> str:
    vals = [v for v in vals if v is not None and not math.isnan(v)]
    if not vals:
        return "—"
    med = statistics.median(vals)
    return f"{med:.{digits}g} ({min(vals):.{digits}g}–{max(vals):.{digits}g})" if len(vals) > 1 else f"{med:.{digits}g}"


def _ratio_cell(rs: list[tuple[float, str]]) -> str:
    exact = [v for v, k in rs if k == ""]
    bounds = [k for _, k in rs if k]
    cell = _fmt(exact, 3) + "×" if exact else "—"
    if bounds:
        cell += f" [{len(bounds)} seed(s): " + ", ".join(bounds) + "]"
    return cell


def write_markdown(path: Path, runs: list[dict], args, argv: list[str], hours: str) -> None:
    presets = list(dict.fromkeys(r["preset"] for r in runs))
    by = {p: {r["seed"]: r for r in runs if r["preset"] == p} for p in presets}
    base = by.get(args.baseline)
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    dev = "cuda" if any("cuda" in s for s in args.set) else "cpu"
    lines = [f"# GPU-hours benchmark: {args.task}", "",
             f"Date {date.today().isoformat()}; torch {torch.__version__}; device {dev} ({cpu}); "
             f"{args.threads} thread(s) per run; Python {platform.python_version()}.", "",
             f"Command: `python bench/{Path(__file__).name} {' '.join(argv)}`", "",
             f"Budget: {args.epochs} epochs" + (f" or {args.budget_nfe:,} training NFE" if args.budget_nfe else "")
             + f" per run; seeds {args.seeds}; overrides for every preset: {args.set or 'none'}; "
             f"held-out evaluation every {args.eval_every} epochs on {args.eval_samples} samples (not charged). "
             f"Target reward {args.target:g}. Speedup = {args.baseline}'s cost to the target / the preset's, "
             f"per seed, then median (min–max); '>' = the baseline missed the target within the budget, "
             f"'<' = the preset missed it.", "",
             f"| preset | reached | training NFE to target | {hours} s to target (process time) | wall-clock s to target "
             f"| speedup in NFE | speedup in CPU time | speedup in wall-clock | final reward | final KL |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for p in presets:
        rs = list(by[p].values())
        cells = [p, f"{sum(r['reached'] for r in rs)}/{len(rs)}", _fmt([r["nfe_to_target"] for r in rs]),
                 _fmt([r["cpu_to_target"] for r in rs]), _fmt([r["wall_to_target"] for r in rs])]
        for key in ("nfe_to_target", "cpu_to_target", "wall_to_target"):
            if base is None or p == args.baseline:
                cells.append("1×" if p == args.baseline else "—")
            else:
                cells.append(_ratio_cell(paired_ratios({s: r[key] for s, r in base.items()},
                                                       {s: r[key] for s, r in by[p].items()})))
        cells += [_fmt([r["final_reward"] for r in rs]), _fmt([r["final_kl"] for r in rs])]
        lines.append("| " + " | ".join(cells) + " |")
    pts = [(p, statistics.median(r["final_reward"] for r in by[p].values()),
            statistics.median(r["final_kl"] for r in by[p].values())) for p in presets]
    lines += ["", "Reward–KL at the end of the budget (median over seeds; * = not dominated by another preset: "
              "no other has both higher reward and lower KL):", ""]
    lines += [f"- {p}: reward {r:.4g}, KL {k:.4g}{' *' if f else ''}" for (p, r, k), f in zip(pts, pareto(pts))]
    lines += ["", "Per run:", "", "| preset | seed | epochs | NFE | CPU s | wall s | NFE to target | CPU s to target |",
              "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        nfe_t = "—" if r["nfe_to_target"] is None else f"{r['nfe_to_target']:,.0f}"
        cpu_t = "—" if r["cpu_to_target"] is None else f"{r['cpu_to_target']:.1f}"
        lines.append(f"| {r['preset']} | {r['seed']} | {r['epochs']} | {r['nfe']:,} | {r['cpu_s']:.1f} | {r['wall_s']:.1f} "
                     f"| {nfe_t} | {cpu_t} |")
    path.write_text("\n".join(lines) + "\n")


def write_plots(path: Path, rows: list[dict], args, hours: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plots", file=sys.stderr)
        return False
    presets = list(dict.fromkeys(r["preset"] for r in rows))
    colors = {p: f"C{i}" for i, p in enumerate(presets)}
    fig, ax = plt.subplots(1, 3, figsize=(16, 4.3))
    for p in presets:
        for seed in sorted({r["seed"] for r in rows if r["preset"] == p}):
            ev = [r for r in rows if r["preset"] == p and r["seed"] == seed and not math.isnan(r["eval_reward"])]
            lab = p if seed == min(r["seed"] for r in rows if r["preset"] == p) else None
            ax[0].plot([r["nfe"] for r in ev], [r["eval_reward"] for r in ev], color=colors[p], lw=1, alpha=0.8, label=lab)
            ax[1].plot([r["cpu_s"] / 3600 for r in ev], [r["eval_reward"] for r in ev], color=colors[p], lw=1, alpha=0.8)
            ax[2].plot([r["eval_kl"] for r in ev], [r["eval_reward"] for r in ev], color=colors[p], lw=1, alpha=0.8, marker=".")
    for a in ax:
        a.axhline(args.target, color="k", ls=":", lw=1)
    ax[0].set(xlabel="training model evaluations (NFE)", ylabel="held-out reward", title=f"{args.task}: reward vs NFE")
    ax[1].set(xlabel=f"{hours} (process CPU time)", title="reward vs hours")
    ax[2].set(xlabel="KL to the reference (nats per path)", title="reward vs KL")
    ax[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------------------------
def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="toy2d")
    p.add_argument("--presets", default="tempflow-grpo,tempflow-grpo-k1,rsm-evr,rsm-evr-cost")
    p.add_argument("--baseline", default="tempflow-grpo")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--budget-nfe", type=int, default=0, help="also stop a run at this many training NFE")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every preset")
    p.add_argument("--target", type=float, required=True, help="target held-out reward")
    p.add_argument("--eval-every", type=int, default=2)
    p.add_argument("--eval-samples", type=int, default=1024)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True, help="output prefix, e.g. bench/results/gpu_hours_toy2d")
    a = p.parse_args(argv)
    a.presets_list = [s for s in a.presets.split(",") if s]
    try:
        a.seed_list = [int(s) for s in a.seeds.split(",") if s]
    except ValueError:
        p.error(f"--seeds must be comma-separated integers, got {a.seeds!r}")
    if a.epochs < 1 or a.eval_every < 1 or a.eval_samples < 2:
        p.error("--epochs, --eval-every must be >= 1 and --eval-samples >= 2")
    return a


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    try:      # every preset x override must validate before the first run starts
        for p in args.presets_list:
            build_config(p, None, [f"task.name={args.task}"] + args.set)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    hours = "GPU" if any("cuda" in s for s in args.set) else "CPU"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    all_rows, runs = [], []
    for p in args.presets_list:
        for seed in args.seed_list:
            rows, run = run_one(p, seed, args, args.set)
            all_rows += rows
            runs.append(run)
            print(f"{p:22s} seed {seed}: {run['epochs']} epochs, NFE {run['nfe']:,}, CPU {run['cpu_s']:.1f} s, "
                  f"final reward {run['final_reward']:.3f}, to target: "
                  f"{'not reached' if not run['reached'] else format(run['nfe_to_target'], ',.0f') + ' NFE'}", flush=True)
    with open(f"{out}_epochs.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(all_rows[0]))
        w.writeheader()
        w.writerows(all_rows)
    with open(f"{out}_runs.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(runs[0]))
        w.writeheader()
        w.writerows(runs)
    Path(f"{out}.json").write_text(json.dumps({"argv": argv, "runs": runs}, indent=1) + "\n")
    write_markdown(Path(f"{out}.md"), runs, args, argv, hours)
    write_plots(Path(f"{out}.png"), all_rows, args, hours)
    print(f"wrote {out}.md, {out}_runs.csv, {out}_epochs.csv, {out}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
