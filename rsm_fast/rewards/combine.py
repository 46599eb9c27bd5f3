"""Combinators: a weighted sum of rewards, and asynchronous evaluation on a worker thread."""
from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import Tensor

from .base import RewardError, RewardResult, as_reward, evaluate_rewards
from .streams import SideStream


class WeightedSum:
    """``sum_k w_k r_k(images, prompts, metadata)``; differentiable iff every part is.

    Each part is validated on its own (a bad part raises a :class:`RewardError` naming it), and
    after every call ``last_components`` maps each part's name to its detached ``[B]`` scores
    (the unweighted values; :func:`evaluate_rewards` reports them as ``RewardResult.components``).
    """

    def __init__(self, terms):
        terms = [(float(w), as_reward(r)) for w, r in terms]
        if not terms:
            raise RewardError("a weighted reward needs at least one term")
        self.terms = terms
        self.differentiable = all(r.differentiable for _, r in terms)
        self.name = "+".join(f"{w:g}*{r.name}" for w, r in terms)
        own = [getattr(r, "deadline_s", None) for _, r in terms]   # parts run one after another
        self.deadline_s = None if any(d is None for d in own) else float(sum(own))
        self.keys, seen = [], {}
        for _, r in terms:               # unique component keys: aesthetic, aesthetic#2, ...
            seen[r.name] = seen.get(r.name, 0) + 1
            self.keys.append(r.name if seen[r.name] == 1 else f"{r.name}#{seen[r.name]}")
        self.last_components: dict[str, Tensor] = {}

    def __call__(self, images: Tensor, prompts=None, metadata=None) -> Tensor:
        total, comps = None, {}
        for key, (w, r) in zip(self.keys, self.terms):
            s = evaluate_rewards(r, images, prompts, metadata, policy="error").scores
            comps[key] = s.detach()
            total = w * s if total is None else total + w * s
        self.last_components = comps
        return total


class AsyncReward:
    """Evaluate a reward on one worker thread so that sampling the next chunk is not blocked.

    ``submit(images, prompts, metadata)`` returns a :class:`~concurrent.futures.Future` whose
    ``result()`` is a :class:`RewardResult` (the ``policy`` applies; with ``"error"`` a fault
    re-raises there as :class:`RewardError`). Batches complete in submission order (a single
    worker). The images are detached and copied at submission -- the caller may overwrite its
    buffers -- so asynchronous scores carry no autograd graph (zeroth-order use). ``timeout`` is
    each batch's deadline (:func:`evaluate_rewards`): past it the future resolves as a fault.

    CUDA images are scored on a stream of their own (:class:`~.streams.SideStream`, one per
    device), so a reward model's kernels overlap the sampler's instead of queueing behind them on
    the default stream: the copy made at submission is marked with an event on the submitting
    thread's stream, the worker's stream waits for that event only, and the worker waits for its
    stream before the future resolves (the scores are complete when ``result()`` returns them).
    """

    def __init__(self, reward, policy: str = "error", name: str | None = None, timeout: float | None = None):
        self.reward = as_reward(reward, name)
        self.name = name or self.reward.name
        self.policy, self.timeout = policy, timeout
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rsm-reward")
        self._lock = threading.Lock()
        self._closed = False
        self._sides: dict[torch.device, SideStream] = {}

    def _side(self, device: torch.device) -> SideStream:
        side = self._sides.get(device)
        if side is None:
            side = self._sides[device] = SideStream(device)
        return side

    def submit(self, images: Tensor, prompts=None, metadata=None) -> Future:
        imgs = images.detach().clone()
        prompts = None if prompts is None else list(prompts)
        metadata = None if metadata is None else [dict(m) for m in metadata]
        with self._lock:
            if self._closed:
                raise RuntimeError(f"AsyncReward '{self.name}' is closed")
            side = self._side(imgs.device)
            mark = side.mark()               # after the copy, on this (the sampling) thread's stream
            return self._pool.submit(self._run, side, mark, imgs, prompts, metadata)

    def _run(self, side: SideStream, mark, images, prompts, metadata) -> RewardResult:
        return side.run(evaluate_rewards, self.reward, images, prompts, metadata, policy=self.policy,
                        name=self.name, timeout=self.timeout, inputs=(images,), after=mark, block=True)

    def close(self, wait: bool = True) -> None:
        with self._lock:
            self._closed = True
        self._pool.shutdown(wait=wait)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
