"""Noise schedules and conversions between the network's native outputs (spec §1).

Time runs from data (t = 0) to noise (t = 1); ``x_t = alpha_t x_0 + sigma_t eps``.
Everything here is pure tensor math: schedules are float64 tables that the samplers
move to the device once and gather per row, so nothing in a sampling loop touches the host.

Native parameterisations (``kind``):
  * ``"eps"``  — epsilon prediction (DDPM/DDIM, SD1.5)
  * ``"x0"``   — data prediction
  * ``"v"``    — rectified-flow velocity ``v = eps - x0`` with ``alpha_t = 1 - t, sigma_t = t`` (SD3)
  * ``"vpv"``  — the VP "v-parameterisation" ``v = alpha eps - sigma x0`` (alpha^2 + sigma^2 = 1)

Every native output ``f`` is affine in the score ``s`` at fixed ``x``: ``f = p_x x + p_s s``.
The parameterisation factor of spec §1.3 is ``lambda = 1 / p_s``, so
``s_theta - s_ref = lambda (f_theta - f_ref)``.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

NATIVE_KINDS = ("eps", "x0", "v", "vpv")


# ----------------------------------------------------------------------------------------------
# VP (DDPM) schedules
# ----------------------------------------------------------------------------------------------
def vp_betas(num_train_timesteps: int, beta_start: float, beta_end: float, kind: str = "linear") -> Tensor:
    """Training betas of a VP schedule, float64.

    ``linear``: DDPM (Ho et al. 2020: 1e-4 .. 0.02 over 1000 steps).
    ``scaled_linear``: Stable Diffusion 1.x (diffusers ``beta_schedule="scaled_linear"``,
    0.00085 .. 0.012): linear in sqrt(beta).
    """
    if num_train_timesteps <= 0:
        raise ValueError(f"num_train_timesteps must be positive, got {num_train_timesteps}")
    if kind == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    if kind == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    raise ValueError(f"beta schedule kind must be 'linear' or 'scaled_linear', got {kind!r}")


def alphas_cumprod(betas: Tensor) -> Tensor:
    """``alpha_bar_t = prod_{s <= t} (1 - beta_s)`` (float64)."""
    return torch.cumprod(1.0 - betas.to(torch.float64), dim=0)


def ddpm_linear_alphas_cumprod(num_train_timesteps: int = 1000) -> Tensor:
    return alphas_cumprod(vp_betas(num_train_timesteps, 1e-4, 0.02, "linear"))


def sd15_alphas_cumprod(num_train_timesteps: int = 1000) -> Tensor:
    # SD1.5 scheduler_config.json: beta_start 0.00085, beta_end 0.012, scaled_linear.
    return alphas_cumprod(vp_betas(num_train_timesteps, 0.00085, 0.012, "scaled_linear"))


def ddim_timesteps(num_train_timesteps: int, num_steps: int, offset: int = 0) -> Tensor:
    """DDIM inference indices, noisiest first, diffusers' ``timestep_spacing="leading"``:
    ``arange(num_steps) * (T // num_steps) + offset`` reversed (SD1.5 uses offset 1)."""
    if num_steps <= 0 or num_steps > num_train_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_train_timesteps}], got {num_steps}")
    ratio = num_train_timesteps // num_steps
    return (torch.arange(num_steps, dtype=torch.long) * ratio + offset).flip(0)


# ----------------------------------------------------------------------------------------------
# Rectified flow
# ----------------------------------------------------------------------------------------------
def shift_sigmas(sigmas: Tensor, shift: float) -> Tensor:
    """SD3 resolution shift ``s' = shift s / (1 + (shift - 1) s)``."""
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


def rf_sigmas(num_steps: int, shift: float = 3.0, num_train_timesteps: int = 1000) -> Tensor:
    """Inference times ``t_0 = 1 > t_1 > ... > t_{N-1} > t_N = 0`` (length N + 1, float64).

    Reproduces diffusers' ``FlowMatchEulerDiscreteScheduler.set_timesteps`` without dynamic
    shifting: a linspace between the *shifted* training extremes, shifted once more, then a
    terminal 0. For SD3.5-M (shift 3, 10 steps) this gives 1.000, .960, .913, ..., .278, .0089
    (spec §2.3 table).
    """
    if num_steps <= 0:
        raise ValueError(f"num_steps must be positive, got {num_steps}")
    train = torch.linspace(1.0, num_train_timesteps, num_train_timesteps, dtype=torch.float64) / num_train_timesteps
    train = shift_sigmas(train, shift)
    sig = torch.linspace(float(train.max()), float(train.min()), num_steps, dtype=torch.float64)
    sig = shift_sigmas(sig, shift)
    return torch.cat([sig, sig.new_zeros(1)])


# ----------------------------------------------------------------------------------------------
# Conversions (spec §1.2). alpha, sigma broadcast against x (callers reshape per-row scalars).
# ----------------------------------------------------------------------------------------------
def tweedie_x0(x: Tensor, score: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """``E[x0 | x_t] = (x + sigma^2 s) / alpha``."""
    return (x + sigma**2 * score) / alpha


def score_from_x0(x: Tensor, x0: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    return (alpha * x0 - x) / sigma**2


def eps_from_score(score: Tensor, sigma: Tensor) -> Tensor:
    return -sigma * score


def score_from_eps(eps: Tensor, sigma: Tensor) -> Tensor:
    return -eps / sigma


def x0_from_eps(x: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    return (x - sigma * eps) / alpha


def eps_from_x0(x: Tensor, x0: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    return (x - alpha * x0) / sigma


def rf_alpha_sigma(t: Tensor) -> tuple[Tensor, Tensor]:
    return 1.0 - t, t


def native_affine(kind: str, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
    """Coefficients ``(p_x, p_s)`` with ``f = p_x x + p_s s`` for native output ``kind``.

    ``v`` assumes the rectified-flow path (alpha = 1 - t, sigma = t): ``v = -(x + t s)/(1 - t)``.
    """
    if kind == "eps":
        return torch.zeros_like(sigma), -sigma
    if kind == "x0":
        return 1.0 / alpha, sigma**2 / alpha
    if kind == "v":
        t = sigma
        return -1.0 / (1.0 - t), -t / (1.0 - t)
    if kind == "vpv":
        # v = alpha eps - sigma x0 with eps = -sigma s and x0 = (x + sigma^2 s)/alpha:
        # v = -(sigma/alpha) x - (sigma/alpha)(alpha^2 + sigma^2) s
        return -sigma / alpha, -sigma * (alpha**2 + sigma**2) / alpha
    raise ValueError(f"native kind must be one of {NATIVE_KINDS}, got {kind!r}")


def native_to_score(kind: str, f: Tensor, x: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    p_x, p_s = native_affine(kind, alpha, sigma)
    return (f - p_x * x) / p_s


def score_to_native(kind: str, s: Tensor, x: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    p_x, p_s = native_affine(kind, alpha, sigma)
    return p_x * x + p_s * s


def param_factor(kind: str, alpha: Tensor, sigma: Tensor) -> Tensor:
    """lambda(t) of spec §1.3: ``s_theta - s_ref = lambda (f_theta - f_ref)``.

    eps: -1/sigma; x0: alpha/sigma^2; v (RF): -(1 - t)/t; vpv: -alpha/sigma (on alpha^2+sigma^2=1).
    """
    return 1.0 / native_affine(kind, alpha, sigma)[1]


def rf_v_from_score(x: Tensor, s: Tensor, t: Tensor) -> Tensor:
    return -(x + t * s) / (1.0 - t)


def rf_x0_from_v(x: Tensor, v: Tensor, t: Tensor) -> Tensor:
    return x - t * v


def rf_eps_from_v(x: Tensor, v: Tensor, t: Tensor) -> Tensor:
    return x + (1.0 - t) * v


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of a per-row scalar time (any scale), ``[B] -> [B, dim]``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.to(torch.float32)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb
