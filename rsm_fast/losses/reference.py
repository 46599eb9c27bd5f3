"""Reference RSM losses (spec §2.5, §3.2-3.4, §5, §6, §14): the float64 oracle for fused kernels.

Zeroth-order (ZO) rows. A trained transition row holds the sampling noise ``z`` (``x' = mu_old +
sigma z``), the rollout's native output ``f_old``, an advantage ``A`` and per-row coefficients
(:class:`~rsm_fast.transitions.StepCoeffs`). With ``df = f_theta - f_old`` (spec §2.5)::

    lin  = mean(omega * df * z)          quad = 0.5 * mean((omega * df) ** 2)
    -log r = lin + quad                  (r = pi_theta(x'|x) / pi_old(x'|x))

A reweight picks the surrogate's log-ratio ``L = -s * (c_lin * lin + c_quad * quad)`` (inner
scale ``s``) and an outer factor ``o``; a form turns ``L`` into the policy term (spec §5.1, §5.3):

    pg:     -o A L                                   (REINFORCE, never clipped)
    ratio:  o max(-A e^L, -A clip(e^L, 1-eps, 1+eps))  (PPO / GRPO)
    hinge:  o max(0, eps |A| - A L)                  (clipped log-ratio, RSM-code "matching")

Per reweight (sigma, Sigma = sigma^2, dt per row; rho = omega_train / omega):

    reweight         s                 o                  c_lin, c_quad
    base             1                 1                  1, 1
    tempflow         scale * sigma     1                  1, 1        (weight inside the clip)
    tempflow_outer   1                 scale * sigma      1, 1        (original TempFlow-GRPO)
    fair             Sigma             1 / Sigma          1, 1        (Eq. 24)
    fair_guard       Sigma             sigma/(Sigma dt)   1, 1
    guard            sigma             1 / dt             1, 0        (RatioNorm: exp(z . dmu))
    pcpo  pg/ratio   rho               1                  1, 1
    pcpo  hinge      1                 1                  rho, rho^2  (omega -> omega_train)

Canonical form (spec §3.3, Table 1 §6). Writing ``f = p_x x + p_s s`` and ``k = omega p_s``
(``|k| = b / sigma``), the gradient of ``policy + kl_coef * KL`` w.r.t. the score ``s_theta`` is,
for mean reduction over ``d`` latent dims,
``(2/d) C1 [(s - s_ref) - gamma_scale z + C2 (s - s_old)]`` with, per row,
``C1 = W alpha k^2 / 2``, ``gamma_scale = -G c_lin / (alpha k)``, ``C2 = G c_quad / alpha``,
where ``alpha = kl_coef (* dt)``, ``W`` the row weight and ``G = d policy / d(-log r variant)``
(``o A s`` when unclipped, times ``e^L`` for the ratio form, 0 when clipped). For base/hinge this
is spec §5.2: ``C1 = alpha b^2/(2 Sigma)``, ``gamma_scale z = I A sigma z/(alpha b)``, ``C2 = I A/alpha``.

All math runs in float32 (float64 if any input is float64), whatever the inputs' dtype.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..transitions import StepCoeffs, compute_dtype, reduce_latent, rowwise

SURROGATE_FORMS = ("pg", "ratio", "hinge")
REWEIGHTS = ("base", "tempflow", "tempflow_outer", "fair", "fair_guard", "guard", "pcpo")
REDUCTIONS = ("mean", "sum")


@dataclass
class ZOLossOut:
    """Per-row outputs of :func:`zo_row_loss`; every field is ``[B]``."""

    loss: Tensor       # policy + kl
    policy: Tensor     # surrogate term, row weights applied (0 on ODE rows)
    kl: Tensor         # kl_coef * KL (* dt), row weights applied (zeros without f_ref)
    clipped: Tensor    # bool: the row's surrogate sits in its clipped (zero-gradient) region
    log_ratio: Tensor  # log pi_theta - log pi_old (true sampler ratio), detached; 0 on ODE rows
    lin: Tensor        # mean(omega * df * z), detached: linear part of -log r (canonical_coefficients)


# ---------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------
def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _per_row(name: str, v, batch: int, dtype: torch.dtype, device) -> Tensor:
    """A Python number, 0-d tensor or ``[B]`` tensor as a ``[B]`` tensor of ``dtype``."""
    if isinstance(v, bool) or not isinstance(v, (int, float, Tensor)):
        raise ValueError(f"{name} must be a number or a tensor, got {type(v).__name__}")
    if not isinstance(v, Tensor):
        return torch.full((batch,), float(v), dtype=dtype, device=device)
    if v.dim() == 0:
        return v.to(dtype).expand(batch)
    if tuple(v.shape) != (batch,):
        raise ValueError(f"{name} must be a scalar or have shape ({batch},), got {tuple(v.shape)}")
    return v.to(dtype)


def _check_same_shape(name: str, t: Tensor, like: Tensor) -> None:
    if not isinstance(t, Tensor) or t.shape != like.shape:
        shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{name} must have shape {tuple(like.shape)}, got {shape}")


def _check_rows(coeffs: StepCoeffs, adv: Tensor, batch: int) -> None:
    if tuple(coeffs.omega.shape) != (batch,):
        raise ValueError(f"coeffs must hold [B]={batch} rows, got omega of shape {tuple(coeffs.omega.shape)}")
    if not isinstance(adv, Tensor) or tuple(adv.shape) != (batch,):
        shape = tuple(adv.shape) if isinstance(adv, Tensor) else type(adv).__name__
        raise ValueError(f"adv must have shape ({batch},), got {shape}")


def _check_common(form, reweight, clip_eps, omega_train, tempflow_scale, kl_coef) -> None:
    _check_choice("form", form, SURROGATE_FORMS)
    _check_choice("reweight", reweight, REWEIGHTS)
    if form != "pg" and not (isinstance(clip_eps, (int, float)) and clip_eps > 0):
        raise ValueError(f"clip_eps must be a number > 0 for form={form!r}, got {clip_eps!r}")
    if reweight == "pcpo" and omega_train is None:
        raise ValueError("omega_train is required for reweight='pcpo' (PCPO's target native weight)")
    if reweight in ("tempflow", "tempflow_outer") and not (isinstance(tempflow_scale, (int, float)) and tempflow_scale > 0):
        raise ValueError(f"tempflow_scale must be a number > 0, got {tempflow_scale!r}")
    if isinstance(kl_coef, (int, float)) and kl_coef < 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef!r}")


# ---------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------
def _reweight_scales(coeffs: StepCoeffs, reweight: str, form: str, omega_train, tempflow_scale: float,
                     batch: int, dtype: torch.dtype):
    """Per-row ``(s, o, c_lin, c_quad)``: ``L = -s (c_lin lin + c_quad quad)``, policy scaled by ``o``.

    sigma (and dt) are replaced by 1 on ODE rows so that nothing is infinite there (those rows are
    masked afterwards)."""
    st = coeffs.stochastic
    sigma = coeffs.sigma.to(dtype)
    sigma = torch.where(st & (sigma > 0), sigma, torch.ones_like(sigma))
    dt = coeffs.dt.to(dtype)
    dt = torch.where(dt > 0, dt, torch.ones_like(dt))
    one = torch.ones_like(sigma)
    s, o, c_lin, c_quad = one, one, one, one
    if reweight == "tempflow":            # RSM "matching" TempFlow: weight inside the clip
        s = tempflow_scale * sigma
    elif reweight == "tempflow_outer":    # original TempFlow-GRPO: -2.25 std A ratio
        o = tempflow_scale * sigma
    elif reweight == "fair":              # Eq. 24: clip on Sigma log r, divide by Sigma
        s, o = sigma**2, 1.0 / sigma**2
    elif reweight == "fair_guard":        # fair clip times the Guard weight sigma / dt
        s, o = sigma**2, (1.0 / sigma**2) * (sigma / dt)
    elif reweight == "guard":             # GRPO-Guard RatioNorm: linear part only, scaled by sigma, / dt
        s, o, c_quad = sigma, 1.0 / dt, torch.zeros_like(sigma)
    elif reweight == "pcpo":              # rho = omega_train / omega
        omega = coeffs.omega.to(dtype)
        w_train = _per_row("omega_train", omega_train, batch, dtype, omega.device)
        rho = torch.where(omega > 0, w_train / torch.where(omega > 0, omega, one), torch.zeros_like(omega))
        if form == "hinge":               # omega -> omega_train inside both terms
            c_lin, c_quad = rho, rho**2
        else:
            s = rho
    return s, o, c_lin, c_quad


def _surrogate(form: str, adv: Tensor, L: Tensor, o: Tensor, eps: float):
    """Unweighted policy term and clip flag from the surrogate log-ratio ``L``."""
    if form == "pg":
        return -o * adv * L, torch.zeros_like(adv, dtype=torch.bool)
    if form == "ratio":
        r = torch.exp(L.detach())
        clipped = ((adv > 0) & (r > 1 + eps)) | ((adv < 0) & (r < 1 - eps))
        # == max(-A r, -A clip(r)): on clipped rows the clipped branch is the larger one (and constant).
        # The unclipped branch sees L only where it is selected: a clipped row whose ratio overflows
        # would otherwise send 0 * inf = NaN back through exp (the fused ops give 0 there).
        r_live = torch.exp(torch.where(clipped, torch.zeros_like(L), L))
        pol = torch.where(clipped, -adv * torch.clamp(r, 1 - eps, 1 + eps), -adv * r_live)
        return o * pol, clipped
    h = eps * adv.abs() - adv * L
    clipped = h < 0
    return o * torch.where(clipped, torch.zeros_like(h), h), clipped


def _kl_alpha(kl_coef, coeffs: StepCoeffs, kl_dt_weight: bool, batch: int, dtype, device) -> Tensor:
    alpha = _per_row("kl_coef", kl_coef, batch, dtype, device)
    return alpha * coeffs.dt.to(dtype) if kl_dt_weight else alpha


# ---------------------------------------------------------------------------------------------
# Public losses
# ---------------------------------------------------------------------------------------------
def zo_row_loss(f_theta: Tensor, f_old: Tensor, z: Tensor, adv: Tensor, coeffs: StepCoeffs, *,
                form: str = "hinge", reweight: str = "base", clip_eps: float = 1e-4, f_ref: Tensor | None = None,
                kl_coef=0.0, kl_dt_weight: bool = False, row_weight=None, omega_train=None,
                tempflow_scale: float = 2.25, reduce: str = "mean") -> ZOLossOut:
    """Per-row ZO policy loss + KL to the reference (spec §5, §14). Shapes: ``f_*, z: [B, ...]``,
    ``adv: [B]``; ``kl_coef``, ``row_weight``, ``omega_train``: numbers or ``[B]``."""
    _check_common(form, reweight, clip_eps, omega_train, tempflow_scale, kl_coef)
    _check_choice("reduce", reduce, REDUCTIONS)
    if not isinstance(f_theta, Tensor) or f_theta.dim() < 2:
        raise ValueError(f"f_theta must be a [B, ...] tensor with latent dims, got {getattr(f_theta, 'shape', f_theta)!r}")
    _check_same_shape("f_old", f_old, f_theta)
    _check_same_shape("z", z, f_theta)
    if f_ref is not None:
        _check_same_shape("f_ref", f_ref, f_theta)
    elif not (isinstance(kl_coef, (int, float)) and kl_coef == 0):
        raise ValueError("f_ref is required when kl_coef is non-zero")
    batch = f_theta.shape[0]
    _check_rows(coeffs, adv, batch)

    cd = compute_dtype(f_theta, f_old, z, coeffs.omega)
    ft, fo, zz, A = f_theta.to(cd), f_old.to(cd), z.to(cd), adv.to(cd)
    st = coeffs.stochastic
    zero = torch.zeros((), dtype=cd, device=ft.device)

    u = rowwise(coeffs.omega.to(cd), ft) * (ft - fo)                 # omega * df
    lin = torch.where(st, reduce_latent(u * zz, reduce), zero)
    quad = torch.where(st, 0.5 * reduce_latent(u * u, reduce), zero)
    s, o, c_lin, c_quad = _reweight_scales(coeffs, reweight, form, omega_train, tempflow_scale, batch, cd)
    L = -s * (c_lin * lin + c_quad * quad)
    pol, clipped = _surrogate(form, A, L, o, clip_eps)
    pol = torch.where(st, pol, zero)
    clipped = clipped & st

    W = _per_row("row_weight", 1.0 if row_weight is None else row_weight, batch, cd, ft.device)
    if f_ref is None:
        kl = torch.zeros(batch, dtype=cd, device=ft.device)
    else:
        alpha = _kl_alpha(kl_coef, coeffs, kl_dt_weight, batch, cd, ft.device)
        kl = alpha * coeffs.kl(ft, f_ref.to(cd), reduce).to(cd)
    policy, kl = W * pol, W * kl
    return ZOLossOut(loss=policy + kl, policy=policy, kl=kl, clipped=clipped,
                     log_ratio=(-(lin + quad)).detach(), lin=lin.detach())


def kl_anchor_loss(f_theta: Tensor, f_ref: Tensor, omega, weight, dt=None, reduce: str = "mean") -> Tensor:
    """``weight * 0.5 * mean((omega (f_theta - f_ref))^2) * dt`` per row (ODE-row anchor, spec §14).
    ``omega``, ``weight``, ``dt``: numbers or ``[B]``; ``dt=None`` means no dt factor."""
    _check_choice("reduce", reduce, REDUCTIONS)
    if not isinstance(f_theta, Tensor) or f_theta.dim() < 2:
        raise ValueError(f"f_theta must be a [B, ...] tensor with latent dims, got {getattr(f_theta, 'shape', f_theta)!r}")
    _check_same_shape("f_ref", f_ref, f_theta)
    batch = f_theta.shape[0]
    extra = [v for v in (omega, weight, dt) if isinstance(v, Tensor)]
    cd = compute_dtype(f_theta, f_ref, *extra)
    w = _per_row("omega", omega, batch, cd, f_theta.device)
    c = _per_row("weight", weight, batch, cd, f_theta.device)
    if dt is not None:
        c = c * _per_row("dt", dt, batch, cd, f_theta.device)
    ft = f_theta.to(cd)
    u = rowwise(w, ft) * (ft - f_ref.to(cd))
    return c * 0.5 * reduce_latent(u * u, reduce)


def score_regression_loss(s_theta: Tensor, s_ref: Tensor, s_old: Tensor | None, psi_hat: Tensor, C1, gamma,
                          C2=0.0, reduce: str = "mean") -> Tensor:
    """RSM loss of Thm. 3.2 (spec §3.2, v2 convention) per row:
    ``C1 * (mean((s - (s_ref + gamma psi_hat))^2) + C2 * mean((s - s_old)^2))``.
    ``C1``, ``gamma``, ``C2``: numbers or ``[B]``; ``s_old`` may be None when C2 == 0."""
    _check_choice("reduce", reduce, REDUCTIONS)
    if not isinstance(s_theta, Tensor) or s_theta.dim() < 2:
        raise ValueError(f"s_theta must be a [B, ...] tensor with latent dims, got {getattr(s_theta, 'shape', s_theta)!r}")
    _check_same_shape("s_ref", s_ref, s_theta)
    _check_same_shape("psi_hat", psi_hat, s_theta)
    if s_old is None:  # the tensor check reads back to the host; only reached without s_old
        if (bool((C2 != 0).any()) if isinstance(C2, Tensor) else C2 != 0):
            raise ValueError("s_old is required when C2 is non-zero")
    else:
        _check_same_shape("s_old", s_old, s_theta)
    batch = s_theta.shape[0]
    cd = compute_dtype(s_theta, s_ref, psi_hat, *[v for v in (C1, gamma, C2) if isinstance(v, Tensor)])
    c1 = _per_row("C1", C1, batch, cd, s_theta.device)
    g = _per_row("gamma", gamma, batch, cd, s_theta.device)
    c2 = _per_row("C2", C2, batch, cd, s_theta.device)
    s = s_theta.to(cd)
    target = s_ref.to(cd) + rowwise(g, s) * psi_hat.to(cd)
    out = reduce_latent((s - target) ** 2, reduce)
    if s_old is not None:
        out = out + c2 * reduce_latent((s - s_old.to(cd)) ** 2, reduce)
    return c1 * out


def canonical_coefficients(coeffs: StepCoeffs, adv: Tensor, log_ratio: Tensor, *, form: str, reweight: str,
                           clip_eps: float, kl_coef, kl_dt_weight: bool = False, row_weight=None,
                           omega_train=None, tempflow_scale: float = 2.25, lin: Tensor | None = None):
    """Table 1 (spec §6) as code: per-row ``(C1, gamma_scale, C2)`` of the loss built by
    :func:`zo_row_loss` with the same arguments, such that (mean reduction over d latent dims)
    ``d loss / d s_theta = (2/d) C1 [(s - s_ref) - gamma_scale z + C2 (s - s_old)]``
    (``2 C1 [...]`` for sum reduction), i.e. ``gamma Psi_hat = gamma_scale z``.

    ``log_ratio`` is the true per-row log r (``ZOLossOut.log_ratio``). ``reweight='guard'`` and
    ``reweight='pcpo'`` with ``form='hinge'`` also need ``lin`` (``ZOLossOut.lin``), because their
    surrogate weights the linear and quadratic parts of -log r differently. The v2 convention divides
    by ``alpha = kl_coef (* dt)``, so ``kl_coef`` must be > 0 on every row (checked for numbers;
    tensors are not read back, to keep this free of host syncs). ODE and clipped rows get
    ``gamma_scale = C2 = 0``. ``C1`` uses ``k^2 = (omega p_s)^2``, which equals ``b^2/Sigma`` except
    on the Flow-GRPO t = 1 row, where the tables' conventions differ (spec §2.3) and k is the exact one.
    """
    _check_common(form, reweight, clip_eps, omega_train, tempflow_scale, kl_coef)
    if isinstance(kl_coef, (int, float)) and kl_coef <= 0:  # tensor values are not read back (no host sync)
        raise ValueError(f"kl_coef must be > 0: the canonical form divides by alpha = kl_coef (* dt), got {kl_coef!r}")
    batch = coeffs.omega.shape[0] if coeffs.omega.dim() == 1 else -1
    _check_rows(coeffs, adv, batch)
    if not isinstance(log_ratio, Tensor) or tuple(log_ratio.shape) != (batch,):
        raise ValueError(f"log_ratio must have shape ({batch},), got {getattr(log_ratio, 'shape', log_ratio)!r}")
    needs_lin = reweight == "guard" or (reweight == "pcpo" and form == "hinge")
    if needs_lin and lin is None:
        raise ValueError(f"lin (ZOLossOut.lin) is required for reweight={reweight!r} with form={form!r}")
    if lin is not None and (not isinstance(lin, Tensor) or tuple(lin.shape) != (batch,)):
        raise ValueError(f"lin must have shape ({batch},), got {getattr(lin, 'shape', lin)!r}")

    cd = compute_dtype(adv, log_ratio, coeffs.omega)
    A, logr = adv.detach().to(cd), log_ratio.detach().to(cd)
    st = coeffs.stochastic
    s, o, c_lin, c_quad = _reweight_scales(coeffs, reweight, form, omega_train, tempflow_scale, batch, cd)
    if needs_lin:
        lin_ = lin.detach().to(cd)
        N = c_lin * lin_ + c_quad * (-logr - lin_)      # quad = -log r - lin
    else:
        N = -logr
    L = -s * N
    # G = d policy / d N (unweighted; policy = surrogate of L = -s N): o A s, times e^L for the
    # ratio form, 0 on clipped rows and on ODE rows.
    _, clipped = _surrogate(form, A, L, o, clip_eps)
    G = o * A * s * (torch.exp(L) if form == "ratio" else 1.0)
    G = torch.where(clipped | ~st, torch.zeros_like(G), G)

    alpha = _kl_alpha(kl_coef, coeffs, kl_dt_weight, batch, cd, A.device)
    W = _per_row("row_weight", 1.0 if row_weight is None else row_weight, batch, cd, A.device)
    k = coeffs.omega.to(cd) * coeffs.p_s.to(cd)         # omega * df = k * (s_theta - s_old)
    k_safe = torch.where(k != 0, k, torch.ones_like(k))
    C1 = W * alpha * k**2 / 2
    gamma_scale = torch.where(k != 0, -G * c_lin / (alpha * k_safe), torch.zeros_like(k))
    C2 = G * c_quad / alpha
    return C1, gamma_scale, C2
