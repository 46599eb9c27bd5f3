"""Periodic checkpoints and the checks that make ``--resume`` exact.

A checkpoint is a folder ``<out>/checkpoints/epoch-NNNNNN/`` holding

* ``state.pt`` — :meth:`Trainer.state_dict`: trained parameters, optimizer, scheduler, every RNG
  (the trainer's generator, torch's global one), EMA, allocator state and profile, NFE counters,
  phase clock, skipped count, the log position, the (redacted) config and the code version;
* ``lora/`` — the adapter as ``load_lora_weights`` reads it (EMA weights when EMA is on), for
  image models;
* ``meta.json`` — epoch, time, code version (for people and tools; never read back).

It is written into a ``.tmp-*`` folder and renamed into place (one atomic ``rename``), so a kill
inside a write leaves the previous checkpoint intact and a temp folder the next open removes.
The newest ``train.keep_checkpoints`` are kept.

A checkpoint from a different code version or config is refused with one line naming what
differs. Fields that do not change the trajectory of the run (:data:`RESUMABLE`) may differ.
"""
from __future__ import annotations

import hashlib
import importlib.resources
import json
import os
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from .rundir import FILE_MODE, RunDir, fsync_dir

FORMAT = 2
CKPT_DIR = "checkpoints"
SHARDS = "sharded"          # FSDP2: the parameters, optimizer and EMA as torch.distributed.checkpoint shards
_NAME = re.compile(r"^epoch-(\d{6,})$")
# may differ between the run and its resume: they change no number the run computes
RESUMABLE = {"train.checkpoint_every", "train.keep_checkpoints", "train.eval_every", "train.threads",
             "task.reward_timeout", "task.reward_retries", "task.reward_max_mb", "task.reward_auth",
             "task.reward_auth_env", "train.dist_timeout", "train.dist_backend", "task.text_cache",
             "task.offload", "task.vae_slicing", "policy.attention", "policy.gradient_checkpointing"}


class ResumeError(ValueError):
    """A checkpoint cannot continue this run (one-line message)."""


# ----------------------------------------------------------------------------------------------
# code version
# ----------------------------------------------------------------------------------------------
def _package_files() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for pkg in ("rsm_fast", "rsm_fast.kernels", "rsm_fast.csrc"):
        root = Path(str(importlib.resources.files(pkg)))
        for p in sorted(root.rglob("*")):
            if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".so", ".o"):
                out[f"{pkg}/{p.relative_to(root).as_posix()}"] = p
    return out


_VERSION_CACHE: dict[str, Any] = {}


def code_files() -> dict[str, str]:
    """sha256 (16 hex) of every file of the installed package (sources, kernels, presets, assets)."""
    if "files" not in _VERSION_CACHE:
        _VERSION_CACHE["files"] = {k: hashlib.sha256(p.read_bytes()).hexdigest()[:16]
                                   for k, p in _package_files().items()}
    return _VERSION_CACHE["files"]


def code_version() -> str:
    files = code_files()
    h = hashlib.sha256("".join(f"{k}={v}\n" for k, v in sorted(files.items())).encode())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# compatibility
# ----------------------------------------------------------------------------------------------
def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_diff(saved: dict, current: dict, allowed: set[str] = RESUMABLE) -> list[tuple[str, Any, Any]]:
    """``(field, saved value, current value)`` for every field that differs and may not."""
    a, b = _flat(saved), _flat(current)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if k not in allowed and k not in ("description",) and a.get(k) != b.get(k)]


def check_compatible(state: dict, config: dict, where: str) -> None:
    """Raise :class:`ResumeError` naming the first config field or code file that differs."""
    if state.get("format") != FORMAT:
        raise ResumeError(f"{where}: checkpoint format {state.get('format')!r} is not {FORMAT} (written by another "
                          "rsm_fast version); start a new run")
    diff = config_diff(state["config"], config)
    if diff:
        k, old, new = diff[0]
        more = f" (and {len(diff) - 1} more)" if len(diff) > 1 else ""
        raise ResumeError(f"{where}: the checkpoint was written with {k}={old!r}, this run has {k}={new!r}{more}; "
                          "resume with the run's own config or start a new run")
    saved_files, now = state.get("code_files", {}), code_files()
    if state.get("code_version") != code_version():
        changed = sorted(k for k in set(saved_files) | set(now) if saved_files.get(k) != now.get(k))
        names = ", ".join(c.split("/", 1)[-1] for c in changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
        msg = f"{where}: the checkpoint was written by other rsm_fast code (changed: {names})"
        if os.environ.get("RSM_FAST_RESUME_ANY_CODE", "") == "1":
            warnings.warn(f"{msg}; resuming anyway (RSM_FAST_RESUME_ANY_CODE=1): the run may differ from an "
                          "uninterrupted one", stacklevel=2)
            return
        raise ResumeError(f"{msg}; resume with the code that started the run, start a new run, or set "
                          "RSM_FAST_RESUME_ANY_CODE=1 to accept the difference")


# ----------------------------------------------------------------------------------------------
# the checkpoints folder
# ----------------------------------------------------------------------------------------------
def checkpoint_dirs(run: Path) -> list[Path]:
    """Complete checkpoints of ``run``, oldest first."""
    d = Path(run) / CKPT_DIR
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name)) and (p / "state.pt").is_file()]
    return [p for _, p in sorted(found)]


def load_state(path: Path) -> dict:
    """``state.pt`` of one checkpoint folder (tensors on the CPU; no pickled code is executed)."""
    state = torch.load(Path(path) / "state.pt", map_location="cpu", weights_only=True)
    state["_dir"] = str(Path(path))      # where an FSDP2 checkpoint's shards are (sharded/)
    return state


def latest(run: Path, warn: Callable[[str], None] | None = None) -> tuple[Path, dict] | None:
    """The newest checkpoint of ``run`` that loads (an unreadable one is reported and skipped)."""
    for p in reversed(checkpoint_dirs(run)):
        try:
            state = load_state(p)
            if state.get("sharded") and not (p / SHARDS / ".metadata").is_file():
                raise FileNotFoundError(f"{p / SHARDS}/.metadata")
            return p, state
        except Exception as e:  # noqa: BLE001 - a damaged file: fall back to the one before
            if warn is not None:
                warn(f"checkpoint {p} is unreadable ({type(e).__name__}); trying the one before")
    return None


def save(run_dir: RunDir, epoch: int, state: dict, keep: int, export: Callable[[Path], Any] | None = None,
         fault: Callable[[str], None] | None = None, shards: Path | None = None) -> Path:
    """Write checkpoint ``epoch`` atomically (see the module docstring); prune to ``keep``.
    ``shards``: a folder of ``torch.distributed.checkpoint`` shards (FSDP2) moved in as ``sharded/``."""
    root = run_dir.path / CKPT_DIR
    run_dir.own(CKPT_DIR)
    root.mkdir(exist_ok=True)
    final = root / f"epoch-{epoch:06d}"
    tmp = root / f".tmp-epoch-{epoch:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        with open(tmp / "state.pt", "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        if fault is not None:
            fault("checkpoint-write")
        if shards is not None:
            os.replace(shards, tmp / SHARDS)
        if export is not None:
            export(tmp / "lora")
        meta = {"epoch": epoch, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "code_version": state.get("code_version"),
                "log_bytes": state.get("run", {}).get("log_bytes")}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        for p in tmp.rglob("*"):
            if p.is_file():
                os.chmod(p, FILE_MODE)
        fsync_dir(tmp)
        if final.exists():      # the same epoch saved again (a stop right after a periodic save)
            old = root / f".tmp-old-{epoch:06d}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for p in checkpoint_dirs(run_dir.path)[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
    return final
