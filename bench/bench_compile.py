"""Compiled training step vs eager on CPU (issue 6 item 4): the optimizer side of one epoch
(``Trainer._optimize``: inner updates of policy forward + fused loss + backward + clip + AdamW).

    python bench/bench_compile.py                         # toy2d and digits-ddim, all modes
    python bench/bench_compile.py --cases toy2d --repeats 5 --threads 1

For each case one eager epoch is rolled out and its rows are captured; every mode then gets a
fresh trainer (same seed, same initial weights) and runs ``_optimize`` on those rows: ``warmup``
calls (compilation; the first call's time is reported as ``first_s``), then ``repeats`` timed
calls (median and IQR of the wall time, ``time.perf_counter``; the modes' calls interleaved round
robin, so load drift on a shared machine hits every mode alike), then one call on 7 fewer rows
(what the online allocator does between epochs): ``recompiles_timed`` and ``recompiles_rows`` are
Dynamo graphs compiled during the timed calls and during that call, both must be 0.

Modes: ``off`` (eager; the fused loss runs its C++ kernel through an ``autograd.Function``),
``regional`` and ``full`` (``train.compile``: rsm_fast/train_step.py), and ``full+loss`` (a
variant that is not a config value: policy forward *and* the fused loss compiled as one graph, the
loss as the registered ``rsm_fast::zo_loss`` op; row dims marked dynamic the same way), measured
to decide whether the loss belongs inside the graph. Numerics: the first call's loss (absolute
difference: the on-policy GRPO loss is ~0) and gradient norm (relative) against eager, same weights
and rows.

Writes ``bench/results/compile_cpu_<date>.md`` and ``.json`` (``--out`` to change the stem).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

try:                      # run as a script (bench/ on sys.path) or imported as bench.<name>
    from machine_info import cpu_model
except ImportError:
    from bench.machine_info import cpu_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rsm_fast.config import build_config  # noqa: E402
from rsm_fast.families import TrajectoryRows  # noqa: E402
from rsm_fast.train_step import _mark_batch, compile_backend, graphs_compiled  # noqa: E402
from rsm_fast.trainer import NonFiniteError, Trainer, _slice_coeffs, _slice_rows  # noqa: E402

CASES = {
    # the 2-D task at the grpo preset's defaults: 64 trajectories x 49 trained steps = 3136 rows,
    # residual MLP 2 x 128, 2 inner updates
    "toy2d": ("grpo", ["train.batch_size=64", "method.group_size=8", "task.eval_samples=64"]),
    # class-conditional digits (CFG 3: every row is 2 UNet rows), LoRA r8 on the attention,
    # 16 trajectories x 5 trained steps (of 6) = 80 rows (160 UNet rows), 2 inner updates
    "digits-ddim": ("grpo", ["task.name=digits-ddim", "task.num_steps=6", "train.batch_size=16",
                             "method.group_size=4", "task.eval_samples=16"]),
}
MODES = ("off", "regional", "full", "full+loss")


def machine(threads: int) -> dict:
    cpu = cpu_model()
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "torch": torch.__version__,
            "python": platform.python_version(), "date": date.today().isoformat()}


def _forward_loss(tr, rows, c, shift, group, row_weight):
    """Policy forward + loss of one micro-batch (what ``full+loss`` compiles as one graph)."""
    return tr._loss(rows, c, tr._policy_out(rows.x, rows.t, group), shift, row_weight)


def _fused_optimize(tr, compiled, trows) -> dict:
    """``Trainer._optimize`` with the micro-batch's forward + loss through ``compiled``
    (``trows``: the trajectory family's rows, rsm_fast/families.py)."""
    rows, c, shift, group = trows.rows, trows.coeffs, trows.shift, trows.group
    tr.policy.train()
    M = rows.x.shape[0]

    def loss_fn(sl):
        r, cs = _slice_rows(rows, sl), _slice_coeffs(c, sl)
        for v in list(vars(r).values()) + [getattr(cs, f) for f in cs.__dataclass_fields__]:
            _mark_batch(v)
        rw = None if tr._row_weight is None else _mark_batch(tr._row_weight[sl])
        return compiled(tr, r, cs, None if shift is None else shift[sl], _mark_batch(group[sl]), rw)

    stats, tr._last_clipped = tr.step.run(M, tr.cfg.train.inner_updates, loss_fn, lambda n: None,
                                          NonFiniteError, tr.epochs_done)
    stats["recompiles"] = 0
    return stats


def capture(preset: str, sets: list[str]):
    tr = Trainer(build_config(preset, None, sets))
    box = {}
    real = tr._optimize

    def grab(*a):
        box["args"] = a
        return real(*a)

    tr._optimize = grab
    tr.epoch()
    return box["args"], tr.conds


def setup(case: str, mode: str, captured, warmup: int, threads: int) -> dict:
    """A fresh trainer for ``mode`` on the captured rows, warmed up (compiled)."""
    preset, sets = CASES[case]
    compile_mode = "off" if mode == "full+loss" else mode
    # quoted: YAML reads a bare off as false
    tr = Trainer(build_config(preset, None, sets + [f"train.threads={threads}", f"train.compile='{compile_mode}'"]))
    args, tr.conds = captured          # the captured epoch's rows and its prompt groups' conditioning
    if mode == "full+loss":
        compiled = torch.compile(_forward_loss, dynamic=None, backend=compile_backend())
        step = lambda a: _fused_optimize(tr, compiled, *a)   # noqa: E731
    else:
        step = lambda a: tr._optimize(*a)                    # noqa: E731
    t0 = time.perf_counter()
    first = step(args)
    first_s = time.perf_counter() - t0
    for _ in range(warmup - 1):
        step(args)
    return {"case": case, "mode": mode, "tr": tr, "step": step, "args": args, "first_s": first_s,
            "loss": first["loss"], "grad_norm": first["grad_norm"], "times": [], "recompiles_timed": 0}


def timed(run: dict) -> None:
    g0 = graphs_compiled()
    t0 = time.perf_counter()
    run["step"](run["args"])
    run["times"].append(time.perf_counter() - t0)
    run["recompiles_timed"] += graphs_compiled() - g0


def finish(run: dict) -> dict:
    """The fewer-rows call, then the summary record."""
    (trows,) = run["args"]
    rows, c, shift, group = trows.rows, trows.coeffs, trows.shift, trows.group
    sl = slice(0, rows.x.shape[0] - 7)
    g0 = graphs_compiled()
    run["step"]((TrajectoryRows(_slice_rows(rows, sl), _slice_coeffs(c, sl), None if shift is None else shift[sl],
                                group[sl]),))
    times = run["times"]
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return {"case": run["case"], "mode": run["mode"], "rows": int(rows.x.shape[0]),
            "median_s": statistics.median(times), "iqr_s": [q[0], q[2]], "min_s": min(times),
            "first_s": run["first_s"], "compiled": run["tr"].step.compiled,
            "recompiles_timed": run["recompiles_timed"], "recompiles_rows": graphs_compiled() - g0,
            "loss": run["loss"], "grad_norm": run["grad_norm"], "times_s": times}


def table(results: list[dict], meta: dict, args, cmd: str) -> str:
    lines = [f"# Compiled training step vs eager — CPU, {meta['threads']} torch thread(s), {meta['date']}", "",
             f"{meta['cpu']} ({meta['cores']} cores), torch {meta['torch']}, Python {meta['python']}. "
             f"`python bench/bench_compile.py {cmd}`: `Trainer._optimize` on one "
             f"captured epoch's rows, {args.warmup} warm-up call(s) then median of {args.repeats}; "
             "first call = compilation + one step.", "",
             "| case | rows | mode | median ms | IQR ms | vs eager | first call s | recompiles (timed / fewer rows) "
             "| loss abs diff | grad-norm rel diff | compiled regions |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for case in dict.fromkeys(r["case"] for r in results):
        rs = [r for r in results if r["case"] == case]
        base = next((r for r in rs if r["mode"] == "off"), rs[0])
        for r in rs:
            gn_rel = abs(r["grad_norm"] - base["grad_norm"]) / max(abs(base["grad_norm"]), 1e-30)
            regions = ", ".join(r["compiled"]) or ("(forward+loss fn)" if r["mode"] == "full+loss" else "—")
            if len(regions) > 60:
                tops = sorted({n.split('.')[0] for n in r['compiled']})
                regions = f"{len(r['compiled'])} blocks: " + ", ".join(tops)
            lines.append(f"| {case} | {r['rows']} | {r['mode']} | {1e3 * r['median_s']:.1f} | "
                         f"{1e3 * r['iqr_s'][0]:.1f}–{1e3 * r['iqr_s'][1]:.1f} | "
                         f"{base['median_s'] / r['median_s']:.2f}× | {r['first_s']:.1f} | "
                         f"{r['recompiles_timed']} / {r['recompiles_rows']} | {abs(r['loss'] - base['loss']):.1e} | "
                         f"{gn_rel:.1e} | {regions} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / f"compile_cpu_{date.today().isoformat()}"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    meta = machine(args.threads)
    results = []
    for case in args.cases.split(","):
        preset, sets = CASES[case]
        captured = capture(preset, sets + [f"train.threads={args.threads}"])
        runs = [setup(case, mode, captured, args.warmup, args.threads) for mode in args.modes.split(",")]
        for _ in range(args.repeats):      # round robin: load drift on a shared machine hits every mode alike
            for run in runs:
                timed(run)
        for run in runs:
            r = finish(run)
            print(f"{case:12s} {r['mode']:10s} rows {r['rows']:5d} median {1e3 * r['median_s']:8.1f} ms  "
                  f"first {r['first_s']:6.1f} s  recompiles {r['recompiles_timed']}/{r['recompiles_rows']}", flush=True)
            results.append(r)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"machine": meta, "args": vars(args), "results": results}, indent=1))
    cmd = " ".join(sys.argv[1:] if argv is None else argv)
    out.with_suffix(".md").write_text(table(results, meta, args, cmd))
    print(f"wrote {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
