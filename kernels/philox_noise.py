"""Triton kernel of the counter-based Gaussian noise of :mod:`rsm_fast.engine.noise`: Philox-4x32-10
words and Box-Muller normals in one launch. Same functions and contract as the plain-torch
reference :mod:`rsm_fast.ops.philox` (``noise``, ``noise_words``), whose docstring states the
stream layout and the arguments.

One program per (row, range of ``BLOCK`` Philox blocks) on a flat 1-D grid, so neither the number of
rows nor the row length meets CUDA's 65535 limit on the second grid dimension. A program
computes its ``BLOCK`` blocks as four ``[BLOCK]`` uint32 word vectors (Philox on uint32 tensors:
``tl.umulhi`` for the high word of a 32x32 product, plain ``*`` wraps to the low word), turns
them into normals and stores a ``[BLOCK, 4]`` tile, element ``4 b + j`` = word/normal ``j`` of
block ``b`` (contiguous per row).

Precision. The words are bit-identical to the reference. The normals use the reference's uniform
mapping and operation order; on CUDA ``log``, ``sin`` and ``cos`` come from libdevice
(``__nv_logf`` / ``__nv_log`` ...: ``tl.log``, ``tl.sin`` and ``tl.cos`` may lower to the
approximate MUFU instructions, whose absolute error near ``u = 1`` would show up in the radius) and
``sqrt`` is the IEEE one (libdevice ``sqrt_rn``). Under ``TRITON_INTERPRET=1`` (no extern calls there)
numpy's ``log``/``sin``/``cos`` stand in. So normals match the CPU backends within libm rounding, a
few ulp, not bit for bit; within this backend they are bitwise independent of the row order,
batching and chunking (each element is a pure function of its coordinates). float64 is computed in
float64 (libdevice's double functions on CUDA). bfloat16 is rounded from the float32 result to
nearest even by integer arithmetic, not by ``.to``: Triton 3.6's interpreter truncates in
``.to(tl.bfloat16)`` (0x3F818000 -> 0x3F81 where torch gives 0x3F82), and the bit recipe gives
torch's result on both targets (tested on crafted ties and carries).
"""

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from . import _launch as L
from ._direct import direct

# Philox-4x32 constants, from Salmon, Moraes, Dror and Shaw, "Parallel Random Numbers: As Easy as
# 1, 2, 3", SC'11, and Random123's philox.h: round multipliers and Weyl key increments
# (0x9E3779B9: golden ratio, 0xBB67AE85: sqrt(3) - 1). Integer literals in [2^31, 2^32) are uint32
# constants in Triton.
PHILOX_M0: tl.constexpr = tl.constexpr(0xD2511F53)
PHILOX_M1: tl.constexpr = tl.constexpr(0xCD9E8D57)
PHILOX_W0: tl.constexpr = tl.constexpr(0x9E3779B9)
PHILOX_W1: tl.constexpr = tl.constexpr(0xBB67AE85)
PHILOX_ROUNDS: tl.constexpr = tl.constexpr(10)

MODE_WORDS, MODE_F32, MODE_F64 = 0, 1, 2
TWO_PI: tl.constexpr = tl.constexpr(6.283185307179586)   # 2 * math.pi
CUDA_MAX_BLOCK, INTERP_MAX_BLOCK = 256, 64     # Philox blocks per program (4 outputs each)
_MAX_PROGRAMS = 2**31 - 1


@triton.jit
def _philox(c0, c1, c2, c3, k0, k1):
    """Philox-4x32-10 of the uint32 counter tensors ``(c0, c1, c2, c3)`` under the key words
    ``k0, k1`` (int64 scalars in [0, 2^32)). One round (Salmon et al., Fig. 2):
    ``(c0, c1, c2, c3) <- (hi(M1 c2) ^ c1 ^ k0, lo(M1 c2), hi(M0 c0) ^ c3 ^ k1, lo(M0 c0))``; the key
    of round ``i`` is ``(k0 + i W0, k1 + i W1) mod 2^32`` (computed in int64: nothing wraps there)."""
    for i in tl.static_range(PHILOX_ROUNDS):
        rk0 = ((k0 + i * PHILOX_W0) & 0xFFFFFFFF).to(tl.uint32)
        rk1 = ((k1 + i * PHILOX_W1) & 0xFFFFFFFF).to(tl.uint32)
        n0 = tl.umulhi(c2, PHILOX_M1) ^ c1 ^ rk0
        n2 = tl.umulhi(c0, PHILOX_M0) ^ c3 ^ rk1
        c1 = c2 * PHILOX_M1                  # uint32 product: the low word
        c3 = c0 * PHILOX_M0
        c0 = n0
        c2 = n2
    return c0, c1, c2, c3


@triton.jit
def _box_muller(a, t, MODE: tl.constexpr, PRECISE: tl.constexpr):
    """Two normals from the radius word ``a`` and the angle word ``t`` (see rsm_fast.ops.philox):
    float32 ``u = ((a >> 8) + 1) 2^-24``, ``v = (t >> 8) 2^-24``; float64 ``u = (a + 1/2) 2^-32``,
    ``v = t 2^-32``. ``r = sqrt(-2 ln u)``, ``theta = 2 pi v`` (scale rounded once to the dtype)."""
    if MODE == 2:                                                      # MODE_F64
        u = (a.to(tl.float64) + 0.5) * tl.full((), 2.0 ** -32, tl.float64)
        th = t.to(tl.float64) * tl.full((), TWO_PI * 2.0 ** -32, tl.float64)
    else:
        u = ((a >> 8) + 1).to(tl.float32) * tl.full((), 2.0 ** -24, tl.float32)
        th = (t >> 8).to(tl.float32) * tl.full((), TWO_PI * 2.0 ** -24, tl.float32)
    if PRECISE:
        r = libdevice.sqrt_rn(libdevice.log(u) * -2.0)
        c = libdevice.cos(th)
        s = libdevice.sin(th)
    else:                        # the interpreter: numpy's functions (its sqrt is the IEEE one)
        r = tl.sqrt(tl.log(u) * -2.0)
        c = tl.cos(th)
        s = tl.sin(th)
    return c * r, s * r


@triton.jit
def _pick4(j, x0, x1, x2, x3):
    """The ``[BLOCK, 4]`` tile whose column ``j`` is ``x_j`` (``j``: ``[1, 4]`` column index)."""
    return tl.where(j == 0, x0[:, None], tl.where(j == 1, x1[:, None], tl.where(j == 2, x2[:, None], x3[:, None])))


@triton.jit
def _bf16_rne(x):
    """float32 -> bfloat16, round to nearest even (finite inputs), by integer arithmetic."""
    u = x.to(tl.uint32, bitcast=True)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return u.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@direct
@triton.jit
def _bf16_rne_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    """``y = _bf16_rne(x)`` elementwise: lets the tests check the rounding on crafted ties."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(y_ptr + offs, _bf16_rne(tl.load(x_ptr + offs, mask=m, other=0.0)), mask=m)


@direct
@triton.jit(do_not_specialize=["step", "k0", "k1", "block0"])   # runtime values: one compile
def _noise_kernel(out_ptr, keys_ptr, steps_ptr, step, k0, k1, block0, numel, progs_per_row,
                  HAS_STEPS: tl.constexpr, MODE: tl.constexpr, OUT_BF16: tl.constexpr, PRECISE: tl.constexpr,
                  BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    row = pid // progs_per_row
    b = (pid % progs_per_row) * BLOCK + tl.arange(0, BLOCK)           # block index in the window (int64)
    key = tl.load(keys_ptr + row)                                      # int64: two's complement words
    c1 = (key & 0xFFFFFFFF).to(tl.uint32)
    c2 = ((key >> 32) & 0xFFFFFFFF).to(tl.uint32)
    if HAS_STEPS:
        s = tl.load(steps_ptr + row)
    else:
        s = step.to(tl.int64)
    c3 = (s & 0xFFFFFFFF).to(tl.uint32)
    zero = tl.zeros([BLOCK], tl.uint32)
    w0, w1, w2, w3 = _philox((block0.to(tl.int64) + b).to(tl.uint32), zero + c1, zero + c2, zero + c3,
                             k0.to(tl.int64), k1.to(tl.int64))

    j = tl.arange(0, 4)[None, :]
    e = 4 * b[:, None] + j                                             # [BLOCK, 4] element index
    mask = e < numel
    ptrs = out_ptr + row * numel + e
    if MODE == 0:                                                      # MODE_WORDS
        tl.store(ptrs, _pick4(j, w0, w1, w2, w3).to(tl.int64), mask=mask)
    else:
        z0, z1 = _box_muller(w0, w1, MODE, PRECISE)
        z2, z3 = _box_muller(w2, w3, MODE, PRECISE)
        z = _pick4(j, z0, z1, z2, z3)
        if OUT_BF16:
            tl.store(ptrs, _bf16_rne(z), mask=mask)
        else:
            tl.store(ptrs, z.to(out_ptr.dtype.element_ty), mask=mask)


_MAX_BLOCKS = 1 << 32
_FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _check_stream(op, row_keys, steps, step, block0, numel, dtype=None) -> None:
    """The C++ backend's checks (``csrc/rsm_noise.cpp`` ``check_stream``), same order and wording:
    ``row_keys`` a contiguous int64 ``[R]`` tensor, ``steps`` ``None`` or a contiguous int64 ``[R]``
    tensor on its device, else ``step`` in ``[0, 2^32)``; the block window inside the counter
    range. Raises :class:`~rsm_fast.kernels._launch.KernelInputError`. Metadata only."""
    where = f" (rsm_fast.kernels {op})"
    if not isinstance(row_keys, torch.Tensor):
        raise L.KernelInputError(f"row_keys must be a tensor, got {type(row_keys).__name__}{where}")
    if not (row_keys.dim() == 1 and row_keys.dtype == torch.int64 and row_keys.is_contiguous()):
        raise L.KernelInputError(f"row_keys must be a contiguous int64 tensor [R], got {L.c10_name(row_keys.dtype)} "
                                 f"{list(row_keys.shape)}{where}")
    if not L.runs_on(row_keys.device):
        raise L.KernelInputError(f"row_keys must be a CUDA tensor (or a CPU tensor under TRITON_INTERPRET=1), got "
                                 f"{row_keys.device}{where}")
    R = row_keys.shape[0]
    if steps is not None:
        if not isinstance(steps, torch.Tensor):
            raise L.KernelInputError(f"steps must be a tensor or None, got {type(steps).__name__}{where}")
        if steps.device != row_keys.device:
            raise L.KernelInputError(f"steps must be a tensor on {row_keys.device} (the device of row_keys), got "
                                     f"{steps.device}{where}")
        if not (steps.dim() == 1 and steps.shape[0] == R and steps.dtype == torch.int64 and steps.is_contiguous()):
            raise L.KernelInputError(f"steps must be a contiguous int64 tensor [{R}], got {L.c10_name(steps.dtype)} "
                                     f"{list(steps.shape)}{where}")
    elif not 0 <= step < _MAX_BLOCKS:
        raise L.KernelInputError(f"step {step} outside [0, 2^32){where}")
    if numel < 0:
        raise L.KernelInputError(f"numel must be >= 0, got {numel}{where}")
    if not (block0 >= 0 and block0 + (numel + 3) // 4 <= _MAX_BLOCKS):
        raise L.KernelInputError(f"blocks [{block0}, {block0} + ceil({numel} / 4)) exceed the 2^32 counter "
                                 f"range{where}")
    if dtype is not None and dtype not in _FLOATS:
        raise L.KernelInputError(f"dtype must be float64, float32, bfloat16 or float16, got {L.c10_name(dtype)}{where}")


def _launch(out, row_keys, steps, step, seed, block0, numel, mode):
    R = row_keys.shape[0]
    if R == 0 or numel == 0:
        return out
    if row_keys.device.type != "cuda" and not L.INTERPRET:
        raise RuntimeError("rsm_fast.kernels needs CUDA tensors (or TRITON_INTERPRET=1 set before importing triton)")
    n_blocks = -(-numel // 4)
    cap = CUDA_MAX_BLOCK if row_keys.device.type == "cuda" else INTERP_MAX_BLOCK
    block = min(cap, max(16, L.next_power_of_2(n_blocks)))   # host ints (triton's helpers are jitted)
    per_row = L.cdiv(n_blocks, block)
    if R * per_row > _MAX_PROGRAMS:
        raise ValueError(f"philox noise: {R} rows x {per_row} programs exceed the grid limit")
    has_steps = steps is not None
    warps = max(1, min(4, block // 64)) if row_keys.device.type == "cuda" else 1
    with L.device_guard(row_keys):
        _noise_kernel[(R * per_row,)](out, row_keys, steps if has_steps else row_keys, 0 if has_steps else step,
                                      seed & 0xFFFFFFFF, seed >> 32, block0, numel, per_row,
                                      HAS_STEPS=has_steps, MODE=mode, OUT_BF16=out.dtype == torch.bfloat16,
                                      PRECISE=not L.INTERPRET, BLOCK=block, num_warps=warps)
    return out


def noise(row_keys, steps, step: int, seed: int, block0: int, numel: int, dtype: torch.dtype):
    """Standard normals ``[R, numel]`` of ``dtype`` (contract: :func:`rsm_fast.ops.philox.noise`)."""
    _check_stream("noise", row_keys, steps, step, block0, numel, dtype)
    out = torch.empty((row_keys.shape[0], numel), dtype=dtype, device=row_keys.device)
    return _launch(out, row_keys, steps, step, seed, block0, numel, MODE_F64 if dtype == torch.float64 else MODE_F32)


def noise_words(row_keys, steps, step: int, seed: int, block0: int, numel: int):
    """The raw uint32 words as int64 ``[R, numel]`` (contract: :func:`rsm_fast.ops.philox.noise_words`)."""
    _check_stream("noise_words", row_keys, steps, step, block0, numel)
    out = torch.empty((row_keys.shape[0], numel), dtype=torch.int64, device=row_keys.device)
    return _launch(out, row_keys, steps, step, seed, block0, numel, MODE_WORDS)
