"""The soft first-order lookahead along the sampled path (method.fo_value=path, preset rsm-soft-fo).

* The trainer's one backward sweep equals differentiating each record's own return through a
  fresh re-run of the rest of its path (recorded noise, the deterministic last step), soft and hard.
* The estimator is consistent for Psi*: at the exact optimal policy of the 2-D task the mean of
  ``(Sigma/(alpha b)) grad_{x'} [r - alpha sum_{j>i} KL_j]`` over sampled paths matches the closed
  form; the hard return (no KL) does not, so the comparison can fail.
* Configurations it cannot serve are refused in one line naming the field.
"""
from __future__ import annotations

import pytest
import torch

from rsm_fast import estimators as E
from rsm_fast.config import ConfigError, build_config
from rsm_fast.tasks.toy2d import Toy2D, Toy2DConfig
from rsm_fast.trainer import Trainer

SMALL = ["train.batch_size=4", "task.num_steps=6", "policy.hidden=16", "train.threads=1"]


def _path_return(tr, rec, leaf: int, x: torch.Tensor, start: int, soft: bool) -> torch.Tensor:
    """``r(x_N) - alpha sum_{j >= start, noisy} KL_j`` re-running leaf's path from ``x`` at ``start``."""
    T, anc = tr.task.transition, rec.leaf_ancestor
    grp, total = rec.x0_group[leaf:leaf + 1], x.new_zeros(())
    for j in range(start, T.num_steps):
        rid = int(anc[j, leaf])
        c = T.coeffs_at(j, 1, stochastic=rid >= 0)
        t = tr._t_table[j].expand(1)
        f = tr._policy_out(x, t, grp)
        if rid >= 0 and soft:
            total = total + c.kl(f, tr._policy_out(x, t, grp, model=tr.handle.reference), reduce="sum").sum()
        x = c.step(x, f, rec.z[rid:rid + 1] if rid >= 0 else torch.zeros_like(x))
    return tr.task.reward(x).sum() - (tr.kl_alpha * total if soft else 0.0)


@pytest.mark.parametrize("returns", ["soft", "hard"])
def test_backward_sweep_equals_differentiating_each_records_path(returns):
    torch.manual_seed(0)
    tr = Trainer(build_config("rsm-soft-fo", None, SMALL + [f"method.returns={returns}"]))
    with torch.no_grad():             # a policy away from the reference, so the KL terms matter
        for p in tr.policy.parameters():
            p.add_(0.3 * torch.randn_like(p))
    rec, _, _, _, _, _, g = tr._sample_and_score()
    anc, T = rec.leaf_ancestor, tr.task.transition
    assert bool((anc[-1] < 0).all()) and bool((anc[:-1] >= 0).all())   # DDIM's last step is deterministic
    worst = 0.0
    for leaf in range(anc.shape[1]):
        for i in range(T.num_steps - 1):
            rid = int(anc[i, leaf])
            x_next = T.coeffs_at(i, 1).step(rec.x[rid:rid + 1], rec.f_old[rid:rid + 1], rec.z[rid:rid + 1])
            x_next = x_next.detach().requires_grad_(True)
            (want,) = torch.autograd.grad(_path_return(tr, rec, leaf, x_next, i + 1, returns == "soft"), x_next)
            worst = max(worst, float((want - g[rid:rid + 1]).abs().max() / want.abs().max()))
    assert worst < 1e-4


def test_soft_path_gradient_is_consistent_for_psi_star():
    """Mean over 4096 paths per point at step 10 of 50 (float64) against the closed-form Psi*: the
    soft return is within MC + discretisation error (measured rmse 0.009 for |Psi*| 0.15); the
    hard return's gradient estimates the hard value instead (rmse ~0.07)."""
    task = Toy2D(Toy2DConfig())
    T, D, i, P, K = task.transition, torch.float64, 10, 8, 4096
    g = torch.Generator().manual_seed(1)
    c0 = T.coeffs_at(i, P, dtype=D)
    x = c0.alpha[:, None] * task.sample_target(P, g).to(D) + c0.sigma_t[:, None] * torch.randn(P, 2, generator=g, dtype=D)
    pol, ref = task.target_output, task.reference_output
    xr = x.repeat_interleave(K, 0)
    c = T.coeffs_at(i, xr.shape[0], dtype=D)
    x_next = c.step(xr, pol(xr, c), torch.randn(xr.shape, generator=g, dtype=D)).detach().requires_grad_(True)
    scale = (c0.Sigma / (task.alpha * c0.b))[:, None]
    psi = task.psi_star(x, c0.alpha**2)

    def estimate(soft: bool) -> torch.Tensor:
        x0, kl = E.rollout(pol, T, x_next, i + 1, gen=torch.Generator().manual_seed(2), ref_output_fn=ref)
        ret = task.reward(x0) - (task.alpha * kl.sum(0) if soft else 0.0)
        (grad,) = torch.autograd.grad(ret.sum(), x_next)
        return scale * grad.view(P, K, 2).mean(1)

    rmse = lambda e: float(((e - psi) ** 2).mean().sqrt())  # noqa: E731
    assert rmse(estimate(True)) < 0.02 < 0.05 < rmse(estimate(False))


@pytest.mark.parametrize("sets, field", [
    (["rollout.plan=branch", "rollout.profile=const:2", "method.group_size=4"], "method.fo_value"),
    (["rollout.window=4"], "method.fo_value"),
    (["train.timestep_fraction=0.5"], "method.fo_value"),
    (["method.estimator=zo"], "method.fo_value"),
])
def test_unservable_configurations_are_refused_in_one_line(sets, field):
    with pytest.raises(ConfigError) as e:
        build_config("rsm-soft-fo", None, sets)
    msg = str(e.value)
    assert field in msg and "\n" not in msg


def test_path_gradients_are_counted_as_reference_evaluations():
    tr = Trainer(build_config("rsm-soft-fo", None, SMALL))
    before = tr.nfe["reference"]
    rec, *_ = tr._sample_and_score()
    R, N = rec.x0.shape[0], tr.task.transition.num_steps
    # records' own reference outputs (N - 1 noisy steps) + the sweep: the deterministic last step
    # once, then policy and reference at each of steps 1 .. N - 2
    assert tr.nfe["reference"] - before == R * (N - 1) + R * 1 + 2 * R * (N - 2)


def test_exact_value_is_the_closed_form_psi_star_and_only_on_the_2d_task():
    tr = Trainer(build_config("rsm-soft-fo", None, SMALL + ["method.fo_value=exact"]))
    rec, _, _, c, _, _, g = tr._sample_and_score()
    psi = (tr.cfg.method.fo_reward_scale * c.Sigma / c.b)[:, None] * g
    want = tr.task.psi_star(rec.x.double(), c.alpha.double() ** 2)
    torch.testing.assert_close(psi.double(), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="method.fo_value"):
        build_config("rsm-soft-fo", None, ["task.name=digits-flow", "method.fo_value=exact"])


@pytest.mark.parametrize("rule", ["current", "trapezoid"])
def test_path_rules_read_the_sweep_at_the_records_own_state(rule):
    """``current``: (b/Sigma) grad_{x_i} [r - alpha sum_{j>=i} KL_j] (lookahead units, the record's own
    KL included), from a fresh re-run of each record's path; ``trapezoid``: the mean of that and the
    ``next`` rule's g, which the same sweep still gives; the rollout itself is unchanged."""
    torch.manual_seed(0)
    sets = SMALL + ["train.seed=3"]
    tr_next = Trainer(build_config("rsm-soft-fo", None, sets))
    tr = Trainer(build_config("rsm-soft-fo", None, sets + [f"method.fo_path_rule={rule}"]))
    with torch.no_grad():             # one policy away from the reference, the same in both trainers
        for p, q in zip(tr.policy.parameters(), tr_next.policy.parameters()):
            p.add_(0.3 * torch.randn_like(p))
            q.copy_(p)
    rec_n, _, _, _, _, _, g_next = tr_next._sample_and_score()
    rec, _, _, c, _, _, g = tr._sample_and_score()
    torch.testing.assert_close(rec.x0, rec_n.x0, rtol=0, atol=0)
    anc, T = rec.leaf_ancestor, tr.task.transition
    worst = 0.0
    for leaf in range(anc.shape[1]):
        for i in range(T.num_steps - 1):
            rid = int(anc[i, leaf])
            x = rec.x[rid:rid + 1].detach().requires_grad_(True)
            (cur,) = torch.autograd.grad(_path_return(tr, rec, leaf, x, i, True), x)
            cur = (c.b[rid] / c.Sigma[rid]) * cur
            want = cur if rule == "current" else 0.5 * (cur + g_next[rid:rid + 1])
            worst = max(worst, float((want - g[rid:rid + 1]).abs().max() / want.abs().max()))
    assert worst < 1e-4


def test_path_rules_cost_one_more_sweep_step_and_need_the_path_value():
    counts = {}
    for rule in ("next", "trapezoid"):
        tr = Trainer(build_config("rsm-soft-fo", None, SMALL + [f"method.fo_path_rule={rule}"]))
        before = tr.nfe["reference"]
        rec, *_ = tr._sample_and_score()
        counts[rule] = tr.nfe["reference"] - before
    assert counts["trapezoid"] - counts["next"] == 2 * rec.x0.shape[0]     # policy and reference at x_0
    with pytest.raises(ConfigError, match="method.fo_path_rule") as e:
        build_config("rsm-soft-fo", None, ["method.fo_value=tweedie", "method.fo_path_rule=trapezoid"])
    assert "\n" not in str(e.value)
    assert build_config("rsm-soft-fo-trap").method.fo_path_rule == "trapezoid"
