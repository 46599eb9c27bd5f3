"""Tests for rsm_fast.losses.reference (spec §2.5, §3.2-3.4, §5, §6, §14).

Float64 throughout (except the bf16 test). Inputs are parametrised in score space,
``f = coeffs.from_score(s, x)``, so autograd gradients w.r.t. ``s_theta`` can be compared with the
canonical RSM form ``(2/d) C1 [(s - s_ref) - gamma Psi + C2 (s - s_old)]``. Expected values are
written independently from the spec (explicit Gaussian means / log-densities, closed forms of
§5.2), never by calling the function under test on the expected side.
"""
from __future__ import annotations

import math
import zlib

import pytest
import torch

from rsm_fast import schedules as S
from rsm_fast import transitions as T
from rsm_fast.losses import (
    REWEIGHTS,
    SURROGATE_FORMS,
    ZOLossOut,
    canonical_coefficients,
    kl_anchor_loss,
    score_regression_loss,
    zo_row_loss,
)

F64 = torch.float64
LATENT = (4, 3, 3)
D = 4 * 3 * 3
FAMILIES = ("ddim", "flow")


def _transition(family: str) -> T.GaussianTransition:
    if family == "ddim":  # 10 steps; the last one (to clean data) has sigma = 0, i.e. an ODE row
        return T.ddim(S.ddpm_linear_alphas_cumprod(), S.ddim_timesteps(1000, 10), eta=1.0)
    return T.flow_grpo_sde(S.rf_sigmas(10, 3.0), noise_level=0.7)


def _rows(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * len(LATENT)))


def _batch(family, seed, B=24, ode_frac=0.0, delta=(1e-4, 1.0), steps=None, dtype=F64):
    """Rows at different steps of one sampler, score-space inputs with per-row off-policy size."""
    g = torch.Generator().manual_seed(seed)
    tr = _transition(family)
    idx = torch.arange(B) % tr.num_steps if steps is None else steps
    idx = idx[torch.randperm(B, generator=g)]
    stoch = None if ode_frac == 0 else torch.rand(B, generator=g, dtype=F64) >= ode_frac
    co = tr.coeffs(idx, stoch, dtype=dtype)
    rn = lambda: torch.randn(B, *LATENT, generator=g, dtype=F64)  # noqa: E731
    x, s_old = rn(), rn()
    s_ref = s_old + 0.3 * rn()
    dl = torch.logspace(math.log10(delta[0]), math.log10(delta[1]), B, dtype=F64)[torch.randperm(B, generator=g)]
    s_theta = s_old + _rows(dl) * rn()
    z = rn()
    adv = torch.randn(B, generator=g, dtype=F64)
    adv[0] = 0.0  # a zero advantage row
    return dict(co=co, x=x, s_old=s_old, s_ref=s_ref, s_theta=s_theta, z=z, adv=adv, g=g, B=B)


def _native(b):
    co, x = b["co"], b["x"]
    return co.from_score(b["s_old"], x), co.from_score(b["s_ref"], x)


def _grad_wrt_score(b, **kw):
    """loss.sum() and its autograd gradient w.r.t. s_theta; f_theta = from_score(s_theta, x)."""
    s = b["s_theta"].clone().requires_grad_(True)
    f_old, f_ref = _native(b)
    out = zo_row_loss(b["co"].from_score(s, b["x"]), f_old, b["z"], b["adv"], b["co"], f_ref=f_ref, **kw)
    (grad,) = torch.autograd.grad(out.loss.sum(), s)
    return out, grad


def _assert_grad_close(got, want, tol=1e-10):
    scale = want.abs().max().clamp_min(1e-30)
    err = (got - want).abs().max() / scale
    assert err < tol, f"relative gradient error {err:.3e}"


def _explicit_logprob(co, x_next, x, f):
    """log N(x'; c_x x + c_f f, sigma^2 I), per-dim mean, from the coefficient fields directly."""
    mu = _rows(co.c_x) * x + _rows(co.c_f) * f
    sig = _rows(co.sigma)
    lp = -((x_next - mu) ** 2) / (2 * sig**2) - torch.log(sig) - 0.5 * math.log(2 * math.pi)
    return lp.flatten(1).mean(1)


# ---------------------------------------------------------------------------------------------
# 1. Gradient == canonical RSM form, every (form, reweight)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("reweight", REWEIGHTS)
@pytest.mark.parametrize("form", SURROGATE_FORMS)
@pytest.mark.parametrize("kl_dt_weight", [False, True])
def test_gradient_equals_canonical_form(family, reweight, form, kl_dt_weight):
    seed = zlib.crc32(f"{family}/{reweight}/{form}/{kl_dt_weight}".encode()) % 10_000
    b = _batch(family, seed, ode_frac=0.15)
    B, g = b["B"], b["g"]
    kl_coef = 0.05 + torch.rand(B, generator=g, dtype=F64) if seed % 2 else 0.3
    row_weight = 0.5 + torch.rand(B, generator=g, dtype=F64)
    omega_train = 0.2 + torch.rand(B, generator=g, dtype=F64) if seed % 3 else 0.5
    kw = dict(form=form, reweight=reweight, clip_eps=1e-3, kl_coef=kl_coef, kl_dt_weight=kl_dt_weight,
              row_weight=row_weight, omega_train=omega_train)
    out, grad = _grad_wrt_score(b, **kw)
    assert isinstance(out, ZOLossOut)
    for name in ("loss", "policy", "kl", "clipped", "log_ratio", "lin"):
        assert getattr(out, name).shape == (B,)
    assert out.loss.dtype == F64 and out.clipped.dtype == torch.bool
    st = b["co"].stochastic
    if form != "pg":  # the batch reaches both regions
        assert bool(out.clipped.any()) and bool((~out.clipped & st).any())
    else:
        assert not bool(out.clipped.any())
    C1, gam, C2 = canonical_coefficients(b["co"], b["adv"], out.log_ratio, lin=out.lin, **kw)
    s, s_ref, s_old, z = b["s_theta"], b["s_ref"], b["s_old"], b["z"]
    want = (2.0 / D) * _rows(C1) * ((s - s_ref) - _rows(gam) * z + _rows(C2) * (s - s_old))
    _assert_grad_close(grad, want)
    # clipped rows and ODE rows: no guidance, no trust-region force
    dead = out.clipped | ~st
    assert torch.all(gam[dead] == 0) and torch.all(C2[dead] == 0)


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_canonical_sum_reduction(family):
    b = _batch(family, 7)
    kw = dict(form="hinge", reweight="base", clip_eps=1e-3, kl_coef=0.2, reduce="sum")
    out, grad = _grad_wrt_score(b, **kw)
    kw.pop("reduce")
    C1, gam, C2 = canonical_coefficients(b["co"], b["adv"], out.log_ratio, **kw)
    s, s_ref, s_old, z = b["s_theta"], b["s_ref"], b["s_old"], b["z"]
    want = 2.0 * _rows(C1) * ((s - s_ref) - _rows(gam) * z + _rows(C2) * (s - s_old))
    _assert_grad_close(grad, want)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("seed", [11, 12, 13])
def test_closed_form_spec_5_2_base_hinge(family, seed):
    """Spec §5.2: C1 = a b^2/(2 Sigma), gamma Psi = I A sigma z/(a b), C2 = I A/a, written from b, sigma."""
    steps = torch.arange(24) % 9 + (1 if family == "flow" else 0)  # flow: skip t = 1; ddim: skip sigma = 0
    b = _batch(family, seed, steps=steps)
    alpha, eps = 0.37, 1e-3
    out, grad = _grad_wrt_score(b, form="hinge", reweight="base", clip_eps=eps, kl_coef=alpha)
    co, A = b["co"], b["adv"]
    f_old, _ = _native(b)
    x_next = co.mean(b["x"], f_old) + _rows(co.sigma) * b["z"]
    logr = _explicit_logprob(co, x_next, b["x"], co.from_score(b["s_theta"], b["x"])) - _explicit_logprob(
        co, x_next, b["x"], f_old)
    I = (A * logr <= eps * A.abs()).to(F64)
    assert 0 < I.sum() < b["B"]
    torch.testing.assert_close(out.clipped, I == 0)
    bb, sig = co.b, co.sigma
    C1 = alpha * bb**2 / (2 * sig**2)
    gpsi = _rows(I * A * sig / (alpha * bb)) * b["z"]
    C2 = I * A / alpha
    s, s_ref, s_old = b["s_theta"], b["s_ref"], b["s_old"]
    want = (2.0 / D) * _rows(C1) * ((s - s_ref) - gpsi + _rows(C2) * (s - s_old))
    _assert_grad_close(grad, want)
    c1, gam, c2 = canonical_coefficients(co, A, out.log_ratio, form="hinge", reweight="base", clip_eps=eps,
                                         kl_coef=alpha)
    torch.testing.assert_close(c1, C1, rtol=1e-12, atol=0)
    torch.testing.assert_close(_rows(gam) * b["z"], gpsi, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(c2, C2, rtol=1e-12, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_score_regression_with_canonical_coeffs_reproduces_zo_gradient(family):
    """Thm. 3.2: the RSM regression loss with Table-1 coefficients has the ZO loss's gradient."""
    b = _batch(family, 21, ode_frac=0.2)
    kw = dict(form="ratio", reweight="tempflow", clip_eps=1e-3, kl_coef=0.1, row_weight=1.5)
    out, grad = _grad_wrt_score(b, **kw)
    C1, gam, C2 = canonical_coefficients(b["co"], b["adv"], out.log_ratio, **kw)
    s = b["s_theta"].clone().requires_grad_(True)
    rsm = score_regression_loss(s, b["s_ref"], b["s_old"], b["z"], C1, gam, C2)
    (g2,) = torch.autograd.grad(rsm.sum(), s)
    _assert_grad_close(g2, grad)


# ---------------------------------------------------------------------------------------------
# 2. Fair clip == base when unclipped; Guard has no trust-region force
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("seed", [31, 32])
def test_fair_clip_gradient_equals_base_when_unclipped(family, seed):
    b = _batch(family, seed, ode_frac=0.1, delta=(1e-4, 3e-1))
    co, A, st = b["co"], b["adv"], b["co"].stochastic
    kw = dict(form="hinge", clip_eps=1e-3, kl_coef=0.2)
    base, g_base = _grad_wrt_score(b, reweight="base", **kw)
    fair, g_fair = _grad_wrt_score(b, reweight="fair", **kw)
    both = ~base.clipped & ~fair.clipped
    assert bool(both.any()) and bool((~both).any())
    torch.testing.assert_close(g_fair[both], g_base[both], rtol=1e-12, atol=1e-15)
    # the threshold on A log r moves from eps to eps / Sigma
    want = (A * fair.log_ratio > 1e-3 * A.abs() / torch.where(st, co.sigma, torch.ones_like(A)) ** 2) & st
    torch.testing.assert_close(fair.clipped, want)
    # ratio form: fair = r^Sigma / Sigma, so unclipped gradients differ from PPO's exactly by r^(Sigma - 1)
    kw = dict(form="ratio", clip_eps=1e-3)
    base, g_base = _grad_wrt_score(b, reweight="base", **kw)
    fair, g_fair = _grad_wrt_score(b, reweight="fair", **kw)
    both = ~base.clipped & ~fair.clipped
    assert bool(both.any())
    scale = _rows(torch.exp((co.sigma**2 - 1) * base.log_ratio))
    torch.testing.assert_close(g_fair[both], (scale * g_base)[both], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("form", SURROGATE_FORMS)
def test_guard_has_no_trust_region_term(family, form):
    b = _batch(family, 41)
    kw = dict(form=form, reweight="guard", clip_eps=1e-3, kl_coef=0.2)
    out, _ = _grad_wrt_score(b, **kw)
    C1, gam, C2 = canonical_coefficients(b["co"], b["adv"], out.log_ratio, lin=out.lin, **kw)
    assert torch.all(C2 == 0)
    # gamma = sigma/dt on unclipped rows (spec §5.3, pg: always)
    co, A = b["co"], b["adv"]
    live = ~out.clipped & (A != 0)
    k = co.omega * co.p_s
    r = torch.exp(co.sigma * -out.lin) if form == "ratio" else torch.ones_like(A)
    torch.testing.assert_close((gam * -k * 0.2 / A)[live], (co.sigma / co.dt * r)[live], rtol=1e-12, atol=0)


# ---------------------------------------------------------------------------------------------
# 3. Log-ratio identities; on-policy behaviour
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("seed", [51, 52])
def test_log_ratio_matches_explicit_gaussians(family, seed):
    b = _batch(family, seed, ode_frac=0.2, delta=(1e-3, 1.0))
    co, x = b["co"], b["x"]
    f_old, _ = _native(b)
    f_theta = co.from_score(b["s_theta"], x)
    out = zo_row_loss(f_theta, f_old, b["z"], b["adv"], co)
    torch.testing.assert_close(out.log_ratio, co.log_ratio(f_theta, f_old, b["z"]), rtol=1e-12, atol=1e-14)
    st = co.stochastic
    x_next = _rows(co.c_x) * x + _rows(co.c_f) * f_old + _rows(co.sigma) * b["z"]
    want = _explicit_logprob(co, x_next, x, f_theta) - _explicit_logprob(co, x_next, x, f_old)
    torch.testing.assert_close(out.log_ratio[st], want[st], rtol=1e-9, atol=1e-11)
    assert torch.all(out.log_ratio[~st] == 0)
    assert not out.log_ratio.requires_grad and not out.lin.requires_grad


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("form", SURROGATE_FORMS)
def test_on_policy_is_reinforce(family, form):
    b = _batch(family, 61)
    co, x = b["co"], b["x"]
    f_old, _ = _native(b)
    eps = 1e-4
    f = f_old.clone().requires_grad_(True)
    out = zo_row_loss(f, f_old, b["z"], b["adv"], co, form=form, clip_eps=eps)
    st = co.stochastic
    assert torch.all(out.log_ratio == 0) and not bool(out.clipped.any())
    A = b["adv"]
    want = {"hinge": eps * A.abs(), "ratio": -A, "pg": torch.zeros_like(A)}[form]
    torch.testing.assert_close(out.loss, torch.where(st, want, torch.zeros_like(A)), rtol=0, atol=0)
    (g,) = torch.autograd.grad(out.loss.sum(), f)
    f2 = f_old.clone().requires_grad_(True)
    (glr,) = torch.autograd.grad((-A * co.log_ratio(f2, f_old, b["z"])).sum(), f2)
    _assert_grad_close(g, glr, tol=1e-13)


# ---------------------------------------------------------------------------------------------
# 4. Surrogates vs the spec's formulas; KL; ODE rows; anchor; regression loss
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("reweight", REWEIGHTS)
def test_surrogates_match_spec_formulas(family, reweight):
    steps = torch.arange(24) % 9  # ddim: skip the sigma = 0 last step (no density there)
    b = _batch(family, 71 + REWEIGHTS.index(reweight), delta=(1e-4, 0.5), steps=steps)
    co, x, z, A = b["co"], b["x"], b["z"], b["adv"]
    f_old, _ = _native(b)
    f_th = co.from_score(b["s_theta"], x)
    eps, w_tr = 2e-3, 0.45
    mu_th, mu_old = _rows(co.c_x) * x + _rows(co.c_f) * f_th, _rows(co.c_x) * x + _rows(co.c_f) * f_old
    x_next = mu_old + _rows(co.sigma) * z
    logr = _explicit_logprob(co, x_next, x, f_th) - _explicit_logprob(co, x_next, x, f_old)
    sig, Sig, dt = co.sigma, co.sigma**2, co.dt
    dmu_z = (z * (mu_th - mu_old)).flatten(1).mean(1)       # GRPO-Guard: z . dmu
    rho = w_tr / co.omega
    df = f_th - f_old
    neg_pcpo = (0.5 * (w_tr * df) ** 2 + w_tr * df * z).flatten(1).mean(1)
    one = torch.ones_like(A)
    # (inner log-ratio L, outer factor o) per spec §5.3 table / §14
    L, o = {"base": (logr, one), "tempflow": (2.25 * sig * logr, one), "tempflow_outer": (logr, 2.25 * sig),
            "fair": (Sig * logr, 1 / Sig), "fair_guard": (Sig * logr, sig / (Sig * dt)),
            "guard": (dmu_z, 1 / dt), "pcpo": (rho * logr, one)}[reweight]
    r = torch.exp(L)
    ppo = o * torch.maximum(-A * r, -A * torch.clamp(r, 1 - eps, 1 + eps))
    Lh = -neg_pcpo if reweight == "pcpo" else L
    hinge = o * torch.clamp(eps * A.abs() - A * Lh, min=0)
    pg = -o * A * L
    for form, want in (("ratio", ppo), ("hinge", hinge), ("pg", pg)):
        out = zo_row_loss(f_th, f_old, z, A, co, form=form, reweight=reweight, clip_eps=eps, omega_train=w_tr)
        torch.testing.assert_close(out.policy, want, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(out.loss, out.policy, rtol=0, atol=0)
        assert torch.all(out.kl == 0)


@pytest.mark.parametrize("family", FAMILIES)
def test_kl_dt_weight_and_row_weight(family):
    b = _batch(family, 81, ode_frac=0.2)
    co = b["co"]
    f_old, f_ref = _native(b)
    f_th = co.from_score(b["s_theta"], b["x"])
    W = torch.linspace(0.5, 2.0, b["B"], dtype=F64)
    kw = dict(form="hinge", clip_eps=1e-3, f_ref=f_ref, kl_coef=0.3)
    plain = zo_row_loss(f_th, f_old, b["z"], b["adv"], co, **kw)
    dtw = zo_row_loss(f_th, f_old, b["z"], b["adv"], co, kl_dt_weight=True, row_weight=W, **kw)
    kl_spec = 0.3 * 0.5 * ((_rows(co.omega) * (f_th - f_ref)) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(plain.kl, kl_spec, rtol=1e-12, atol=0)
    torch.testing.assert_close(dtw.kl, W * co.dt * kl_spec, rtol=1e-12, atol=0)
    torch.testing.assert_close(dtw.policy, W * plain.policy, rtol=1e-12, atol=0)
    torch.testing.assert_close(dtw.loss, dtw.policy + dtw.kl, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("form", SURROGATE_FORMS)
def test_ode_rows_have_no_policy_term(family, form):
    b = _batch(family, 91, ode_frac=0.5, delta=(1e-2, 1.0))
    co = b["co"]
    ode = ~co.stochastic
    assert bool(ode.any()) and bool((~ode).any())
    f_old, f_ref = _native(b)
    f = co.from_score(b["s_theta"], b["x"]).requires_grad_(True)
    out = zo_row_loss(f, f_old, b["z"], b["adv"], co, form=form, reweight="fair", f_ref=f_ref, kl_coef=0.4,
                      clip_eps=1e-3)
    assert torch.all(out.policy[ode] == 0) and not bool(out.clipped[ode].any()) and torch.all(out.log_ratio[ode] == 0)
    w = co.omega[ode]
    assert bool((w > 0).any()) and torch.all(out.kl[ode][w > 0] > 0)  # the ODE-row anchor still counts
    (g,) = torch.autograd.grad(out.loss.sum(), f)
    f2 = f.detach().clone().requires_grad_(True)
    (gk,) = torch.autograd.grad((0.4 * co.kl(f2, f_ref)).sum(), f2)
    torch.testing.assert_close(g[ode], gk[ode], rtol=1e-12, atol=0)
    assert torch.isfinite(g).all()


def test_kl_anchor_loss_formula_and_gradient():
    g = torch.Generator().manual_seed(101)
    B = 6
    f, f_ref = torch.randn(B, *LATENT, generator=g, dtype=F64), torch.randn(B, *LATENT, generator=g, dtype=F64)
    omega, weight, dt = torch.rand(B, generator=g, dtype=F64) + 0.1, 8e-5, torch.rand(B, generator=g, dtype=F64)
    want = weight * 0.5 * ((_rows(omega) * (f - f_ref)) ** 2).flatten(1).mean(1) * dt
    torch.testing.assert_close(kl_anchor_loss(f, f_ref, omega, weight, dt), want, rtol=1e-13, atol=0)
    torch.testing.assert_close(kl_anchor_loss(f, f_ref, 4.5, weight), weight * 0.5 * (4.5 * (f - f_ref)).pow(2).flatten(1).mean(1),
                               rtol=1e-13, atol=0)
    torch.testing.assert_close(kl_anchor_loss(f, f_ref, omega, 1.0, reduce="sum"),
                               0.5 * ((_rows(omega) * (f - f_ref)) ** 2).flatten(1).sum(1), rtol=1e-13, atol=0)
    fg = f.clone().requires_grad_(True)
    (gr,) = torch.autograd.grad(kl_anchor_loss(fg, f_ref, omega, weight, dt).sum(), fg)
    torch.testing.assert_close(gr, _rows(weight * dt * omega**2) * (f - f_ref) / D, rtol=1e-12, atol=0)


@pytest.mark.parametrize("seed", [111, 112])
def test_score_regression_loss_value_and_gradient(seed):
    g = torch.Generator().manual_seed(seed)
    B = 8
    rn = lambda: torch.randn(B, *LATENT, generator=g, dtype=F64)  # noqa: E731
    s, s_ref, s_old, psi = rn(), rn(), rn(), rn()
    C1, gamma, C2 = (torch.rand(B, generator=g, dtype=F64) + 0.1 for _ in range(3))
    sg = s.clone().requires_grad_(True)
    out = score_regression_loss(sg, s_ref, s_old, psi, C1, gamma, C2)
    want = C1 * (((s - s_ref - _rows(gamma) * psi) ** 2).flatten(1).mean(1) + C2 * ((s - s_old) ** 2).flatten(1).mean(1))
    torch.testing.assert_close(out, want, rtol=1e-13, atol=0)
    (gr,) = torch.autograd.grad(out.sum(), sg)
    torch.testing.assert_close(gr, (2 / D) * _rows(C1) * ((s - s_ref - _rows(gamma) * psi) + _rows(C2) * (s - s_old)),
                               rtol=1e-12, atol=1e-15)
    # scalars, and s_old = None with C2 == 0
    a = score_regression_loss(s, s_ref, None, psi, 0.5, 2.0)
    torch.testing.assert_close(a, 0.5 * ((s - s_ref - 2.0 * psi) ** 2).flatten(1).mean(1), rtol=1e-13, atol=0)


# ---------------------------------------------------------------------------------------------
# 5. dtypes, host syncs, argument validation
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("form", SURROGATE_FORMS)
def test_bf16_inputs_give_fp32_outputs(family, form):
    b = _batch(family, 121, delta=(0.3, 1.0))
    idx = torch.arange(b["B"]) % 10
    co32 = _transition(family).coeffs(idx, dtype=torch.float32)
    co64 = _transition(family).coeffs(idx, dtype=F64)
    x = b["x"]
    f_old, f_ref, f_th = (co64.from_score(v, x) for v in (b["s_old"], b["s_ref"], b["s_theta"]))
    bf = [v.to(torch.bfloat16) for v in (f_th, f_old, b["z"], f_ref)]
    kw = dict(form=form, reweight="tempflow", clip_eps=1e-3, kl_coef=0.1, row_weight=2.0)
    fb = bf[0].clone().requires_grad_(True)
    out = zo_row_loss(fb, bf[1], bf[2], b["adv"].to(torch.bfloat16), co32, f_ref=bf[3], **kw)
    for name in ("loss", "policy", "kl", "log_ratio", "lin"):
        assert getattr(out, name).dtype == torch.float32, name
    out.loss.sum().backward()
    assert fb.grad.dtype == torch.bfloat16 and torch.isfinite(fb.grad.float()).all()
    # same values as fp32 math on the bf16-rounded inputs
    ref = zo_row_loss(*(v.float() for v in bf[:3]), b["adv"].to(torch.bfloat16).float(), co32, f_ref=bf[3].float(), **kw)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=1e-6)
    # and close to the fp32 result on the unrounded inputs (KL and log-ratio; flags may differ at the margin)
    full = zo_row_loss(f_th.float(), f_old.float(), b["z"].float(), b["adv"].float(), co32, f_ref=f_ref.float(), **kw)
    torch.testing.assert_close(out.kl, full.kl, rtol=3e-2, atol=1e-3)
    torch.testing.assert_close(out.log_ratio, full.log_ratio, rtol=5e-2, atol=5e-2 * full.log_ratio.abs().max().item())


def test_zo_row_loss_has_no_host_sync(no_host_sync):
    b = _batch("flow", 131, ode_frac=0.2)
    f_old, f_ref = _native(b)
    f_th = b["co"].from_score(b["s_theta"], b["x"])
    W = torch.ones(b["B"], dtype=F64)
    with no_host_sync():
        for form in SURROGATE_FORMS:
            for rw in REWEIGHTS:
                out = zo_row_loss(f_th, f_old, b["z"], b["adv"], b["co"], form=form, reweight=rw, f_ref=f_ref,
                                  kl_coef=W * 0.1, row_weight=W, omega_train=W, kl_dt_weight=True)
                canonical_coefficients(b["co"], b["adv"], out.log_ratio, lin=out.lin, form=form, reweight=rw,
                                       clip_eps=1e-4, kl_coef=W * 0.1, omega_train=W)
        kl_anchor_loss(f_th, f_ref, b["co"].omega, W, b["co"].dt)
        score_regression_loss(b["s_theta"], b["s_ref"], b["s_old"], b["z"], W, W, W)
    assert torch.isfinite(out.loss).all()


def _bad_zo_calls():
    b = _batch("ddim", 141, B=4)
    f_old, f_ref = _native(b)
    f = b["co"].from_score(b["s_theta"], b["x"])
    args = (f, f_old, b["z"], b["adv"], b["co"])
    cases = [
        ("form", args, dict(form="ppo")),
        ("reweight", args, dict(reweight="tempflow2")),
        ("clip_eps", args, dict(form="hinge", clip_eps=0.0)),
        ("clip_eps", args, dict(form="ratio", clip_eps=-1e-3)),
        ("f_old", (f, f_old[:, :2], b["z"], b["adv"], b["co"]), {}),
        ("z", (f, f_old, b["z"][:3], b["adv"], b["co"]), {}),
        ("adv", (f, f_old, b["z"], b["adv"][:3], b["co"]), {}),
        ("adv", (f, f_old, b["z"], b["adv"][:, None], b["co"]), {}),
        ("f_theta", (f.flatten(1)[:, 0], f_old, b["z"], b["adv"], b["co"]), {}),
        ("f_ref", args, dict(f_ref=f_ref[:, :1], kl_coef=0.1)),
        ("f_ref", args, dict(kl_coef=0.1)),
        ("kl_coef", args, dict(f_ref=f_ref, kl_coef=-0.1)),
        ("kl_coef", args, dict(f_ref=f_ref, kl_coef=torch.ones(3))),
        ("omega_train", args, dict(reweight="pcpo")),
        ("omega_train", args, dict(reweight="pcpo", omega_train=torch.ones(5))),
        ("row_weight", args, dict(row_weight=torch.ones(2, 2))),
        ("tempflow_scale", args, dict(reweight="tempflow", tempflow_scale=0.0)),
        ("reduce", args, dict(reduce="max")),
    ]
    return cases


@pytest.mark.parametrize("case", range(18))
def test_zo_row_loss_bad_arguments(case):
    name, args, kw = _bad_zo_calls()[case]
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        zo_row_loss(*args, **kw)


def test_other_functions_bad_arguments():
    b = _batch("flow", 151, B=4)
    s, s_ref, z, co, A = b["s_theta"], b["s_ref"], b["z"], b["co"], b["adv"]
    lr = torch.zeros(4, dtype=F64)
    with pytest.raises(ValueError, match=r"\bkl_coef\b"):
        canonical_coefficients(co, A, lr, form="hinge", reweight="base", clip_eps=1e-4, kl_coef=0.0)
    with pytest.raises(ValueError, match=r"\blin\b"):
        canonical_coefficients(co, A, lr, form="hinge", reweight="guard", clip_eps=1e-4, kl_coef=0.1)
    with pytest.raises(ValueError, match=r"\blin\b"):
        canonical_coefficients(co, A, lr, form="hinge", reweight="pcpo", clip_eps=1e-4, kl_coef=0.1, omega_train=0.5)
    with pytest.raises(ValueError, match=r"\blog_ratio\b"):
        canonical_coefficients(co, A, lr[:2], form="hinge", reweight="base", clip_eps=1e-4, kl_coef=0.1)
    with pytest.raises(ValueError, match=r"\bform\b"):
        canonical_coefficients(co, A, lr, form="clip", reweight="base", clip_eps=1e-4, kl_coef=0.1)
    with pytest.raises(ValueError, match=r"\bs_old\b"):
        score_regression_loss(s, s_ref, None, z, 1.0, 1.0, C2=0.5)
    with pytest.raises(ValueError, match=r"\bC1\b"):
        score_regression_loss(s, s_ref, None, z, torch.ones(3), 1.0)
    with pytest.raises(ValueError, match=r"\bpsi_hat\b"):
        score_regression_loss(s, s_ref, None, z[:, :1], 1.0, 1.0)
    with pytest.raises(ValueError, match=r"\bomega\b"):
        kl_anchor_loss(s, s_ref, torch.ones(5), 1.0)
    with pytest.raises(ValueError, match=r"\bf_ref\b"):
        kl_anchor_loss(s, s_ref[:2], 1.0, 1.0)


@pytest.mark.parametrize("family", FAMILIES)
def test_clipped_row_whose_ratio_overflows_has_a_zero_gradient(family):
    """Sum reduction over 1600 dims, a policy mean moved onto the sampled point: log r = sum z^2 / 2
    (~800) overflows exp in float64. The row is clipped (A > 0), so its loss is -A (1 + eps) and its
    gradient 0, not 0 * inf = NaN; the other rows keep their gradients (the fused ops agree)."""
    from rsm_fast import ops

    tr = _transition(family)
    B, g = 4, torch.Generator().manual_seed(5)
    co = tr.coeffs(torch.tensor([1, 2, 3, 4]) % tr.num_steps, dtype=F64)
    z = torch.randn(B, 40, 40, generator=g, dtype=F64)
    f_old = torch.randn(B, 40, 40, generator=g, dtype=F64)
    f = f_old + 1e-3 * torch.randn(B, 40, 40, generator=g, dtype=F64)
    f[0] = f_old[0] - z[0] / co.omega[0]                # log r = sum z^2 / 2 on row 0
    adv = torch.tensor([1.0, -0.5, 0.7, 1.2], dtype=F64)
    grads = []
    for fn in (zo_row_loss, ops.zo_loss):
        fv = f.clone().requires_grad_(True)
        out = fn(fv, f_old, z, adv, co, form="ratio", clip_eps=0.2, reduce="sum")
        assert bool(out.clipped[0]) and torch.isinf(torch.exp(out.log_ratio[0]))
        torch.testing.assert_close(out.loss[0], torch.tensor(-1.2, dtype=F64))
        (gr,) = torch.autograd.grad(out.loss.sum(), fv)
        assert torch.isfinite(gr).all() and torch.equal(gr[0], torch.zeros_like(gr[0])) and gr[1:].abs().sum() > 0
        grads.append(gr)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)
