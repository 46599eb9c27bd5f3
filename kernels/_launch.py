"""Launch planning and small shared helpers of the Triton kernels (``rsm_fast.kernels``).

Every fused op streams ``B`` rows of ``n`` latent elements. A row is split into ``n_chunks``
chunks of ``chunk_len`` elements (a multiple of the tile size ``BLOCK``); the streaming kernels
run on the grid ``(B, n_chunks)`` and each program loops over the tiles of its chunk: full tiles
unmasked (so loads vectorise), then one masked tail tile. The row reductions write their partial
sums to a ``[B, n_chunks, K]`` workspace (no atomics), which :func:`sum_partials` reduces in a
fixed order inside the per-row epilogue kernel: results are bitwise reproducible.
Row starts are 16-element aligned (so full tiles use 16-byte loads) when ``n % 16 == 0``, which
Triton sees through its divisibility specialisation of ``n``; other row lengths are correct but
load element by element.

``TRITON_INTERPRET=1`` (Triton's CPU interpreter, used by the tests) must be set before Triton is
imported; CPU tensors are accepted only then, with small tiles and few chunks to keep it fast.
"""

import functools
import math
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")
LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)

# Tile sizes. On CUDA a 1024-element tile over 4 warps gives every thread 8 contiguous elements
# (16-byte loads for bf16/fp16, two for fp32); fp64 uses 512 to keep the same bytes per thread.
CUDA_BLOCK, CUDA_BLOCK_FP64, CUDA_WARPS = 1024, 512, 4
PROGRAMS_PER_SM = 4          # target B * n_chunks >= PROGRAMS_PER_SM * multiprocessor count
INTERP_BLOCK, INTERP_PROGRAMS = 64, 12   # interpreter: small tiles, few programs
EPI_BLOCK_B, EPI_BLOCK_C = 32, 32        # epilogue: rows per program, chunks per partial tile


class Plan(NamedTuple):
    block: int       # tile size (elements), a power of two
    n_chunks: int    # chunks per row (>= 1)
    chunk_len: int   # elements per chunk, a multiple of block (the last chunk may be shorter)
    num_warps: int
    grid: tuple = (0, 1)       # (B, n_chunks): the streaming kernels' grid
    epi_grid: tuple = (0,)     # the per-row epilogue's grid, (cdiv(B, EPI_BLOCK_B),)
    n: int = 0                 # elements per row


@functools.lru_cache(maxsize=None)
def sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for ints (``triton.cdiv`` is a jitted function: ~10 µs per host call)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 1 else 1


def plan_chunks(B: int, n: int, block: int, target_programs: int) -> tuple[int, int]:
    """``(n_chunks, chunk_len)`` for rows of ``n`` elements: ``chunk_len`` is a whole number of
    ``block`` tiles, the chunks cover the row, and ``B * n_chunks >= target_programs`` unless that
    would need chunks of less than one tile."""
    tiles = max(1, cdiv(n, block))
    want = min(tiles, max(1, cdiv(target_programs, max(B, 1))))   # chunks per row wanted
    chunk_len = (tiles // want) * block                           # >= want chunks
    return cdiv(max(n, 1), chunk_len), chunk_len


# Plans by (B, n, fp64, device, tiling constants): a plan is a pure function of these, so each is
# made once (the constants are in the key: tests change INTERP_PROGRAMS to force many chunks).
_PLANS: dict = {}
_MAX_PLANS = 4096


def _make_plan(B: int, n: int, fp64: bool, cuda: bool, index, block_big: int, block_fp64: int, per_sm: int,
               warps_cuda: int, interp_block: int, interp_programs: int) -> Plan:
    if cuda:
        big = block_fp64 if fp64 else block_big
        block = min(big, max(128, next_power_of_2(max(n, 1))))   # short rows: smaller tiles
        target, warps = per_sm * sm_count(index), warps_cuda
    else:
        block, target, warps = interp_block, interp_programs, 1
    n_chunks, chunk_len = plan_chunks(B, n, block, target)
    return Plan(block, n_chunks, chunk_len, warps, (B, n_chunks), (cdiv(B, EPI_BLOCK_B),), n)


def plan(t: torch.Tensor) -> Plan:
    """The chunking of the rows of the latent tensor ``t`` (``[B, ...]``) for its device, with the
    launch grids; cached per (B, n, dtype class, device)."""
    B = t.shape[0]
    n = t.numel() // B if B else 0
    dev = t.device
    cuda = dev.type == "cuda"
    if cuda:
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        key = (B, n, t.dtype is torch.float64, True, index, CUDA_BLOCK, CUDA_BLOCK_FP64, PROGRAMS_PER_SM, CUDA_WARPS,
               0, 0)
    else:
        key = (B, n, False, False, None, 0, 0, 0, 0, INTERP_BLOCK, INTERP_PROGRAMS)
    p = _PLANS.get(key)
    if p is None:
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        p = _PLANS[key] = _make_plan(*key)
    return p


def alloc_rows(B: int, widths: tuple, dtype: torch.dtype, device: torch.device, extra: int = 0) -> tuple:
    """One allocation for a forward: consecutive per-row outputs of ``w * B`` elements for each
    ``w`` of ``widths`` (a ``[B]`` output, or a row-major ``[B, w]`` one), then ``extra`` elements
    (the partial-sum workspace). Returns the flat pieces (views, one split call); the wrappers
    shape them, so every output of a call shares one storage: ``sum(widths)`` rows of ``B``."""
    flat = torch.empty(sum(widths) * B + extra, dtype=dtype, device=device)
    return flat.split_with_sizes([w * B for w in widths] + [extra])


def bytes_row(row: torch.Tensor) -> torch.Tensor:
    """A ``[B]`` row of an :func:`alloc_rows` block as the ``uint8`` buffer a bool output is
    stored in (its first ``B`` bytes; ``[:B].view(torch.bool)`` is the output)."""
    return row.view(torch.uint8)


def acc_type(dtype: torch.dtype):
    """Triton accumulation / compute type for latents of ``dtype``: fp64 stays fp64, else fp32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def row_len(t: torch.Tensor) -> int:
    return t.numel() // t.shape[0] if t.shape[0] else 0


def norm_of(n: int, mean: bool) -> float:
    return 1.0 / n if mean else 1.0


def runs_on(device: torch.device) -> bool:
    """Whether the kernels can run on ``device``: CUDA, or the CPU under the interpreter."""
    return device.type == "cuda" or (INTERPRET and device.type == "cpu")


class KernelInputError(RuntimeError, ValueError):
    """An argument of a Triton wrapper breaks the backend contract. A ``RuntimeError``, as the C++
    backend's ``TORCH_CHECK`` raises for the same argument (so callers catch one class on every
    backend), and a ``ValueError``, as these wrappers raised before."""


def check_latents(first: torch.Tensor, *others: torch.Tensor | None) -> None:
    """Cheap checks of the backend contract: contiguous ``[B, ...]`` tensors of one shape/dtype on
    a CUDA device (or on CPU under the interpreter)."""
    if first.dim() < 1 or first.dtype not in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        raise KernelInputError(f"latents must be [B, ...] fp64/fp32/bf16/fp16 tensors, got {first.dtype} "
                               f"{tuple(first.shape)}")
    if not runs_on(first.device):
        raise RuntimeError("rsm_fast.kernels needs CUDA tensors (or TRITON_INTERPRET=1 set before importing triton)")
    for t in (first, *others):
        if t is None:
            continue
        if t.shape != first.shape or t.dtype != first.dtype or t.device != first.device:
            raise KernelInputError("latent tensors must share shape, dtype and device")
        if not t.is_contiguous():
            raise KernelInputError("latent tensors must be contiguous")


# c10's names of the scalar types, as the C++ backend's messages print them.
_C10_NAMES = {torch.float64: "Double", torch.float32: "Float", torch.bfloat16: "BFloat16", torch.float16: "Half",
              torch.bool: "Bool", torch.int64: "Long", torch.int32: "Int", torch.int16: "Short", torch.int8: "Char",
              torch.uint8: "Byte"}


def c10_name(dtype: torch.dtype) -> str:
    return _C10_NAMES.get(dtype) or str(dtype).removeprefix("torch.")


def row_error(op: str, name: str, x, shape: tuple, dtype: torch.dtype, lead: torch.Tensor, lead_name: str) -> str:
    """The message for a per-row argument ``x`` that fails :func:`check_rows`: the first broken
    rule in the C++ backend's order (tensor, device, shape, dtype, contiguity), in its wording
    (``csrc/rsm_ops_detail.h`` ``check_row``; the shape rule reads "must be of shape", not "must
    have shape", so every message starts "``<name> must be``"), then the op."""
    where = f" (rsm_fast.kernels {op})"
    if not isinstance(x, torch.Tensor):
        return f"{name} must be a tensor, got {type(x).__name__}{where}"
    if x.device != lead.device:
        return f"{name} must be a tensor on {lead.device} (the device of {lead_name}), got {x.device}{where}"
    if tuple(x.shape) != shape:
        return f"{name} must be of shape {list(shape)}, got {list(x.shape)}{where}"
    if x.dtype != dtype:
        if dtype == torch.bool:
            return f"{name} must be a bool tensor, got {c10_name(x.dtype)}{where}"
        return (f"{name} must be {c10_name(dtype)} (the compute dtype of {c10_name(lead.dtype)} latents), "
                f"got {c10_name(x.dtype)}{where}")
    return f"{name} must be contiguous{where}"


def check_rows(op: str, lead: torch.Tensor, lead_name: str, bools: tuple = (), **rows) -> None:
    """The per-row inputs ``rows`` of the op ``op`` against its first latent ``lead`` (``[B, ...]``,
    checked by :func:`check_latents`): each must be a contiguous ``[B]`` tensor on ``lead``'s device
    of the compute dtype (:func:`compute_dtype` of ``lead``'s), ``torch.bool`` for the names in
    ``bools``; the kernels read them by raw row index, so a strided, stride-0 expanded, short or
    mistyped tensor would be misread (or read out of bounds). The C++ backend's contract and order;
    raises :class:`KernelInputError`. Pass only the inputs that are present (``None`` is rejected).
    Metadata only: no device read, no host sync."""
    shape, dev = (lead.shape[0],), lead.device
    cd = torch.float64 if lead.dtype is torch.float64 else torch.float32
    for name, x in rows.items():
        want = torch.bool if name in bools else cd
        try:   # a non-tensor has no such attributes: reported by row_error
            ok = x.dtype is want and x.shape == shape and x.device == dev and x.is_contiguous()
        except AttributeError:
            ok = False
        if not ok:
            raise KernelInputError(row_error(op, name, x, shape, want, lead, lead_name))


def check_tensor(op: str, name: str, x, shape: tuple, dtype: torch.dtype, lead: torch.Tensor, lead_name: str) -> None:
    """One per-row input of another shape (``fp_bwd``'s ``coef``, ``[B, 2]``): :func:`check_rows`'s rules."""
    try:
        ok = x.dtype is dtype and x.shape == shape and x.device == lead.device and x.is_contiguous()
    except AttributeError:
        ok = False
    if not ok:
        raise KernelInputError(row_error(op, name, x, shape, dtype, lead, lead_name))


def device_guard(t: torch.Tensor):
    """Triton launches on the current CUDA device: switch to ``t``'s device when it differs."""
    if t.device.type == "cuda" and t.device.index is not None and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device.index)
    return _NULL


class _Null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


_NULL = _Null()


def epilogue_grid(B: int) -> tuple[int]:
    return (cdiv(B, EPI_BLOCK_B),)


@triton.jit
def sum_partials(ws_ptr, rows, rmask, n_chunks, K: tl.constexpr, k: tl.constexpr, ACC: tl.constexpr,
                 BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    """Row sums of the partials ``ws[rows, :, k]`` of a ``[B, n_chunks, K]`` workspace, for a block
    of rows: a ``[BLOCK_B, BLOCK_C]`` accumulator swept over the chunks, then one reduction over
    its columns (a fixed order for a given compiled kernel, hence deterministic)."""
    cols = tl.arange(0, BLOCK_C)
    acc = tl.zeros([BLOCK_B, BLOCK_C], ACC)
    base = rows.to(tl.int64)[:, None] * n_chunks
    for c0 in range(0, n_chunks, BLOCK_C):
        cc = c0 + cols
        m = rmask[:, None] & (cc < n_chunks)[None, :]
        acc += tl.load(ws_ptr + (base + cc[None, :]) * K + k, mask=m, other=0.0).to(ACC)
    return tl.sum(acc, axis=1)


@triton.jit
def chunk_bounds(n, chunk_len, BLOCK: tl.constexpr):
    """For program ``(b, c)`` of a ``(B, n_chunks)`` grid: the int64 offset of its chunk in the
    flat ``[B * n]`` tensor, the chunk's length ``hi`` and ``n_full`` (its full tiles' extent)."""
    b = tl.program_id(0)
    c = tl.program_id(1)
    start = c * chunk_len
    hi = tl.minimum(n - start, chunk_len)
    n_full = (hi // BLOCK) * BLOCK
    return b, b.to(tl.int64) * n + start, hi, n_full

