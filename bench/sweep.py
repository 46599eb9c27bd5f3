"""Fair-baseline sweep: each preset's learning rate (and optionally one more knob) chosen by the
same small procedure at the same budget, on seeds disjoint from the benchmark's.

    python bench/sweep.py --task toy2d --presets rsm-soft-zo,grpo --lr 0.005,0.01,0.02 \\
        --seeds 100,101 --epochs 60 --set train.batch_size=128 --out bench/results/sweep_toy2d_<date>
    python bench/gpu_hours.py ... --seeds 0,1,2 --tuned bench/results/sweep_toy2d_<date>.json

**Runs.** A grid point of a preset is the variant ``P[train.lr=<lr>(,<knob>=<v>)]`` run by
bench/gpu_hours.py's ``run_one`` exactly like a benchmark run (same config building, same
``--set`` for every preset, same budget: ``--epochs`` and/or ``--budget-nfe``, the first one spent;
no ``--budget-seconds``, so a choice does not depend on the machine's load). Each point runs on
every ``--seeds`` seed; a seed's held-out evaluation (``--eval-samples`` full-SDE samples, eval seed
= seed + 1000003) is the same for every point, so points are compared on common random numbers.
Only the evaluations before training and at the end of the budget are made.

**Score** of a run = its final held-out evaluation (never a value on the training batch):

- ``gain`` (toy2d default): ``objective_gain`` = (J - J_ref) / (J* - J_ref), J = E[r] - alpha * path
  KL, the share of the closed-form optimum's gain. Reward alone would reward over-optimisation.
- ``gain-marginal`` (toy2d): the same with the k-NN estimate of the samples' own KL.
- ``objective`` (digits default): J = E[r] - alpha * KL from the evaluation's reward and path KL,
  alpha = the run config's ``task.alpha`` (refused if the presets' alphas differ: one objective).
- ``reward``: E[r]; offered for completeness, it favours whatever over-optimises.

A point's score is the mean over the seeds (per-seed values and the min are kept). A run that
diverges -- NonFiniteError, a reward that comes back NaN/inf (RewardError), a ConfigError raised
by training, a "failed" stop or a non-finite score -- scores -inf: a failed point, never chosen;
one failed seed fails the point. Ties go to the smaller lr (then the earlier knob value).

**Grid growth.** The lr grid is the given values, sorted (>= 2 of them to grow: the spacing sets the
step). While the best point's lr is at an edge of the grid and fewer than ``--max-grow`` points were
added, one more lr is added beyond that edge at the edge's own ratio (lr0^2 / lr1 below,
lr[-1]^2 / lr[-2] above; 4 significant digits) and run. If every point failed, the grid grows
downward (the usual cure for divergence). The result records whether the best lr is interior; the
table flags a best still at an edge after the growths. With ``--knob KEY=V1,V2`` the grid is
lr x knob, the best over the whole grid decides, and growth is along lr only: a new lr runs with
every knob value (the knob's values are categorical or too few to extrapolate).

Every preset gets the same initial grid, seeds, budget and ``--max-grow``; the number of runs it
took is reported. ``train.lr`` and the knob key may not be set by ``--set`` or a preset variant.

Outputs for ``--out PREFIX``: ``PREFIX.csv`` (one row per run), ``PREFIX.json`` (command, machine,
code version, settings, per preset: grid, per-point scores, ``chosen`` overrides as ``key=value``
strings, interior flag) and ``PREFIX.md`` (the grid's mean scores per preset, best in bold).
``bench/gpu_hours.py --tuned PREFIX.json`` runs each preset with its ``chosen`` overrides.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

try:                                    # run as a script (bench/ on sys.path) or imported as bench.sweep
    import gpu_hours as G
    from gpu_hours_report import write_csv
except ImportError:
    from bench import gpu_hours as G
    from bench.gpu_hours_report import write_csv

from rsm_fast.config import ConfigError, describe_fields, parse_set
from rsm_fast.rewards import RewardError
from rsm_fast.trainer import NonFiniteError

SCORES = ("gain", "gain-marginal", "objective", "reward")
FIELDS = ("preset", "lr", "knob", "seed", "round", "score", "stop", "epochs", "nfe", "cpu_s", "wall_s",
          "eval_reward", "eval_kl", "eval_objective", "eval_gain", "eval_gain_marginal", "error")


# ------------------------------------------------------------------------------------------------
# the grid (pure: no training)
# ------------------------------------------------------------------------------------------------
def beyond(grid: list[float], edge: str) -> float:
    """The next lr past ``edge`` ('low' / 'high') of the sorted ``grid``, at that edge's ratio."""
    a, b = (grid[0], grid[1]) if edge == "low" else (grid[-1], grid[-2])
    return float(f"{a * a / b:.4g}")


def best_point(scores: dict, grid: list[float], knobs: list) -> tuple | None:
    """The (lr, knob) with the highest finite score; ties to the smaller lr, then the earlier knob."""
    best = None
    for lr in grid:
        for k in knobs:
            s = scores[(lr, k)]
            if math.isfinite(s) and (best is None or s > scores[best]):
                best = (lr, k)
    return best


def search(lrs: list[float], knobs: list, score, max_grow: int) -> dict:
    """Run ``score(lr, knob) -> float`` (-inf = failed) on the grid, growing it along lr while the
    best lr is at an edge (see the module docstring). Returns grid, scores, best, grown, edge."""
    grid, scores, grown = sorted(lrs), {}, []
    for lr in grid:
        for k in knobs:
            scores[(lr, k)] = score(lr, k)
    while True:
        best = best_point(scores, grid, knobs)
        edge = "low" if best is None else "low" if best[0] == grid[0] else "high" if best[0] == grid[-1] else None
        if edge is None or len(grown) >= max_grow or len(grid) < 2:
            break
        lr = beyond(grid, edge)
        if lr in grid:                  # a spacing below the rounding: nothing new to try
            break
        grid = sorted(grid + [lr])
        grown.append({"edge": edge, "lr": lr})
        for k in knobs:
            scores[(lr, k)] = score(lr, k)
    interior = best is not None and grid[0] < best[0] < grid[-1]
    return {"grid": grid, "scores": scores, "best": best, "grown": grown, "interior": interior,
            "edge": None if interior or best is None else edge}


# ------------------------------------------------------------------------------------------------
# runs
# ------------------------------------------------------------------------------------------------
def run_score(last: dict, kind: str, alpha: float) -> float:
    """The score of a run's final evaluation row (gpu_hours' ``eval_*`` fields)."""
    value = {"gain": last["eval_gain"], "gain-marginal": last["eval_gain_marginal"], "reward": last["eval_reward"],
             "objective": last["eval_reward"] - alpha * last["eval_kl"]}[kind]
    return value if math.isfinite(value) else -math.inf


def run_point(label: str, sets: list[str], seed: int, args, alpha: float, log=print) -> dict:
    """One (grid point, seed) run: a CSV row with its score (-inf if it diverged)."""
    rec = {"seed": seed, "score": -math.inf, "error": ""}
    try:
        rows, stop = G.run_one(G.add_overrides(label, sets), seed, args, log=log)
    except (NonFiniteError, RewardError, ConfigError) as e:
        log(f"{label} {' '.join(sets)} seed {seed}: failed ({str(e).splitlines()[0]})", flush=True)
        return {**rec, "stop": "failed", "error": str(e).splitlines()[0]}
    last = rows[-1]
    rec.update({k: last[k] for k in ("epoch", "nfe", "cpu_s", "wall_s", "eval_reward", "eval_kl", "eval_gain",
                                     "eval_gain_marginal")}, stop=stop)
    rec["epochs"] = rec.pop("epoch")
    rec["eval_objective"] = last["eval_reward"] - alpha * last["eval_kl"]
    if stop.startswith("failed"):
        rec.update(stop="failed", error=stop[len("failed: "):])
    else:
        rec["score"] = run_score(last, args.score, alpha)
    return rec


def point_sets(lr: float, knob, key: str | None) -> list[str]:
    return [f"train.lr={lr!r}"] + ([f"{key}={knob}"] if key else [])


def sweep_preset(label: str, args, alpha: float, log=print) -> tuple[dict, list[dict]]:
    """The search for one preset: its JSON entry and its CSV rows."""
    rows: list[dict] = []

    def score(lr, knob):
        vals = []
        for seed in args.seed_list:
            rec = run_point(label, point_sets(lr, knob, args.knob_key), seed, args, alpha, log)
            rows.append({"preset": label, "lr": lr, "knob": knob, **rec})
            vals.append(rec["score"])
        return statistics.fmean(vals) if all(math.isfinite(v) for v in vals) else -math.inf

    res = search(args.lr_list, args.knob_values, score, args.max_grow)
    rounds = {g["lr"]: i + 1 for i, g in enumerate(res["grown"])}
    points = []
    for r in rows:
        r["round"] = rounds.get(r["lr"], 0)
    for lr in res["grid"]:
        for k in args.knob_values:
            mine = [r for r in rows if r["lr"] == lr and r["knob"] == k]
            points.append({"lr": lr, "knob": k, "mean": res["scores"][(lr, k)], "min": min(r["score"] for r in mine),
                           "seeds": {r["seed"]: r["score"] for r in mine}, "failed": sum(r["stop"] == "failed" for r in mine)})
    best = res["best"]
    entry = {"grid": res["grid"], "knob_values": args.knob_values if args.knob_key else None, "points": points,
             "best": None if best is None else {"lr": best[0], "knob": best[1], "mean": res["scores"][best]},
             "chosen": [] if best is None else point_sets(best[0], best[1], args.knob_key),
             "interior": res["interior"], "edge": res["edge"], "grown": res["grown"], "runs": len(rows)}
    return entry, rows


# ------------------------------------------------------------------------------------------------
# outputs
# ------------------------------------------------------------------------------------------------
def plain(x):
    """``x`` with every non-finite float as None (strict JSON: -inf = a failed point)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
    return [plain(v) for v in x] if isinstance(x, (list, tuple)) else x


def _cell(v: float, bold: bool) -> str:
    text = "fail" if not math.isfinite(v) else f"{v:.4g}"
    return f"**{text}**" if bold else text


def write_markdown(path: Path, meta: dict) -> None:
    a, m = meta["args"], meta["machine"]
    res = meta["presets"]
    lrs = sorted({lr for e in res.values() for lr in e["grid"]})
    budget = [x for x in (f"{a['epochs']} epochs" if a["epochs"] else "",
                          f"{a['budget_nfe']:,} training NFE" if a["budget_nfe"] else "") if x]
    budget = budget[0] if len(budget) == 1 else f"the first spent of {budget[0]} and {budget[1]}"
    lines = [f"# Learning-rate sweep: {a['task']}", "", f"Command: `{meta['command']}`", "",
             f"- Date {m['date']}; {m['device']} ({m['cpu']}, {m['cores']} cores); torch {m['torch']}; "
             f"rsm_fast at git {meta['code']['commit']}; {meta['total_wall_s']:.0f} s in all.",
             f"- Sweep seeds {a['seeds']} (keep them out of the benchmark's --seeds); budget per run: {budget}; {a['eval_samples']} held-out samples per evaluation; `--set` for every preset: "
             f"{' '.join(a['set']) or 'none'}.",
             f"- Score: {meta['score_note']}; cell = mean over the seeds (per seed in the CSV / JSON), "
             "'fail' = a seed diverged. Best in bold.",
             f"- Grid: lr {', '.join(f'{v:g}' for v in a['lr'])}, grown by one point past the edge holding the best, up to {a['max_grow']} times"
             + (f"; knob `{a['knob']}` (growth along lr only)" if a["knob"] else "") + ".", ""]
    head = ["preset"] + (["knob"] if a["knob"] else []) + [f"lr {lr:g}" for lr in lrs] + ["chosen", "interior", "runs"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, e in res.items():
        knobs = e["knob_values"] or [None]
        for i, k in enumerate(knobs):
            pts = {p["lr"]: p for p in e["points"] if p["knob"] == k}
            best = e["best"] or {}
            cells = [label] + ([str(k)] if a["knob"] else [])
            cells += [_cell(pts[lr]["mean"], (lr, k) == (best.get("lr"), best.get("knob"))) if lr in pts else ""
                      for lr in lrs]
            cells += [" ".join(e["chosen"]) or "none (every point failed)", _interior(e), str(e["runs"])] if i == 0 \
                else ["", "", ""]
            lines.append("| " + " | ".join(cells) + " |")
    fails = [f"- {r['preset']} lr {r['lr']:g}" + (f" {a['knob']}={r['knob']}" if a["knob"] else "")
             + f" seed {r['seed']}: {r['error']}" for r in meta["failed_runs"]]
    lines += (["", "Failed runs:", ""] + fails) if fails else []
    path.write_text("\n".join(lines) + "\n")


def _interior(e: dict) -> str:
    if e["best"] is None:
        return "—"
    if e["interior"]:
        return "yes"
    return f"**no: best at the {e['edge']} edge after {len(e['grown'])} growth(s)**"


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------
def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/sweep.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[2:]))
    p.add_argument("--task", default="toy2d", choices=("toy2d", "digits-flow", "digits-ddim"))
    p.add_argument("--presets", required=True, help="comma-separated; preset[k=v,...] variants as in gpu_hours")
    p.add_argument("--lr", required=True, help="the initial log-spaced lr grid, e.g. 0.002,0.004,0.008")
    p.add_argument("--knob", default=None, metavar="KEY=V1,V2", help="a second config field to sweep")
    p.add_argument("--seeds", default="100,101,102", help="sweep seeds, disjoint from the benchmark's")
    p.add_argument("--epochs", type=int, default=0)
    p.add_argument("--budget-nfe", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for every run")
    p.add_argument("--score", choices=SCORES, default=None, help="default: gain on toy2d, objective otherwise")
    p.add_argument("--eval-samples", type=int, default=1024, help="(--set task.eval_samples=N sets it too)")
    p.add_argument("--max-grow", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True)
    return p.parse_args(argv)


def _numbers(name: str, text: str, kind=float) -> list:
    """Comma-separated numbers, each once; an empty list is refused."""
    vals, items = [], [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ConfigError(f"{name}: empty; give comma-separated values")
    for x in items:
        try:
            v = kind(x)
        except ValueError:
            raise ConfigError(f"{name}: {x!r} is not a{'n integer' if kind is int else ' number'}") from None
        if v in vals:
            raise ConfigError(f"{name}: {x} appears twice")
        vals.append(v)
    return vals


def check(a: argparse.Namespace) -> None:
    """Every argument, one-line ConfigError naming the field (no training yet)."""
    a.lr_list = _numbers("--lr", a.lr)
    bad = [v for v in a.lr_list if not (math.isfinite(v) and v > 0)]
    if bad:
        raise ConfigError(f"--lr: {bad[0]:g} is not a positive learning rate")
    if len(a.lr_list) < 2 and a.max_grow > 0:
        raise ConfigError("--lr: one value has no spacing to grow by; give two or more, or --max-grow 0")
    a.seed_list = _numbers("--seeds", a.seeds, int)
    a.preset_list = G.split_presets(a.presets)
    if not a.preset_list or len(set(a.preset_list)) < len(a.preset_list):
        raise ConfigError(f"--presets: name at least one preset, each once (got {a.presets!r})")
    a.knob_key, a.knob_values = None, [None]
    if a.knob:
        key, _, vals = a.knob.partition("=")
        a.knob_key, a.knob_values = key.strip(), [v.strip() for v in G.split_presets(vals)]
        if a.knob_key not in {k for k, _, _ in describe_fields()}:
            raise ConfigError(f"--knob: '{a.knob_key}' is not a config field")
        if a.knob_key == "train.lr" or not a.knob_values or len(set(a.knob_values)) < len(a.knob_values):
            raise ConfigError(f"--knob {a.knob_key}: give distinct values KEY=V1,V2 of a field other than train.lr")
    if a.epochs < 0 or a.budget_nfe < 0 or not (a.epochs or a.budget_nfe):
        raise ConfigError("--epochs / --budget-nfe: give a positive budget")
    if a.max_grow < 0 or a.threads < 0:
        raise ConfigError("--max-grow / --threads must be >= 0")
    a.score = a.score or ("gain" if a.task == "toy2d" else "objective")
    if a.score.startswith("gain") and a.task != "toy2d":
        raise ConfigError(f"--score {a.score}: needs toy2d (the only task with J* in closed form)")
    for expr in a.set:
        key, value = parse_set(expr)
        if key in ("train.lr", a.knob_key):
            raise ConfigError(f"--set {key}: the sweep sets it")
        if key == "task.eval_samples":
            a.eval_samples = value if isinstance(value, int) else 0
    if a.eval_samples < 2:
        raise ConfigError("--eval-samples (or --set task.eval_samples) must be an integer >= 2")
    a.budget_seconds, a.eval_every = 0.0, 0              # gpu_hours.run_one's other settings (0: no evaluation by epoch)


def alphas(a: argparse.Namespace) -> dict[str, float]:
    """Build every initial grid point's config (ConfigError names the preset and field); the
    presets' task.alpha, which must agree for an objective score."""
    out = {}
    for label in a.preset_list:
        own = {parse_set(x)[0] for x in G.parse_variant(label)[1]}
        if own & {"train.lr", a.knob_key}:
            raise ConfigError(f"preset {label}: its own overrides set {sorted(own & {'train.lr', a.knob_key})[0]}, "
                              "which the sweep sets")
        for lr in a.lr_list:
            for k in a.knob_values:
                cfg = G.run_config(G.add_overrides(label, point_sets(lr, k, a.knob_key)), a, a.seed_list[0])
        out[label] = cfg.task.alpha
    if a.score == "objective" and len(set(out.values())) > 1:
        raise ConfigError(f"task.alpha differs across presets ({out}); set it with --set task.alpha=...")
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    try:
        check(args)
        alpha = alphas(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    note = {"gain": "objective_gain = (J - J_ref) / (J* - J_ref), J = E[r] - alpha * path KL",
            "gain-marginal": "objective_gain with the samples' k-NN marginal KL",
            "objective": f"J = E[r] - alpha * path KL, alpha = {sorted(set(alpha.values()))}",
            "reward": "held-out E[r] (rewards over-optimisation)"}[args.score]
    meta = {"command": "python bench/sweep.py " + shlex.join(argv), "argv": argv,
            "machine": G.machine(G.run_config(args.preset_list[0], args, 0).train.device, args.threads),
            "code": G.provenance(), "score": args.score, "score_note": f"{args.score}: final held-out {note}",
            "args": {"task": args.task, "seeds": args.seed_list, "epochs": args.epochs, "budget_nfe": args.budget_nfe,
                     "set": args.set, "eval_samples": args.eval_samples, "lr": args.lr_list, "knob": args.knob_key,
                     "knob_values": args.knob_values if args.knob_key else None, "max_grow": args.max_grow,
                     "threads": args.threads, "presets": args.preset_list}, "presets": {}}
    t0, rows = time.perf_counter(), []
    for label in args.preset_list:
        meta["presets"][label], mine = sweep_preset(label, args, alpha[label])
        rows += mine
    meta["total_wall_s"] = round(time.perf_counter() - t0, 1)
    meta["machine"]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    meta["failed_runs"] = [r for r in rows if r["stop"] == "failed"]
    write_csv(Path(f"{out}.csv"), rows, FIELDS)
    Path(f"{out}.json").write_text(json.dumps(plain(meta), indent=1, allow_nan=False) + "\n")
    write_markdown(Path(f"{out}.md"), meta)
    print(f"wrote {out}.csv, {out}.json, {out}.md ({meta['total_wall_s']:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
