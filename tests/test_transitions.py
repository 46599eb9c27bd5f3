"""Tests for rsm_fast.transitions (spec §2, §12).

Expected values come from independent float64 numpy re-implementations of the public samplers
(ddpo ``ddim_step_with_logprob``, Flow-GRPO ``sde_step_with_logprob``, DanceGRPO ``flux_step`` in
its x0/score form), of the spec's closed forms and of explicit Gaussian densities (scipy). Rows of
one batch sit at different steps; several latent shapes are used.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from rsm_fast import schedules as S
from rsm_fast import transitions as T

SEEDS = [0, 1, 2]
SHAPES = [(11, 7), (9, 4, 3, 5), (6, 2, 4, 4)]
F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).numpy()


def _row(v: np.ndarray, like: np.ndarray) -> np.ndarray:
    return v.reshape((v.shape[0],) + (1,) * (like.ndim - 1))


def _mean_dims(v: np.ndarray) -> np.ndarray:
    return v.reshape(v.shape[0], -1).mean(1)


def _sum_dims(v: np.ndarray) -> np.ndarray:
    return v.reshape(v.shape[0], -1).sum(1)


# ----------------------------------------------------------------------------------------------
# Independent schedules (numpy)
# ----------------------------------------------------------------------------------------------
def _np_sd15_ac() -> np.ndarray:
    betas = np.linspace(math.sqrt(0.00085), math.sqrt(0.012), 1000) ** 2
    return np.cumprod(1.0 - betas)


def _np_toy_ac() -> np.ndarray:
    return np.cumprod(1.0 - np.linspace(1e-4, 0.03, 500))


SD15_TS = list(range(981, 0, -20))      # 50 steps, leading spacing, offset 1
TOY_TS = list(range(499, 8, -10))       # RSM toy: 499, 489, ..., 9


def _random_rf_grid(seed: int, n: int) -> np.ndarray:
    rng = np.random.default_rng(1000 + seed)
    inner = np.sort(rng.uniform(0.02, 0.98, n - 1))[::-1]
    return np.concatenate([[1.0], inner, [0.0]])


# ----------------------------------------------------------------------------------------------
# Independent reference samplers (numpy float64). f is the native output (eps for DDIM, v for RF).
# ----------------------------------------------------------------------------------------------
class DDIMRef:
    """ddpo-pytorch ``ddim_step_with_logprob`` (prev timestep clamped, then ``final_alpha_cumprod``
    only past the last listed step), plus PCPO's uw-sigma std."""

    native = "eps"

    def __init__(self, ac, ts, final, eta, variance="ddpm", w=4.5):
        self.ac, self.ts, self.final, self.eta, self.variance, self.w = ac, list(ts), final, eta, variance, w
        self.N = len(ts)

    def build(self):
        return T.ddim(torch.from_numpy(self.ac.copy()), torch.tensor(self.ts), eta=self.eta,
                      final_alpha_cumprod=self.final, variance=self.variance, uw_weight=self.w)

    def ab(self, idx):
        ab = np.array([self.ac[self.ts[i]] for i in idx])
        ab_p = np.array([self.ac[self.ts[i + 1]] if i + 1 < self.N else self.final for i in idx])
        return ab, ab_p

    def std(self, idx):
        ab, ab_p = self.ab(idx)
        if self.variance == "ddpm":
            variance = (1 - ab_p) / (1 - ab) * (1 - ab / ab_p)
            return self.eta * np.sqrt(variance)
        c1 = np.sqrt(1 - ab) * np.sqrt(ab_p) / np.sqrt(ab)
        w = self.w
        return self.eta * (w * c1 + np.sqrt((1 + w * w) * (1 - ab_p) - c1**2)) / (1 + w * w)

    def mean_std(self, idx, x, eps, eta_zero=False):
        ab, ab_p = (_row(v, x) for v in self.ab(idx))
        std = np.zeros(len(idx)) if eta_zero else self.std(idx)
        x0 = (x - np.sqrt(1 - ab) * eps) / np.sqrt(ab)
        direction = np.sqrt(1 - ab_p - _row(std, x) ** 2) * eps
        return np.sqrt(ab_p) * x0 + direction, std

    def ode_mean(self, idx, x, eps):
        return self.mean_std(idx, x, eps, eta_zero=True)[0]

    def score(self, idx, x, eps):
        ab, _ = self.ab(idx)
        return -eps / np.sqrt(1 - _row(ab, x))

    def lam(self, idx):
        return -1 / np.sqrt(1 - self.ab(idx)[0])

    def x0(self, idx, x, eps):
        ab = _row(self.ab(idx)[0], x)
        return (x - np.sqrt(1 - ab) * eps) / np.sqrt(ab)

    def abS(self, idx):
        """Spec §2.2: a = sqrt(ab_p/ab), b = sqrt(1-ab)(c1 - c2), Sigma = sigma^2."""
        ab, ab_p = self.ab(idx)
        std = self.std(idx)
        c1 = np.sqrt(ab_p * (1 - ab) / ab)
        c2 = np.sqrt(1 - ab_p - std**2)
        return np.sqrt(ab_p / ab), np.sqrt(1 - ab) * (c1 - c2), std**2

    def score_rows(self, idx):
        return np.ones(len(idx), bool)


class FlowGRPORef:
    """Flow-GRPO ``sde_step_with_logprob`` (negative dt, ``sigma == 1 -> sigma_max`` in the std)."""

    native = "v"

    def __init__(self, sigmas, a):
        self.sig, self.a = np.asarray(sigmas, dtype=np.float64), a
        self.N = len(self.sig) - 1

    def build(self):
        return T.flow_grpo_sde(torch.from_numpy(self.sig.copy()), noise_level=self.a)

    def _t(self, idx):
        return self.sig[idx], self.sig[np.asarray(idx) + 1]

    def std_dev_t(self, idx):
        t, _ = self._t(idx)
        return np.sqrt(t / (1 - np.where(t == 1, self.sig[1], t))) * self.a

    def std(self, idx):
        t, tp = self._t(idx)
        return self.std_dev_t(idx) * np.sqrt(-(tp - t))

    def mean_std(self, idx, x, v):
        t, tp = self._t(idx)
        sd = self.std_dev_t(idx)
        dt = _row(tp - t, x)
        sig, sdr = _row(t, x), _row(sd, x)
        mean = x * (1 + sdr**2 / (2 * sig) * dt) + v * (1 + sdr**2 * (1 - sig) / (2 * sig)) * dt
        return mean, self.std(idx)

    def ode_mean(self, idx, x, v):
        t, tp = self._t(idx)
        return x + v * _row(tp - t, x)

    def score(self, idx, x, v):
        t = _row(self._t(idx)[0], x)
        return -(x + (1 - t) * v) / t

    def lam(self, idx):
        t = self._t(idx)[0]
        return -(1 - t) / t

    def x0(self, idx, x, v):
        return x - _row(self._t(idx)[0], x) * v

    def abS(self, idx):
        """Spec §2.3 (t < 1 rows): a = 1 + dt/(1-t), b = dt t/(1-t) (1 + a^2/2), Sigma = sigma~^2 dt."""
        t, tp = self._t(idx)
        dt = t - tp
        a = self.a
        omt = np.where(t < 1, 1 - t, np.nan)   # singular at t = 1 (rows excluded by score_rows)
        return 1 + dt / omt, dt * t / omt * (1 + a * a / 2), a * a * t / omt * dt

    def score_rows(self, idx):
        return self._t(idx)[0] < 1


class DanceRef(FlowGRPORef):
    """DanceGRPO ``flux_step`` in x0/score form: mu = x - v dt + (eta^2/2) s_hat dt."""

    def __init__(self, sigmas, eta):
        super().__init__(sigmas, eta)

    def build(self):
        return T.dance_sde(torch.from_numpy(self.sig.copy()), eta=self.a)

    def std(self, idx):
        t, tp = self._t(idx)
        return self.a * np.sqrt(t - tp)

    def mean_std(self, idx, x, v):
        t, tp = self._t(idx)
        dt, tr = _row(t - tp, x), _row(t, x)
        x0_hat = x - tr * v
        s_hat = -(x - (1 - tr) * x0_hat) / tr**2
        return x - v * dt + (self.a**2 / 2) * s_hat * dt, self.std(idx)

    def abS(self, idx):
        t, tp = self._t(idx)
        dt = t - tp
        omt = np.where(t < 1, 1 - t, np.nan)
        return 1 + dt / omt, dt * (t / omt + self.a**2 / 2), self.a**2 * dt


def _families():
    sd15, toy = _np_sd15_ac(), _np_toy_ac()
    rf10 = _np(S.rf_sigmas(10, 3.0))
    return {
        "ddim_sd15_eta1": DDIMRef(sd15, SD15_TS, sd15[0], 1.0),
        "ddim_sd15_eta0.6": DDIMRef(sd15, SD15_TS, sd15[0], 0.6),
        "ddim_toy_eta1": DDIMRef(toy, TOY_TS, 1.0, 1.0),
        "ddim_sd15_uw": DDIMRef(sd15, SD15_TS, sd15[0], 1.0, "uw_sigma"),
        "flow_grpo_sd3": FlowGRPORef(rf10, 0.7),
        "flow_grpo_rand": FlowGRPORef(_random_rf_grid(0, 13), 0.9),
        "dance_sd3": DanceRef(_np(S.rf_sigmas(16, 3.0)), 0.3),
        "dance_rand": DanceRef(_random_rf_grid(1, 12), 1.0),
    }


FAMILIES = _families()
FAM_NAMES = list(FAMILIES)


def _batch(fam, seed, shape, all_steps=False):
    """Random rows at random (different) steps: idx, x, f (torch float64) and numpy copies."""
    g = _gen(seed)
    B = shape[0]
    if all_steps:
        idx = torch.arange(fam.N).repeat(B // fam.N + 1)[:B]
        idx = idx[torch.randperm(B, generator=g)]
    else:
        idx = torch.randint(0, fam.N, (B,), generator=g)
    # make sure the first (t = 1 for RF) and last step both appear
    idx[0], idx[-1] = 0, fam.N - 1
    x = torch.randn(shape, generator=g, dtype=F64)
    f = torch.randn(shape, generator=g, dtype=F64)
    return idx, x, f, g


# ----------------------------------------------------------------------------------------------
# Mean / std against the public samplers
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", FAM_NAMES)
def test_mean_std_match_reference_sampler(name, seed, shape):
    fam = FAMILIES[name]
    tr = fam.build()
    assert tr.native == fam.native
    idx, x, f, g = _batch(fam, seed, shape)
    c = tr.coeffs(idx, dtype=F64)
    ii = idx.numpy()
    mu_ref, std_ref = fam.mean_std(ii, _np(x), _np(f))
    np.testing.assert_allclose(_np(c.sigma), std_ref, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(_np(c.mean(x, f)), mu_ref, rtol=1e-11, atol=1e-11)
    z = torch.randn(shape, generator=g, dtype=F64)
    np.testing.assert_allclose(_np(c.step(x, f, z)), mu_ref + _row(std_ref, mu_ref) * _np(z), rtol=1e-11, atol=1e-11)
    # rows with positive std are the stochastic ones by default
    np.testing.assert_array_equal(c.stochastic.numpy(), std_ref > 0)
    # tables agree with the gathered rows
    np.testing.assert_allclose(_np(tr.table("sigma"))[ii], std_ref, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", FAM_NAMES)
def test_tables_full_sweep(name):
    """Every step of every family: sigma table == reference std; coeffs_at == coeffs(full idx)."""
    fam = FAMILIES[name]
    tr = fam.build()
    assert tr.num_steps == fam.N
    all_idx = np.arange(fam.N)
    np.testing.assert_allclose(_np(tr.table("sigma")), fam.std(all_idx), rtol=1e-12, atol=1e-14)
    i = fam.N // 2
    ca, cb = tr.coeffs_at(i, 3, dtype=F64), tr.coeffs(torch.full((3,), i), dtype=F64)
    for fld in T.coeff_fields():
        assert torch.equal(getattr(ca, fld), getattr(cb, fld)), fld
    # table() hands out a copy
    tab = tr.table("sigma")
    tab.zero_()
    assert torch.any(tr.table("sigma") > 0)


# ----------------------------------------------------------------------------------------------
# Spec tables (§2.2, §2.3, §8.5)
# ----------------------------------------------------------------------------------------------
def test_sd15_mean_native_omega():
    tr = FAMILIES["ddim_sd15_eta1"].build()
    om = tr.table("omega")
    assert om.shape == (50,)
    assert float(om.mean()) == pytest.approx(0.5169002, abs=1e-7)
    assert float(om.mean()) == pytest.approx(4.5 / 8.70575076181, abs=1e-6)
    # independent: omega = (c1 - c2)/sigma
    fam = FAMILIES["ddim_sd15_eta1"]
    ab, ab_p = fam.ab(np.arange(50))
    std = fam.std(np.arange(50))
    c1 = np.sqrt(ab_p * (1 - ab) / ab)
    np.testing.assert_allclose(_np(om), (c1 - np.sqrt(1 - ab_p - std**2)) / std, rtol=1e-11)


def test_sd15_uw_sigma_omega_table():
    fam = FAMILIES["ddim_sd15_uw"]
    tr = fam.build()
    om = _np(tr.table("omega"))
    np.testing.assert_allclose(om[[0, 10, 20, 30, 40]], [0.513, 0.440, 0.396, 0.387, 0.449], atol=1e-3)
    assert om.min() == pytest.approx(0.385, abs=1e-3) and om.max() == pytest.approx(3.37, abs=5e-3)
    # the plus root solves (c1 + sqrt(1 - ab_p - sigma^2))/sigma = w; true weight is 2 c1/sigma - w
    ab, ab_p = fam.ab(np.arange(50))
    sig = _np(tr.table("sigma"))
    c1 = np.sqrt(ab_p * (1 - ab) / ab)
    np.testing.assert_allclose((c1 + np.sqrt(1 - ab_p - sig**2)) / sig, 4.5, rtol=1e-10)
    np.testing.assert_allclose(om, 2 * c1 / sig - 4.5, rtol=1e-9, atol=1e-10)
    # sigma is 0.71-1.25x the DDPM sigma (spec §2.2)
    ratio = sig / _np(FAMILIES["ddim_sd15_eta1"].build().table("sigma"))
    assert ratio.min() == pytest.approx(0.71, abs=6e-3) and ratio.max() == pytest.approx(1.25, abs=6e-3)


def test_toy_ddim_step_389():
    fam = FAMILIES["ddim_toy_eta1"]
    tr = fam.build()
    i = TOY_TS.index(389)
    ab, ab_p = fam.ab([i])
    assert ab[0] == pytest.approx(0.009848, abs=5e-7) and ab_p[0] == pytest.approx(0.012446, abs=5e-7)
    c = tr.coeffs(torch.tensor([i]), dtype=F64)
    assert float(c.sigma) == pytest.approx(0.45627, abs=5e-6)
    assert float(c.b) == pytest.approx(0.23465, abs=5e-6)
    assert float(c.Sigma / c.b) == pytest.approx(0.8872, abs=5e-5)
    assert bool(c.stochastic)
    # last toy step goes to alpha_bar = 1: deterministic
    assert float(tr.table("sigma")[-1]) == 0.0 and not bool(tr.sde_mask[-1])


def _tol(v: float) -> float:
    """Half a unit of the last printed digit (3 significant figures), at least 2e-3."""
    decimals = 3 if abs(v) < 1 else 2
    return max(2e-3, 0.5 * 10**-decimals + 1e-9)


FG_SIGMA = [.700, .743, .536, .446, .392, .353, .319, .282, .225, .006]
FG_OMEGA = [.057, .078, .129, .188, .264, .371, .536, .825, 1.49, 1.77]
FG_SIGT = [3.51, 3.44, 2.27, 1.72, 1.36, 1.09, .861, .652, .434, .066]
FG_DT = [.040, .047, .056, .067, .083, .105, .137, .187, .269, .0089]
FG_SIG_B2 = [.316, .281, .539, .779, 1.01, 1.24, 1.52, 1.95, 3.05]


def test_flow_grpo_spec_table():
    tr = FAMILIES["flow_grpo_sd3"].build()
    sig, om, b, dt = (_np(tr.table(k)) for k in ("sigma", "omega", "b", "dt"))
    for row, ref in (("sigma", FG_SIGMA), ("omega", FG_OMEGA), ("sigma~", FG_SIGT), ("dt", FG_DT)):
        got = {"sigma": sig, "omega": om, "sigma~": sig / np.sqrt(dt), "dt": dt}[row]
        for i, r in enumerate(ref):
            assert abs(got[i] - r) <= _tol(r), (row, i, got[i], r)
    ratio = sig**2 / b**2
    for i, r in enumerate(FG_SIG_B2):
        assert abs(ratio[i] - r) <= _tol(r), ("Sigma/b^2", i, ratio[i], r)
    # omega (spec §2.3): sqrt(dt)/sigma~ (1 + a^2/2) for i >= 1, sqrt(dt)/sigma~ at i = 0
    sigt = sig / np.sqrt(dt)
    np.testing.assert_allclose(om[1:], np.sqrt(dt[1:]) / sigt[1:] * (1 + 0.49 / 2), rtol=1e-11)
    assert om[0] == pytest.approx(np.sqrt(dt[0]) / sigt[0], rel=1e-12)


@pytest.mark.parametrize("a", [0.3, 0.7, 0.9, 1.3])
@pytest.mark.parametrize("grid", ["sd3", "rand"])
def test_flow_grpo_sigma_over_b_constant(a, grid):
    sig = _np(S.rf_sigmas(10, 3.0)) if grid == "sd3" else _random_rf_grid(3, 17)
    tr = T.flow_grpo_sde(torch.from_numpy(sig), a)
    ratio = _np(tr.table("sigma")) ** 2 / _np(tr.table("b"))
    np.testing.assert_allclose(ratio, 2 * a * a / (2 + a * a), rtol=1e-11)


# ----------------------------------------------------------------------------------------------
# Score form: mean = a x + b s, omega = |lambda| b / sigma
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", FAM_NAMES)
def test_score_form(name, seed, shape):
    fam = FAMILIES[name]
    tr = fam.build()
    idx, x, f, _ = _batch(fam, seed, shape, all_steps=True)
    ii = idx.numpy()
    c = tr.coeffs(idx, dtype=F64)
    rows = fam.score_rows(ii)
    assert rows.sum() >= shape[0] // 2
    xn, fn = _np(x), _np(f)
    s = c.to_score(f, x)
    np.testing.assert_allclose(_np(s)[rows], fam.score(ii, xn, fn)[rows], rtol=1e-10, atol=1e-10)
    mean_score_form = _row(_np(c.a), xn) * xn + _row(_np(c.b), xn) * _np(s)
    mu_ref, std = fam.mean_std(ii, xn, fn)
    np.testing.assert_allclose(mean_score_form[rows], mu_ref[rows], rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(_np(c.mean(x, f))[rows], mean_score_form[rows], rtol=1e-10, atol=1e-10)
    # a, b, Sigma against the spec closed forms
    a_ref, b_ref, Sig_ref = fam.abS(ii)
    np.testing.assert_allclose(_np(c.a)[rows], a_ref[rows], rtol=1e-12)
    np.testing.assert_allclose(_np(c.b)[rows], b_ref[rows], rtol=1e-10)
    np.testing.assert_allclose(_np(c.Sigma)[rows], Sig_ref[rows], rtol=1e-10, atol=1e-15)
    # lambda and omega
    lam_ref = fam.lam(ii)
    np.testing.assert_allclose(_np(c.lam)[rows], lam_ref[rows], rtol=1e-12)
    st = rows & (std > 0)
    safe = np.where(std > 0, std, 1.0)
    np.testing.assert_allclose(_np(c.omega)[st], (np.abs(lam_ref) * b_ref / safe)[st], rtol=1e-10)
    # omega = -c_f / sigma on every stochastic row (also t = 1)
    sto = std > 0
    np.testing.assert_allclose(_np(c.omega)[sto], (-_np(c.c_f) / safe)[sto], rtol=1e-12)
    # from_score inverts to_score; x0_hat is Tweedie
    torch.testing.assert_close(c.from_score(s, x), f, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(_np(c.x0_hat(f, x))[rows], fam.x0(ii, xn, fn)[rows], rtol=1e-9, atol=1e-9)


# ----------------------------------------------------------------------------------------------
# Zero noise / deterministic rows
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("grid", ["sd3", "rand"])
def test_zero_noise_flow_is_euler(seed, shape, grid):
    sig = _np(S.rf_sigmas(10, 3.0)) if grid == "sd3" else _random_rf_grid(seed, 9)
    sg = torch.from_numpy(sig)
    fam = FlowGRPORef(sig, 0.0)
    idx, x, v, g = _batch(fam, seed, shape)
    z = torch.randn(shape, generator=g, dtype=F64)
    euler = _np(x) - _row(sig[idx.numpy()] - sig[idx.numpy() + 1], _np(x)) * _np(v)
    for tr in (T.flow_grpo_sde(sg, 0.0), T.flow_ode(sg), T.dance_sde(sg, 0.0)):
        c = tr.coeffs(idx, dtype=F64)
        assert not c.stochastic.any() and torch.all(c.sigma == 0)
        np.testing.assert_allclose(_np(c.step(x, v, z)), euler, rtol=1e-13, atol=1e-13)
        assert torch.all(c.log_prob(c.step(x, v, z), x, v) == 0)
    assert torch.all(T.flow_ode(sg).table("omega") == 0)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_ddim_eta0_is_deterministic_ddim(seed, shape):
    sd15 = _np_sd15_ac()
    fam = DDIMRef(sd15, SD15_TS, sd15[0], 0.0)
    tr = fam.build()
    idx, x, eps, g = _batch(fam, seed, shape)
    c = tr.coeffs(idx, dtype=F64)
    assert not c.stochastic.any()
    z = torch.randn(shape, generator=g, dtype=F64)
    ab, ab_p = (_row(v, _np(x)) for v in fam.ab(idx.numpy()))
    x0 = (_np(x) - np.sqrt(1 - ab) * _np(eps)) / np.sqrt(ab)
    det = np.sqrt(ab_p) * x0 + np.sqrt(1 - ab_p) * _np(eps)
    np.testing.assert_allclose(_np(c.step(x, eps, z)), det, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", FAM_NAMES)
def test_stochastic_false_rows_are_ode_step(name, seed, shape):
    fam = FAMILIES[name]
    tr = fam.build()
    idx, x, f, g = _batch(fam, seed, shape)
    B = shape[0]
    stoch = torch.rand(B, generator=g) < 0.5
    stoch[0], stoch[1] = True, False
    c = tr.coeffs(idx, stochastic=stoch, dtype=F64)
    ii = idx.numpy()
    std = fam.std(ii)
    np.testing.assert_array_equal(c.stochastic.numpy(), stoch.numpy() & (std > 0))
    z = torch.randn(shape, generator=g, dtype=F64)
    xn, fn = _np(x), _np(f)
    ode = fam.ode_mean(ii, xn, fn)
    mu, _ = fam.mean_std(ii, xn, fn)
    expected = np.where(_row(c.stochastic.numpy(), xn), mu + _row(std, xn) * _np(z), ode)
    np.testing.assert_allclose(_np(c.step(x, f, z)), expected, rtol=1e-11, atol=1e-11)
    det = ~c.stochastic
    assert torch.all(c.sigma[det] == 0)
    # all rows forced deterministic
    c0 = tr.coeffs(idx, stochastic=torch.zeros(B, dtype=torch.bool), dtype=F64)
    np.testing.assert_allclose(_np(c0.step(x, f, z)), ode, rtol=1e-11, atol=1e-11)
    assert torch.all(c0.log_prob(c0.step(x, f, z), x, f) == 0)


# ----------------------------------------------------------------------------------------------
# Densities
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", FAM_NAMES)
def test_log_prob_explicit_gaussian(name, seed, shape):
    fam = FAMILIES[name]
    tr = fam.build()
    idx, x, f, g = _batch(fam, seed, shape)
    c = tr.coeffs(idx, dtype=F64)
    mu, std = fam.mean_std(idx.numpy(), _np(x), _np(f))
    x_next = torch.from_numpy(mu) + torch.randn(shape, generator=g, dtype=F64) * 0.7
    safe = np.where(std > 0, std, 1.0)
    lp_dims = norm.logpdf(_np(x_next), loc=mu, scale=_row(safe, mu))
    sto = std > 0
    exp_mean = np.where(sto, _mean_dims(lp_dims), 0.0)
    exp_sum = np.where(sto, _sum_dims(lp_dims), 0.0)
    lp = c.log_prob(x_next, x, f)
    assert lp.shape == (shape[0],) and lp.dtype == F64
    np.testing.assert_allclose(_np(lp), exp_mean, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(_np(c.log_prob(x_next, x, f, reduce="sum")), exp_sum, rtol=1e-10, atol=1e-9)
    with pytest.raises(ValueError, match="reduce"):
        c.log_prob(x_next, x, f, reduce="max")


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", FAM_NAMES)
def test_log_ratio_and_kl(name, seed, shape):
    fam = FAMILIES[name]
    tr = fam.build()
    idx, x, f_old, g = _batch(fam, seed, shape)
    ii = idx.numpy()
    f_new = f_old + 0.3 * torch.randn(shape, generator=g, dtype=F64)
    z = torch.randn(shape, generator=g, dtype=F64)
    c = tr.coeffs(idx, dtype=F64)
    xn = _np(x)
    mu_old, std = fam.mean_std(ii, xn, _np(f_old))
    mu_new, _ = fam.mean_std(ii, xn, _np(f_new))
    sto = std > 0
    safe = _row(np.where(sto, std, 1.0), xn)
    x_next = mu_old + safe * _np(z)
    diff = norm.logpdf(x_next, mu_new, safe) - norm.logpdf(x_next, mu_old, safe)
    for red, fn in (("mean", _mean_dims), ("sum", _sum_dims)):
        lr = c.log_ratio(f_new, f_old, z, reduce=red)
        np.testing.assert_allclose(_np(lr), np.where(sto, fn(diff), 0.0), rtol=1e-9, atol=1e-9)
        # consistent with two log_prob calls at the sampled x'
        xs = c.step(x, f_old, z)
        lp2 = c.log_prob(xs, x, f_new, reduce=red) - c.log_prob(xs, x, f_old, reduce=red)
        np.testing.assert_allclose(_np(lr), _np(lp2), rtol=1e-9, atol=1e-9)
    # on-policy: exactly zero
    lr0 = c.log_ratio(f_old, f_old.clone(), z)
    assert torch.equal(lr0, torch.zeros(shape[0], dtype=F64))
    # KL(new || old) closed form for two Gaussians with shared std (per-dim mean)
    kl_dims = np.log(safe / safe) + (safe**2 + (mu_new - mu_old) ** 2) / (2 * safe**2) - 0.5
    kl = c.kl(f_new, f_old)
    np.testing.assert_allclose(_np(kl)[sto], _mean_dims(kl_dims)[sto], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(_np(c.kl(f_new, f_old, reduce="sum"))[sto], _sum_dims(kl_dims)[sto], rtol=1e-9)
    # ... and (b^2 / (2 Sigma)) mean((s - s_ref)^2) in score space (t < 1 rows)
    rows = sto & fam.score_rows(ii)
    _, b_ref, Sig_ref = fam.abS(ii)
    ds = fam.score(ii, xn, _np(f_new)) - fam.score(ii, xn, _np(f_old))
    kl_score = b_ref**2 / (2 * np.where(rows, Sig_ref, 1.0)) * _mean_dims(ds**2)
    np.testing.assert_allclose(_np(kl)[rows], kl_score[rows], rtol=1e-9)
    # E_old[log r] = -KL(old || new) = -KL(new || old) (shared covariance): check the identity
    # log r = z.(dmu/sigma) - |dmu|^2/(2 sigma^2) with the explicit means
    dmu = (mu_new - mu_old) / safe
    np.testing.assert_allclose(_np(c.log_ratio(f_new, f_old, z))[sto],
                               (_mean_dims(dmu * _np(z)) - _mean_dims(dmu**2) / 2)[sto], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", FAM_NAMES)
def test_kl_on_ode_rows_is_anchor(name):
    """On deterministic rows kl is the documented anchor 0.5 omega_table^2 mean(df^2)."""
    fam = FAMILIES[name]
    tr = fam.build()
    g = _gen(5)
    idx = torch.arange(fam.N)
    f, f_ref = torch.randn(fam.N, 6, generator=g, dtype=F64), torch.randn(fam.N, 6, generator=g, dtype=F64)
    c = tr.coeffs(idx, stochastic=torch.zeros(fam.N, dtype=torch.bool), dtype=F64)
    om = _np(tr.table("omega"))
    np.testing.assert_allclose(_np(c.kl(f, f_ref)), 0.5 * om**2 * _mean_dims(_np(f - f_ref) ** 2), rtol=1e-12)


@pytest.mark.parametrize("name", FAM_NAMES)
def test_ode_rows_zero_and_finite_gradients(name):
    fam = FAMILIES[name]
    tr = fam.build()
    g = _gen(7)
    B = 2 * fam.N
    idx = torch.arange(fam.N).repeat(2)
    stoch = torch.arange(B) % 2 == 0
    shape = (B, 4, 3, 5)
    x = torch.randn(shape, generator=g, dtype=F64, requires_grad=True)
    f = torch.randn(shape, generator=g, dtype=F64, requires_grad=True)
    f_old = torch.randn(shape, generator=g, dtype=F64)
    z = torch.randn(shape, generator=g, dtype=F64)
    c = tr.coeffs(idx, stochastic=stoch, dtype=F64)
    det = ~c.stochastic
    assert det.sum() >= fam.N
    x_next = (c.step(x, f_old, z)).detach() + 0.1
    lp = c.log_prob(x_next, x, f)
    lr = c.log_ratio(f, f_old, z)
    assert torch.all(lp[det] == 0) and torch.all(lr[det] == 0)
    (lp.sum() + lr.sum()).backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(f.grad).all()
    assert torch.all(x.grad[det] == 0) and torch.all(f.grad[det] == 0)
    assert torch.any(f.grad[c.stochastic] != 0)
    # an all-deterministic transition
    sg = torch.from_numpy(_np(S.rf_sigmas(6, 3.0)))
    c2 = T.flow_ode(sg).coeffs(torch.arange(6), dtype=F64)
    x2 = torch.randn(6, 5, generator=g, dtype=F64, requires_grad=True)
    f2 = torch.randn(6, 5, generator=g, dtype=F64, requires_grad=True)
    out = c2.log_prob(torch.randn(6, 5, generator=g, dtype=F64), x2, f2) + c2.log_ratio(f2, f2.detach() + 1, x2)
    assert torch.all(out == 0)
    out.sum().backward()
    assert torch.isfinite(x2.grad).all() and torch.isfinite(f2.grad).all()


# ----------------------------------------------------------------------------------------------
# dtype policy
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", ["ddim_sd15_eta1", "flow_grpo_sd3", "dance_sd3"])
def test_bf16_inputs_give_fp32_logprobs(name, seed):
    fam = FAMILIES[name]
    tr = fam.build()
    shape = (10, 4, 3, 5)
    idx, x, f, g = _batch(fam, seed, shape)
    z = torch.randn(shape, generator=g)
    c32 = tr.coeffs(idx)  # default float32 coefficients
    assert c32.c_x.dtype == torch.float32
    xb, fb = x.to(torch.bfloat16), f.to(torch.bfloat16)
    fb_old = (f + 0.2 * torch.randn(shape, generator=g, dtype=F64)).to(torch.bfloat16)
    x_next = c32.step(xb.float(), fb_old.float(), z)
    assert c32.mean(xb, fb).dtype == torch.float32
    lp_b = c32.log_prob(x_next.to(torch.bfloat16), xb, fb)
    lp_f = c32.log_prob(x_next.to(torch.bfloat16).float(), xb.float(), fb.float())
    assert lp_b.dtype == torch.float32
    torch.testing.assert_close(lp_b, lp_f, rtol=1e-6, atol=1e-6)
    lr_b = c32.log_ratio(fb, fb_old, z.to(torch.bfloat16))
    assert lr_b.dtype == torch.float32
    torch.testing.assert_close(lr_b, c32.log_ratio(fb.float(), fb_old.float(), z.to(torch.bfloat16).float()),
                               rtol=1e-6, atol=1e-6)
    kl_b = c32.kl(fb, fb_old)
    assert kl_b.dtype == torch.float32
    torch.testing.assert_close(kl_b, c32.kl(fb.float(), fb_old.float()), rtol=1e-6, atol=1e-7)
    # fp32 coefficients vs the float64 path on the same (upcast) values
    c64 = tr.coeffs(idx, dtype=F64)
    lp64 = c64.log_prob(x_next.to(torch.bfloat16).double(), xb.double(), fb.double())
    np.testing.assert_allclose(_np(lp_f), _np(lp64), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# Stochasticity localisation
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", ["flow_grpo_sd3", "ddim_sd15_eta1", "dance_rand"])
def test_with_sde_mask(name, seed):
    fam = FAMILIES[name]
    tr = fam.build()
    N = fam.N
    mask = [(i % 3 == 1) for i in range(N)]
    tm = tr.with_sde_mask(mask)
    assert tm.sde_mask.tolist() == mask
    assert tr.sde_mask.all()            # original untouched
    shape = (2 * N, 4, 3, 5)
    g = _gen(seed)
    idx = torch.arange(N).repeat(2)[torch.randperm(2 * N, generator=g)]
    x, f = torch.randn(shape, generator=g, dtype=F64), torch.randn(shape, generator=g, dtype=F64)
    z = torch.randn(shape, generator=g, dtype=F64)
    c, c_orig = tm.coeffs(idx, dtype=F64), tr.coeffs(idx, dtype=F64)
    ii = idx.numpy()
    on = np.array(mask)[ii]
    np.testing.assert_array_equal(c.stochastic.numpy(), on)
    xs = _np(c.step(x, f, z))
    np.testing.assert_allclose(xs[~on], fam.ode_mean(ii, _np(x), _np(f))[~on], rtol=1e-11, atol=1e-11)
    assert torch.all(c.sigma[torch.from_numpy(~on)] == 0)
    np.testing.assert_allclose(xs[on], _np(c_orig.step(x, f, z))[on], rtol=0, atol=0)
    lp = c.log_prob(c.step(x, f, z), x, f)
    assert torch.all(lp[torch.from_numpy(~on)] == 0) and torch.all(lp[torch.from_numpy(on)] != 0)
    # per-row override still possible on masked steps
    c_all = tm.coeffs(idx, stochastic=torch.ones(2 * N, dtype=torch.bool), dtype=F64)
    assert c_all.stochastic.all()


def test_sde_mask_cannot_enable_zero_sigma_steps():
    sg = S.rf_sigmas(5, 3.0)
    assert not T.flow_ode(sg).with_sde_mask([True] * 5).sde_mask.any()
    toy = FAMILIES["ddim_toy_eta1"].build()
    m = toy.with_sde_mask(torch.ones(toy.num_steps, dtype=torch.bool)).sde_mask
    assert m[:-1].all() and not m[-1]
    c = toy.coeffs(torch.tensor([toy.num_steps - 1]), stochastic=torch.tensor([True]), dtype=F64)
    assert not c.stochastic.any() and float(c.sigma) == 0.0


def test_sde_mask_shape_error_names_argument():
    tr = FAMILIES["flow_grpo_sd3"].build()
    with pytest.raises(ValueError, match="sde_mask"):
        tr.with_sde_mask([True] * (tr.num_steps + 1))
    with pytest.raises(ValueError, match="sde_mask"):
        tr.with_sde_mask(torch.ones(2, tr.num_steps, dtype=torch.bool))


def test_factory_errors():
    sd15 = torch.from_numpy(_np_sd15_ac())
    ts = torch.tensor(SD15_TS)
    with pytest.raises(ValueError, match="eta"):
        T.ddim(sd15, ts, eta=-0.1)
    with pytest.raises(ValueError, match="variance"):
        T.ddim(sd15, ts, variance="cosine")
    with pytest.raises(ValueError, match="noise_level"):
        T.flow_grpo_sde(S.rf_sigmas(5), -1.0)
    with pytest.raises(ValueError, match="eta"):
        T.dance_sde(S.rf_sigmas(5), -1.0)
    with pytest.raises(ValueError, match="missing"):
        T.GaussianTransition("x", "v", {"t": torch.zeros(3)})


# ----------------------------------------------------------------------------------------------
# No host sync
# ----------------------------------------------------------------------------------------------
def test_no_host_sync_guard_works(no_host_sync):
    t = torch.ones(3)
    with no_host_sync():
        for fn in (lambda: t.sum().item(), lambda: t.tolist(), lambda: bool(t[0]), lambda: t.cpu()):
            with pytest.raises(RuntimeError, match="host sync"):
                fn()
    assert t.sum().item() == 3.0 and bool(t[0])


@pytest.mark.parametrize("name", FAM_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_no_host_sync_in_step_math(name, dtype, no_host_sync):
    fam = FAMILIES[name]
    tr = fam.build()
    shape = (8, 4, 3, 5)
    idx, x, f, g = _batch(fam, 0, shape)
    x, f = x.to(dtype), f.to(dtype)
    z = torch.randn(shape, generator=g).to(dtype)
    stoch = torch.arange(8) % 2 == 0
    with no_host_sync():
        c = tr.coeffs(idx, dtype=dtype)          # first call: builds the device tables
        c = tr.coeffs(idx, dtype=dtype)          # cached
        cs = tr.coeffs(idx, stochastic=stoch, dtype=dtype)
        xs = c.step(x, f, z)
        lp = c.log_prob(xs, x, f)
        lps = cs.log_prob(cs.step(x, f, z), x, f.to(torch.bfloat16), reduce="sum")
        lr = c.log_ratio(f + 0.1, f, z)
        kl = c.kl(f + 0.1, f)
        s = c.to_score(f, x)
        x0 = c.x0_hat(f, x)
        _ = c.Sigma, c.from_score(s, x)
    for out in (xs, lp, lps, lr, kl):
        assert torch.isfinite(out).all()
    assert torch.isfinite(x0[torch.from_numpy(fam.score_rows(idx.numpy()))]).all()
