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
Per epoch: training NFE (rollout + reference + train, as ``Trainer.nfe`` counts them), the samples
decoded and scored (``Trainer.scored``) and forward-equivalents (NFE + their decode and reward FLOPs
in denoiser forwards, priced by ``rsm_fast.cost``; bench/gpu_hours_cost.py), wall-clock
(``perf_counter``) and process CPU seconds (``process_time``; all threads, so ``--threads 1``) of
``epoch()`` alone, the training batch's reward and path KL, and every ``--eval-every`` epochs (and
before training and at the end) a held-out evaluation, ``Trainer.evaluate(--eval-samples)``:
full-SDE samples from a fixed eval seed (the run's seed + 1000003, the same for every preset
at that seed), mean reward and KL to the reference. Its cost is recorded apart (``eval_s``,
``eval_nfe``) and never charged to the run.

**Time to target.** On the held-out curve (the pre-training evaluation is point 0 at zero cost):
the first evaluation with reward >= target, interpolated linearly from the evaluation before it,
with the same fraction in epochs, NFE, forward-equivalents, CPU and wall seconds. At point 0
already: cost 0. Never: "not reached". ``--target-gain g`` (2-D task) crosses the regularised
objective instead: the evaluation's ``objective_gain`` = (J - J_ref) / (J* - J_ref) with
J = E[r] - alpha path KL reaching g, so a run that buys reward with KL past p* does not reach it
(the exact 50-step tilted process measures 0.91). On a task without J* in closed form (digits)
``--target-gain`` estimates it once, before the runs, from ``--optimum-samples`` reference samples
(``J* = alpha log E_ref[exp(r/alpha)]``, rsm_fast/optimum.py; its standard error and the optimum's
reward and KL are written beside the target) and crosses the gain of ``J = E[r] - alpha path KL``;
the reward, KL and alpha of the target are then all the task's own. ``--target T`` is an absolute reward; ``--target-frac f`` sets
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

``--tuned SWEEP.json[,SWEEP2.json]`` (written by bench/sweep.py) gives each preset the overrides its sweep chose
(e.g. its learning rate): ``P`` runs as the variant ``P[train.lr=...]``, so every table and the
JSON name the value. Refused (one line) if the sweep ran another task, its seeds overlap
``--seeds``, a preset has no chosen value or ``--set`` sets a tuned key; a note says when the
sweep's budget or ``--set`` differ from this run's.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
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

from rsm_fast.config import ConfigError, build_config, parse_set
from rsm_fast.ops import backends
from rsm_fast.optimum import SoftOptimum, soft_optimum
from rsm_fast.rewards import RewardError
from rsm_fast.trainer import NonFiniteError, Trainer

try:                                    # imported as bench.gpu_hours (tests) or run as a script
    from bench.gpu_hours_cost import cost_columns, run_prices
    from bench.gpu_hours_report import EPOCH_FIELDS, PHASES, read_epochs, write_csv, write_outputs
except ImportError:
    from gpu_hours_cost import cost_columns, run_prices
    from gpu_hours_report import EPOCH_FIELDS, PHASES, read_epochs, write_csv, write_outputs

DEFAULT_PRESETS = "tempflow-grpo,tempflow-grpo-rsm,tempflow-grpo-k1,rsm-uniform-realloc,rsm-evr,rsm-evr-cost,tempflow-evr,tempflow-evr-cost"


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


def add_overrides(label: str, sets: list[str]) -> str:
    """``preset[own]`` + ``sets`` -> ``preset[own,sets]`` (a later override of a key wins)."""
    name, own = parse_variant(label)
    return f"{name}[{','.join(own + list(sets))}]" if own or sets else name


def check_backend(name: str, device: str) -> str | None:
    """The backend must be what the device asks for (Triton on CUDA, C++ on CPU) unless
    RSM_FAST_OPS_BACKEND forces one; returns the one-line error or None."""
    want = backends.forced() or ("triton" if device.startswith("cuda") else "cpp")
    if name == want:
        return None
    return (f"the fused ops fell back to '{name}' instead of '{want}'; fix the build, or set "
            "RSM_FAST_OPS_BACKEND to benchmark a backend on purpose")


def apply_tuned(args) -> dict:
    """``--tuned FILE``: relabel each preset (and the baseline) ``P`` -> ``P[chosen overrides]``;
    returns what the run's JSON records. Raises ConfigError / OSError / ValueError / KeyError."""
    files = [f for f in args.tuned.split(",") if f]
    sweeps = [json.loads(Path(f).read_text()) for f in files]
    chosen: dict = {}
    for f, sweep in zip(files, sweeps):         # several sweeps (e.g. lr-only and lr x beta) add up
        where = f"--tuned {f}"
        if sweep["args"]["task"] != args.task:
            raise ConfigError(f"{where}: the sweep ran task {sweep['args']['task']}, this run {args.task}")
        shared = sorted(set(sweep["args"]["seeds"]) & set(args.seed_list))
        if shared:
            raise ConfigError(f"{where}: seeds {shared} were used to tune; --seeds must be disjoint from the sweep's")
        for p, v in sweep["presets"].items():
            if p in chosen and v["chosen"]:
                raise ConfigError(f"{where}: preset {p} is tuned by two sweeps; give each preset one")
            if v["chosen"]:
                chosen[p] = v["chosen"]
    where = f"--tuned {args.tuned}"
    mine, relabel = {parse_set(x)[0] for x in args.set}, {}
    for p in args.preset_list:
        if not chosen.get(p):
            raise ConfigError(f"{where}: no chosen overrides for preset {p} (swept: {', '.join(chosen) or 'none'})")
        clash = sorted(mine & {parse_set(x)[0] for x in chosen[p]})
        if clash:
            raise ConfigError(f"{where}: --set {clash[0]} would replace the value tuned for {p}; drop it")
        relabel[p] = add_overrides(p, chosen[p])
    differ = sorted({k for sw in sweeps for k in ("epochs", "budget_nfe") if sw["args"].get(k) != getattr(args, k)})
    differ += ["set"] if any(sorted(sw["args"].get("set", [])) != sorted(args.set) for sw in sweeps) else []
    if differ:
        print(f"note: {where} was tuned with other {', '.join(differ)} than this run's", file=sys.stderr)
    args.baseline = relabel.get(args.baseline, args.baseline)
    args.preset_list = [relabel[p] for p in args.preset_list]
    return {"file": args.tuned, "sweep_command": [sw.get("command") for sw in sweeps],
            "sweep_seeds": sorted({x for sw in sweeps for x in sw["args"]["seeds"]}),
            "overrides": {p: chosen[p] for p in relabel}, "differs_in": differ}


def run_config(preset: str, args, seed: int):
    sets = [f"task.name={args.task}", f"train.seed={seed}", f"train.threads={args.threads}",
            f"task.eval_samples={args.eval_samples}"] + ([f"train.epochs={args.epochs}"] if args.epochs else [])
    name, own = parse_variant(preset)
    try:
        return build_config(name, None, sets + list(args.set) + own)     # the variant's own overrides win
    except ConfigError as e:
        msg = str(e)
        raise ConfigError(msg if f"'{name}'" in msg else f"preset {preset}: {msg}") from None


def _task_key(c) -> tuple:
    """What J* depends on: the task, its reward and conditioning, alpha and the sampler's steps."""
    return (c.task.name, c.task.reward, c.task.condition, c.task.alpha, c.task.num_steps)


def estimate_optima(presets: list[str], cfgs: list, args) -> dict[str, dict]:
    """J* of the task's regularised objective by Monte Carlo over ``--optimum-samples`` reference
    samples (rsm_fast/optimum.py), per preset: presets whose task settings agree (task, reward,
    condition, alpha, sampler steps) share one estimate; a preset with its own sampler (AWM's 14
    digits steps) gets its own, from its own reference sampler, so its gain is against its own J*."""
    done: dict[tuple, dict] = {}
    out = {}
    for p, c in zip(presets, cfgs):
        key = _task_key(c)
        if key not in done:
            t0 = time.perf_counter()
            tr = Trainer(c)
            try:
                o = soft_optimum(tr, args.optimum_samples).as_dict()
            finally:
                tr.close()
            o.update(seconds=round(time.perf_counter() - t0, 1), num_steps=c.task.num_steps)
            print(f"optimum ({c.task.num_steps} steps): J* = {o['objective']:.4g} ± {o['objective_se']:.2g} over "
                  f"{o['samples']:,} reference samples (E*[r] {o['reward']:.4g}, KL* {o['kl']:.3g}, "
                  f"J_ref {o['reference']:.4g}; {o['seconds']:.0f} s)")
            done[key] = o
        out[p] = done[key]
    return out


def run_one(preset: str, seed: int, args, log=print) -> tuple[list[dict], str]:
    """Train one (preset, seed) until the first budget is spent: one row per epoch (+ epoch 0) and
    why it stopped. A run whose trainer raises after the first epoch (a NaN, an allocator that left
    nothing to train) ends with that epoch, as 'failed: <message>': its cost counts (no train
    reward/KL) and the policy as it was left is evaluated."""
    tr = Trainer(run_config(preset, args, seed))
    cuda, backend = tr.device.type == "cuda", backends.for_device(tr.device).name
    prices = run_prices(tr.cfg, tr.reward_name)
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
                   eval_nfe=tr.nfe["eval"], eval_objective=ev.get("objective", math.nan),
                   eval_gain=ev.get("objective_gain", math.nan),
                   eval_gain_marginal=ev.get("objective_gain_marginal", math.nan))
        opt = (getattr(args, "optimum", None) or {}).get(preset)
        if opt and "objective_gain" not in ev:       # no closed form: the parent's Monte-Carlo J*
            o = SoftOptimum(**{k: v for k, v in opt.items() if k not in ("seconds", "num_steps")})
            row.update(eval_objective=ev["reward_mean"] - o.alpha * ev["kl_to_reference"],
                       eval_gain=o.gain(ev["reward_mean"], ev["kl_to_reference"]))

    def row(epoch: int, s: dict) -> dict:
        return {"preset": preset, "seed": seed, "epoch": epoch, "nfe": tr.nfe_total(), "nfe_rollout": tr.nfe["rollout"],
                "nfe_reference": tr.nfe["reference"], "nfe_train": tr.nfe["train"], "wall_s": round(wall, 4),
                "cpu_s": round(cpu, 4), "train_reward": s.get("reward_mean", math.nan), "train_kl": s.get("kl", math.nan),
                "eval_reward": math.nan, "eval_kl": math.nan, "eval_s": round(eval_s, 4), "eval_nfe": tr.nfe["eval"],
                "eval_objective": math.nan, "eval_gain": math.nan, "eval_gain_marginal": math.nan,
                **{f"{k}_s": round(tr.clock.seconds.get(k, 0.0), 4) for k in PHASES}, "ops_backend": backend,
                **cost_columns(tr, prices)}

    rows = [row(0, {})]
    evaluate(rows[0])
    epoch, stop = 0, None
    every_nfe = getattr(args, "eval_every_nfe", 0)
    next_nfe = every_nfe
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
            due = bool(every_nfe) and tr.nfe_total() >= next_nfe
            if due:                  # the next multiple of --eval-every-nfe past this epoch's NFE
                next_nfe = (tr.nfe_total() // every_nfe + 1) * every_nfe
            if stop or due or (args.eval_every and epoch % args.eval_every == 0):
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
    g.add_argument("--target-gain", type=float, default=None,
                   help="2-D task: target = this share of J*'s gain over p_ref on the regularised objective "
                        "J = E[r] - alpha KL (the evaluation's objective_gain; --gain-kl picks the KL)")
    p.add_argument("--gain-kl", choices=("path", "marginal"), default="path",
                   help="--target-gain's KL: along the sampling paths, or the k-NN estimate of the samples' own")
    p.add_argument("--optimum-samples", type=int, default=4096,
                   help="--target-gain on a task without J* in closed form (digits): reference samples of its "
                        "Monte-Carlo estimate (rsm_fast/optimum.py), drawn once before the runs")
    p.add_argument("--eval-every", type=int, default=1,
                   help="epochs between held-out evaluations (0 = none by epoch: only --eval-every-nfe's, the start and the end)")
    p.add_argument("--eval-every-nfe", type=int, default=0,
                   help="also evaluate after the epoch that crosses each multiple of this many training NFE: one "
                        "cadence in cost for presets whose epochs differ in NFE (0 = off; with a large --eval-every, "
                        "the only cadence)")
    p.add_argument("--eval-samples", type=int, default=1024)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per run (CPU-time accounting: 1)")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs at a time, each in its own process (CPU: at most one per core; the CPU-seconds of a "
                        "run are its own process's, the wall-clock includes contention for memory bandwidth)")
    p.add_argument("--out", required=True, help="output prefix, e.g. bench/results/gpu_hours_toy2d_2026-11-23")
    p.add_argument("--tuned", default=None, metavar="FILE",
                   help="bench/sweep.py JSON(s), comma-separated: run each preset with the overrides its sweep chose")
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
    for name in ("target_frac", "target_gain"):
        v = getattr(a, name)
        if v is not None and not 0 < v <= 1:
            p.error(f"--{name.replace('_', '-')} must be in (0, 1], got {v}")
    if a.target_gain is not None and a.task != "toy2d" and a.gain_kl != "path":
        p.error("--gain-kl marginal needs the 2-D task (the only one with the samples' k-NN KL)")
    if a.optimum_samples < 2:
        p.error(f"--optimum-samples must be >= 2, got {a.optimum_samples}")
    if not a.reanalyze and not (a.epochs or a.budget_nfe or a.budget_seconds):
        p.error("give a budget: --epochs, --budget-nfe and/or --budget-seconds")
    if min(a.epochs, a.budget_nfe, a.budget_seconds, a.eval_every_nfe, a.eval_every) < 0 or a.eval_samples < 2 or a.threads < 0:
        p.error("budgets must be >= 0, --eval-every >= 0, --eval-samples >= 2, --threads >= 0")
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
        try:
            write_outputs(str(out), rows, meta, args)
        except ValueError as e:            # e.g. --target-gain on runs that recorded no objective
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    try:      # every preset x override must validate before the first run starts
        tuned = apply_tuned(args) if args.tuned else None
        cfgs = [run_config(p, args, args.seed_list[0]) for p in args.preset_list]
    except (ConfigError, OSError, ValueError, KeyError, TypeError) as e:
        print(f"error: {e if isinstance(e, ConfigError) else f'--tuned {args.tuned}: cannot read a sweep JSON: {e!r}'}",
              file=sys.stderr)
        return 2
    try:      # the FLOP prices of the forward-equivalent columns (rsm_fast/cost.py)
        prices = {p: run_prices(c).as_dict() for p, c in zip(args.preset_list, cfgs)}
    except (ValueError, ImportError, OSError) as e:
        print(f"error: pricing forward-equivalents: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    if args.baseline not in args.preset_list:
        print(f"note: baseline {args.baseline} is not among --presets: no speedup columns", file=sys.stderr)
    meta = {"command": command, "argv": argv, "machine": machine(cfgs[0].train.device, args.threads), "code": provenance(),
            "args": {k: getattr(args, k) for k in ("task", "baseline", "seeds", "epochs", "budget_nfe", "budget_seconds",
                                                    "set", "target", "target_frac", "target_gain", "gain_kl", "optimum_samples", "eval_every", "eval_every_nfe",
                                                    "eval_samples", "jobs")}}
    meta["args"]["presets"] = args.preset_list
    meta["prices"] = prices
    if tuned:
        meta["tuned"] = tuned
    bad = check_backend(meta["machine"]["ops_backend"], cfgs[0].train.device)
    if bad:                                          # a silent fallback would time another implementation
        print(f"error: {bad}", file=sys.stderr)
        return 2
    if args.target_gain is not None and args.task != "toy2d":
        try:
            meta["optimum"] = args.optimum = estimate_optima(args.preset_list, cfgs, args)
        except (ConfigError, ValueError, RewardError) as e:
            print(f"error: the optimum J*: {str(e).splitlines()[0]}", file=sys.stderr)
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
