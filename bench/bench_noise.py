"""Micro-benchmark of the counter-based Gaussian noise (``rsm_fast.engine.noise.gaussian``): the
plain-torch reference (``decomposed`` backend) against the fused kernel of the device (C++ on CPU,
Triton on CUDA), as the rollout engine calls it (one Python-int step, ``[rows, numel]`` float32).

    python bench/bench_noise.py [--rows 2 24 512] [--numel 2 4096 65536] [--repeat 31] [--device cpu]
                                [--threads N] [--min-batch-ms 5]

Columns: median milliseconds per call of ``gaussian()`` for the reference and the fused backend,
of the fused backend function alone (no argument checks / dispatch), the speedup (of the
medians), the throughput in GB/s of output written (``rows * numel * 4`` bytes for float32) at
the median, the fastest sample of each (closest to an unloaded machine) and the largest
|fused - reference| difference. Each timing sample
is a batch of back-to-back calls lasting at least ``--min-batch-ms`` (CUDA: synchronised around
the batch); the median over ``--repeat`` samples is reported. The 1-minute load average before
and after is printed: on a shared machine other processes distort CPU timings, most of all with
several threads (a parallel region waits for its slowest thread; ``--threads 1`` is steadier).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from rsm_fast.engine.noise import gaussian  # noqa: E402
from rsm_fast.ops import backends  # noqa: E402

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
COLUMNS = ("rows", "numel", "ref ms", "fused ms", "fused kernel ms", "speedup", "ref GB/s", "fused GB/s",
           "ref / fused ms (min)", "max |Δ|")


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown CPU"


def time_ms(fn, repeat: int, min_batch_ms: float, device: torch.device) -> tuple[float, float]:
    """(median, min) over ``repeat`` samples of the mean time of one call in a batch of >= min_batch_ms."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        fn()
    sync()
    n, t = 1, 0.0
    while True:                                  # calibrate the batch length
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        t = (time.perf_counter() - t0) * 1e3
        if t >= min_batch_ms or n >= 1 << 16:
            break
        n *= 2 if t <= 0 else max(2, min(16, int(min_batch_ms / t) + 1))
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        samples.append((time.perf_counter() - t0) * 1e3 / n)
    return statistics.median(samples), min(samples)


def with_backend(name: str, fn):
    """``fn()`` with ``RSM_FAST_OPS_BACKEND=name`` (gaussian() dispatches on it at every call)."""
    saved = os.environ.get("RSM_FAST_OPS_BACKEND")
    os.environ["RSM_FAST_OPS_BACKEND"] = name
    try:
        return fn()
    finally:
        if saved is None:
            os.environ.pop("RSM_FAST_OPS_BACKEND", None)
        else:
            os.environ["RSM_FAST_OPS_BACKEND"] = saved


def measure(rows: int, numel: int, dtype: torch.dtype, device: torch.device, repeat: int, min_batch_ms: float,
            fused_name: str) -> dict:
    g = torch.Generator().manual_seed(rows * 100003 + numel)
    keys = torch.randint(0, 2**62, (rows,), generator=g, dtype=torch.int64).to(device)
    seed, step = 20261123, 7

    def call():
        return gaussian(seed, keys, step, (numel,), dtype=dtype)

    ref = with_backend("decomposed", call)
    fused = with_backend(fused_name, call)
    be = with_backend(fused_name, lambda: backends.for_device(device))
    err = (fused.double() - ref.double()).abs().max().item() if ref.numel() else 0.0
    t_fused = with_backend(fused_name, lambda: time_ms(call, repeat, min_batch_ms, device))
    t_kernel = time_ms(lambda: be.noise(keys, None, step, seed, 0, numel, dtype), repeat, min_batch_ms, device)
    t_ref = with_backend("decomposed", lambda: time_ms(call, repeat, min_batch_ms, device))
    nbytes = rows * numel * torch.empty((), dtype=dtype).element_size()
    return {"rows": rows, "numel": numel, "ref_ms": t_ref[0], "fused_ms": t_fused[0], "kernel_ms": t_kernel[0],
            "ref_min_ms": t_ref[1], "fused_min_ms": t_fused[1], "backend": be.name,
            "ref_gbps": nbytes / t_ref[0] / 1e6, "fused_gbps": nbytes / t_fused[0] / 1e6, "err": err}


def table(results) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in results:
        lines.append(f"| {r['rows']} | {r['numel']} | {r['ref_ms']:.4f} | {r['fused_ms']:.4f} | {r['kernel_ms']:.4f} | "
                     f"{r['ref_ms'] / r['fused_ms']:.1f}× | {r['ref_gbps']:.3f} | {r['fused_gbps']:.3f} | "
                     f"{r['ref_min_ms']:.4f} / {r['fused_min_ms']:.4f} | {r['err']:.1e} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[2, 24, 512])
    ap.add_argument("--numel", type=int, nargs="+", default=[2, 4096, 16 * 64 * 64])
    ap.add_argument("--repeat", type=int, default=31, help="timing samples per cell (median reported)")
    ap.add_argument("--min-batch-ms", type=float, default=5.0, help="shortest timed batch of calls")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU); default: torch's")
    args = ap.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    fused_name = "triton" if device.type == "cuda" else "cpp"
    got = with_backend(fused_name, lambda: backends.for_device(device).name)   # builds the C++ ops on first use
    what = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    print(f"# noise benchmark: {what}; torch {torch.__version__}; threads {torch.get_num_threads()}; "
          f"dtype {args.dtype}; fused backend {got}" + ("" if got == fused_name else f" ({fused_name} unavailable)"))
    print(f"# load average (1 min) before: {os.getloadavg()[0]:.2f}")
    results = [measure(r, n, DTYPES[args.dtype], device, args.repeat, args.min_batch_ms, fused_name)
               for r in args.rows for n in args.numel]
    print(f"# load average (1 min) after: {os.getloadavg()[0]:.2f}")
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
