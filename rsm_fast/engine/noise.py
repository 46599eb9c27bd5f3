"""Counter-based Gaussian noise: z[r] is a pure function of (seed, row key, step, element index).

Why. A sampler that draws its SDE noise from a stateful generator couples every row's noise to the
batch layout (batch size, chunking, row order, number of processes). Here each row's noise is
computed from its own coordinates only, so any execution of the same plan is bit-identical.

Generator. Philox-4x32-10, the counter-based generator of Salmon, Moraes, Dror and Shaw,
"Parallel Random Numbers: As Easy as 1, 2, 3", SC'11 (also the generator behind PyTorch's
CUDA RNG), with the published constants (round multipliers M0 = 0xD2511F53, M1 = 0xCD9E8D57,
Weyl key increments W0 = 0x9E3779B9, W1 = 0xBB67AE85; see ``rsm_fast.ops.philox``).

Backends. ``gaussian`` checks its arguments and calls the fused kernel of the output device, picked
by ``rsm_fast.ops.backends.for_device`` (``RSM_FAST_OPS_BACKEND=decomposed|cpp|triton`` forces one):
  * CUDA -> the Triton kernel ``kernels/philox_noise.py`` (one launch);
  * CPU  -> the C++ kernel ``csrc/rsm_noise.cpp`` (one pass, ``at::parallel_for``), or, when the C++
    extension cannot be built, the plain-torch code of ``rsm_fast.ops.philox`` (``decomposed``:
    about 130 small int64 ops per call), which is also the reference the kernels are tested against.
The Philox words are bit-identical in every backend. The normals follow the same formulas and
operation order but call each backend's libm (torch's vectorised functions, glibc, CUDA
libdevice), so they agree within libm rounding (a few ulp), not bit for bit. Within one backend
every element is a pure function of its coordinates, so results are bit-identical whatever the
batching, chunking, row order or thread count; between the CPU C++ kernel and the CUDA Triton
kernel they may differ in the last ulp or so.

Layout of a row's stream (one Philox call = one 128-bit block = 4 normals):

    key     = (seed mod 2^64) split into 32-bit words (lo, hi)
    counter = (b, row_key lo32, row_key hi32, step)        b = element_index // 4

Element ``e`` of a row (row-major over ``shape``) is word ``e % 4`` of block ``b = e // 4``;
words (0, 1) and (2, 3) are each turned into two normals by Box-Muller; words past ``numel`` are
dropped. No collisions: the map (b, row_key, step) -> counter is injective for every int64 row key
(two's complement words), every step in [0, 2^32) and every block index b < 2^32 (i.e. up to
2^34 elements per row), and for a fixed key Philox is a bijection of 128-bit blocks, so distinct
(row key, step, block) give distinct blocks of random bits; distinct seeds mod 2^64 give distinct
keys. Nothing depends on the batch size, a row's position or the other rows.

Uniform -> normal (Box-Muller, z0 = r cos t, z1 = r sin t, r = sqrt(-2 ln u), t = 2 pi v):
  * float64 (and only float64) is computed in float64 from full 32-bit words:
    u = (w + 1/2) 2^-32 in the open interval (0, 1), v = w 2^-32 in [0, 1); all exact.
  * every other dtype is computed in float32 and cast: u = ((w >> 8) + 1) 2^-24 in (0, 1],
    v = (w >> 8) 2^-24 in [0, 1); all exact in float32. (An open interval with 2^24 evenly spaced
    points does not exist in float32: the midpoint 1 - 2^-25 rounds to 1. ``u = 1`` is harmless,
    it gives r = 0 with probability 2^-24; what matters is that ``ln`` never sees 0.)
  The largest radius is sqrt(2 ln 2^24) = 5.77 (float32) / sqrt(2 ln 2^33) = 6.76 (float64).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..ops import backends
from ..ops.philox import PHILOX_M0, PHILOX_M1, PHILOX_ROUNDS, PHILOX_W0, PHILOX_W1, philox4x32

__all__ = ["philox4x32", "gaussian", "philox_words", "PHILOX_M0", "PHILOX_M1", "PHILOX_W0", "PHILOX_W1",
           "PHILOX_ROUNDS"]

_MASK64 = (1 << 64) - 1
_MAX_BLOCKS = 1 << 32
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _as_shape(shape) -> tuple[int, ...]:
    if isinstance(shape, int):
        shape = (shape,)
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"gaussian: negative size in shape {shape}")
    return shape


def _stream_args(seed, row_keys, step, numel: int, device):
    """Checks the stream coordinates; -> (row keys int64 [R] on device, steps int64 [R] or None,
    step int, seed mod 2^64, device). Never reads a device value."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"gaussian: seed must be a Python int, got {type(seed).__name__}")
    if not -(1 << 63) <= seed < (1 << 64):
        raise ValueError(f"gaussian: seed {seed} outside [-2^63, 2^64)")
    if not isinstance(row_keys, Tensor) or row_keys.dim() != 1:
        raise ValueError("gaussian: row_keys must be a 1-D integer tensor [R]")
    if row_keys.dtype.is_floating_point or row_keys.dtype.is_complex or row_keys.dtype == torch.bool:
        raise TypeError(f"gaussian: row_keys must be an integer tensor, got {row_keys.dtype}")
    if -(-numel // 4) > _MAX_BLOCKS:
        raise ValueError(f"gaussian: {numel} elements per row exceed the 2^34 counter range")
    device = row_keys.device if device is None else torch.device(device)
    R = row_keys.shape[0]
    rk = row_keys.to(device=device, dtype=torch.int64).contiguous()
    if isinstance(step, Tensor):
        if step.shape != (R,):
            raise ValueError(f"gaussian: step tensor must have shape [{R}], got {tuple(step.shape)}")
        if step.dtype.is_floating_point or step.dtype.is_complex or step.dtype == torch.bool:
            raise TypeError(f"gaussian: step must be an integer tensor, got {step.dtype}")
        return rk, step.to(device=device, dtype=torch.int64).contiguous(), 0, seed & _MASK64, device
    if isinstance(step, bool) or not isinstance(step, int):
        raise TypeError(f"gaussian: step must be a Python int or an integer tensor, got {type(step).__name__}")
    if not 0 <= step < (1 << 32):
        raise ValueError(f"gaussian: step {step} outside [0, 2^32)")
    return rk, None, step, seed & _MASK64, device


def gaussian(seed: int, row_keys: Tensor, step: int | Tensor, shape, dtype: torch.dtype = torch.float32,
             device: torch.device | str | None = None) -> Tensor:
    """Standard normal noise ``[R, *shape]``; row ``r`` depends only on
    ``(seed, row_keys[r], step[r], element index)`` (see the module docstring for the layout).

    Args:
        seed: Python int; used mod 2^64 (must lie in [-2^63, 2^64)).
        row_keys: ``[R]`` integer tensor (any int64 value; the plan's keys are non-negative).
        step: Python int or ``[R]`` integer tensor, in [0, 2^32) (the caller's steps are < 2^31;
            a tensor is not range-checked, that would need a host read; it is used mod 2^32).
        shape: per-row shape; its numel must be < 2^34.
        dtype: float16 / bfloat16 / float32 (computed in float32) or float64 (computed in float64).
        device: output device; defaults to ``row_keys.device`` (inputs are moved there).

    Never reads a device value back to the host (no synchronisation), so it can run inside the
    sampler's step loop. The fused kernels allocate only the output (the ``decomposed`` fallback
    peaks at about 2.5x the float32 output).
    """
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"gaussian: dtype must be one of {_FLOAT_DTYPES}, got {dtype}")
    shape = _as_shape(shape)
    numel = math.prod(shape)
    rk, steps, step, seed, device = _stream_args(seed, row_keys, step, numel, device)
    R = rk.shape[0]
    if R == 0 or numel == 0:
        return torch.empty((R, *shape), dtype=dtype, device=device)
    z = backends.for_device(device).noise(rk, steps, step, seed, 0, numel, dtype)    # [R, numel]
    return z if len(shape) == 1 else z.view(R, *shape)


def philox_words(seed: int, row_keys: Tensor, step: int | Tensor, numel: int, block0: int = 0,
                 device: torch.device | str | None = None) -> Tensor:
    """The raw Philox words behind :func:`gaussian`, as int64 ``[R, numel]`` holding uint32 values:
    element ``e`` is word ``e % 4`` of block ``block0 + e // 4`` of row ``r``'s stream (arguments as in
    :func:`gaussian`; ``block0`` opens a window further down the stream). The words are the part
    every backend reproduces bit for bit (the tests' handle on them)."""
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
        raise ValueError(f"philox_words: numel must be a non-negative int, got {numel!r}")
    if isinstance(block0, bool) or not isinstance(block0, int) or not 0 <= block0 <= _MAX_BLOCKS - (-(-numel // 4)):
        raise ValueError(f"philox_words: blocks [{block0}, {block0} + ceil({numel} / 4)) exceed [0, 2^32)")
    rk, steps, step, seed, device = _stream_args(seed, row_keys, step, numel, device)
    if rk.shape[0] == 0 or numel == 0:
        return torch.empty((rk.shape[0], numel), dtype=torch.int64, device=device)
    return backends.for_device(device).noise_words(rk, steps, step, seed, block0, numel)
