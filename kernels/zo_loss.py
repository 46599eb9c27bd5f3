"""Triton kernels of the zeroth-order (ZO) row loss: the contract of
:func:`rsm_fast.ops.decomposed.zo_fwd` / :func:`~rsm_fast.ops.decomposed.zo_bwd`, same signatures.

Forward (2 launches):
  1. ``_zo_partials`` on the grid ``(B, n_chunks)``: with ``d = f_theta - f_old`` and
     ``e = f_theta - f_ref`` each program sums ``d z``, ``d^2`` (and ``e^2``) over its chunk and
     writes them to ``ws[b, c, 0:3]``.
  2. ``_zo_epilogue``, one program per block of rows: reduces the partials in a fixed order into
     ``S_dz, S_dd, S_ee`` and runs the per-row epilogue, line by line ``decomposed.zo_epilogue``
     (form, reweight, f_ref and the kl dt weight are compile-time branches).
Backward (1 launch): ``_zo_grad`` on ``(B, n_chunks)`` forms the per-row coefficients
``c_z, c_d, c_e`` and writes ``grad = c_z z + c_d d + c_e e`` in the latent dtype.
"""

import torch
import triton
import triton.language as tl

from . import _launch as L
from ._direct import direct


@triton.jit
def _zo_tile(ft_ptr, fo_ptr, z_ptr, fr_ptr, offs, mask, other, HAS_REF: tl.constexpr, ACC: tl.constexpr):
    """Elementwise ``(d z, d^2, e^2)`` of one tile (``mask = other = None`` for a full tile)."""
    ft = tl.load(ft_ptr + offs, mask=mask, other=other).to(ACC)
    d = ft - tl.load(fo_ptr + offs, mask=mask, other=other).to(ACC)
    dz = d * tl.load(z_ptr + offs, mask=mask, other=other).to(ACC)
    if HAS_REF:
        e = ft - tl.load(fr_ptr + offs, mask=mask, other=other).to(ACC)
        ee = e * e
    else:
        ee = tl.zeros_like(d)
    return dz, d * d, ee


@direct
@triton.jit
def _zo_partials(ft_ptr, fo_ptr, z_ptr, fr_ptr, ws_ptr, n, chunk_len, n_chunks,
                 HAS_REF: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """ws[b, c, :] = (sum d z, sum d^2, sum e^2) over chunk c of row b."""
    b, row0, hi, n_full = L.chunk_bounds(n, chunk_len, BLOCK)
    ft_ptr += row0
    fo_ptr += row0
    z_ptr += row0
    fr_ptr += row0
    a_dz = tl.zeros([BLOCK], ACC)
    a_dd = tl.zeros([BLOCK], ACC)
    a_ee = tl.zeros([BLOCK], ACC)
    for t in range(0, n_full, BLOCK):                       # full tiles, unmasked
        offs = tl.max_contiguous(tl.multiple_of(t + tl.arange(0, BLOCK), BLOCK), BLOCK)
        dz, dd, ee = _zo_tile(ft_ptr, fo_ptr, z_ptr, fr_ptr, offs, None, None, HAS_REF, ACC)
        a_dz += dz
        a_dd += dd
        a_ee += ee
    offs = n_full + tl.arange(0, BLOCK)                    # masked tail (empty on most chunks)
    dz, dd, ee = _zo_tile(ft_ptr, fo_ptr, z_ptr, fr_ptr, offs, offs < hi, 0.0, HAS_REF, ACC)
    out = ws_ptr + (b.to(tl.int64) * n_chunks + tl.program_id(1)) * 3
    tl.store(out + 0, tl.sum(a_dz + dz, axis=0))
    tl.store(out + 1, tl.sum(a_dd + dd, axis=0))
    tl.store(out + 2, tl.sum(a_ee + ee, axis=0))


@direct
@triton.jit
def _zo_epilogue(ws_ptr, adv_ptr, omega_ptr, sigma_ptr, dt_ptr, st_ptr, w_ptr, klc_ptr, omt_ptr,
                 loss_ptr, pol_ptr, kl_ptr, clip_ptr, logr_ptr, lin_ptr, dlin_ptr, dquad_ptr, dkl_ptr,
                 B, n_chunks, norm_in: "fp64", eps_in: "fp64", hi_in: "fp64", lo_in: "fp64", tscale_in: "fp64",
                 FORM: tl.constexpr, REWEIGHT: tl.constexpr, HAS_REF: tl.constexpr, KL_DT: tl.constexpr,
                 ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per-row epilogue of the ZO loss for BLOCK_B rows (mirrors ``decomposed.zo_epilogue``)."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rm = rows < B
    S_dz = L.sum_partials(ws_ptr, rows, rm, n_chunks, 3, 0, ACC, BLOCK_B, BLOCK_C)
    S_dd = L.sum_partials(ws_ptr, rows, rm, n_chunks, 3, 1, ACC, BLOCK_B, BLOCK_C)
    norm = tl.full((), norm_in, ACC)
    eps = tl.full((), eps_in, ACC)
    one_p_eps = tl.full((), hi_in, ACC)      # 1 + clip_eps, rounded once as in torch
    one_m_eps = tl.full((), lo_in, ACC)      # 1 - clip_eps
    A = tl.load(adv_ptr + rows, mask=rm, other=0.0).to(ACC)
    omega = tl.load(omega_ptr + rows, mask=rm, other=0.0).to(ACC)
    sigma = tl.load(sigma_ptr + rows, mask=rm, other=1.0).to(ACC)
    dt = tl.load(dt_ptr + rows, mask=rm, other=1.0).to(ACC)
    st = tl.load(st_ptr + rows, mask=rm, other=0) != 0
    W = tl.load(w_ptr + rows, mask=rm, other=0.0).to(ACC)
    one = tl.full([BLOCK_B], 1.0, ACC)
    zero = tl.zeros([BLOCK_B], ACC)

    lin = tl.where(st, omega * S_dz * norm, zero)
    quad = tl.where(st, 0.5 * omega * omega * S_dd * norm, zero)
    sig = tl.where(st & (sigma > 0), sigma, one)
    dtt = tl.where(dt > 0, dt, one)
    s = one
    o = one
    c_lin = one
    c_quad = one
    if REWEIGHT == 1:      # tempflow: weight inside the clip
        s = tl.full((), tscale_in, ACC) * sig
    elif REWEIGHT == 2:    # tempflow_outer
        o = tl.full((), tscale_in, ACC) * sig
    elif REWEIGHT == 3:    # fair
        s = sig * sig
        o = 1.0 / (sig * sig)
    elif REWEIGHT == 4:    # fair_guard
        s = sig * sig
        o = 1.0 / (sig * dtt)
    elif REWEIGHT == 5:    # guard: linear part only
        s = sig
        o = 1.0 / dtt
        c_quad = zero
    elif REWEIGHT == 6:    # pcpo: rho = omega_train / omega
        omt = tl.load(omt_ptr + rows, mask=rm, other=0.0).to(ACC)
        rho = tl.where(omega > 0, omt / tl.where(omega > 0, omega, one), zero)
        if FORM == 2:
            c_lin = rho
            c_quad = rho * rho
        else:
            s = rho
    Lr = -s * (c_lin * lin + c_quad * quad)
    if FORM == 0:          # pg
        pol = -o * A * Lr
        dpol_dL = -o * A
        clipped = zero != zero                      # all False
    elif FORM == 1:        # ratio
        r = tl.exp(Lr)
        clipped = ((A > 0) & (r > one_p_eps)) | ((A < 0) & (r < one_m_eps))
        r_clip = tl.minimum(tl.maximum(r, one_m_eps), one_p_eps)
        pol = o * tl.where(clipped, -A * r_clip, -A * r)
        dpol_dL = tl.where(clipped, zero, -o * A * r)
    else:                  # hinge
        h = eps * tl.abs(A) - A * Lr
        clipped = h < 0
        pol = o * tl.where(clipped, zero, h)
        dpol_dL = tl.where(clipped, zero, -o * A)
    policy = tl.where(st, W * pol, zero)
    clipped = clipped & st
    d_lin = tl.where(st, W * dpol_dL * (-s * c_lin), zero)
    d_quad = tl.where(st, W * dpol_dL * (-s * c_quad), zero)
    if HAS_REF:
        alpha = tl.load(klc_ptr + rows, mask=rm, other=0.0).to(ACC)
        if KL_DT:
            alpha = alpha * dt
        S_ee = L.sum_partials(ws_ptr, rows, rm, n_chunks, 3, 2, ACC, BLOCK_B, BLOCK_C)
        d_kl = W * alpha
        kl = d_kl * 0.5 * omega * omega * S_ee * norm
    else:
        d_kl = zero
        kl = zero
    tl.store(loss_ptr + rows, policy + kl, mask=rm)
    tl.store(pol_ptr + rows, policy, mask=rm)
    tl.store(kl_ptr + rows, kl, mask=rm)
    tl.store(clip_ptr + rows, clipped.to(tl.uint8), mask=rm)
    tl.store(logr_ptr + rows, -(lin + quad), mask=rm)
    tl.store(lin_ptr + rows, lin, mask=rm)
    tl.store(dlin_ptr + rows, d_lin, mask=rm)
    tl.store(dquad_ptr + rows, d_quad, mask=rm)
    tl.store(dkl_ptr + rows, d_kl, mask=rm)


@triton.jit
def _zo_grad_tile(g_ptr, ft_ptr, fo_ptr, z_ptr, fr_ptr, c_z, c_d, c_e, offs, mask, other, HAS_REF: tl.constexpr,
                  ACC: tl.constexpr):
    ft = tl.load(ft_ptr + offs, mask=mask, other=other).to(ACC)
    grad = c_z * tl.load(z_ptr + offs, mask=mask, other=other).to(ACC)
    grad += c_d * (ft - tl.load(fo_ptr + offs, mask=mask, other=other).to(ACC))
    if HAS_REF:
        grad += c_e * (ft - tl.load(fr_ptr + offs, mask=mask, other=other).to(ACC))
    tl.store(g_ptr + offs, grad.to(g_ptr.dtype.element_ty), mask=mask)


@direct
@triton.jit
def _zo_grad(g_ptr, ft_ptr, fo_ptr, z_ptr, fr_ptr, gl_ptr, gp_ptr, gk_ptr, omega_ptr, dlin_ptr, dquad_ptr,
             dkl_ptr, n, chunk_len, norm_in: "fp64", HAS_REF: tl.constexpr, ACC: tl.constexpr,
             BLOCK: tl.constexpr):
    """grad[b, chunk c] = c_z z + c_d (f_theta - f_old) + c_e (f_theta - f_ref), in g's dtype."""
    b, row0, hi, n_full = L.chunk_bounds(n, chunk_len, BLOCK)
    norm = tl.full((), norm_in, ACC)
    gl = tl.load(gl_ptr + b).to(ACC)
    gP = gl + tl.load(gp_ptr + b).to(ACC)
    om = tl.load(omega_ptr + b).to(ACC)
    c_z = gP * tl.load(dlin_ptr + b).to(ACC) * om * norm
    c_d = gP * tl.load(dquad_ptr + b).to(ACC) * om * om * norm
    c_e = (gl + tl.load(gk_ptr + b).to(ACC)) * tl.load(dkl_ptr + b).to(ACC) * om * om * norm
    g_ptr += row0
    ft_ptr += row0
    fo_ptr += row0
    z_ptr += row0
    fr_ptr += row0
    for t in range(0, n_full, BLOCK):                       # full tiles, unmasked
        offs = tl.max_contiguous(tl.multiple_of(t + tl.arange(0, BLOCK), BLOCK), BLOCK)
        _zo_grad_tile(g_ptr, ft_ptr, fo_ptr, z_ptr, fr_ptr, c_z, c_d, c_e, offs, None, None, HAS_REF, ACC)
    offs = n_full + tl.arange(0, BLOCK)                    # masked tail
    _zo_grad_tile(g_ptr, ft_ptr, fo_ptr, z_ptr, fr_ptr, c_z, c_d, c_e, offs, offs < hi, 0.0, HAS_REF, ACC)


# The forward's nine [B] outputs are rows of one [9, B] block (kernels/_launch.py alloc_rows),
# in this order; the bool ``clipped`` lives in the first B bytes of its row. The partial sums
# follow the block in the same allocation: one allocation per forward.
ZO_ROWS = ("loss", "policy", "kl", "clipped", "log_ratio", "lin", "d_lin", "d_quad", "d_kl")
ZO_K = len(ZO_ROWS)
_CLIP_ROW = ZO_ROWS.index("clipped")
_WIDTHS = (1,) * ZO_K


def zo_fwd(f_theta, f_old, z, f_ref, adv, omega, sigma, dt, stochastic, row_weight, kl_coef, omega_train,
           form: int, reweight: int, clip_eps: float, tempflow_scale: float, kl_dt_weight: bool, mean: bool):
    """-> ``(loss, policy, kl, clipped, log_ratio, lin, d_lin, d_quad, d_kl)``, each ``[B]``: views
    of one ``[9, B]`` compute-dtype block (``ZO_ROWS``; ``clipped`` is a bool view of its row's
    first bytes)."""
    L.check_latents(f_theta, f_old, z, f_ref)
    L.check_rows("zo_fwd", f_theta, "f_theta", ("stochastic",), adv=adv, omega=omega, sigma=sigma, dt=dt,
                 stochastic=stochastic, row_weight=row_weight, kl_coef=kl_coef, omega_train=omega_train)
    if not 0 <= form <= 2:
        raise L.KernelInputError(f"form must be in 0..2 (pg, ratio, hinge), got {form} (rsm_fast.kernels zo_fwd)")
    if not 0 <= reweight <= 6:
        raise L.KernelInputError(f"reweight must be in 0..6, got {reweight} (rsm_fast.kernels zo_fwd)")
    return zo_fwd_unchecked(f_theta, f_old, z, f_ref, adv, omega, sigma, dt, stochastic, row_weight, kl_coef,
                            omega_train, form, reweight, clip_eps, tempflow_scale, kl_dt_weight, mean)


def zo_fwd_unchecked(f_theta, f_old, z, f_ref, adv, omega, sigma, dt, stochastic, row_weight, kl_coef, omega_train,
                     form: int, reweight: int, clip_eps: float, tempflow_scale: float, kl_dt_weight: bool,
                     mean: bool):
    """:func:`zo_fwd` without its argument checks, for a caller that has established the contract
    (``rsm_fast.ops``' eager path, behind its API's checks): no per-call validation."""
    B, p = f_theta.shape[0], L.plan(f_theta)
    cd = torch.float64 if f_theta.dtype is torch.float64 else torch.float32
    *out, ws = L.alloc_rows(B, _WIDTHS, cd, f_theta.device, B * p.n_chunks * 3)
    clip_bytes = L.bytes_row(out[_CLIP_ROW])
    out[_CLIP_ROW] = clip_bytes[:B].view(torch.bool)
    out = tuple(out)
    if B == 0:
        return out
    has_ref = f_ref is not None
    acc = tl.float64 if cd is torch.float64 else tl.float32
    with L.device_guard(f_theta):
        _zo_partials[p.grid](f_theta, f_old, z, f_ref if has_ref else f_theta, ws, p.n, p.chunk_len,
                             p.n_chunks, HAS_REF=has_ref, ACC=acc, BLOCK=p.block, num_warps=p.num_warps)
        loss, policy, kl, _, log_ratio, lin, d_lin, d_quad, d_kl = out
        _zo_epilogue[p.epi_grid](
            ws, adv, omega, sigma, dt, stochastic.view(torch.uint8), row_weight, kl_coef, omega_train,
            loss, policy, kl, clip_bytes, log_ratio, lin, d_lin, d_quad, d_kl,
            B, p.n_chunks, L.norm_of(p.n, mean), float(clip_eps), 1.0 + clip_eps, 1.0 - clip_eps,
            float(tempflow_scale), FORM=int(form), REWEIGHT=int(reweight), HAS_REF=has_ref,
            KL_DT=bool(kl_dt_weight), ACC=acc, BLOCK_B=L.EPI_BLOCK_B, BLOCK_C=L.EPI_BLOCK_C, num_warps=4)
    return out


def zo_bwd(g_loss, g_policy, g_kl, f_theta, f_old, z, f_ref, omega, d_lin, d_quad, d_kl, mean: bool):
    """Gradient of ``sum(g_loss loss + g_policy policy + g_kl kl)`` w.r.t. ``f_theta``."""
    L.check_latents(f_theta, f_old, z, f_ref)
    L.check_rows("zo_bwd", f_theta, "f_theta", g_loss=g_loss, g_policy=g_policy, g_kl=g_kl, omega=omega, d_lin=d_lin,
                 d_quad=d_quad, d_kl=d_kl)
    return zo_bwd_unchecked(g_loss, g_policy, g_kl, f_theta, f_old, z, f_ref, omega, d_lin, d_quad, d_kl, mean)


def zo_bwd_unchecked(g_loss, g_policy, g_kl, f_theta, f_old, z, f_ref, omega, d_lin, d_quad, d_kl, mean: bool):
    """:func:`zo_bwd` without its argument checks (see :func:`zo_fwd_unchecked`)."""
    grad = torch.empty_like(f_theta)
    B, p = f_theta.shape[0], L.plan(f_theta)
    if B == 0 or p.n == 0:
        return grad
    has_ref = f_ref is not None
    with L.device_guard(f_theta):
        _zo_grad[p.grid](grad, f_theta, f_old, z, f_ref if has_ref else f_theta, g_loss, g_policy, g_kl,
                         omega, d_lin, d_quad, d_kl, p.n, p.chunk_len, L.norm_of(p.n, mean),
                         HAS_REF=has_ref, ACC=L.acc_type(f_theta.dtype), BLOCK=p.block, num_warps=p.num_warps)
    return grad
