"""Host-time helpers shared by the host-overhead benchmarks (``bench_host_overhead.py``,
``bench_triton_launch.py``): a per-call timer and an argument recorder. Imports nothing that
reads ``TRITON_INTERPRET``, so either script sets it as it needs before importing Triton."""
from __future__ import annotations

import contextlib
import gc
import statistics
import time


def per_call_us(fn, calls: int, repeats: int, warmup: int = 20) -> float:
    """Median over ``repeats`` of the µs per call of ``calls`` back-to-back ``fn()`` calls, after
    ``warmup`` calls; Python's GC collected before and off during each repeat."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        gc.collect()
        gc.disable()
        try:
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            ts.append((time.perf_counter() - t0) / calls * 1e6)
        finally:
            gc.enable()
    return statistics.median(ts)


@contextlib.contextmanager
def capture(obj, name, store: list):
    """Wrap ``obj.name`` so each call's ``(args, kwargs, result)`` is appended to ``store``;
    yields the original."""
    orig = getattr(obj, name)

    def wrapper(*a, **k):
        out = orig(*a, **k)
        store.append((a, k, out))
        return out

    setattr(obj, name, wrapper)
    try:
        yield orig
    finally:
        setattr(obj, name, orig)
