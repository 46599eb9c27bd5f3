"""Forward-process reward fine-tuning losses: DiffusionNFT and AWM (eager float64-testable reference).

Convention (rectified flow, t = 1 noise, t = 0 data)::

    x_t = (1 - t) x0 + t eps        v* = eps - x0        x0_hat(v) = x_t - t v

Rows are ``[B, ...]`` latents, ``t`` and ``adv`` are ``[B]`` (``t`` is the flow time in [0, 1], i.e.
the scheduler timestep / 1000). No sampler log-probabilities are involved: each row is a fresh noising
of a clean rollout sample ``x0``.

DiffusionNFT (NVlabs/DiffusionNFT @ 24af5554, ``scripts/train_nft_sd3.py`` training loop)::

    r    = clamp((clamp(A, -C, C) / C) / 2 + 1/2, 0, 1)                      C = adv_clip_max
    v+   = beta v_theta + (1 - beta) sg(v_old)        v- = (1 + beta) sg(v_old) - beta v_theta
    w+-  = max(mean|x0_hat(v+-) - x0|, 1e-5)   (float64, no grad, floor applied after the mean)
    L+-  = mean((x0_hat(v+-) - x0)^2 / w+-)
    loss = mean_rows(C (r L+ + (1 - r) L-) / beta) + kl_beta mean_rows(mean((v_theta - v_ref)^2))

AWM (scxue/advantage_weighted_matching @ be513723, ``scripts/train_sd3_awm.py``)::

    mse   = mean((v - (eps - x0))^2)                 (float64, ``compute_log_prob_awm``)
    l(v)  = -mse (uniform) | -mse t | -mse t^2 | -(sqrt(mse + 1e-10) - 1e-5) t (huber)
            | -((mse + 1e-10)^p - (1e-10)^p) t / p (ghuber)
    A'    = clamp(A, -C, C) / C * advantage_max      (no rescale when advantage_max is None)
    ratio = exp(l(v_theta) - sg(l_old))              (loss_type 'exp_first': one ratio per row)
    loss  = mean_rows(max(-A' ratio, -A' clip(ratio, 1-c, 1+c)))
            + kl_beta mean_rows(k mean((v_theta - v_ref)^2)) + ema_beta mean_rows(k mean((v_theta - v_ema)^2))

with ``k = 1`` ('uniform' KL weight) or ``k = 1 / (2 std^2)``, ``std = 0.7 sqrt(t / (1 - clamp(t, 0, 0.99)))``
('elbo'). On the first (on-policy) pass ``l_old = sg(l(v_theta))`` so ratio == 1 and the policy gradient
is ``-mean(A' grad l)``: advantage-weighted flow matching.

Where the old / EMA adapters move after each epoch: ``target <- d target + (1 - d) source``
(:func:`ema_update_`) with ``d`` from :func:`nft_old_decay` or :func:`awm_ema_decay`.

All math runs in float32 (float64 if any input is float64), whatever the model dtype; the NFT
adaptive weights and the AWM mse are computed in float64 as released.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor

from ..transitions import compute_dtype, reduce_latent, rowwise

NFT_ADV_MODES = ("all", "positive_only", "negative_only", "one_only", "binary")
AWM_WEIGHTINGS = ("uniform", "t", "t**2", "huber", "ghuber")
AWM_KL_WEIGHTS = ("uniform", "elbo")
NFT_DECAY_TYPES = (0, 1, 2)
AWM_EMA_DECAY_TYPES = ("linear", "constant")

# train_nft_sd3.py, adaptive weighting: ``.clip(min=0.00001)`` on the float64 per-row mean |x0_hat - x0|.
NFT_WEIGHT_FLOOR = 1e-5
# train_sd3_awm.py::compute_log_prob_awm: the 'huber'/'ghuber' offset inside the root / power.
AWM_MSE_EPS = 1e-10


# ---------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------
def _check_latents(name: str, x, like: Tensor | None = None) -> None:
    if like is None:
        if not isinstance(x, Tensor) or x.dim() < 2:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{name} must be a [B, ...] tensor with latent dims, got {got}")
    elif not isinstance(x, Tensor) or x.shape != like.shape:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must have shape {tuple(like.shape)}, got {got}")


def _check_row(name: str, x, batch: int) -> None:
    if not isinstance(x, Tensor) or tuple(x.shape) != (batch,):
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must have shape ({batch},), got {got}")


def _check_number(name: str, x, *, positive: bool = False, nonneg: bool = False) -> None:
    ok = isinstance(x, (int, float)) and not isinstance(x, bool)
    if ok and positive:
        ok = x > 0
    if ok and nonneg:
        ok = x >= 0
    if not ok:
        cond = " > 0" if positive else (" >= 0" if nonneg else "")
        raise ValueError(f"{name} must be a number{cond}, got {x!r}")


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


# ---------------------------------------------------------------------------------------------
# DiffusionNFT
# ---------------------------------------------------------------------------------------------
def nft_mix_weight(adv: Tensor, adv_clip_max: float = 5.0, adv_mode: str = "all") -> Tensor:
    """``r = clamp((A_c / C) / 2 + 0.5, 0, 1)`` with ``A_c = clamp(A, -C, C)`` then ``adv_mode``
    (train_nft_sd3.py, "normalize advantage"; modes as released: positive_only / negative_only clamp
    to one side, one_only maps to 1[A > 0], binary to sign(A))."""
    a = torch.clamp(adv, -adv_clip_max, adv_clip_max)
    if adv_mode == "positive_only":
        a = torch.clamp(a, 0, adv_clip_max)
    elif adv_mode == "negative_only":
        a = torch.clamp(a, -adv_clip_max, 0)
    elif adv_mode == "one_only":
        a = torch.where(a > 0, torch.ones_like(a), torch.zeros_like(a))
    elif adv_mode == "binary":
        a = torch.sign(a)
    return torch.clamp((a / adv_clip_max) / 2.0 + 0.5, 0, 1)


def nft_loss(v_theta: Tensor, v_old: Tensor, v_ref: Tensor | None, x_t: Tensor, x0: Tensor, t: Tensor,
             adv: Tensor, *, beta: float, adv_clip_max: float = 5.0, kl_beta: float = 1e-4,
             adv_mode: str = "all") -> tuple[Tensor, dict[str, Tensor]]:
    """DiffusionNFT loss (positive / implicit-negative beta-mixed x0 regression) + KL to the reference.

    ``beta``: ``config.beta`` (1.0 GenEval/PickScore, 0.1 OCR); ``adv_clip_max``: ``config.train.adv_clip_max``
    (5); ``kl_beta``: ``config.train.beta`` (1e-4, config/nft.py). ``v_ref=None`` requires ``kl_beta == 0``.
    Returns ``(loss, stats)``; every stats entry is a detached ``[B]`` tensor."""
    _check_number("beta", beta, positive=True)
    _check_number("adv_clip_max", adv_clip_max, positive=True)
    _check_number("kl_beta", kl_beta, nonneg=True)
    _check_choice("adv_mode", adv_mode, NFT_ADV_MODES)
    _check_latents("v_theta", v_theta)
    for name, x in (("v_old", v_old), ("x_t", x_t), ("x0", x0)):
        _check_latents(name, x, v_theta)
    if v_ref is not None:
        _check_latents("v_ref", v_ref, v_theta)
    elif kl_beta != 0:
        raise ValueError("v_ref is required when kl_beta is non-zero")
    batch = v_theta.shape[0]
    _check_row("t", t, batch)
    _check_row("adv", adv, batch)

    cd = compute_dtype(v_theta, v_old, x_t, x0, t)
    vt, vo, xt, x0c = v_theta.to(cd), v_old.detach().to(cd), x_t.to(cd), x0.to(cd)
    te = rowwise(t.to(cd), vt)
    r = nft_mix_weight(adv.to(cd), adv_clip_max, adv_mode)

    v_pos = beta * vt + (1 - beta) * vo
    v_neg = (1.0 + beta) * vo - beta * vt
    err_pos = (xt - te * v_pos) - x0c           # x0_hat+ - x0
    err_neg = (xt - te * v_neg) - x0c           # x0_hat- - x0
    with torch.no_grad():                        # adaptive weights: float64, floored after the mean
        w_pos = reduce_latent(err_pos.double().abs()).clamp(min=NFT_WEIGHT_FLOOR).to(cd)
        w_neg = reduce_latent(err_neg.double().abs()).clamp(min=NFT_WEIGHT_FLOOR).to(cd)
    l_pos = reduce_latent(err_pos**2 / rowwise(w_pos, vt))
    l_neg = reduce_latent(err_neg**2 / rowwise(w_neg, vt))
    policy = (r * l_pos / beta + (1.0 - r) * l_neg / beta) * adv_clip_max
    loss = policy.mean()
    kl = reduce_latent((vt - v_ref.to(cd)) ** 2) if v_ref is not None else torch.zeros_like(policy)
    if kl_beta != 0:
        loss = loss + kl_beta * kl.mean()
    stats = {"r": r, "policy": policy, "loss_pos": l_pos, "loss_neg": l_neg, "w_pos": w_pos, "w_neg": w_neg,
             "kl": kl, "old_deviate": reduce_latent((vt - vo) ** 2)}
    return loss, {k: v.detach() for k, v in stats.items()}


# ---------------------------------------------------------------------------------------------
# AWM
# ---------------------------------------------------------------------------------------------
def awm_log_likelihood(v: Tensor, eps: Tensor, x0: Tensor, t: Tensor, *, weighting: str = "ghuber",
                       p: float = 0.25) -> Tensor:
    """Per-row AWM surrogate log-likelihood ``l(v)`` ``[B]`` in float64 (compute_log_prob_awm):
    ``mse = mean((v - (eps - x0))^2)`` then the weighting (``t`` = flow time, sigma in [0, 1])."""
    _check_choice("weighting", weighting, AWM_WEIGHTINGS)
    if weighting == "ghuber":
        _check_number("p", p, positive=True)
    _check_latents("v", v)
    _check_latents("eps", eps, v)
    _check_latents("x0", x0, v)
    _check_row("t", t, v.shape[0])
    mse = reduce_latent((v.double() - (eps.double() - x0.double())) ** 2)
    td = t.double()
    if weighting == "uniform":
        return -mse
    if weighting == "t":
        return -mse * td
    if weighting == "t**2":
        return -mse * td**2
    if weighting == "huber":
        return -(torch.sqrt(mse + AWM_MSE_EPS) - 1e-5) * td
    floor = torch.tensor(AWM_MSE_EPS, dtype=mse.dtype, device=mse.device) ** p
    return -((mse + AWM_MSE_EPS) ** p - floor) * td / p


def _awm_kl_scale(t: Tensor, kl_weight: str) -> Tensor:
    """``1`` ('uniform') or ``1 / (2 std^2)`` with ``std = 0.7 sqrt(t / (1 - clamp(t, 0, 0.99)))``
    ('elbo'; compute_log_prob_awm's ``std_dev_t``)."""
    if kl_weight == "uniform":
        return torch.ones_like(t)
    std = torch.sqrt(t / (1 - torch.clamp(t, 0, 0.99))) * 0.7
    return 1.0 / (2 * std**2)


def awm_loss(v_theta: Tensor, eps: Tensor, x0: Tensor, t: Tensor, adv: Tensor, *, logp_old: Tensor | None = None,
             v_ref: Tensor | None = None, v_ema: Tensor | None = None, weighting: str = "ghuber", p: float = 0.25,
             clip_range: float = 1.0, adv_clip_max: float = 5.0, advantage_max: float | None = 1.0,
             kl_beta: float = 1e-3, ema_beta: float = 1.0, kl_weight: str = "uniform",
             kl_ema_weight: str = "uniform") -> tuple[Tensor, dict[str, Tensor]]:
    """AWM loss (PPO-clipped ratio of the forward-process likelihood surrogate, per row) + KL terms.

    ``logp_old``: the old policy's ``l`` per row (``[B]``, detached; compute it with
    :func:`awm_log_likelihood` on the pre-update outputs). ``None`` = on-policy first pass:
    ``l_old = sg(l(v_theta))``, ratio == 1. Defaults are config/dgx_awm.py::geneval_sd3_no_cfg_1node
    (ghuber p=0.25, clip_range 1, advantage_max 1, beta 1e-3, ema_beta 1, Uniform KL weights).
    The KL terms are independent here; the release only evaluates the EMA term when ``beta > 0``.
    Returns ``(loss, stats)``; every stats entry is a detached ``[B]`` tensor."""
    _check_choice("weighting", weighting, AWM_WEIGHTINGS)
    _check_choice("kl_weight", kl_weight, AWM_KL_WEIGHTS)
    _check_choice("kl_ema_weight", kl_ema_weight, AWM_KL_WEIGHTS)
    _check_number("p", p, positive=True)
    _check_number("clip_range", clip_range, positive=True)
    _check_number("adv_clip_max", adv_clip_max, positive=True)
    if advantage_max is not None:
        _check_number("advantage_max", advantage_max, positive=True)
    _check_number("kl_beta", kl_beta, nonneg=True)
    _check_number("ema_beta", ema_beta, nonneg=True)
    _check_latents("v_theta", v_theta)
    _check_latents("eps", eps, v_theta)
    _check_latents("x0", x0, v_theta)
    batch = v_theta.shape[0]
    _check_row("t", t, batch)
    _check_row("adv", adv, batch)
    if logp_old is not None:
        _check_row("logp_old", logp_old, batch)
    for name, v, coef in (("v_ref", v_ref, kl_beta), ("v_ema", v_ema, ema_beta)):
        if v is not None:
            _check_latents(name, v, v_theta)
        elif coef != 0:
            raise ValueError(f"{name} is required when its coefficient is non-zero")

    logp = awm_log_likelihood(v_theta, eps, x0, t, weighting=weighting, p=p)      # float64 as released
    cd = logp.dtype
    old = logp.detach() if logp_old is None else logp_old.detach().to(cd)
    a = torch.clamp(adv.to(cd), -adv_clip_max, adv_clip_max)
    if advantage_max is not None:
        a = a / adv_clip_max * advantage_max
    ratio = torch.exp(logp - old)
    policy = torch.maximum(-a * ratio, -a * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range))
    loss = policy.mean()
    clipped = ((a > 0) & (ratio > 1 + clip_range)) | ((a < 0) & (ratio < 1 - clip_range))
    vt, td = v_theta.to(cd), t.to(cd)
    zeros = torch.zeros_like(policy)
    kl = reduce_latent((vt - v_ref.to(cd)) ** 2) * _awm_kl_scale(td, kl_weight) if v_ref is not None else zeros
    ema_kl = reduce_latent((vt - v_ema.to(cd)) ** 2) * _awm_kl_scale(td, kl_ema_weight) if v_ema is not None else zeros
    if kl_beta != 0:
        loss = loss + kl_beta * kl.mean()
    if ema_beta != 0:
        loss = loss + ema_beta * ema_kl.mean()
    stats = {"logp": logp, "ratio": ratio, "adv": a, "policy": policy, "clipped": clipped, "kl": kl,
             "ema_kl": ema_kl, "clipfrac": (torch.abs(ratio - 1.0) > clip_range)}
    return loss, {k: v.detach() for k, v in stats.items()}


# ---------------------------------------------------------------------------------------------
# Decay schedules and the in-place EMA
# ---------------------------------------------------------------------------------------------
def nft_old_decay(step: int, decay_type: int = 1) -> float:
    """Old-adapter decay after an epoch (train_nft_sd3.py::return_decay): ``(flat, uprate, uphold)`` =
    (0, 0, 0) type 0, (0, 0.001, 0.5) type 1 (default config), (75, 0.0075, 0.999) type 2 (OCR);
    ``0`` for ``step < flat`` else ``min((step - flat) * uprate, uphold)``."""
    _check_choice("decay_type", decay_type, NFT_DECAY_TYPES)
    flat, uprate, uphold = {0: (0, 0.0, 0.0), 1: (0, 0.001, 0.5), 2: (75, 0.0075, 0.999)}[decay_type]
    if step < flat:
        return 0.0
    return min((step - flat) * uprate, uphold)


def awm_ema_decay(step: int, decay_type: str = "linear", max_decay: float = 0.3) -> float:
    """KL-EMA adapter decay after an epoch (train_sd3_awm.py, end of epoch; ``kl_ema_decay_type``,
    ``kl_ema_decay`` = 0.3 in dgx_awm.py): 'linear' ``min(max_decay, 0.001 step)``, 'constant' ``max_decay``."""
    _check_choice("decay_type", decay_type, AWM_EMA_DECAY_TYPES)
    if decay_type == "constant":
        return max_decay
    return min(max_decay, 0.001 * step)


@torch.no_grad()
def ema_update_(target_params: Iterable[Tensor], source_params: Iterable[Tensor], decay: float) -> None:
    """In place ``target <- decay target + (1 - decay) source`` over paired parameters (both releases)."""
    targets, sources = list(target_params), list(source_params)
    if len(targets) != len(sources):
        raise ValueError(f"source_params must pair with target_params, got {len(sources)} vs {len(targets)}")
    for tgt, src in zip(targets, sources):
        if tgt.shape != src.shape:
            raise ValueError(f"source_params shapes must match target_params, got {tuple(src.shape)} vs {tuple(tgt.shape)}")
        tgt.copy_(tgt * decay + src.to(tgt.dtype) * (1.0 - decay))
