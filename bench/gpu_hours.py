"""GPU-hours benchmark: presets on one task under one budget and one seed set (issue 6, item 5).

    python bench/gpu_hours.py --task toy2d --presets tempflow-grpo,tempflow-grpo-k1,rsm-evr \\
        --seeds 0,1,2 --epochs 60 --budget-nfe 1500000 --eval-every 1 --eval-samples 1024 \\
        --target 8 --out bench/results/gpu_hours_toy2d_<date>

**Runs.** Every (preset, seed) run is built like ``python -m rsm_fast.train --preset P --set ...``
(``rsm_fast.config.build_config``) with the same ``--set`` overrides for every preset, then
``Trainer.epoch()`` is called in a loop until the first budget is spent (the fused ops' backend is
recorded in every row, and a run whose ops fell back from C++ / Triton to plain torch refuses to
start unless ``RSM_FAST_OPS_BACKEND`` asks for that backend): ``--epochs`` epochs,
``--budget-nfe`` training model evaluations or ``--budget-seconds`` training seconds (process CPU
seconds on a CPU device, wall-clock on CUDA); the epoch that crosses a budget is the last one.
Per epoch: training NFE (rollout + reference + train, as ``Trainer.nfe`` counts them), wall-clock
(``perf_counter``) and process CPU seconds (``process_time``; all threads, so ``--threads 1``) of
``epoch()`` alone, the training batch's reward and path KL, and every ``--eval-every`` epochs (and
before training and at the end) a held-out evaluation, ``Trainer.evaluate(--eval-samples)``:
full-SDE samples from a fixed eval seed (the run's seed + 1000003, the same for every preset
at that seed), mean reward and KL to the reference. Its cost is recorded apart (``eval_s``,
``eval_nfe``) and never charged to the run.

**Time to target.** On the held-out curve (the pre-training evaluation is point 0 at zero cost):
the first evaluation with reward >= target, interpolated linearly from the evaluation before it,
with the same fraction in epochs, NFE, CPU and wall seconds. At point 0 already: cost 0. Never:
"not reached". ``--target T`` is an absolute reward; ``--target-frac f`` sets
``T = r0 + f (r_best - r0)`` with r0 the median pre-training reward and r_best the best preset's
median final reward (= f x r_best when r0 = 0; the offset form because a reward such as the 2-D
task's starts at 3, not 0).

**Ratios.** Speedup of a preset over ``--baseline`` = baseline cost to target / preset cost,
paired by seed, then median and min-max over seeds. If the baseline missed the target its cost
exceeds what it spent, so the speedup is a lower bound ``>x`` (x = its spend / the preset's
cost); if the preset missed it, an upper bound ``<x``; both missed: NA. The median and range use
exact seeds only; bounds are listed beside them.

CPU-hours vs wall-clock: on a shared CPU wall-clock includes the time the process waited for a
core, process CPU time does not, so CPU-hours are the more robust figure there. On CUDA the time
column is GPU-hours (wall-clock; the device is exclusive, and we synchronise before each reading).

Outputs for ``--out PREFIX``: ``PREFIX.csv`` (one row per epoch), ``PREFIX_summary.csv`` (one row
per run: costs to target, final reward/KL, per-seed speedups), ``PREFIX.md``, ``PREFIX.png``
(reward vs NFE, vs CPU/GPU-hours, vs wall-clock; reward-KL Pareto scatter; needs matplotlib) and
``PREFIX.json`` (the command, machine, code version and settings). ``--reanalyze PREFIX`` re-reads
PREFIX.csv and PREFIX.json and writes the summary, markdown and plot for another ``--target`` (to
``--out``) without training again.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch

try:                      # run as a script (bench/ on sys.path) or imported as bench.<name>
    from machine_info import cpu_model
except ImportError:
    from bench.machine_info import cpu_model

from rsm_fast.config import ConfigError, build_config
from rsm_fast.ops import backends
from rsm_fast.rewards import RewardError
from rsm_fast.trainer import NonFiniteError, Trainer

try:                                    # imported as bench.gpu_hours (tests) or run as a script
    from bench.gpu_hours_plots import write_plots
except ImportError:
    from gpu_hours_plots import write_plots

DEFAULT_PRESETS = "tempflow-grpo,tempflow-grpo-k1,rsm-uniform-realloc,rsm-evr,rsm-evr-cost,tempflow-evr,tempflow-evr-cost"
PHASES = ("rollout", "reward", "train", "alloc")       # the trainer's phase clock (wall seconds)
EPOCH_FIELDS = ("preset", "seed", "epoch", "nfe", "nfe_rollout", "nfe_reference", "nfe_train", "wall_s", "cpu_s",
                "train_reward", "train_kl", "eval_reward", "eval_kl", "eval_s", "eval_nfe") + tuple(f"{k}_s" for k in PHASES) \
    + ("ops_backend",)
COSTS = ("epochs", "nfe", "cpu_s", "wall_s")          # the x's of a crossing, in this order


# ------------------------------------------------------------------------------------------------
# arithmetic
# ------------------------------------------------------------------------------------------------
def crossing(points: list[tuple[float, ...]], target: float) -> list[float] | None:
    """``points`` = [(reward, x1, x2, ...)] in time order: the x's where the reward first reaches
    ``target``, linearly interpolated from the previous point (the first point's own x's if it
    is already there); None if it never does."""
    for j, p in enumerate(points):
        if p[0] >= target:
            if j == 0:
                return list(p[1:])
            q = points[j - 1]
            f = (target - q[0]) / (p[0] - q[0])
            return [a + f * (b - a) for a, b in zip(q[1:], p[1:])]
    return None


def eval_points(rows: list[dict]) -> list[tuple[float, ...]]:
    """One run's evaluation rows as crossing points (reward, epochs, nfe, cpu_s, wall_s)."""
    return [(r["eval_reward"], r["epoch"], r["nfe"], r["cpu_s"], r["wall_s"])
            for r in rows if not math.isnan(r["eval_reward"])]


def paired_ratios(base: dict[int, tuple], other: dict[int, tuple]) -> list[tuple[int, float, str]]:
    """Speedup per seed = baseline cost / preset cost, ``base`` and ``other`` mapping seed ->
    (cost to target or None if missed, total spent). Returns (seed, value, kind): kind '' exact,
    '>' lower bound (the baseline missed), '<' upper bound (the preset missed), 'na' both missed
    (value nan). Seeds missing from either side are skipped."""
    def div(a, b):
        return a / b if b > 0 else (1.0 if a == 0 else math.inf)
    out = []
    for seed in sorted(set(base) & set(other)):
        (b, b_spent), (o, o_spent) = base[seed], other[seed]
        if b is not None and o is not None:
            out.append((seed, div(b, o), ""))
        elif b is None and o is not None:
            out.append((seed, div(b_spent, o), ">"))
        elif b is not None:
            out.append((seed, div(b, o_spent), "<"))
        else:
            out.append((seed, math.nan, "na"))
    return out


def ratio_stats(rs: list[tuple[int, float, str]]) -> dict:
    """Median and min/max over the exact ratios; 'faster' = seeds on which the preset is surely
    faster (exact > 1, or a lower bound >= 1), out of 'n'."""
    exact = [v for _, v, k in rs if k == ""]
    faster = sum(1 for _, v, k in rs if (k == "" and v > 1) or (k == ">" and v >= 1))
    return {"median": statistics.median(exact) if exact else math.nan, "min": min(exact, default=math.nan),
            "max": max(exact, default=math.nan), "n_exact": len(exact), "faster": faster, "n": len(rs),
            "bounds": [(s, v, k) for s, v, k in rs if k]}


def pareto(points: list[tuple[str, float, float]]) -> list[bool]:
    """Non-dominated flags for (name, reward, kl): higher reward and lower KL are better."""
    return [not any(r2 >= r and k2 <= k and (r2 > r or k2 < k) for _, r2, k2 in points) for _, r, k in points]


def resolve_target(rows: list[dict], target: float | None, frac: float | None) -> tuple[float, str]:
    """The absolute target and a sentence saying where it came from."""
    if target is not None:
        return target, f"{target:g} (absolute, --target)"
    runs = group_runs(rows)
    r0 = statistics.median(eval_points(rs)[0][0] for rs in runs.values())
    finals: dict[str, list[float]] = {}
    for (p, _), rs in runs.items():
        finals.setdefault(p, []).append(eval_points(rs)[-1][0])
    best_p, best = max(((p, statistics.median(v)) for p, v in finals.items()), key=lambda t: t[1])
    t = r0 + frac * (best - r0)
    if best <= r0:
        print(f"warning: no preset improved on the reward before training ({best:.4g} <= {r0:.4g}); "
              "every run reaches --target-frac's target at zero cost", file=sys.stderr)
    return t, (f"{t:.4g} = r0 + {frac:g} (r_best - r0) with r0 = {r0:.4g} (median before training) and "
               f"r_best = {best:.4g} ({best_p}'s median final reward) (--target-frac)")


def group_runs(rows: list[dict]) -> dict[tuple[str, int], list[dict]]:
    out: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        out.setdefault((r["preset"], r["seed"]), []).append(r)
    return out


def summarize(rows: list[dict], target: float, baseline: str, stops: dict | None = None) -> list[dict]:
    """One summary row per (preset, seed): totals, costs to target, final reward/KL, speedups.
    ``stops`` maps (preset, seed) to why the run ended ('epochs', 'nfe', 'seconds' or 'failed: ...');
    a run that failed before reaching the target gets no speedup (kind 'failed')."""
    runs = []
    for (p, seed), rs in group_runs(rows).items():
        pts, last = eval_points(rs), rs[-1]
        hit = crossing(pts, target)
        run = {"preset": p, "seed": seed, "stop": (stops or {}).get((p, seed), ""), "epochs": last["epoch"],
               "nfe": last["nfe"], "cpu_s": last["cpu_s"],
               "wall_s": last["wall_s"], "eval_s": last["eval_s"], "eval_nfe": last["eval_nfe"],
               "nfe_per_epoch": last["nfe"] / max(last["epoch"], 1), "target": target, "reached": hit is not None}
        for c, v in zip(COSTS, hit or [None] * len(COSTS)):
            run[f"{c}_to_target"] = v
        run.update(final_reward=pts[-1][0], final_kl=[r["eval_kl"] for r in rs if not math.isnan(r["eval_reward"])][-1])
        for k in ("cpu", "wall") + PHASES:      # per epoch, for the systems side (phases: wall-clock)
            run[f"{k}_s_per_epoch"] = last.get(f"{k}_s", math.nan) / max(last["epoch"], 1)
        runs.append(run)
    base = {r["seed"]: r for r in runs if r["preset"] == baseline}
    for run in runs:          # kind 'unpaired': no baseline run at this seed
        for c in ("nfe", "cpu_s", "wall_s"):
            b = base.get(run["seed"])
            rs = paired_ratios({0: (b[f"{c}_to_target"], b[c])}, {0: (run[f"{c}_to_target"], run[c])}) if b else []
            if b and any(x["stop"].startswith("failed") and not x["reached"] for x in (b, run)):
                rs = [(0, math.nan, "failed")]
            run[f"speedup_{c}"] = rs[0][1] if rs else math.nan
            run[f"speedup_{c}_kind"] = rs[0][2] if rs else "unpaired"
    return runs


# ------------------------------------------------------------------------------------------------
# running
# ------------------------------------------------------------------------------------------------
def split_presets(text: str) -> list[str]:
    """``--presets`` split at the commas outside brackets: ``a,b[k=v,k2=v2],c`` -> 3 entries."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    out.append(cur.strip())
    return [x for x in out if x]


def parse_variant(label: str) -> tuple[str, list[str]]:
    """``preset[key=value,...]`` -> (preset, its own overrides); a plain name has none. The whole
    label names the run in every table, so a variant is compared like any preset."""
    if "[" not in label:
        return label, []
    name, rest = label.split("[", 1)
    inner = rest[:-1]
    depth = [0]
    for ch in inner:
        depth.append(depth[-1] + (ch == "[") - (ch == "]"))
    if not rest.endswith("]") or not name or min(depth) < 0 or depth[-1] != 0:
        raise ConfigError(f"--presets entry {label!r}: a variant is written preset[key=value,...]")
    sets = [x.strip() for x in split_presets(inner)]       # commas inside a list value stay in it
    if not sets or any("=" not in x for x in sets):
        raise ConfigError(f"--presets entry {label!r}: each override inside [] is key=value")
    return name, sets


def run_config(preset: str, args, seed: int):
    sets = [f"task.name={args.task}", f"train.seed={seed}", f"train.threads={args.threads}",
            f"task.eval_samples={args.eval_samples}"] + ([f"train.epochs={args.epochs}"] if args.epochs else [])
    name, own = parse_variant(preset)
    try:
        return build_config(name, None, sets + list(args.set) + own)     # the variant's own overrides win
    except ConfigError as e:
        msg = str(e)
        raise ConfigError(msg if f"'{name}'" in msg else f"preset {preset}: {msg}") from None


def run_one(preset: str, seed: int, args, log=print) -> tuple[list[dict], str]:
    """Train one (preset, seed) until the first budget is spent: one row per epoch (+ epoch 0) and
    why it stopped. A run whose trainer raises after the first epoch (a NaN, an allocator that left
    nothing to train) ends with that epoch, as 'failed: <message>': its cost counts (no train
    reward/KL) and the policy as it was left is evaluated."""
    tr = Trainer(run_config(preset, args, seed))
    cuda, backend = tr.device.type == "cuda", backends.for_device(tr.device).name
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    wall = cpu = eval_s = 0.0

    def evaluate(row: dict) -> None:
        nonlocal eval_s
        sync()
        t0 = time.perf_counter()
        ev = tr.evaluate(args.eval_samples)
        sync()
        eval_s += time.perf_counter() - t0
        row.update(eval_reward=ev["reward_mean"], eval_kl=ev["kl_to_reference"], eval_s=round(eval_s, 4),
                   eval_nfe=tr.nfe["eval"])

    def row(epoch: int, s: dict) -> dict:
        return {"preset": preset, "seed": seed, "epoch": epoch, "nfe": tr.nfe_total(), "nfe_rollout": tr.nfe["rollout"],
                "nfe_reference": tr.nfe["reference"], "nfe_train": tr.nfe["train"], "wall_s": round(wall, 4),
                "cpu_s": round(cpu, 4), "train_reward": s.get("reward_mean", math.nan), "train_kl": s.get("kl", math.nan),
                "eval_reward": math.nan, "eval_kl": math.nan, "eval_s": round(eval_s, 4), "eval_nfe": tr.nfe["eval"],
                **{f"{k}_s": round(tr.clock.seconds.get(k, 0.0), 4) for k in PHASES}, "ops_backend": backend}

    rows = [row(0, {})]
    evaluate(rows[0])
    epoch, stop = 0, None
    try:
        while stop is None:
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                s = tr.epoch()
            except (ConfigError, NonFiniteError, RewardError) as e:
                if epoch == 0:
                    raise
                s, stop = {}, "failed: " + str(e).splitlines()[0]
            sync()
            wall += time.perf_counter() - t0
            cpu += time.process_time() - c0
            epoch += 1
            rows.append(row(epoch, s))
            spent = wall if cuda else cpu
            stop = stop or ("epochs" if args.epochs and epoch >= args.epochs else
                            "nfe" if args.budget_nfe and tr.nfe_total() >= args.budget_nfe else
                            "seconds" if args.budget_seconds and spent >= args.budget_seconds else None)
            if stop or epoch % args.eval_every == 0:
                evaluate(rows[-1])
    finally:
        tr.close()
    last = rows[-1]
    log(f"{preset:22s} seed {seed}: {epoch} epochs (stop: {stop}), NFE {last['nfe']:,}, CPU {last['cpu_s']:.1f} s, "
        f"wall {last['wall_s']:.1f} s, eval {last['eval_s']:.1f} s, final reward {last['eval_reward']:.3f} "
        f"KL {last['eval_kl']:.3g}", flush=True)
    return rows, stop


def machine(device: str, threads: int) -> dict:
    cpu = cpu_model()
    info = {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "torch": torch.__version__,
            "python": platform.python_version(), "device": device, "date": date.today().isoformat(),
            "loadavg_before": [round(x, 2) for x in os.getloadavg()],
            "ops_backend": backends.for_device(torch.device(device)).name}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def provenance() -> dict:
    """Which rsm_fast ran: its folder, the git commit there and whether rsm_fast/ differs from it
    (read-only git calls; 'unknown' without git)."""
    import rsm_fast
    root = Path(rsm_fast.__file__).resolve().parents[1]
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}

    def git(*a):
        return subprocess.run(["git", "-C", str(root), *a], capture_output=True, text=True, timeout=20, env=env)
    try:
        head = git("rev-parse", "--short", "HEAD")
        changed = git("status", "--porcelain", "--", "rsm_fast").stdout.splitlines() if head.returncode == 0 else []
    except (OSError, subprocess.SubprocessError):
        head, changed = None, []
    ok = head is not None and head.returncode == 0
    return {"path": str(root), "commit": head.stdout.strip() if ok else "unknown", "changed_files": len(changed) if ok else None}


# ------------------------------------------------------------------------------------------------
# outputs
# ------------------------------------------------------------------------------------------------
def write_csv(path: Path, rows: list[dict], fields=None) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(fields or rows[0]), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def read_epochs(path: Path) -> list[dict]:
    rows = []
    with open(path, newline="") as fh:
        for r in csv.DictReader(fh):
            rows.append({k: (v if k in ("preset", "ops_backend") else int(v) if k in ("seed", "epoch") or k.startswith("nfe")
                             or k == "eval_nfe" else float(v)) for k, v in r.items()})
    return rows


def _num(v: float, digits: int = 3) -> str:
    return f"{v:,.0f}" if abs(v) >= 10 ** digits else f"{v:.{digits}g}"


def _fmt(vals, digits: int = 3, scale: float = 1.0) -> str:
    """Median (min–max) of the non-missing values."""
    vals = [v * scale for v in vals if v is not None and not math.isnan(v)]
    if not vals:
        return "—"
    med, lo, hi = (_num(v, digits) for v in (statistics.median(vals), min(vals), max(vals)))
    return f"{med} ({lo}–{hi})" if len(vals) > 1 and lo != hi else med


def _ratio_cell(st: dict) -> str:
    cell = "—" if not st["n_exact"] else (f"{st['median']:.3g}× ({st['min']:.3g}–{st['max']:.3g})" if st["n_exact"] > 1
                                         else f"{st['median']:.3g}×")
    if st["bounds"]:
        cell += "; " + ", ".join(f"s{s}: " + ({"na": "NA", "failed": "failed"}.get(k) or f"{k}{v:.3g}×")
                                 for s, v, k in st["bounds"])
    return cell + f"; faster {st['faster']}/{st['n']}"


def _kind(v: float, k: str) -> str:
    return {"na": "NA (both missed)", "unpaired": "—", "failed": "failed"}.get(k, f"{k}{v:.3g}×")


def write_markdown(path: Path, runs: list[dict], meta: dict, target_note: str) -> None:
    a, m = meta["args"], meta["machine"]
    gpu = m["device"].startswith("cuda")
    clocks = [("wall_s", "GPU-hours")] if gpu else [("cpu_s", "CPU-hours"), ("wall_s", "wall-clock hours")]
    presets = list(dict.fromkeys(r["preset"] for r in runs))
    by = {p: [r for r in runs if r["preset"] == p] for p in presets}
    base = a["baseline"] if a["baseline"] in by else None
    budget = [f"{a['epochs']} epochs" if a["epochs"] else "", f"{a['budget_nfe']:,} training NFE" if a["budget_nfe"] else "",
              f"{a['budget_seconds']:g} training {'wall' if gpu else 'CPU'} seconds" if a["budget_seconds"] else ""]
    dev = f"CUDA {m['gpu']}" if gpu else f"CPU {m['cpu']}, {m['cores']} cores"
    code = meta.get("code", {})
    code_note = (f"rsm_fast from `{code.get('path')}` at git {code.get('commit')}" +
                 ("" if code.get("changed_files") is None else " (clean)" if not code["changed_files"]
                  else f" with uncommitted changes in {code['changed_files']} file(s) under rsm_fast/"))
    lines = [f"# GPU-hours benchmark: {a['task']} ({'GPU' if gpu else 'CPU'}-hours)", "",
             f"- Date {m['date']}; {dev}; {m['threads']} torch thread(s) per run; torch {m['torch']}; "
             f"Python {m['python']}; fused ops on `{m.get('ops_backend', '?')}`. 1-min load average before / after: "
             f"{m['loadavg_before']} / {m.get('loadavg_after', '?')}.",
             f"- Code: {code_note}.",
             f"- Command: `{meta['command']}`" + (f"; tables rewritten by `{meta['reanalyzed']}`" if meta.get("reanalyzed") else ""),
             f"- Budget per run: the first of {', '.join(b for b in budget if b)} (the epoch that crosses it is the last); "
             f"seeds {a['seeds']}; `--set` for every preset: {' '.join(a['set']) or 'none'}"
             + ("; `preset[k=v,...]` = the preset with its own overrides" if any("[" in p for p in presets) else "")
             + (f"; {a['jobs']} runs at a time, one process each" if a.get("jobs", 1) > 1 else "") + ".",
             f"- Held-out evaluation before training, every {a['eval_every']} epoch(s) and at the end: {a['eval_samples']} "
             "full-SDE samples from a fixed seed per training seed; its cost is not charged to the run (eval_s in the CSV).",
             f"- Target reward: {target_note}. Time to target: the first evaluation at or above it, linearly interpolated "
             "from the one before (cost 0 if the policy starts there).",
             f"- Speedup = {base or a['baseline'] + ' (not run)'}'s cost to the target / the preset's, paired by seed, "
             "median (min–max) over the seeds where both reached it; `>x` = the baseline missed it (lower bound), "
             "`<x` = the preset missed it (upper bound); faster k/n = seeds on which the preset is surely faster.",
             "- " + ("GPU-hours = wall-clock on the device." if gpu else
                     "CPU-hours = process CPU time (all threads) of the training epochs; wall-clock includes time the "
                     "process waited for a core, so on a shared machine CPU-hours are the more reliable timing."), ""]
    head = ["preset", "reached", "epochs to target", "training NFE to target"] + [f"{h} to target" for _, h in clocks]
    head += ([f"speedup {x}" for x in ["NFE"] + [h for _, h in clocks]] if base else [])
    head += ["final reward", "final KL"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in presets:
        rs = by[p]
        cells = [p, f"{sum(r['reached'] for r in rs)}/{len(rs)}", _fmt([r["epochs_to_target"] for r in rs]),
                 _fmt([r["nfe_to_target"] for r in rs])]
        cells += [_fmt([r[f"{c}_to_target"] for r in rs], scale=1 / 3600) for c, _ in clocks]
        for c in (["nfe"] + [c for c, _ in clocks]) if base else []:
            cells.append("1× (baseline)" if p == base else _ratio_cell(ratio_stats(
                [(r["seed"], r[f"speedup_{c}"], r[f"speedup_{c}_kind"]) for r in rs
                 if r[f"speedup_{c}_kind"] != "unpaired"])))
        cells += [_fmt([r["final_reward"] for r in rs], 4), _fmt([r["final_kl"] for r in rs])]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Cells: median (min–max) over seeds of the runs that reached the target; hours = seconds / 3600.", ""]
    if base:
        lines += [f"## Speedup over {base} per seed", "", "| preset | seed | NFE | " + " | ".join(h for _, h in clocks) + " |",
                  "|---|---|---|" + "---|" * len(clocks)]
        lines += [f"| {r['preset']} | {r['seed']} | " + " | ".join(_kind(r[f"speedup_{c}"], r[f"speedup_{c}_kind"])
                                                               for c in ["nfe"] + [c for c, _ in clocks]) + " |"
                  for r in runs if r["preset"] != base]
        lines.append("")
    lines += ["## Cost per epoch", "", "Mean over each run's epochs, median over seeds: the systems side (an epoch's "
              "price) apart from the algorithmic side (epochs to target, above). Phases are the trainer's wall-clock "
              "phase clock (`alloc`: per-step statistics, the allocator and re-compiling the plan).", "",
              "| preset | NFE | CPU ms | wall ms | " + " | ".join(f"{k} ms" for k in PHASES) + " | µs CPU per NFE |",
              "|---|---|---|---|" + "---|" * (len(PHASES) + 1)]
    for p in presets:
        rs = by[p]
        cells = [_fmt([r["nfe_per_epoch"] for r in rs])]
        cells += [_fmt([r[f"{k}_s_per_epoch"] for r in rs], scale=1e3) for k in ("cpu", "wall") + PHASES]
        cells.append(_fmt([1e6 * r["cpu_s"] / r["nfe"] for r in rs if r["nfe"]]))
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    lines.append("")
    pts = [(p, statistics.median(r["final_reward"] for r in by[p]), statistics.median(r["final_kl"] for r in by[p]))
           for p in presets]
    lines += ["## Reward–KL at the end of the budget", "",
              "Held-out reward and KL to the reference (nats per path) of the last evaluation, median over seeds; "
              "**yes** = Pareto point (no other preset has both a higher reward and a lower KL). Runs that stopped "
              "before the budget (failed) are compared where they stopped: see the training NFE.", "",
              "| preset | final reward | final KL | training NFE at the end | Pareto |", "|---|---|---|---|---|"]
    lines += [f"| {p} | {r:.4g} | {k:.4g} | {_fmt([x['nfe'] for x in by[p]])} | {'**yes**' if f else 'no'} |"
              for (p, r, k), f in zip(pts, pareto(pts))]
    lines += ["", "## Per run", "", "| preset | seed | stop | epochs | training NFE | CPU s | wall s | eval s (not charged) "
              "| epochs to target | NFE to target | CPU s to target | wall s to target | final reward | final KL |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    f = lambda v, d: "not reached" if v is None else f"{v:,.{d}f}"  # noqa: E731
    failures = list(dict.fromkeys(r["stop"][8:] for r in runs if r["stop"].startswith("failed: ")))
    for r in runs:
        stop = f"failed ({failures.index(r['stop'][8:]) + 1})" if r["stop"].startswith("failed: ") else r["stop"] or "—"
        lines.append(f"| {r['preset']} | {r['seed']} | {stop} | {r['epochs']} | {r['nfe']:,} | {r['cpu_s']:.1f} | {r['wall_s']:.1f} "
                     f"| {r['eval_s']:.1f} | {f(r['epochs_to_target'], 2)} | {f(r['nfe_to_target'], 0)} "
                     f"| {f(r['cpu_s_to_target'], 2)} | {f(r['wall_s_to_target'], 2)} | {r['final_reward']:.4g} "
                     f"| {r['final_kl']:.4g} |")
    if failures:
        lines += ["", "Failures (the trainer raised; the run ends with that epoch, its cost counted):", ""]
        lines += [f"{i}. {msg}" for i, msg in enumerate(failures, 1)]
    path.write_text("\n".join(lines) + "\n")


def write_outputs(out: str, rows: list[dict], meta: dict, args) -> list[dict]:
    target, note = resolve_target(rows, args.target, args.target_frac)
    stops = {(r["preset"], r["seed"]): r["stop"] for r in meta.get("runs", [])}
    runs = summarize(rows, target, meta["args"]["baseline"], stops)
    write_csv(Path(f"{out}_summary.csv"), runs)
    write_markdown(Path(f"{out}.md"), runs, meta, note)
    gpu = meta["machine"]["device"].startswith("cuda")
    presets = list(dict.fromkeys(r["preset"] for r in runs))
    med = [(p, statistics.median(r["final_reward"] for r in runs if r["preset"] == p),
            statistics.median(r["final_kl"] for r in runs if r["preset"] == p)) for p in presets]
    front = dict(zip(presets, pareto(med)))
    done = write_plots(Path(f"{out}.png"), rows, runs, front, target, meta["args"]["task"], gpu)
    print(f"target {note}\nwrote {out}.md, {out}_summary.csv" + (f", {out}.png" if done else ""))
    return runs


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------
def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/gpu_hours.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[2:]))
    p.add_argument("--task", default="toy2d", choices=("toy2d", "digits-flow", "digits-ddim"))
    p.add_argument("--presets", default=DEFAULT_PRESETS, help=f"comma-separated (default {DEFAULT_PRESETS})")
    p.add_argument("--baseline", default="tempflow-grpo", help="the preset the speedups are relative to")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=0, help="epochs per run (0 = no cap: a --budget-* must be set)")
    p.add_argument("--budget-nfe", type=int, default=0, help="stop a run once it has spent this many training NFE")
    p.add_argument("--budget-seconds", type=float, default=0.0,
                   help="stop a run once it has spent this many training seconds (CPU: process time; CUDA: wall)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for every preset")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--target", type=float, default=None, help="absolute target held-out reward")
    g.add_argument("--target-frac", type=float, default=None,
                   help="target = r0 + f (r_best - r0): r0 the median reward before training, r_best the best "
                        "preset's median final reward")
    p.add_argument("--eval-every", type=int, default=1, help="epochs between held-out evaluations")
    p.add_argument("--eval-samples", type=int, default=1024)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per run (CPU-time accounting: 1)")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs at a time, each in its own process (CPU: at most one per core; the CPU-seconds of a "
                        "run are its own process's, the wall-clock includes contention for memory bandwidth)")
    p.add_argument("--out", required=True, help="output prefix, e.g. bench/results/gpu_hours_toy2d_2026-11-23")
    p.add_argument("--reanalyze", default=None, metavar="PREFIX",
                   help="no training: re-read PREFIX.csv and PREFIX.json and rewrite the tables for this target")
    a = p.parse_args(argv)
    a.preset_list = split_presets(a.presets)
    try:
        a.seed_list = [int(s) for s in a.seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds must be comma-separated integers, got {a.seeds!r}")
    if not a.preset_list or not a.seed_list:
        p.error("--presets and --seeds must name at least one preset and one seed")
    if a.target_frac is not None and not 0 < a.target_frac <= 1:
        p.error(f"--target-frac must be in (0, 1], got {a.target_frac}")
    if not a.reanalyze and not (a.epochs or a.budget_nfe or a.budget_seconds):
        p.error("give a budget: --epochs, --budget-nfe and/or --budget-seconds")
    if min(a.epochs, a.budget_nfe, a.budget_seconds) < 0 or a.eval_every < 1 or a.eval_samples < 2 or a.threads < 0:
        p.error("budgets must be >= 0, --eval-every >= 1, --eval-samples >= 2, --threads >= 0")
    if a.jobs < 1:
        p.error(f"--jobs must be >= 1, got {a.jobs}")
    return a


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    command = "python bench/gpu_hours.py " + shlex.join(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.reanalyze:
        try:
            rows = read_epochs(Path(f"{args.reanalyze}.csv"))
            meta = json.loads(Path(f"{args.reanalyze}.json").read_text())
        except (OSError, ValueError, KeyError) as e:
            print(f"error: cannot re-read {args.reanalyze}.csv / .json: {e}", file=sys.stderr)
            return 2
        meta["reanalyzed"] = command
        meta["args"]["baseline"] = args.baseline
        write_outputs(str(out), rows, meta, args)
        return 0
    try:      # every preset x override must validate before the first run starts
        cfgs = [run_config(p, args, args.seed_list[0]) for p in args.preset_list]
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.baseline not in args.preset_list:
        print(f"note: baseline {args.baseline} is not among --presets: no speedup columns", file=sys.stderr)
    meta = {"command": command, "argv": argv, "machine": machine(cfgs[0].train.device, args.threads), "code": provenance(),
            "args": {k: getattr(args, k) for k in ("task", "baseline", "seeds", "epochs", "budget_nfe", "budget_seconds",
                                                    "set", "target", "target_frac", "eval_every", "eval_samples", "jobs")}}
    meta["args"]["presets"] = args.preset_list
    want = backends.forced() or ("triton" if cfgs[0].train.device.startswith("cuda") else "cpp")
    if meta["machine"]["ops_backend"] != want:      # a silent fallback would time another implementation
        print(f"error: the fused ops fell back to '{meta['machine']['ops_backend']}' instead of '{want}'; fix the "
              f"build, or set RSM_FAST_OPS_BACKEND to benchmark a backend on purpose", file=sys.stderr)
        return 2
    rows: list[dict] = []
    meta["runs"] = []
    t0 = time.perf_counter()
    todo = [(p, seed) for p in args.preset_list for seed in args.seed_list]
    try:
        if args.jobs == 1:
            results = [run_one(p, seed, args) for p, seed in todo]
        else:     # one process per run (spawn: no torch state shared), results in the table's order
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor
            with ProcessPoolExecutor(max_workers=args.jobs, mp_context=mp.get_context("spawn")) as pool:
                futs = [pool.submit(run_one, p, seed, args) for p, seed in todo]
                results = [f.result() for f in futs]
        for (p, seed), (rs, stop) in zip(todo, results):
            rows += rs
            meta["runs"].append({"preset": p, "seed": seed, "stop": stop})
    except (ConfigError, NonFiniteError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    meta["machine"]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    meta["total_wall_s"] = round(time.perf_counter() - t0, 1)
    write_csv(Path(f"{out}.csv"), rows, EPOCH_FIELDS)
    Path(f"{out}.json").write_text(json.dumps(meta, indent=1) + "\n")
    write_outputs(str(out), rows, meta, args)
    print(f"wrote {out}.csv, {out}.json ({meta['total_wall_s']:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
