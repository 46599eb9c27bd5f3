"""Which implementation of the backend functions runs for a device: the seven fused-op functions
(see ``decomposed`` and, for ``fp_fwd`` / ``fp_bwd``, ``decomposed_fp``) and the two counter-based noise functions ``noise`` / ``noise_words`` (see
``philox``; called by ``rsm_fast.engine.noise.gaussian``).

* CUDA -> the Triton kernels of ``rsm_fast.kernels``.
* CPU  -> the C++ kernels of ``csrc/`` (JIT-built on first use by ``cpu_ext``); when no compiler
  is available, ``cpu_ext`` warns once and the plain-torch ``decomposed`` functions run instead.

``RSM_FAST_OPS_BACKEND=decomposed|cpp|triton`` forces one backend for every device (tests use
``triton`` with ``TRITON_INTERPRET=1`` to run the Triton kernels on CPU tensors).
"""
from __future__ import annotations

import functools
import importlib
import os
from types import SimpleNamespace

import torch

from . import decomposed, decomposed_fp, philox

BACKENDS = ("decomposed", "cpp", "triton")
FUNCTIONS = ("zo_fwd", "zo_bwd", "score_fwd", "score_bwd", "step_fwd", "fp_fwd", "fp_bwd")
NOISE_FUNCTIONS = ("noise", "noise_words")
# ``<fn>_unchecked``: the loss functions without their argument checks, for the eager fast path of
# ``library`` (its arguments come out of ``api``'s checks). The Triton wrappers' checks are Python
# (~10 µs per forward + backward); the C++ ones are free and the plain-torch ones are the math.
UNCHECKED = ("zo_fwd", "zo_bwd", "score_fwd", "score_bwd", "fp_fwd", "fp_bwd")


@functools.lru_cache(maxsize=None)
def _triton() -> SimpleNamespace:
    zo = importlib.import_module("rsm_fast.kernels.zo_loss")
    sc = importlib.import_module("rsm_fast.kernels.score_loss")
    st = importlib.import_module("rsm_fast.kernels.sampler_step")
    pn = importlib.import_module("rsm_fast.kernels.philox_noise")
    fp = importlib.import_module("rsm_fast.kernels.fp_loss")
    return SimpleNamespace(name="triton", zo_fwd=zo.zo_fwd, zo_bwd=zo.zo_bwd, score_fwd=sc.score_fwd,
                           score_bwd=sc.score_bwd, step_fwd=st.step_fwd, fp_fwd=fp.fp_fwd, fp_bwd=fp.fp_bwd,
                           noise=pn.noise, noise_words=pn.noise_words,
                           zo_fwd_unchecked=zo.zo_fwd_unchecked, zo_bwd_unchecked=zo.zo_bwd_unchecked,
                           score_fwd_unchecked=sc.score_fwd_unchecked, score_bwd_unchecked=sc.score_bwd_unchecked,
                           fp_fwd_unchecked=fp.fp_fwd_unchecked, fp_bwd_unchecked=fp.fp_bwd_unchecked)


@functools.lru_cache(maxsize=None)
def _cpp() -> SimpleNamespace | None:
    from . import cpu_ext

    mod = cpu_ext.load()
    if mod is None:
        return None
    return SimpleNamespace(name="cpp", **{f: getattr(mod, f) for f in FUNCTIONS},
                           **{f"{f}_unchecked": getattr(mod, f) for f in UNCHECKED},
                           noise=mod.philox_normal, noise_words=mod.philox_words)


_DECOMPOSED = SimpleNamespace(name="decomposed", **{f: getattr(decomposed_fp if f.startswith("fp_") else decomposed, f)
                                                     for f in FUNCTIONS},
                              **{f"{f}_unchecked": getattr(decomposed_fp if f.startswith("fp_") else decomposed, f)
                                 for f in UNCHECKED},
                              **{f: getattr(philox, f) for f in NOISE_FUNCTIONS})


def forced() -> str | None:
    name = os.environ.get("RSM_FAST_OPS_BACKEND", "").strip() or None
    if name is not None and name not in BACKENDS:
        raise ValueError(f"RSM_FAST_OPS_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


def _resolve(name: str) -> SimpleNamespace:
    if name == "triton":
        return _triton()
    if name == "cpp":
        mod = _cpp()
        return mod if mod is not None else _DECOMPOSED
    return _DECOMPOSED


# (RSM_FAST_OPS_BACKEND's raw value, device type) -> namespace: the environment is read on every
# call (tests switch it), the rest is resolved once per pair.
_RESOLVED: dict = {}


def for_device(device: torch.device) -> SimpleNamespace:
    """The backend namespace (``.name`` + the nine functions) used for tensors on ``device``."""
    key = (os.environ.get("RSM_FAST_OPS_BACKEND"), device.type)
    be = _RESOLVED.get(key)
    if be is None:
        name = forced()
        if name is None:
            name = "triton" if device.type == "cuda" else "cpp"
        be = _resolve(name)
        if name != "cpp" or be.name == "cpp":   # a C++ build that failed may be retried later
            _RESOLVED[key] = be
    return be
