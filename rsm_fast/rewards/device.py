"""Where a model-backed reward runs: the run's device, in the precision its release runs it in.

A reward model built from a spec (:func:`~.registry.make_reward` / ``resolve(spec, task, ...)``)
is placed on ``task.device`` -- ``train.device``, or the rank's ``cuda:LOCAL_RANK`` -- so images
decoded on the GPU are scored there without a round trip through the host. Its precision:

* CPU (and ``meta``): float32 weights, no autocast -- the reference the other precisions are
  checked against (tests/test_reward_device.py).
* CUDA: the release's own (:data:`RELEASE`): the LAION aesthetic predictor float32
  (kvablack/ddpo-pytorch ``rewards.py``: ``AestheticScorer(dtype=torch.float32).cuda()``; the same
  in flow_grpo), PickScore float32 (flow_grpo ``PickScoreScorer(device, dtype=torch.float32)``; the
  model card loads it without a dtype), HPSv2.1 float32 weights under float16 autocast
  (tgxs002/HPSv2 ``score.py``: ``precision='amp'``, ``with torch.cuda.amp.autocast()``).

:func:`check_device` turns a device this machine cannot use into one :class:`~.base.RewardError`
line, before any weights load.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .base import RewardError


@dataclass(frozen=True)
class Precision:
    """``dtype``: the frozen weights'; ``autocast``: the forward runs under
    ``torch.autocast(device.type, dtype=autocast)`` (None: no autocast)."""

    dtype: torch.dtype = torch.float32
    autocast: torch.dtype | None = None

    def __str__(self) -> str:
        name = str(self.dtype).replace("torch.", "")
        return name if self.autocast is None else f"{name} weights, {str(self.autocast).replace('torch.', '')} autocast"


FP32 = Precision()
RELEASE: dict[str, Precision] = {
    "aesthetic": FP32,
    "pickscore": FP32,
    "hps": Precision(torch.float32, torch.float16),
}


def check_device(device, who: str) -> torch.device:
    """``device`` (None: cpu) as a ``torch.device`` this machine can place a reward model on, else a
    one-line :class:`RewardError` naming the reward."""
    try:
        dev = torch.device("cpu" if device is None else device)
    except (RuntimeError, TypeError, ValueError):
        raise RewardError(f"reward '{who}': {device!r} is not a torch device (use cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RewardError(f"reward '{who}': device '{dev}' but CUDA is not available here "
                              f"(torch {torch.__version__}); use train.device=cpu")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise RewardError(f"reward '{who}': device '{dev}' but this machine has {n} CUDA device(s)")
    elif dev.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise RewardError(f"reward '{who}': device '{dev}' but MPS is not available here; use cpu")
    elif dev.type not in ("cpu", "meta"):
        raise RewardError(f"reward '{who}': device type '{dev.type}' is not supported (use cpu or cuda)")
    return dev


def release_precision(who: str, device) -> Precision:
    """:data:`RELEASE`'s precision of ``who`` on a CUDA device; float32 elsewhere (and for unknown names)."""
    return RELEASE.get(who, FP32) if torch.device(device).type == "cuda" else FP32


def resolve_precision(who: str, device, dtype=None, autocast=None) -> Precision:
    """An explicit ``dtype`` / ``autocast`` (either given: that, float32 weights by default), else
    the release's precision on ``device``."""
    if dtype is None and autocast is None:
        return release_precision(who, device)
    return Precision(dtype or torch.float32, autocast)


def task_device(task) -> torch.device:
    """Where the task's models run (``task.device``), cpu without a task or without that attribute."""
    dev = getattr(task, "device", None) if task is not None else None
    return torch.device(dev) if dev is not None else torch.device("cpu")


def autocast_context(device, dtype):
    """``torch.autocast(device.type, dtype)``, or a no-op for ``dtype`` None or the meta device."""
    dev = torch.device(device)
    if dtype is None or dev.type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(dev.type, dtype=dtype)
