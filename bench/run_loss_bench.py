"""Fused loss vs eager reference vs torch.compile'd reference, without pytest: writes a markdown
table and a JSON file to ``bench/results/loss_<device>_<date>.{md,json}``.

    python bench/run_loss_bench.py [--grid quick|full] [--out bench/results] [--no-compile] ...

See bench/README.md for the columns, the byte model and how kernels are counted. Every number
in the output is measured by this script on the machine it runs on; nothing is filled in.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loss_cases as LC  # noqa: E402
from sd3_step import sd3_share  # noqa: E402

COLUMNS = ("op", "rows", "latent", "dtype", "pass", "fused µs", "eager µs", "compiled µs", "vs eager",
           "vs compiled", "kernels f/e/c", "fused GB/s", "% copy BW", "peak MiB f/e/c", "rel err loss/grad")
# Headline targets: (column key, target, label)
TARGETS = {"cpu": (("x_eager", 3.0, "fused vs eager"),),
           "cuda": (("x_eager", 10.0, "fused vs eager"), ("x_compiled", 1.5, "fused vs compiled"),
                    ("frac_copy", 0.70, "fraction of copy bandwidth"))}
HEADLINE_DTYPE = {"cpu": "fp32", "cuda": "bf16"}


# ---------------------------------------------------------------------------------------------
# Measurement primitives
# ---------------------------------------------------------------------------------------------
class _OpCounter(TorchDispatchMode):
    """Counts the non-view aten ops (and custom ops) dispatched while active."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not getattr(func, "is_view", False):
            self.n += 1
        return func(*args, **(kwargs or {}))


def count_kernels(fn, device: torch.device, impl: str, n: int = 3) -> float:
    """CUDA: device activities (kernels, memsets, memcpys) seen by torch.profiler. CPU: non-view
    aten ops dispatched (fused, eager), or for compiled: Inductor's C++ kernels and extern calls
    (the children of each '## Call CompiledFxGraph' event; a dispatch mode would make Dynamo run
    the function eagerly)."""
    if device.type == "cuda":
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(n):
                fn()
            torch.cuda.synchronize(device)
        return sum(e.device_type == torch.autograd.DeviceType.CUDA for e in prof.events()) / n
    if impl == "compiled":
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(n):
                fn()
        return sum(e.cpu_parent is not None and e.cpu_parent.name.startswith("## Call CompiledFxGraph")
                   for e in prof.events()) / n
    with _OpCounter() as c:
        for _ in range(n):
            fn()
    return c.n / n


def peak_mib(fn, device: torch.device) -> float | None:
    """CUDA: peak allocated memory above the baseline during one call (outputs included)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    del out
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def copy_bandwidth(device: torch.device, repeats: int = 10) -> float:
    """GB/s of ``dst.copy_(src)`` on a buffer far larger than the caches (read + write counted)."""
    nbytes = (1024 if device.type == "cuda" else 256) << 20
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    us, _ = LC.Timer(device, flush=False)(lambda: dst.copy_(src), warmup=3, repeats=repeats)
    return 2 * nbytes / (us * 1e-6) / 1e9


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


# ---------------------------------------------------------------------------------------------
# The matrix
# ---------------------------------------------------------------------------------------------
def measure(cases, device: torch.device, passes=LC.PASSES, impls=LC.IMPLS, repeats: int = 10, warmup: int = 2,
            check: bool = False, flush: bool = True, copy_gbps: float | None = None, on_row=None) -> list[dict]:
    """One row per (case, pass). Keys: the case, ``us_<impl>``, ``iqr_<impl>``, ``kernels_<impl>``,
    ``peak_mib_<impl>``, ``x_eager``, ``x_compiled``, ``gbps``, ``frac_copy``, ``bytes``,
    ``err_loss``/``err_grad`` (fused vs eager, relative to max |eager|), ``compile_s`` and
    ``error_<impl>`` for an implementation that raised."""
    timer, rows = LC.Timer(device, flush), []
    n_count = 3 if device.type == "cuda" else 1
    for case in cases:
        inp = LC.make_inputs(case, device)
        fns, errors, compile_s = LC.loss_fns(case, impls, check=check, device=device), {}, None
        if "compiled" in fns:  # compile (forward and backward graphs) before anything is timed
            t0 = time.perf_counter()
            try:
                LC.make_step(fns["compiled"], inp, "fwd+bwd")()
                LC.sync(device)
                compile_s = time.perf_counter() - t0
            except Exception as e:  # noqa: BLE001 - report, don't crash the whole grid
                errors["compiled"] = f"{type(e).__name__}: {e}"[:300]
                del fns["compiled"]
        results = {}
        for impl in list(fns):
            try:
                results[impl] = LC.make_step(fns[impl], inp, "fwd+bwd")()
            except Exception as e:  # noqa: BLE001
                errors[impl] = f"{type(e).__name__}: {e}"[:300]
                del fns[impl]
        err_loss = err_grad = None
        if "fused" in results and "eager" in results:
            err_loss = _rel_err(results["fused"][0], results["eager"][0])
            err_grad = _rel_err(results["fused"][1], results["eager"][1])
        del results
        for pass_ in passes:
            row = dict(op=case.op, rows=case.rows, latent=list(case.latent), latent_str=case.latent_str,
                       dtype=case.dtype, **{"pass": pass_}, bytes=LC.min_bytes(case, pass_),
                       err_loss=err_loss, err_grad=err_grad, compile_s=compile_s)
            row.update({f"error_{k}": v for k, v in errors.items()})
            for impl in LC.IMPLS:
                row[f"us_{impl}"] = row[f"iqr_{impl}"] = row[f"kernels_{impl}"] = row[f"peak_mib_{impl}"] = None
            for impl in fns:
                step = LC.make_step(fns[impl], inp, pass_)
                try:
                    row[f"us_{impl}"], row[f"iqr_{impl}"] = timer(step, warmup, repeats)
                    row[f"kernels_{impl}"] = count_kernels(step, device, impl, n_count)
                    row[f"peak_mib_{impl}"] = peak_mib(step, device)
                except Exception as e:  # noqa: BLE001
                    row[f"error_{impl}"] = f"{type(e).__name__}: {e}"[:300]
            uf, ue, uc = row["us_fused"], row["us_eager"], row["us_compiled"]
            row["x_eager"] = ue / uf if uf and ue else None
            row["x_compiled"] = uc / uf if uf and uc else None
            row["gbps"] = row["bytes"] / (uf * 1e-6) / 1e9 if uf else None
            row["frac_copy"] = row["gbps"] / copy_gbps if row["gbps"] and copy_gbps else None
            rows.append(row)
            if on_row is not None:
                on_row(row)
        del inp, fns
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return "CPU " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU " + (platform.processor() or platform.machine())


def environment(device: torch.device) -> dict:
    try:
        import triton
        triton_v = triton.__version__
    except ImportError:
        triton_v = "not installed"
    try:
        git = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                             cwd=LC.ROOT, timeout=10).stdout.strip() or "n/a"
    except (OSError, subprocess.SubprocessError):
        git = "n/a"
    return {"device": device_name(device), "device_type": device.type, "torch": torch.__version__,
            "cuda": torch.version.cuda or "n/a", "triton": triton_v, "python": platform.python_version(),
            "backend": LC.backend_name(device), "threads": torch.get_num_threads(),
            "date": _dt.date.today().isoformat(), "git": git}


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:48]


def _f(v, spec=".1f", none="—"):
    return none if v is None else format(v, spec)


def table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        us = [_f(r["us_" + i], ".1f", "err" if r.get("error_" + i) else "—") for i in LC.IMPLS]
        cells = [r["op"], str(r["rows"]), r["latent_str"], r["dtype"], r["pass"], *us,
                 _f(r["x_eager"], ".2f") + ("×" if r["x_eager"] else ""),
                 _f(r["x_compiled"], ".2f") + ("×" if r["x_compiled"] else ""),
                 "/".join(_f(r["kernels_" + i], ".0f") for i in LC.IMPLS), _f(r["gbps"], ".1f"),
                 _f(r["frac_copy"] and 100 * r["frac_copy"], ".0f"),
                 "n/a" if all(r["peak_mib_" + i] is None for i in LC.IMPLS)
                 else "/".join(_f(r["peak_mib_" + i], ".1f") for i in LC.IMPLS),
                 f"{_f(r['err_loss'], '.1e')} / {_f(r['err_grad'], '.1e')}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def headline(rows: list[dict], env: dict) -> list[str]:
    """PASS / FAIL / not measured against the targets, for the zo and score losses."""
    out = []
    for dev, targets in TARGETS.items():
        dt = HEADLINE_DTYPE[dev]
        for op in ("zo", "score"):      # the kernels issue's targets are for these two
            name = f"{'GPU' if dev == 'cuda' else 'CPU'} {op} {LC.HEADLINE[0]}×16×64² {dt} fwd+bwd"
            row = next((r for r in rows if r["op"] == op and r["rows"] == LC.HEADLINE[0] and r["pass"] == "fwd+bwd"
                        and tuple(r["latent"]) == LC.HEADLINE[1] and r["dtype"] == dt), None)
            if env["device_type"] != dev or row is None:
                why = f"this run is on {env['device_type'].upper()}" if env["device_type"] != dev else "row not in this run"
                out.append(f"- {name}: not measured ({why})")
                continue
            parts = []
            for key, target, label in targets:
                v = row.get(key)
                val = "—" if v is None else (f"{100 * v:.0f}%" if key == "frac_copy" else f"{v:.2f}×")
                tgt = f"{100 * target:.0f}%" if key == "frac_copy" else f"{target:g}×"
                verdict = "not measured" if v is None else ("PASS" if v >= target else "FAIL")
                parts.append(f"{label} {val} (target ≥ {tgt}): **{verdict}**")
            note = "" if dev == "cuda" or env["backend"] == "cpp" else \
                f" — backend is `{env['backend']}`, not the C++ kernels the target is for"
            out.append(f"- {name} [{env['backend']}]: " + "; ".join(parts) + note)
    return out


def markdown(env: dict, meta: dict, rows: list[dict], sd3: dict, heads: list[str]) -> str:
    cpu = env["device_type"] == "cpu"
    count_doc = ("non-view aten ops dispatched per call (TorchDispatchMode; a fused custom op counts once) for "
                 "fused/eager; Inductor C++ kernels + extern calls per call for compiled" if cpu else
                 "device kernels (incl. memset/memcpy) per call, torch.profiler")
    h = [f"# Fused loss benchmark — {env['device']}", "",
         f"- date {env['date']}, git `{env['git']}`",
         f"- torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}, Python {env['python']}",
         f"- fused backend used: **{env['backend']}**; torch threads: {env['threads']}",
         f"- grid `{meta['grid']}`; {meta['repeats']} timed repeats after {meta['warmup']} warm-up calls, median; "
         f"cache flush before each call: {meta['flush']}; fused `check={meta['check']}`; "
         f"compiled column: {'on' if meta['compile'] else 'off (--no-compile)'}",
         f"- ZO loss: {LC.ZO_KW} on Flow-GRPO SDE rows (SD3.5-M, 10 steps); score loss with C2={LC.SCORE_C2}; "
         "nft / awm: DiffusionNFT's and AWM's released defaults (bench/loss_cases.py), the scalar mean loss",
         f"- eager = `rsm_fast.losses` reference; compiled = the same under `torch.compile(dynamic=False)`, "
         "compile time excluded (in the JSON as `compile_s`)",
         "- **byte model** (fused GB/s): only the latent tensors a fused two-pass implementation must move: "
         "fwd reads 4 latent tensors (zo: f_theta, f_old, z, f_ref; score: s, s_ref, psi_hat, s_old; "
         "5 for nft: v, v_old, x_t, x0, v_ref and awm: v, eps, x0, v_ref, v_ema), "
         "fwd+bwd reads them twice and writes the gradient once (9 / 11 tensors); per-row values ignored",
         f"- measured copy bandwidth (`dst.copy_(src)`, read + write): **{_f(meta['copy_gbps'])} GB/s**; "
         "'% copy BW' = fused GB/s / that",
         f"- kernels f/e/c: {count_doc}",
         f"- peak MiB: {'n/a on CPU' if cpu else 'torch.cuda.max_memory_allocated above the baseline, one call'}",
         "- rel err: max |fused − eager| / max |eager| of the row losses / of the gradient", ""]
    if meta.get("merged"):
        h.insert(-1, f"- merged: {meta['merged']}")
    if cpu:
        h.insert(-1, "- CPU timings are wall-clock (time.perf_counter); on a shared machine they are noisy")
    h += ["## Headline", "", *heads, "", "## Results", "", table(rows), "",
          "## Loss share of one SD3.5-M training micro-step", ""]
    if sd3.get("status") == "measured":
        h += [f"Random-init SD3.5-M transformer ({sd3['params'] / 1e9:.2f} B params, bf16, frozen weights, "
              f"input grad on), {sd3['rows']} rows of 16×64² latents, {sd3['text_tokens']} text tokens, no CFG: "
              f"model fwd + fused loss + bwd **{sd3['step_ms']:.1f} ms**; fused loss fwd+bwd alone "
              f"{sd3['loss_us']:.1f} µs = **{100 * sd3['share']:.3f} %** of the step (peak {sd3['peak_gib']:.1f} GiB)."]
    else:
        h += [sd3.get("status", "not measured")]
    errs = [f"- {r['op']} {r['rows']}×{r['latent_str']} {r['dtype']} {r['pass']} {k[6:]}: {v}"
            for r in rows for k, v in r.items() if k.startswith("error_")]
    if errs:
        h += ["", "## Errors", "", *dict.fromkeys(errs)]
    return "\n".join(h) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--grid", choices=("quick", "full"), default=None,
                   help="default: $RSM_BENCH_GRID, else full on CUDA and quick on CPU")
    p.add_argument("--out", default=str(LC.ROOT / "bench" / "results"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--ops", default=",".join(LC.OPS))
    p.add_argument("--rows", help="comma list, overrides the grid's rows (e.g. 12,48)")
    p.add_argument("--latents", help="comma list, overrides the grid's latents (e.g. 16x64x64)")
    p.add_argument("--dtypes", help="comma list of fp32,bf16,fp16, overrides the grid's dtypes")
    p.add_argument("--passes", default=",".join(LC.PASSES))
    p.add_argument("--repeats", type=int, help="timed calls per cell (default 50 CUDA, 10 CPU)")
    p.add_argument("--warmup", type=int, help="untimed calls first (default 10 CUDA, 2 CPU)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile column (saves compile time)")
    p.add_argument("--check", action="store_true", help="call the fused ops with check=True (one host sync)")
    p.add_argument("--no-flush", action="store_true", help="don't flush the caches between timed calls")
    p.add_argument("--no-sd3", action="store_true", help="skip the SD3.5-M micro-step measurement")
    p.add_argument("--threads", type=int, help="torch.set_num_threads on CPU")
    p.add_argument("--merge", action="store_true",
                   help="keep the rows of an existing same-day results file for this device (replacing re-measured "
                        "cells), to build the full grid from several shorter runs")
    a = p.parse_args(argv)

    device = torch.device(a.device)
    if a.threads:
        torch.set_num_threads(a.threads)
    cuda = device.type == "cuda"
    ops_ = tuple(a.ops.split(","))
    cases = LC.grid(a.grid, device, ops_)
    if a.rows or a.latents or a.dtypes:
        rows = [int(r) for r in a.rows.split(",")] if a.rows else sorted({c.rows for c in cases})
        lats = [LC.parse_latent(s) for s in a.latents.split(",")] if a.latents else list(dict.fromkeys(c.latent for c in cases))
        dts = a.dtypes.split(",") if a.dtypes else list(dict.fromkeys(c.dtype for c in cases))
        cases = [LC.Case(op, b, lat, dt) for op in ops_ for lat in lats for b in rows for dt in dts]
    impls = tuple(i for i in LC.IMPLS if not (a.no_compile and i == "compiled"))
    repeats = a.repeats or (50 if cuda else 10)
    warmup = a.warmup if a.warmup is not None else (10 if cuda else 2)

    env = environment(device)
    meta = dict(grid=LC.grid_name(a.grid, device), repeats=repeats, warmup=warmup, flush=not a.no_flush,
                check=a.check, compile=("compiled" in impls), copy_gbps=copy_bandwidth(device))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"loss_{slug(env['device'])}_{env['date']}"
    print(f"{env['device']} | torch {env['torch']} | triton {env['triton']} | backend {env['backend']} | "
          f"threads {env['threads']} | copy {meta['copy_gbps']:.1f} GB/s | {len(cases)} cases -> {stem}.md", flush=True)

    rows: list[dict] = []
    sd3 = {"status": "not measured yet"}
    key = lambda r: (r["op"], r["rows"], tuple(r["latent"]), r["dtype"], r["pass"])  # noqa: E731
    if a.merge and stem.with_suffix(".json").exists():
        old = json.loads(stem.with_suffix(".json").read_text())
        new_keys = {key(dict(op=c.op, rows=c.rows, latent=c.latent, dtype=c.dtype, **{"pass": p_}))
                    for c in cases for p_ in a.passes.split(",")}
        rows = [r for r in old["rows"] if key(r) not in new_keys]
        sd3 = old.get("sd3", sd3)
        meta["merged"] = (f"{len(rows)} rows kept from an earlier run today (grid {old['meta']['grid']}, "
                          f"{old['meta']['repeats']} repeats, compile {old['meta']['compile']})")
        print(meta["merged"])

    def write():
        heads = headline(rows, env)
        stem.with_suffix(".md").write_text(markdown(env, meta, rows, sd3, heads))
        stem.with_suffix(".json").write_text(json.dumps(dict(env=env, meta=meta, rows=rows, sd3=sd3,
                                                             headline=heads), indent=1))
        return heads

    def on_row(r):
        rows.append(r)
        us = " ".join(f"{i} {_f(r['us_' + i])}" for i in impls)
        print(f"{r['op']:5s} {r['rows']:3d}×{r['latent_str']:9s} {r['dtype']} {r['pass']:7s} µs: {us} | "
              f"×eager {_f(r['x_eager'], '.2f')} ×compiled {_f(r['x_compiled'], '.2f')} "
              f"| {_f(r['gbps'])} GB/s", flush=True)
        write()  # partial results survive a timeout

    t0 = time.perf_counter()
    measure(cases, device, tuple(a.passes.split(",")), impls, repeats, warmup, a.check, not a.no_flush,
            meta["copy_gbps"], on_row)
    if not a.no_sd3:
        sd3 = sd3_share(device)
    elif sd3.get("status") == "not measured yet":
        sd3 = {"status": "skipped (--no-sd3)"}
    rows.sort(key=lambda r: (LC.OPS.index(r["op"]), r["latent"], r["rows"], list(LC.DTYPES).index(r["dtype"]),
                             LC.PASSES.index(r["pass"])))
    heads = write()
    print("\n".join(["", *heads, "", f"SD3.5-M micro-step: {sd3}", f"done in {time.perf_counter() - t0:.0f} s",
                     f"wrote {stem}.md and {stem}.json"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
