"""The run directory: one run's outputs, owned by one process at a time.

Layout (every file written atomically: temp file + ``fsync`` + ``os.replace``)::

    <out>/.lock              exclusive flock for the run's lifetime (holder's pid inside)
    <out>/.rsm_fast_run.json the entries this run created (``--overwrite`` touches only these)
    <out>/config.yaml        the resolved config (secrets redacted)
    <out>/log.jsonl          one strict-JSON record per epoch (non-finite numbers as null)
    <out>/checkpoints/epoch-NNNNNN/{state.pt, lora/, meta.json}   periodic checkpoints
    <out>/checkpoint.pt, lora/, summary.json                          at the end
    <out>/tb/, plots/        TensorBoard events and figures when asked for

* **Lock.** ``fcntl.flock`` on ``.lock``: the kernel drops it when the holder dies, so a killed
  run never blocks the next one (a stale lock is one whose pid no longer holds the flock); a live
  holder is named in the one-line error.
* **Overwrite.** ``--overwrite`` moves the old run's own entries into ``.previous-run/`` and
  deletes them only once the new run has written its first checkpoint; a new run that fails
  before that puts the old run back. A ``tb/`` folder is removed only when this project made it.
* **Temp files** of a write that a kill interrupted (``.<name>.*.tmp``, ``.tmp-*`` checkpoint
  folders) are removed when the directory is opened.
* **File mode**: every output gets ``0o666 & ~umask`` (what ``open()`` gives), also the files
  written through ``mkstemp`` (which creates them ``0o600``).
"""
from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import torch


class RunDirError(ValueError):
    """The run directory cannot be used (one-line message)."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()
PREVIOUS = ".previous-run"
MANIFEST = ".rsm_fast_run.json"
LOCK = ".lock"
# entries a run of this project writes; older runs without a manifest own these (never tb/)
DEFAULT_OWNED = ("config.yaml", "log.jsonl", "summary.json", "checkpoint.pt", "checkpoints", "lora", "plots")
MARKERS = ("summary.json", "log.jsonl", "checkpoint.pt", "checkpoints")


# ----------------------------------------------------------------------------------------------
# strict JSON and atomic writes
# ----------------------------------------------------------------------------------------------
def strict(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by ``None`` (JSON has no NaN/inf)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    return obj


def dumps(obj: Any, **kw) -> str:
    return json.dumps(strict(obj), allow_nan=False, **kw)


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    _atomic_write(Path(path), lambda fh: fh.write(text.encode()))


def atomic_torch_save(path: Path, obj: Any) -> None:
    _atomic_write(Path(path), lambda fh: torch.save(obj, fh))


def _remove(p: Path) -> None:
    """Delete a file, a link or a whole folder."""
    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)


def _is_temp(name: str) -> bool:
    return (name.startswith(".") and name.endswith(".tmp")) or name.startswith(".tmp-")


def remove_temp_files(root: Path) -> list[Path]:
    """Delete what an interrupted atomic write left under ``root`` (two levels deep)."""
    gone = []
    for d in (root, root / "checkpoints"):
        if not d.is_dir():
            continue
        for p in d.iterdir():
            if _is_temp(p.name):
                _remove(p)
                gone.append(p)
    return gone


def _check_path(path: Path) -> None:
    """One line for a ``--out`` that cannot be a directory: under a file, too long, not writable."""
    s = str(path)
    if "\x00" in s:
        raise RunDirError("--out contains a NUL character")
    try:
        name_max = os.pathconf(path.anchor or "/", "PC_NAME_MAX")
        path_max = os.pathconf(path.anchor or "/", "PC_PATH_MAX")
    except (OSError, ValueError):
        name_max, path_max = 255, 4096
    if len(os.fsencode(path.absolute())) >= path_max:
        raise RunDirError(f"--out '{s[:60]}...' is longer than the system's path limit ({path_max} bytes)")
    for part in path.parts:
        if len(os.fsencode(part)) > name_max:
            raise RunDirError(f"--out has a path component longer than {name_max} bytes ('{part[:40]}...')")
    if path.exists() and not path.is_dir():
        raise RunDirError(f"--out '{s}' exists and is not a directory")
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise RunDirError(f"--out '{s}' is under '{parent}', which is a file")
    probe = path if path.is_dir() else parent
    if not os.access(probe, os.W_OK | os.X_OK):
        raise RunDirError(f"--out '{s}': directory '{probe}' is not writable")


# ----------------------------------------------------------------------------------------------
class RunDir:
    """A run directory (see the module docstring). ``resume=True`` opens an existing run in place."""

    MARKERS = MARKERS

    def __init__(self, path: str | Path, overwrite: bool = False, tensorboard: bool = False, resume: bool = False):
        self.path = Path(path)
        if tensorboard:       # fail before anything is written, with the fix in the message
            try:
                from torch.utils.tensorboard import SummaryWriter  # noqa: F401
            except ImportError:
                raise RunDirError("--tensorboard needs the tensorboard package: pip install 'rsm_fast[viz]'") from None
        _check_path(self.path)
        self._tensorboard, self._tb = tensorboard, None
        self._overwrite, self.resume = overwrite, resume
        existing = self.existing_markers()
        if existing and not (overwrite or resume):
            hint = " (an interrupted --overwrite left the old run in .previous-run)" if (self.path / PREVIOUS).exists() else ""
            raise RunDirError(f"--out '{self.path}' already holds a run ({existing[0]}){hint}; continue it with "
                              f"--resume {self.path}, choose another directory or pass --overwrite")
        if resume and not (self.path / "config.yaml").is_file():
            raise RunDirError(f"--resume '{self.path}': no run there (no config.yaml)")
        self._log = None
        self._lock_fd: int | None = None
        self._created_dir = False
        self._staged = False          # the old run sits in .previous-run until our first checkpoint
        self._owned: set[str] = set()

    def existing_markers(self) -> list[str]:
        return [m for m in self.MARKERS if (self.path / m).exists()]

    # -- lock ----------------------------------------------------------------------------------
    def lock(self) -> None:
        """Create the directory if needed and take its exclusive lock (one line if another live
        process holds it)."""
        if self._lock_fd is not None:
            return
        try:
            if not self.path.exists():
                self.path.mkdir(parents=True)
                self._created_dir = True
            fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, FILE_MODE)
        except OSError as e:
            raise RunDirError(f"--out '{self.path}': {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").split()
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                who = f"pid {holder[0]}" if holder else "another process"
                raise RunDirError(f"--out '{self.path}' is in use by {who} (another rsm_fast run); "
                                  "wait for it to finish or choose another directory") from None
            raise RunDirError(f"--out '{self.path}': cannot lock ({e.strerror or e})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()} {time.strftime('%Y-%m-%dT%H:%M:%S')}\n".encode(), 0)
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)           # releases the flock; the file stays (harmless)
            self._lock_fd = None

    # -- open / close --------------------------------------------------------------------------
    def open(self, config: dict, log_bytes: int | None = None) -> None:
        """Lock, clean temp files, stage an overwritten run, write ``config.yaml`` (not when
        resuming) and open the log; ``log_bytes``: resume, truncate the log to this length (the
        checkpoint's position) so every epoch appears once."""
        import yaml

        self.lock()
        remove_temp_files(self.path)
        self._owned = set(self._read_manifest())
        self._finish_previous()
        if self._overwrite and not self.resume:
            self._stage_previous()
        if not self.resume:
            self._own("config.yaml", "log.jsonl")
            atomic_write_text(self.path / "config.yaml", yaml.safe_dump(config, sort_keys=False))
            (self.path / "log.jsonl").unlink(missing_ok=True)
        log = self.path / "log.jsonl"
        if log_bytes is not None:
            size = log.stat().st_size if log.exists() else 0
            if size < log_bytes:
                raise RunDirError(f"--resume '{self.path}': log.jsonl holds {size} bytes, the checkpoint expects "
                                  f"{log_bytes}; the run directory was modified")
            with open(log, "r+b") as fh:
                fh.truncate(log_bytes)
        elif self.resume:
            log.unlink(missing_ok=True)    # no checkpoint yet: the run restarts from epoch 0
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE)
        self._log = os.fdopen(fd, "a", buffering=1, encoding="utf-8")
        if self._tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            tb = self.path / "tb"
            if not tb.exists():
                self._own("tb")
            # purge_step: on resume TensorBoard drops the events of epochs after the checkpoint
            self._tb = SummaryWriter(str(tb), purge_step=None if log_bytes is None else self._lines(log))

    @staticmethod
    def _lines(path: Path) -> int:
        with open(path, "rb") as fh:
            return sum(1 for _ in fh)

    def close(self, ok: bool = True) -> None:
        """Close the log and release the lock. ``ok=False`` before the first checkpoint of an
        overwrite puts the old run back; a directory this run created and left empty is removed."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._staged and not ok:
            self._restore_previous()
        if self._created_dir and self._lock_fd is not None and not self.has_checkpoint():
            # a directory this run made and that holds nothing a person could want (no epoch logged)
            entries = {p.name for p in self.path.iterdir()} - {LOCK, MANIFEST}
            log = self.path / "log.jsonl"
            empty_log = not log.exists() or log.stat().st_size == 0
            if not entries or (not ok and entries <= {"config.yaml", "log.jsonl"} and empty_log):
                self.unlock()
                shutil.rmtree(self.path, ignore_errors=True)
                return
        self.unlock()

    # -- ownership / overwrite -----------------------------------------------------------------
    def _read_manifest(self) -> list[str]:
        try:
            data = json.loads((self.path / MANIFEST).read_text())
            return [str(x) for x in data.get("owned", [])]
        except (OSError, ValueError, AttributeError):
            return [n for n in DEFAULT_OWNED if (self.path / n).exists()]

    def _own(self, *names: str) -> None:
        new = set(names) - self._owned
        if new:
            self._owned |= new
            atomic_write_text(self.path / MANIFEST, json.dumps({"owned": sorted(self._owned)}) + "\n")

    def has_checkpoint(self) -> bool:
        ck = self.path / "checkpoints"
        return (self.path / "checkpoint.pt").exists() or (ck.is_dir() and any(p.name.startswith("epoch-")
                                                                                for p in ck.iterdir()))

    def _finish_previous(self) -> None:
        """A ``.previous-run`` left by a killed overwrite: dropped once the new run has a checkpoint."""
        prev = self.path / PREVIOUS
        if prev.exists() and self.has_checkpoint():
            shutil.rmtree(prev, ignore_errors=True)

    def _stage_previous(self) -> None:
        prev = self.path / PREVIOUS
        if prev.exists():
            # an earlier overwrite never reached its first checkpoint: drop its partial files, keep
            # the run it replaced
            for n in self._owned:
                _remove(self.path / n)
        else:
            names = [n for n in self._owned if (self.path / n).exists() or (self.path / n).is_symlink()]
            if names:
                prev.mkdir()
                for n in names:
                    os.replace(self.path / n, prev / n)
                if (self.path / MANIFEST).exists():
                    shutil.copy2(self.path / MANIFEST, prev / MANIFEST)
                fsync_dir(self.path)
        self._owned = set()
        (self.path / MANIFEST).unlink(missing_ok=True)
        self._staged = prev.exists()

    def _restore_previous(self) -> None:
        prev = self.path / PREVIOUS
        for n in self._owned:
            _remove(self.path / n)
        (self.path / MANIFEST).unlink(missing_ok=True)
        for p in prev.iterdir():
            os.replace(p, self.path / p.name)
        prev.rmdir()
        self._staged = False

    def committed(self) -> None:
        """The new run has its first checkpoint: the overwritten run can go."""
        if self._staged:
            shutil.rmtree(self.path / PREVIOUS, ignore_errors=True)
            self._staged = False

    # -- writing -------------------------------------------------------------------------------
    def log(self, record: dict) -> None:
        from .runlog import scalars

        self._log.write(dumps(record) + "\n")
        if self._tb is not None:
            step = int(record.get("epoch", 0))
            for tag, v in scalars(record):
                self._tb.add_scalar(tag, v, step)

    def log_position(self) -> int:
        """Bytes of ``log.jsonl`` on disk, after a flush and fsync (a checkpoint's log position)."""
        self._log.flush()
        os.fsync(self._log.fileno())
        if self._tb is not None:
            self._tb.flush()
        return os.fstat(self._log.fileno()).st_size

    def write_summary(self, summary: dict) -> None:
        self._own("summary.json")
        atomic_write_text(self.path / "summary.json", dumps(summary, indent=2) + "\n")

    def save_checkpoint(self, state: dict) -> None:
        self._own("checkpoint.pt")
        atomic_torch_save(self.path / "checkpoint.pt", state)

    def own(self, *names: str) -> None:
        """Record entries (``checkpoints``, ``lora``, ``plots``) as this run's."""
        self._own(*names)


_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def default_out(preset: str, root: str | Path = "runs") -> Path:
    """``runs/<preset>-<time>`` with the preset reduced to safe characters (a preset name from a
    config file can never lead outside ``runs/``); ``-2``, ``-3``... when that folder exists."""
    name = _SAFE.sub("_", str(preset)).strip("._-")[:80] or "custom"
    base = Path(root) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    out, i = base, 1
    while out.exists():
        i += 1
        out = base.with_name(f"{base.name}-{i}")
    return out
