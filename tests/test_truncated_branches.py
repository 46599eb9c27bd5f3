"""Truncated branches (issue 20, item 6): a branch child takes ``d`` ODE steps and then jumps to its
Tweedie estimate x0_hat instead of running every remaining step. Checked: the plan's forwards and
the allocator's cost model, the engine's final samples against a step-by-step float64 replay, the
trained transitions unchanged, waves, config refusals and a trainer run."""
from __future__ import annotations

import pytest
import torch

from rsm_fast import allocator as A
from rsm_fast.config import ConfigError, build_config
from rsm_fast.engine.plan import PlanError, PlanSpec, compile_plan
from rsm_fast.engine.rollout import RolloutEngine
from rsm_fast.engine.waves import merge_plans, wave_plans
from test_engine import LATENT, TinyModel, ddim, flow

K = (3, 2, 4, 0, 2, 0, 1, 0, 3, 0)


def _spec(d, groups=2, trunks=1, k=K):
    return PlanSpec(kind="branch", num_steps=len(k), groups=groups, trunks=trunks, k=k, truncate=d)


@pytest.mark.parametrize("d", [0, 1, 3])
def test_forwards_per_child_are_d_plus_one(d):
    """A child spawned at step i costs min(d + 1, N - 1 - i) forwards; the trunk is unchanged."""
    N = len(K)
    p = compile_plan(_spec(d, groups=2, trunks=2))
    T = 4
    want_branch = T * sum(k * min(d + 1, N - 1 - i) for i, k in enumerate(K))
    assert p.nfe() == {"trunk": T * 9, "branch": want_branch, "cfg": 0, "total": T * 9 + want_branch}
    assert p.evaluated_rows == sum(p.live_rows) == p.nfe()["total"]
    full = compile_plan(_spec(-1, groups=2, trunks=2))
    assert p.rows == full.rows and p.num_records == full.num_records       # rows stay, only forwards go
    for name in ("record_step", "record_group", "record_parent", "leaf_ancestor", "record_set"):
        assert torch.equal(getattr(p, name), getattr(full, name)), name
    # every child jumps exactly once, unless its jump would fall on the last step (which lands on x0)
    jumps = sum(int(j.sum()) for j in p.jump)
    assert jumps == T * sum(k for i, k in enumerate(K) if i + 1 + d < N - 1)


def test_a_depth_past_the_end_is_the_full_plan():
    N = len(K)
    p, full = compile_plan(_spec(N - 2)), compile_plan(_spec(-1))
    assert p.live_rows == full.live_rows == full.rows[:-1]
    assert not any(bool(j.any()) for j in p.jump)


@pytest.mark.parametrize("d", [0, 2])
def test_allocator_costs_match_the_truncated_plan(d):
    plan = compile_plan(_spec(d, groups=1, trunks=1))
    bc = A.branch_costs(plan, f_fwd=1.0, f_ref=0.0)
    assert bc.profile_cost(list(K)) == pytest.approx(plan.nfe()["total"])
    assert A.branch_costs(len(K), f_ref=0.0, truncate=d).marginal == bc.marginal
    with pytest.raises(ValueError, match="truncate"):
        A.branch_costs(len(K), truncate=-2)


def _replay(model, tr, rec, plan, d):
    """Each final sample rebuilt by hand in float64: its branching transition from the record, then
    ``d`` ODE steps, then x0_hat (or every remaining step when the jump would fall on the last)."""
    N = plan.num_steps
    out = []
    for r in range(plan.rows[-1]):
        anc = plan.leaf_ancestor[:, r]
        m = int(anc[anc >= 0][0])
        i = int(rec.step[m])
        c = tr.coeffs_at(i, 1, dtype=torch.float64, stochastic=True)
        x = c.step(rec.x[m:m + 1].double(), rec.f_old[m:m + 1].double(), rec.z[m:m + 1].double())
        stop = i + 1 + d if d >= 0 and i + 1 + d < N - 1 else None
        for j in range(i + 1, N):
            cj = tr.coeffs_at(j, 1, dtype=torch.float64, stochastic=False)
            f = model(x.float(), cj.t.float(), None).double()
            if j == stop:
                x = cj.x0_hat(f, x)
                break
            x = cj.step(x, f, torch.zeros_like(x))
        out.append(x)
    return torch.cat(out)


@pytest.mark.parametrize("family", ["flow", "ddim"])
@pytest.mark.parametrize("d", [0, 2])
def test_final_samples_are_d_ode_steps_then_x0_hat(family, d):
    tr = flow() if family == "flow" else ddim()
    spec = _spec(d, groups=1, trunks=2)
    model, seen = TinyModel(), []
    counting = lambda x, t, c: (seen.append(x.shape[0]), model(x, t, c))[1]  # noqa: E731
    plan = compile_plan(spec)
    rec = RolloutEngine(counting, tr, plan, seed=3).run(latent_shape=LATENT)
    assert sum(seen) == rec.nfe["total"] == plan.nfe()["total"]          # parked rows never reach the model
    with torch.no_grad():
        want = _replay(model, tr, rec, plan, d)
    torch.testing.assert_close(rec.x0.double(), want, rtol=1e-4, atol=1e-5)
    # the trained transitions are the untruncated plan's, bit for bit
    full = RolloutEngine(model, tr, compile_plan(_spec(-1, groups=1, trunks=2)), seed=3).run(latent_shape=LATENT)
    for name in ("x", "z", "f_old", "log_prob"):
        assert torch.equal(getattr(rec, name), getattr(full, name)), name
    assert not torch.allclose(rec.x0, full.x0)                             # ...but the samples moved


def test_the_jump_is_the_transitions_own_x0_hat():
    """The jump coefficients (c_x, c_f) reproduce ``StepCoeffs.x0_hat`` on both families."""
    from rsm_fast.engine.rollout import finish_rows
    g = torch.Generator().manual_seed(0)
    for tr in (flow(), ddim()):
        for i in (1, 4, 7):
            c = tr.coeffs_at(i, 3, dtype=torch.float64, stochastic=False)
            jump = torch.tensor([True, False, False])
            parked = torch.tensor([False, True, False])
            cj = finish_rows(c, tr, i, jump, parked)
            x, f = torch.randn(3, 5, generator=g, dtype=torch.float64), torch.randn(3, 5, generator=g, dtype=torch.float64)
            y = cj.step(x, f, torch.randn(3, 5, generator=g, dtype=torch.float64))
            torch.testing.assert_close(y[0], c.x0_hat(f, x)[0], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(y[1], x[1], rtol=0, atol=0)
            torch.testing.assert_close(y[2], c.step(x, f, torch.zeros_like(x))[2])


def test_waves_merge_the_truncation_masks():
    spec = _spec(1, groups=4, trunks=1)
    whole, merged = compile_plan(spec), merge_plans(wave_plans(spec, 2))
    assert merged.live_rows == whole.live_rows
    for a, b in zip(merged.jump, whole.jump):
        assert int(a.sum()) == int(b.sum())


def test_bad_truncation_is_refused():
    with pytest.raises(PlanError, match="truncate"):
        compile_plan(PlanSpec(kind="sde", num_steps=4, truncate=0))
    with pytest.raises(PlanError, match="truncate"):
        compile_plan(_spec(-3))
    with pytest.raises(ConfigError, match="rollout.truncate"):
        build_config(preset="rsm-soft-zo", overrides=["rollout.truncate=1"])
    with pytest.raises(ConfigError, match="rollout.truncate"):
        build_config(preset="tempflow-grpo", overrides=["rollout.truncate=-2"])


def test_trainer_spends_the_truncated_plans_forwards():
    from rsm_fast.trainer import Trainer
    cfg = build_config(preset="tempflow-grpo", overrides=["rollout.truncate=0", "train.batch_size=8",
                                                          "train.epochs=2", "train.inner_updates=1"])
    tr = Trainer(cfg)
    stats = tr.epoch()
    plan = compile_plan(PlanSpec(kind="branch", num_steps=10, groups=2, trunks=4, k=(6,) * 9, truncate=0))
    assert stats["nfe_epoch"]["rollout"] == plan.nfe()["total"]
    assert tr.nfe["rollout"] < compile_plan(PlanSpec(kind="branch", num_steps=10, groups=2, trunks=4,
                                                     k=(6,) * 9)).nfe()["total"]
    assert all(torch.isfinite(p).all() for p in tr.policy.parameters())
