"""CUDA-graph replay of the rollout model adapter, one graph per static input shape.

``GraphedModel(model)`` has the adapter signature ``(x [C, ...], t [C], cond [C, ...] | None)``.
On CUDA, the first call with a new input signature (shapes, dtypes, device, cond present or not;
the CFG ``2C`` batch is just another signature) runs ``warmup`` eager calls on a side stream,
then captures one call with ``torch.cuda.graph`` on static input buffers. Every later call copies
its inputs into those buffers (``copy_``) and replays the graph. On CPU, with
``enabled=False``, or with autograd enabled (graphs here are inference-only), it calls the model
eagerly.

Contract (read before use):

* **The returned tensor is the graph's static output buffer**: the next replay of the same
  signature overwrites it. Consume or ``clone()`` it before calling again with that signature.
  (``RolloutEngine`` combines the CFG halves into a fresh tensor right away, and clones the
  un-guided output when a step needs more than one chunk.)
* **Parameters are read from their storage at replay time**, so in-place updates
  (``optimizer.step()``, ``p.copy_(...)``, ``p.add_(...)``) are seen by the next replay.
  Replacing a parameter or buffer *object* (``module.weight = nn.Parameter(...)``, loading a
  new LoRA by assignment, ``load_state_dict(..., assign=True)``, ``.to(...)`` that reallocates)
  leaves the graph reading the old storage: call :meth:`reset` to re-capture.
* The model must be capturable: no host syncs (``.item()``, ``nonzero``, printing tensors), no
  data-dependent Python control flow, no CPU tensors created inside ``forward``; RNG inside the
  model is replayed with fresh Philox offsets (the rollout's own noise is drawn outside).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def _sig(a: Tensor | None):
    return None if a is None else (tuple(a.shape), a.dtype, a.device)


class _Captured:
    __slots__ = ("graph", "x", "t", "cond", "out")

    def __init__(self, graph, x, t, cond, out):
        self.graph, self.x, self.t, self.cond, self.out = graph, x, t, cond, out


class GraphedModel:
    """Wrap ``model`` so that CUDA calls replay a captured graph per input signature.

    ``enabled``: False makes it a pass-through everywhere. ``warmup``: eager calls on a side
    stream before capture (cuDNN/cuBLAS autotuning, lazy init). All graphs share one memory pool.
    """

    def __init__(self, model: Callable, *, enabled: bool = True, warmup: int = 3):
        self.model, self.enabled, self.warmup = model, bool(enabled), int(warmup)
        self._graphs: dict[tuple, _Captured] = {}
        self._pool = None
        self.captures = 0          # graphs captured since construction (for tests and reports)

    def __getattr__(self, name):   # forward attributes (e.g. .parameters()) to the wrapped model
        if name == "model":
            raise AttributeError(name)
        return getattr(self.model, name)

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def reset(self) -> None:
        """Drop every captured graph (and its buffers); the next call per signature re-captures.
        Needed after parameter tensors are replaced rather than updated in place."""
        self._graphs.clear()
        self._pool = None

    def _active(self, x: Tensor) -> bool:
        return self.enabled and x.is_cuda and not torch.is_grad_enabled()

    def __call__(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        if not self._active(x):
            return self.model(x, t, cond)
        key = (_sig(x), _sig(t), _sig(cond))
        g = self._graphs.get(key)
        if g is None:
            g = self._graphs[key] = self._capture(x, t, cond)
            return g.out          # capture ran the model on exactly these inputs
        g.x.copy_(x)
        g.t.copy_(t)
        if cond is not None:
            g.cond.copy_(cond)
        g.graph.replay()
        return g.out

    def _capture(self, x: Tensor, t: Tensor, cond: Tensor | None) -> _Captured:
        sx, st = x.clone(memory_format=torch.contiguous_format), t.clone(memory_format=torch.contiguous_format)
        sc = None if cond is None else cond.clone(memory_format=torch.contiguous_format)
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.model(sx, st, sc)
        torch.cuda.current_stream(x.device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self.model(sx, st, sc)
        # capture records the kernels without running them: replay once so `out` holds this call's result
        graph.replay()
        self.captures += 1
        return _Captured(graph, sx, st, sc, out)
