"""Accounting and run-directory I/O at the edges of the trainer.

* :class:`PhaseClock` — wall-clock by phase (rollout / reward / train / eval).
* :class:`RunDir` — the run directory: refuses to clobber an existing run, writes the per-epoch
  JSONL log line by line, and writes ``summary.json``, ``config.yaml`` and checkpoints
  atomically (temp file + ``os.replace``), so an interrupted or failed run never leaves a
  half-written file behind. With ``tensorboard=True`` every logged number (and each per-step
  diagnostic as ``per_step/<name>/<step>``) also goes to TensorBoard event files under ``tb/``.
* :class:`Progress` — a one-line progress bar on a terminal, periodic lines otherwise.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import yaml


class RunDirError(ValueError):
    """The run directory cannot be used (one-line message)."""


class PhaseClock:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t0

    def snapshot(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in self.seconds.items()}


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    _atomic_write(Path(path), lambda fh: fh.write(text.encode()))


def atomic_torch_save(path: Path, obj: Any) -> None:
    _atomic_write(Path(path), lambda fh: torch.save(obj, fh))


class RunDir:
    MARKERS = ("summary.json", "log.jsonl", "checkpoint.pt")

    def __init__(self, path: str | Path, overwrite: bool = False, tensorboard: bool = False):
        self.path = Path(path)
        if tensorboard:       # fail before anything is written, with the fix in the message
            try:
                from torch.utils.tensorboard import SummaryWriter  # noqa: F401
            except ImportError:
                raise RunDirError("--tensorboard needs the tensorboard package: pip install 'rsm_fast[viz]'") from None
        self._tensorboard, self._tb = tensorboard, None
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"--out '{self.path}' exists and is not a directory")
        existing = [m for m in self.MARKERS if (self.path / m).exists()]
        if existing and not overwrite:
            raise RunDirError(f"--out '{self.path}' already holds a run ({existing[0]}); "
                              "choose another directory or pass --overwrite")
        self._overwrite = overwrite
        self._log = None

    def open(self, config: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        if self._overwrite:
            for m in self.MARKERS:
                (self.path / m).unlink(missing_ok=True)
            shutil.rmtree(self.path / "tb", ignore_errors=True)
        atomic_write_text(self.path / "config.yaml", yaml.safe_dump(config, sort_keys=False))
        self._log = open(self.path / "log.jsonl", "a", buffering=1)
        if self._tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(str(self.path / "tb"))

    def log(self, record: dict) -> None:
        self._log.write(json.dumps(record) + "\n")
        if self._tb is not None:
            step = int(record.get("epoch", 0))
            for tag, v in scalars(record):
                self._tb.add_scalar(tag, v, step)

    def write_summary(self, summary: dict) -> None:
        atomic_write_text(self.path / "summary.json", json.dumps(summary, indent=2) + "\n")

    def save_checkpoint(self, state: dict) -> None:
        atomic_torch_save(self.path / "checkpoint.pt", state)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._log is not None:
            self._log.close()
            self._log = None


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

    def __init__(self, total: int, enabled: bool = True, stream=None):
        self.total, self.enabled = total, enabled
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.t0 = time.perf_counter()
        self._next_line = 0

    def update(self, done: int, info: str) -> None:
        if not self.enabled:
            return
        el = time.perf_counter() - self.t0
        eta = el / max(done, 1) * (self.total - done)
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
