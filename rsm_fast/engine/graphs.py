"""CUDA-graph replay of the rollout model adapter: a small, bounded set of captured row counts.

``GraphedModel(model)`` has the adapter signature ``(x [C, ...], t [C], cond [C, ...] | None)``.
On CUDA, the first call with a new input signature (shapes, dtypes, device, cond present or not;
the CFG ``2C`` batch is just another signature) runs ``warmup`` eager calls on a side stream,
then captures one call with ``torch.cuda.graph`` (``capture_error_mode="thread_local"``: a reward
thread's CUDA calls neither break nor are forbidden by a capture) on static input buffers, in one
memory pool that every graph of the wrapper shares. Every later call copies its inputs into those
buffers (``copy_``) and replays the graph. On CPU, with ``enabled=False``, or with autograd
enabled (graphs here are inference-only), it calls the model eagerly.

Which shapes (issue 21 item 2). A graph replays one row count, so the engines
(:class:`~rsm_fast.engine.rollout.ChunkedEvaluation`) split the rows a step sends to the model
into chunks drawn from a fixed *ladder* (:func:`ladder`, :func:`chunk_sizes`): the cap (the
configured ``rollout.chunk_size``, else the largest power of two not above the widest step) and
the powers of two below it. Greedy, largest first; a remainder is padded up to the next ladder
entry (one call less) only when that costs at most ``pad_tol`` of the step's rows. So

* padding is at most ``pad_tol`` (:data:`PAD_TOL`, 2 %) of every step's rows, hence of a rollout's;
* the distinct row counts (one graph each per input signature; CFG doubles every count) are at
  most ``len(ladder(cap))`` = ``1 + ceil(log2 cap)``, whatever the plan: the online allocator's
  changing steps reuse the same graphs instead of capturing one per new widest step;
* a step of ``R`` rows takes at most ``floor(R / cap) + ceil(log2 cap)`` calls.

Graphs no plan used for ``keep_epochs`` rollout epochs are dropped (:meth:`GraphedModel.begin_epoch`,
called by the engines at the start of ``run``); ``stats()`` counts captures, frees and replays.

Contract (read before use):

* **The returned tensor is the graph's static output buffer**: the next replay of the same
  signature overwrites it. Consume or ``clone()`` it before calling again with that signature.
  (The engines copy every chunk's rows into a fresh output right after the call, so nothing they
  return -- ``Records.f_old``, ``evaluate_records``, ``_evaluate`` -- aliases a graph's buffer.)
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

import math
from functools import lru_cache
from typing import Callable

import torch
from torch import Tensor

PAD_TOL = 0.02        # padding allowed per step, as a fraction of its rows (to save one model call)
KEEP_EPOCHS = 3       # a graph no rollout used for this many epochs is freed


def graphs_supported(device) -> bool:
    """Whether an engine on ``device`` replays graphs (CUDA only; tests substitute a fake)."""
    return torch.device(device).type == "cuda"


def pow2_floor(n: int) -> int:
    """The largest power of two ``<= n`` (``n >= 1``)."""
    return 1 << (int(n).bit_length() - 1)


def ladder(cap: int) -> list[int]:
    """The row counts a graphed engine calls the model with for a row cap ``cap``: ``cap`` and
    every power of two below it, descending (``1 + ceil(log2 cap)`` entries)."""
    cap = int(cap)
    if cap < 1:
        raise ValueError(f"graph ladder cap must be >= 1, got {cap}")
    return [cap] + [1 << j for j in range((cap - 1).bit_length() - 1, -1, -1)]


def max_shapes(cap: int) -> int:
    """Upper bound on the distinct row counts :func:`chunk_sizes` uses for a cap (= ``len(ladder(cap))``)."""
    return 1 + (int(cap) - 1).bit_length()


@lru_cache(maxsize=4096)
def _chunk_sizes(rows: int, cap: int, tol: float) -> tuple[int, ...]:
    steps = ladder(cap)
    q, r = divmod(rows, cap)
    out = [cap] * q
    budget = math.floor(tol * rows)
    while r:
        up = min(s for s in steps if s >= r)          # the smallest entry that holds the rest
        if up - r <= budget:                          # cheap enough: one padded call ends the step
            out.append(up)
            break
        down = max(s for s in steps if s <= r)        # else the largest entry that fits, exactly
        out.append(down)
        r -= down
    return tuple(out)


def chunk_sizes(rows: int, cap: int, tol: float = PAD_TOL) -> list[int]:
    """Row counts of the model calls for ``rows`` rows (in order; each from :func:`ladder` of
    ``cap``): as many ``cap`` as fit, then the rest greedily from the powers of two below it,
    the last call padded up when that costs at most ``floor(tol * rows)`` rows. Their sum minus
    ``rows`` is the padding (``0 <= padding <= floor(tol * rows)``)."""
    rows, cap = int(rows), int(cap)
    if rows < 0 or cap < 1 or not 0.0 <= tol < 1.0:
        raise ValueError(f"chunk_sizes needs rows >= 0, cap >= 1 and 0 <= tol < 1, got {rows}, {cap}, {tol}")
    return list(_chunk_sizes(rows, cap, float(tol)))


def graph_cap(chunk: int, exact: bool) -> int:
    """The largest graphed call for a row cap ``chunk``: ``chunk`` itself when the user set it
    (``rollout.chunk_size``), else the largest power of two not above it (a plan's widest step
    changes from epoch to epoch; a power of two stays on the ladder)."""
    return int(chunk) if exact else pow2_floor(chunk)


def schedule(live_rows, cap: int, tol: float = PAD_TOL) -> dict:
    """What a graphed rollout of steps with ``live_rows`` rows does (CFG not counted): model
    ``calls``, evaluated ``rows``, ``padding`` rows and the distinct ``shapes``."""
    calls, padding, shapes = 0, 0, set()
    for r in live_rows:
        sizes = chunk_sizes(r, cap, tol)
        calls += len(sizes)
        padding += sum(sizes) - r
        shapes.update(sizes)
    return {"calls": calls, "rows": int(sum(live_rows)), "padding": padding, "shapes": sorted(shapes)}


def _sig(a: Tensor | None):
    return None if a is None else (tuple(a.shape), a.dtype, a.device)


class _Captured:
    __slots__ = ("graph", "x", "t", "cond", "out", "last_used")

    def __init__(self, graph, x, t, cond, out, last_used):
        self.graph, self.x, self.t, self.cond, self.out, self.last_used = graph, x, t, cond, out, last_used


class GraphedModel:
    """Wrap ``model`` so that CUDA calls replay a captured graph per input signature.

    ``enabled``: False makes it a pass-through everywhere. ``warmup``: eager calls on a side
    stream before capture (cuDNN/cuBLAS autotuning, lazy init). All graphs share one memory pool.
    ``keep_epochs``: :meth:`begin_epoch` frees a graph not replayed in that many rollout epochs.
    """

    def __init__(self, model: Callable, *, enabled: bool = True, warmup: int = 3, keep_epochs: int = KEEP_EPOCHS):
        if keep_epochs < 1:
            raise ValueError(f"keep_epochs must be >= 1, got {keep_epochs}")
        self.model, self.enabled, self.warmup, self.keep_epochs = model, bool(enabled), int(warmup), int(keep_epochs)
        self._graphs: dict[tuple, _Captured] = {}
        self._pool = None
        self._epoch = None         # the rollout epoch of the last begin_epoch
        self._tick = 0             # rollout epochs seen (begin_epoch with a new epoch)
        self.captures = 0          # graphs captured since construction (for tests and reports)
        self.frees = 0             # graphs dropped (stale, or by reset)
        self.replays = 0

    def __getattr__(self, name):   # forward attributes (e.g. .parameters()) to the wrapped model
        if name == "model":
            raise AttributeError(name)
        return getattr(self.model, name)

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    @property
    def shapes(self) -> list[int]:
        """Row counts of the graphs held now (with CFG, ``2C``), ascending, with repeats per signature."""
        return sorted(k[0][0][0] for k in self._graphs)

    def stats(self) -> dict:
        """Counters a trainer can log: graphs held, captured, freed, replayed."""
        return {"graphs": self.num_graphs, "captures": self.captures, "frees": self.frees, "replays": self.replays}

    def reset(self) -> None:
        """Drop every captured graph (and its buffers); the next call per signature re-captures.
        Needed after parameter tensors are replaced rather than updated in place."""
        self.frees += len(self._graphs)
        self._graphs.clear()
        self._pool = None

    def begin_epoch(self, epoch: int) -> None:
        """A rollout of ``epoch`` starts (the waves of one epoch call it with the same value; only
        a new value counts). Frees the graphs not used in the last ``keep_epochs`` epochs: their
        row counts are ones no current plan sends (the allocator moved, a window moved); a plan
        that needs one again re-captures it. References are dropped; the shared pool keeps the
        memory for the next capture."""
        if epoch == self._epoch:
            return
        self._epoch = epoch
        self._tick += 1
        stale = [k for k, g in self._graphs.items() if self._tick - g.last_used > self.keep_epochs]
        for k in stale:
            del self._graphs[k]
        self.frees += len(stale)

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
        g.last_used = self._tick
        g.x.copy_(x)
        g.t.copy_(t)
        if cond is not None:
            g.cond.copy_(cond)
        g.graph.replay()
        self.replays += 1
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
        # thread_local: only this thread's unsafe CUDA calls invalidate the capture; the reward
        # worker (rewards on a thread while the next wave samples) may keep using CUDA meanwhile
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            out = self.model(sx, st, sc)
        # capture records the kernels without running them: replay once so `out` holds this call's result
        graph.replay()
        self.captures += 1
        return _Captured(graph, sx, st, sc, out, self._tick)
