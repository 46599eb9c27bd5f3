"""The reward protocol, output validation and the fault policy.

Everything else in :mod:`rsm_fast.rewards` builds on the three pieces here:

* :class:`Reward` (protocol) and :func:`as_reward` (adapts a plain ``fn(x) -> [B]`` callable);
* :func:`evaluate_rewards` -> :class:`RewardResult`: calls a reward (under a deadline, see
  :mod:`.deadline`), validates its output (a finite ``[B]`` tensor) and applies the fault policy
  ``"error"`` or ``"skip"``;
* :func:`checked` / :func:`reward_grad`: the trainer's original entry points, now thin wrappers.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from ..interrupts import RunInterrupted
from .deadline import DeadlineExceeded, RewardRaised, StillRunning, call_with_deadline

POLICIES = ("error", "skip")


class RewardError(ValueError):
    """A reward returned something unusable or failed (one-line message)."""


class RewardSkipped(RewardError):
    """Raised by :meth:`RewardResult.unwrap` for a batch the ``"skip"`` policy dropped."""


@runtime_checkable
class Reward(Protocol):
    """One float per image.

    ``images``: ``[B, C, H, W]`` float in ``[0, 1]`` (C = 1 or 3); ``prompts``: ``B`` strings or
    ``None``; ``metadata``: ``B`` dicts or ``None``. Returns ``[B]`` float32 (float64 when the
    images are float64 and the reward is a simple analytic one). A ``differentiable`` reward
    keeps the autograd graph to ``images``.
    """

    name: str
    differentiable: bool

    def __call__(self, images: Tensor, prompts: list[str] | None = None,
                 metadata: list[dict] | None = None) -> Tensor: ...


def one_line(msg: object, limit: int = 300) -> str:
    """``msg`` squeezed onto one line (the CLI prints reward errors as a single ``error:`` line)."""
    s = " ".join(str(msg).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def out_dtype(x: Tensor) -> torch.dtype:
    """float64 for float64 inputs (so gradients can be checked in float64), else float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def check_images(images: Tensor, name: str, channels: tuple[int, ...] = (1, 3)) -> None:
    if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point():
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise RewardError(f"reward '{name}' needs float images [B, C, H, W] in [0, 1], got {shape}")
    if images.shape[1] not in channels:
        raise RewardError(f"reward '{name}' supports {channels} channels, got {images.shape[1]}")


def to_uint8_hwc(images: Tensor) -> np.ndarray:
    """``[B, C, H, W]`` in [0, 1] -> uint8 ``[B, H, W, C]``, rounding as ddpo-pytorch does
    (``(x * 255).round().clamp(0, 255)``, ddpo_pytorch/rewards.py)."""
    x = (images.detach().to(torch.float32) * 255).round().clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def to_pil(images: Tensor) -> list:
    """PIL images (mode ``L`` for one channel, ``RGB`` for three)."""
    from PIL import Image

    arr = to_uint8_hwc(images)
    return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arr]


class FunctionReward:
    """A plain callable behind the :class:`Reward` protocol.

    ``fn(x)`` or ``fn(images, prompts, metadata)`` (chosen from the signature). The output is
    passed through untouched: validation is :func:`evaluate_rewards`' job.
    """

    def __init__(self, fn: Callable, name: str, differentiable: bool | None = None):
        self.fn, self.name = fn, name
        self.differentiable = bool(getattr(fn, "differentiable", True) if differentiable is None else differentiable)
        self._full = _takes_three_args(fn)

    def __call__(self, images, prompts=None, metadata=None):
        return self.fn(images, prompts, metadata) if self._full else self.fn(images)

    def __repr__(self):
        return f"FunctionReward({self.name!r})"


def _takes_three_args(fn: Callable) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    pos = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return any(p.kind == p.VAR_POSITIONAL for p in params) or len(pos) >= 3


def as_reward(fn: Any, name: str | None = None, differentiable: bool | None = None) -> Reward:
    """``fn`` itself when it already has ``name`` and ``differentiable``, else a :class:`FunctionReward`."""
    if hasattr(fn, "name") and hasattr(fn, "differentiable") and callable(fn):
        return fn
    if not callable(fn):
        raise RewardError(f"reward '{name}' is not callable ({type(fn).__name__})")
    return FunctionReward(fn, name or getattr(fn, "__name__", repr(fn)), differentiable)


@dataclass
class RewardResult:
    """Outcome of :func:`evaluate_rewards`.

    ``ok``: the batch is usable; then ``scores`` is a finite ``[B]`` float32 tensor (with its
    autograd graph when the reward keeps one) and ``components`` the per-part scores of a
    weighted sum (detached). When the ``"skip"`` policy dropped the batch: ``ok`` is False,
    ``scores`` is None (never a half-valid tensor) and ``reason`` says why in one line.
    """

    scores: Tensor | None
    ok: bool = True
    reason: str = ""
    components: dict[str, Tensor] = field(default_factory=dict)

    def unwrap(self) -> Tensor:
        """``scores``, or :class:`RewardSkipped` with the reason."""
        if not self.ok:
            raise RewardSkipped(self.reason)
        return self.scores


def validate_scores(r: Any, name: str, batch: int) -> Tensor:
    """``r`` as float32 ``[batch]`` (dtype kept for float64), or :class:`RewardError`."""
    if not isinstance(r, Tensor):
        raise RewardError(f"reward '{name}' returned {type(r).__name__}, expected a tensor of shape [{batch}]")
    if r.shape != (batch,):
        raise RewardError(f"reward '{name}' returned shape {tuple(r.shape)}, expected ({batch},)")
    if not (r.is_floating_point() or r.dtype in (torch.int32, torch.int64, torch.bool)):
        raise RewardError(f"reward '{name}' returned dtype {r.dtype}, expected a real floating tensor")
    r = r if r.dtype == torch.float64 else r.to(torch.float32)
    n_bad = int((~torch.isfinite(r)).sum())  # one host read per batch, outside any sampling loop
    if n_bad:
        raise RewardError(f"reward '{name}' returned NaN/inf for {n_bad} of {batch} samples")
    return r


def evaluate_rewards(reward: Any, images: Tensor, prompts: list[str] | None = None,
                     metadata: list[dict] | None = None, *, policy: str = "error",
                     name: str | None = None, timeout: float | None = None) -> RewardResult:
    """Evaluate ``reward`` on one batch and apply the fault policy.

    Faults: the reward raises anything -- any ``BaseException``, ``SystemExit`` and
    ``KeyboardInterrupt`` included, a remote reward's timeout or garbage reply too -- except
    :class:`~rsm_fast.interrupts.RunInterrupted` (the run's own stop, always re-raised untouched);
    it runs past ``timeout`` seconds (see :mod:`.deadline`; None/0: no deadline, called inline;
    a reward whose own total deadline ``deadline_s`` fits within ``timeout``, e.g. an HTTP
    client, is also called inline); it returns a non-tensor, the wrong shape, or NaN/inf.
    ``policy="error"`` raises a one-line :class:`RewardError` naming the reward;
    ``policy="skip"`` returns ``RewardResult(ok=False, scores=None, reason=...)``. Bad
    *arguments* (unknown policy, prompts/metadata of the wrong length, a negative timeout) are
    caller bugs and raise regardless of the policy.
    """
    if policy not in POLICIES:
        raise ValueError(f"reward fault policy must be one of {POLICIES}, got {policy!r}")
    batch = int(images.shape[0])
    for what, xs in (("prompts", prompts), ("metadata", metadata)):
        if xs is not None and len(xs) != batch:
            raise ValueError(f"{what} has {len(xs)} entries for a batch of {batch} images")
    if timeout is not None and not timeout >= 0:
        raise ValueError(f"reward timeout must be None or >= 0 s (task.reward_timeout), got {timeout!r}")
    fn = as_reward(reward, name)
    name = name or fn.name
    own = getattr(fn, "deadline_s", None)
    if timeout and own is not None and own <= timeout:
        timeout = None                       # the reward enforces a deadline no later than ours
    args = (images,) if prompts is None and metadata is None else (images, prompts, metadata)
    raised = None
    try:
        raw = call_with_deadline(fn, args, timeout, reward)
    except RewardRaised as w:
        raised = w.error
    except DeadlineExceeded as e:
        return _fault(f"reward '{name}' did not return within {timeout:g} s (task.reward_timeout); "
                      "the call was abandoned on a daemon thread", policy, e)
    except StillRunning as e:
        return _fault(f"reward '{name}' is still running a call abandoned at its deadline "
                      f"({timeout:g} s, task.reward_timeout); no new call is started until it returns", policy, e)
    if isinstance(raised, RunInterrupted):
        raise raised                         # the trainer's stop signal is never a reward fault
    if isinstance(raised, RewardError):
        return _fault(_named(name, raised), policy, raised)
    if raised is not None:
        # anything else raised inside a user reward -- SystemExit, KeyboardInterrupt too -- is a fault
        text = str(raised)
        return _fault(one_line(f"reward '{name}' raised {type(raised).__name__}" + (f": {text}" if text else "")),
                      policy, raised)
    try:
        scores = validate_scores(raw, name, batch)
        comps = {k: validate_scores(v, f"{name}[{k}]", batch).detach()
                 for k, v in (getattr(fn, "last_components", None) or {}).items()}
    except RewardError as e:
        return _fault(_named(name, e), policy, e)
    return RewardResult(scores=scores, ok=True, components=comps)


def _named(name: str, e: RewardError) -> str:
    """``e`` on one line, prefixed with the reward's name unless it already names it."""
    return one_line(e) if name in str(e) else one_line(f"reward '{name}': {e}")


def _fault(reason: str, policy: str, cause: BaseException) -> RewardResult:
    if policy == "error":
        quiet = isinstance(cause, (RewardError, DeadlineExceeded, StillRunning))
        raise RewardError(reason) from (None if quiet else cause)
    return RewardResult(scores=None, ok=False, reason=reason)


def checked(fn: Callable[[Tensor], Tensor], name: str, x0: Tensor, timeout: float | None = None) -> Tensor:
    """Evaluate a reward and validate its output: a finite float32 tensor of shape ``[B]``
    (:func:`evaluate_rewards` with the ``"error"`` policy and deadline ``timeout``)."""
    return evaluate_rewards(fn, x0, name=name, timeout=timeout).scores.to(torch.float32)


def reward_grad(fn: Callable[[Tensor], Tensor], name: str, x0: Tensor, timeout: float | None = None) -> Tensor:
    """``grad_x0 r(x0)`` by autograd (for rewards without an analytic gradient)."""
    if getattr(fn, "differentiable", True) is False:
        raise RewardError(f"reward '{name}' is not differentiable (first-order estimators need a differentiable reward)")
    with torch.enable_grad():
        x = x0.detach().requires_grad_(True)
        r = checked(fn, name, x, timeout)
        if not r.requires_grad:
            raise RewardError(f"reward '{name}' is not differentiable w.r.t. the samples (first-order estimators need it)")
        (g,) = torch.autograd.grad(r.sum(), x, allow_unused=True)
    if g is None:
        raise RewardError(f"reward '{name}' is not differentiable w.r.t. the samples (first-order estimators need it)")
    return g
