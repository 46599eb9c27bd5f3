"""Interleaved A/B timing of presets' epochs in one process, with a contention check (issue 20, item 4).

    python bench/ab_timing.py --task toy2d --presets tempflow-grpo,rsm-evr --baseline tempflow-grpo \\
        --tuned bench/results/sweep_toy2d_beta_2026-12-06.json --out /tmp/ab/toy2d

**Why.** bench/gpu_hours.py runs presets one after another, so a preset's process CPU seconds
are measured at another time than its baseline's: on a shared machine a recorded 1.33x CPU ratio
reran as 1.06x. Here every preset runs in the same process at the same time, epoch by epoch.

**Runs.** One ``Trainer`` per preset, built exactly as bench/gpu_hours.py builds a run
(``run_config``; ``--tuned`` sweeps and ``--set`` overrides through its ``apply_tuned``), all at
``--seed``, on the CPU with ``--threads`` torch threads (1: process CPU seconds then equal the
epoch's own). Each is warmed up for ``--warmup`` epochs (not timed), then the rounds start: in
each round every preset runs ``--epochs-per-slot`` epochs (one slot), two presets in the order
AB, BA, AB, ... (ABBA), more in rotated orders with every other round reversed. Per slot:
process CPU seconds (``process_time``) and wall seconds (``perf_counter``) of ``epoch()`` alone
(a ``gc.collect()`` before it, untimed; the objects alive after the warm-up are frozen with
``gc.freeze()``, so no collection rescans the other presets' trainers; ``--no-gc-freeze``
leaves them), the training NFE it
spent (``Trainer.nfe``) and the trainer's wall-clock phase clock (rollout / reward / train /
alloc). The fused ops' backend is
in every row; a run whose ops fell back from C++ to plain torch refuses to start unless
``RSM_FAST_OPS_BACKEND`` asks for that backend.

**Contention check.** Before the first round and after every round a fixed calibration
workload (a 192x192 float32 matmul loop, its length fixed once at the start to about
``--probe-ms``) is timed, with the 1-minute load average. A round is *contended*, kept in the
CSV but left out of every ratio, when a probe bracketing it (before or after) is slower than the
run's median probe by more than ``--probe-tol`` (wall or CPU), or a probe's or the round's own
epochs' wall / CPU exceeds ``--max-wall-cpu`` (the process waited for a core).

**Ratios and the stop rule.** Per clean round and preset: CPU seconds per epoch / the
baseline's in the same round (and per training NFE). The ratio is the geometric mean of these
paired per-round ratios, with a 95 % Student t-interval on their logs (df = rounds - 1; no
bootstrap). Rounds repeat until every preset's interval half-width, exp(hw) - 1, is below
``--tol`` with at least ``--min-rounds`` clean rounds, or ``--max-rounds`` (or ``--max-seconds``)
is reached: then the row is flagged "interval not tight".

**CPU seconds to target.** ``--from-gpu-hours GH`` reads a bench/gpu_hours.py run
(``GH.json``, ``GH.csv``), finds each (preset, seed)'s epochs to its target with
gpu_hours_report's functions and writes ``PREFIX_to_target.md``/``.csv``: median epochs to
target x interleaved CPU s/epoch, and the CPU speedup over the baseline = the paired epochs
ratio (median over the seeds) / the interleaved per-epoch ratio, its interval propagated from
the per-epoch one (the seeds' spread given apart). ``--timing PREFIX`` reuses a finished timing
run instead of timing again. Per-epoch cost is taken as constant over training: the online
allocator's presets change their plan as they train, and the timed epochs start after
``--warmup``, not at the start of the gpu_hours run.

Outputs for ``--out PREFIX``: ``PREFIX.csv`` (one row per slot), ``PREFIX.json`` (command,
machine, code version, settings, rounds and summary) and ``PREFIX.md`` (the table).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

try:                      # run as a script (bench/ on sys.path) or imported as bench.<name>
    import ab_stats as S
    import gpu_hours as G
    import gpu_hours_report as R
except ImportError:
    from bench import ab_stats as S
    from bench import gpu_hours as G
    from bench import gpu_hours_report as R

from rsm_fast.config import ConfigError
from rsm_fast.ops import backends
from rsm_fast.rewards import RewardError
from rsm_fast.trainer import NonFiniteError, Trainer

PHASES = R.PHASES
SLOT_FIELDS = ("round", "slot", "preset", "epoch_start", "epochs", "cpu_s", "wall_s", "nfe", "nfe_rollout",
               "nfe_reference", "nfe_train") + tuple(f"{k}_s" for k in PHASES) + (
    "probe_before_wall_s", "probe_before_cpu_s", "probe_after_wall_s", "probe_after_cpu_s", "loadavg_1m",
    "contended", "contention", "ops_backend")
TO_TARGET_FIELDS = ("preset", "seeds_reached", "seeds", "epochs_to_target", "cpu_s_per_epoch", "cpu_s_to_target",
                    "epoch_speedup", "epoch_speedup_min", "epoch_speedup_max", "per_epoch_ratio", "per_epoch_lo",
                    "per_epoch_hi", "cpu_speedup", "cpu_speedup_lo", "cpu_speedup_hi", "cpu_speedup_seed_lo",
                    "cpu_speedup_seed_hi", "gpu_hours_cpu_speedup", "gpu_hours_cpu_s_per_epoch")


# ------------------------------------------------------------------------------------------------
# measuring
# ------------------------------------------------------------------------------------------------
def make_probe(target_s: float, size: int = 192):
    """A fixed calibration workload: ``size``^2 float32 matmuls, as many as take about
    ``target_s`` CPU seconds here and now (fixed from then on). Returns (probe() -> (wall s,
    CPU s), a description for the JSON)."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(size, size, generator=g), torch.randn(size, size, generator=g)
    c = torch.empty(size, size)

    def timed(n: int) -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(n):
            torch.mm(a, b, out=c)
        return time.perf_counter() - t0, time.process_time() - c0

    n = 1
    while timed(n)[1] < target_s / 8 and n < 1 << 20:
        n *= 2
    per = statistics.median(timed(n)[1] for _ in range(3)) / n
    n = max(1, round(target_s / per)) if per > 0 else n
    return (lambda: timed(n)), {"workload": f"{n} x torch.mm of two {size}x{size} float32 matrices",
                                "iterations": n, "size": size, "target_s": target_s}


def trainer_slot(tr: Trainer, epochs: int) -> dict:
    """``epochs`` epochs of one trainer, timed: process CPU and wall seconds, training NFE and
    the phase clock's seconds they added."""
    gc.collect()
    n0, s0, e0 = dict(tr.nfe), dict(tr.clock.seconds), tr.epochs_done
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(epochs):
        tr.epoch()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    d = {k: tr.nfe[k] - n0.get(k, 0) for k in ("rollout", "reference", "train")}
    return {"epoch_start": e0, "epochs": epochs, "cpu_s": cpu, "wall_s": wall, "nfe": sum(d.values()),
            **{f"nfe_{k}": v for k, v in d.items()},
            **{f"{k}_s": tr.clock.seconds.get(k, 0.0) - s0.get(k, 0.0) for k in PHASES}}


def run_rounds(labels: list[str], baseline: str, slot_fn, probe_fn, o, now=time.perf_counter, log=print) -> dict:
    """The interleaved rounds until :func:`ab_stats.stop_reason` says stop. ``slot_fn(i)`` times
    preset i's slot (a dict with epochs, cpu_s, wall_s, nfe, ...), ``probe_fn()`` the
    calibration workload ((wall, cpu)); ``o`` carries tol, probe_tol, max_wall_cpu, min_rounds,
    max_rounds and max_seconds. Both are injected so the tests can drive this with fakes."""
    slots, order_log, loads = [], [], []
    probes = [probe_fn()]
    t0, stop, r = now(), None, 0
    while stop is None:
        order = S.round_order(r, len(labels))
        order_log.append([labels[i] for i in order])
        loads.append(os.getloadavg()[0])
        for pos, i in enumerate(order):
            slots.append({"round": r, "slot": pos, "preset": labels[i], **slot_fn(i)})
        probes.append(probe_fn())
        r += 1
        rw = [(sum(s["wall_s"] for s in slots if s["round"] == k), sum(s["cpu_s"] for s in slots if s["round"] == k))
              for k in range(r)]
        flags = S.round_flags(probes, rw, o.probe_tol, o.max_wall_cpu)
        summary = S.summarize(slots, flags, labels, baseline, PHASES)
        stop = S.stop_reason(summary, baseline, r, o.min_rounds, o.max_rounds, o.tol,
                             bool(o.max_seconds) and now() - t0 >= o.max_seconds)
        hw = [summary[p]["ratio_cpu"]["hw_ratio"] for p in labels if p != baseline]
        log(f"round {r}: probe {1e3 * probes[-1][1]:.1f} ms CPU, {sum(not f for f in flags)} clean, "
            f"widest interval ±{max(hw):.1%}" + (f" [contended: {flags[-1]}]" if flags[-1] else ""), flush=True)
    return {"slots": slots, "probes": probes, "orders": order_log, "loadavg_1m": loads, "flags": flags,
            "summary": summary, "stop": stop, "timed_s": now() - t0}


# ------------------------------------------------------------------------------------------------
# outputs
# ------------------------------------------------------------------------------------------------
def _ci(iv: dict | None, digits: int = 3) -> str:
    if iv is None:
        return "1× (baseline)"
    if not iv["n"]:
        return "—"
    hi = "∞" if math.isinf(iv["hi"]) else f"{iv['hi']:.{digits}f}"
    return f"{iv['ratio']:.{digits}f}× [{iv['lo']:.{digits}f}–{hi}]"


def slot_rows(res: dict, backend: dict) -> list[dict]:
    rows, p = [], res["probes"]
    for s in res["slots"]:
        r = s["round"]
        row = {**s, "probe_before_wall_s": p[r][0], "probe_before_cpu_s": p[r][1], "probe_after_wall_s": p[r + 1][0],
               "probe_after_cpu_s": p[r + 1][1], "loadavg_1m": round(res["loadavg_1m"][r], 2),
               "contended": int(bool(res["flags"][r])), "contention": res["flags"][r], "ops_backend": backend[s["preset"]]}
        rows.append({k: round(v, 6) if isinstance(v, float) else v for k, v in row.items()})
    return rows


def write_markdown(path: Path, meta: dict) -> None:
    m, a, res = meta["machine"], meta["args"], meta["result"]
    summ, base, presets = res["summary"], a["baseline"], a["presets"]
    n, flags = len(res["flags"]), res["flags"]
    probes = res["probes"]
    pw, pc = statistics.median(w for w, _ in probes), statistics.median(c for _, c in probes)
    contended = [f for f in flags if f]
    code = meta["code"]
    lines = [f"# Interleaved A/B timing: {a['task']} (process CPU seconds per epoch)", "",
             f"- Date {m['date']}; CPU {m['cpu']}, {m['cores']} cores; {a['threads']} torch thread(s); torch {m['torch']}; "
             f"Python {m['python']}. Load average (1/5/15 min) before / after: {m['loadavg_before']} / {m['loadavg_after']}.",
             "- Fused ops backend per preset: " + ", ".join(f"{p}: `{meta['ops_backend'][p]}`" for p in presets) + ".",
             f"- Code: rsm_fast from `{code['path']}` at git {code['commit']}"
             + ("" if code.get("changed_files") is None else " (clean)" if not code["changed_files"]
                else f" with uncommitted changes in {code['changed_files']} file(s) under rsm_fast/") + ".",
             f"- Command: `{meta['command']}`",
             f"- One trainer per preset in one process, seed {a['seed']}, `--set`: {' '.join(a['set']) or 'none'}"
             + (f"; tuned overrides from {meta['tuned']['file']}" if meta.get("tuned") else "")
             + f". {a['warmup']} warm-up epoch(s) each (not timed), then rounds of {a['epochs_per_slot']} epoch(s) per "
             "preset; order AB/BA alternating (more presets: rotated, every other round reversed); "
             + ("the trainers were not gc-frozen (--no-gc-freeze)." if a.get("no_gc_freeze") else
                "objects alive after the warm-up gc-frozen, so collections in an epoch do not rescan the other trainers."),
             f"- {n} rounds, stop: **{res['stop']}** ({res['timed_s']:.0f} s of rounds). Contention probe: "
             f"{meta['probe']['workload']}, median {1e3 * pw:.1f} ms wall / {1e3 * pc:.1f} ms CPU; a round is "
             f"contended if a probe before or after it is > {a['probe_tol']:.0%} slower than the median or a probe's or "
             f"its epochs' wall/CPU exceeds {a['max_wall_cpu']:g}: {len(contended)} of {n} contended, left out of the ratios.",
             f"- Ratio vs {base} = preset / baseline CPU seconds per epoch (below 1: cheaper), paired by round: geometric "
             f"mean over clean rounds with a 95 % t-interval on the log ratios (df = rounds - 1). Stop rule: every "
             f"interval's half-width exp(hw) - 1 < {a['tol']:.1%} with >= {a['min_rounds']} clean rounds, else at "
             f"{a['max_rounds']} rounds" + (f" or {a['max_seconds']:g} s" if a["max_seconds"] else "") + ".",
             "- Per-epoch cost is measured on epochs after the warm-up, at whatever plan each trainer has then: presets "
             "with the online allocator (rollout.allocator=online) change their plan and cost as they train, so their "
             "figure is for those epochs only (the NFE/epoch flag shows a plan that moved during the rounds).", ""]
    head = ["preset", "clean rounds", "CPU ms/epoch", "CPU/epoch vs baseline [95 % CI]", "NFE/epoch",
            "CPU ms per 1k NFE", "CPU/NFE vs baseline [95 % CI]", "wall ms/epoch", "flags"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in presets:
        s = summ[p]
        fl = S.row_flags(s, p == base, a["tol"], a["min_rounds"])
        lines.append(f"| {p} | {s['rounds_clean']}/{n} | {1e3 * s['cpu_s_per_epoch']:.2f} | {_ci(s['ratio_cpu'])} "
                     f"| {s['nfe_per_epoch']:,.0f} | {s['cpu_s_per_knfe'] * 1e3:.3f} | {_ci(s['ratio_cpu_per_nfe'])} "
                     f"| {1e3 * s['wall_s_per_epoch']:.2f} | {'; '.join(fl) or '—'} |")
    lines += ["", "Cells: medians over the clean rounds. Phases per epoch (ms, the trainer's wall-clock phase clock):", "",
              "| preset | " + " | ".join(PHASES) + " |", "|---|" + "---|" * len(PHASES)]
    lines += [f"| {p} | " + " | ".join(f"{1e3 * summ[p]['phases_s_per_epoch'].get(k, math.nan):.2f}" for k in PHASES) + " |"
              for p in presets]
    if contended:
        kinds = ("probe slow", "probe waited", "epochs waited")
        counts = {k: sum(k in f for f in flags) for k in kinds}
        lines += ["", f"Contended rounds (in the CSV with the reasons, not in the ratios): {len(contended)} of {n}; "
                  + ", ".join(f"{k}: {v}" for k, v in counts.items()) + " (a round can have several). Median load "
                  f"average (1 min) {statistics.median(res['loadavg_1m']):.2f} over the rounds."]
    path.write_text("\n".join(lines) + "\n")


# ------------------------------------------------------------------------------------------------
# CPU seconds to target
# ------------------------------------------------------------------------------------------------
def load_gpu_hours(prefix: str) -> tuple[dict, list[dict], str]:
    """A gpu_hours run's JSON and per-(preset, seed) summary at the target its JSON names."""
    rows = R.read_epochs(Path(f"{prefix}.csv"))
    meta = json.loads(Path(f"{prefix}.json").read_text())
    a = meta["args"]
    gain, gain_kl = a.get("target_gain"), a.get("gain_kl", "path")
    target, note = R.resolve_target(rows, a.get("target"), a.get("target_frac"), gain, gain_kl)
    stops = {(r["preset"], r["seed"]): r["stop"] for r in meta.get("runs", [])}
    return meta, R.summarize(rows, target, a["baseline"], stops, R.target_key(gain, gain_kl)), note


def to_target_rows(ab: dict, runs: list[dict]) -> list[dict]:
    """One row per timed preset that the gpu_hours run also ran (see ab_stats.to_target)."""
    a, summ = ab["args"], ab["result"]["summary"]
    base = a["baseline"]
    by = {}
    for r in runs:
        by.setdefault(r["preset"], {})[r["seed"]] = r
    out = []
    for p in a["presets"]:
        if p not in by:
            continue
        mine, theirs = by[p], by[base]

        def paired(cost):
            return R.ratio_stats(R.paired_ratios({s: (x[f"{cost}_to_target"], x[cost]) for s, x in theirs.items()},
                                                 {s: (x[f"{cost}_to_target"], x[cost]) for s, x in mine.items()}))
        ep, gh = paired("epochs"), paired("cpu_s")
        iv = summ[p]["ratio_cpu"] if p != base else None
        tt = S.to_target(ep, iv)
        reached = [x["epochs_to_target"] for x in mine.values() if x["reached"]]
        e_med = statistics.median(reached) if reached else math.nan
        c = summ[p]["cpu_s_per_epoch"]
        out.append({"preset": p, "seeds_reached": len(reached), "seeds": len(mine), "epochs_to_target": e_med,
                    "cpu_s_per_epoch": c, "cpu_s_to_target": e_med * c, "epoch_speedup": ep["median"],
                    "epoch_speedup_min": ep["min"], "epoch_speedup_max": ep["max"],
                    "per_epoch_ratio": iv["ratio"] if iv else 1.0, "per_epoch_lo": iv["lo"] if iv else 1.0,
                    "per_epoch_hi": iv["hi"] if iv else 1.0, "cpu_speedup": tt["speedup"], "cpu_speedup_lo": tt["lo"],
                    "cpu_speedup_hi": tt["hi"], "cpu_speedup_seed_lo": tt["seed_lo"], "cpu_speedup_seed_hi": tt["seed_hi"],
                    "gpu_hours_cpu_speedup": gh["median"],
                    "gpu_hours_cpu_s_per_epoch": statistics.median(x["cpu_s_per_epoch"] for x in mine.values()),
                    "flags": "; ".join(S.row_flags(summ[p], p == base, a["tol"], a["min_rounds"]))})
    return out


def write_to_target(out: str, ab: dict, gh_prefix: str, gh: dict, note: str, rows: list[dict], command: str) -> None:
    R.write_csv(Path(f"{out}_to_target.csv"), rows, TO_TARGET_FIELDS + ("flags",))
    a, base = ab["args"], ab["args"]["baseline"]
    missing = [p for p in a["presets"] if p not in {r["preset"] for r in rows}]
    differ = [k for k in ("set",) if sorted(gh["args"].get(k, [])) != sorted(a.get(k, []))]
    f = lambda v, d=3: "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{d}g}"  # noqa: E731
    lines = [f"# CPU seconds to target: interleaved per-epoch timing x {gh_prefix}'s epochs to target", "",
             f"- Epochs to target from `{gh_prefix}` (command `{gh['command']}`): target {note}; per (preset, seed), "
             "interpolated as in bench/gpu_hours_report.py.",
             f"- CPU seconds per epoch from the interleaved timing `{ab['command']}` (machine {ab['machine']['cpu']}, "
             f"{ab['machine']['date']}; seed {a['seed']}; epochs after {a['warmup']} warm-up epochs).",
             f"- Written by `{command}`.",
             f"- CPU speedup to target over {base} = (baseline epochs / preset epochs, paired by seed, median over seeds) / "
             "(interleaved preset / baseline CPU per epoch). [95 % CI]: the per-epoch timing interval propagated at the "
             "median epoch ratio; 'over seeds': the same with the seeds' min and max epoch ratio (the algorithmic spread, "
             "which the timing does not narrow). The last column is gpu_hours' own CPU speedup (runs timed one after "
             "another) for comparison.",
             "- Assumes a preset's cost per epoch is the same over the epochs to target and at the timed epochs; the "
             "online allocator's presets change their plan while training, so for them this is an approximation.", ""]
    if missing:
        lines.insert(-1, f"- Not in the gpu_hours run (no row): {', '.join(missing)}.")
    if differ:
        lines.insert(-1, f"- Note: the two runs' `--set` differ ({gh['args'].get('set')} vs {a.get('set')}).")
    head = ["preset", "reached", "epochs to target", "CPU ms/epoch (interleaved)", "CPU s to target",
            "epoch speedup (min–max)", "CPU/epoch vs baseline [95 % CI]", "CPU speedup to target [95 % CI]",
            "over seeds", "gpu_hours CPU speedup", "flags"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["preset"], f"{r['seeds_reached']}/{r['seeds']}", f(r["epochs_to_target"]),
                 f"{1e3 * r['cpu_s_per_epoch']:.2f}", f(r["cpu_s_to_target"])]
        if r["preset"] == base:
            cells += ["1× (baseline)"] * 3 + ["—", "1×"]
        else:
            cells += [f"{f(r['epoch_speedup'])}× ({f(r['epoch_speedup_min'])}–{f(r['epoch_speedup_max'])})",
                      f"{r['per_epoch_ratio']:.3f}× [{r['per_epoch_lo']:.3f}–{r['per_epoch_hi']:.3f}]",
                      f"**{f(r['cpu_speedup'])}×** [{f(r['cpu_speedup_lo'])}–{f(r['cpu_speedup_hi'])}]",
                      f"{f(r['cpu_speedup_seed_lo'])}–{f(r['cpu_speedup_seed_hi'])}", f"{f(r['gpu_hours_cpu_speedup'])}×"]
        lines.append("| " + " | ".join(cells + [r["flags"] or "—"]) + " |")
    Path(f"{out}_to_target.md").write_text("\n".join(lines) + "\n")


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------
def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/ab_timing.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[2:]))
    p.add_argument("--task", default="toy2d", choices=("toy2d", "digits-flow", "digits-ddim"))
    p.add_argument("--presets", default=None, help="comma-separated presets or variants preset[k=v,...] (>= 2)")
    p.add_argument("--baseline", default=None, help="the preset the ratios are relative to (default: the first)")
    p.add_argument("--seed", type=int, default=0, help="train.seed of every trainer")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for every preset")
    p.add_argument("--tuned", default=None, metavar="FILE", help="bench/sweep.py JSON(s), comma-separated, as gpu_hours.py")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--warmup", type=int, default=3, help="untimed epochs per preset before the rounds")
    p.add_argument("--epochs-per-slot", type=int, default=1, help="epochs each preset runs per round")
    p.add_argument("--min-rounds", type=int, default=8, help="clean rounds needed before the stop rule may stop")
    p.add_argument("--max-rounds", type=int, default=60, help="stop here; rows not tight are flagged")
    p.add_argument("--max-seconds", type=float, default=0.0, help="also stop after this many seconds of rounds (0: no cap)")
    p.add_argument("--tol", type=float, default=0.03, help="target half-width of the ratio intervals, exp(hw) - 1")
    p.add_argument("--probe-tol", type=float, default=0.15, help="a probe this much slower than the median flags a round")
    p.add_argument("--max-wall-cpu", type=float, default=1.10, help="a probe or round with wall/CPU above this is contended")
    p.add_argument("--probe-ms", type=float, default=30.0, help="calibration workload length, ms of CPU")
    p.add_argument("--no-gc-freeze", action="store_true",
                   help="do not gc.freeze() the trainers after the warm-up (then every full collection in an epoch "
                        "rescans all presets' trainers)")
    p.add_argument("--out", required=True, help="output prefix, e.g. /tmp/ab/toy2d")
    p.add_argument("--from-gpu-hours", default=None, metavar="PREFIX",
                   help="a bench/gpu_hours.py run: also write PREFIX_to_target.md/.csv (CPU seconds to its target)")
    p.add_argument("--timing", default=None, metavar="PREFIX",
                   help="with --from-gpu-hours: reuse this finished timing run's JSON instead of timing again")
    a = p.parse_args(argv)
    if a.timing:
        if not a.from_gpu_hours:
            p.error("--timing PREFIX only combines a finished timing run with --from-gpu-hours")
        return a
    if not a.presets:
        p.error("--presets is required (unless --timing reuses a finished run)")
    a.preset_list = G.split_presets(a.presets)
    a.baseline = a.baseline or (a.preset_list[0] if a.preset_list else None)
    if len(a.preset_list) < 2 or len(set(a.preset_list)) != len(a.preset_list):
        p.error(f"--presets must name at least two distinct presets, got {a.presets!r}")
    if a.baseline not in a.preset_list:
        p.error(f"--baseline {a.baseline} is not among --presets")
    for name, lo in (("threads", 1), ("warmup", 0), ("epochs_per_slot", 1), ("min_rounds", 2), ("max_rounds", 2)):
        if getattr(a, name) < lo:
            p.error(f"--{name.replace('_', '-')} must be >= {lo}, got {getattr(a, name)}")
    if a.min_rounds > a.max_rounds:
        p.error(f"--min-rounds ({a.min_rounds}) must be <= --max-rounds ({a.max_rounds})")
    for name in ("tol", "probe_tol", "probe_ms"):
        if not getattr(a, name) > 0:
            p.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(a, name)}")
    if not a.max_wall_cpu > 1 or a.max_seconds < 0:
        p.error(f"--max-wall-cpu must be > 1 (got {a.max_wall_cpu}) and --max-seconds >= 0 (got {a.max_seconds})")
    # what gpu_hours' run_config / apply_tuned read: one seed, no epoch cap, no NFE budget
    a.seed_list, a.epochs, a.budget_nfe, a.eval_samples = [a.seed], 0, 0, 1024
    return a


def _to_target(args, ab: dict, command: str) -> int:
    try:
        gh, runs, note = load_gpu_hours(args.from_gpu_hours)
    except (OSError, ValueError, KeyError) as e:
        print(f"error: --from-gpu-hours {args.from_gpu_hours}: cannot read its .csv / .json: {e}", file=sys.stderr)
        return 2
    if gh["args"]["task"] != ab["args"]["task"]:
        print(f"error: --from-gpu-hours ran task {gh['args']['task']}, the timing {ab['args']['task']}", file=sys.stderr)
        return 2
    if ab["args"]["baseline"] not in {r["preset"] for r in runs}:
        print(f"error: --from-gpu-hours {args.from_gpu_hours} has no runs of the baseline {ab['args']['baseline']}",
              file=sys.stderr)
        return 2
    rows = to_target_rows(ab, runs)
    write_to_target(args.out, ab, args.from_gpu_hours, gh, note, rows, command)
    print(f"wrote {args.out}_to_target.md, {args.out}_to_target.csv")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    command = "python bench/ab_timing.py " + shlex.join(argv)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    if args.timing:
        try:
            ab = json.loads(Path(f"{args.timing}.json").read_text())
        except (OSError, ValueError) as e:
            print(f"error: --timing {args.timing}: cannot read {args.timing}.json: {e}", file=sys.stderr)
            return 2
        return _to_target(args, ab, command)
    try:
        tuned = G.apply_tuned(args) if args.tuned else None
        cfgs = [G.run_config(p, args, args.seed) for p in args.preset_list]
    except (ConfigError, OSError, ValueError, KeyError, TypeError) as e:
        print(f"error: {e if isinstance(e, ConfigError) else f'--tuned {args.tuned}: cannot read a sweep JSON: {e!r}'}",
              file=sys.stderr)
        return 2
    dev = cfgs[0].train.device
    if dev != "cpu":
        print(f"error: --set train.device={dev}: this benchmark times process CPU seconds, so it runs on the CPU only",
              file=sys.stderr)
        return 2
    machine = G.machine(dev, args.threads)
    bad = G.check_backend(machine["ops_backend"], dev)
    if bad:
        print(f"error: {bad}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    trainers: list[Trainer] = []
    try:
        trainers = [Trainer(c) for c in cfgs]
        backend = {p: backends.for_device(tr.device).name for p, tr in zip(args.preset_list, trainers)}
        bad = next(filter(None, (G.check_backend(b, dev) for b in backend.values())), None)
        if bad:
            print(f"error: {bad}", file=sys.stderr)
            return 2
        print(f"warming up {len(trainers)} trainers for {args.warmup} epoch(s) each", flush=True)
        for _ in range(args.warmup):
            for tr in trainers:
                tr.epoch()
        gc.collect()
        if not args.no_gc_freeze:
            gc.freeze()     # the trainers' long-lived objects: no collection rescans them (six trainers, not one)
        probe, probe_info = make_probe(args.probe_ms / 1e3)
        res = run_rounds(args.preset_list, args.baseline, lambda i: trainer_slot(trainers[i], args.epochs_per_slot),
                         probe, args)
    except (ConfigError, NonFiniteError, RewardError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    finally:
        gc.unfreeze()
        for tr in trainers:
            tr.close()
    machine["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    meta = {"command": command, "argv": argv, "machine": machine, "code": G.provenance(), "ops_backend": backend,
            "probe": probe_info, "tuned": tuned, "total_wall_s": round(time.perf_counter() - t_start, 1),
            "args": {k: getattr(args, k) for k in ("task", "baseline", "seed", "set", "threads", "warmup", "epochs_per_slot",
                                                    "min_rounds", "max_rounds", "max_seconds", "tol", "probe_tol",
                                                    "max_wall_cpu", "probe_ms", "no_gc_freeze")},
            "result": {k: res[k] for k in ("probes", "orders", "loadavg_1m", "flags", "summary", "stop", "timed_s")}}
    meta["args"]["presets"] = args.preset_list
    out = args.out
    R.write_csv(Path(f"{out}.csv"), slot_rows(res, backend), SLOT_FIELDS)
    Path(f"{out}.json").write_text(json.dumps(meta, indent=1) + "\n")
    write_markdown(Path(f"{out}.md"), meta)
    print(f"wrote {out}.csv, {out}.json, {out}.md ({meta['total_wall_s']:.0f} s in all; stop: {res['stop']})")
    return _to_target(args, meta, command) if args.from_gpu_hours else 0


if __name__ == "__main__":
    sys.exit(main())
