"""Value-guidance estimators ``Psi_hat`` in score units (spec §4, §9.3).

All estimators estimate the optimal guidance ``Psi*_{t_i} = (1/alpha) grad V*_{t_i}`` (spec §3.1,
Eq. 9), whose lookahead form is ``(Sigma_i / (alpha b_i)) E_{x'}[grad V(x')]`` for the transition
``x' = a_i x + b_i s + sigma_i z`` (``Sigma_i = sigma_i^2``):

* :func:`fo_current_state` — first order at the current state, ``(1/alpha) grad_x r(x0_hat(x))``.
* :func:`fo_lookahead` — first order through the children, ``(Sigma/(alpha b)) mean_j grad r``.
* :func:`fo_terminal` — "reward score distillation": the terminal gradient ``grad_{x0} r`` of a
  trajectory, reused at each of its steps.
* :func:`zo_lookahead` — zeroth order (Stein), ``(sigma/(alpha b)) mean_j (r_j - base_j) z_j``.
* :func:`soft_returns` — entropy-augmented returns ``R_soft`` (spec §4.3): feeding them to
  :func:`zo_lookahead` instead of raw rewards makes it consistent for the *soft* value.

Lookahead plumbing: :func:`sample_children` draws ``K`` children per parent for one step,
:func:`rollout` continues states to a later step (optionally accumulating the per-step KL to a
reference kernel, for soft returns), :func:`tweedie_fn` wraps a model into ``x -> x0_hat``.

Per-row scalars (``alpha``, ``Sigma``, ``b``, ``sigma``) may be Python floats, 0-d tensors or
tensors whose shape is a prefix of the result's shape (``[B]`` for ``[B, ...]``, ``[G]`` for
``[G, ...]``). Results are float32 (float64 when any input is float64).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .advantages import center
from .transitions import GaussianTransition, StepCoeffs, compute_dtype

OutputFn = Callable[[Tensor, StepCoeffs], Tensor]   # (x [B, ...], coeffs) -> native output [B, ...]
RewardFn = Callable[[Tensor], Tensor]               # x0 [B, ...] -> reward [B]


def _lead(c, like: Tensor) -> Tensor:
    """Per-row scalar ``c`` (float, 0-d, or shape = prefix of ``like.shape``) broadcastable to ``like``."""
    c = torch.as_tensor(c, device=like.device)
    if c.dim() > like.dim() or tuple(like.shape[: c.dim()]) != tuple(c.shape):
        raise ValueError(f"per-row coefficient of shape {tuple(c.shape)} does not lead {tuple(like.shape)}")
    return c.to(like.dtype).reshape(*c.shape, *([1] * (like.dim() - c.dim())))


def _as_float(x: Tensor) -> Tensor:
    return x.to(compute_dtype(x))


def _reward_grad(x: Tensor, fn: Callable[[Tensor], Tensor], reward_fn: RewardFn) -> Tensor:
    """``grad_x sum_rows reward_fn(fn(x))`` (rows independent), detached, same shape as ``x``."""
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        r = reward_fn(fn(xg))
        if r.shape != xg.shape[:1]:
            raise ValueError(f"reward_fn must return one reward per row [{xg.shape[0]}], got {tuple(r.shape)}")
        (g,) = torch.autograd.grad(r.sum(), xg)
    return g.detach()


# ---------------------------------------------------------------------------------------------
# First-order estimators
# ---------------------------------------------------------------------------------------------
def fo_current_state(x_t: Tensor, x0_hat_fn: Callable[[Tensor], Tensor], reward_fn: RewardFn, alpha,
                     identity_jacobian: bool = False) -> Tensor:
    """Current-state FO guidance (Def. 3.4): ``(1/alpha) grad_{x_t} r(x0_hat(x_t))``, ``[B, ...]``.

    ``identity_jacobian=True`` is VGG-Flow's ``x0_hat = x_t - t v.detach()``: the Tweedie map is
    treated as having identity Jacobian, i.e. ``(1/alpha) grad_{x0} r`` at ``x0 = x0_hat(x_t)``
    (``x0_hat_fn`` then runs without autograd).
    """
    if identity_jacobian:
        with torch.no_grad():
            x0 = x0_hat_fn(x_t)
        g = _reward_grad(x0, lambda y: y, reward_fn)
    else:
        g = _reward_grad(x_t, x0_hat_fn, reward_fn)
    g = _as_float(g)
    return g / _lead(alpha, g)


def fo_lookahead(x_next: Tensor, continue_fn: Callable[[Tensor], Tensor], reward_fn: RewardFn,
                 Sigma, b, alpha) -> Tensor:
    """FO lookahead guidance (Def. 3.5): ``(Sigma/(alpha b)) mean_j grad_{x'_j} r(continue_fn(x'_j))``.

    ``x_next``: ``[G, K, ...]`` the K children of each of G parents; ``continue_fn`` maps children
    ``[N, ...]`` (N = G K) differentiably to what ``reward_fn`` scores (Tweedie of the child for
    depth 1, a reparameterised rollout for deeper lookahead). ``Sigma, b``: per parent ``[G]``.
    Returns ``[G, ...]``.
    """
    if x_next.dim() < 3:
        raise ValueError(f"x_next must have shape [G, K, ...], got {tuple(x_next.shape)}")
    G, K = x_next.shape[:2]
    g = _reward_grad(x_next.reshape(G * K, *x_next.shape[2:]), continue_fn, reward_fn)
    g = _as_float(g).reshape(x_next.shape).mean(1)
    return lookahead_scale(Sigma, b, alpha, g) * g


def fo_terminal(grad_r_x0: Tensor, alpha, Sigma=None, b=None) -> Tensor:
    """Reward score distillation (spec §9.3): ``Psi = (Sigma/(alpha b)) g`` or ``g/alpha``.

    ``grad_r_x0``: ``[B, ...]`` the terminal reward gradient ``grad_{x0} r(x0)`` of each row's
    trajectory (the caller gathers it per row; it is reused at every step of that trajectory).
    ``Sigma`` and ``b`` (per row ``[B]``) select the lookahead scale; both or neither.
    """
    if (Sigma is None) != (b is None):
        raise ValueError("fo_terminal: pass both Sigma and b (lookahead scale) or neither (g / alpha)")
    g = _as_float(grad_r_x0)
    if Sigma is None:
        return g / _lead(alpha, g)
    return lookahead_scale(Sigma, b, alpha, g) * g


def lookahead_scale(Sigma, b, alpha, like: Tensor) -> Tensor:
    """``Sigma / (alpha b)`` per row, broadcast against ``like``."""
    return _lead(Sigma, like) / (_lead(alpha, like) * _lead(b, like))


# ---------------------------------------------------------------------------------------------
# Zeroth order and soft returns
# ---------------------------------------------------------------------------------------------
def zo_lookahead(rewards: Tensor, z: Tensor, sigma, b, alpha, baseline: str = "mean") -> Tensor:
    """ZO lookahead guidance (Def. 3.5, Thm. 3.7): ``(sigma/(alpha b)) mean_j (r_j - base_j) z_j``.

    ``rewards``: ``[G, K]`` (raw rewards, soft returns, or precomputed advantages with
    ``baseline="none"``); ``z``: ``[G, K, ...]`` the standard-normal noise that made child j;
    ``sigma, b``: per parent ``[G]``. Returns ``[G, ...]``.
    """
    if rewards.dim() != 2 or tuple(z.shape[:2]) != tuple(rewards.shape) or z.dim() < 3:
        raise ValueError(f"rewards must be [G, K] and z [G, K, ...]; got {tuple(rewards.shape)}, {tuple(z.shape)}")
    dt = compute_dtype(rewards, z)
    adv = center(rewards.to(dt), dim=1, baseline=baseline)
    zz = z.to(dt)
    g = (adv.reshape(*adv.shape, *([1] * (zz.dim() - 2))) * zz).mean(1)
    sig = _lead(sigma, g)
    return sig / (_lead(alpha, g) * _lead(b, g)) * g


def soft_returns(reward: Tensor, kl_steps: Tensor, alpha) -> Tensor:
    """Entropy-augmented returns ``R_i = r - alpha sum_{j > i} KL_j`` (spec §4.3), ``[N, B]``.

    ``reward``: ``[B]``; ``kl_steps``: ``[N, B]`` per-step KL (nats, summed over latent dims)
    of the sampling kernel to the reference kernel, step 0 = noisiest; ``alpha``: scalar or
    per row ``[B]``. ``R_i`` is the return to
    pair with the children drawn *by* step i (their soft value counts only later steps' KL).
    """
    if kl_steps.dim() != 2 or kl_steps.shape[1] != reward.shape[0] or reward.dim() != 1:
        raise ValueError(f"need reward [B] and kl_steps [N, B]; got {tuple(reward.shape)}, {tuple(kl_steps.shape)}")
    dt = compute_dtype(reward, kl_steps)
    kl = kl_steps.to(dt)
    suffix = kl.flip(0).cumsum(0).flip(0)                       # sum_{j >= i}
    later = torch.cat([suffix[1:], torch.zeros_like(suffix[:1])])  # sum_{j > i}
    a = torch.as_tensor(alpha, dtype=dt, device=kl.device)       # scalar or per row [B]
    return reward.to(dt)[None] - a * later


# ---------------------------------------------------------------------------------------------
# Lookahead plumbing
# ---------------------------------------------------------------------------------------------
def _coeffs(transition: GaussianTransition, step: int, like: Tensor, stochastic: bool | None) -> StepCoeffs:
    return transition.coeffs_at(step, like.shape[0], device=like.device, dtype=compute_dtype(like),
                                stochastic=stochastic)


def tweedie_fn(output_fn: OutputFn, transition: GaussianTransition, step: int) -> Callable[[Tensor], Tensor]:
    """``x -> x0_hat(x)`` at sampling step ``step`` from the native output ``output_fn(x, coeffs)``."""
    def fn(x: Tensor) -> Tensor:
        c = _coeffs(transition, step, x, None)
        return c.x0_hat(output_fn(x, c), x)
    return fn


def sample_children(output_fn: OutputFn, transition: GaussianTransition, x: Tensor, step: int, K: int,
                    gen: torch.Generator | None = None) -> tuple[Tensor, Tensor, StepCoeffs]:
    """Branch: K stochastic children of each parent through sampling step ``step``.

    ``x``: parents ``[G, ...]``. Returns children ``[G, K, ...]``, their noise ``z`` ``[G, K, ...]``
    and the parents' coefficients (``[G]`` fields: ``sigma``, ``b``, ``Sigma`` for the estimators).
    """
    c = _coeffs(transition, step, x, True)
    mu = c.mean(x, output_fn(x, c))                                     # [G, ...]
    z = torch.randn((x.shape[0], K, *x.shape[1:]), generator=gen, dtype=mu.dtype, device=x.device)
    sig = _lead(c.sigma.to(mu.dtype), mu)[:, None]
    return mu[:, None] + sig * z, z, c


def rollout(output_fn: OutputFn, transition: GaussianTransition, x: Tensor, start_step: int,
            stop_step: int | None = None, *, gen: torch.Generator | None = None, stochastic: bool = True,
            ref_output_fn: OutputFn | None = None, kl_reduce: str = "sum") -> tuple[Tensor, Tensor | None]:
    """Run sampling steps ``start_step .. stop_step - 1`` (default: to the end) from ``x`` ``[B, ...]``.

    ``stochastic=False`` takes the ODE step on every row (TempFlow continuation). With
    ``ref_output_fn`` also returns the per-step KL of the sampling kernel to the reference kernel,
    ``[n_steps, B]`` (``kl_reduce="sum"``: nats, as :func:`soft_returns` expects; on ODE rows the
    value is the stochastic kernel's anchor, not a true KL). Differentiable in ``x`` when ``x``
    requires grad (reparameterised noise), so it also serves as ``continue_fn`` of :func:`fo_lookahead`.
    """
    stop = transition.num_steps if stop_step is None else int(stop_step)
    if not 0 <= start_step <= stop <= transition.num_steps:
        raise ValueError(f"need 0 <= start_step <= stop_step <= {transition.num_steps}, got {start_step}, {stop}")
    kls, sde = [], transition.sde_mask
    for i in range(start_step, stop):
        c = _coeffs(transition, i, x, None if stochastic else False)
        f = output_fn(x, c)
        if ref_output_fn is not None:
            kls.append(c.kl(f, ref_output_fn(x, c), reduce=kl_reduce))
        if stochastic and bool(sde[i]):
            z = torch.randn(x.shape, generator=gen, dtype=compute_dtype(x), device=x.device)
        else:
            z = torch.zeros(x.shape, dtype=compute_dtype(x), device=x.device)
        x = c.step(x, f, z)
    kl = None if ref_output_fn is None else (torch.stack(kls) if kls else x.new_zeros(0, x.shape[0]))
    return x, kl
