"""Reverse transition kernels ``pi(x' | x) = N(c_x x + c_f f, sigma^2 I)`` (spec §2).

Every sampler used by the field is Gaussian with a mean that is *affine in the network's
native output* ``f`` (epsilon for DDIM, velocity for rectified flow). One table-driven class,
:class:`GaussianTransition`, therefore serves DDIM-eta, the Flow-GRPO SDE, the DanceGRPO SDE
and the ODE steps; the factories below only fill its per-step tables (float64, host-built once).

Per-row use: ``coeffs = transition.coeffs(step_idx)`` gathers the tables by a ``[B]`` index
tensor (rows may sit at different steps) and returns :class:`StepCoeffs`, whose methods give the
mean, the sampled step for a *given* noise ``z``, the Gaussian log-prob, the native-space
log-ratio (§2.5) and the KL to a reference. No method reads a tensor back to the host.

Score-space view (spec §2.1): ``mu = a x + b s`` with ``s`` the score, ``Sigma = sigma^2``,
``lambda = ds/df`` and the native weight ``omega = |lambda| b / sigma = -c_f / sigma``.

Numerics: coefficients and all log-prob / ratio / KL math are evaluated in float32 (float64
when the inputs are float64), whatever the model's dtype. Reductions over latent dims are
means by default (the field's convention: ddpo, flow_grpo and RSM all ``.mean()``), ``"sum"`` on
request; with ``"mean"`` every quantity here is the per-dimension value.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from . import schedules as S

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)
_TABLE_NAMES = ("t", "t_next", "alpha", "sigma_t", "dt", "c_x", "c_f", "sigma", "c_x_ode", "c_f_ode",
                "a", "b", "lam", "omega", "p_x", "p_s")


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (log-prob math never runs in bf16/fp16)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def reduce_latent(v: Tensor, reduce: str = "mean") -> Tensor:
    """Reduce ``[B, ...] -> [B]`` over all latent dims."""
    if v.dim() == 1:
        return v
    if reduce == "mean":
        return v.flatten(1).mean(1)
    if reduce == "sum":
        return v.flatten(1).sum(1)
    raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")


def rowwise(c: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-row ``[B]`` scalar to broadcast against ``like`` of shape ``[B, ...]``."""
    return c.reshape(c.shape[0], *([1] * (like.dim() - 1)))


@dataclass(frozen=True)
class StepCoeffs:
    """Per-row coefficients of one transition; every field is a ``[B]`` tensor."""

    t: Tensor          # current time (VP: train-timestep index as float; RF: t in [0, 1])
    t_next: Tensor
    alpha: Tensor      # marginal alpha_t, sigma_t of the current state
    sigma_t: Tensor
    dt: Tensor         # step length in the family's continuous time (RF: t - t'; VP: (t - t')/T)
    c_x: Tensor        # mean = c_x x + c_f f
    c_f: Tensor
    sigma: Tensor      # transition std (0 on deterministic rows)
    a: Tensor          # score form: mean = a x + b s
    b: Tensor
    lam: Tensor        # lambda(t) = ds/df
    omega: Tensor      # native weight of the stochastic kernel at this step (also on ODE rows)
    p_x: Tensor        # f = p_x x + p_s s
    p_s: Tensor
    stochastic: Tensor  # bool: row is sampled with noise (has a log-prob)

    @property
    def Sigma(self) -> Tensor:
        return self.sigma**2

    def _r(self, name: str, like: Tensor) -> Tensor:
        return rowwise(getattr(self, name), like)

    # -- sampling -------------------------------------------------------------------------
    def mean(self, x: Tensor, f: Tensor) -> Tensor:
        dt = compute_dtype(x, f, self.c_x)
        return self._r("c_x", x).to(dt) * x.to(dt) + self._r("c_f", x).to(dt) * f.to(dt)

    def step(self, x: Tensor, f: Tensor, z: Tensor) -> Tensor:
        """``x' = mean + sigma z`` for the given noise ``z`` (pass zeros for an ODE step)."""
        mu = self.mean(x, f)
        return mu + self._r("sigma", x).to(mu.dtype) * z.to(mu.dtype)

    # -- densities ------------------------------------------------------------------------
    def _safe_sigma(self, like: Tensor) -> Tensor:
        s = self._r("sigma", like)
        return torch.where(s > 0, s, torch.ones_like(s))

    def log_prob(self, x_next: Tensor, x: Tensor, f: Tensor, reduce: str = "mean") -> Tensor:
        """``log N(x'; mean, sigma^2 I)`` per row (per-dim mean by default); 0 on ODE rows."""
        mu = self.mean(x, f)
        sig = self._safe_sigma(mu).to(mu.dtype)
        lp = -((x_next.to(mu.dtype) - mu) ** 2) / (2.0 * sig**2) - torch.log(sig) - _LOG_SQRT_2PI
        return torch.where(self.stochastic, reduce_latent(lp, reduce), torch.zeros((), dtype=mu.dtype))

    def log_ratio(self, f_new: Tensor, f_old: Tensor, z: Tensor, reduce: str = "mean") -> Tensor:
        """``log pi_new(x'|x) - log pi_old(x'|x)`` for ``x' = mean_old + sigma z`` (spec §2.5):
        ``-omega (df . z) - 0.5 omega^2 |df|^2`` with ``df = f_new - f_old``. 0 on ODE rows."""
        dt = compute_dtype(f_new, f_old, self.omega)
        w = self._r("omega", f_new).to(dt)
        wdf = w * (f_new.to(dt) - f_old.to(dt))
        lr = -reduce_latent(wdf * z.to(dt), reduce) - 0.5 * reduce_latent(wdf**2, reduce)
        return torch.where(self.stochastic, lr, torch.zeros((), dtype=dt))

    def kl(self, f: Tensor, f_ref: Tensor, reduce: str = "mean") -> Tensor:
        """``KL(pi_f || pi_ref) = 0.5 omega^2 |f - f_ref|^2`` (shared covariance).

        Evaluated with the step's stochastic-kernel weight also on ODE rows, where it is the
        ODE-row "KL anchor" of spec §5.1 rather than a true KL."""
        dt = compute_dtype(f, f_ref, self.omega)
        wdf = self._r("omega", f).to(dt) * (f.to(dt) - f_ref.to(dt))
        return 0.5 * reduce_latent(wdf**2, reduce)

    # -- parameterisation ----------------------------------------------------------------
    def to_score(self, f: Tensor, x: Tensor) -> Tensor:
        return (f - self._r("p_x", x) * x) / self._r("p_s", x)

    def from_score(self, s: Tensor, x: Tensor) -> Tensor:
        return self._r("p_x", x) * x + self._r("p_s", x) * s

    def x0_hat(self, f: Tensor, x: Tensor) -> Tensor:
        """Tweedie estimate of x0 from the native output."""
        return S.tweedie_x0(x, self.to_score(f, x), self._r("alpha", x), self._r("sigma_t", x))


class GaussianTransition:
    """A sampler's per-step tables; ``coeffs(idx)`` gathers them per row.

    ``sde_mask[i]`` says whether step ``i`` samples with noise by default (stochasticity
    localisation: MixGRPO windows, TempFlow ODE trunks); ``coeffs(idx, stochastic=...)``
    overrides it per row (e.g. branching children on an ODE trunk).
    """

    def __init__(self, name: str, native: str, tables: dict[str, Tensor], sde_mask: Tensor | None = None):
        missing = [k for k in _TABLE_NAMES if k not in tables]
        if missing:
            raise ValueError(f"transition tables missing {missing}")
        self.name, self.native = name, native
        self.num_steps = int(tables["t"].shape[0])
        self._host = {k: tables[k].to(torch.float64) for k in _TABLE_NAMES}
        mask = (self._host["sigma"] > 0) if sde_mask is None else sde_mask.to(torch.bool)
        if mask.shape != (self.num_steps,):
            raise ValueError(f"sde_mask must have shape ({self.num_steps},), got {tuple(mask.shape)}")
        self._host_mask = mask & (self._host["sigma"] > 0)
        self._cache: dict[tuple, tuple[dict[str, Tensor], Tensor]] = {}

    def table(self, name: str) -> Tensor:
        """Host float64 copy of one per-step table (for reporting, allocators, tests)."""
        return self._host[name].clone()

    @property
    def sde_mask(self) -> Tensor:
        return self._host_mask.clone()

    def with_sde_mask(self, mask) -> "GaussianTransition":
        return GaussianTransition(self.name, self.native, self._host, torch.as_tensor(mask, dtype=torch.bool))

    def _device_tables(self, device: torch.device, dtype: torch.dtype):
        key = (str(device), dtype)
        if key not in self._cache:
            self._cache[key] = ({k: v.to(device=device, dtype=dtype) for k, v in self._host.items()},
                                self._host_mask.to(device))
        return self._cache[key]

    def coeffs(self, idx: Tensor, stochastic: Tensor | None = None, dtype: torch.dtype = torch.float32) -> StepCoeffs:
        """Per-row coefficients for step indices ``idx`` (``[B]`` long, on the target device)."""
        tabs, mask = self._device_tables(idx.device, dtype)
        g = {k: v.index_select(0, idx) for k, v in tabs.items()}
        stoch = mask.index_select(0, idx) if stochastic is None else stochastic.to(torch.bool) & (g["sigma"] > 0)
        det = ~stoch
        out = dict(g)
        out["c_x"] = torch.where(det, g["c_x_ode"], g["c_x"])
        out["c_f"] = torch.where(det, g["c_f_ode"], g["c_f"])
        out["sigma"] = torch.where(det, torch.zeros_like(g["sigma"]), g["sigma"])
        del out["c_x_ode"], out["c_f_ode"]
        return StepCoeffs(stochastic=stoch, **out)

    def coeffs_at(self, i: int, batch: int, device="cpu", dtype=torch.float32, stochastic: bool | None = None) -> StepCoeffs:
        """Convenience: all ``batch`` rows at the same step ``i``."""
        idx = torch.full((batch,), int(i), dtype=torch.long, device=device)
        st = None if stochastic is None else torch.full((batch,), bool(stochastic), device=device)
        return self.coeffs(idx, st, dtype)


# ---------------------------------------------------------------------------------------------
# Factories
# ---------------------------------------------------------------------------------------------
def ddim(alphas_cumprod: Tensor, timesteps: Tensor, eta: float = 1.0, final_alpha_cumprod: float = 1.0,
         variance: str = "ddpm", uw_weight: float = 4.5) -> GaussianTransition:
    """DDIM with eta on a VP schedule, epsilon prediction (spec §2.2; ddpo's ``ddim_step_with_logprob``).

    ``timesteps``: training indices, noisiest first; step i goes ``timesteps[i] -> timesteps[i+1]``
    and the last step to ``final_alpha_cumprod`` (1.0: to clean data as in the RSM toy; SD1.5 runs
    use ``alphas_cumprod[0]``). ``variance="uw_sigma"`` is PCPO's schedule (plus root of
    ``(c1 + sqrt(1 - ab_prev - sigma^2))/sigma = w``, then times eta), whose true native weight is
    *not* constant (spec §2.2 warns); ``omega`` here is always the sampler's true weight.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    ac = alphas_cumprod.to(torch.float64)
    ts = timesteps.to(torch.long)
    T = ac.shape[0]
    ab = ac[ts]
    ab_prev = torch.cat([ac[ts[1:]], torch.tensor([final_alpha_cumprod], dtype=torch.float64)])
    c1 = torch.sqrt(ab_prev * (1 - ab) / ab)
    if variance == "ddpm":
        sig = eta * torch.sqrt((1 - ab_prev) / (1 - ab)) * torch.sqrt(torch.clamp(1 - ab / ab_prev, min=0.0))
    elif variance == "uw_sigma":
        w = uw_weight
        sig = eta * (w * c1 + torch.sqrt(torch.clamp((1 + w * w) * (1 - ab_prev) - c1**2, min=0.0))) / (1 + w * w)
    else:
        raise ValueError(f"DDIM variance must be 'ddpm' or 'uw_sigma', got {variance!r}")
    c2 = torch.sqrt(torch.clamp(1 - ab_prev - sig**2, min=0.0))
    c2_ode = torch.sqrt(1 - ab_prev)
    sqrt_1mab = torch.sqrt(1 - ab)
    c_x = torch.sqrt(ab_prev / ab)
    c_f = -(c1 - c2)
    p_x, p_s = S.native_affine("eps", torch.sqrt(ab), sqrt_1mab)
    omega = torch.where(sig > 0, (c1 - c2) / torch.where(sig > 0, sig, torch.ones_like(sig)), torch.zeros_like(sig))
    # the last step's nominal end is one stride past the last index (toy: 9 -> -1; SD1.5: 1 -> -19),
    # so dt (used by dt-weighted KL / Guard reweighting) is the nominal stride whatever the final alpha_bar
    stride = float(ts[-2] - ts[-1]) if ts.shape[0] > 1 else float(ts[-1] + 1)
    t_next = torch.cat([ts[1:].to(torch.float64), torch.tensor([float(ts[-1]) - stride], dtype=torch.float64)])
    tables = dict(
        t=ts.to(torch.float64), t_next=t_next, alpha=torch.sqrt(ab), sigma_t=sqrt_1mab,
        dt=(ts.to(torch.float64) - t_next) / T,
        c_x=c_x, c_f=c_f, sigma=sig, c_x_ode=c_x, c_f_ode=-(c1 - c2_ode),
        a=c_x, b=sqrt_1mab * (c1 - c2), lam=1.0 / p_s, omega=omega, p_x=p_x, p_s=p_s,
    )
    return GaussianTransition(f"ddim(eta={eta},{variance})", "eps", tables)


def _flow(name: str, sigmas: Tensor, noise: Tensor) -> GaussianTransition:
    """Shared Euler-SDE tables for rectified flow, velocity prediction.

    ``noise[i]`` is the SDE's g at step i (Flow-GRPO: a*sqrt(t/(1-t)); Dance: eta). Mean
    ``x(1 - g^2 dt/(2t)) - v(1 + g^2 (1-t)/(2t)) dt``; std ``g sqrt(dt)``.
    At t = 1 the score form is singular (lambda = 0); following spec §2.3 we take
    ``1 - t := 1 - t_max`` (t_max = sigmas[1]) inside a, b, p_x, p_s only.
    """
    sg = sigmas.to(torch.float64)
    t, t_next = sg[:-1], sg[1:]
    dt = t - t_next
    t_max = sg[1] if sg.shape[0] > 1 else sg[0]
    one_m_t = torch.where(t < 1, 1 - t, 1 - t_max)
    g2 = noise.to(torch.float64) ** 2
    c_x = 1 - g2 * dt / (2 * t)
    c_f = -(1 + g2 * (1 - t) / (2 * t)) * dt
    sig = torch.sqrt(g2 * dt)
    omega = torch.where(sig > 0, -c_f / torch.where(sig > 0, sig, torch.ones_like(sig)), torch.zeros_like(sig))
    p_x, p_s = -1.0 / one_m_t, -t / one_m_t
    tables = dict(
        t=t, t_next=t_next, alpha=1 - t, sigma_t=t, dt=dt,
        c_x=c_x, c_f=c_f, sigma=sig, c_x_ode=torch.ones_like(t), c_f_ode=-dt,
        a=1 + dt / one_m_t, b=dt * (t / one_m_t + g2 / 2), lam=-(1 - t) / t, omega=omega, p_x=p_x, p_s=p_s,
    )
    return GaussianTransition(name, "v", tables)


def flow_grpo_sde(sigmas: Tensor, noise_level: float = 0.7) -> GaussianTransition:
    """Flow-GRPO Euler SDE (spec §2.3; flow_grpo ``sde_step_with_logprob``).

    ``sigma_tilde_t = a sqrt(t / (1 - t))`` with ``t -> t_max = sigmas[1]`` in the denominator at
    t = 1. Defaults: a = 0.7 for SD3.5-M (flow_grpo config), 0.9 for FLUX.
    """
    if noise_level < 0:
        raise ValueError(f"noise_level must be >= 0, got {noise_level}")
    sg = sigmas.to(torch.float64)
    t = sg[:-1]
    t_max = sg[1] if sg.shape[0] > 1 else sg[0]
    denom = torch.where(t < 1, 1 - t, 1 - t_max)
    return _flow(f"flow_grpo_sde(a={noise_level})", sg, noise_level * torch.sqrt(t / denom))


def dance_sde(sigmas: Tensor, eta: float = 0.3) -> GaussianTransition:
    """DanceGRPO SDE (spec §2.4; DanceGRPO ``flux_step``): g = eta, std ``eta sqrt(dt)``."""
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    sg = sigmas.to(torch.float64)
    return _flow(f"dance_sde(eta={eta})", sg, torch.full_like(sg[:-1], float(eta)))


def flow_ode(sigmas: Tensor) -> GaussianTransition:
    """Deterministic Euler step ``x' = x - v dt`` (no native weight: omega = 0)."""
    sg = sigmas.to(torch.float64)
    return _flow("flow_ode", sg, torch.zeros_like(sg[:-1]))


def coeff_fields() -> tuple[str, ...]:
    return tuple(f.name for f in fields(StepCoeffs))


def pcpo_target(tr: GaussianTransition, kind: str = "dt") -> Tensor:
    """PCPO-reweight's target native weight omega' per step, float64 (spec §5.3; [UNCERTAIN] zeta: we
    recompute zeta = sum(omega)/sum(dt) over the schedule in use instead of the released 4.3152; the
    diffusion form ``kind="const"``'s constant omega' is the mean omega, spec §12.3).

    The flow form's sums run over the noisy steps the release trains: every SDE step but the final
    transition into the clean sample (flow_grpo trains 9 of SD3's 10; that last step's tiny dt,
    0.0089 with omega 1.77, would otherwise lift zeta from 3.970 to 5.705 on SD3's 10-step schedule)."""
    steps = torch.arange(tr.num_steps)
    cs = tr.coeffs(steps, torch.ones_like(steps, dtype=torch.bool), dtype=torch.float64)
    on = tr.sde_mask.to(torch.bool) & (cs.omega > 0)
    if kind == "dt":
        on = on & (steps < tr.num_steps - 1)
        return cs.dt * (cs.omega[on].sum() / cs.dt[on].sum())
    return torch.full_like(cs.omega, float(cs.omega[on].mean()))
