"""Value-guidance estimators (rsm_fast.estimators, spec §4, §8.4-8.6, §9.3).

The toy checks use the exact 2-D task: the reference and the optimal (tilted) policy have
closed-form eps, so Psi* is known exactly at any point.
"""
import math

import pytest
import torch

from rsm_fast import estimators as E
from rsm_fast.tasks.toy2d import REWARD_W, Toy2D

T_TEST = 389            # spec §8.4: alpha_bar ~ 0.00985; the first transition spans 10 train steps


@pytest.fixture(scope="module")
def task():
    return Toy2D()


def _step_of(task, timestep):
    return int((task.timesteps == timestep).nonzero())


def _fixed_points(task, timestep, n, seed):
    """x_t = sqrt(ab) x0 + sqrt(1 - ab) eps with x0 ~ p* (spec §8.4)."""
    ab = float(task.alphas_cumprod[timestep])
    g = torch.Generator().manual_seed(seed)
    x0 = task.sample_target(n, g)
    eps = torch.randn(n, 2, generator=g, dtype=torch.float64)
    return math.sqrt(ab) * x0 + math.sqrt(1 - ab) * eps, ab


@pytest.fixture(scope="module")
def optimal_children(task):
    """4 fixed points at t=389, 2^16 children each drawn and rolled out to x0 under the optimal
    policy, with the per-step KL (summed over the 2 dims) of the optimal to the reference kernel."""
    P, M = 4, 2**16
    x_t, ab = _fixed_points(task, T_TEST, P, seed=0)
    step = _step_of(task, T_TEST)
    g = torch.Generator().manual_seed(1)
    children, z, c = E.sample_children(task.target_output, task.transition, x_t, step, M, g)
    x0, kl = E.rollout(task.target_output, task.transition, children.reshape(P * M, 2), step + 1, gen=g,
                       ref_output_fn=task.reference_output)
    r = task.reward(x0)
    R_soft = E.soft_returns(r, kl, task.alpha)[0]       # R_0: all KLs after the children's step
    return dict(x_t=x_t, ab=ab, step=step, z=z, c=c, r=r.reshape(P, M), R_soft=R_soft.reshape(P, M),
                kl=kl, psi=task.psi_star(x_t, ab))


# ---------------------------------------------------------------------------------------------
# (a) soft vs hard ZO against Psi* (spec §4.3, §8.6)
# ---------------------------------------------------------------------------------------------
def test_children_step_uses_the_10_step_transition(task, optimal_children):
    c = optimal_children["c"]
    torch.testing.assert_close(c.sigma, torch.full((4,), 0.45627, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(c.b, torch.full((4,), 0.23465, dtype=torch.float64), atol=1e-5, rtol=0)
    assert optimal_children["kl"].shape == (task.transition.num_steps - optimal_children["step"] - 1, 4 * 2**16)
    assert float(optimal_children["kl"].min()) >= 0.0


def test_soft_zo_matches_psi_star_and_hard_zo_is_biased(task, optimal_children):
    """Measured (2^16 children, seeds 0/1): mean |soft - Psi*| = 0.0084 per coordinate,
    mean |hard - Psi*| = 0.050; hard/Psi* on x1 = 0.75/0.60/0.58/0.51 (spec §8.6: 0.4-0.7).
    MC sd of one coordinate ~ (sigma/b) sqrt(Var R / M) = 1.94 sqrt(0.96 / 2^16) ~ 0.0074."""
    d, a = optimal_children, task.alpha
    soft = E.zo_lookahead(d["R_soft"], d["z"], d["c"].sigma, d["c"].b, a)
    hard = E.zo_lookahead(d["r"], d["z"], d["c"].sigma, d["c"].b, a)
    assert soft.shape == hard.shape == (4, 2)
    err_soft = float((soft - d["psi"]).abs().mean())
    err_hard = float((hard - d["psi"]).abs().mean())
    assert err_soft < 0.03
    assert err_hard > 2 * err_soft and err_hard > 0.03
    ratio = (hard[:, 0] / d["psi"][:, 0])
    assert float(ratio.max()) < 0.9                       # shrunk toward 0 on the reward direction


# ---------------------------------------------------------------------------------------------
# (c) centering lowers the RMSE of the hard ZO estimator at equal sample counts
# ---------------------------------------------------------------------------------------------
def test_centering_lowers_zo_rmse(task, optimal_children):
    """Groups of K=16 children vs the 2^16-child hard estimate. Measured RMSE per coordinate:
    none 2.23, mean 0.371, loo 0.395 (the raw reward, ~4.4 on average, is mostly a constant)."""
    d, K = optimal_children, 16
    P, M = d["r"].shape
    n = M // K
    target = E.zo_lookahead(d["r"], d["z"], d["c"].sigma, d["c"].b, task.alpha).repeat_interleave(n, 0)
    sig, b = d["c"].sigma.repeat_interleave(n), d["c"].b.repeat_interleave(n)
    rmse = {}
    for base in ("none", "mean", "loo"):
        est = E.zo_lookahead(d["r"].reshape(P * n, K), d["z"].reshape(P * n, K, 2), sig, b, task.alpha, base)
        rmse[base] = float((est - target).pow(2).mean().sqrt())
    assert rmse["mean"] < 0.3 * rmse["none"]
    assert rmse["loo"] < 0.3 * rmse["none"]
    assert rmse["mean"] < rmse["loo"] < 1.2 * rmse["mean"]     # LOO trades ~K/(K-1) variance for no bias


# ---------------------------------------------------------------------------------------------
# FO lookahead == hard ZO in expectation (Stein, Thm. 3.7)
# ---------------------------------------------------------------------------------------------
def test_fo_lookahead_pathwise_matches_hard_zo(task, optimal_children):
    """Pathwise gradient through a reparameterised optimal-policy rollout (1024 children).
    Measured mean |FO - hard ZO| = 0.0083 (hard-ZO MC sd ~0.006); |FO - Psi*| = 0.052."""
    d = optimal_children
    g = torch.Generator().manual_seed(7)
    children, _, c = E.sample_children(task.target_output, task.transition, d["x_t"], d["step"], 1024, g)
    gen = torch.Generator().manual_seed(8)
    cont = lambda y: E.rollout(task.target_output, task.transition, y, d["step"] + 1, gen=gen)[0]  # noqa: E731
    fo = E.fo_lookahead(children, cont, task.reward, c.Sigma, c.b, task.alpha)
    hard = E.zo_lookahead(d["r"], d["z"], d["c"].sigma, d["c"].b, task.alpha)
    assert fo.shape == (4, 2)
    assert float((fo - hard).abs().mean()) < 0.035
    assert float((fo - d["psi"]).abs().mean()) > 0.035


# ---------------------------------------------------------------------------------------------
# (b) current-state FO: exact at high SNR, biased at low SNR
# ---------------------------------------------------------------------------------------------
def _fo_cs_relative_error(task, timestep, identity_jacobian=False):
    x_t, ab = _fixed_points(task, timestep, 256, seed=11)
    x0_hat = E.tweedie_fn(task.target_output, task.transition, _step_of(task, timestep))
    fo = E.fo_current_state(x_t, x0_hat, task.reward, task.alpha, identity_jacobian=identity_jacobian)
    psi = task.psi_star(x_t, ab)
    return float(((fo - psi).norm(dim=1) / psi.norm(dim=1)).mean())


def test_fo_current_state_accurate_at_high_snr_biased_at_low_snr(task):
    """Exact Tweedie of p*, linear reward, 256 points. Measured mean relative error:
    t=9: 2e-7, t=19: 2e-6, t=99: 0.003, t=199: 0.116, t=389: 0.368
    (identity-Jacobian variant: t=9: 0.0019, t=19: 0.0069, t=389: 0.982)."""
    assert _fo_cs_relative_error(task, 9) < 0.01
    assert _fo_cs_relative_error(task, 19) < 0.01
    assert _fo_cs_relative_error(task, 389) > 0.28
    assert _fo_cs_relative_error(task, 9, identity_jacobian=True) < 0.01
    assert _fo_cs_relative_error(task, 389, identity_jacobian=True) > 0.8


def test_fo_current_state_chain_rule_and_identity_jacobian():
    g = torch.Generator().manual_seed(2)
    A = torch.randn(3, 3, generator=g, dtype=torch.float64)
    x = torch.randn(5, 3, generator=g, dtype=torch.float64)
    alpha = torch.tensor([0.5, 1.0, 2.0, 4.0, 0.25], dtype=torch.float64)
    x0_fn = lambda y: y @ A.T                                   # noqa: E731  Jacobian A
    reward = lambda y: 0.5 * (y**2).sum(1)                      # noqa: E731  grad = y
    out = E.fo_current_state(x, x0_fn, reward, alpha)
    torch.testing.assert_close(out, (x @ A.T @ A) / alpha[:, None])
    ident = E.fo_current_state(x, x0_fn, reward, alpha, identity_jacobian=True)
    torch.testing.assert_close(ident, (x @ A.T) / alpha[:, None])
    with torch.no_grad():                                        # works inside no_grad rollouts
        torch.testing.assert_close(E.fo_current_state(x, x0_fn, reward, 2.0), (x @ A.T @ A) / 2.0)
    assert E.fo_current_state(x.float(), lambda y: y, reward, 1.0).dtype == torch.float32


def test_fo_current_state_identity_jacobian_on_toy_is_w_over_alpha(task):
    x_t, _ = _fixed_points(task, T_TEST, 8, seed=3)
    x0_hat = E.tweedie_fn(task.target_output, task.transition, _step_of(task, T_TEST))
    out = E.fo_current_state(x_t, x0_hat, task.reward, 2.0, identity_jacobian=True)
    torch.testing.assert_close(out, (REWARD_W / 2.0).expand(8, 2))


# ---------------------------------------------------------------------------------------------
# (d) unit tests: scaling, shapes, soft returns, plumbing
# ---------------------------------------------------------------------------------------------
def test_fo_lookahead_scaling_and_shape():
    G, K = 3, 5
    x_next = torch.randn(G, K, 2, 4, 4, dtype=torch.float64)
    w = torch.randn(2, 4, 4, dtype=torch.float64)
    reward = lambda y: (y * w).flatten(1).sum(1)                 # noqa: E731  grad = w
    Sigma = torch.tensor([0.2, 0.5, 1.0], dtype=torch.float64)
    b = torch.tensor([0.1, 0.4, 2.0], dtype=torch.float64)
    out = E.fo_lookahead(x_next, lambda y: 3.0 * y, reward, Sigma, b, 0.5)
    assert out.shape == (G, 2, 4, 4)
    torch.testing.assert_close(out, (Sigma / (0.5 * b))[:, None, None, None] * 3.0 * w)
    with pytest.raises(ValueError, match="x_next"):
        E.fo_lookahead(x_next[:, :, 0, 0, 0], lambda y: y, reward, 1.0, 1.0, 1.0)


def test_fo_terminal_scaling():
    g = torch.randn(4, 3, 2, dtype=torch.float64)
    alpha = torch.tensor([1.0, 2.0, 0.5, 4.0], dtype=torch.float64)
    torch.testing.assert_close(E.fo_terminal(g, alpha), g / alpha[:, None, None])
    torch.testing.assert_close(E.fo_terminal(g, 0.1), g / 0.1)
    Sigma = torch.tensor([0.2, 0.3, 0.4, 0.5], dtype=torch.float64)
    b = torch.tensor([0.1, 0.1, 0.2, 1.0], dtype=torch.float64)
    torch.testing.assert_close(E.fo_terminal(g, alpha, Sigma, b), (Sigma / (alpha * b))[:, None, None] * g)
    torch.testing.assert_close(E.fo_terminal(g, 1.0, 0.2, 0.4), 0.5 * g)
    assert E.fo_terminal(g.to(torch.bfloat16), 1.0).dtype == torch.float32
    with pytest.raises(ValueError, match="Sigma"):
        E.fo_terminal(g, 1.0, Sigma=Sigma)
    with pytest.raises(ValueError, match="coefficient"):
        E.fo_terminal(g, torch.ones(3))


@pytest.mark.parametrize("baseline", ["none", "mean", "loo"])
def test_zo_lookahead_matches_explicit_formula(baseline):
    gen = torch.Generator().manual_seed(4)
    G, K = 3, 6
    r = torch.randn(G, K, generator=gen, dtype=torch.float64) + 2
    z = torch.randn(G, K, 2, 3, generator=gen, dtype=torch.float64)
    sigma = torch.tensor([0.3, 0.5, 0.9], dtype=torch.float64)
    b = torch.tensor([0.2, 0.25, 1.0], dtype=torch.float64)
    out = E.zo_lookahead(r, z, sigma, b, 0.5, baseline=baseline)
    assert out.shape == (G, 2, 3)
    for gi in range(G):
        acc = torch.zeros(2, 3, dtype=torch.float64)
        for j in range(K):
            others = torch.cat([r[gi, :j], r[gi, j + 1:]])
            base = {"none": 0.0, "mean": r[gi].mean(), "loo": others.mean()}[baseline]
            acc += (r[gi, j] - base) * z[gi, j]
        torch.testing.assert_close(out[gi], sigma[gi] / (0.5 * b[gi]) * acc / K)


def test_zo_lookahead_is_unbiased_for_linear_value():
    """x' = mu + sigma z, r = c.x': E[(r - b) z] = sigma c, so Psi = Sigma c/(alpha b) (Stein)."""
    gen = torch.Generator().manual_seed(5)
    G, K, sigma, b, alpha = 20000, 4, 0.5, 0.25, 2.0
    c = torch.tensor([1.0, -2.0], dtype=torch.float64)
    z = torch.randn(G, K, 2, generator=gen, dtype=torch.float64)
    r = 7.0 + (sigma * z) @ c
    est = E.zo_lookahead(r, z, torch.full((G,), sigma), torch.full((G,), b), alpha, baseline="loo").mean(0)
    torch.testing.assert_close(est, sigma**2 * c / (alpha * b), atol=0.02, rtol=0)
    est_mean = E.zo_lookahead(r, z, sigma, b, alpha, baseline="mean").mean(0)
    torch.testing.assert_close(est_mean, (1 - 1 / K) * sigma**2 * c / (alpha * b), atol=0.02, rtol=0)


def test_zo_lookahead_bad_shapes():
    with pytest.raises(ValueError, match="rewards"):
        E.zo_lookahead(torch.randn(2, 3), torch.randn(2, 4, 2), 1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="baseline"):
        E.zo_lookahead(torch.randn(2, 3), torch.randn(2, 3, 2), 1.0, 1.0, 1.0, baseline="median")


def test_soft_returns_hand_example():
    reward = torch.tensor([1.0, 2.0], dtype=torch.float64)
    kl = torch.tensor([[0.1, 0.0], [0.2, 1.0], [0.3, 0.5]], dtype=torch.float64)   # [N=3, B=2]
    out = E.soft_returns(reward, kl, 0.5)
    expect = torch.tensor([[1.0 - 0.5 * 0.5, 2.0 - 0.5 * 1.5],
                           [1.0 - 0.5 * 0.3, 2.0 - 0.5 * 0.5],
                           [1.0, 2.0]], dtype=torch.float64)
    torch.testing.assert_close(out, expect)
    per_row = E.soft_returns(reward, kl, torch.tensor([1.0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(per_row[0], torch.tensor([0.5, -1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="kl_steps"):
        E.soft_returns(reward, kl[:, :1], 1.0)


def test_sample_children_and_rollout_plumbing(task):
    tr, step = task.transition, _step_of(task, T_TEST)
    x, _ = _fixed_points(task, T_TEST, 3, seed=6)
    ch, z, c = E.sample_children(task.reference_output, tr, x, step, 5, torch.Generator().manual_seed(0))
    assert ch.shape == z.shape == (3, 5, 2)
    mu = c.mean(x, task.reference_output(x, c))
    torch.testing.assert_close(ch, mu[:, None] + c.sigma[:, None, None] * z)
    # reference policy against itself: zero KL at every step; ODE continuation is deterministic
    x0, kl = E.rollout(task.reference_output, tr, x, step, ref_output_fn=task.reference_output)
    assert kl.shape == (tr.num_steps - step, 3) and float(kl.abs().max()) == 0.0
    a, _ = E.rollout(task.target_output, tr, x, step, stochastic=False)
    b, _ = E.rollout(task.target_output, tr, x, step, stochastic=False)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    same, none = E.rollout(task.target_output, tr, x, step, step)
    assert torch.equal(same, x) and none is None
    with pytest.raises(ValueError, match="start_step"):
        E.rollout(task.target_output, tr, x, 10, 5)
    # tweedie_fn: x0_hat from the exact eps is Tweedie of the exact score
    ab = float(task.alphas_cumprod[T_TEST])
    x0_hat = E.tweedie_fn(task.reference_output, tr, step)(x)
    torch.testing.assert_close(x0_hat, (x + (1 - ab) * task.ref_score(x, ab)) / math.sqrt(ab))
