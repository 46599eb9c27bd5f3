"""Triton kernels of the forward-process loss (DiffusionNFT / AWM): the contract of
:func:`rsm_fast.ops.decomposed_fp.fp_fwd` / :func:`~rsm_fast.ops.decomposed_fp.fp_bwd`, same signatures.

Forward (2 launches):
  1. ``_fp_partials`` on the grid ``(B, n_chunks)``: each program sums its chunk's six row
     statistics (NFT ``ep^2, en^2, |ep|, |en|, e^2, f^2``; AWM ``m^2, 0, 0, 0, e^2, f^2``) into
     ``ws[b, c, 0:6]``.
  2. ``_fp_epilogue``, one program per block of rows: reduces the partials in a fixed order and
     runs the per-row epilogue line by line ``decomposed_fp.fp_epilogue`` (kind, weighting, the
     off-policy ratio and the KL terms are compile-time branches).
Backward (1 launch): ``_fp_grad`` on ``(B, n_chunks)`` forms the four per-row coefficients once
and writes ``grad = k0 X0 + k1 X1 + ke e + kf f`` in the latent dtype.

Every per-row input is checked here (:func:`rsm_fast.kernels._launch.check_rows`, the C++ backend's
contract): a strided or mistyped ``[B]`` tensor would otherwise be read as if it were contiguous
compute-dtype data.
"""

import functools

import torch
import triton
import triton.language as tl

from . import _launch as L
from ._direct import direct

NSUMS = 6                   # decomposed_fp.NSUMS
NFT_WEIGHT_FLOOR = 1e-5     # decomposed_fp.NFT_WEIGHT_FLOOR
AWM_MSE_EPS = 1e-10         # decomposed_fp.AWM_MSE_EPS
HUBER_OFFSET = 1e-5         # decomposed_fp.HUBER_OFFSET
N_WEIGHTINGS = 5            # len(decomposed_fp.WEIGHTINGS)
# Jitted code may only read constexpr globals.
_NFT_FLOOR = tl.constexpr(NFT_WEIGHT_FLOOR)
_MSE_EPS = tl.constexpr(AWM_MSE_EPS)
_HUBER = tl.constexpr(HUBER_OFFSET)


@triton.jit
def _fp_tile(v_ptr, vo_ptr, xa_ptr, x0_ptr, vr_ptr, ve_ptr, t, tb, offs, mask, other, KIND: tl.constexpr,
             HAS_REF: tl.constexpr, HAS_EMA: tl.constexpr, ACC: tl.constexpr):
    """Elementwise ``(X0, X1, e, f)`` of one tile (``mask = other = None`` for a full tile); the
    absent parts are zeros, which the compiler drops. Masked lanes give zeros in every part."""
    v = tl.load(v_ptr + offs, mask=mask, other=other).to(ACC)
    dx = tl.load(xa_ptr + offs, mask=mask, other=other).to(ACC) - tl.load(x0_ptr + offs, mask=mask,
                                                                            other=other).to(ACC)
    if KIND == 0:
        vo = tl.load(vo_ptr + offs, mask=mask, other=other).to(ACC)
        c = dx - t * vo
        d = v - vo
        X0 = c - tb * d
        X1 = c + tb * d
    else:
        X0 = v - dx
        X1 = tl.zeros_like(X0)
    if HAS_REF:
        e = v - tl.load(vr_ptr + offs, mask=mask, other=other).to(ACC)
    else:
        e = tl.zeros_like(X0)
    if HAS_EMA:
        f = v - tl.load(ve_ptr + offs, mask=mask, other=other).to(ACC)
    else:
        f = tl.zeros_like(X0)
    return X0, X1, e, f


@direct
@triton.jit
def _fp_partials(v_ptr, vo_ptr, xa_ptr, x0_ptr, vr_ptr, ve_ptr, t_ptr, ws_ptr, n, chunk_len, n_chunks,
                 beta_in: "fp64", KIND: tl.constexpr, HAS_REF: tl.constexpr, HAS_EMA: tl.constexpr,
                 ACC: tl.constexpr, BLOCK: tl.constexpr):
    """ws[b, c, :] = the six row statistics over chunk c of row b (module docstring)."""
    b, row0, hi, n_full = L.chunk_bounds(n, chunk_len, BLOCK)
    t = tl.load(t_ptr + b).to(ACC)
    tb = t * tl.full((), beta_in, ACC)  # (t beta) rounded once per row, as decomposed_fp does
    v_ptr += row0
    vo_ptr += row0
    xa_ptr += row0
    x0_ptr += row0
    vr_ptr += row0
    ve_ptr += row0
    a_00 = tl.zeros([BLOCK], ACC)
    a_11 = tl.zeros([BLOCK], ACC)
    a_0 = tl.zeros([BLOCK], ACC)
    a_1 = tl.zeros([BLOCK], ACC)
    a_ee = tl.zeros([BLOCK], ACC)
    a_ff = tl.zeros([BLOCK], ACC)
    for i in range(0, n_full, BLOCK):                       # full tiles, unmasked
        offs = tl.max_contiguous(tl.multiple_of(i + tl.arange(0, BLOCK), BLOCK), BLOCK)
        X0, X1, e, f = _fp_tile(v_ptr, vo_ptr, xa_ptr, x0_ptr, vr_ptr, ve_ptr, t, tb, offs, None, None,
                                KIND, HAS_REF, HAS_EMA, ACC)
        a_00 += X0 * X0
        a_11 += X1 * X1
        a_0 += tl.abs(X0)
        a_1 += tl.abs(X1)
        a_ee += e * e
        a_ff += f * f
    offs = n_full + tl.arange(0, BLOCK)                    # masked tail (empty on most chunks)
    X0, X1, e, f = _fp_tile(v_ptr, vo_ptr, xa_ptr, x0_ptr, vr_ptr, ve_ptr, t, tb, offs, offs < hi, 0.0,
                            KIND, HAS_REF, HAS_EMA, ACC)
    out = ws_ptr + (b.to(tl.int64) * n_chunks + tl.program_id(1)) * 6
    tl.store(out + 0, tl.sum(a_00 + X0 * X0, axis=0))
    # AWM's slots 1..3 are written as zeros so the workspace is fully defined (the epilogue skips them).
    tl.store(out + 1, tl.sum(a_11 + X1 * X1, axis=0))
    tl.store(out + 2, tl.sum(a_0 + tl.abs(X0), axis=0))
    tl.store(out + 3, tl.sum(a_1 + tl.abs(X1), axis=0))
    tl.store(out + 4, tl.sum(a_ee + e * e, axis=0))
    tl.store(out + 5, tl.sum(a_ff + f * f, axis=0))


@direct
@triton.jit
def _fp_epilogue(ws_ptr, t_ptr, w_ptr, lpo_ptr, klc_ptr, emac_ptr, loss_ptr, pol_ptr, kl_ptr, ema_ptr, aux_ptr,
                 clip_ptr, coef_ptr, B, n_chunks, norm_in: "fp64", beta_in: "fp64", scale_in: "fp64",
                 power_in: "fp64", floor_in: "fp64", lo_in: "fp64", hi_in: "fp64", KIND: tl.constexpr,
                 WEIGHTING: tl.constexpr, HAS_LOGP_OLD: tl.constexpr, HAS_REF: tl.constexpr,
                 HAS_EMA: tl.constexpr, ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per-row epilogue of the forward-process loss for BLOCK_B rows (mirrors ``fp_epilogue``)."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rm = rows < B
    norm = tl.full((), norm_in, ACC)
    t = tl.load(t_ptr + rows, mask=rm, other=0.0).to(ACC)
    w = tl.load(w_ptr + rows, mask=rm, other=0.0).to(ACC)
    zero = tl.zeros([BLOCK_B], ACC)
    one = tl.full([BLOCK_B], 1.0, ACC)
    S0 = L.sum_partials(ws_ptr, rows, rm, n_chunks, 6, 0, ACC, BLOCK_B, BLOCK_C)
    if KIND == 0:
        scale = tl.full((), scale_in, ACC)
        two_scale = tl.full((), 2.0 * scale_in, ACC)  # torch's `2.0 * scale * t`: 2C in double, rounded once
        floor = tl.full((), _NFT_FLOOR, ACC)
        S1 = L.sum_partials(ws_ptr, rows, rm, n_chunks, 6, 1, ACC, BLOCK_B, BLOCK_C)
        S2 = L.sum_partials(ws_ptr, rows, rm, n_chunks, 6, 2, ACC, BLOCK_B, BLOCK_C)
        S3 = L.sum_partials(ws_ptr, rows, rm, n_chunks, 6, 3, ACC, BLOCK_B, BLOCK_C)
        # PropagateNan.ALL wherever torch's clamp / maximum would propagate a nan (CUDA's default drops it)
        w_pos = tl.maximum(norm * S2, floor, propagate_nan=tl.PropagateNan.ALL)
        w_neg = tl.maximum(norm * S3, floor, propagate_nan=tl.PropagateNan.ALL)
        l_pos = norm * S0 / w_pos
        l_neg = norm * S1 / w_neg
        policy = scale * (w * l_pos + (1.0 - w) * l_neg) / tl.full((), beta_in, ACC)
        d0 = -two_scale * t * w / w_pos
        d1 = two_scale * t * (1.0 - w) / w_neg
        a0, a1, a2, a3 = w_pos, w_neg, l_pos, l_neg
        clipped = zero != zero                      # all False
    else:
        eps = tl.full((), _MSE_EPS, ACC)
        mse = norm * S0
        if WEIGHTING == 0:      # uniform
            lp = -mse
            dl = -one
        elif WEIGHTING == 1:    # t
            lp = -mse * t
            dl = -t
        elif WEIGHTING == 2:    # t**2
            lp = -mse * t * t
            dl = -t * t
        elif WEIGHTING == 3:    # huber
            if ACC == tl.float32:
                q = tl.sqrt_rn(mse + eps)   # tl.sqrt is approximate in fp32 on CUDA
            else:
                q = tl.sqrt(mse + eps)      # fp64 sqrt is IEEE already
            lp = -(q - tl.full((), _HUBER, ACC)) * t
            dl = -0.5 * t / q
        else:                   # ghuber; x**p as exp2(p log2 x): libdevice pow has no interpreter twin
            power = tl.full((), power_in, ACC)
            q = tl.exp2(power * tl.log2(mse + eps))
            lp = -(q - tl.full((), floor_in, ACC)) * t / power
            dl = -t * q / (mse + eps)
        if HAS_LOGP_OLD:
            ratio = tl.exp(lp - tl.load(lpo_ptr + rows, mask=rm, other=0.0).to(ACC))
        else:
            ratio = one                             # the on-policy pass: exactly 1
        lo = tl.full((), lo_in, ACC)                # 1 - c and 1 + c in double, rounded once as in torch
        hi = tl.full((), hi_in, ACC)
        rc = tl.minimum(tl.maximum(ratio, lo, propagate_nan=tl.PropagateNan.ALL), hi,
                        propagate_nan=tl.PropagateNan.ALL)
        pu = tl.where(w == 0, zero, -w * ratio)     # 0 * inf would be nan where A' = 0
        pc = -w * rc
        policy = tl.maximum(pu, pc, propagate_nan=tl.PropagateNan.ALL)
        inside = (ratio >= lo) & (ratio <= hi)
        dpdr = tl.where(inside | (pu > pc), -w, zero)
        clipped = ((w > 0) & (ratio > hi)) | ((w < 0) & (ratio < lo))
        d0 = tl.where(dpdr == 0, zero, 2.0 * dpdr * ratio * dl)     # 0, not 0 * inf, on a clipped overflow
        d1 = zero
        a0, a1, a2, a3 = lp, ratio, mse, zero
    if HAS_REF:
        kl = norm * L.sum_partials(ws_ptr, rows, rm, n_chunks, 6, 4, ACC, BLOCK_B, BLOCK_C)
    else:
        kl = zero
    if HAS_EMA:
        ema_kl = norm * L.sum_partials(ws_ptr, rows, rm, n_chunks, 6, 5, ACC, BLOCK_B, BLOCK_C)
    else:
        ema_kl = zero
    klc = tl.load(klc_ptr + rows, mask=rm, other=0.0).to(ACC)
    emac = tl.load(emac_ptr + rows, mask=rm, other=0.0).to(ACC)
    tl.store(loss_ptr + rows, policy + klc * kl + emac * ema_kl, mask=rm)
    tl.store(pol_ptr + rows, policy, mask=rm)
    tl.store(kl_ptr + rows, kl, mask=rm)
    tl.store(ema_ptr + rows, ema_kl, mask=rm)
    tl.store(aux_ptr + rows * 4 + 0, a0, mask=rm)
    tl.store(aux_ptr + rows * 4 + 1, a1, mask=rm)
    tl.store(aux_ptr + rows * 4 + 2, a2, mask=rm)
    tl.store(aux_ptr + rows * 4 + 3, a3, mask=rm)
    tl.store(clip_ptr + rows, clipped.to(tl.uint8), mask=rm)
    tl.store(coef_ptr + rows * 2 + 0, d0, mask=rm)
    tl.store(coef_ptr + rows * 2 + 1, d1, mask=rm)


@triton.jit
def _fp_grad_tile(g_ptr, v_ptr, vo_ptr, xa_ptr, x0_ptr, vr_ptr, ve_ptr, t, tb, k0, k1, ke, kf, offs, mask, other,
                  KIND: tl.constexpr, HAS_REF: tl.constexpr, HAS_EMA: tl.constexpr, ACC: tl.constexpr):
    X0, X1, e, f = _fp_tile(v_ptr, vo_ptr, xa_ptr, x0_ptr, vr_ptr, ve_ptr, t, tb, offs, mask, other,
                            KIND, HAS_REF, HAS_EMA, ACC)
    grad = k0 * X0
    if KIND == 0:
        grad += k1 * X1
    if HAS_REF:
        grad += ke * e
    if HAS_EMA:
        grad += kf * f
    tl.store(g_ptr + offs, grad.to(g_ptr.dtype.element_ty), mask=mask)


@direct
@triton.jit
def _fp_grad(g_ptr, v_ptr, vo_ptr, xa_ptr, x0_ptr, vr_ptr, ve_ptr, gl_ptr, gp_ptr, gk_ptr, ge_ptr, t_ptr, klc_ptr,
             emac_ptr, coef_ptr, n, chunk_len, norm_in: "fp64", beta_in: "fp64", KIND: tl.constexpr,
             HAS_REF: tl.constexpr, HAS_EMA: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """grad[b, chunk c] = k0 X0 + k1 X1 + ke e + kf f, in g's dtype."""
    b, row0, hi, n_full = L.chunk_bounds(n, chunk_len, BLOCK)
    norm = tl.full((), norm_in, ACC)
    t = tl.load(t_ptr + b).to(ACC)
    tb = t * tl.full((), beta_in, ACC)
    gl = tl.load(gl_ptr + b).to(ACC)
    gP = gl + tl.load(gp_ptr + b).to(ACC)
    k0 = gP * tl.load(coef_ptr + b * 2).to(ACC) * norm
    k1 = gP * tl.load(coef_ptr + b * 2 + 1).to(ACC) * norm
    ke = 2.0 * norm * (gl * tl.load(klc_ptr + b).to(ACC) + tl.load(gk_ptr + b).to(ACC))
    kf = 2.0 * norm * (gl * tl.load(emac_ptr + b).to(ACC) + tl.load(ge_ptr + b).to(ACC))
    g_ptr += row0
    v_ptr += row0
    vo_ptr += row0
    xa_ptr += row0
    x0_ptr += row0
    vr_ptr += row0
    ve_ptr += row0
    for i in range(0, n_full, BLOCK):                       # full tiles, unmasked
        offs = tl.max_contiguous(tl.multiple_of(i + tl.arange(0, BLOCK), BLOCK), BLOCK)
        _fp_grad_tile(g_ptr, v_ptr, vo_ptr, xa_ptr, x0_ptr, vr_ptr, ve_ptr, t, tb, k0, k1, ke, kf, offs, None, None,
                      KIND, HAS_REF, HAS_EMA, ACC)
    offs = n_full + tl.arange(0, BLOCK)                    # masked tail
    _fp_grad_tile(g_ptr, v_ptr, vo_ptr, xa_ptr, x0_ptr, vr_ptr, ve_ptr, t, tb, k0, k1, ke, kf, offs, offs < hi, 0.0,
                  KIND, HAS_REF, HAS_EMA, ACC)


# ---------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------
def _check_modes(kind: int, weighting: int, v_old) -> None:
    if kind not in (0, 1):
        raise L.KernelInputError(f"kind must be 0 (nft) or 1 (awm), got {kind!r}")
    if weighting not in range(N_WEIGHTINGS):
        raise L.KernelInputError(f"weighting must be in 0..{N_WEIGHTINGS - 1}, got {weighting!r}")
    if kind == 0 and v_old is None:
        raise L.KernelInputError("v_old is required for kind 0 (nft)")


# The forward's outputs share one allocation: an [FP_K, B] compute-dtype block holding, in order,
# loss, policy, kl, ema_kl (one row each), aux ([B, 4] row-major over rows 4..7), coef ([B, 2]
# over rows 8..9) and the bool ``clipped`` (the first B bytes of row 10); the partial sums follow.
FP_K = 11
_WIDTHS = (1, 1, 1, 1, 4, 2, 1)     # loss, policy, kl, ema_kl, aux, coef, clipped


@functools.lru_cache(maxsize=None)
def _ghuber_floor(cd: torch.dtype, power: float) -> float:
    """ghuber's floor (1e-10)**p, rounded exactly as decomposed_fp forms it (in the compute dtype)."""
    return float(torch.pow(torch.tensor(AWM_MSE_EPS, dtype=cd), float(power)))


def fp_fwd(v, v_old, xa, x0, v_ref, v_ema, t, w, logp_old, kl_coef, ema_coef, kind: int, beta: float, scale: float,
           weighting: int, power: float, clip: float, mean: bool):
    """-> ``(loss, policy, kl, ema_kl, aux [B, 4], clipped [B] bool, coef [B, 2])`` in the compute
    dtype: views of one ``[FP_K, B]`` block (see ``FP_K``)."""
    _check_modes(kind, weighting, v_old)
    L.check_latents(v, v_old if kind == 0 else None, xa, x0, v_ref, v_ema)
    if logp_old is None:
        L.check_rows("fp_fwd", v, "v", t=t, w=w, kl_coef=kl_coef, ema_coef=ema_coef)
    else:
        L.check_rows("fp_fwd", v, "v", t=t, w=w, logp_old=logp_old, kl_coef=kl_coef, ema_coef=ema_coef)
    return fp_fwd_unchecked(v, v_old, xa, x0, v_ref, v_ema, t, w, logp_old, kl_coef, ema_coef, kind, beta, scale,
                            weighting, power, clip, mean)


def fp_fwd_unchecked(v, v_old, xa, x0, v_ref, v_ema, t, w, logp_old, kl_coef, ema_coef, kind: int, beta: float,
                     scale: float, weighting: int, power: float, clip: float, mean: bool):
    """:func:`fp_fwd` without its argument checks, for a caller that has established the contract
    (``rsm_fast.ops``' eager path, behind its API's checks): no per-call validation."""
    kind, weighting = int(kind), int(weighting)
    B, p = v.shape[0], L.plan(v)
    dev = v.device
    cd = torch.float64 if v.dtype is torch.float64 else torch.float32
    acc = tl.float64 if cd is torch.float64 else tl.float32
    loss, policy, kl, ema_kl, aux, coef, clip_row, ws = L.alloc_rows(B, _WIDTHS, cd, dev, B * p.n_chunks * NSUMS)
    aux, coef, clip_bytes = aux.view(B, 4), coef.view(B, 2), L.bytes_row(clip_row)
    out = (loss, policy, kl, ema_kl, aux, clip_bytes[:B].view(torch.bool), coef)
    if B == 0:
        return out
    has_ref, has_ema, has_lpo = v_ref is not None, v_ema is not None, logp_old is not None
    floor = _ghuber_floor(cd, float(power))
    with L.device_guard(v):
        _fp_partials[p.grid](v, v_old if kind == 0 else v, xa, x0, v_ref if has_ref else v,
                             v_ema if has_ema else v, t, ws, p.n, p.chunk_len, p.n_chunks, float(beta),
                             KIND=kind, HAS_REF=has_ref, HAS_EMA=has_ema, ACC=acc, BLOCK=p.block,
                             num_warps=p.num_warps)
        _fp_epilogue[p.epi_grid](
            ws, t, w, logp_old if has_lpo else t, kl_coef, ema_coef, loss, policy, kl, ema_kl, aux, clip_bytes, coef,
            B, p.n_chunks, L.norm_of(p.n, mean), float(beta), float(scale), float(power), floor, 1.0 - clip,
            1.0 + clip, KIND=kind, WEIGHTING=weighting, HAS_LOGP_OLD=has_lpo, HAS_REF=has_ref, HAS_EMA=has_ema,
            ACC=acc, BLOCK_B=L.EPI_BLOCK_B, BLOCK_C=L.EPI_BLOCK_C, num_warps=4)
    return out


def fp_bwd(g_loss, g_policy, g_kl, g_ema, v, v_old, xa, x0, v_ref, v_ema, t, kl_coef, ema_coef, coef, kind: int,
           beta: float, mean: bool):
    """Gradient of ``sum(g_loss loss + g_policy policy + g_kl kl + g_ema ema_kl)`` w.r.t. ``v``, in ``v``'s dtype."""
    _check_modes(kind, 0, v_old)
    L.check_latents(v, v_old if kind == 0 else None, xa, x0, v_ref, v_ema)
    L.check_rows("fp_bwd", v, "v", g_loss=g_loss, g_policy=g_policy, g_kl=g_kl, g_ema=g_ema, t=t, kl_coef=kl_coef,
                 ema_coef=ema_coef)
    L.check_tensor("fp_bwd", "coef", coef, (v.shape[0], 2), L.compute_dtype(v.dtype), v, "v")
    return fp_bwd_unchecked(g_loss, g_policy, g_kl, g_ema, v, v_old, xa, x0, v_ref, v_ema, t, kl_coef, ema_coef, coef,
                            kind, beta, mean)


def fp_bwd_unchecked(g_loss, g_policy, g_kl, g_ema, v, v_old, xa, x0, v_ref, v_ema, t, kl_coef, ema_coef, coef,
                     kind: int, beta: float, mean: bool):
    """:func:`fp_bwd` without its argument checks."""
    kind = int(kind)
    B, p = v.shape[0], L.plan(v)
    n = p.n
    grad = torch.empty_like(v)
    if B == 0 or n == 0:
        return grad
    has_ref, has_ema = v_ref is not None, v_ema is not None
    with L.device_guard(v):
        _fp_grad[p.grid](grad, v, v_old if kind == 0 else v, xa, x0, v_ref if has_ref else v,
                         v_ema if has_ema else v, g_loss, g_policy, g_kl, g_ema, t, kl_coef, ema_coef, coef,
                         n, p.chunk_len, L.norm_of(n, mean), float(beta), KIND=kind, HAS_REF=has_ref,
                         HAS_EMA=has_ema, ACC=L.acc_type(v.dtype), BLOCK=p.block, num_warps=p.num_warps)
    return grad
