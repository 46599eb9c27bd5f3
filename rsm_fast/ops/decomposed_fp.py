"""The forward-process loss op's math (DiffusionNFT / AWM), written as plain torch: the contract the
C++ (``csrc/rsm_fp.cpp``) and Triton (``kernels/fp_loss.py``) backends implement, and the CPU
fallback. The user-facing, checked functions with the reference losses' signatures are
``rsm_fast.ops.api.nft_loss`` / ``awm_loss``; the reference itself is
:mod:`rsm_fast.losses.forward_process`. Conventions (dtypes, ``mean``, contiguity) are those of
:mod:`rsm_fast.ops.decomposed`.

Inputs. Latents ``[B, ...]``: ``v`` (the trained velocity), ``v_old`` (NFT's old-policy velocity;
None for AWM), ``xa`` (NFT: ``x_t``; AWM: ``eps``), ``x0``, optional ``v_ref`` / ``v_ema``. Per row
``[B]`` (compute dtype): ``t`` (flow time), ``w`` (NFT: the mix weight ``r``; AWM: the processed
advantage ``A'``), optional ``logp_old`` (AWM; None = the on-policy pass, ratio exactly 1),
``kl_coef`` / ``ema_coef`` (the KL terms' weights, per row so AWM's 'elbo' scale folds in).
Scalars: ``kind`` (0 NFT, 1 AWM), ``beta`` (NFT), ``scale`` (NFT's ``adv_clip_max`` C),
``weighting`` (AWM, a position in :data:`WEIGHTINGS`), ``power`` (ghuber p), ``clip`` (AWM's c).

One pass of row sums (``K = 6`` slots; ``e = v - v_ref``, ``f = v - v_ema``)::

    NFT  c = (xa - x0) - t v_old,  d = v - v_old,  ep = c - t beta d,  en = c + t beta d
         S = (sum ep^2, sum en^2, sum |ep|, sum |en|, sum e^2, sum f^2)
         (ep / en are x0_hat(v+-) - x0 of the release: x_t - t (beta v + (1 -+ beta) v_old) - x0)
    AWM  m = v - (xa - x0)
         S = (sum m^2, 0, 0, 0, sum e^2, sum f^2)

then an O(B) epilogue (:func:`fp_epilogue`)::

    NFT  w+- = max(norm S|e+-|, 1e-5)   L+- = norm S_e+-^2 / w+-
         policy = C (r L+ + (1 - r) L-) / beta
         d0 = -2 C t r / w+,  d1 = 2 C t (1 - r) / w-          aux = (w+, w-, L+, L-)
    AWM  mse = norm S_mm;  l, dl/dmse by the weighting;  ratio = exp(l - l_old) (1 on-policy)
         policy = max(-A' ratio, -A' clamp(ratio, 1 - c, 1 + c))  (0 where A' = 0)
         d0 = 2 dpolicy/dratio ratio dl/dmse,  d1 = 0          aux = (l, ratio, mse, 0)
    kl = norm S_ee, ema_kl = norm S_ff, loss = policy + kl_coef kl + ema_coef ema_kl

``dpolicy/dratio`` is ``-A'`` where the ratio lies in ``[1 - c, 1 + c]`` or the unclipped branch
is the larger, else 0 (torch's ``maximum`` / ``clamp`` gradients); ``clipped`` marks the rows
whose gradient the clip removed, and their ``d0`` is exactly 0 even where the ratio overflowed to
inf (autograd of the released lines gives ``0 * inf = NaN`` there). The backward is one elementwise pass::

    grad = norm (gP (d0 X0 + d1 X1) + 2 (g_loss kl_coef + g_kl) e + 2 (g_loss ema_coef + g_ema) f)

with ``gP = g_loss + g_policy`` and ``(X0, X1) = (ep, en)`` (NFT) or ``(m, 0)`` (AWM).

[DECISION] The released code forms NFT's adaptive weights and AWM's mse in float64; here they are
row sums in the compute dtype (fp32 for fp32/bf16 latents, as every log-ratio in rsm_fast). On
float64 inputs every backend equals the reference to rounding; on float32 they differ from the
float64 release by fp32 rounding of a mean (about 1e-7 relative). AWM's ``logp_old`` is computed by
the same backend (``aux[:, 0]`` of the pre-update pass), so the ratio is exactly 1 at equal weights.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .decomposed import _norm, _rows, compute_dtype

KINDS = ("nft", "awm")
WEIGHTINGS = ("uniform", "t", "t**2", "huber", "ghuber")   # rsm_fast.losses.forward_process.AWM_WEIGHTINGS
NSUMS = 6
NFT_WEIGHT_FLOOR = 1e-5     # train_nft_sd3.py: .clip(min=0.00001) on the per-row mean |x0_hat - x0|
AWM_MSE_EPS = 1e-10         # train_sd3_awm.py::compute_log_prob_awm: offset inside the root / power
HUBER_OFFSET = 1e-5         # train_sd3_awm.py::compute_log_prob_awm: 'huber' subtracts 1e-5


def fp_epilogue(S: Tensor, norm: float, t: Tensor, w: Tensor, logp_old: Tensor | None, kl_coef: Tensor,
                ema_coef: Tensor, kind: int, beta: float, scale: float, weighting: int, power: float,
                clip: float):
    """Per-row epilogue from the row sums ``S [B, 6]`` (module docstring).
    -> ``(loss, policy, kl, ema_kl, aux [B, 4], clipped [B] bool, coef [B, 2])``."""
    zero = torch.zeros_like(t)
    kl, ema_kl = norm * S[:, 4], norm * S[:, 5]
    if kind == 0:
        w_pos = torch.clamp(norm * S[:, 2], min=NFT_WEIGHT_FLOOR)
        w_neg = torch.clamp(norm * S[:, 3], min=NFT_WEIGHT_FLOOR)
        l_pos, l_neg = norm * S[:, 0] / w_pos, norm * S[:, 1] / w_neg
        policy = scale * (w * l_pos + (1.0 - w) * l_neg) / beta
        d0 = -2.0 * scale * t * w / w_pos
        d1 = 2.0 * scale * t * (1.0 - w) / w_neg
        aux = torch.stack([w_pos, w_neg, l_pos, l_neg], 1)
        clipped = torch.zeros_like(t, dtype=torch.bool)
    else:
        mse = norm * S[:, 0]
        if weighting == 0:
            lp, dl = -mse, -torch.ones_like(t)
        elif weighting == 1:
            lp, dl = -mse * t, -t
        elif weighting == 2:
            lp, dl = -mse * t * t, -t * t
        elif weighting == 3:
            q = torch.sqrt(mse + AWM_MSE_EPS)
            lp, dl = -(q - HUBER_OFFSET) * t, -0.5 * t / q
        else:
            q = torch.pow(mse + AWM_MSE_EPS, power)
            floor = torch.pow(torch.full_like(t, AWM_MSE_EPS), power)
            lp, dl = -(q - floor) * t / power, -t * q / (mse + AWM_MSE_EPS)
        ratio = torch.exp(lp - logp_old) if logp_old is not None else torch.ones_like(t)
        a = w
        rc = torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
        pu = torch.where(a == 0, zero, -a * ratio)
        pc = -a * rc
        policy = torch.maximum(pu, pc)
        inside = (ratio >= 1.0 - clip) & (ratio <= 1.0 + clip)
        dpdr = torch.where(inside | (pu > pc), -a, zero)
        clipped = ((a > 0) & (ratio > 1.0 + clip)) | ((a < 0) & (ratio < 1.0 - clip))
        d0 = torch.where(dpdr == 0, zero, 2.0 * dpdr * ratio * dl)     # 0, not 0 * inf, on a clipped overflow
        d1 = zero
        aux = torch.stack([lp, ratio, mse, zero], 1)
    loss = policy + kl_coef * kl + ema_coef * ema_kl
    return loss, policy, kl, ema_kl, aux, clipped, torch.stack([d0, d1], 1)


def _parts(v, v_old, xa, x0, v_ref, v_ema, t, kind: int, beta: float):
    """The elementwise parts ``(X0, X1, e, f)`` as ``[B, n]`` rows in the compute dtype."""
    cd = compute_dtype(v)
    vr = _rows(v, cd)
    tc = t[:, None]
    if kind == 0:
        vo = _rows(v_old, cd)
        c = (_rows(xa, cd) - _rows(x0, cd)) - tc * vo
        tb = (t * beta)[:, None]
        d = vr - vo
        X0, X1 = c - tb * d, c + tb * d
    else:
        X0, X1 = vr - (_rows(xa, cd) - _rows(x0, cd)), None
    e = vr - _rows(v_ref, cd) if v_ref is not None else None
    f = vr - _rows(v_ema, cd) if v_ema is not None else None
    return X0, X1, e, f


def fp_fwd(v: Tensor, v_old: Tensor | None, xa: Tensor, x0: Tensor, v_ref: Tensor | None, v_ema: Tensor | None,
           t: Tensor, w: Tensor, logp_old: Tensor | None, kl_coef: Tensor, ema_coef: Tensor, kind: int,
           beta: float, scale: float, weighting: int, power: float, clip: float, mean: bool):
    """-> ``(loss, policy, kl, ema_kl, aux [B, 4], clipped, coef [B, 2])`` (module docstring)."""
    X0, X1, e, f = _parts(v, v_old, xa, x0, v_ref, v_ema, t, kind, beta)
    zero = torch.zeros_like(t)
    if kind == 0:
        sums = [(X0 * X0).sum(1), (X1 * X1).sum(1), X0.abs().sum(1), X1.abs().sum(1)]
    else:
        sums = [(X0 * X0).sum(1), zero, zero, zero]
    sums += [(e * e).sum(1) if e is not None else zero, (f * f).sum(1) if f is not None else zero]
    return fp_epilogue(torch.stack(sums, 1), _norm(X0.shape[1], mean), t, w, logp_old, kl_coef, ema_coef, kind,
                       beta, scale, weighting, power, clip)


def fp_bwd(g_loss: Tensor, g_policy: Tensor, g_kl: Tensor, g_ema: Tensor, v: Tensor, v_old: Tensor | None,
           xa: Tensor, x0: Tensor, v_ref: Tensor | None, v_ema: Tensor | None, t: Tensor, kl_coef: Tensor,
           ema_coef: Tensor, coef: Tensor, kind: int, beta: float, mean: bool) -> Tensor:
    """Gradient of ``sum(g_loss loss + g_policy policy + g_kl kl + g_ema ema_kl)`` w.r.t. ``v``."""
    X0, X1, e, f = _parts(v, v_old, xa, x0, v_ref, v_ema, t, kind, beta)
    norm = _norm(X0.shape[1], mean)
    gP = g_loss + g_policy
    grad = (gP * coef[:, 0] * norm)[:, None] * X0
    if X1 is not None:
        grad = grad + (gP * coef[:, 1] * norm)[:, None] * X1
    if e is not None:
        grad = grad + (2.0 * norm * (g_loss * kl_coef + g_kl))[:, None] * e
    if f is not None:
        grad = grad + (2.0 * norm * (g_loss * ema_coef + g_ema))[:, None] * f
    return grad.to(v.dtype).reshape(v.shape)
