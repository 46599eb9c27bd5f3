"""Triton kernels of the score-regression loss (spec §3.2): the contract of
:func:`rsm_fast.ops.decomposed.score_fwd` / :func:`~rsm_fast.ops.decomposed.score_bwd`, same signatures.

With ``t = s - s_ref - gamma psi`` and ``o = s - s_old`` (``gamma``, ``c1``, ``c2`` per row):

Forward (2 launches):
  1. ``_score_partials`` on the grid ``(B, n_chunks)``: ``ws[b, c] = (sum t^2, sum o^2)`` over chunk c.
  2. ``_score_epilogue``, one program per block of rows: fixed-order sum of the partials, then
     ``loss = c1 norm (sum t^2 + c2 sum o^2)``.
Backward (1 launch): ``_score_grad`` on ``(B, n_chunks)`` writes ``grad = 2 g c1 norm (t + c2 o)``
in the latent dtype.
"""

import torch
import triton
import triton.language as tl

from . import _launch as L
from ._direct import direct


@triton.jit
def _score_tile(s_ptr, sr_ptr, psi_ptr, so_ptr, gamma, offs, mask, other, HAS_OLD: tl.constexpr,
                ACC: tl.constexpr):
    """Elementwise ``(t, o)`` of one tile (``mask = other = None`` for a full tile; ``o = 0``
    without ``s_old``)."""
    s = tl.load(s_ptr + offs, mask=mask, other=other).to(ACC)
    t = s - tl.load(sr_ptr + offs, mask=mask, other=other).to(ACC)
    t = t - gamma * tl.load(psi_ptr + offs, mask=mask, other=other).to(ACC)
    if HAS_OLD:
        o = s - tl.load(so_ptr + offs, mask=mask, other=other).to(ACC)
    else:
        o = tl.zeros_like(t)
    return t, o


@direct
@triton.jit
def _score_partials(s_ptr, sr_ptr, psi_ptr, so_ptr, gamma_ptr, ws_ptr, n, chunk_len, n_chunks,
                    HAS_OLD: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """ws[b, c, :] = (sum t^2, sum o^2) over chunk c of row b."""
    b, row0, hi, n_full = L.chunk_bounds(n, chunk_len, BLOCK)
    gamma = tl.load(gamma_ptr + b).to(ACC)
    s_ptr += row0
    sr_ptr += row0
    psi_ptr += row0
    so_ptr += row0
    a_tt = tl.zeros([BLOCK], ACC)
    a_oo = tl.zeros([BLOCK], ACC)
    for i in range(0, n_full, BLOCK):                       # full tiles, unmasked
        offs = tl.max_contiguous(tl.multiple_of(i + tl.arange(0, BLOCK), BLOCK), BLOCK)
        t, o = _score_tile(s_ptr, sr_ptr, psi_ptr, so_ptr, gamma, offs, None, None, HAS_OLD, ACC)
        a_tt += t * t
        a_oo += o * o
    offs = n_full + tl.arange(0, BLOCK)                    # masked tail
    t, o = _score_tile(s_ptr, sr_ptr, psi_ptr, so_ptr, gamma, offs, offs < hi, 0.0, HAS_OLD, ACC)
    out = ws_ptr + (b.to(tl.int64) * n_chunks + tl.program_id(1)) * 2
    tl.store(out + 0, tl.sum(a_tt + t * t, axis=0))
    tl.store(out + 1, tl.sum(a_oo + o * o, axis=0))


@direct
@triton.jit
def _score_epilogue(ws_ptr, c1_ptr, c2_ptr, loss_ptr, B, n_chunks, norm_in: "fp64", HAS_OLD: tl.constexpr,
                    ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    """loss = c1 norm (sum t^2 + c2 sum o^2) for BLOCK_B rows."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rm = rows < B
    acc = L.sum_partials(ws_ptr, rows, rm, n_chunks, 2, 0, ACC, BLOCK_B, BLOCK_C)
    if HAS_OLD:
        c2 = tl.load(c2_ptr + rows, mask=rm, other=0.0).to(ACC)
        acc = acc + c2 * L.sum_partials(ws_ptr, rows, rm, n_chunks, 2, 1, ACC, BLOCK_B, BLOCK_C)
    c1 = tl.load(c1_ptr + rows, mask=rm, other=0.0).to(ACC)
    tl.store(loss_ptr + rows, c1 * tl.full((), norm_in, ACC) * acc, mask=rm)


@triton.jit
def _score_grad_tile(g_ptr, s_ptr, sr_ptr, psi_ptr, so_ptr, gamma, k, c2, offs, mask, other,
                     HAS_OLD: tl.constexpr, ACC: tl.constexpr):
    t, o = _score_tile(s_ptr, sr_ptr, psi_ptr, so_ptr, gamma, offs, mask, other, HAS_OLD, ACC)
    if HAS_OLD:
        t = t + c2 * o
    tl.store(g_ptr + offs, (k * t).to(g_ptr.dtype.element_ty), mask=mask)


@direct
@triton.jit
def _score_grad(g_ptr, s_ptr, sr_ptr, psi_ptr, so_ptr, gl_ptr, c1_ptr, gamma_ptr, c2_ptr, n, chunk_len,
                norm_in: "fp64", HAS_OLD: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """grad[b, chunk c] = 2 g c1 norm (t + c2 o), in g's dtype."""
    b, row0, hi, n_full = L.chunk_bounds(n, chunk_len, BLOCK)
    k = 2.0 * tl.load(gl_ptr + b).to(ACC) * tl.load(c1_ptr + b).to(ACC) * tl.full((), norm_in, ACC)
    gamma = tl.load(gamma_ptr + b).to(ACC)
    c2 = tl.load(c2_ptr + b).to(ACC)
    g_ptr += row0
    s_ptr += row0
    sr_ptr += row0
    psi_ptr += row0
    so_ptr += row0
    for i in range(0, n_full, BLOCK):                       # full tiles, unmasked
        offs = tl.max_contiguous(tl.multiple_of(i + tl.arange(0, BLOCK), BLOCK), BLOCK)
        _score_grad_tile(g_ptr, s_ptr, sr_ptr, psi_ptr, so_ptr, gamma, k, c2, offs, None, None, HAS_OLD, ACC)
    offs = n_full + tl.arange(0, BLOCK)                    # masked tail
    _score_grad_tile(g_ptr, s_ptr, sr_ptr, psi_ptr, so_ptr, gamma, k, c2, offs, offs < hi, 0.0, HAS_OLD, ACC)


def score_fwd(s, s_ref, psi, s_old, c1, gamma, c2, mean: bool):
    """-> ``loss [B]`` in the compute dtype (the partial sums share its allocation)."""
    L.check_latents(s, s_ref, psi, s_old)
    L.check_rows("score_fwd", s, "s", c1=c1, gamma=gamma, c2=c2)
    return score_fwd_unchecked(s, s_ref, psi, s_old, c1, gamma, c2, mean)


def score_fwd_unchecked(s, s_ref, psi, s_old, c1, gamma, c2, mean: bool):
    """:func:`score_fwd` without its argument checks, for a caller that has established the
    contract (``rsm_fast.ops``' eager path, behind its API's checks)."""
    B, p = s.shape[0], L.plan(s)
    cd = torch.float64 if s.dtype is torch.float64 else torch.float32
    loss, ws = L.alloc_rows(B, (1,), cd, s.device, B * p.n_chunks * 2)
    if B == 0:
        return loss
    has_old = s_old is not None
    acc = tl.float64 if cd is torch.float64 else tl.float32
    with L.device_guard(s):
        _score_partials[p.grid](s, s_ref, psi, s_old if has_old else s, gamma, ws, p.n, p.chunk_len, p.n_chunks,
                                HAS_OLD=has_old, ACC=acc, BLOCK=p.block, num_warps=p.num_warps)
        _score_epilogue[p.epi_grid](ws, c1, c2, loss, B, p.n_chunks, L.norm_of(p.n, mean), HAS_OLD=has_old,
                                    ACC=acc, BLOCK_B=L.EPI_BLOCK_B, BLOCK_C=L.EPI_BLOCK_C, num_warps=4)
    return loss


def score_bwd(g_loss, s, s_ref, psi, s_old, c1, gamma, c2, mean: bool):
    """Gradient of ``sum(g_loss loss)`` w.r.t. ``s``, in ``s``'s dtype."""
    L.check_latents(s, s_ref, psi, s_old)
    L.check_rows("score_bwd", s, "s", c1=c1, gamma=gamma, c2=c2, g_loss=g_loss)
    return score_bwd_unchecked(g_loss, s, s_ref, psi, s_old, c1, gamma, c2, mean)


def score_bwd_unchecked(g_loss, s, s_ref, psi, s_old, c1, gamma, c2, mean: bool):
    """:func:`score_bwd` without its argument checks."""
    grad = torch.empty_like(s)
    B, p = s.shape[0], L.plan(s)
    if B == 0 or p.n == 0:
        return grad
    has_old = s_old is not None
    with L.device_guard(s):
        _score_grad[p.grid](grad, s, s_ref, psi, s_old if has_old else s, g_loss, c1, gamma, c2, p.n,
                            p.chunk_len, L.norm_of(p.n, mean), HAS_OLD=has_old,
                            ACC=L.acc_type(s.dtype), BLOCK=p.block, num_warps=p.num_warps)
    return grad
