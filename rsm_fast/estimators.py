"""Value-guidance estimators ``Psi_hat`` in score units (spec §4, §9.3).

All estimators estimate the optimal guidance ``Psi*_{t_i} = (1/alpha) grad V*_{t_i}`` (spec §3.1,
Eq. 9), whose lookahead form is ``(Sigma_i / (alpha b_i)) E_{x'}[grad V(x')]`` for the transition
``x' = a_i x + b_i s + sigma_i z`` (``Sigma_i = sigma_i^2``):

* :func:`fo_current_state` — first order at the current state, ``(1/alpha) grad_x r(x0_hat(x))``.
* :func:`fo_lookahead` — first order through the children, ``(Sigma/(alpha b)) mean_j grad r``.
* :func:`fo_lookahead_next` — the depth-1, K = 1 case at a record's own sampled next state ``x'``
  (SQDF, Residual ∇-DB): ``(Sigma/(alpha b)) grad_{x'} r(x0_hat(x'))``, the model output inside
  Tweedie held fixed (:func:`detached_tweedie`); per-row gradients come from
  :func:`tweedie_reward_grad` in chunks (one decode + reward backward per chunk).
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

from dataclasses import fields, replace
from typing import Callable

import torch
from torch import Tensor

from .advantages import center
from .transitions import GaussianTransition, StepCoeffs, compute_dtype, rowwise

OutputFn = Callable[[Tensor, StepCoeffs], Tensor]   # (x [B, ...], coeffs) -> native output [B, ...]
RewardFn = Callable[[Tensor], Tensor]               # x0 [B, ...] -> reward [B]
# chunked, row-aware forms: the second argument is the chunk's slice of the full batch (for per-row
# context such as prompts or per-row coefficients)
RowFn = Callable[[Tensor, slice], Tensor]           # (x chunk [n, ...], rows) -> x0 chunk [n, ...]
RowRewardFn = Callable[[Tensor, slice], Tensor]     # (x0 chunk [n, ...], rows) -> reward [n]
JACOBIANS = ("tweedie", "identity")


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


def _row_chunks(n: int, chunk: int | None) -> list[slice]:
    c = n if not chunk or chunk <= 0 else int(chunk)
    return [slice(s, min(s + c, n)) for s in range(0, n, max(c, 1))]


def _slice_coeffs(c: StepCoeffs, sl: slice) -> StepCoeffs:
    return replace(c, **{f.name: getattr(c, f.name)[sl] for f in fields(c)})


def detached_tweedie(f: Tensor, coeffs: StepCoeffs, final: Tensor | None = None) -> RowFn:
    """``(x, rows) -> x0_hat(x)`` with the native output ``f[rows]`` held fixed ("stop-grad inside
    Tweedie", spec §6 SQDF row): differentiable in ``x`` only through Tweedie's explicit
    ``x``-dependence, so ``d x0_hat/dx = (1 - sigma_t^2 p_x/p_s)/alpha_t`` per row — ``1/alpha_t``
    for epsilon prediction, the identity for rectified-flow velocity (``x - t v``, VGG-Flow's
    ``x_t - t v.detach()``). ``f`` ``[B, ...]`` and ``coeffs`` (``[B]`` fields) are the rows'
    output and coefficients at the state's own step; rows flagged in ``final`` ``[B]`` bool are
    already final samples and map to themselves (``x0_hat = x``, identity Jacobian).

    ``alpha_t = 0`` happens only at rectified flow's ``t = 1`` (pure noise), where ``(x + sigma_t^2
    s)/alpha_t`` is 0/0 and Tweedie's limit is ``x - t v`` (spec §1.2): such rows use ``x - sigma_t f``
    (``sigma_t = t``, ``f = v``), with a safe denominator on the other branch so no NaN reaches
    the gradient."""
    f = f.detach()

    def fn(x: Tensor, rows: slice) -> Tensor:
        c = _slice_coeffs(coeffs, rows)
        r = lambda v: rowwise(v, x).to(x.dtype)   # noqa: E731
        fr = f[rows].to(x.dtype)
        al, sg = r(c.alpha), r(c.sigma_t)
        on = al > 0
        s = (fr - r(c.p_x) * x) / r(c.p_s)
        x0 = torch.where(on, (x + sg**2 * s) / torch.where(on, al, torch.ones_like(al)), x - sg * fr)
        if final is not None:
            x0 = torch.where(rowwise(final[rows], x), x, x0.to(x.dtype))
        return x0.to(x.dtype)

    return fn


def tweedie_reward_grad(x: Tensor, x0_hat_fn: RowFn, reward_fn: RowRewardFn, *, jacobian: str = "tweedie",
                        chunk: int | None = None) -> Tensor:
    """Per-row first-order signal ``g = grad_x r(x0_hat(x))`` ``[B, ...]`` (no ``1/alpha`` or
    lookahead scale), in chunks of ``chunk`` rows: each chunk is one ``x0_hat`` (no graph through
    the model: pass :func:`detached_tweedie`), one decode + reward forward and one reward backward.

    ``jacobian="tweedie"`` differentiates through ``x0_hat_fn`` (the chain rule of Tweedie's
    explicit ``x``-dependence); ``"identity"`` evaluates ``grad_{x0} r`` at ``x0 = x0_hat(x)``
    (VGG-Flow, spec §4.1). Rows must be independent (the reward is summed before the backward).
    """
    if jacobian not in JACOBIANS:
        raise ValueError(f"jacobian must be one of {JACOBIANS}, got {jacobian!r}")
    out = []
    for sl in _row_chunks(x.shape[0], chunk):
        if jacobian == "identity":
            with torch.no_grad():
                y = x0_hat_fn(x[sl], sl)
            out.append(_reward_grad(y, lambda v: v, lambda v, sl=sl: reward_fn(v, sl)))
        else:
            out.append(_reward_grad(x[sl], lambda v, sl=sl: x0_hat_fn(v, sl), lambda v, sl=sl: reward_fn(v, sl)))
    return torch.cat(out) if len(out) != 1 else out[0]


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


def fo_lookahead_next(x_next: Tensor, x0_hat_fn: RowFn, reward_fn: RowRewardFn, Sigma, b, alpha, *,
                      jacobian: str = "tweedie", chunk: int | None = None) -> Tensor:
    """FO lookahead of SQDF / Residual ∇-DB (Def. 3.5, depth k = 1, K = 1; spec §4.2, §6):
    ``Psi = (Sigma/(alpha b)) grad_{x'} r(x0_hat(x'))`` at each row's *own* sampled next state
    ``x' = mu_old + sigma z`` (the reparameterised rollout sample), ``[B, ...]``.

    ``x0_hat_fn``: the Tweedie map at the next step with the model output there held fixed
    (:func:`detached_tweedie`; its ``final`` rows, whose ``x'`` is the final sample, give
    ``grad r(x')``). ``Sigma, b, alpha``: per row ``[B]`` (or scalars) of the transition
    ``x -> x'``. [UNCERTAIN] Jacobian: we hold the model output fixed (``d x0_hat/dx' = 1/alpha_{t'}``
    for epsilon, identity for v) as spec §6 states ("stop-grad inside Tweedie"); the peers' code
    backpropagates through the network too (nabla-gfn ``train_nablagfn.py`` and RSM-code
    ``simple_resnabladbtrainer.py`` call the UNet on ``latent_next_tmp.requires_grad_()``;
    SQDF's non-consistency path calls ``ref_unet`` outside ``no_grad``), which costs a network
    backward per record. ``jacobian="identity"`` gives ``grad_{x0} r`` at ``x0_hat(x')``.
    """
    g = _as_float(tweedie_reward_grad(x_next, x0_hat_fn, reward_fn, jacobian=jacobian, chunk=chunk))
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
