"""The fused ops' math, written as plain torch: the contract every backend implements.

Each fused loss is one pass of row reductions over the latent dims followed by an O(B) per-row
epilogue; its backward is one elementwise pass with three per-row coefficients. The Triton
kernels (``kernels/``) and the C++ CPU kernels (``csrc/``) implement exactly these functions with
these signatures; this module is also the CPU fallback when no C++ compiler is available, and the
backend tests compare all three against the float64 reference of :mod:`rsm_fast.losses.reference`.

Conventions shared by every backend
-----------------------------------
* Latent tensors ``[B, ...]`` are contiguous and share one dtype (fp64, fp32, bf16 or fp16); the
  row length is ``n = numel / B``. Arithmetic and outputs are fp32 (fp64 for fp64 inputs);
  gradients come back in the latent dtype.
* Per-row inputs are contiguous ``[B]`` tensors of the compute dtype (``stochastic``: bool).
* ``mean`` selects the reduction over latent dims: ``norm = 1/n`` (the field's convention) or 1.
* Integer mode codes: :data:`FORMS` and :data:`REWEIGHTS` give the positions.

Zeroth-order row loss (spec §2.5, §5; reference ``zo_row_loss``). With ``d = f_theta - f_old``
and ``e = f_theta - f_ref``, one pass forms ``S_dz = sum d z``, ``S_dd = sum d^2``,
``S_ee = sum e^2``; then per row ``lin = omega S_dz norm``, ``quad = omega^2 S_dd norm / 2``,
``klq = omega^2 S_ee norm / 2``, the surrogate log-ratio ``L = -s (c_lin lin + c_quad quad)`` and
the reweight/form logic of the reference. The forward also returns the per-row derivatives
``d_lin = dpolicy/dlin``, ``d_quad = dpolicy/dquad`` and ``d_kl = dkl/dklq`` (= W alpha), so the
backward is ``grad = c_z z + c_d d + c_e e`` with ``c_z = gP d_lin omega norm``,
``c_d = gP d_quad omega^2 norm``, ``c_e = gK d_kl omega^2 norm``, ``gP = g_loss + g_policy`` and
``gK = g_loss + g_kl``. Only ``f_theta`` receives a gradient (``f_old``, ``z`` and ``f_ref`` are
rollout data or a frozen model's output).

Score regression (spec §3.2): ``loss = C1 norm (sum t^2 + C2 sum o^2)`` with
``t = s - s_ref - gamma psi`` and ``o = s - s_old``; ``grad = 2 g C1 norm (t + C2 o)``.

Sampler step (spec §2): ``x' = c_x x + c_f f + sigma z`` (``sigma z`` dropped on ODE rows) and
``log pi(x'|x) = -norm sum z^2 / 2 - log sigma - log sqrt(2 pi)`` per row, 0 on ODE rows (for the
mean reduction the constant terms are per latent dim, as in ``GaussianTransition.log_prob``).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

FORMS = ("pg", "ratio", "hinge")
REWEIGHTS = ("base", "tempflow", "tempflow_outer", "fair", "fair_guard", "guard", "pcpo")
LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _rows(t: Tensor, cd: torch.dtype) -> Tensor:
    return t.reshape(t.shape[0], -1).to(cd)


def _norm(n: int, mean: bool) -> float:
    return 1.0 / n if mean else 1.0


# ---------------------------------------------------------------------------------------------
# Per-row epilogue of the ZO loss (shared with the Triton epilogue and the C++ loop, line by line)
# ---------------------------------------------------------------------------------------------
def zo_epilogue(S_dz: Tensor, S_dd: Tensor, S_ee: Tensor | None, norm: float, adv: Tensor, omega: Tensor,
                sigma: Tensor, dt: Tensor, stochastic: Tensor, row_weight: Tensor, kl_coef: Tensor,
                omega_train: Tensor, form: int, reweight: int, clip_eps: float, tempflow_scale: float,
                kl_dt_weight: bool):
    one = torch.ones_like(omega)
    zero = torch.zeros_like(omega)
    st = stochastic
    lin = torch.where(st, omega * S_dz * norm, zero)
    quad = torch.where(st, 0.5 * omega * omega * S_dd * norm, zero)
    sig = torch.where(st & (sigma > 0), sigma, one)
    dtt = torch.where(dt > 0, dt, one)
    s, o, c_lin, c_quad = one, one, one, one
    if reweight == 1:
        s = tempflow_scale * sig
    elif reweight == 2:
        o = tempflow_scale * sig
    elif reweight == 3:
        s, o = sig * sig, 1.0 / (sig * sig)
    elif reweight == 4:
        s, o = sig * sig, 1.0 / (sig * dtt)
    elif reweight == 5:
        s, o, c_quad = sig, 1.0 / dtt, zero
    elif reweight == 6:
        rho = torch.where(omega > 0, omega_train / torch.where(omega > 0, omega, one), zero)
        if form == 2:
            c_lin, c_quad = rho, rho * rho
        else:
            s = rho
    L = -s * (c_lin * lin + c_quad * quad)
    A = adv
    if form == 0:
        pol = -o * A * L
        dpol_dL = -o * A
        clipped = torch.zeros_like(st)
    elif form == 1:
        r = torch.exp(L)
        clipped = ((A > 0) & (r > 1 + clip_eps)) | ((A < 0) & (r < 1 - clip_eps))
        pol = o * torch.where(clipped, -A * torch.clamp(r, 1 - clip_eps, 1 + clip_eps), -A * r)
        dpol_dL = torch.where(clipped, zero, -o * A * r)
    else:
        h = clip_eps * A.abs() - A * L
        clipped = h < 0
        pol = o * torch.where(clipped, zero, h)
        dpol_dL = torch.where(clipped, zero, -o * A)
    W = row_weight
    policy = torch.where(st, W * pol, zero)
    clipped = clipped & st
    d_lin = torch.where(st, W * dpol_dL * (-s * c_lin), zero)
    d_quad = torch.where(st, W * dpol_dL * (-s * c_quad), zero)
    alpha = kl_coef * dt if kl_dt_weight else kl_coef
    if S_ee is None:
        kl, d_kl = torch.zeros_like(omega), torch.zeros_like(omega)  # distinct outputs, no aliasing
    else:
        d_kl = W * alpha
        kl = d_kl * 0.5 * omega * omega * S_ee * norm
    return policy + kl, policy, kl, clipped, -(lin + quad), lin, d_lin, d_quad, d_kl


# ---------------------------------------------------------------------------------------------
# The five backend functions
# ---------------------------------------------------------------------------------------------
def zo_fwd(f_theta: Tensor, f_old: Tensor, z: Tensor, f_ref: Tensor | None, adv: Tensor, omega: Tensor,
           sigma: Tensor, dt: Tensor, stochastic: Tensor, row_weight: Tensor, kl_coef: Tensor,
           omega_train: Tensor, form: int, reweight: int, clip_eps: float, tempflow_scale: float,
           kl_dt_weight: bool, mean: bool):
    """-> ``(loss, policy, kl, clipped, log_ratio, lin, d_lin, d_quad, d_kl)``, each ``[B]``."""
    cd = compute_dtype(f_theta)
    ft = _rows(f_theta, cd)
    d = ft - _rows(f_old, cd)
    S_dz = (d * _rows(z, cd)).sum(1)
    S_dd = (d * d).sum(1)
    S_ee = None
    if f_ref is not None:
        e = ft - _rows(f_ref, cd)
        S_ee = (e * e).sum(1)
    return zo_epilogue(S_dz, S_dd, S_ee, _norm(ft.shape[1], mean), adv, omega, sigma, dt, stochastic,
                       row_weight, kl_coef, omega_train, form, reweight, clip_eps, tempflow_scale, kl_dt_weight)


def zo_bwd(g_loss: Tensor, g_policy: Tensor, g_kl: Tensor, f_theta: Tensor, f_old: Tensor, z: Tensor,
           f_ref: Tensor | None, omega: Tensor, d_lin: Tensor, d_quad: Tensor, d_kl: Tensor, mean: bool) -> Tensor:
    """Gradient of ``sum(g_loss loss + g_policy policy + g_kl kl)`` w.r.t. ``f_theta``."""
    cd = compute_dtype(f_theta)
    ft = _rows(f_theta, cd)
    norm = _norm(ft.shape[1], mean)
    gP = g_loss + g_policy
    c_z = (gP * d_lin * omega * norm)[:, None]
    c_d = (gP * d_quad * omega * omega * norm)[:, None]
    grad = c_z * _rows(z, cd) + c_d * (ft - _rows(f_old, cd))
    if f_ref is not None:
        c_e = ((g_loss + g_kl) * d_kl * omega * omega * norm)[:, None]
        grad = grad + c_e * (ft - _rows(f_ref, cd))
    return grad.to(f_theta.dtype).reshape(f_theta.shape)


def score_fwd(s: Tensor, s_ref: Tensor, psi: Tensor, s_old: Tensor | None, c1: Tensor, gamma: Tensor,
              c2: Tensor, mean: bool) -> Tensor:
    cd = compute_dtype(s)
    sr = _rows(s, cd)
    t = sr - _rows(s_ref, cd) - gamma[:, None] * _rows(psi, cd)
    acc = (t * t).sum(1)
    if s_old is not None:
        o = sr - _rows(s_old, cd)
        acc = acc + c2 * (o * o).sum(1)
    return c1 * _norm(sr.shape[1], mean) * acc


def score_bwd(g_loss: Tensor, s: Tensor, s_ref: Tensor, psi: Tensor, s_old: Tensor | None, c1: Tensor,
              gamma: Tensor, c2: Tensor, mean: bool) -> Tensor:
    cd = compute_dtype(s)
    sr = _rows(s, cd)
    k = (2.0 * g_loss * c1 * _norm(sr.shape[1], mean))[:, None]
    grad = sr - _rows(s_ref, cd) - gamma[:, None] * _rows(psi, cd)
    if s_old is not None:
        grad = grad + c2[:, None] * (sr - _rows(s_old, cd))
    return (k * grad).to(s.dtype).reshape(s.shape)


def step_fwd(x: Tensor, f: Tensor, z: Tensor, c_x: Tensor, c_f: Tensor, sigma: Tensor, stochastic: Tensor,
             mean: bool) -> tuple[Tensor, Tensor]:
    """-> ``(x_next [B, ...] in x's dtype, log_prob [B] in the compute dtype)``."""
    cd = compute_dtype(x)
    zr = _rows(z, cd)
    noise = torch.where(stochastic[:, None], sigma[:, None] * zr, torch.zeros_like(zr))  # z unused on ODE rows
    xn = c_x[:, None] * _rows(x, cd) + c_f[:, None] * _rows(f, cd) + noise
    n = zr.shape[1]
    sig = torch.where(stochastic & (sigma > 0), sigma, torch.ones_like(sigma))
    consts = (torch.log(sig) + LOG_SQRT_2PI) * (1.0 if mean else float(n))
    lp = -0.5 * (zr * zr).sum(1) * _norm(n, mean) - consts
    lp = torch.where(stochastic, lp, torch.zeros_like(lp))
    return xn.to(x.dtype).reshape(x.shape), lp
