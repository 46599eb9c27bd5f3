"""The interleaved A/B timing's arithmetic (bench/ab_timing.py runs, this module decides): the
order of each round, the contention flags, the paired t-interval on log ratios, the stop rule
and the "CPU seconds to target" product with a bench/gpu_hours.py run. No torch, no clocks: the
tests drive everything here with made-up measurements."""
from __future__ import annotations

import math
import statistics

# Two-sided 95 % Student t quantiles t_{0.975, df}, df = 1..30 (standard tables, 4 decimals).
_T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
         2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
         2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)
_Z975 = 1.959963984540054


def t975(df: int) -> float:
    """t_{0.975, df}: the table for df <= 30, beyond it the Cornish-Fisher expansion in 1/df
    (four terms: within 1e-4 of the exact quantile for df > 30)."""
    if df < 1:
        raise ValueError(f"t975: df must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z, v = _Z975, float(df)
    g1 = (z ** 3 + z) / 4
    g2 = (5 * z ** 5 + 16 * z ** 3 + 3 * z) / 96
    g3 = (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / 384
    g4 = (79 * z ** 9 + 776 * z ** 7 + 1482 * z ** 5 - 1920 * z ** 3 - 945 * z) / 92160
    return z + g1 / v + g2 / v ** 2 + g3 / v ** 3 + g4 / v ** 4


def round_order(r: int, n: int) -> list[int]:
    """Preset indices in the order round ``r`` runs them. Two presets: AB, BA, AB, ... (slots
    ABBA ABBA). More: round 2k runs the list rotated left by k, round 2k+1 the reverse of that,
    so within each pair of rounds every preset's mean position is the same (a linear drift hits
    all alike) and over n pairs each preset follows each other one."""
    shift = (r // 2) % n if n > 2 else 0
    order = list(range(shift, n)) + list(range(shift))
    return order[::-1] if r % 2 else order


def log_interval(ratios: list[float]) -> dict:
    """Mean of the log ratios with a two-sided 95 % t-interval (df = n - 1), returned in ratio
    terms: ``ratio`` = exp(mean) (the geometric mean), ``lo``/``hi`` = exp(mean -+ hw) and
    ``hw_ratio`` = exp(hw) - 1 (the half-width the stop rule compares with --tol). Fewer than
    two ratios: an infinite interval."""
    logs = [math.log(x) for x in ratios if x > 0 and math.isfinite(x)]
    n = len(logs)
    if n == 0:
        return {"n": 0, "ratio": math.nan, "lo": math.nan, "hi": math.nan, "sd_log": math.nan,
                "hw_log": math.inf, "hw_ratio": math.inf}
    m = statistics.fmean(logs)
    if n == 1:
        return {"n": 1, "ratio": math.exp(m), "lo": 0.0, "hi": math.inf, "sd_log": math.nan,
                "hw_log": math.inf, "hw_ratio": math.inf}
    sd = statistics.stdev(logs)
    hw = t975(n - 1) * sd / math.sqrt(n)
    return {"n": n, "ratio": math.exp(m), "lo": math.exp(m - hw), "hi": math.exp(m + hw), "sd_log": sd,
            "hw_log": hw, "hw_ratio": math.expm1(hw)}


# ------------------------------------------------------------------------------------------------
# contention
# ------------------------------------------------------------------------------------------------
def probe_flags(probes: list[tuple[float, float]], probe_tol: float, max_wall_cpu: float) -> list[str]:
    """Per calibration probe (wall s, CPU s): '' if clean, else why not. 'slow': its wall or CPU
    seconds exceed the run's median probe's by more than ``probe_tol``; 'waited': its wall / CPU
    exceeds ``max_wall_cpu`` (the process was off a core for that share of the time)."""
    if not probes:
        return []
    mw = statistics.median(w for w, _ in probes)
    mc = statistics.median(c for _, c in probes)
    out = []
    for w, c in probes:
        why = []
        if w > (1 + probe_tol) * mw or c > (1 + probe_tol) * mc:
            why.append(f"probe slow ({max(w / mw, c / mc if mc > 0 else 1.0):.2f}x median)")
        if c > 0 and w / c > max_wall_cpu:
            why.append(f"probe waited (wall/CPU {w / c:.2f})")
        out.append("; ".join(why))
    return out


def round_flags(probes: list[tuple[float, float]], round_wall_cpu: list[tuple[float, float]],
                probe_tol: float, max_wall_cpu: float) -> list[str]:
    """Why each round counts as contended ('' = clean). Round r is bracketed by probes r (before
    it) and r + 1 (after it; the next round's): either flagged flags the round. The round's own
    slots are flagged too when their summed wall / summed CPU exceeds ``max_wall_cpu``."""
    pf = probe_flags(probes, probe_tol, max_wall_cpu)
    out = []
    for r, (w, c) in enumerate(round_wall_cpu):
        why = [f"{where}: {pf[i]}" for i, where in ((r, "before"), (r + 1, "after")) if i < len(pf) and pf[i]]
        if c > 0 and w / c > max_wall_cpu:
            why.append(f"epochs waited (wall/CPU {w / c:.2f})")
        out.append("; ".join(why))
    return out


# ------------------------------------------------------------------------------------------------
# per-round values, paired ratios and the stop rule
# ------------------------------------------------------------------------------------------------
def per_round(slots: list[dict], n_rounds: int, phases: tuple = ()) -> dict[str, list[dict]]:
    """preset -> one dict per round: epochs, and cpu / wall / ``<phase>`` seconds and NFE both
    summed over that preset's slots in the round and per epoch (``cpu_s_per_epoch``, ...,
    ``nfe_per_epoch``). ``slots``: dicts with round, preset, epochs, cpu_s, wall_s, nfe and
    ``<phase>_s`` for each of ``phases``."""
    keys = ("cpu_s", "wall_s", "nfe") + tuple(f"{k}_s" for k in phases)
    out: dict[str, list[dict]] = {}
    for s in slots:
        acc = out.setdefault(s["preset"], [{} for _ in range(n_rounds)])[s["round"]]
        for k in ("epochs",) + keys:
            acc[k] = acc.get(k, 0) + s.get(k, 0)
    for rows in out.values():
        for acc in rows:
            if acc.get("epochs"):
                for k in keys:
                    acc[f"{k}_per_epoch"] = acc[k] / acc["epochs"]
    return out


def summarize(slots: list[dict], flags: list[str], presets: list[str], baseline: str,
              phases: tuple = ()) -> dict[str, dict]:
    """Per preset over the clean rounds (flags[r] == ''): medians per epoch, and vs ``baseline``
    the paired per-round ratios of CPU per epoch and of CPU per training NFE with their
    t-intervals (:func:`log_interval`)."""
    n = len(flags)
    pr = per_round(slots, n, phases)
    clean = [r for r in range(n) if not flags[r]]
    base = pr.get(baseline, [{}] * n)
    out = {}
    for p in presets:
        rows = [pr.get(p, [{}] * n)[r] for r in clean]
        rows = [x for x in rows if x.get("epochs")]

        def med(key):
            vals = [x[key] for x in rows if key in x]
            return statistics.median(vals) if vals else math.nan
        s = {"rounds_clean": len(rows), "rounds": n, "cpu_s_per_epoch": med("cpu_s_per_epoch"),
             "wall_s_per_epoch": med("wall_s_per_epoch"), "nfe_per_epoch": med("nfe_per_epoch"),
             "nfe_per_epoch_min": min((x["nfe_per_epoch"] for x in rows), default=math.nan),
             "nfe_per_epoch_max": max((x["nfe_per_epoch"] for x in rows), default=math.nan),
             "phases_s_per_epoch": {k: med(f"{k}_s_per_epoch") for k in phases}}
        s["cpu_s_per_knfe"] = 1e3 * s["cpu_s_per_epoch"] / s["nfe_per_epoch"] if s["nfe_per_epoch"] else math.nan
        pairs = [(pr[p][r], base[r]) for r in clean if p in pr and pr[p][r].get("epochs") and base[r].get("epochs")]
        cpu = [a["cpu_s_per_epoch"] / b["cpu_s_per_epoch"] for a, b in pairs if b["cpu_s_per_epoch"] > 0]
        per_nfe = [(a["cpu_s_per_epoch"] / a["nfe_per_epoch"]) / (b["cpu_s_per_epoch"] / b["nfe_per_epoch"])
                   for a, b in pairs if a["nfe_per_epoch"] > 0 and b["nfe_per_epoch"] > 0 and b["cpu_s_per_epoch"] > 0]
        s["ratio_cpu"] = log_interval(cpu) if p != baseline else None
        s["ratio_cpu_per_nfe"] = log_interval(per_nfe) if p != baseline else None
        out[p] = s
    return out


def stop_reason(summary: dict[str, dict], baseline: str, rounds: int, min_rounds: int, max_rounds: int,
                tol: float, out_of_time: bool = False) -> str | None:
    """None: run another round. 'tight': every preset's CPU-per-epoch ratio interval has
    exp(hw) - 1 < ``tol`` and at least ``min_rounds`` clean rounds. Else 'max-rounds' once
    ``rounds`` >= ``max_rounds``, or 'max-seconds' when ``out_of_time``."""
    others = [s for p, s in summary.items() if p != baseline]
    clean = min((s["rounds_clean"] for s in summary.values()), default=0)
    if clean >= min_rounds and all(s["ratio_cpu"]["hw_ratio"] < tol for s in others):
        return "tight"
    if rounds >= max_rounds:
        return "max-rounds"
    return "max-seconds" if out_of_time else None


def row_flags(s: dict, baseline: bool, tol: float, min_rounds: int) -> list[str]:
    """The table's flags for one preset's summary."""
    out = []
    if not baseline and not s["ratio_cpu"]["hw_ratio"] < tol:
        out.append(f"interval not tight (±{s['ratio_cpu']['hw_ratio']:.1%} > {tol:.1%})")
    if s["rounds_clean"] < min_rounds:
        out.append(f"only {s['rounds_clean']} clean rounds (< {min_rounds})")
    lo, hi = s["nfe_per_epoch_min"], s["nfe_per_epoch_max"]
    if hi > lo:
        out.append(f"NFE/epoch varies ({lo:,.0f}–{hi:,.0f})")
    return out


# ------------------------------------------------------------------------------------------------
# CPU seconds to target (with a bench/gpu_hours.py run's epochs to target)
# ------------------------------------------------------------------------------------------------
def to_target(epoch_speedup: dict, per_epoch: dict | None) -> dict:
    """CPU speedup to target = baseline CPU to target / preset's = (E_base / E_preset) x
    (c_base / c_preset). ``epoch_speedup``: gpu_hours_report.ratio_stats of the paired per-seed
    epochs-to-target ratios E_base / E_preset (median, min, max over seeds); ``per_epoch``: the
    interleaved c_preset / c_base interval (:func:`log_interval`). The interval propagates the
    per-epoch timing interval at the median epoch ratio; ``seed_lo``/``seed_hi`` apply the
    per-epoch ratio to the seeds' min / max epoch ratio (the spread over seeds)."""
    m = epoch_speedup["median"]
    if per_epoch is None:                     # the baseline itself
        return {"speedup": 1.0, "lo": 1.0, "hi": 1.0, "seed_lo": 1.0, "seed_hi": 1.0}
    rho, lo, hi = per_epoch["ratio"], per_epoch["lo"], per_epoch["hi"]

    def div(a, b):
        return a / b if b > 0 else math.inf if a > 0 else math.nan
    return {"speedup": div(m, rho), "lo": div(m, hi), "hi": div(m, lo),
            "seed_lo": div(epoch_speedup["min"], rho), "seed_hi": div(epoch_speedup["max"], rho)}
