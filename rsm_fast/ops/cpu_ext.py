"""The C++ CPU kernels (``csrc/``), JIT-built on first use with torch's cpp_extension.

``load()`` returns the compiled module (functions ``zo_fwd``, ``zo_bwd``, ``score_fwd``,
``score_bwd``, ``step_fwd`` with the signatures of :mod:`rsm_fast.ops.decomposed`, and the noise
kernels ``philox_normal`` / ``philox_words`` of :mod:`rsm_fast.ops.philox`) or None, after
one one-line warning, when no compiler is found, the build fails or ``RSM_FAST_NO_CPP=1``. The build
lands in torch's extensions folder (``TORCH_EXTENSIONS_DIR`` when set) and is reused across processes.
"""
from __future__ import annotations

import hashlib
import importlib.resources
import os
import shutil
import sys
import threading
import warnings

NAME = "rsm_fast_cpu_ops"
SOURCES = ("rsm_ops.cpp", "rsm_zo.cpp", "rsm_noise.cpp")
HEADERS = ("rsm_ops.h", "rsm_ops_detail.h")
# -fopenmp: at::parallel_for is OpenMP-backed in torch's CPU wheels (the runtime is torch's libgomp).
# -fno-trapping-math lets the compiler turn the bf16/fp16 conversions' selects into vector code; it
# changes no result (nothing here reads floating-point exception flags).
CFLAGS = ["-O3", "-fopenmp", "-fno-trapping-math"]
LDFLAGS = ["-fopenmp"]

_lock = threading.Lock()
_cache: dict = {}


def _build():
    if os.environ.get("RSM_FAST_NO_CPP", "") == "1":
        raise RuntimeError("RSM_FAST_NO_CPP=1")
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx.split()[0]) is None:
        raise RuntimeError(f"no C++ compiler {cxx!r} found")
    from torch.utils import cpp_extension

    src = importlib.resources.files("rsm_fast.csrc")
    try:  # where torch puts the build (honours TORCH_EXTENSIONS_DIR); only used for the notice below
        built = os.path.join(cpp_extension._get_build_directory(NAME, verbose=False), f"{NAME}.so")
    except Exception:  # noqa: BLE001 - private helper moved: skip the notice, not the build
        built = None
    if built is not None and not os.path.exists(built):  # a cold build takes about a minute on 2 cores: say so, once
        print("rsm_fast: compiling the C++ CPU ops (first use only; cached afterwards) ...", file=sys.stderr, flush=True)
    # torch re-builds a cached extension when its sources or flags change, not its headers; the
    # headers' hash as a define makes a header-only edit re-build too
    digest = hashlib.sha1(b"".join((src / h).read_bytes() for h in HEADERS)).hexdigest()[:16]
    return cpp_extension.load(name=NAME, sources=[str(src / f) for f in SOURCES], extra_include_paths=[str(src)],
                              extra_cflags=CFLAGS + [f"-DRSM_OPS_HEADERS_SHA={digest}"], extra_ldflags=LDFLAGS,
                              verbose=False)


def load():
    """The compiled module, or None (with one warning per process) when it cannot be built."""
    with _lock:
        if "mod" not in _cache:
            try:
                _cache["mod"] = _build()
            except Exception as e:  # noqa: BLE001 - any build failure means: use the fallback
                lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
                # a compiler error reads best as its first "error:" line, not the ninja command line
                reason = next((ln for ln in lines if "error:" in ln), lines[0])[:200]
                warnings.warn(f"rsm_fast: C++ CPU ops unavailable ({reason}); using the PyTorch fallback", stacklevel=2)
                _cache["mod"] = None
        return _cache["mod"]


def available() -> bool:
    return load() is not None
