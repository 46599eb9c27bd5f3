"""The rollout engine and branching plans (issue: rollout engine): plan shapes and NFE, bad plans,
zero-noise SDE = ODE, on-policy log-prob and ratio, shared parents, chunking/order invariance, no
host sync inside the step loop."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from rsm_fast import ops
from rsm_fast import schedules as S
from rsm_fast import transitions as T
from rsm_fast.engine.plan import PlanError, PlanSpec, check_chunk_size, compile_plan
from rsm_fast.engine.rollout import RolloutEngine

LATENT = (2, 3, 3)


class TinyModel(nn.Module):
    """A small conditional network: per-row MLP over (x, t, cond)."""

    def __init__(self, d=18, c=4):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w1 = nn.Parameter(torch.randn(d + 1 + c, 32, generator=g) * 0.2)
        self.w2 = nn.Parameter(torch.randn(32, d, generator=g) * 0.2)
        self.c = c

    def forward(self, x, t, cond):
        B = x.shape[0]
        cond = torch.zeros(B, self.c, dtype=x.dtype) if cond is None else cond
        h = torch.cat([x.reshape(B, -1), (t / 1000.0)[:, None].to(x.dtype), cond], 1)
        # row-wise products (no GEMM): every row's arithmetic is independent of the batch size
        a = torch.tanh((h[:, :, None] * self.w1[None]).sum(1))
        return (a[:, :, None] * self.w2[None]).sum(1).reshape(x.shape)


def flow(n=10):
    return T.flow_grpo_sde(S.rf_sigmas(n, 3.0), noise_level=0.7)


def ddim(n=10):
    return T.ddim(S.ddpm_linear_alphas_cumprod(), S.ddim_timesteps(1000, n), eta=1.0)


PLANS = {
    "sde": PlanSpec(kind="sde", num_steps=10, groups=2, trunks=3),
    "branch": PlanSpec(kind="branch", num_steps=10, groups=2, trunks=1, k=(3, 2, 4, 0, 0, 0, 0, 0, 0, 0)),
    "tree": PlanSpec(kind="tree", num_steps=10, groups=1, trunks=2, k=(2, 0, 0, 2, 0, 0, 0, 0, 0, 0)),
}


def _engine(spec, tr=None, chunk=None, cfg=None, seed=3):
    tr = tr or flow()
    return RolloutEngine(TinyModel(), tr, compile_plan(spec), chunk_size=chunk, seed=seed, cfg_scale=cfg)


def _cond(spec):
    return torch.randn(spec.groups, 4, generator=torch.Generator().manual_seed(5))


# -- plans ----------------------------------------------------------------------------------------
def test_branch_plan_matches_the_cost_model():
    """RSM `lowsnr2` on 4 trunks: NFE = trunks * (last+1 + sum K_i (N-1-i)) (performance.md §3)."""
    k = (6, 6, 8, 10, 0, 0, 0, 0, 0, 0)
    p = compile_plan(PlanSpec(kind="branch", num_steps=10, groups=2, trunks=2, k=k))
    assert p.rows[-1] == 4 * 30 and p.num_records == 4 * 30
    assert p.nfe() == {"trunk": 4 * 4, "branch": 4 * sum(K * (10 - 1 - i) for i, K in enumerate(k)),
                       "cfg": 0, "total": 16 + 4 * 218}
    assert p.nfe(cfg=True)["total"] == 2 * p.nfe()["total"]
    assert set(p.record_step.tolist()) == {0, 1, 2, 3}


def test_sde_plan_and_window():
    p = compile_plan(PlanSpec(kind="sde", num_steps=6, groups=3, trunks=4, sde_mask=(0, 1, 1, 0, 0, 0),
                              train_mask=(1, 1, 0, 1, 1, 1)))
    assert p.rows == [12] * 7 and p.num_records == 12          # only step 1 is noisy AND trained
    assert p.record_step.unique().tolist() == [1]
    assert torch.equal(p.group[0], torch.arange(12) // 4)


def test_tree_plan_leaf_ancestry():
    p = compile_plan(PlanSpec(kind="tree", num_steps=4, groups=1, trunks=1, k=(2, 0, 2, 0)))
    assert p.rows == [1, 2, 2, 4, 4]
    # each leaf's ancestor at step 0 is one of the two first-split records, two leaves each
    first = p.leaf_ancestor[0]
    assert sorted(first.tolist()) == [0, 0, 1, 1]
    assert (p.record_parent[p.leaf_ancestor[3]] == p.leaf_ancestor[2]).all()


@pytest.mark.parametrize("spec,needle", [
    (PlanSpec(kind="branch", num_steps=10, k=(2, -1) + (0,) * 8), "plan.k[1]"),
    (PlanSpec(kind="branch", num_steps=10, k=(2,) * 12), "does not exist"),
    (PlanSpec(kind="branch", num_steps=4, k=(0, 0, 0, 0)), "no branching step"),
    (PlanSpec(kind="sde", num_steps=4, k=(1, 1, 1, 1)), "plan.k"),
    (PlanSpec(kind="fork"), "plan.kind"),
    (PlanSpec(kind="sde", num_steps=0), "plan.num_steps"),
    (PlanSpec(kind="sde", num_steps=3, sde_mask=(1, 1)), "plan.sde_mask"),
    (PlanSpec(kind="sde", num_steps=3, sde_mask=(0, 0, 0)), "trains no transition"),
])
def test_bad_plans_fail_before_compute(spec, needle):
    with pytest.raises(PlanError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        compile_plan(spec)


def test_bad_chunk_size_and_mismatched_transition():
    with pytest.raises(PlanError, match="chunk_size"):
        check_chunk_size(0)
    with pytest.raises(PlanError, match="steps"):
        _engine(PLANS["sde"], tr=flow(8))


# -- execution ------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["flow", "ddim"])
def test_zero_noise_level_sde_rollout_equals_the_ode_rollout(family):
    """Flow-GRPO noise level a = 0 / DDIM eta = 0: the engine's SDE plan reproduces an independent
    eager ODE loop."""
    tr = T.flow_grpo_sde(S.rf_sigmas(10, 3.0), noise_level=0.0) if family == "flow" else \
        T.ddim(S.ddpm_linear_alphas_cumprod(), S.ddim_timesteps(1000, 10), eta=0.0)
    spec = PLANS["sde"]
    eng = _engine(spec, tr)
    x = eng.initial_latents(LATENT)
    rec = eng.run(x.clone(), cond=_cond(spec))
    ode = tr.with_sde_mask([False] * tr.num_steps)
    model, cond = TinyModel(), _cond(spec).index_select(0, torch.arange(6) // 3)
    for i in range(10):
        c = ode.coeffs_at(i, 6)
        x = c.step(x, model(x, c.t, cond), torch.zeros_like(x))
    torch.testing.assert_close(rec.x0, x, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", list(PLANS))
def test_recorded_log_prob_and_ratio_are_on_policy(kind):
    spec, tr = PLANS[kind], flow()
    rec = _engine(spec, tr).run(latent_shape=LATENT, cond=_cond(spec))
    c = tr.coeffs(rec.step, torch.ones_like(rec.step, dtype=torch.bool))
    x_next = c.step(rec.x, rec.f_old, rec.z)
    torch.testing.assert_close(c.log_prob(x_next, rec.x, rec.f_old), rec.log_prob, rtol=1e-5, atol=1e-5)
    out = ops.zo_loss(rec.f_old.clone(), rec.f_old, rec.z, torch.ones(rec.step.shape[0]), c, form="ratio", clip_eps=0.2)
    assert torch.equal(out.log_ratio, torch.zeros_like(out.log_ratio))     # ratio exactly 1
    assert rec.x.shape[0] == compile_plan(spec).num_records


def test_children_share_the_parent_latent_bit_for_bit():
    spec = PLANS["branch"]
    rec = _engine(spec).run(latent_shape=LATENT, cond=_cond(spec))
    plan = compile_plan(spec)
    for i in range(3):
        at = (rec.step == i).nonzero().flatten()
        parents = plan.src[i][plan.trained[i]]
        for p in parents.unique():
            sib = at[parents == p]
            assert sib.numel() == spec.k[i] and all(torch.equal(rec.x[sib[0]], rec.x[j]) for j in sib)
            assert all(torch.equal(rec.f_old[sib[0]], rec.f_old[j]) for j in sib)
            assert not torch.equal(rec.z[sib[0]], rec.z[sib[1]])


@pytest.mark.parametrize("kind", list(PLANS))
@pytest.mark.parametrize("cfg", [None, 4.5])
def test_results_do_not_depend_on_chunk_size(kind, cfg):
    spec = PLANS[kind]
    runs = [_engine(spec, chunk=c, cfg=cfg).run(latent_shape=LATENT, cond=_cond(spec), uncond=torch.zeros(1, 4))
            for c in (1, 3, 12)]
    for r in runs[1:]:
        assert torch.equal(r.x0, runs[0].x0) and torch.equal(r.x, runs[0].x) and torch.equal(r.z, runs[0].z)
        assert torch.equal(r.log_prob, runs[0].log_prob)


def test_results_do_not_depend_on_row_order():
    """Reversing the trunks (and their conditioning) reverses the samples, bit for bit."""
    spec = PlanSpec(kind="sde", num_steps=10, groups=4, trunks=1)
    eng = _engine(spec)
    cond = _cond(spec)
    a = eng.run(latent_shape=LATENT, cond=cond)
    x_init = eng.initial_latents(LATENT)
    eng2 = _engine(spec)
    flip = torch.arange(3, -1, -1)
    eng2.plan.key = [k.flip(0) for k in eng2.plan.key]         # the rows' identities travel with them
    eng2.plan.initial_key = eng2.plan.initial_key.flip(0)
    b = eng2.run(x_init.index_select(0, flip), cond=cond.index_select(0, flip))
    assert torch.equal(b.x0, a.x0.index_select(0, flip))


def test_nfe_matches_the_plan():
    for kind, spec in PLANS.items():
        for cfg in (None, 2.0):
            rec = _engine(spec, chunk=4, cfg=cfg).run(latent_shape=LATENT, cond=_cond(spec), uncond=torch.zeros(1, 4))
            want = compile_plan(spec).nfe(cfg=cfg is not None)
            assert {k: rec.nfe[k] for k in want} == want, kind


@pytest.mark.parametrize("chunk", [None, 5])
def test_eager_calls_evaluate_only_the_plans_rows(chunk):
    """Without CUDA graphs no call is padded: the model sees exactly R_i rows at step i (in chunks of
    at most ``chunk``), so the work done is the NFE the plan reports, not steps x widest step."""
    spec = PLANS["branch"]
    plan = compile_plan(spec)
    model, seen = TinyModel(), []
    counting = lambda x, t, c: (seen.append(x.shape[0]), model(x, t, c))[1]  # noqa: E731
    eng = RolloutEngine(counting, flow(), plan, chunk_size=chunk, seed=3)
    rec = eng.run(latent_shape=LATENT, cond=_cond(spec))
    assert rec.nfe["padding"] == 0
    assert sum(seen) == sum(plan.rows[:-1]) == rec.nfe["total"]
    assert max(plan.rows) > min(plan.rows[:-1])   # the plan is uneven, so padding would have shown
    if chunk is not None:
        assert max(seen) <= chunk


def test_no_host_sync_inside_the_step_loop(no_host_sync):
    spec = PLANS["branch"]
    eng = _engine(spec, chunk=4, cfg=3.0)
    cond, unc = _cond(spec), torch.zeros(1, 4)
    x = eng.initial_latents(LATENT)
    with no_host_sync():
        rec = eng.run(x, cond=cond, uncond=unc)
    assert torch.isfinite(rec.x0).all()


def test_noise_has_the_right_scale():
    spec = PlanSpec(kind="sde", num_steps=10, groups=1, trunks=128)
    rec = _engine(spec).run(latent_shape=LATENT)
    z = rec.z
    assert abs(float(z.mean())) < 0.02 and abs(float(z.std()) - 1.0) < 0.02


@pytest.mark.parametrize("cfg", [None, 2.5])
def test_evaluate_records_gives_another_models_output_at_every_record(cfg):
    """The reference (any second model) at the records' states, times and groups, with the
    rollout's CFG; counted once per record (twice with CFG)."""
    spec = PLANS["branch"]
    eng = _engine(spec, chunk=5, cfg=cfg)
    cond, unc = _cond(spec), torch.zeros(1, 4)
    rec = eng.run(latent_shape=LATENT, cond=cond, uncond=unc)
    ref = TinyModel()
    with torch.no_grad():
        ref.w2.mul_(-0.5)
    out, n = eng.evaluate_records(ref, rec, cond, unc)
    t = eng._t.index_select(0, rec.step)
    with torch.no_grad():
        fc = ref(rec.x, t, cond.index_select(0, rec.group))
        want = fc if cfg is None else ref(rec.x, t, unc.expand(rec.x.shape[0], 4)) + cfg * (
            fc - ref(rec.x, t, unc.expand(rec.x.shape[0], 4)))
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    assert n == rec.x.shape[0] * (1 if cfg is None else 2)


def test_an_evaluation_plan_needs_no_records():
    spec = PlanSpec(kind="sde", num_steps=10, groups=1, trunks=6, train_mask=(False,) * 10)
    with pytest.raises(PlanError, match="trains no transition"):
        compile_plan(spec)
    eng = RolloutEngine(TinyModel(), flow(), compile_plan(spec, require_records=False), seed=3)
    rec = eng.run(latent_shape=LATENT)
    assert rec.x0.shape == (6, *LATENT) and rec.x.shape == (0, *LATENT) and rec.log_prob.shape == (0,)
    out, n = eng.evaluate_records(TinyModel(), rec)
    assert out.shape == (0, *LATENT) and n == 0
