"""The GPU-hours benchmark's arithmetic and tables (bench/gpu_hours.py runs, this module reads):
crossings of a target on the held-out curves, paired speedups by seed, the summary rows, the CSV
files, the markdown tables and the plot call. See bench/gpu_hours.py's docstring for the protocol."""
from __future__ import annotations

import csv
import math
import statistics
import sys
from pathlib import Path

try:                                    # imported as bench.gpu_hours_report (tests) or from a script
    from bench.gpu_hours_cost import COLUMNS as COST_COLUMNS, fe_of, prices_note
    from bench.gpu_hours_plots import write_plots
except ImportError:
    from gpu_hours_cost import COLUMNS as COST_COLUMNS, fe_of, prices_note
    from gpu_hours_plots import write_plots

PHASES = ("rollout", "reward", "train", "alloc")       # the trainer's phase clock (wall seconds)
EPOCH_FIELDS = ("preset", "seed", "epoch", "nfe", "nfe_rollout", "nfe_reference", "nfe_train", "wall_s", "cpu_s",
                "train_reward", "train_kl", "eval_reward", "eval_kl", "eval_s", "eval_nfe") + tuple(f"{k}_s" for k in PHASES) \
    + ("eval_objective", "eval_gain", "eval_gain_marginal", "ops_backend") + COST_COLUMNS
COSTS = ("epochs", "nfe", "cpu_s", "wall_s", "fe")    # the x's of a crossing, in this order (fe: forward-equivalents)


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


def eval_points(rows: list[dict], key: str = "eval_reward") -> list[tuple[float, ...]]:
    """One run's evaluation rows as crossing points (value of ``key``, epochs, nfe, cpu_s, wall_s, fe,
    eval_kl; fe NaN where the CSV has no forward-equivalents). The KL rides along so a crossing also
    says the KL at the target."""
    return [(r[key], r["epoch"], r["nfe"], r["cpu_s"], r["wall_s"], fe_of(r), r["eval_kl"])
            for r in rows if not math.isnan(r["eval_reward"]) and not math.isnan(r.get(key, math.nan))]


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


def resolve_target(rows: list[dict], target: float | None, frac: float | None,
                   gain: float | None = None, gain_kl: str = "path") -> tuple[float, str]:
    """The absolute target and a sentence saying where it came from (``gain``: on the objective
    gain curve with the ``gain_kl`` KL, see :func:`target_key`)."""
    if gain is not None:
        col = target_key(gain, gain_kl)
        if not any(not math.isnan(r.get(col, math.nan)) for r in rows):
            raise ValueError("--target-gain: these runs recorded no objective gain (not the 2-D task, or an older CSV)")
        kl = "path KL" if gain_kl == "path" else "the k-NN estimate of the samples' marginal KL"
        return gain, (f"{gain:g} of J*'s gain over p_ref on the regularised objective J = E[r] - alpha KL, with "
                      f"{kl} (--target-gain, --gain-kl {gain_kl})")
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


def target_key(gain: float | None, gain_kl: str = "path") -> str:
    """The evaluation column a target is crossed on."""
    return "eval_reward" if gain is None else "eval_gain" if gain_kl == "path" else "eval_gain_marginal"


def summarize(rows: list[dict], target: float, baseline: str, stops: dict | None = None,
              key: str = "eval_reward") -> list[dict]:
    """One summary row per (preset, seed): totals, costs to target, final reward/KL, speedups.
    ``stops`` maps (preset, seed) to why the run ended ('epochs', 'nfe', 'seconds' or 'failed: ...');
    a run that failed before reaching the target gets no speedup (kind 'failed'). ``key``: the
    evaluation column the target is crossed on (reward, or the 2-D task's objective gain)."""
    runs, gcol = [], key if key != "eval_reward" else "eval_gain"
    for (p, seed), rs in group_runs(rows).items():
        pts, last = eval_points(rs), rs[-1]
        hit = crossing(eval_points(rs, key), target)
        run = {"preset": p, "seed": seed, "stop": (stops or {}).get((p, seed), ""), "epochs": last["epoch"],
               "nfe": last["nfe"], "cpu_s": last["cpu_s"],
               "wall_s": last["wall_s"], "eval_s": last["eval_s"], "eval_nfe": last["eval_nfe"],
               "nfe_per_epoch": last["nfe"] / max(last["epoch"], 1), "target": target, "reached": hit is not None}
        for c, v in zip(COSTS, hit or [None] * len(COSTS)):
            run[f"{c}_to_target"] = v
        run["kl_at_target"] = hit[len(COSTS)] if hit else None
        run["fe"], run["scored"] = fe_of(last), last.get("scored", math.nan)
        run["fe_known"] = not math.isnan(run["fe"])         # False: an older CSV, or an unpriced reward
        run.update(fe_per_epoch=run["fe"] / max(last["epoch"], 1), scored_per_epoch=run["scored"] / max(last["epoch"], 1))
        run.update(final_reward=pts[-1][0], final_kl=[r["eval_kl"] for r in rs if not math.isnan(r["eval_reward"])][-1],
                   final_gain=[r.get(gcol, math.nan) for r in rs if not math.isnan(r["eval_reward"])][-1])
        for k in ("cpu", "wall") + PHASES:      # per epoch, for the systems side (phases: wall-clock)
            run[f"{k}_s_per_epoch"] = last.get(f"{k}_s", math.nan) / max(last["epoch"], 1)
        runs.append(run)
    base = {r["seed"]: r for r in runs if r["preset"] == baseline}
    for run in runs:          # kind 'unpaired': no baseline run at this seed
        for c in ("nfe", "cpu_s", "wall_s", "fe"):
            b = base.get(run["seed"])
            rs = paired_ratios({0: (b[f"{c}_to_target"], b[c])}, {0: (run[f"{c}_to_target"], run[c])}) if b else []
            if b and any(x["stop"].startswith("failed") and not x["reached"] for x in (b, run)):
                rs = [(0, math.nan, "failed")]
            elif b and c == "fe" and not (b["fe_known"] and run["fe_known"]):
                rs = [(0, math.nan, "unknown")]
            run[f"speedup_{c}"] = rs[0][1] if rs else math.nan
            run[f"speedup_{c}_kind"] = rs[0][2] if rs else "unpaired"
    return runs


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
            rows.append({k: (v if k in ("preset", "ops_backend") else int(v) if k in ("seed", "epoch", "scored", "scored_grad")
                             or k.startswith("nfe") or k == "eval_nfe" else float(v)) for k, v in r.items()})
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
        cell += "; " + ", ".join(f"s{s}: " + ({"na": "NA", "failed": "failed", "unknown": "unknown"}.get(k) or f"{k}{v:.3g}×")
                                 for s, v, k in st["bounds"])
    return cell + f"; faster {st['faster']}/{st['n']}"


def _fe_cell(rs: list[dict], col: str) -> str:
    """A forward-equivalent cell: 'unknown' when no run of the preset has them (older CSV, unpriced reward)."""
    known = [r[col] for r in rs if r["fe_known"]]
    return _fmt(known) if known else "unknown"


def _kind(v: float, k: str) -> str:
    return {"na": "NA (both missed)", "unpaired": "—", "failed": "failed", "unknown": "unknown"}.get(k, f"{k}{v:.3g}×")


def write_markdown(path: Path, runs: list[dict], meta: dict, target_note: str, key: str = "eval_reward") -> None:
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
             "- Held-out evaluation before training, "
             + (f"after the epoch crossing each {a['eval_every_nfe']:,} training NFE, " if a.get("eval_every_nfe") else "")
             # (0 = off; tables made before --eval-every 0 existed said "off" with 1,000,000)
             + (f"every {a['eval_every']} epoch(s) " if 0 < a["eval_every"] < 10 ** 6 else "")
             + f"and at the end: {a['eval_samples']} "
             "full-SDE samples from a fixed seed per training seed; its cost is not charged to the run (eval_s in the CSV).",
             f"- Target {'reward' if key == 'eval_reward' else 'objective gain'}: {target_note}. Time to target: the "
             "first evaluation at or above it, linearly interpolated "
             "from the one before (cost 0 if the policy starts there).",
             f"- Speedup = {base or a['baseline'] + ' (not run)'}'s cost to the target / the preset's, paired by seed, "
             "median (min–max) over the seeds where both reached it; `>x` = the baseline missed it (lower bound), "
             "`<x` = the preset missed it (upper bound); faster k/n = seeds on which the preset is surely faster.",
             "- " + ("GPU-hours = wall-clock on the device." if gpu else
                     "CPU-hours = process CPU time (all threads) of the training epochs; wall-clock includes time the "
                     "process waited for a core, so on a shared machine CPU-hours are the more reliable timing.")]
    lines += prices_note(meta) + [""]
    costs = ["nfe", "fe"] + [c for c, _ in clocks]           # the speedup columns, in this order
    head = ["preset", "reached", "epochs to target", "training NFE to target", "fwd-equiv to target"]
    head += [f"{h} to target" for _, h in clocks]
    head += ([f"speedup {x}" for x in ["NFE", "fwd-equiv"] + [h for _, h in clocks]] if base else [])
    gains = any(not math.isnan(r["final_gain"]) for r in runs)
    head += ["KL at target", "final reward", "final KL"] + (["final J gain"] if gains else [])
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in presets:
        rs = by[p]
        cells = [p, f"{sum(r['reached'] for r in rs)}/{len(rs)}", _fmt([r["epochs_to_target"] for r in rs]),
                 _fmt([r["nfe_to_target"] for r in rs]), _fe_cell(rs, "fe_to_target")]
        cells += [_fmt([r[f"{c}_to_target"] for r in rs], scale=1 / 3600) for c, _ in clocks]
        for c in costs if base else []:
            unknown = c == "fe" and all(r["speedup_fe_kind"] in ("unknown", "unpaired") for r in rs)
            cells.append("1× (baseline)" if p == base else "unknown" if unknown else _ratio_cell(ratio_stats(
                [(r["seed"], r[f"speedup_{c}"], r[f"speedup_{c}_kind"]) for r in rs
                 if r[f"speedup_{c}_kind"] != "unpaired"])))
        cells += [_fmt([r["kl_at_target"] for r in rs]), _fmt([r["final_reward"] for r in rs], 4),
                  _fmt([r["final_kl"] for r in rs])]
        cells += [_fmt([r["final_gain"] for r in rs])] if gains else []
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Cells: median (min–max) over seeds of the runs that reached the target; hours = seconds / 3600; "
              "KL at target = the held-out path KL (nats) interpolated at the crossing.", ""]
    if base:
        lines += [f"## Speedup over {base} per seed", "",
                  "| preset | seed | NFE | fwd-equiv | " + " | ".join(h for _, h in clocks) + " |",
                  "|---|---|---|---|" + "---|" * len(clocks)]
        lines += [f"| {r['preset']} | {r['seed']} | " + " | ".join(_kind(r[f"speedup_{c}"], r[f"speedup_{c}_kind"])
                                                               for c in costs) + " |"
                  for r in runs if r["preset"] != base]
        lines.append("")
    lines += ["## Cost per epoch", "", "Mean over each run's epochs, median over seeds: the systems side (an epoch's "
              "price) apart from the algorithmic side (epochs to target, above). Phases are the trainer's wall-clock "
              "phase clock (`alloc`: per-step statistics, the allocator and re-compiling the plan).", "",
              "| preset | NFE | scored samples | fwd-equiv | CPU ms | wall ms | " + " | ".join(f"{k} ms" for k in PHASES)
              + " | µs CPU per NFE |", "|---|---|---|---|---|---|" + "---|" * (len(PHASES) + 1)]
    for p in presets:
        rs = by[p]
        cells = [_fmt([r["nfe_per_epoch"] for r in rs]), _fmt([r["scored_per_epoch"] for r in rs]),
                 _fe_cell(rs, "fe_per_epoch")]
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
              "| epochs to target | NFE to target | fwd-equiv to target | CPU s to target | wall s to target | final reward "
              "| final KL |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    f = lambda v, d: "not reached" if v is None else "unknown" if math.isnan(v) else f"{v:,.{d}f}"  # noqa: E731
    failures = list(dict.fromkeys(r["stop"][8:] for r in runs if r["stop"].startswith("failed: ")))
    for r in runs:
        stop = f"failed ({failures.index(r['stop'][8:]) + 1})" if r["stop"].startswith("failed: ") else r["stop"] or "—"
        lines.append(f"| {r['preset']} | {r['seed']} | {stop} | {r['epochs']} | {r['nfe']:,} | {r['cpu_s']:.1f} | {r['wall_s']:.1f} "
                     f"| {r['eval_s']:.1f} | {f(r['epochs_to_target'], 2)} | {f(r['nfe_to_target'], 0)} "
                     f"| {f(r['fe_to_target'], 0)} "
                     f"| {f(r['cpu_s_to_target'], 2)} | {f(r['wall_s_to_target'], 2)} | {r['final_reward']:.4g} "
                     f"| {r['final_kl']:.4g} |")
    if failures:
        lines += ["", "Failures (the trainer raised; the run ends with that epoch, its cost counted):", ""]
        lines += [f"{i}. {msg}" for i, msg in enumerate(failures, 1)]
    path.write_text("\n".join(lines) + "\n")


def write_outputs(out: str, rows: list[dict], meta: dict, args) -> list[dict]:
    gain, gain_kl = getattr(args, "target_gain", None), getattr(args, "gain_kl", "path")
    target, note = resolve_target(rows, args.target, args.target_frac, gain, gain_kl)
    key = target_key(gain, gain_kl)
    if gain is not None and meta.get("optimum"):   # no J* in closed form: say how it was estimated, per sampler
        groups: dict[str, list[str]] = {}
        for p, o in meta["optimum"].items():
            groups.setdefault(repr(sorted(o.items())), []).append(p)
        parts = []
        for ps in groups.values():
            o = meta["optimum"][ps[0]]
            parts.append(f"J* = {o['objective']:.4g} ± {o['objective_se']:.2g} (E*[r] = {o['reward']:.4g} at KL* = "
                         f"{o['kl']:.3g} nats; J_ref = E_ref[r] = {o['reference']:.4g}) for "
                         f"{', '.join(ps)} ({o.get('num_steps', '?')} sampling steps)")
        o = next(iter(meta["optimum"].values()))
        note += (f"; estimated by Monte Carlo from {o['samples']:,} reference samples of each preset's own sampler "
                 f"(rsm_fast/optimum.py, alpha = {o['alpha']:g}): " + "; ".join(parts))
    stops = {(r["preset"], r["seed"]): r["stop"] for r in meta.get("runs", [])}
    runs = summarize(rows, target, meta["args"]["baseline"], stops, key)
    write_csv(Path(f"{out}_summary.csv"), runs)
    write_markdown(Path(f"{out}.md"), runs, meta, note, key)
    gpu = meta["machine"]["device"].startswith("cuda")
    presets = list(dict.fromkeys(r["preset"] for r in runs))
    med = [(p, statistics.median(r["final_reward"] for r in runs if r["preset"] == p),
            statistics.median(r["final_kl"] for r in runs if r["preset"] == p)) for p in presets]
    front = dict(zip(presets, pareto(med)))
    done = write_plots(Path(f"{out}.png"), rows, runs, front, target if gain is None else None, meta["args"]["task"], gpu)
    print(f"target {note}\nwrote {out}.md, {out}_summary.csv" + (f", {out}.png" if done else ""))
    return runs
