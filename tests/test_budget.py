"""The online budget allocator inside the trainer (rollout.allocator=online, rsm_fast/budget.py) and
the per-timestep diagnostics (rsm_fast/diagnostics.py)."""
from __future__ import annotations

import json

import pytest
import torch

from rsm_fast import diagnostics as D
from rsm_fast.allocator import branch_costs
from rsm_fast.config import ConfigError, build_config
from rsm_fast.runlog import RunDir
from rsm_fast.schedules import rf_sigmas
from rsm_fast.trainer import Trainer
from rsm_fast.transitions import flow_grpo_sde
from rsm_fast import allocator as A

TOY = ["train.threads=1", "task.eval_samples=128", "policy.hidden=16", "train.batch_size=16"]


def _trainer(preset="rsm-evr", *sets):
    return Trainer(build_config(preset, None, TOY + list(sets)))


def test_profile_moves_budget_is_kept_and_records_follow_the_plan():
    tr = _trainer()
    budget = sum(tr._spec.k)                       # branches per trunk of the starting const:6
    assert budget == 54
    profiles = [list(tr._spec.k)]
    for _ in range(4):
        nfe0 = tr.nfe["rollout"]
        plan = tr.plan
        s = tr.epoch()
        # this epoch ran the plan it was given: its counted NFE and records are that plan's
        assert tr.nfe["rollout"] - nfe0 == plan.nfe()["total"]
        assert s["records"] == plan.num_records
        assert s["per_step"]["K"][:-1] == [float(k) for k in plan.spec.k[:-1]]
        nk = s["alloc"]["next_k"]
        assert list(tr._spec.k) == nk and sum(nk) <= budget and nk[-1] == 0
        assert all(k == 0 or k >= 2 for k in nk)
        assert all(abs(a - b) <= 2 for a, b in zip(nk, profiles[-1]))      # hysteresis: +-2 per epoch
        profiles.append(nk)
    assert profiles[-1] != profiles[0]
    # the toy's per-branch variance grows toward high SNR (spec §4.6), and so does K
    assert profiles[-1][7] > profiles[-1][0]


def test_nfe_units_spend_exactly_the_priced_budget():
    tr = _trainer("rsm-evr-cost", "rollout.alloc_objective=budget")
    trunks = tr.plan.spec.groups * tr.plan.spec.trunks
    bc = branch_costs(tr.plan, f_fwd=1.0, f_ref=1.0, f_train=float(tr.cfg.train.inner_updates))
    budget = bc.profile_cost(tr._spec.k)
    for _ in range(3):
        k = list(tr._spec.k)
        s = tr.epoch()
        spent = s["nfe_epoch"]["rollout"] + s["nfe_epoch"]["reference"] + s["nfe_epoch"]["train"]
        assert spent == pytest.approx(trunks * bc.profile_cost(k))     # the price list is the trainer's count
        assert spent <= trunks * budget + 1e-9
        assert s["alloc"]["budget"] == pytest.approx(budget) and s["alloc"]["units"] == "nfe"
    # priced by remaining ODE steps, branches move toward the cheap late steps
    k = tr._spec.k
    assert k[8] > k[0] and sum(k) > 54


def test_variance_objective_makes_epochs_cheaper_at_the_starting_variance():
    """rollout.alloc_objective=variance with NFE prices: each epoch's next profile keeps the
    estimator variance sum_i v_i / K_i (the allocator's own estimates) at or below what const:6
    would give, and after the hysteresis has moved an epoch costs fewer NFE than the first."""
    tr = _trainer("rsm-evr-cost", "rollout.alloc_objective=variance", "rollout.alloc_clip_tau=1.0")
    first = None
    for _ in range(5):
        s = tr.epoch()
        spent = s["nfe_epoch"]["rollout"] + s["nfe_epoch"]["reference"] + s["nfe_epoch"]["train"]
        first = first or spent
        al = tr.budget.alloc
        on = [i for i, r in enumerate(al.reference) if r and al.v[i]]
        tgt = al.target()
        assert sum(al.v[i] / tgt[i] for i in on) <= sum(al.v[i] / 6 for i in on) * (1 + 1e-9)
        assert s["alloc"]["used"] <= s["alloc"]["budget"] * (1 + 1e-9)
    assert spent < 0.9 * first


def test_k_min_one_keeps_single_branch_steps_centred_on_their_group():
    """alloc_k_min=1 from const:2 with the variance objective: low-variance steps drop to one
    branch (not off), their records' baseline set is the group at that step (group_size records,
    from different trunks), their v is still measured (from that set's spread), and the epoch
    costs less than const:2's."""
    tr = _trainer("tempflow-evr-cost", "rollout.profile=const:2", "rollout.alloc_k_min=1", "rollout.alloc_clip_tau=1.0")
    first = tr.epoch()
    for _ in range(3):
        s = tr.epoch()
    k = list(tr.plan.spec.k)
    assert 1 in k[:-1] and all(a >= 1 for a in k[:-1]) and max(k) >= 2
    plan = tr.plan
    sizes = torch.bincount(plan.record_set)
    one = [i for i, a in enumerate(k) if a == 1]
    for i in one:
        sets = plan.record_set[plan.record_step == i].unique()
        assert all(int(sizes[j]) == tr.cfg.method.group_size for j in sets)
        assert s["per_step"]["v"][i] is not None and s["per_step"]["v"][i] > 0
    cost = lambda e: sum(e["nfe_epoch"][p] for p in ("rollout", "reference", "train"))  # noqa: E731
    assert cost(s) < cost(first)


def test_seconds_units_price_from_the_phase_clock():
    tr = _trainer("rsm-evr", "rollout.alloc_units=seconds")
    s = tr.epoch()
    a = s["alloc"]
    assert a["units"] == "seconds" and a["budget"] > 0
    assert a["used"] <= a["budget"] * (1 + 1e-9)
    s = tr.epoch()
    assert s["alloc"]["used"] <= s["alloc"]["budget"] * (1 + 1e-9)


def test_clipped_step_is_deactivated_and_the_plan_drops_it():
    tr = _trainer("rsm-evr", "rollout.alloc_patience=100")
    rec_step = tr.plan.record_step
    for _ in range(3):
        M = tr.plan.num_records
        rec_step = tr.plan.record_step
        adv = torch.randn(M, dtype=torch.float64)
        z = torch.randn(M, 2, dtype=torch.float64)
        k, _ = tr.budget.step(tr.plan, rec_step, tr.plan.record_set, adv, z, rec_step == 8, None)
    assert k[8] == 0 and sum(k) <= 54
    assert tr.budget.alloc.clip[8] > 0.5


def test_checkpoint_resumes_the_allocator_and_its_plan(tmp_path):
    """Resuming from checkpoint.pt continues exactly: the same next profile, plan and epoch stats."""
    a = _trainer()
    for _ in range(3):
        a.epoch()
    torch.save(a.state_dict(), tmp_path / "ck.pt")
    b = _trainer()
    b.load_state_dict(torch.load(tmp_path / "ck.pt", weights_only=False))
    assert b._spec.k == a._spec.k and b.epochs_done == 3
    sa, sb = a.epoch(), b.epoch()
    assert sa["alloc"]["next_k"] == sb["alloc"]["next_k"]
    assert sa["reward_mean"] == sb["reward_mean"] and sa["loss"] == sb["loss"]
    c = Trainer(build_config("tempflow-grpo", None, TOY))
    with pytest.raises(ValueError, match="allocator"):
        c.load_state_dict(a.state_dict())


def test_allocator_state_round_trips():
    tr = _trainer()
    tr.epoch()
    tr.epoch()
    st = tr.budget.state_dict()
    tr2 = _trainer()
    tr2.budget.load_state_dict(json.loads(json.dumps(st)))         # plain data: survives JSON / torch.save
    assert tr2.budget.state_dict() == st
    assert tr2.budget.alloc.propose() == tr.budget.alloc.propose()


@pytest.mark.parametrize("sets, field", [
    (["rollout.allocator=online"], "rollout.allocator"),                                  # grpo: sde plan
    (["rollout.plan=branch", "rollout.profile=const:4", "rollout.allocator=online",
      "rollout.alloc_k_min=0"], "rollout.alloc_k_min"),
    (["rollout.plan=branch", "rollout.profile=const:4", "rollout.allocator=online",
      "rollout.alloc_budget=3"], "rollout.alloc_budget"),
    (["rollout.plan=branch", "rollout.profile=const:4", "rollout.allocator=online",
      "rollout.alloc_units=gpu"], "rollout.alloc_units"),
    (["rollout.plan=branch", "rollout.profile=const:4", "rollout.allocator=online",
      "rollout.alloc_clip_tau=2"], "rollout.alloc_clip_tau"),
    (["rollout.plan=branch", "rollout.profile=const:4", "rollout.allocator=online",
      "rollout.alloc_objective=cheap"], "rollout.alloc_objective"),
    (["rollout.plan=branch", "rollout.profile=const:4", "rollout.allocator=online",
      "rollout.alloc_weights=h2"], "rollout.alloc_weights"),
])
def test_bad_allocator_config_names_the_field(sets, field):
    with pytest.raises(ConfigError) as e:
        Trainer(build_config("grpo", None, TOY + sets))
    assert field in str(e.value) and "\n" not in str(e.value)


def test_first_order_with_allocator_is_refused():
    with pytest.raises(ConfigError, match="rollout.allocator"):
        Trainer(build_config("rsm-fo-terminal", None, TOY + ["rollout.plan=branch", "rollout.profile=const:2",
                                                              "rollout.allocator=online"]))


# -- diagnostics ----------------------------------------------------------------------------------
@pytest.mark.parametrize("reweight, want", [
    ("base", lambda c: c.omega),
    ("fair", lambda c: c.omega),
    ("tempflow", lambda c: 2.25 * c.sigma * c.omega),
    ("tempflow_outer", lambda c: 2.25 * c.sigma * c.omega),
    ("guard", lambda c: c.sigma * c.omega / c.dt),
    ("fair_guard", lambda c: c.sigma * c.omega / c.dt),
])
def test_influence_metric_is_gamma_omega(reweight, want):
    """spec §3.4: for the policy-gradient family h = gamma omega per unit r z and gamma lambda b =
    sigma gamma omega per unit g; gamma from Table 1 (written here independently of the loss code)."""
    tr = _trainer("grpo", f"method.reweight={reweight}")
    tab = tr.task.transition
    n = tab.num_steps
    c = tab.coeffs(torch.arange(n), torch.ones(n, dtype=torch.bool), dtype=torch.float64)
    h = D.zo_influence(tab, tr.cfg.method, None, None)
    on = c.sigma > 0
    w = want(c)
    for i in range(n):
        if on[i]:
            assert h["h_rz"][i] == pytest.approx(float(w[i]), rel=1e-12)
            assert h["h_g"][i] == pytest.approx(float(c.sigma[i] * w[i]), rel=1e-12)
            assert h["h_g"][i] == pytest.approx(float(w[i] / c.omega[i] * abs(c.lam[i]) * c.b[i]), rel=1e-9)
        else:
            assert h["h_rz"][i] is None


def test_step_stats_against_a_direct_computation():
    g = torch.Generator().manual_seed(3)
    steps = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2])
    parents = torch.tensor([5, 5, 5, 7, 7, 8, 8, 9])
    adv = torch.randn(8, generator=g, dtype=torch.float64)
    z = torch.randn(8, 3, generator=g, dtype=torch.float64)
    clipped = torch.tensor([1, 0, 0, 1, 1, 0, 0, 0], dtype=torch.bool)
    scale = [2.0, 0.5, 1.0, 0.0]
    out = D.step_stats(4, steps, parents, trunks=1, adv=adv, z=z, scale=scale, clipped=clipped)
    assert out["K"] == [3.0, 4.0, 1.0, None]
    assert out["clip"] == [pytest.approx(1 / 3), pytest.approx(0.5), 0.0, None]
    psi = (adv * torch.tensor(scale, dtype=torch.float64)[steps])[:, None] * z
    v0 = psi[:3].var(0, unbiased=True).mean()
    v1 = (psi[3:5].var(0, unbiased=True).mean() + psi[5:7].var(0, unbiased=True).mean()) / 2
    assert out["v"][0] == pytest.approx(float(v0), rel=1e-12)
    assert out["v"][1] == pytest.approx(float(v1), rel=1e-12)
    assert out["v"][2] is None and out["v"][3] is None       # a lone record has no sibling spread


def test_fo_influence_recovers_a_known_force():
    steps = torch.tensor([0, 0, 1])
    g = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    shift = torch.stack([0.5 * g[0], 0.5 * g[1], 2.0 * g[2]])
    w = torch.tensor([1.0, 1.0, 0.25], dtype=torch.float64)
    out = D.fo_influence(3, steps, w, shift, g, torch.tensor([0.5, 0.5, 2.0], dtype=torch.float64))
    assert out["h_g"] == [pytest.approx(1.0), pytest.approx(1.0), None]      # 2 w |shift| / |g|
    assert out["h_rz"] == [pytest.approx(2.0), pytest.approx(0.5), None]


def test_epoch_log_carries_per_step_diagnostics(tmp_path):
    tr = Trainer(build_config("rsm-evr", None, TOY + ["train.epochs=2"]))
    tr.run(RunDir(tmp_path / "run"), progress=False)
    lines = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(lines) == 2
    for rec in lines:
        per = rec["per_step"]
        for key in ("K", "v", "h_g", "h_rz"):
            assert len(per[key]) == tr.plan.num_steps
        assert per["K"][-1] is None and per["v"][0] > 0
        assert set(rec["seconds_epoch"]) >= {"rollout", "reward", "train"}
        assert rec["nfe_epoch"]["rollout"] > 0 and "next_k" in rec["alloc"]


# -- influence weights ----------------------------------------------------------------------------
@pytest.mark.parametrize("reweight, form", [("fair", "hinge"), ("tempflow_outer", "ratio"), ("base", "ratio"),
                                            ("guard", "ratio"), ("pcpo", "hinge")])
@pytest.mark.parametrize("units", ["score", "native"])
def test_influence_weight_times_psi_variance_is_the_gradient_variance(reweight, form, units):
    """w_i v_i must be the per-branch variance of the force the loss puts on the model output: the
    autograd gradient of the reference loss (on policy, unclipped, no KL) per record, measured the
    same way as v (within-parent spread), against w_i times the spread of psi = scale A z. Fresh
    random float64 records; the gradient is taken through losses.zo_row_loss, not a formula."""
    from rsm_fast.allocator import sibling_variance, step_scale
    from rsm_fast.budget import influence_weights
    from rsm_fast.losses import zo_row_loss

    tr = _trainer("grpo", f"method.reweight={reweight}", f"method.surrogate={form}")
    tab = tr.task.transition
    n, d, P, K = tab.num_steps, 5, 6, 4
    gen = torch.Generator().manual_seed(11)
    steps = torch.arange(n - 1).repeat_interleave(P * K)           # every step but the last branches
    parents = torch.arange((n - 1) * P).repeat_interleave(K)
    M = steps.numel()
    c = tab.coeffs(steps, torch.ones(M, dtype=torch.bool), dtype=torch.float64)
    adv = torch.randn(M, generator=gen, dtype=torch.float64)
    z = torch.randn(M, d, generator=gen, dtype=torch.float64)
    f_old = torch.randn(M, d, generator=gen, dtype=torch.float64)
    f = f_old.clone().requires_grad_(True)
    om = tr._pcpo_target(tab).to(torch.float64) if reweight == "pcpo" else None
    out = zo_row_loss(f, f_old, z, adv, c, form=form, reweight=reweight, clip_eps=0.5,
                      omega_train=None if om is None else om.index_select(0, steps))
    assert not bool(out.clipped.any())                            # on policy: nothing clipped
    (grad,) = torch.autograd.grad(out.loss.sum(), f)
    w = influence_weights(tab, tr.cfg.method, units, om)
    scale = torch.tensor(step_scale(tab, units), dtype=torch.float64)
    ones = torch.ones(M, dtype=torch.float64)
    v_grad, _, npar = sibling_variance(steps, parents, grad * d, ones, n)       # d: undo the latent mean
    v_psi, _, _ = sibling_variance(steps, parents, z, adv * scale.index_select(0, steps), n)
    checked = 0
    for i in range(n - 1):
        assert npar[i] == P
        if float(v_psi[i]) > 0:
            assert float(v_grad[i]) == pytest.approx(w[i] * float(v_psi[i]), rel=1e-9, abs=1e-300)
            checked += 1
        else:
            assert float(v_grad[i]) == pytest.approx(0.0, abs=1e-300)
    assert checked >= n - 2


def test_influence_weights_follow_the_clip_fraction():
    """With alloc_weights=influence the allocator's weights after an epoch are w0_i (1 - clip_i),
    and its target differs from the uniform-weight one (same statistics, w not constant)."""
    from rsm_fast.budget import influence_weights

    tr = _trainer("rsm-evr", "rollout.alloc_weights=influence")
    w0 = influence_weights(tr.task.transition, tr.cfg.method, "score")
    for _ in range(2):
        tr.epoch()
    al = tr.budget.alloc
    assert al.weights == pytest.approx([a * (1 - (cl or 0.0)) for a, cl in zip(w0, al.clip)], rel=1e-12)
    assert any(cl for cl in al.clip if cl)                        # the clip factor was exercised
    uniform = A.allocate([x or 0.0 for x in al.v], al.cost, al.budget, None, al.k_min, al.k_max, al.rule,
                         al.eligible(), al.overhead)
    assert al.target() != uniform and sum(al.target()) <= 54


@pytest.mark.parametrize("preset, want", [("tempflow-grpo", "flat"), ("rsm-evr", "late")])
def test_influence_allocation_on_the_sd35_schedule(preset, want):
    """Flow-GRPO SDE over 10 equal steps (shift 1, the digits-flow schedule; spec §2.3), the
    closed-form v and 54 branches over 9 steps: with equal dt TempFlow's outer 2.25 sigma_i makes its
    per-branch force 2.25 sigma_i omega_i the same at every step but t = 1, so the influence-weighted
    min-variance allocation of its own loss is its even K = 6 (within +-1); under fair clipping
    (force omega_i, growing with SNR) it is late-heavy. (With SD3.5's shift 3, dt shrinks at high
    SNR and TempFlow's force grows there too.)"""
    from rsm_fast.budget import influence_weights

    cfg = build_config(preset, None, [])
    tab = flow_grpo_sde(rf_sigmas(10, shift=1.0), noise_level=0.7)
    w = influence_weights(tab, cfg.method, "score")
    k = A.allocate(A.closed_form_variance(tab), None, 54, w, active=[True] * 9 + [False])
    assert sum(k) == 54 and k[-1] == 0
    if want == "flat":
        assert all(abs(a - 6) <= 1 for a in k[1:9]), k
    else:
        assert k[:9] == sorted(k[:9]) and k[8] >= 3 * k[0], k


def test_native_psi_prior_is_omega_squared():
    from rsm_fast.allocator import step_scale
    tr = _trainer("rsm-evr", "rollout.alloc_psi_units=native")
    om = step_scale(tr.task.transition, "native")
    assert tr.budget.alloc.prior == pytest.approx([o * o for o in om], rel=1e-12)
