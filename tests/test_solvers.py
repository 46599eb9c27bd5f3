"""rsm_fast.solvers against the diffusers schedulers they claim to be (float64), plus order of
accuracy, purity and config errors. CPU only, a few seconds."""
from __future__ import annotations

import contextlib
import math

import pytest
import torch

from rsm_fast import schedules as S
from rsm_fast import solvers as SV
from rsm_fast import transitions as TR

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # diffusers+numpy2

SHAPE = (2, 4, 3, 3)
STEPS = (10, 14, 17)
RTOL = 1e-12


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def make_model(seed: int, scale: float = 1.0):
    """A fixed smooth nonlinear map ``(x, tau) -> output`` in float64 (tau in [0, 1])."""
    g = torch.Generator().manual_seed(seed)
    C = SHAPE[1]
    W1 = torch.randn(C, C, generator=g, dtype=torch.float64) * (0.4 / math.sqrt(C))
    W2 = torch.randn(C, C, generator=g, dtype=torch.float64) * (0.8 / math.sqrt(C))
    u, b = (torch.randn(C, 1, 1, generator=g, dtype=torch.float64) for _ in range(2))
    x_ref = torch.randn(SHAPE[1:], generator=g, dtype=torch.float64)

    def f(x: torch.Tensor, tau: float) -> torch.Tensor:
        lin = torch.einsum("ij,bjhw->bihw", W1, x)
        nl = torch.tanh(torch.einsum("ij,bjhw->bihw", W2, x) + tau * u + b)
        return scale * (lin + (1.0 + 0.5 * tau) * nl + (1.0 - tau) * x_ref)

    return f


def latents(seed: int = 0) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def model_on(grid: SV.Grid, f, vp: bool = False):
    """``model(x, i)`` seeing the grid's time of step i (vp: training index / 1000)."""
    ts = grid.model_t.tolist()
    return lambda x, i: f(x, ts[i] / 1000.0 if vp else ts[i])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@contextlib.contextmanager
def keep_float64():
    """diffusers' FlowMatchEuler / DPMSolverMultistep ``step()`` cast the sample to float32 (an fp16
    safeguard); inside this block a float64 tensor ignores ``.to(float32)`` so that the float64
    comparison measures the algorithm, not that rounding."""
    orig = torch.Tensor.to

    def to(self, *args, **kwargs):
        wants32 = kwargs.get("dtype") is torch.float32 or any(a is torch.float32 for a in args)
        if wants32 and self.dtype == torch.float64:
            args = tuple(torch.float64 if a is torch.float32 else a for a in args)
            kwargs = {k: (torch.float64 if v is torch.float32 else v) for k, v in kwargs.items()}
        return orig(self, *args, **kwargs)

    torch.Tensor.to = to
    try:
        yield
    finally:
        torch.Tensor.to = orig


def diffusers_solve(sched, model, x: torch.Tensor) -> torch.Tensor:
    if hasattr(type(sched), "set_begin_index"):  # DDIM is stateless (indexes by timestep)
        sched.set_begin_index(0)
    with keep_float64():
        for i, ts in enumerate(sched.timesteps):
            x = sched.step(model(x, i), ts, x, return_dict=False)[0]
    assert x.dtype == torch.float64
    return x


def ve_sigmas(grid: SV.Grid) -> torch.Tensor:
    """diffusers' VP ``sigmas`` (= sigma / alpha), float64."""
    return grid.sigma / grid.alpha


# ----------------------------------------------------------------------------------------------
# grids reproduce diffusers' set_timesteps
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", STEPS)
def test_flow_grids_match_diffusers(n):
    D = diffusers
    fm = D.FlowMatchEulerDiscreteScheduler(shift=3.0)
    fm.set_timesteps(n)
    dpm = D.DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction")
    dpm.set_timesteps(n)
    uni = D.UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction")
    uni.set_timesteps(n)
    for conv, sched in (("flow_match", fm), ("dpm", dpm), ("unipc", uni)):
        g = SV.flow_grid(n, 3.0, conv)
        assert g.num_steps == n == len(sched.timesteps)
        torch.testing.assert_close(g.sigma, sched.sigmas.to(torch.float64), rtol=0, atol=1e-6)
        assert float(g.sigma[-1]) == 0.0
    assert torch.equal(SV.flow_grid(n, 3.0).sigma, S.rf_sigmas(n, 3.0))
    assert float(SV.flow_grid(n, 3.0, "flow_match").sigma[0]) == 1.0


@pytest.mark.parametrize("n", STEPS)
def test_vp_grid_matches_diffusers(n):
    ac = S.sd15_alphas_cumprod()
    sched = diffusers.DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    sched.set_timesteps(n)
    assert torch.equal(SV.linspace_timesteps(n), sched.timesteps)
    g = SV.vp_grid(ac, sched.timesteps)
    torch.testing.assert_close(ve_sigmas(g), sched.sigmas.to(torch.float64), rtol=1e-5, atol=0)  # diffusers: float32 cumprod


# ----------------------------------------------------------------------------------------------
# full solves == diffusers scheduler loops (float64, same model, same latents, same grid)
# ----------------------------------------------------------------------------------------------
def flow_scheduler(name: str, n: int, grid: SV.Grid):
    D = diffusers
    if name == "euler":
        s = D.FlowMatchEulerDiscreteScheduler(shift=3.0)
    elif name == "dpm2":
        s = D.DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
                                          lower_order_final=True, final_sigmas_type="zero", use_flow_sigmas=True,
                                          flow_shift=3.0, prediction_type="flow_prediction")
    else:
        s = D.UniPCMultistepScheduler(solver_order=2, solver_type="bh2", predict_x0=True, lower_order_final=True,
                                      use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction")
    s.set_timesteps(n)
    s.sigmas = grid.sigma.clone()  # the same float64 grid (diffusers stores float32)
    return s


# (solver, flow grid convention): dpm2 on "flow_match" is DiffusionNFT's exact rollout grid (t_0 = 1);
# diffusers' UniPC cannot start at t = 1 (its order-2 corrector solves a system with an inf entry),
# which is why its own grid nudges t_0; see test_unipc_pure_noise_limit.
FLOW_CASES = [("euler", "flow_match"), ("euler", "dpm"), ("dpm2", "flow_match"), ("dpm2", "dpm"),
              ("unipc", "unipc"), ("unipc", "dpm")]


@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize("name,conv", FLOW_CASES)
def test_flow_solve_equals_diffusers(name, conv, n):
    grid = SV.flow_grid(n, 3.0, conv)
    model = model_on(grid, make_model(1))
    x = latents(2)
    ours = SV.solve(SV.make_plan(name, "v", grid), model, x)
    ref = diffusers_solve(flow_scheduler(name, n, grid), model, x)
    assert rel_err(ours, ref) < RTOL


def vp_scheduler(name: str, n: int, final: str):
    D = diffusers
    kw = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type="epsilon")
    if name == "euler":
        s = D.DDIMScheduler(**kw, set_alpha_to_one=(final == "zero"), steps_offset=1, timestep_spacing="leading",
                            clip_sample=False)
    elif name == "dpm2":
        s = D.DPMSolverMultistepScheduler(**kw, algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
                                          lower_order_final=True, final_sigmas_type=final)
    else:
        s = D.UniPCMultistepScheduler(**kw, solver_order=2, solver_type="bh2", predict_x0=True,
                                      lower_order_final=True, final_sigmas_type=final)
    s.set_timesteps(n)
    return s


@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
@pytest.mark.parametrize("name", ["euler", "dpm2", "unipc"])
def test_vp_eps_solve_equals_diffusers(name, final, n):
    ac = S.sd15_alphas_cumprod()
    sched = vp_scheduler(name, n, final)
    grid = SV.vp_grid(ac, sched.timesteps, 1.0 if final == "zero" else float(ac[0]))
    if name == "euler":  # DDIM reads alphas_cumprod[t] and final_alpha_cumprod
        sched.alphas_cumprod = ac.clone()
        sched.final_alpha_cumprod = torch.tensor(1.0 if final == "zero" else float(ac[0]), dtype=torch.float64)
    else:
        sched.sigmas = ve_sigmas(grid)
    model = model_on(grid, make_model(3, scale=0.5), vp=True)
    x = latents(4)
    ours = SV.solve(SV.make_plan(name, "eps", grid), model, x)
    ref = diffusers_solve(sched, model, x)
    assert rel_err(ours, ref) < RTOL


# ----------------------------------------------------------------------------------------------
# dpm2 == DiffusionNFT's run_sampling(solver="dpm2") (flow_grpo/diffusers_patch/solver.py, dpm_step)
# ----------------------------------------------------------------------------------------------
def nft_dpm2(model, x, t):
    """Independent restatement of NFT's branch structure on their grid (SD3 scheduler sigmas):
    step 0 and the last step are DDIM(eta=0) written with (x0, eps); the rest use the 2M midpoint
    update with lambdas computed by torch.log (so lambda_0 = -inf at t = 1)."""
    n = t.shape[0] - 1
    lam = torch.log(1 - t) - torch.log(t)
    prev = None
    for i in range(n):
        s, tn = t[i], t[i + 1]
        x0 = x - s * model(x, i)
        if i == 0 or i == n - 1:
            eps = (x - (1 - s) * x0) / s
            x_new = (1 - tn) * x0 + tn * eps
        else:
            h, h0 = lam[i + 1] - lam[i], lam[i] - lam[i - 1]
            d1 = (x0 - prev) / (h0 / h)
            x_new = (tn / s) * x - (1 - tn) * torch.expm1(-h) * (x0 + 0.5 * d1)
        prev, x = x0, x_new
    return x


@pytest.mark.parametrize("n", (10, 14, 25))
def test_dpm2_equals_diffusionnft_reference(n):
    grid = SV.flow_grid(n, 3.0, "flow_match")
    model = model_on(grid, make_model(5))
    x = latents(6)
    ours = SV.solve(SV.make_plan("dpm2", "v", grid), model, x)
    assert rel_err(ours, nft_dpm2(model, x, grid.sigma)) < RTOL


# ----------------------------------------------------------------------------------------------
# consistency with the project's existing ODE transitions
# ----------------------------------------------------------------------------------------------
def test_euler_coefficients_equal_project_ode_steps():
    t = S.rf_sigmas(10, 3.0)
    plan = SV.make_plan("euler", "v", SV.Grid.from_flow_t(t))
    ode = TR.flow_ode(t)
    torch.testing.assert_close(plan.coef[:, 0, 0], ode.table("c_x_ode"), rtol=0, atol=1e-15)
    torch.testing.assert_close(plan.coef[:, 0, 1], ode.table("c_f_ode"), rtol=0, atol=1e-15)
    ac, ts = S.sd15_alphas_cumprod(), S.ddim_timesteps(1000, 10, offset=1)
    plan = SV.make_plan("euler", "eps", SV.vp_grid(ac, ts, float(ac[0])))
    ddim = TR.ddim(ac, ts, eta=0.0, final_alpha_cumprod=float(ac[0]))
    torch.testing.assert_close(plan.coef[:, 0, 0], ddim.table("c_x_ode"), rtol=1e-13, atol=0)
    torch.testing.assert_close(plan.coef[:, 0, 1], ddim.table("c_f_ode"), rtol=1e-13, atol=1e-15)


# ----------------------------------------------------------------------------------------------
# order of accuracy vs a fine (Richardson-extrapolated) Euler reference
# ----------------------------------------------------------------------------------------------
def shifted_t(n: int, a: float = 1.0, b: float = 0.0, shift: float = 3.0) -> torch.Tensor:
    """``shift(linspace(a, b, n + 1))``: every step shrinks as n grows (unlike rf_sigmas, whose last
    nonzero t stays ~0.009)."""
    return S.shift_sigmas(torch.linspace(a, b, n + 1, dtype=torch.float64), shift)


def euler_reference(f, x, m: int, a: float, b: float) -> torch.Tensor:
    def run(k):
        t, y = shifted_t(k, a, b).tolist(), x
        for i in range(k):
            y = y + (t[i + 1] - t[i]) * f(y, t[i])
        return y
    return 2 * run(2 * m) - run(m)  # Richardson: error O(1/m^2), ~1e-8 here


def errors(name, f, x, ref, ns, a, b):
    out = []
    for n in ns:
        grid = SV.Grid.from_flow_t(shifted_t(n, a, b))
        out.append(rel_err(SV.solve(SV.make_plan(name, "v", grid), model_on(grid, f), x), ref))
    return out


INTERIOR = (0.95, 0.05)  # finite lambda range: t from shift(0.95) = 0.983 down to shift(0.05) = 0.136


@pytest.fixture(scope="module")
def smooth_problem():
    f, x = make_model(7, scale=0.6), latents(8)
    return f, x, euler_reference(f, x, 2048, *INTERIOR), euler_reference(f, x, 1024, 1.0, 0.0)


# UniPC's corrector makes its interior update 3rd order, but the first-order final step
# (lower_order_final; no corrector after the last evaluation) caps the global order at 2.
@pytest.mark.parametrize("name,lo,hi", [("euler", 0.9, 1.1), ("dpm2", 1.75, 2.3), ("unipc", 1.75, 2.3)])
def test_order_of_accuracy(smooth_problem, name, lo, hi):
    f, x, ref, _ = smooth_problem
    ns = [16, 32, 64, 128]
    errs = errors(name, f, x, ref, ns, *INTERIOR)
    X = torch.stack([torch.tensor(ns, dtype=torch.float64).log2(), torch.ones(len(ns), dtype=torch.float64)], 1)
    slope = -float(torch.linalg.lstsq(X, torch.tensor(errs, dtype=torch.float64).log2()[:, None]).solution[0, 0])
    assert lo <= slope <= hi, (name, errs, slope)


def test_full_grid_convergence(smooth_problem):
    """From pure noise (t = 1, lambda = -inf) to data (t = 0, lambda = +inf) the lambda-steps next
    to either end stay ~log((k+1)/k) as N grows, so the multistep rate there is below 2 and not a
    clean power law (errors of the two ends partly cancel at some N). Check plain convergence."""
    f, x, _, ref = smooth_problem
    ns = [8, 64]
    e = {name: errors(name, f, x, ref, ns, 1.0, 0.0) for name in SV.SOLVERS}
    assert 7.0 < e["euler"][0] / e["euler"][1] < 9.0
    for name in ("dpm2", "unipc"):
        assert e[name][1] < e[name][0] / 20 and e[name][1] < e["euler"][1] / 5, e


# ----------------------------------------------------------------------------------------------
# pure-noise start for UniPC (diffusers itself gives nan there)
# ----------------------------------------------------------------------------------------------
def test_unipc_pure_noise_limit():
    t = S.rf_sigmas(14, 3.0)  # t_0 = 1 exactly
    plan = SV.make_plan("unipc", "v", SV.Grid.from_flow_t(t))
    assert bool(torch.isfinite(plan.coef).all())
    errs = []
    for delta in (1e-4, 1e-8, 1e-12):
        tn = t.clone()
        tn[0] = 1 - delta
        errs.append(float((SV.make_plan("unipc", "v", SV.Grid.from_flow_t(tn)).coef - plan.coef).abs().max()))
    assert errs[0] > errs[1] > errs[2] and errs[2] < 2e-3, errs  # converges (like 1/lambda_0^2) to the limit
    grid = SV.Grid.from_flow_t(t)
    model = model_on(grid, make_model(9))
    out = SV.solve(plan, model, latents(10))
    assert bool(torch.isfinite(out).all())


# ----------------------------------------------------------------------------------------------
# interface: purity, NFE, graph-style stepping, dtypes
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(SV.SOLVERS))
def test_step_is_pure_and_graph_path_agrees(name):
    grid = SV.flow_grid(10, 3.0, "dpm")
    plan = SV.make_plan(name, "v", grid)
    coef0 = plan.coef.clone()
    f = make_model(11)
    x = latents(12)
    state = tuple(torch.randn_like(x) for _ in plan.state_names)
    fx = f(x, 0.5)
    snap = [t.clone() for t in (x, fx, *state)]
    for i in (0, 3, 9):
        a = SV.step(plan, i, x, fx, state)
        b = SV.step(plan, i, x, fx, state)
        c = SV.apply_coef(plan.coef[i], x, fx, state)
        for u, v, w in zip((a.x_next, a.x0_hat, *a.state), (b.x_next, b.x0_hat, *b.state), (c.x_next, c.x0_hat, *c.state)):
            assert torch.equal(u, v)
            torch.testing.assert_close(u, w, rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(a.x0_hat, x - grid.sigma[i] * fx, rtol=0, atol=1e-15)
    for before, now in zip(snap, (x, fx, *state)):
        assert torch.equal(before, now)
    assert torch.equal(coef0, plan.coef)
    # one model call per step; a second solve gives bit-identical output (no hidden state)
    calls = []
    model = lambda y, i: (calls.append(i), f(y, float(grid.model_t[i])))[1]
    out1 = SV.solve(plan, model, x)
    assert calls == list(range(10)) and plan.nfe_per_step == SV.SOLVERS[name].nfe_per_step == 1
    assert torch.equal(out1, SV.solve(plan, model, x))
    assert len(SV.init_state(plan, x)) == len(plan.state_names) == plan.coef.shape[1] - 2


def test_low_precision_inputs_compute_in_float32():
    plan = SV.make_plan("unipc", "v", SV.flow_grid(6))
    x = latents(0).to(torch.bfloat16)
    st = SV.init_state(plan, x)
    assert all(s.dtype == torch.float32 for s in st)
    out = SV.step(plan, 0, x, x, st)
    assert out.x_next.dtype == torch.float32 and out.x_next.shape == x.shape


# ----------------------------------------------------------------------------------------------
# config errors: one line, naming the field
# ----------------------------------------------------------------------------------------------
def _err(fn, *args, **kw) -> str:
    with pytest.raises(ValueError) as e:
        fn(*args, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_bad_config_errors():
    g = SV.flow_grid(8)
    assert "solver" in _err(SV.make_plan, "dpm3", "v", g)
    assert "native" in _err(SV.make_plan, "dpm2", "x0", g)
    assert "native" in _err(SV.make_plan, "dpm2", "eps", g) and "grid.path" in _err(SV.make_plan, "dpm2", "eps", g)
    assert "convention" in _err(SV.flow_grid, 8, 3.0, "karras")
    assert "num_steps" in _err(SV.flow_grid, 0)
    assert "shift" in _err(SV.flow_grid, 8, -1.0)
    assert "grid" in _err(SV.make_plan, "euler", "v", SV.Grid.from_flow_t(torch.tensor([1.0, 0.5, 0.6, 0.0])))
    assert "final_alpha_cumprod" in _err(SV.vp_grid, S.sd15_alphas_cumprod(), [999, 500], 0.0)
    assert "timesteps" in _err(SV.vp_grid, S.sd15_alphas_cumprod(), [1000, 500])
    plan = SV.make_plan("dpm2", "v", g)
    x = latents(0)
    assert "step index i" in _err(SV.step, plan, 8, x, x, (x,))
    assert "state" in _err(SV.step, plan, 0, x, x, ())
