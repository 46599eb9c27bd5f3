"""pytest-benchmark: fused loss vs eager reference vs torch.compile'd reference.

    python -m pytest bench/bench_fused_loss.py --benchmark-only
    RSM_BENCH_GRID=full python -m pytest bench/bench_fused_loss.py --benchmark-only   # full grid on CPU
    python -m pytest bench/bench_fused_loss.py --benchmark-only -k "zo and 12x16x64x64 and fwd+bwd"

Grid: quick on CPU, full on CUDA (``RSM_BENCH_GRID=quick|full`` overrides). One benchmark group
per (loss, rows, latent, dtype, pass), so ``--benchmark-group-by=group`` (the default here) puts
fused, eager and compiled side by side. ``extra_info`` holds the backend, the byte model's bytes
and the fused GB/s. bench/ is outside the default testpaths: a plain ``pytest`` never runs these.
The markdown/JSON table with kernel counts and memory comes from ``bench/run_loss_bench.py``.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loss_cases as LC  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = LC.grid(None, DEVICE)


def _synced(step):
    if DEVICE.type != "cuda":
        return step

    def run():
        out = step()
        torch.cuda.synchronize(DEVICE)
        return out

    return run


@pytest.mark.parametrize("impl", LC.IMPLS)
@pytest.mark.parametrize("pass_", LC.PASSES)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_loss(benchmark, case, pass_, impl):
    inp = LC.make_inputs(case, DEVICE)
    step = _synced(LC.make_step(LC.loss_fns(case, (impl,), device=DEVICE)[impl], inp, pass_))
    for _ in range(3):  # compile (compiled), JIT/autotune (fused) and warm-up, all untimed
        step()
    benchmark.group = f"{case} {pass_}"
    nbytes = LC.min_bytes(case, pass_)
    benchmark.extra_info.update(device=str(DEVICE), backend=LC.backend_name(DEVICE), impl=impl, min_bytes=nbytes)
    benchmark(step)
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    if stats is not None and impl == "fused":
        benchmark.extra_info["fused_GBps_median"] = nbytes / stats.median / 1e9
