"""Reward centering and group normalisation (spec §4.5).

A group is a set of ``K`` siblings that share a baseline: the samples of one prompt (Flow-GRPO,
DanceGRPO) or the ``K_i`` children of one branching parent (TempFlow-style, spec §4.4).

* :func:`center` subtracts a baseline along one dim: the group mean (``"mean"``, GRPO; biases a
  ZO estimate by the factor ``1 - 1/K``), the leave-one-out mean (``"loo"``, unbiased because each
  sample's baseline is independent of its own noise) or nothing (``"none"``).
* :func:`group_advantages` is the GRPO advantage
  ``A_k = (r_k - base_k) / (std + eps)``, clipped to ``[-clip, clip]`` (flow_grpo ``stat_tracking``,
  ``adv_clip_max = 5``). ``std`` is the population std (numpy's ``np.std``, ddof = 0) of the *raw*
  rewards, per group (``"group"``) or over all rewards (``"global"``, RSM SD3 ``global_std=True``).

Math runs in float32 (float64 when the rewards are float64); the result has that dtype.
"""
from __future__ import annotations

import torch
from torch import Tensor

BASELINES = ("mean", "loo", "none")
NORMALIZATIONS = ("none", "group", "global")


def _float(r: Tensor) -> Tensor:
    """float64 stays float64; everything else (bf16, fp16, ints) is computed in float32."""
    return r if r.dtype == torch.float64 else r.to(torch.float32)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def baseline_values(r: Tensor, dim: int = -1, baseline: str = "mean") -> Tensor:
    """The baseline subtracted by :func:`center`, same shape as ``r``.

    ``"loo"``: ``b_k = (sum_j r_j - r_k) / (K - 1)``; needs ``K >= 2`` along ``dim``.
    """
    _check_choice("baseline", baseline, BASELINES)
    r = _float(r)
    if baseline == "none":
        return torch.zeros_like(r)
    n = r.shape[dim]
    total = r.sum(dim, keepdim=True)
    if baseline == "mean":
        if n < 1:
            raise ValueError(f"baseline='mean' needs at least 1 sample along dim {dim}, got {n}")
        return (total / n).expand_as(r)
    if n < 2:
        raise ValueError(f"baseline='loo' needs at least 2 samples along dim {dim}, got {n}")
    return (total - r) / (n - 1)


def center(r: Tensor, dim: int = -1, baseline: str = "mean") -> Tensor:
    """``r - baseline`` along ``dim`` (any shape; float32/float64 result).

    Identity used by the tests: with ``K`` samples, ``loo``-centred = ``K/(K-1)`` x mean-centred.
    """
    return _float(r) - baseline_values(r, dim, baseline)


def _all_equal(r: Tensor, dim: int | None) -> Tensor:
    """True where every reward (in a group, or overall) is identical: exact, no tolerance."""
    if dim is None:
        return r.amax() == r.amin()
    return r.amax(dim, keepdim=True) == r.amin(dim, keepdim=True)


def _check_options(baseline: str, normalize: str, eps: float, clip: float | None) -> None:
    """The options shared by :func:`group_advantages` and :func:`set_advantages`."""
    _check_choice("baseline", baseline, BASELINES)
    _check_choice("normalize", normalize, NORMALIZATIONS)
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if clip is not None and not clip > 0:
        raise ValueError(f"clip must be positive or None, got {clip}")


def group_advantages(rewards: Tensor, *, baseline: str = "mean", normalize: str = "group",
                     eps: float = 1e-4, clip: float | None = 5.0) -> Tensor:
    """GRPO-style advantages of ``rewards`` ``[G, K]`` (G groups of K siblings) -> ``[G, K]``.

    ``A = center(r, baseline) / (std + eps)`` with ``std`` per group (``"group"``), over all
    rewards (``"global"``) or no division (``"none"``); groups (resp. the whole batch for
    ``"global"``) whose rewards are all identical get ``A = 0`` when normalising. Then
    ``A`` is clipped to ``[-clip, clip]`` unless ``clip`` is None.
    """
    _check_options(baseline, normalize, eps, clip)
    if rewards.dim() != 2:
        raise ValueError(f"rewards must have shape [G, K], got {tuple(rewards.shape)}")
    r = _float(rewards)
    adv = center(r, dim=1, baseline=baseline)
    if r.numel() == 0:
        return adv
    if normalize != "none":
        dim = 1 if normalize == "group" else None
        std = r.std(dim=dim, correction=0, keepdim=True) if dim is not None else r.std(correction=0)
        adv = torch.where(_all_equal(r, dim), torch.zeros_like(adv), adv / (std + eps))
    if clip is not None:
        adv = adv.clamp(-clip, clip)
    return adv


def set_advantages(values: Tensor, set_id: Tensor, set_sizes: list[int], *, baseline: str = "mean",
                   normalize: str = "group", eps: float = 1e-4, clip: float | None = 5.0) -> Tensor:
    """:func:`group_advantages` for ragged sets: ``values`` ``[M]``, ``set_id`` ``[M]`` in
    ``[0, S)`` with ``set_sizes`` (host ints, ``S`` entries) the number of records per set.

    The same arithmetic per set (baseline, population std of the raw values, all-equal sets -> 0,
    clip); ``"global"`` divides by the std over all ``M`` values. Index ops only, no host read, so
    it runs on any device without a synchronisation. Used for the rollout engine's records, whose
    baseline sets are the siblings of one branching parent or one group at one step.
    """
    _check_options(baseline, normalize, eps, clip)
    if values.dim() != 1 or set_id.shape != values.shape:
        raise ValueError(f"values and set_id must both be [M]; got {tuple(values.shape)} and {tuple(set_id.shape)}")
    if sum(set_sizes) != values.shape[0] or any(n < 1 for n in set_sizes):
        raise ValueError(f"set_sizes must be positive and sum to M={values.shape[0]}, got {sum(set_sizes)}")
    if baseline == "loo" and set_sizes and min(set_sizes) < 2:
        raise ValueError(f"baseline='loo' needs at least 2 records per baseline set, a set has {min(set_sizes)}")
    v = _float(values)
    if v.numel() == 0:
        return v.clone()
    S = len(set_sizes)
    n = torch.tensor(set_sizes, dtype=v.dtype, device=v.device)
    total = v.new_zeros(S).index_add_(0, set_id, v)
    mean = (total / n).index_select(0, set_id)
    if baseline == "mean":
        adv = v - mean
    elif baseline == "loo":
        adv = v - (total.index_select(0, set_id) - v) / (n.index_select(0, set_id) - 1)
    else:
        adv = v.clone()
    if normalize == "group":
        var = v.new_zeros(S).index_add_(0, set_id, (v - mean) ** 2) / n
        hi = v.new_full((S,), -float("inf")).scatter_reduce_(0, set_id, v, "amax")
        lo = v.new_full((S,), float("inf")).scatter_reduce_(0, set_id, v, "amin")
        std, same = var.sqrt().index_select(0, set_id), (hi == lo).index_select(0, set_id)
        adv = torch.where(same, torch.zeros_like(adv), adv / (std + eps))
    elif normalize == "global":
        adv = torch.where(_all_equal(v, None), torch.zeros_like(adv), adv / (v.std(correction=0) + eps))
    if clip is not None:
        adv = adv.clamp(-clip, clip)
    return adv
