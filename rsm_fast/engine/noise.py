"""Counter-based Gaussian noise: z[r] is a pure function of (seed, row key, step, element index).

Why. A sampler that draws its SDE noise from a stateful generator couples every row's noise to the
batch layout (batch size, chunking, row order, number of processes). Here each row's noise is
computed from its own coordinates only, so any execution of the same plan is bit-identical.

Generator. Philox-4x32-10, the counter-based generator of Salmon, Moraes, Dror and Shaw,
"Parallel Random Numbers: As Easy as 1, 2, 3", SC'11 (also the generator behind PyTorch's
CUDA RNG). The constants below are the published ones: round multipliers
M0 = 0xD2511F53, M1 = 0xCD9E8D57 and Weyl key increments W0 = 0x9E3779B9 (golden ratio),
W1 = 0xBB67AE85 (sqrt(3) - 1). It is implemented here with plain int64 torch ops so that the same
code runs on CPU and CUDA without a custom kernel and without host synchronisation.

uint32 arithmetic in int64. Every word is held as an int64 in [0, 2^32). For a, b < 2^32 the true
product P = a*b is < 2^64; int64 multiplication wraps modulo 2^64, so the stored value is
P' = P - 2^64 * [P >= 2^63], which has exactly the bit pattern of P. Then
  * lo = P' & 0xFFFFFFFF = P' mod 2^32 = P mod 2^32 (2^64 is a multiple of 2^32), and
  * hi = (P' >> 32) & 0xFFFFFFFF: ``>>`` is an arithmetic shift, i.e. floor(P' / 2^32). If P' >= 0
    this is floor(P / 2^32) = hi(P) < 2^32 and the mask does nothing. If P' < 0 it is
    floor((P - 2^64) / 2^32) = hi(P) - 2^32 (exact, since 2^64 / 2^32 is an integer), and the
    mask (two's complement, i.e. mod 2^32) returns hi(P).
The known-answer tests include the all-0xFFFFFFFF vector, whose products do wrap.

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

__all__ = ["philox4x32", "gaussian"]

# Philox-4x32 constants (Salmon et al., SC'11; Random123).
PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10

_MASK32 = 0xFFFFFFFF
_MASK64 = (1 << 64) - 1
_MAX_BLOCKS = 1 << 32
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _philox_inplace(c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor,
                    k0: Tensor | int, k1: Tensor | int, rounds: int = PHILOX_ROUNDS):
    """Philox-4x32 on four int64 word tensors holding uint32 values. The four tensors must be
    distinct, contiguous, of one shape, and owned by the caller: they are overwritten (their
    buffers are reused for the result, so the rounds allocate one scratch tensor in all). The key
    words are Python ints or tensors broadcastable to that shape. Returns the four result words.

    One round (Salmon et al., Fig. 2), with hi/lo the two halves of the 64-bit product:
        (c0, c1, c2, c3) <- (hi(M1 c2) ^ c1 ^ k0, lo(M1 c2), hi(M0 c0) ^ c3 ^ k1, lo(M0 c0))
    and the key is bumped by (W0, W1) mod 2^32 between rounds.
    """
    scratch = torch.empty_like(c0)
    for i in range(rounds):
        if i:  # Weyl key schedule, mod 2^32 (Python ints or tensors alike)
            k0, k1 = (k0 + PHILOX_W0) & _MASK32, (k1 + PHILOX_W1) & _MASK32
        p0 = c0.mul_(PHILOX_M0)            # uint32 x uint32, wraps in int64 (see module doc)
        p1 = c2.mul_(PHILOX_M1)
        # c ^ (p >> 32) masked afterwards == c ^ hi(p): c < 2^32 has no high bits to disturb.
        n0 = c1.bitwise_xor_(torch.bitwise_right_shift(p1, 32, out=scratch)).bitwise_and_(_MASK32)
        n0.bitwise_xor_(k0)
        n2 = c3.bitwise_xor_(torch.bitwise_right_shift(p0, 32, out=scratch)).bitwise_and_(_MASK32)
        n2.bitwise_xor_(k1)
        c0, c1, c2, c3 = n0, p1.bitwise_and_(_MASK32), n2, p0.bitwise_and_(_MASK32)
    return c0, c1, c2, c3


def philox4x32(counter: Tensor, key: Tensor, rounds: int = PHILOX_ROUNDS) -> Tensor:
    """Philox-4x32-``rounds`` of ``counter`` ``[..., 4]`` under ``key`` ``[..., 2]`` (int64 tensors
    holding uint32 values, leading dims broadcast). Returns int64 ``[..., 4]`` uint32 values.
    The inputs are not modified."""
    if counter.shape[-1:] != (4,) or key.shape[-1:] != (2,):
        raise ValueError(f"philox4x32: counter must be [..., 4] and key [..., 2], got "
                         f"{tuple(counter.shape)} and {tuple(key.shape)}")
    if counter.dtype != torch.int64 or key.dtype != torch.int64:
        raise TypeError("philox4x32: counter and key must be int64 tensors holding uint32 values")
    batch = torch.broadcast_shapes(counter.shape[:-1], key.shape[:-1])
    c = [counter[..., j].expand(batch).clone(memory_format=torch.contiguous_format) for j in range(4)]
    return torch.stack(_philox_inplace(*c, key[..., 0], key[..., 1], rounds), dim=-1)


def _as_shape(shape) -> tuple[int, ...]:
    if isinstance(shape, int):
        shape = (shape,)
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"gaussian: negative size in shape {shape}")
    return shape


def gaussian(seed: int, row_keys: Tensor, step: int | Tensor, shape, dtype: torch.dtype = torch.float32,
             device: torch.device | str | None = None) -> Tensor:
    """Standard normal noise ``[R, *shape]``; row ``r`` depends only on
    ``(seed, row_keys[r], step[r], element index)`` (see the module docstring for the layout).

    Args:
        seed: Python int; used mod 2^64 (must lie in [-2^63, 2^64)).
        row_keys: ``[R]`` integer tensor (any int64 value; the plan's keys are non-negative).
        step: Python int or ``[R]`` integer tensor, in [0, 2^32) (the caller's steps are < 2^31;
            a tensor is not range-checked, that would need a host read).
        shape: per-row shape; its numel must be < 2^34.
        dtype: float16 / bfloat16 / float32 (computed in float32) or float64 (computed in float64).
        device: output device; defaults to ``row_keys.device`` (inputs are moved there).

    Never reads a device value back to the host (no synchronisation), so it can run inside the
    sampler's step loop. Peak memory is about 2.5x the float32 output (4 int64 Philox words + 1 scratch
    per 4 outputs, then the float32 temporaries of Box-Muller).
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"gaussian: seed must be a Python int, got {type(seed).__name__}")
    if not -(1 << 63) <= seed < (1 << 64):
        raise ValueError(f"gaussian: seed {seed} outside [-2^63, 2^64)")
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"gaussian: dtype must be one of {_FLOAT_DTYPES}, got {dtype}")
    if not isinstance(row_keys, Tensor) or row_keys.dim() != 1:
        raise ValueError("gaussian: row_keys must be a 1-D integer tensor [R]")
    if row_keys.dtype.is_floating_point or row_keys.dtype.is_complex or row_keys.dtype == torch.bool:
        raise TypeError(f"gaussian: row_keys must be an integer tensor, got {row_keys.dtype}")
    shape = _as_shape(shape)
    device = row_keys.device if device is None else torch.device(device)
    numel = math.prod(shape)
    n_blocks = -(-numel // 4)
    if n_blocks > _MAX_BLOCKS:
        raise ValueError(f"gaussian: {numel} elements per row exceed the 2^34 counter range")
    R = row_keys.shape[0]

    rk = row_keys.to(device=device, dtype=torch.int64)
    if isinstance(step, Tensor):
        if step.shape != (R,):
            raise ValueError(f"gaussian: step tensor must have shape [{R}], got {tuple(step.shape)}")
        if step.dtype.is_floating_point or step.dtype.is_complex or step.dtype == torch.bool:
            raise TypeError(f"gaussian: step must be an integer tensor, got {step.dtype}")
        c3 = step.to(device=device, dtype=torch.int64).bitwise_and(_MASK32).unsqueeze(1)
    else:
        if isinstance(step, bool) or not isinstance(step, int):
            raise TypeError(f"gaussian: step must be a Python int or an integer tensor, got {type(step).__name__}")
        if not 0 <= step < (1 << 32):
            raise ValueError(f"gaussian: step {step} outside [0, 2^32)")
        c3 = torch.full((R, 1), step, dtype=torch.int64, device=device)

    compute = torch.float64 if dtype == torch.float64 else torch.float32
    if R == 0 or numel == 0:
        return torch.empty((R, *shape), dtype=dtype, device=device)

    seed &= _MASK64
    k0, k1 = seed & _MASK32, seed >> 32
    full = (R, n_blocks)
    c0 = torch.arange(n_blocks, dtype=torch.int64, device=device).expand(full).contiguous()  # block
    c1 = rk.bitwise_and(_MASK32).unsqueeze(1).expand(full).contiguous()       # row key, low word
    c2 = (rk >> 32).bitwise_and_(_MASK32).unsqueeze(1).expand(full).contiguous()  # row key, high word
    c3 = c3.expand(full).contiguous()                                           # step
    w = list(_philox_inplace(c0, c1, c2, c3, k0, k1))                          # 4 x [R, B] uint32 words
    del c0, c1, c2, c3                      # the words now own these buffers; drop them as they are used

    if compute == torch.float64:
        def radius(x):  # u = (x + 1/2) 2^-32 in (0, 1)
            return x.to(compute).add_(0.5).mul_(2.0 ** -32).log_().mul_(-2.0).sqrt_()
        angle_scale = 2.0 * math.pi * 2.0 ** -32
        def angle(x):
            return x.to(compute).mul_(angle_scale)
    else:
        def radius(x):  # u = ((x >> 8) + 1) 2^-24 in (0, 1]
            return x.bitwise_right_shift_(8).add_(1).to(compute).mul_(2.0 ** -24).log_().mul_(-2.0).sqrt_()
        angle_scale = 2.0 * math.pi * 2.0 ** -24
        def angle(x):
            return x.bitwise_right_shift_(8).to(compute).mul_(angle_scale)

    z = []
    for j in (0, 2):
        r = radius(w[j])
        t = angle(w[j + 1])
        w[j] = w[j + 1] = None
        z.append(torch.cos(t).mul_(r))
        z.append(t.sin_().mul_(r))
    out = torch.stack(z, dim=-1).view(R, 4 * n_blocks)      # element e = 4 b + j
    del z
    if 4 * n_blocks != numel:
        out = out[:, :numel]
    return out.reshape(R, *shape).to(dtype)
