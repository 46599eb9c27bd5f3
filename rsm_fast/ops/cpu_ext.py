"""The C++ CPU kernels (``csrc/``), JIT-built on first use with torch's cpp_extension.

``load()`` returns the compiled module (functions ``zo_fwd``, ``zo_bwd``, ``score_fwd``,
``score_bwd``, ``step_fwd`` with the signatures of :mod:`rsm_fast.ops.decomposed`, ``fp_fwd`` /
``fp_bwd`` with those of :mod:`rsm_fast.ops.decomposed_fp`, and the noise kernels
``philox_normal`` / ``philox_words`` of :mod:`rsm_fast.ops.philox`) or None, after
one one-line warning, when no compiler is found, the build fails or ``RSM_FAST_NO_CPP=1``.

Builds (``build_extension``) go to ``<root>/<name>-<key>/`` where root is torch's extensions folder
(``TORCH_EXTENSIONS_DIR`` when set) and key hashes everything that determines the binary: the
sources' and headers' bytes, torch (version, git hash, C++ ABI, CUDA/HIP), Python (cache tag, ABI
suffix), the flags, the compiler (``$CXX``, its resolved path, its ``--version`` line) and the
platform. Installs of the same code at different paths share one build; different code never
touches another's folder. The sources are copied into ``<folder>/src`` and built from there.

A build holds ``<folder>/build.lock`` (``fcntl.flock``; the kernel drops it when the holder dies).
Another process waits for it (one line on stderr) up to ``RSM_FAST_BUILD_LOCK_TIMEOUT`` seconds
(default 600), then gives up (the fallback runs). Under the lock, what a killed build left behind
is cleared: its still-running compiler processes are waited for and torch's ``lock`` file (which
would make torch wait forever) is removed, each with one line. Every build that compiles says so in
one line; a finished build (``BUILD_OK`` in its folder) is imported directly, without a lock or ninja.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.resources
import importlib.util
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import threading
import time
import warnings
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: no lock of ours (torch's own baton still applies)
    fcntl = None

NAME = "rsm_fast_cpu_ops"
SOURCES = ("rsm_ops.cpp", "rsm_zo.cpp", "rsm_fp.cpp", "rsm_noise.cpp")
HEADERS = ("rsm_ops.h", "rsm_ops_detail.h")
# -fopenmp: at::parallel_for is OpenMP-backed in torch's CPU wheels (the runtime is torch's libgomp).
# -fno-trapping-math lets the compiler turn the bf16/fp16 conversions' selects into vector code; it
# changes no result (nothing here reads floating-point exception flags).
CFLAGS = ["-O3", "-fopenmp", "-fno-trapping-math"]
LDFLAGS = ["-fopenmp"]

LOCK_TIMEOUT_ENV = "RSM_FAST_BUILD_LOCK_TIMEOUT"
DEFAULT_LOCK_TIMEOUT = 600.0
LOCK_FILE = "build.lock"  # ours; torch's FileBaton uses "lock" in the same folder
DONE_FILE = "BUILD_OK"
_POLL_S = 0.2
# argv[0] basenames of the build tools a killed build may leave running in its folder
_TOOL_RE = re.compile(r"(?:^|-)(?:ninja|c\+\+|g\+\+|gcc|cc|cc1|cc1plus|as|ld(?:\.\w+)?|collect2|lto1|lto-wrapper"
                      r"|clang|clang\+\+|ccache|sccache)(?:-\d+(?:\.\d+)*)?$")

_lock = threading.Lock()  # load()
_build_mutex = threading.Lock()  # build_extension(), within one process
_cache: dict = {}
_compilers: dict = {}


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def lock_timeout() -> float:
    """Seconds to wait for another process's build (``RSM_FAST_BUILD_LOCK_TIMEOUT``, default 600)."""
    raw = os.environ.get(LOCK_TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_LOCK_TIMEOUT
    try:
        return max(0.0, float(raw))
    except ValueError:
        raise RuntimeError(f"{LOCK_TIMEOUT_ENV}={raw!r} is not a number of seconds") from None


def compiler() -> dict:
    """``$CXX`` (default ``c++``), its resolved path and the first line of its ``--version``."""
    cxx = os.environ.get("CXX", "c++")
    if cxx not in _compilers:
        argv = shlex.split(cxx) or ["c++"]
        path = shutil.which(argv[0])
        if path is None:
            raise RuntimeError(f"no C++ compiler {cxx!r} found")
        try:
            out = subprocess.run(argv + ["--version"], capture_output=True, text=True, timeout=60).stdout
        except (OSError, subprocess.SubprocessError) as e:
            raise RuntimeError(f"C++ compiler {cxx!r} does not run: {e}") from None
        _compilers[cxx] = {"cxx": cxx, "path": os.path.realpath(path),
                           "version": (out.strip().splitlines() or ["?"])[0]}
    return _compilers[cxx]


def extensions_root() -> str:
    """torch's extensions folder: ``TORCH_EXTENSIONS_DIR``, else its per-Python/accelerator default."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return os.path.abspath(root)
    import torch
    from torch.utils import cpp_extension

    acc = (f"rocm{torch.version.hip.replace('.', '')}" if torch.version.hip else
           f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu")
    py = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return os.path.join(cpp_extension.get_default_build_root(), f"{py}_{acc}")


def _read(paths) -> dict:
    """{basename: bytes} of source/header paths (str, Path or importlib Traversable), in order."""
    out = {}
    for p in paths:
        p = p if hasattr(p, "read_bytes") else Path(p)
        if p.name in out:
            raise ValueError(f"two files named {p.name!r}: the build copies them into one folder")
        out[p.name] = p.read_bytes()
    return out


def build_key(name: str, sources: dict, headers: dict, cflags, ldflags) -> tuple[str, dict]:
    """(16-hex key, its ingredients) for the files' bytes ({basename: bytes}) and the flags."""
    import torch

    sha = lambda files: [[n, hashlib.sha256(b).hexdigest()] for n, b in files.items()]  # noqa: E731
    ingredients = {
        "format": 1, "name": name, "sources": sha(sources), "headers": sha(headers),
        "cflags": list(cflags), "ldflags": list(ldflags),
        "torch": torch.__version__, "torch_git": getattr(torch.version, "git_version", None),
        "cxx11_abi": bool(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", False)),
        "cuda": torch.version.cuda, "hip": torch.version.hip,
        "python": sys.implementation.cache_tag, "ext_suffix": sysconfig.get_config_var("EXT_SUFFIX"),
        "abiflags": getattr(sys, "abiflags", ""),
        "compiler": compiler(), "platform": sysconfig.get_platform(), "machine": platform.machine(),
    }
    blob = json.dumps(ingredients, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16], ingredients


def build_folder(name: str, sources, headers=(), cflags=(), ldflags=()) -> str:
    """The keyed build folder ``<extensions root>/<name>-<key>`` (nothing is built or created)."""
    key, _ = build_key(name, _read(sources), _read(headers), cflags, ldflags)
    return os.path.join(extensions_root(), f"{name}-{key}")


def _holder(path: str) -> str:
    try:
        with open(path) as f:
            pid = f.read().split()[0]
        return f"pid {pid}" if pid.isdigit() else "unknown holder"
    except (OSError, IndexError):
        return "unknown holder"


@contextlib.contextmanager
def build_lock(folder: str, timeout: float, what: str = "the extension"):
    """Hold ``<folder>/build.lock`` exclusively; wait up to ``timeout`` s (one line), else TimeoutError."""
    path = os.path.join(folder, LOCK_FILE)
    if fcntl is None:
        yield path
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline, said = time.monotonic() + timeout, False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"timed out after {timeout:g} s waiting for the build lock {path} "
                                       f"({_holder(path)}; {LOCK_TIMEOUT_ENV} sets the wait)") from None
                if not said:
                    _say(f"rsm_fast: waiting for another build of {what} ({_holder(path)}) holding {path} "
                         f"(up to {timeout:g} s, {LOCK_TIMEOUT_ENV}) ...")
                    said = True
                time.sleep(_POLL_S)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {platform.node()} {time.strftime('%Y-%m-%dT%H:%M:%S')}\n".encode(), 0)
        try:
            yield path
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _leftover_tools(folder: str) -> list:
    """pids of build tools (ninja, compiler, linker) still running in ``folder`` (Linux /proc)."""
    real, pids = os.path.realpath(folder), []
    if not os.path.isdir("/proc"):
        return pids
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            if os.readlink(f"/proc/{entry}/cwd") != real:
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv0 = f.read().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        if _TOOL_RE.search(os.path.basename(argv0)):
            pids.append(int(entry))
    return sorted(pids)


def _clear_leftovers(folder: str, deadline: float) -> None:
    """Wait for a killed build's orphaned tools, then remove torch's stale ``lock`` (we hold ours)."""
    said = False
    while pids := _leftover_tools(folder):
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out waiting for leftover build processes {pids} in {folder}")
        if not said:
            _say(f"rsm_fast: waiting for {len(pids)} leftover build process(es) of a killed build in {folder} "
                 f"(pids {' '.join(map(str, pids))}) ...")
            said = True
        time.sleep(_POLL_S)
    stale = os.path.join(folder, "lock")
    if os.path.exists(stale):
        os.remove(stale)
        _say(f"rsm_fast: removed the stale torch build lock {stale} (left by a killed build)")


def _write_if_changed(path: str, data: bytes) -> None:
    """Leave an identical file (and its mtime) alone, so ninja does not recompile it."""
    try:
        with open(path, "rb") as f:
            if f.read() == data:
                return
    except OSError:
        pass
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _import(modname: str, so: str):
    spec = importlib.util.spec_from_file_location(modname, so)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {so}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def build_extension(name: str, sources, headers=(), cflags=(), ldflags=(), *, what: str | None = None,
                    note: str = "", timeout: float | None = None):
    """Build (or load the cached build of) a torch C++ extension in its keyed folder; see the module doc.

    ``sources``/``headers``: paths with distinct basenames (headers are included by basename);
    ``what``/``note`` word the one-line compile message; ``timeout`` defaults to ``lock_timeout()``.
    """
    import torch  # noqa: F401 - the extension links libtorch: load it first

    with _build_mutex:
        return _build_extension(name, _read(sources), _read(headers), list(cflags), list(ldflags), what, note, timeout)


def _build_extension(name, srcs, hdrs, cflags, ldflags, what, note, timeout):
    key, ingredients = build_key(name, srcs, hdrs, cflags, ldflags)
    modname = f"{name}_{key}"  # unique per key: two keys coexist in one process, torch never renames
    if modname in _cache:
        return _cache[modname]
    folder = os.path.join(extensions_root(), f"{name}-{key}")
    so, done = os.path.join(folder, f"{modname}.so"), os.path.join(folder, DONE_FILE)
    built = lambda: os.path.exists(done) and os.path.exists(so)  # noqa: E731
    what = what or f"the C++ extension {name}"
    if not built():
        timeout = lock_timeout() if timeout is None else timeout
        os.makedirs(folder, exist_ok=True)
        with build_lock(folder, timeout, what):
            if not built():
                _cache[modname] = _compile(modname, folder, srcs, hdrs, cflags, ldflags, ingredients,
                                           what, note, time.monotonic() + timeout)
                return _cache[modname]
    _cache[modname] = _import(modname, so)
    return _cache[modname]


def _compile(modname, folder, srcs, hdrs, cflags, ldflags, ingredients, what, note, deadline):
    """The build proper; the caller holds the folder's lock."""
    from torch.utils import cpp_extension

    done = os.path.join(folder, DONE_FILE)
    with contextlib.suppress(FileNotFoundError):
        os.remove(done)
    _clear_leftovers(folder, deadline)
    src_dir = os.path.join(folder, "src")
    os.makedirs(src_dir, exist_ok=True)
    for fname, data in {**hdrs, **srcs}.items():
        _write_if_changed(os.path.join(src_dir, fname), data)
    _write_if_changed(os.path.join(folder, "key.json"), json.dumps(ingredients, indent=1, sort_keys=True).encode())
    _say(f"rsm_fast: compiling {what} in {folder} ({note + '; ' if note else ''}cached afterwards) ...")
    t0 = time.monotonic()
    mod = cpp_extension.load(name=modname, sources=[os.path.join(src_dir, s) for s in srcs],
                             extra_include_paths=[src_dir], extra_cflags=list(cflags), extra_ldflags=list(ldflags),
                             build_directory=folder, verbose=False)
    _write_if_changed(done, f"built in {time.monotonic() - t0:.1f} s by pid {os.getpid()}\n".encode())
    return mod


def _build():
    if os.environ.get("RSM_FAST_NO_CPP", "") == "1":
        raise RuntimeError("RSM_FAST_NO_CPP=1")
    compiler()  # a missing compiler fails here, with its own message
    src = importlib.resources.files("rsm_fast.csrc")
    return build_extension(NAME, [src / f for f in SOURCES], [src / h for h in HEADERS], CFLAGS, LDFLAGS,
                           what="the C++ CPU ops", note="about a minute on 2 cores")


def load():
    """The compiled module, or None (with one warning per process) when it cannot be built."""
    with _lock:
        if "mod" not in _cache:
            try:
                _cache["mod"] = _build()
            except Exception as e:  # noqa: BLE001 - any build failure means: use the fallback
                lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
                # a compiler error reads best as its first "error:" line, not the ninja command line
                reason = next((ln for ln in lines if "error:" in ln), lines[0])[:300]
                warnings.warn(f"rsm_fast: C++ CPU ops unavailable ({reason}); using the PyTorch fallback", stacklevel=2)
                _cache["mod"] = None
        return _cache["mod"]


def available() -> bool:
    return load() is not None
