"""Tests for rsm_fast.schedules (spec §1, §2.2, §2.3).

Every expected value is re-derived here independently in float64 (numpy / plain Python), never by
calling the helper under test on the expected side.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rsm_fast import schedules as S

SEEDS = [0, 1, 2]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).numpy()


# ----------------------------------------------------------------------------------------------
# VP schedules
# ----------------------------------------------------------------------------------------------
def test_ddpm_linear_betas_formula_and_endpoints():
    b = S.vp_betas(1000, 1e-4, 0.02, "linear")
    assert b.dtype == torch.float64 and b.shape == (1000,)
    ref = np.array([1e-4 + (0.02 - 1e-4) * i / 999 for i in range(1000)])
    np.testing.assert_allclose(_np(b), ref, rtol=0, atol=1e-15)
    assert float(b[0]) == pytest.approx(1e-4, abs=1e-18)
    assert float(b[-1]) == pytest.approx(0.02, abs=1e-16)
    # constant increments (linear in beta)
    np.testing.assert_allclose(np.diff(_np(b)), (0.02 - 1e-4) / 999, rtol=1e-9)


def test_sd15_scaled_linear_betas_formula_and_endpoints():
    b = S.vp_betas(1000, 0.00085, 0.012, "scaled_linear")
    lo, hi = math.sqrt(0.00085), math.sqrt(0.012)
    ref = np.array([(lo + (hi - lo) * i / 999) ** 2 for i in range(1000)])
    np.testing.assert_allclose(_np(b), ref, rtol=1e-13, atol=0)
    assert float(b[0]) == pytest.approx(0.00085, rel=1e-13)
    assert float(b[-1]) == pytest.approx(0.012, rel=1e-13)
    # linear in sqrt(beta), not in beta
    np.testing.assert_allclose(np.diff(np.sqrt(_np(b))), (hi - lo) / 999, rtol=1e-9)
    assert not np.allclose(np.diff(_np(b)), np.diff(_np(b))[0], rtol=1e-3)


@pytest.mark.parametrize("name,fn,b0,b1,kind", [
    ("ddpm", S.ddpm_linear_alphas_cumprod, 1e-4, 0.02, "linear"),
    ("sd15", S.sd15_alphas_cumprod, 0.00085, 0.012, "scaled_linear"),
])
def test_alphas_cumprod_presets(name, fn, b0, b1, kind):
    ac = fn()
    assert ac.dtype == torch.float64 and ac.shape == (1000,)
    if kind == "linear":
        betas = [b0 + (b1 - b0) * i / 999 for i in range(1000)]
    else:
        betas = [(math.sqrt(b0) + (math.sqrt(b1) - math.sqrt(b0)) * i / 999) ** 2 for i in range(1000)]
    prod, ref = 1.0, []
    for beta in betas:
        prod *= 1.0 - beta
        ref.append(prod)
    np.testing.assert_allclose(_np(ac), np.array(ref), rtol=1e-12)
    assert float(ac[0]) == pytest.approx(1 - b0, rel=1e-14)
    assert np.all(np.diff(_np(ac)) < 0)


def test_sd15_known_values():
    ac = S.sd15_alphas_cumprod()
    # diffusers SD1.5 final_alpha_cumprod (= alphas_cumprod[0]) and the terminal alpha_bar
    assert float(ac[0]) == pytest.approx(0.99915, abs=1e-12)
    assert float(ac[-1]) == pytest.approx(0.0046600, abs=5e-7)


@pytest.mark.parametrize("seed", SEEDS)
def test_alphas_cumprod_random_betas(seed):
    g = _gen(seed)
    betas = torch.rand(37, generator=g, dtype=torch.float64) * 0.2
    ac = S.alphas_cumprod(betas.to(torch.float32))  # also upcasts
    assert ac.dtype == torch.float64
    ref = np.cumprod(1.0 - _np(betas.to(torch.float32)))
    np.testing.assert_allclose(_np(ac), ref, rtol=1e-13)


def test_vp_betas_errors():
    with pytest.raises(ValueError, match="num_train_timesteps"):
        S.vp_betas(0, 1e-4, 0.02)
    with pytest.raises(ValueError, match="cosine"):
        S.vp_betas(10, 1e-4, 0.02, "cosine")


# ----------------------------------------------------------------------------------------------
# DDIM timesteps
# ----------------------------------------------------------------------------------------------
def test_ddim_timesteps_sd15():
    ts = S.ddim_timesteps(1000, 50, offset=1)
    assert ts.dtype == torch.long
    assert ts.tolist() == list(range(981, 0, -20))
    assert ts[0].item() == 981 and ts[-1].item() == 1 and len(ts) == 50


@pytest.mark.parametrize("T,n,off", [(1000, 10, 0), (500, 50, 9), (1000, 7, 3), (1000, 1000, 0)])
def test_ddim_timesteps_leading_spacing(T, n, off):
    ts = S.ddim_timesteps(T, n, offset=off)
    ratio = T // n
    assert ts.tolist() == [i * ratio + off for i in reversed(range(n))]


def test_ddim_timesteps_toy():
    # RSM toy: T = 500, interval 10: 499, 489, ..., 9
    assert S.ddim_timesteps(500, 50, offset=9).tolist() == list(range(499, 8, -10))


@pytest.mark.parametrize("n", [0, -1, 1001])
def test_ddim_timesteps_errors(n):
    with pytest.raises(ValueError, match="num_steps"):
        S.ddim_timesteps(1000, n)


# ----------------------------------------------------------------------------------------------
# Rectified-flow sigmas
# ----------------------------------------------------------------------------------------------
SPEC_T_ROW = [1.000, .960, .913, .858, .790, .707, .602, .465, .278, .0089]


def test_rf_sigmas_spec_table():
    s = S.rf_sigmas(10, shift=3.0)
    assert s.dtype == torch.float64 and s.shape == (11,)
    np.testing.assert_allclose(_np(s[:-1]), SPEC_T_ROW, atol=1e-3, rtol=0)
    assert float(s[-1]) == 0.0
    assert float(s[0]) == pytest.approx(1.0, abs=1e-14)
    assert np.all(np.diff(_np(s)) < 0)


def _diffusers_flow_sigmas(n: int, shift: float, T: int = 1000) -> list[float]:
    """Independent re-derivation of FlowMatchEulerDiscreteScheduler.set_timesteps (no dynamic shift)."""
    sh = lambda u: shift * u / (1 + (shift - 1) * u)  # noqa: E731
    train = [sh(k / T) for k in range(T, 0, -1)]          # timesteps T..1 / T, shifted
    smax, smin = max(train), min(train)
    tsteps = [smax * T + (smin * T - smax * T) * i / (n - 1) for i in range(n)] if n > 1 else [smax * T]
    return [sh(t / T) for t in tsteps] + [0.0]


@pytest.mark.parametrize("n,shift", [(10, 3.0), (28, 3.0), (16, 1.0), (5, 5.0), (40, 2.5)])
def test_rf_sigmas_matches_diffusers_rederivation(n, shift):
    np.testing.assert_allclose(_np(S.rf_sigmas(n, shift)), _diffusers_flow_sigmas(n, shift), rtol=1e-12, atol=1e-15)


def test_shift_sigmas():
    u = torch.linspace(0, 1, 11, dtype=torch.float64)
    np.testing.assert_allclose(_np(S.shift_sigmas(u, 1.0)), _np(u), atol=1e-15)
    ref = [3 * x / (1 + 2 * x) for x in _np(u)]
    np.testing.assert_allclose(_np(S.shift_sigmas(u, 3.0)), ref, rtol=1e-14)


def test_rf_sigmas_errors():
    with pytest.raises(ValueError, match="num_steps"):
        S.rf_sigmas(0)


# ----------------------------------------------------------------------------------------------
# Conversions (spec §1.2)
# ----------------------------------------------------------------------------------------------
SHAPES = [(5, 7), (3, 4, 3, 5)]


def _rand_vp(g, shape):
    """Random rows on a VP path (alpha^2 + sigma^2 = 1): returns x0, eps, x, alpha, sigma (row-broadcast)."""
    B = shape[0]
    ab = torch.rand(B, generator=g, dtype=torch.float64) * 0.98 + 0.01
    view = (B,) + (1,) * (len(shape) - 1)
    alpha, sigma = ab.sqrt().reshape(view), (1 - ab).sqrt().reshape(view)
    x0 = torch.randn(shape, generator=g, dtype=torch.float64)
    eps = torch.randn(shape, generator=g, dtype=torch.float64)
    return x0, eps, alpha * x0 + sigma * eps, alpha, sigma


def _rand_affine(g, shape):
    """Generic affine path (alpha, sigma independent)."""
    B = shape[0]
    view = (B,) + (1,) * (len(shape) - 1)
    alpha = (torch.rand(B, generator=g, dtype=torch.float64) * 1.5 + 0.1).reshape(view)
    sigma = (torch.rand(B, generator=g, dtype=torch.float64) * 2.0 + 0.05).reshape(view)
    x0 = torch.randn(shape, generator=g, dtype=torch.float64)
    eps = torch.randn(shape, generator=g, dtype=torch.float64)
    return x0, eps, alpha * x0 + sigma * eps, alpha, sigma


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("path", ["vp", "affine"])
def test_eps_x0_score_round_trip(seed, shape, path):
    x0, eps, x, alpha, sigma = (_rand_vp if path == "vp" else _rand_affine)(_gen(seed), shape)
    # the conditional score of x_t | x0 at the realized eps: s = -eps / sigma
    score = -eps / sigma
    tol = dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(S.score_from_eps(eps, sigma), score, **tol)
    torch.testing.assert_close(S.eps_from_score(score, sigma), eps, **tol)
    torch.testing.assert_close(S.x0_from_eps(x, eps, alpha, sigma), x0, **tol)
    torch.testing.assert_close(S.eps_from_x0(x, x0, alpha, sigma), eps, **tol)
    torch.testing.assert_close(S.score_from_x0(x, x0, alpha, sigma), score, **tol)
    torch.testing.assert_close(S.tweedie_x0(x, score, alpha, sigma), x0, **tol)
    # chained round trips
    torch.testing.assert_close(S.x0_from_eps(x, S.eps_from_x0(x, x0, alpha, sigma), alpha, sigma), x0, **tol)
    torch.testing.assert_close(
        S.score_from_x0(x, S.tweedie_x0(x, score, alpha, sigma), alpha, sigma), score, **tol)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_rf_conversions_round_trip(seed, shape):
    g = _gen(seed)
    B = shape[0]
    t = (torch.rand(B, generator=g, dtype=torch.float64) * 0.98 + 0.01).reshape((B,) + (1,) * (len(shape) - 1))
    x0 = torch.randn(shape, generator=g, dtype=torch.float64)
    eps = torch.randn(shape, generator=g, dtype=torch.float64)
    x = (1 - t) * x0 + t * eps
    v = eps - x0
    score = -eps / t
    tol = dict(rtol=1e-10, atol=1e-10)
    a, s = S.rf_alpha_sigma(t)
    torch.testing.assert_close(a, 1 - t, rtol=0, atol=0)
    torch.testing.assert_close(s, t, rtol=0, atol=0)
    torch.testing.assert_close(S.rf_x0_from_v(x, v, t), x0, **tol)
    torch.testing.assert_close(S.rf_eps_from_v(x, v, t), eps, **tol)
    torch.testing.assert_close(S.rf_v_from_score(x, score, t), v, **tol)
    # v <-> score through the generic native maps
    torch.testing.assert_close(S.score_to_native("v", score, x, 1 - t, t), v, **tol)
    torch.testing.assert_close(S.native_to_score("v", v, x, 1 - t, t), score, **tol)
    # spec §1.2 RF: s = -(x + (1-t) v)/t
    torch.testing.assert_close(-(x + (1 - t) * v) / t, score, **tol)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_vpv_round_trip(seed, shape):
    x0, eps, x, alpha, sigma = _rand_vp(_gen(seed), shape)
    v = alpha * eps - sigma * x0
    score = -eps / sigma
    tol = dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(S.score_to_native("vpv", score, x, alpha, sigma), v, **tol)
    torch.testing.assert_close(S.native_to_score("vpv", v, x, alpha, sigma), score, **tol)


def _native_truth(kind, x0, eps, x, alpha, sigma):
    if kind == "eps":
        return eps
    if kind == "x0":
        return x0
    if kind == "v":  # RF: alpha = 1 - t, sigma = t
        return eps - x0
    if kind == "vpv":
        return alpha * eps - sigma * x0
    raise AssertionError(kind)


def _lambda_closed_form(kind, alpha, sigma):
    return {"eps": -1 / sigma, "x0": alpha / sigma**2, "v": -(1 - sigma) / sigma, "vpv": -alpha / sigma}[kind]


def _rand_for_kind(kind, g, shape):
    if kind == "v":
        B = shape[0]
        t = (torch.rand(B, generator=g, dtype=torch.float64) * 0.98 + 0.01).reshape((B,) + (1,) * (len(shape) - 1))
        x0 = torch.randn(shape, generator=g, dtype=torch.float64)
        eps = torch.randn(shape, generator=g, dtype=torch.float64)
        return x0, eps, (1 - t) * x0 + t * eps, 1 - t, t
    if kind in ("vpv", "eps"):
        return _rand_vp(g, shape)
    return _rand_affine(g, shape)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", S.NATIVE_KINDS)
def test_native_affine_round_trip(kind, seed, shape):
    x0, eps, x, alpha, sigma = _rand_for_kind(kind, _gen(seed), shape)
    score = -eps / sigma
    f = _native_truth(kind, x0, eps, x, alpha, sigma)
    tol = dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(S.score_to_native(kind, score, x, alpha, sigma), f, **tol)
    torch.testing.assert_close(S.native_to_score(kind, f, x, alpha, sigma), score, **tol)
    p_x, p_s = S.native_affine(kind, alpha, sigma)
    torch.testing.assert_close(p_x * x + p_s * score, f, **tol)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", S.NATIVE_KINDS)
def test_param_factor_score_difference(kind, seed, shape):
    """s_theta - s_ref == lambda (f_theta - f_ref), lambda = spec §1.3 closed form."""
    g = _gen(seed)
    _, _, x, alpha, sigma = _rand_for_kind(kind, g, shape)
    f_theta = torch.randn(shape, generator=g, dtype=torch.float64)
    f_ref = torch.randn(shape, generator=g, dtype=torch.float64)
    lam_closed = _lambda_closed_form(kind, alpha, sigma)
    lam = S.param_factor(kind, alpha, sigma)
    torch.testing.assert_close(lam, lam_closed.expand_as(lam), rtol=1e-12, atol=0)
    ds = S.native_to_score(kind, f_theta, x, alpha, sigma) - S.native_to_score(kind, f_ref, x, alpha, sigma)
    torch.testing.assert_close(ds, lam_closed * (f_theta - f_ref), rtol=1e-9, atol=1e-9)


def test_param_factor_vpv_off_unit_circle_is_exact_inverse():
    # off alpha^2+sigma^2=1 the closed form -alpha/sigma no longer holds; lambda must still be 1/p_s
    alpha, sigma = torch.tensor([0.5], dtype=torch.float64), torch.tensor([2.0], dtype=torch.float64)
    lam = S.param_factor("vpv", alpha, sigma)
    assert float(lam) == pytest.approx(-alpha.item() / (sigma.item() * (0.25 + 4.0)), rel=1e-14)


def test_native_kind_error():
    with pytest.raises(ValueError, match="native kind"):
        S.native_affine("score", torch.ones(1), torch.ones(1))


# ----------------------------------------------------------------------------------------------
# Tweedie against an exact Gaussian posterior
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", SEEDS)
def test_tweedie_gaussian_posterior_mean(seed):
    """x0 ~ N(m, tau^2 I): the true marginal score at x_t plugged into Tweedie gives E[x0 | x_t]."""
    g = _gen(seed)
    B, D = 6, 9
    m = torch.randn(B, D, generator=g, dtype=torch.float64)
    tau = torch.rand(B, 1, generator=g, dtype=torch.float64) + 0.2
    alpha = torch.rand(B, 1, generator=g, dtype=torch.float64) + 0.1
    sigma = torch.rand(B, 1, generator=g, dtype=torch.float64) + 0.1
    x = torch.randn(B, D, generator=g, dtype=torch.float64) * 2
    var = alpha**2 * tau**2 + sigma**2
    true_score = -(x - alpha * m) / var
    post_mean = m + alpha * tau**2 / var * (x - alpha * m)
    torch.testing.assert_close(S.tweedie_x0(x, true_score, alpha, sigma), post_mean, rtol=1e-11, atol=1e-11)
    # score_from_x0 inverts it
    torch.testing.assert_close(S.score_from_x0(x, post_mean, alpha, sigma), true_score, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------------------------
# Timestep embedding
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dim", [8, 9])
def test_timestep_embedding(dim):
    t = torch.tensor([0.0, 1.5, 500.0], dtype=torch.float64)
    emb = S.timestep_embedding(t, dim)
    assert emb.shape == (3, dim) and emb.dtype == torch.float32
    half = dim // 2
    freqs = np.exp(-math.log(10000.0) * np.arange(half) / half)
    args = _np(t)[:, None] * freqs[None]
    ref = np.concatenate([np.cos(args), np.sin(args)], axis=1)
    np.testing.assert_allclose(emb[:, : 2 * half].numpy(), ref, atol=2e-4)
    if dim % 2:
        assert torch.all(emb[:, -1] == 0)
