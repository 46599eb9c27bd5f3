"""Reward resolution and checking.

A reward maps final samples ``x0 [B, *latent]`` to one float per sample ``[B]``. Built-ins are
resolved by name through the task; anything else is ``"package.module:function"``. Every call
is checked: wrong shape or a non-finite value raises :class:`RewardError` naming the reward,
so a bad reward never reaches the advantages, the loss or the weights.
"""
from __future__ import annotations

import importlib
from typing import Callable

import torch
from torch import Tensor


class RewardError(ValueError):
    """A reward returned something unusable (one-line message)."""


def resolve(spec: str, task) -> tuple[Callable[[Tensor], Tensor], bool]:
    """Return ``(reward_fn, is_builtin)`` for a reward spec."""
    if spec == "linear":
        return task.reward, True
    if ":" not in spec:
        raise RewardError(f"reward '{spec}' is not a built-in ('linear') nor 'module:function'")
    mod_name, fn_name = spec.split(":", 1)
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise RewardError(f"reward '{spec}': cannot import module '{mod_name}' ({e})") from None
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise RewardError(f"reward '{spec}': '{fn_name}' is not a callable in module '{mod_name}'")
    return fn, False


def checked(fn: Callable[[Tensor], Tensor], name: str, x0: Tensor) -> Tensor:
    """Evaluate a reward and validate its output: a finite float tensor of shape ``[B]``."""
    r = fn(x0)
    if not isinstance(r, Tensor):
        raise RewardError(f"reward '{name}' returned {type(r).__name__}, expected a tensor of shape [{x0.shape[0]}]")
    if r.shape != (x0.shape[0],):
        raise RewardError(f"reward '{name}' returned shape {tuple(r.shape)}, expected ({x0.shape[0]},)")
    r = r.to(torch.float32)
    bad = ~torch.isfinite(r)
    n_bad = int(bad.sum())  # one host read per epoch, outside any sampling loop
    if n_bad:
        raise RewardError(f"reward '{name}' returned NaN/inf for {n_bad} of {r.shape[0]} samples")
    return r


def reward_grad(fn: Callable[[Tensor], Tensor], name: str, x0: Tensor) -> Tensor:
    """``grad_x0 r(x0)`` by autograd (for rewards without an analytic gradient)."""
    with torch.enable_grad():
        x = x0.detach().requires_grad_(True)
        r = checked(fn, name, x)
        (g,) = torch.autograd.grad(r.sum(), x, allow_unused=True)
    if g is None:
        raise RewardError(f"reward '{name}' is not differentiable w.r.t. the samples (first-order estimators need it)")
    return g
