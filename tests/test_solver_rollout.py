"""Deterministic final-sample rollouts with any solver (issue 19 items 1 and 6): the engine equals
the solvers' reference loop bit for bit on flow and VP grids; its initial latents are the SDE
engine's for the same row keys; chunking and rank blocks change nothing; NFE is exact and a
CFG-free rollout costs exactly half of a CFG one; on a tiny SD3 pipeline it reproduces diffusers'
own Euler and DPM-Solver++ 2M sampling loops from the same latents."""
from __future__ import annotations

import pytest
import torch

from rsm_fast import schedules as S
from rsm_fast import solvers as SV
from rsm_fast.engine import noise as N
from rsm_fast.engine.plan import PlanError
from rsm_fast.engine.rollout import INITIAL_STEP
from rsm_fast.engine.solver_rollout import SolverRollout

SHAPE = (3, 4)


def _model(x, t, cond):
    """Row-wise, non-linear in x and t, conditioned per row: any solver order shows."""
    c = 0.0 if cond is None else cond.reshape(cond.shape[0], *[1] * (x.dim() - 1))
    tt = t.reshape(-1, *[1] * (x.dim() - 1)).to(x.dtype)
    return torch.tanh(0.8 * x + 0.3 * tt / (1 + tt.abs().amax())) + 0.5 * c - 0.2 * x


def _grid(path: str, n: int) -> SV.Grid:
    if path == "flow":
        return SV.flow_grid(n, 3.0, "flow_match")
    return SV.vp_grid(S.sd15_alphas_cumprod(1000), SV.linspace_timesteps(n))


def _engine(path, solver, rows=10, **kw):
    keys = torch.arange(100, 100 + rows)
    group = torch.arange(rows) // 2
    return SolverRollout(_model, solver, "v" if path == "flow" else "eps", _grid(path, 9), keys=keys, group=group,
                         seed=7, **kw)


@pytest.mark.parametrize("path", ["flow", "vp"])
@pytest.mark.parametrize("solver", ["euler", "dpm2", "unipc"])
def test_engine_equals_the_reference_solve(path, solver):
    eng = _engine(path, solver, chunk_size=4)
    cond = torch.randn(5, generator=torch.Generator().manual_seed(0))
    out = eng.run(cond, latent_shape=SHAPE, epoch=3)
    x_T = eng.initial_latents(SHAPE, 3)
    rows_cond = cond[eng.group]
    ref = SV.solve(eng.plan, lambda x, i: _model(x, eng.grid.model_t[i].float().expand(x.shape[0]), rows_cond), x_T)
    assert torch.equal(out.x0, ref)
    assert out.nfe == {"steps": 90, "cfg": 0, "padding": 0, "total": 90} == {**out.nfe, "total": eng.nfe_per_rollout}


def test_initial_latents_are_the_sde_engines_and_blocks_change_nothing():
    eng = _engine("flow", "dpm2")
    x_T = eng.initial_latents(SHAPE, 2)
    same = N.gaussian(eng.epoch_seed(2), eng.keys, INITIAL_STEP, SHAPE)
    assert torch.equal(x_T, same)
    whole = eng.run(torch.zeros(5), latent_shape=SHAPE, epoch=2).x0
    for chunk in (1, 3, 10):
        assert torch.equal(_engine("flow", "dpm2", chunk_size=chunk).run(torch.zeros(5), latent_shape=SHAPE,
                                                                           epoch=2).x0, whole)
    # two "ranks": contiguous blocks of rows with their own keys and groups
    parts = []
    for lo, hi in ((0, 4), (4, 10)):
        e = SolverRollout(_model, "dpm2", "v", _grid("flow", 9), keys=torch.arange(100 + lo, 100 + hi),
                          group=torch.arange(lo, hi) // 2, seed=7)
        parts.append(e.run(torch.zeros(5), latent_shape=SHAPE, epoch=2).x0)
    assert torch.equal(torch.cat(parts), whole)


def test_cfg_free_rollout_costs_exactly_half_the_nfe():
    cond, uncond = torch.randn(5), torch.zeros(1)
    free = _engine("flow", "euler", chunk_size=3).run(cond, latent_shape=SHAPE)
    guided_eng = _engine("flow", "euler", chunk_size=3, cfg_scale=4.5)
    guided = guided_eng.run(cond, uncond, latent_shape=SHAPE)
    assert guided.nfe["total"] == 2 * free.nfe["total"] == guided_eng.nfe_per_rollout == 2 * 90
    # the guided model is f_u + w (f_c - f_u), step by step
    x_T = guided_eng.initial_latents(SHAPE)
    c = cond[guided_eng.group]

    def f(x, i):
        t = guided_eng.grid.model_t[i].float().expand(x.shape[0])
        fu = _model(x, t, uncond.expand(x.shape[0]))
        return fu + 4.5 * (_model(x, t, c) - fu)

    torch.testing.assert_close(guided.x0, SV.solve(guided_eng.plan, f, x_T), rtol=1e-6, atol=1e-6)


def test_bad_arguments_are_one_line():
    with pytest.raises(ValueError, match="solver"):
        _engine("flow", "heun")
    with pytest.raises(PlanError, match="keys and group"):
        SolverRollout(_model, "euler", "v", _grid("flow", 4), keys=torch.arange(3), group=torch.arange(2))
    with pytest.raises(PlanError, match="x_init has 2 rows"):
        _engine("flow", "euler").run(x_init=torch.zeros(2, *SHAPE))


@pytest.mark.parametrize("solver, scheduler", [("euler", "FlowMatchEulerDiscreteScheduler"),
                                               ("dpm2", "DPMSolverMultistepScheduler")])
def test_tiny_sd3_matches_the_diffusers_pipeline(solver, scheduler):
    """Same transformer, prompt embeddings and latents; guidance 1 (no CFG, as the forward-process
    recipes sample); diffusers' scheduler and loop against ours, float32."""
    pytest.importorskip("diffusers")
    import diffusers

    from rsm_fast.models import build_model

    a = build_model("sd3-tiny", seed=0)
    n = 8
    base = a.scheduler.config
    if scheduler == "FlowMatchEulerDiscreteScheduler":
        sched = diffusers.FlowMatchEulerDiscreteScheduler.from_config(base)
        grid = SV.flow_grid(n, float(base.shift), "flow_match")
    else:
        sched = diffusers.DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2,
                                                      solver_type="midpoint", lower_order_final=True,
                                                      use_flow_sigmas=True, flow_shift=float(base.shift),
                                                      prediction_type="flow_prediction", final_sigmas_type="zero")
        # the same grid, but the network sees the scheduler's integer timesteps (floor(1000 t))
        sched.set_timesteps(n)
        t = SV.flow_grid(n, float(base.shift), "dpm").sigma
        grid = SV.Grid("flow", 1.0 - t, t, sched.timesteps.to(torch.float64) / 1000)
    pipe = a.pipeline()
    pipe.scheduler = sched
    prompts = ["a red cat", "two blue dogs"]
    cond = a.encode_prompts(prompts)
    pe, pooled = a.unpack(cond)
    eng = SolverRollout(a.policy, solver, "v", grid, keys=torch.arange(2), group=torch.arange(2), seed=1)
    x_T = eng.initial_latents(a.latent_shape(64, 64))
    ours = eng.run(cond, latent_shape=a.latent_shape(64, 64)).x0
    with torch.no_grad():
        theirs = pipe(prompt_embeds=pe, pooled_prompt_embeds=pooled, latents=x_T.clone(), num_inference_steps=n,
                      guidance_scale=1.0, output_type="latent", height=64, width=64).images
    torch.testing.assert_close(ours, theirs.float(), rtol=2e-4, atol=2e-4)
