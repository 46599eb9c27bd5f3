"""Accounting and run-directory I/O at the edges of the trainer.

* :class:`PhaseClock` — wall-clock by phase (rollout / reward / train / eval), each phase an NVTX
  range; on CUDA the device is synchronised at every phase edge, so a phase's seconds include the
  GPU work it queued (issue 21 item 4), not just the host's enqueue time.
* :func:`scalars` — the numbers of a log record as TensorBoard tags (``per_step/<name>/<step>``).
* :class:`RunDir` lives in :mod:`rsm_fast.rundir` (re-exported here).
* :class:`Progress` — a one-line progress bar on a terminal, periodic lines otherwise.
"""
from __future__ import annotations

import math
import sys
import time
from contextlib import contextmanager

import torch

from .ops.nvtx import annotate
from .rundir import RunDir, RunDirError, atomic_torch_save, atomic_write_text  # noqa: F401 - re-exported


class PhaseClock:
    """Seconds per phase. ``device`` a CUDA device: ``torch.cuda.synchronize`` at both edges of every
    phase, so work queued in one phase is charged to it and not to the next one that waits for it
    (kernel launches return at once; without the syncs the rollout's GPU time landed in the reward
    phase, and ``rollout.alloc_units=seconds`` priced branches from enqueue times). A few syncs per
    epoch, none inside the rollout loop or an update; ``syncs`` counts them. The edge sync is
    skipped while an exception propagates, so a device fault is not masked by a second one.
    Every phase is an NVTX range ``rsm_fast/phase/<name>`` (Nsight Systems' timeline)."""

    def __init__(self, device=None):
        self.seconds: dict[str, float] = {}
        self.device = None if device is None else torch.device(device)
        self.syncs = 0

    def _sync(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.syncs += 1

    @contextmanager
    def __call__(self, phase: str):
        from .distributed import phase as named   # several ranks: a failed collective names the phase

        self._sync()
        t0 = time.perf_counter()
        ok = False
        try:
            with named(phase), annotate(f"phase/{phase}", self.device):
                yield
            ok = True
        finally:
            if ok:
                self._sync()
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t0

    def snapshot(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in self.seconds.items()}


def scalars(record: dict, prefix: str = ""):
    """``(tag, value)`` for every finite number in a log record: nested dicts as ``a/b``, lists
    (per-step diagnostics) as ``a/<index>`` with two digits, ``None`` entries skipped."""
    for k, v in record.items():
        tag = f"{prefix}{k}"
        if isinstance(v, dict):
            yield from scalars(v, f"{tag}/")
        elif isinstance(v, (list, tuple)):
            for i, x in enumerate(v):
                if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x):
                    yield f"{tag}/{i:02d}", float(x)
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            yield tag, float(v)


class Progress:
    """Progress bar on stderr (``\\r``-redrawn on a TTY, one line per ~10% otherwise)."""

    def __init__(self, total: int, enabled: bool = True, stream=None, start: int = 0):
        self.total, self.enabled, self.start = total, enabled, start
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.t0 = time.perf_counter()
        self._next_line = start

    def update(self, done: int, info: str) -> None:
        if not self.enabled:
            return
        el = time.perf_counter() - self.t0
        eta = el / max(done - self.start, 1) * (self.total - done)
        frac = done / self.total
        if self.tty:
            bar = "#" * int(24 * frac) + "-" * (24 - int(24 * frac))
            self.stream.write(f"\r[{bar}] {done}/{self.total} {el:5.1f}s eta {eta:5.1f}s  {info}   ")
            if done == self.total:
                self.stream.write("\n")
            self.stream.flush()
        elif done >= self._next_line or done == self.total:
            self.stream.write(f"epoch {done}/{self.total} ({el:.1f}s) {info}\n")
            self.stream.flush()
            self._next_line = done + max(1, self.total // 10)
