"""The RSM view of the forward-process methods (issue 19 item 4): on random float64 rows, the gradients
of DiffusionNFT and AWM (``rsm_fast.losses.forward_process``) equal the gradient of the RSM loss
(spec §3.2, v2 convention, per row, mean over ``B`` rows and ``d`` latent dims)::

    L = mean_rows C1 (||s - (s_ref + gamma Psi)||^2 + C2 ||s - s_dag||^2) / d

with per-row C1, gamma Psi, C2 (all stop-grad) as derived below; the oracle passes C1/B and sums rows.

with the coefficients derived below. The oracle is written from these formulas, not from the loss code.

Score of the rectified flow (x_t = (1-t) x0 + t eps). The conditional p(x_t | x0) = N((1-t) x0, t^2 I)
has score s*(x_t | x0) = -(x_t - (1-t) x0)/t^2 = -eps/t, and with v* = eps - x0,
x_t + (1-t) v* = eps, so s* = -(x_t + (1-t) v*)/t. The model's score is the same affine map of v::

    s(v) = -(x_t + (1-t) v)/t,     ds/dv = -(1-t)/t,     v - v' = -kappa (s - s'),  kappa = t/(1-t)

so d/ds = -kappa d/dv and ||v - v'||^2 = kappa^2 ||s - s'||^2 (spec §1.2-1.3, lambda = -1/kappa).

The estimator. For any per-sample weight A(x0) and the rollout distribution noised forward,
E[A s*(x_t|x0) | x_t = x] = grad_x E[A | x_t = x] + E[A | x] s_true(x) (s_true: that marginal's
score; differentiate p_t(x) E[A|x] = int A p(x|x0) p(x0)). Hence the forward-process estimator::

    Psi = (A / alpha) (s*(x_t|x0) - s_old(x_t)),   E[Psi | x] = (1/alpha) [grad V_A + V_A (s_true - s_old)]

with V_A(x) = E_old[A | x_t = x]: an unbiased estimate of the (hard) value gradient of the rollout
marginal when s_old is exact, plus V_A (s_true - s_old) when the advantage is non-centred at x.

AWM (ratio rho, weighting l = -phi(mse) c(t), omega = phi'(mse) c(t); KL weights k_ref, k_ema(t);
A' the rescaled advantage; U = 1 unless the PPO clip is active)::

    dL/ds = (2 kappa^2 / (B d)) [a (s - s_ref) - U A' rho omega (s* - s_old) + U A' rho omega (s - s_old)
                                 + e (s - s_ema)],     a = kl_beta k_ref,  e = ema_beta k_ema
    C1 = kappa^2 a,   gamma Psi = (U A' rho omega / a)(s* - s_old),
    C2 = U A' rho omega / a about s_dag = s_old  (zero gradient at ratio 1, where s = s_old),
    plus the EMA term: C2_ema = e / a about s_dag = s_ema (a second, positive trust region).

  omega: uniform 1, 't' t, 't**2' t^2, 'huber' t / (2 sqrt(mse + 1e-10)), 'ghuber' t (mse + 1e-10)^(p-1):
  a detached per-row factor on the guidance (= per-row C1 of the KL-free product C1 gamma Psi).
  Non-centred groups: with A' = (A' - Abar_g) + Abar_g, the Abar_g part is Abar_g times plain flow
  matching on the rollout samples, 2 kappa^2 Abar_g (s - s*)/(B d): a per-row C1 = kappa^2 Abar_g
  regression to the conditional score (self-distillation toward s_true), not a value gradient.
  kl_beta = 0: C1 -> 0 with C1 gamma Psi = kappa^2 A' rho omega (s* - s_old) fixed (spec App. C).

DiffusionNFT (x0-space errors e+- = x_t - t v+- - x0 = t (v* - v+-); w+- detached; C = adv_clip_max;
a+ = r/w+, a- = (1-r)/w-)::

    dL/dv = (2 C t^2 / (B d)) [beta (a+ + a-) (v - v_old) - (a+ - a-) (v* - v_old)] + (2 kl/(B d)) (v - v_ref)
    C1 = kappa^2 kl,   gamma Psi = (C t^2 (a+ - a-) / kl)(s* - s_old),   C2 = C t^2 beta (a+ + a-) / kl

exactly, for any beta: beta scales only the trust region (>= 0, about the old adapter), the guidance is
beta-free; the effective advantage C t^2 (r/w+ - (1-r)/w-) is the positive branch minus the implicit
negative one (= t^2 A_c / w when w+ = w-).

Differences from the trajectory presets (test_presets.py): Psi is the denoising (Tweedie) estimator
above, the value of the rollout's forward posterior, not a sampler-trajectory ZO/FO estimate; no z,
no sampler log-probs, any (ODE) solver; C1 = (t/(1-t))^2 x KL weight (v-space MSE) instead of
alpha b^2/(2 Sigma); the guidance is centred on s_old (NFT: the EMA-lagged old adapter, so its C2 is
active and positive; AWM: the current weights at ratio 1) while s_ref enters only through the KL term;
AWM's C2 = A' rho omega/alpha is PPO's signed trust region, the EMA term an extra positive one; the
per-row omega / w+- are data-dependent (detached) weights the trajectory presets do not have.
"""
from __future__ import annotations

import pytest
import torch

from rsm_fast.losses.forward_process import awm_log_likelihood, awm_loss, nft_loss

F64 = torch.float64
TOL = dict(rtol=1e-10, atol=1e-12)
SHAPES = [(6, 5), (4, 2, 3, 3), (9, 16)]


def _rw(c, like):
    return c.reshape(c.shape[0], *([1] * (like.dim() - 1)))


def _rows(seed, shape, adv_scale=3.0, spread=0.3):
    """Fresh float64 rows on the forward process, model outputs near v*; t in (0.05, 0.95) keeps kappa finite."""
    g = torch.Generator().manual_seed(seed)
    r = lambda: torch.randn(shape, generator=g, dtype=F64)  # noqa: E731
    x0, eps = r(), r()
    t = 0.05 + 0.9 * torch.rand(shape[0], generator=g, dtype=F64)
    te = _rw(t, x0)
    x_t = (1 - te) * x0 + te * eps
    v_star = eps - x0
    v_old = v_star + spread * r()
    v_ref = v_star + spread * r()
    v_ema = v_star + spread * r()
    adv = adv_scale * torch.randn(shape[0], generator=g, dtype=F64)
    return dict(x0=x0, eps=eps, t=t, x_t=x_t, v_star=v_star, v_old=v_old, v_ref=v_ref, v_ema=v_ema, adv=adv, g=g)


def _score(v, x_t, t):
    """s = -(x_t + (1-t) v)/t (rectified flow, Gaussian-conditional model)."""
    te = _rw(t, v)
    return -(x_t + (1 - te) * v) / te


def _grad_s(loss_fn, v):
    """dL/dv by autograd (convert with :func:`_to_s`: dL/ds = -kappa dL/dv)."""
    v = v.clone().requires_grad_(True)
    (gv,) = torch.autograd.grad(loss_fn(v), v)
    return gv


def _to_s(gv, t):
    return -_rw(t / (1 - t), gv) * gv


def _rsm_grad(s, s_ref, c1, c1_gpsi, trust):
    """Gradient of sum_rows C1 (||s - s_ref - gamma Psi||^2 + sum_k C2_k ||s - s_dag_k||^2) / d, written as
    2 [C1 (s - s_ref) - C1 gamma Psi + sum_k C1 C2_k (s - s_dag_k)] / d; ``c1_gpsi`` is the product
    C1 gamma Psi ([B, ...]) so that C1 -> 0 (no KL) stays defined; ``trust``: [(C1 C2_k [B], s_dag_k)]."""
    d = s[0].numel()
    out = _rw(c1, s) * (s - s_ref) - c1_gpsi
    for c1c2, s_dag in trust:
        out = out + _rw(c1c2, s) * (s - s_dag)
    return 2 * out / d


def _awm_omega(weighting, mse, t, p=0.25):
    """omega = -d l / d mse (the per-row weight of the weighting; detached)."""
    return {"uniform": torch.ones_like(t), "t": t, "t**2": t**2,
            "huber": t / (2 * torch.sqrt(mse + 1e-10)),
            "ghuber": t * (mse + 1e-10) ** (p - 1)}[weighting]


def _kl_k(t, kind):
    if kind == "uniform":
        return torch.ones_like(t)
    std = 0.7 * torch.sqrt(t / (1 - t.clamp(0, 0.99)))
    return 1 / (2 * std**2)


def _awm_oracle(b, v, *, weighting, kl_beta, ema_beta, kl_weight="uniform", adv_clip_max=5.0, advantage_max=1.0,
                v_old=None, clip_range=1.0, p=0.25):
    """RSM gradient of AWM in score space: C1 = kappa^2 kl_beta k_ref/B, C1 gamma Psi = kappa^2 U A' rho omega
    (s* - s_old)/B, trust regions C1 C2 = kappa^2 U A' rho omega/B about s_old and kappa^2 ema_beta k_ema/B
    about s_ema. ``v_old=None``: ratio 1, s_old = s (first pass). Returns (grad_s, unclipped mask)."""
    t, B = b["t"], v.shape[0]
    kap2 = (t / (1 - t)) ** 2
    s, s_star = _score(v, b["x_t"], t), -b["eps"] / _rw(t, v)
    s_ref, s_ema = _score(b["v_ref"], b["x_t"], t), _score(b["v_ema"], b["x_t"], t)
    vo = v if v_old is None else v_old
    s_old = _score(vo, b["x_t"], t)
    mse = ((v - b["v_star"]) ** 2).flatten(1).mean(1)
    a = b["adv"].clamp(-adv_clip_max, adv_clip_max) / adv_clip_max * advantage_max
    def ell(m):
        phi = {"uniform": m, "t": m * t, "t**2": m * t**2, "huber": (torch.sqrt(m + 1e-10) - 1e-5) * t,
               "ghuber": ((m + 1e-10) ** p - 1e-10**p) * t / p}[weighting]
        return -phi
    mse_old = ((vo - b["v_star"]) ** 2).flatten(1).mean(1)
    rho = torch.exp(ell(mse) - ell(mse_old))
    unclipped = ~(((a > 0) & (rho > 1 + clip_range)) | ((a < 0) & (rho < 1 - clip_range)))
    w = unclipped.to(F64) * a * rho * _awm_omega(weighting, mse, t, p)
    c1 = kap2 * kl_beta * _kl_k(t, kl_weight) / B
    trust = [(kap2 * w / B, s_old), (kap2 * ema_beta * _kl_k(t, kl_weight) / B, s_ema)]
    return _rsm_grad(s, s_ref, c1, _rw(kap2 * w / B, s) * (s_star - s_old), trust), unclipped


def test_score_convention():
    """s(v*) is the conditional score -eps/t, and s(v) - s(v') = -(1-t)/t (v - v')."""
    b = _rows(0, (5, 7))
    t, te = b["t"], _rw(b["t"], b["x0"])
    torch.testing.assert_close(_score(b["v_star"], b["x_t"], t), -b["eps"] / te, **TOL)
    torch.testing.assert_close(_score(b["v_old"], b["x_t"], t) - _score(b["v_ref"], b["x_t"], t),
                               -(1 - te) / te * (b["v_old"] - b["v_ref"]), **TOL)


@pytest.mark.parametrize("t", [0.1, 0.5, 0.9])
def test_forward_estimator_is_the_value_gradient(t):
    """Exact (no Monte Carlo) on a discrete x0 distribution: E[A s*|x] = grad V_A + V_A s_true, so
    E[A (s* - s_old)|x] = grad V_A + V_A (s_true - s_old); centred at x (V_A = 0) only the gradient remains."""
    g = torch.Generator().manual_seed(int(100 * t))
    K, d = 7, 3
    m, A = torch.randn(K, d, generator=g, dtype=F64), torch.randn(K, generator=g, dtype=F64)
    pi = torch.softmax(torch.randn(K, generator=g, dtype=F64), 0)
    x = torch.randn(5, d, generator=g, dtype=F64).requires_grad_(True)
    logw = pi.log() - ((x[:, None] - (1 - t) * m) ** 2).sum(-1) / (2 * t**2)
    w = torch.softmax(logw, 1)                                   # posterior p(x0 = m_k | x_t = x)
    V = (w * A).sum(1)
    (gradV,) = torch.autograd.grad(V.sum(), x)
    w, V, x = w.detach(), V.detach(), x.detach()
    s_k = -(x[:, None] - (1 - t) * m) / t**2                     # s*(x | m_k)
    s_true = (w[..., None] * s_k).sum(1)
    s_old = s_true + 0.3 * torch.randn(x.shape, generator=g, dtype=F64)
    est = (w[..., None] * A[:, None] * (s_k - s_old[:, None])).sum(1)
    torch.testing.assert_close(est, gradV + V[:, None] * (s_true - s_old), **TOL)
    est_true = (w[..., None] * A[:, None] * (s_k - s_true[:, None])).sum(1)
    torch.testing.assert_close(est_true, gradV, **TOL)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("kl_beta, ema_beta, kl_weight", [(0.0, 0.0, "uniform"), (1e-3, 1.0, "uniform"),
                                                          (0.3, 0.5, "uniform"), (1e-3, 1.0, "elbo")])
def test_awm_ratio_one_is_rsm(shape, seed, kl_beta, ema_beta, kl_weight):
    """First pass (ratio 1), uniform weighting: C1 = kappa^2 kl_beta k, gamma Psi = (A'/(kl_beta k))(s* - s_old),
    C2 = ema_beta k / (kl_beta k) about s_ema; kl_beta = 0: the KL-free product form."""
    b = _rows(seed, shape)
    v = b["v_old"]
    kw = dict(weighting="uniform", kl_beta=kl_beta, ema_beta=ema_beta, kl_weight=kl_weight, kl_ema_weight=kl_weight)
    gv = _grad_s(lambda vv: awm_loss(vv, b["eps"], b["x0"], b["t"], b["adv"], v_ref=b["v_ref"], v_ema=b["v_ema"],
                                     **kw)[0], v)
    want, unclipped = _awm_oracle(b, v, weighting="uniform", kl_beta=kl_beta, ema_beta=ema_beta, kl_weight=kl_weight)
    assert unclipped.all()
    torch.testing.assert_close(_to_s(gv, b["t"]), want, **TOL)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("weighting, p", [("t", 0.25), ("t**2", 0.25), ("huber", 0.25), ("ghuber", 0.25),
                                          ("ghuber", 0.5)])
def test_awm_weightings_are_row_weights(shape, weighting, p):
    """'t' / 'ghuber' / ...: the uniform case with the guidance of each row scaled by omega = phi'(mse) c(t)."""
    b = _rows(3, shape)
    v = b["v_old"]
    gv = _grad_s(lambda vv: awm_loss(vv, b["eps"], b["x0"], b["t"], b["adv"], v_ref=b["v_ref"], v_ema=b["v_ema"],
                                     weighting=weighting, p=p)[0], v)
    want, _ = _awm_oracle(b, v, weighting=weighting, kl_beta=1e-3, ema_beta=1.0, p=p)
    torch.testing.assert_close(_to_s(gv, b["t"]), want, **TOL)
    # and omega is what separates it from the uniform gradient of the policy part alone
    def pol(w):
        return _to_s(_grad_s(lambda vv: awm_loss(vv, b["eps"], b["x0"], b["t"], b["adv"], weighting=w, p=p,
                                                 kl_beta=0.0, ema_beta=0.0)[0], v), b["t"])

    mse = ((v - b["v_star"]) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(pol(weighting), _rw(_awm_omega(weighting, mse, b["t"], p), v) * pol("uniform"), **TOL)


@pytest.mark.parametrize("shape", [(8, 5), (12, 2, 2, 2)])
def test_awm_non_centred_groups_add_a_flow_matching_term(shape):
    """Groups of 4 rows with sum A != 0: gradient = centred guidance + 2 kappa^2 Abar_g (s - s*)/(B d),
    i.e. a per-row C1 = kappa^2 Abar_g/B regression to the conditional score (advantage_max=None, |A| < C)."""
    b = _rows(4, shape, adv_scale=1.0)
    b["adv"] = b["adv"] + 0.8                          # non-centred on purpose
    B, t, v = shape[0], b["t"], b["v_old"]
    gv = _grad_s(lambda vv: awm_loss(vv, b["eps"], b["x0"], t, b["adv"], weighting="uniform", advantage_max=None,
                                     kl_beta=0.0, ema_beta=0.0)[0], v)
    abar = b["adv"].view(-1, 4).mean(1).repeat_interleave(4)
    assert abar.abs().min() > 1e-3 and b["adv"].abs().max() < 5
    kap2 = (t / (1 - t)) ** 2
    s, s_star = _score(v, b["x_t"], t), -b["eps"] / _rw(t, v)
    s_old = s                                          # ratio 1: the old model is the current one
    zero = torch.zeros_like(t)
    centred = _rsm_grad(s, s, zero, _rw(kap2 * (b["adv"] - abar) / B, s) * (s_star - s_old), [])
    extra = _rsm_grad(s, s_star, kap2 * abar / B, torch.zeros_like(s), [])      # C1_row ||s - s*||^2
    torch.testing.assert_close(_to_s(gv, t), centred + extra, **TOL)
    assert extra.abs().max() > 1e-3 * centred.abs().max()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("beta", [1.0, 0.1, 0.5, 2.0])
@pytest.mark.parametrize("seed", [5, 6])
def test_nft_is_rsm(shape, beta, seed):
    """DiffusionNFT, exactly for any beta: C1 = kappa^2 kl, gamma Psi = (C t^2 (a+ - a-)/kl)(s* - s_old),
    C2 = C t^2 beta (a+ + a-)/kl about the old adapter; w+- from the formula, detached."""
    b = _rows(seed, shape, adv_scale=4.0)
    t, B, C, kl = b["t"], shape[0], 5.0, 1e-4
    g = b["g"]
    v = b["v_old"] + 0.2 * torch.randn(shape, generator=g, dtype=F64)     # theta != old adapter
    gv = _grad_s(lambda vv: nft_loss(vv, b["v_old"], b["v_ref"], b["x_t"], b["x0"], t, b["adv"], beta=beta,
                                     adv_clip_max=C, kl_beta=kl)[0], v)
    te = _rw(t, v)
    r = (b["adv"].clamp(-C, C) / C / 2 + 0.5).clamp(0, 1)
    v_pos, v_neg = beta * v + (1 - beta) * b["v_old"], (1 + beta) * b["v_old"] - beta * v
    w_pos = (te * (b["v_star"] - v_pos)).abs().flatten(1).mean(1).clamp(min=1e-5)
    w_neg = (te * (b["v_star"] - v_neg)).abs().flatten(1).mean(1).clamp(min=1e-5)
    ap, an = r / w_pos, (1 - r) / w_neg
    kap2 = (t / (1 - t)) ** 2
    s, s_star = _score(v, b["x_t"], t), -b["eps"] / te
    s_old, s_ref = _score(b["v_old"], b["x_t"], t), _score(b["v_ref"], b["x_t"], t)
    c1 = kap2 * kl / B
    c1_gpsi = _rw(kap2 * C * t**2 * (ap - an) / B, s) * (s_star - s_old)
    want = _rsm_grad(s, s_ref, c1, c1_gpsi, [(kap2 * C * t**2 * beta * (ap + an) / B, s_old)])
    torch.testing.assert_close(_to_s(gv, t), want, **TOL)


def test_nft_guidance_is_beta_free_and_w_equal_gives_t2_advantage():
    """With v = v_old the trust region vanishes; the guidance C t^2 (r/w+ - (1-r)/w-) does not depend on beta
    (w+ = w- there) and equals t^2 A_c / w."""
    b = _rows(7, (6, 8), adv_scale=4.0)
    t, v = b["t"], b["v_old"]
    grads = [_to_s(_grad_s(lambda vv: nft_loss(vv, v, None, b["x_t"], b["x0"], t, b["adv"], beta=beta,
                                               kl_beta=0.0)[0], v), t) for beta in (0.1, 1.0, 3.0)]
    torch.testing.assert_close(grads[0], grads[1], **TOL)
    torch.testing.assert_close(grads[0], grads[2], **TOL)
    te = _rw(t, v)
    w = (te * (b["v_star"] - v)).abs().flatten(1).mean(1)
    kap2 = (t / (1 - t)) ** 2
    s, s_star = _score(v, b["x_t"], t), -b["eps"] / te
    c1_gpsi = _rw(kap2 * t**2 * b["adv"].clamp(-5, 5) / w / v.shape[0], s) * (s_star - s)
    torch.testing.assert_close(grads[0], _rsm_grad(s, s, torch.zeros_like(t), c1_gpsi, []), **TOL)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("weighting, clip_range", [("uniform", 1.0), ("uniform", 0.05), ("ghuber", 0.05),
                                                   ("t", 0.02)])
def test_awm_off_policy_is_ratio_weighted(shape, weighting, clip_range):
    """ratio != 1: A' -> U A' rho on the guidance and the signed trust region C2 = U A' rho omega / alpha about
    s_old; clipped rows (A' > 0, rho > 1 + c or A' < 0, rho < 1 - c) get only the KL forces."""
    b = _rows(8, shape)
    v = b["v_old"] + 0.3 * torch.randn(shape, generator=b["g"], dtype=F64)
    lold = awm_log_likelihood(b["v_old"], b["eps"], b["x0"], b["t"], weighting=weighting)
    gv = _grad_s(lambda vv: awm_loss(vv, b["eps"], b["x0"], b["t"], b["adv"], logp_old=lold, v_ref=b["v_ref"],
                                     v_ema=b["v_ema"], weighting=weighting, clip_range=clip_range)[0], v)
    want, unclipped = _awm_oracle(b, v, weighting=weighting, kl_beta=1e-3, ema_beta=1.0, v_old=b["v_old"],
                                  clip_range=clip_range)
    torch.testing.assert_close(_to_s(gv, b["t"]), want, **TOL)
    _, st = awm_loss(v, b["eps"], b["x0"], b["t"], b["adv"], logp_old=lold, weighting=weighting, clip_range=clip_range,
                     kl_beta=0.0, ema_beta=0.0)
    assert torch.equal(~unclipped, st["clipped"])
    ratio = st["ratio"]
    assert (ratio != 1).all() and (ratio - 1).abs().max() > 1e-2      # genuinely off-policy rows
    if clip_range < 1.0:
        assert (~unclipped).any() and unclipped.any()  # both kinds present
