"""Triton kernels of the sampler step fused with its log-prob (spec §2): the contract of
:func:`rsm_fast.ops.decomposed.step_fwd`, same signature.

Two launches:
  1. ``_step_partials`` on the grid ``(B, n_chunks)``: writes ``x' = c_x x + c_f f + sigma z``
     (the noise is dropped on ODE rows, whose ``z`` is not even read) in ``x``'s dtype, and
     ``ws[b, c] = sum z^2`` over chunk c.
  2. ``_step_epilogue``, one program per block of rows: fixed-order sum of the partials, then
     ``log pi(x'|x) = -norm sum z^2 / 2 - (log sigma + log sqrt(2 pi)) * (1 | n)``, 0 on ODE rows.
"""

import torch
import triton
import triton.language as tl

from . import _launch as L
from ._direct import direct


@triton.jit
def _step_tile(x_ptr, f_ptr, z_ptr, xn_ptr, c_x, c_f, s_eff, offs, mask, other, zmask, ACC: tl.constexpr):
    """Writes x' on one tile and returns z^2 (0 where ``zmask`` is off). ``mask = other = None``
    for a full tile."""
    x = tl.load(x_ptr + offs, mask=mask, other=other).to(ACC)
    f = tl.load(f_ptr + offs, mask=mask, other=other).to(ACC)
    z = tl.load(z_ptr + offs, mask=zmask, other=0.0).to(ACC)
    xn = c_x * x + c_f * f + s_eff * z
    tl.store(xn_ptr + offs, xn.to(xn_ptr.dtype.element_ty), mask=mask)
    return z * z


@direct
@triton.jit
def _step_partials(x_ptr, f_ptr, z_ptr, xn_ptr, cx_ptr, cf_ptr, sigma_ptr, st_ptr, ws_ptr, n, chunk_len, n_chunks,
                   ACC: tl.constexpr, BLOCK: tl.constexpr):
    """x'[b, chunk c] = c_x x + c_f f + sigma z (noise only on stochastic rows); ws[b, c] = sum z^2."""
    b, row0, hi, n_full = L.chunk_bounds(n, chunk_len, BLOCK)
    c_x = tl.load(cx_ptr + b).to(ACC)
    c_f = tl.load(cf_ptr + b).to(ACC)
    st = tl.load(st_ptr + b) != 0
    s_eff = tl.where(st, tl.load(sigma_ptr + b).to(ACC), 0.0)
    # z is read only on stochastic rows: a row-uniform mask (splat, so full tiles still vectorise).
    zm = tl.full([BLOCK], 0, tl.int32) + st.to(tl.int32) != 0
    x_ptr += row0
    f_ptr += row0
    z_ptr += row0
    xn_ptr += row0
    a_zz = tl.zeros([BLOCK], ACC)
    for i in range(0, n_full, BLOCK):                       # full tiles, unmasked (but z)
        offs = tl.max_contiguous(tl.multiple_of(i + tl.arange(0, BLOCK), BLOCK), BLOCK)
        a_zz += _step_tile(x_ptr, f_ptr, z_ptr, xn_ptr, c_x, c_f, s_eff, offs, None, None, zm, ACC)
    offs = n_full + tl.arange(0, BLOCK)                    # masked tail
    tail = offs < hi
    a_zz += _step_tile(x_ptr, f_ptr, z_ptr, xn_ptr, c_x, c_f, s_eff, offs, tail, 0.0, tail & zm, ACC)
    tl.store(ws_ptr + b.to(tl.int64) * n_chunks + tl.program_id(1), tl.sum(a_zz, axis=0))


@direct
@triton.jit
def _step_epilogue(ws_ptr, sigma_ptr, st_ptr, lp_ptr, B, n_chunks, norm_in: "fp64", cmul_in: "fp64",
                   log_sqrt_2pi: "fp64", ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    """log_prob = -norm sum z^2 / 2 - (log sigma + log sqrt(2 pi)) cmul on stochastic rows, else 0."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rm = rows < B
    S_zz = L.sum_partials(ws_ptr, rows, rm, n_chunks, 1, 0, ACC, BLOCK_B, BLOCK_C)
    st = tl.load(st_ptr + rows, mask=rm, other=0) != 0
    sigma = tl.load(sigma_ptr + rows, mask=rm, other=1.0).to(ACC)
    sig = tl.where(st & (sigma > 0), sigma, 1.0)
    consts = (tl.log(sig) + tl.full((), log_sqrt_2pi, ACC)) * tl.full((), cmul_in, ACC)
    lp = -0.5 * S_zz * tl.full((), norm_in, ACC) - consts
    tl.store(lp_ptr + rows, tl.where(st, lp, 0.0), mask=rm)


def step_fwd(x, f, z, c_x, c_f, sigma, stochastic, mean: bool):
    """-> ``(x_next [B, ...] in x's dtype, log_prob [B] in the compute dtype)``."""
    L.check_latents(x, f, z)
    L.check_rows("step_fwd", x, "x", ("stochastic",), c_x=c_x, c_f=c_f, sigma=sigma, stochastic=stochastic)
    B, n, p = x.shape[0], L.row_len(x), L.plan(x)
    cd, acc = L.compute_dtype(x.dtype), L.acc_type(x.dtype)
    xn = torch.empty_like(x)
    lp = torch.empty(B, dtype=cd, device=x.device)
    if B == 0:
        return xn, lp
    st = stochastic.view(torch.uint8)
    ws = torch.empty((B, p.n_chunks), dtype=cd, device=x.device)
    with L.device_guard(x):
        _step_partials[p.grid](x, f, z, xn, c_x, c_f, sigma, st, ws, n, p.chunk_len, p.n_chunks,
                                        ACC=acc, BLOCK=p.block, num_warps=p.num_warps)
        _step_epilogue[p.epi_grid](ws, sigma, st, lp, B, p.n_chunks, L.norm_of(n, mean),
                                           1.0 if mean else float(n), L.LOG_SQRT_2PI, ACC=acc,
                                           BLOCK_B=L.EPI_BLOCK_B, BLOCK_C=L.EPI_BLOCK_C, num_warps=4)
    return xn, lp
