"""Deterministic ODE solvers for rollouts: ``euler``, ``dpm2`` (DiffusionNFT) and ``unipc`` (issue 19).

Every solver here is an *exponential integrator on the data prediction*. With the marginal
``x_t = alpha_t x0 + sigma_t eps`` and the half log-SNR ``lambda = log(alpha / sigma)`` the
probability-flow ODE has the exact solution (DPM-Solver++, Lu et al. 2022, eq. 9)

    x_t = (sigma_t / sigma_s) x_s + sigma_t * int_{lambda_s}^{lambda_t} e^lambda x0_hat(lambda) dlambda,

and the solvers differ only in how they interpolate ``x0_hat`` through past evaluations.
Grid ``i = 0..N`` runs from noise to data; ``h_i = lambda_{i+1} - lambda_i > 0`` and
``phi_i = 1 - exp(-h_i)``. The network's native output ``f_i`` at ``x_i`` becomes
``d_i = p_x x_i + p_f f_i``:

  * flow ``"v"`` (rectified flow, ``alpha = 1 - t``, ``sigma = t``): ``d = x - t v``;
  * VP ``"eps"`` (SD1.5 / digits-ddim): ``d = (x - sigma eps) / alpha``.

Pure noise (``alpha_0 = 0``, flow ``t = 1``) gives ``lambda_0 = -inf`` and clean data
(``sigma_N = 0``) ``lambda_N = +inf``; coefficients are then their IEEE limits
(``phi = 1``, ``1/r = 0``), never ``nan``.

Because every update is linear in ``(x, f, history)`` with coefficients that depend only on the
grid, a plan stores one host float64 matrix per step, ``coef[i]`` of shape ``[2 + K, 2 + K]``:

    [x_{i+1}, d_i, *state_{i+1}] = coef[i] @ [x_i, f_i, *state_i]    (row r = sum_c coef[i,r,c] * in_c)

``state`` is a fixed-size tuple of K tensors shaped like ``x`` (zeros before step 0), so a rollout
engine calls :func:`step` with host ``i`` (or :func:`apply_coef` with a device row, for one
CUDA graph across steps); there is no data-dependent control flow and no hidden state. Each
solver costs one network evaluation per step (``nfe_per_step = 1``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import torch
from torch import Tensor

from . import schedules as S

FLOW_CONVENTIONS = ("flow_match", "dpm", "unipc")
NATIVES = {"v": "flow", "eps": "vp"}  # native output -> the path its grid must follow


# ----------------------------------------------------------------------------------------------
# Grids
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Grid:
    """``N + 1`` grid points, noisiest first (float64, host). ``model_t[i]`` is the time the
    network sees at step i (flow: ``t`` in [0, 1]; vp: the training-timestep index)."""

    path: str        # "flow" | "vp"
    alpha: Tensor    # [N + 1]
    sigma: Tensor    # [N + 1]
    model_t: Tensor  # [N]

    @property
    def num_steps(self) -> int:
        return int(self.alpha.shape[0]) - 1

    @staticmethod
    def from_flow_t(t) -> "Grid":
        """Rectified-flow grid from times ``t_0 > ... > t_N`` (``alpha = 1 - t``, ``sigma = t``)."""
        t = torch.as_tensor(t, dtype=torch.float64).flatten()
        return Grid("flow", 1.0 - t, t.clone(), t[:-1].clone())

    @staticmethod
    def from_alphas_cumprod(abar, model_t) -> "Grid":
        """VP grid from ``alpha_bar`` at the N + 1 points (``alpha = sqrt(abar)``, ``sigma = sqrt(1 - abar)``)."""
        ab = torch.as_tensor(abar, dtype=torch.float64).flatten()
        return Grid("vp", ab.sqrt(), (1.0 - ab).sqrt(), torch.as_tensor(model_t, dtype=torch.float64).flatten())


def flow_grid(num_steps: int, shift: float = 3.0, convention: str = "flow_match",
              num_train_timesteps: int = 1000) -> Grid:
    """SD3-shifted flow grid ``t' = shift t / (1 + (shift - 1) t)`` ending at ``t_N = 0``, as built by
    the diffusers scheduler's ``set_timesteps`` (diffusers 0.42, float64 here instead of float32):

    * ``"flow_match"``: ``FlowMatchEulerDiscreteScheduler(shift=shift)`` == :func:`schedules.rf_sigmas`
      (starts at exactly ``t = 1``; last nonzero ``t`` stays ~0.009 for shift 3 as N grows). This is
      the grid of SD3.5-M pipelines and of DiffusionNFT's ``dpm2`` rollouts.
    * ``"dpm"``: ``DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=shift)``:
      ``shift(linspace(1 - 1/T, 0, N + 1))`` (starts just below 1).
    * ``"unipc"``: ``UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=shift)``:
      ``shift(linspace(1, 1/T, N + 1)[:-1])`` with ``t_0 -= 1e-6`` when ``|t_0 - 1| < 1e-6``, then 0.
    """
    if int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift!r}")
    T = int(num_train_timesteps)
    if convention == "flow_match":
        t = S.rf_sigmas(num_steps, shift, T)
    elif convention == "dpm":
        t = S.shift_sigmas(torch.linspace(1.0 - 1.0 / T, 0.0, num_steps + 1, dtype=torch.float64), shift)
    elif convention == "unipc":
        t = S.shift_sigmas(torch.linspace(1.0, 1.0 / T, num_steps + 1, dtype=torch.float64)[:-1], shift)
        if abs(float(t[0]) - 1.0) < 1e-6:
            t[0] -= 1e-6
        t = torch.cat([t, t.new_zeros(1)])
    else:
        raise ValueError(f"convention must be one of {FLOW_CONVENTIONS}, got {convention!r}")
    return Grid.from_flow_t(t)


def vp_grid(alphas_cumprod: Tensor, timesteps, final_alpha_cumprod: float = 1.0) -> Grid:
    """VP grid at training indices ``timesteps`` (noisiest first) plus a final point with
    ``alpha_bar = final_alpha_cumprod``: 1.0 (clean data; diffusers ``final_sigmas_type="zero"``,
    DDIM ``set_alpha_to_one=True``) or ``alphas_cumprod[0]`` (``"sigma_min"`` / SD1.5 DDIM)."""
    ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    ts = torch.as_tensor(timesteps).to(torch.long).flatten()
    if ts.numel() < 1 or int(ts.min()) < 0 or int(ts.max()) >= ac.shape[0]:
        raise ValueError(f"timesteps must be non-empty indices into alphas_cumprod[0..{ac.shape[0] - 1}]")
    if not 0.0 < final_alpha_cumprod <= 1.0:
        raise ValueError(f"final_alpha_cumprod must be in (0, 1], got {final_alpha_cumprod!r}")
    ab = torch.cat([ac[ts], torch.tensor([float(final_alpha_cumprod)], dtype=torch.float64)])
    return Grid.from_alphas_cumprod(ab, ts.to(torch.float64))


def linspace_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> Tensor:
    """diffusers ``timestep_spacing="linspace"`` (DPMSolver/UniPC default): round(linspace(0, T-1, N+1)) reversed, minus 0."""
    ts = torch.linspace(0, num_train_timesteps - 1, num_steps + 1, dtype=torch.float64).round().flip(0)[:-1]
    return ts.to(torch.long)


# ----------------------------------------------------------------------------------------------
# Per-step coefficients (host float64). A "form" is a list of floats over the inputs [x, f, *state].
# ----------------------------------------------------------------------------------------------
def _lam(a: float, s: float) -> float:
    return -math.inf if a == 0.0 else (math.inf if s == 0.0 else math.log(a) - math.log(s))


def _comb(*terms) -> list[float]:
    """``sum c * form`` over (c, form) pairs; zero coefficients are skipped (no 0 * inf)."""
    out = [0.0] * len(terms[0][1])
    for c, form in terms:
        if c != 0.0:
            out = [o + c * v for o, v in zip(out, form)]
    return out


class _Ctx:
    """Host view of step i: ``a``/``s``/``lam`` lists, unit forms ``e(name)`` and ``d`` (= d_i)."""

    def __init__(self, a: list[float], s: list[float], lam: list[float], native: str, state: tuple[str, ...], i: int):
        self.i, self.N = i, len(a) - 1
        self.a, self.s, self.lam = a, s, lam
        self.names = ("x", "f") + state
        ai, si = a[i], s[i]
        p_x, p_f = (1.0, -si) if native == "v" else (1.0 / ai, -si / ai)
        self.d = _comb((p_x, self.e("x")), (p_f, self.e("f")))

    def e(self, name: str) -> list[float]:
        return [1.0 if n == name else 0.0 for n in self.names]

    def h(self, j: int) -> float:  # lambda_{j+1} - lambda_j  (inf - (-inf) = inf is fine)
        return self.lam[j + 1] - self.lam[j]

    def first_order(self, j: int, x: list[float], d: list[float]) -> list[float]:
        """DDIM / DPM-Solver++(1): ``x_{j+1} = (sigma_{j+1}/sigma_j) x_j + alpha_{j+1} phi_j d_j``."""
        return _comb((self.s[j + 1] / self.s[j], x), (self.a[j + 1] * -math.expm1(-self.h(j)), d))


def _euler(c: _Ctx) -> tuple[list[float], tuple]:
    """First-order step every time. Flow: exactly ``x_{i+1} = x_i + (t_{i+1} - t_i) v_i``
    (FlowMatchEulerDiscreteScheduler); VP eps: DDIM with eta = 0 (``DDIMScheduler``)."""
    return c.first_order(c.i, c.e("x"), c.d), ()


# Provenance of "dpm2" (github.com/NVlabs/DiffusionNFT @ 24af555, read, not copied):
#  * config/nft.py `_get_config`: sample.solver = "dpm2", sample.deterministic = True, num_steps = 10 (SD3.5-M).
#  * flow_grpo/diffusers_patch/pipeline_with_logprob.py `pipeline_with_logprob`: the grid is the SD3
#    FlowMatchEuler scheduler's `sigmas` (shift 3, t_0 = 1, t_N = 0), i.e. flow_grid(N, 3, "flow_match").
#  * flow_grpo/diffusers_patch/solver.py `run_sampling`: order = last char of the name (2);
#    `dpm_step`: DDIM (`ddim_update`, eta 0) at step 0 and at the last step, otherwise
#    `multistep_dpm_solver_second_order_update` (the midpoint 2M formula below);
#    `convert_model_output`: d = x - t v; `_sigma_to_alpha_sigma_t`: alpha = 1 - t, sigma = t.
def _dpm2(c: _Ctx) -> tuple[list[float], tuple]:
    """DPM-Solver++(2M), "midpoint" form, with ``r_i = h_{i-1} / h_i``:

        x_{i+1} = (sigma_{i+1}/sigma_i) x_i + alpha_{i+1} phi_i [(1 + 1/(2 r_i)) d_i - d_{i-1} / (2 r_i)],

    first order at i = 0 (no history) and at the last step when ``sigma_N = 0`` or ``N < 15``
    (diffusers ``lower_order_final=True``, ``euler_at_final=False``). From pure noise
    (``lambda_0 = -inf``) the step i = 1 has ``1/r = 0``: first order too.
    """
    i, N = c.i, c.N
    if i == 0 or (i == N - 1 and (c.s[N] == 0.0 or N < 15)):
        return c.first_order(i, c.e("x"), c.d), (c.d,)
    inv_r = c.h(i) / c.h(i - 1)  # 0 when h_{i-1} = inf
    w = c.a[i + 1] * -math.expm1(-c.h(i))
    x_next = _comb((c.s[i + 1] / c.s[i], c.e("x")), (w * (1 + 0.5 * inv_r), c.d), (-w * 0.5 * inv_r, c.e("d_prev")))
    return x_next, (c.d,)


def _unipc_order(i: int, N: int) -> int:
    """Predictor order p_i of UniPC-2 with warm-up and ``lower_order_final``: min(2, N - i, i + 1)."""
    return min(2, N - i, i + 1)


def _unipc(c: _Ctx) -> tuple[list[float], tuple]:
    """UniPC-2 with B(h) = expm1(-h) ("bh2") on the data prediction (Zhao et al. 2023).

    Corrector UniC at i >= 1 (order q = p_{i-1}); uses d_i, which was evaluated at the
    *uncorrected* x_i, ``h = lambda_i - lambda_{i-1}``, ``B = expm1(-h)``:

        x_i^c = (sigma_i/sigma_{i-1}) x_{i-1}^c - alpha_i B d_{i-1} - alpha_i B [rho_1 D_1 + rho_2 (d_i - d_{i-1})],

    q = 1: ``rho_1 = 0``, ``rho_2 = 1/2``; q = 2: ``r = (lambda_{i-2} - lambda_{i-1})/h``,
    ``D_1 = (d_{i-2} - d_{i-1})/r`` and ``[[1, 1], [r, 1]] rho = [b_1, b_2]`` with
    ``g_1 = B/(-h) - 1``, ``g_2 = g_1/(-h) - 1/2``, ``b_k = k! g_k / B``.
    Predictor UniP of order p_i from the corrected point (``B = expm1(-h_i)``):

        x_{i+1} = (sigma_{i+1}/sigma_i) x_i^c - alpha_{i+1} B d_i - [p_i = 2] alpha_{i+1} B (d_{i-1} - d_i) / (2 r'),

    ``r' = (lambda_{i-1} - lambda_i)/h_i``. For bh2 this predictor *is* DPM-Solver++(2M); the
    corrector is what differs. State: ``(x_prev = x_i^c, d_prev = d_i, d_prev2 = d_{i-1})``.
    """
    i, N = c.i, c.N
    x, dp, dp2 = c.e("x"), c.e("d_prev"), c.e("d_prev2")
    xc = x
    if i >= 1:
        h = c.lam[i] - c.lam[i - 1]
        B = math.expm1(-h)
        base = ((c.s[i] / c.s[i - 1], c.e("x_prev")), (-c.a[i] * B, dp))
        if _unipc_order(i - 1, N) == 1:
            xc = _comb(*base, (-c.a[i] * B * 0.5, _comb((1.0, c.d), (-1.0, dp))))
        else:
            r = (c.lam[i - 2] - c.lam[i - 1]) / h
            g1 = B / -h - 1.0
            g2 = g1 / -h - 0.5
            b1, b2 = g1 / B, 2.0 * g2 / B
            rho1 = (b1 - b2) / (1.0 - r)  # 0 when r = -inf (history at pure noise)
            rho2 = b1 - rho1
            xc = _comb(*base, (-c.a[i] * B * rho1 / r, _comb((1.0, dp2), (-1.0, dp))),
                       (-c.a[i] * B * rho2, _comb((1.0, c.d), (-1.0, dp))))
    B = math.expm1(-c.h(i))
    x_next = _comb((c.s[i + 1] / c.s[i], xc), (-c.a[i + 1] * B, c.d))
    if _unipc_order(i, N) == 2:
        r = (c.lam[i - 1] - c.lam[i]) / c.h(i)
        x_next = _comb((1.0, x_next), (-c.a[i + 1] * B * 0.5 / r, _comb((1.0, dp), (-1.0, c.d))))
    return x_next, (xc, c.d, dp)


@dataclass(frozen=True)
class Solver:
    name: str
    order: int                # observed global order on grids of finite lambda range (t in (0, 1))
    state: tuple[str, ...]    # names of the K history tensors
    diffusers: str            # the diffusers scheduler configuration this solver equals
    build: Callable[[_Ctx], tuple]
    nfe_per_step: int = 1


SOLVERS: dict[str, Solver] = {
    "euler": Solver("euler", 1, (), "FlowMatchEulerDiscreteScheduler (v) / DDIMScheduler(eta=0) (eps)", _euler),
    "dpm2": Solver("dpm2", 2, ("d_prev",),
                   "DPMSolverMultistepScheduler(algorithm_type='dpmsolver++', solver_order=2, solver_type='midpoint', "
                   "lower_order_final=True, final_sigmas_type='zero')", _dpm2),
    "unipc": Solver("unipc", 2, ("x_prev", "d_prev", "d_prev2"),
                    "UniPCMultistepScheduler(solver_order=2, solver_type='bh2', predict_x0=True, "
                    "lower_order_final=True, disable_corrector=[])", _unipc),
}


# ----------------------------------------------------------------------------------------------
# Plans and stepping
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Plan:
    """Everything a rollout needs: ``coef[i]`` maps ``[x_i, f_i, *state]`` to ``[x_{i+1}, d_i, *state']``."""

    solver: Solver
    native: str
    grid: Grid
    coef: Tensor  # [N, 2 + K, 2 + K] float64, host

    @property
    def num_steps(self) -> int:
        return self.grid.num_steps

    @property
    def nfe_per_step(self) -> int:
        return self.solver.nfe_per_step

    @property
    def state_names(self) -> tuple[str, ...]:
        return self.solver.state


def _check_grid(grid: Grid) -> None:
    a, s = grid.alpha, grid.sigma
    if a.dim() != 1 or a.shape != s.shape or a.shape[0] < 2 or grid.model_t.shape[0] != a.shape[0] - 1:
        raise ValueError("grid.alpha/grid.sigma must be 1-D of equal length N + 1 >= 2 (model_t of length N)")
    if not bool(torch.isfinite(a).all() & torch.isfinite(s).all() & (a >= 0).all() & (s >= 0).all()):
        raise ValueError("grid.alpha and grid.sigma must be finite and >= 0")
    bad = (a[1:] * s[:-1] <= a[:-1] * s[1:]).nonzero()  # lambda must strictly increase (noise -> data)
    if bad.numel():
        raise ValueError(f"grid must run noise -> data with strictly increasing alpha/sigma; violated at step {int(bad[0])}")


def make_plan(solver: str, native: str, grid: Grid) -> Plan:
    """Host-side coefficient tables for ``solver`` with a network of output kind ``native`` on ``grid``."""
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {sorted(SOLVERS)}, got {solver!r}")
    if native not in NATIVES:
        raise ValueError(f"native must be 'v' (flow velocity) or 'eps' (VP epsilon), got {native!r}")
    if NATIVES[native] != grid.path:
        raise ValueError(f"native {native!r} needs a {NATIVES[native]} grid, got grid.path={grid.path!r}")
    _check_grid(grid)
    spec = SOLVERS[solver]
    a, s = grid.alpha.tolist(), grid.sigma.tolist()
    lam = [_lam(ai, si) for ai, si in zip(a, s)]
    rows = []
    for i in range(grid.num_steps):
        ctx = _Ctx(a, s, lam, native, spec.state, i)
        x_next, new_state = spec.build(ctx)
        rows.append([x_next, ctx.d, *new_state])
    coef = torch.tensor(rows, dtype=torch.float64)
    if not bool(torch.isfinite(coef).all()):  # pragma: no cover - guarded by the limits above
        raise ValueError(f"grid gives non-finite {solver} coefficients")
    return Plan(spec, native, grid, coef)


class StepOut(NamedTuple):
    x_next: Tensor
    x0_hat: Tensor             # d_i, the data prediction at the (uncorrected) input x_i
    state: tuple[Tensor, ...]


def _dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def init_state(plan: Plan, x: Tensor) -> tuple[Tensor, ...]:
    """Zero history (its step-0 coefficients are 0), in the compute dtype (float32 unless x is float64)."""
    dt = _dtype([x])
    return tuple(torch.zeros_like(x, dtype=dt) for _ in plan.state_names)


def _check_state(k: int, state: Sequence[Tensor]) -> None:
    if len(state) != k:
        raise ValueError(f"state must hold {k} tensors, got {len(state)}")


def step(plan: Plan, i: int, x: Tensor, f: Tensor, state: Sequence[Tensor]) -> StepOut:
    """One solver step with host step index ``i`` (coefficients are Python floats; zero terms skipped).

    Computes in float32 (float64 if any input is float64); outputs are in that dtype. Pure."""
    if not 0 <= int(i) < plan.num_steps:
        raise ValueError(f"step index i must be in [0, {plan.num_steps}), got {i}")
    _check_state(len(plan.state_names), state)
    ins = (x, f, *state)
    dt = _dtype(ins)
    outs = []
    for row in plan.coef[int(i)].tolist():
        acc = None
        for c, t in zip(row, ins):
            if c != 0.0:
                term = t.to(dt) * c
                acc = term if acc is None else acc + term
        outs.append(torch.zeros_like(x, dtype=dt) if acc is None else acc)
    return StepOut(outs[0], outs[1], tuple(outs[2:]))


def apply_coef(coef_i: Tensor, x: Tensor, f: Tensor, state: Sequence[Tensor]) -> StepOut:
    """Graph-friendly step: ``coef_i`` is ``plan.coef[i]`` already on the device (e.g. a gathered
    row of ``plan.coef.to(device)``), so one captured graph serves every step. No skipping."""
    ins = (x, f, *state)
    _check_state(coef_i.shape[-1] - 2, state)
    dt = _dtype(ins)
    c = coef_i.to(dt)
    outs = []
    for r in range(c.shape[0]):
        acc = ins[0].to(dt) * c[r, 0]
        for k in range(1, len(ins)):
            acc = acc + ins[k].to(dt) * c[r, k]
        outs.append(acc)
    return StepOut(outs[0], outs[1], tuple(outs[2:]))


def solve(plan: Plan, model: Callable[[Tensor, int], Tensor], x: Tensor, return_trajectory: bool = False):
    """Reference rollout: ``f_i = model(x_i, i)`` then :func:`step`, for i = 0..N-1 (N evaluations).
    Returns the final sample, or ``(x_N, [x_0, ..., x_N])``."""
    state = init_state(plan, x)
    traj = [x]
    for i in range(plan.num_steps):
        x, _, state = step(plan, i, x, model(x, i), state)
        traj.append(x)
    return (x, traj) if return_trajectory else x
