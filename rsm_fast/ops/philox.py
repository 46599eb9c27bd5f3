"""Philox-4x32-10 noise in plain torch ops: the ``decomposed`` backend of the counter-based Gaussian
noise of :mod:`rsm_fast.engine.noise` (read its docstring for the stream layout), and the reference
the C++ (``csrc/rsm_noise.cpp``) and Triton (``kernels/philox_noise.py``) kernels are tested against.

Backend contract (the same for the three backends; the caller, ``noise.gaussian``, checks the
arguments, the backends only check cheaply or not at all)::

    noise(row_keys, steps, step, seed, block0, numel, dtype) -> Tensor [R, numel] of dtype
    noise_words(row_keys, steps, step, seed, block0, numel) -> int64 Tensor [R, numel]

* ``row_keys``: contiguous int64 ``[R]`` (any int64 value; its two's complement words are used);
* ``steps``: contiguous int64 ``[R]`` on the device of ``row_keys`` (used mod 2^32), or None, in
  which case every row uses the Python int ``step`` in [0, 2^32);
* ``seed``: Python int in [0, 2^64);
* ``block0``: first Philox block of the window: the result holds elements
  ``[4 block0, 4 block0 + numel)`` of every row's stream (``gaussian`` uses 0; ``block0 +
  ceil(numel / 4) <= 2^32``);
* ``dtype``: float16 / bfloat16 / float32 (computed in float32, then rounded to nearest even) or
  float64 (computed in float64);
* ``noise_words`` returns the raw uint32 words (element ``e`` = word ``e % 4`` of block
  ``block0 + e // 4``) as int64: the part every backend must reproduce bit for bit.

uint32 arithmetic in int64. Every word is held as an int64 in [0, 2^32). For a, b < 2^32 the true
product P = a*b is < 2^64; int64 multiplication wraps modulo 2^64, so the stored value is
P' = P - 2^64 * [P >= 2^63], which has exactly the bit pattern of P. Then
  * lo = P' & 0xFFFFFFFF = P' mod 2^32 = P mod 2^32 (2^64 is a multiple of 2^32), and
  * hi = (P' >> 32) & 0xFFFFFFFF: ``>>`` is an arithmetic shift, i.e. floor(P' / 2^32). If P' >= 0
    this is floor(P / 2^32) = hi(P) < 2^32 and the mask does nothing. If P' < 0 it is
    floor((P - 2^64) / 2^32) = hi(P) - 2^32 (exact, since 2^64 / 2^32 is an integer), and the
    mask (two's complement, i.e. mod 2^32) returns hi(P).
The known-answer tests include the all-0xFFFFFFFF vector, whose products do wrap.

Cost: about 130 small int64 ops per call (the reason the fused kernels exist) and a peak memory of
about 2.5x the float32 output (4 int64 Philox words + 1 scratch per 4 outputs, then the float32
temporaries of Box-Muller).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["PHILOX_M0", "PHILOX_M1", "PHILOX_W0", "PHILOX_W1", "PHILOX_ROUNDS", "philox4x32", "noise",
           "noise_words"]

# Philox-4x32 constants, as published by Salmon, Moraes, Dror and Shaw, "Parallel Random Numbers:
# As Easy as 1, 2, 3", SC'11, and in Random123's philox.h: the round multipliers M0, M1 and the
# Weyl key increments W0 = 0x9E3779B9 (golden ratio) and W1 = 0xBB67AE85 (sqrt(3) - 1).
PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10

_MASK32 = 0xFFFFFFFF


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


def _words(row_keys: Tensor, steps: Tensor | None, step: int, seed: int, block0: int, n_blocks: int) -> list:
    """The four words ``[R, n_blocks]`` (int64 holding uint32) of blocks ``block0 + [0, n_blocks)``:
    counter = (block, row key lo32, row key hi32, step), key = seed's (lo32, hi32)."""
    R, device = row_keys.shape[0], row_keys.device
    full = (R, n_blocks)
    c0 = torch.arange(block0, block0 + n_blocks, dtype=torch.int64, device=device).expand(full).contiguous()
    c1 = row_keys.bitwise_and(_MASK32).unsqueeze(1).expand(full).contiguous()         # row key, low word
    c2 = (row_keys >> 32).bitwise_and_(_MASK32).unsqueeze(1).expand(full).contiguous()  # row key, high word
    if steps is None:
        c3 = torch.full(full, step, dtype=torch.int64, device=device)
    else:
        c3 = steps.bitwise_and(_MASK32).unsqueeze(1).expand(full).contiguous()        # step
    return list(_philox_inplace(c0, c1, c2, c3, seed & _MASK32, seed >> 32))


def noise_words(row_keys: Tensor, steps: Tensor | None, step: int, seed: int, block0: int, numel: int) -> Tensor:
    """The raw words of the window (see the module docstring), int64 ``[R, numel]``."""
    n_blocks = -(-numel // 4)
    w = torch.stack(_words(row_keys, steps, step, seed, block0, n_blocks), dim=-1)
    return w.view(row_keys.shape[0], 4 * n_blocks)[:, :numel].contiguous()


def noise(row_keys: Tensor, steps: Tensor | None, step: int, seed: int, block0: int, numel: int,
          dtype: torch.dtype) -> Tensor:
    """Standard normals ``[R, numel]`` of ``dtype`` (see the module docstring)."""
    R, n_blocks = row_keys.shape[0], -(-numel // 4)
    if R == 0 or numel == 0:
        return torch.empty((R, numel), dtype=dtype, device=row_keys.device)
    w = _words(row_keys, steps, step, seed, block0, n_blocks)   # 4 x [R, B] uint32 words; own their buffers
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    if compute == torch.float64:
        def radius(x):  # u = (x + 1/2) 2^-32 in (0, 1)
            return x.to(compute).add_(0.5).mul_(2.0 ** -32).log_().mul_(-2.0).sqrt_()
        angle_scale = 2.0 * math.pi * 2.0 ** -32
        def angle(x):
            return x.to(compute).mul_(angle_scale)
    else:
        def radius(x):  # u = ((x >> 8) + 1) 2^-24 in (0, 1]
            return x.bitwise_right_shift_(8).add_(1).to(compute).mul_(2.0 ** -24).log_().mul_(-2.0).sqrt_()
        angle_scale = 2.0 * math.pi * 2.0 ** -24      # rounded to float32 by mul_, as in the kernels
        def angle(x):
            return x.bitwise_right_shift_(8).to(compute).mul_(angle_scale)

    z = []
    for j in (0, 2):
        r = radius(w[j])
        t = angle(w[j + 1])
        w[j] = w[j + 1] = None               # drop the words as they are used
        z.append(torch.cos(t).mul_(r))
        z.append(t.sin_().mul_(r))
    out = torch.stack(z, dim=-1).view(R, 4 * n_blocks)      # element e = 4 b + j
    del z
    if 4 * n_blocks != numel:
        out = out[:, :numel]
    return out.to(dtype).contiguous()
