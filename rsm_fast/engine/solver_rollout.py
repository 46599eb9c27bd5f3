"""Deterministic rollouts that keep only the final samples, with any solver (issue 19 item 1).

The forward-process methods (DiffusionNFT, AWM) store no trajectory and no log-probability: they
sample with a deterministic ODE solver and keep the clean samples ``x0`` (and the rewards). This
engine runs one of :mod:`rsm_fast.solvers` (``euler``, ``dpm2``, ``unipc``) over a
:class:`~rsm_fast.solvers.Grid` with the same guarantees as :class:`~.rollout.RolloutEngine`:

* the initial latents are the counter-based ``N(0, I)`` of the same row keys and seed, on the
  same noise step (:data:`~.rollout.INITIAL_STEP`), so a solver rollout and an SDE rollout of one
  plan start from the same ``x_T``, and no draw depends on chunking, row order or rank count;
* the model is called in chunks through the rollout engine's own chunked evaluation (CFG on
  ``2C`` rows, CUDA-graph replay on a bounded ladder of row counts with ``graphs=True`` on a GPU,
  :func:`~rsm_fast.engine.graphs.chunk_sizes`); a solver step is a
  per-row linear map whose coefficients were built on the host, so the loop reads nothing back;
* NFE is counted exactly: ``rows * steps`` model rows, twice that with CFG
  (``nfe["cfg"]`` is the unconditional half), ``nfe["padding"]`` apart.

The network sees ``grid.model_t[i]`` as its time (flow: t in [0, 1]; VP: the train-timestep
index), the adapters' convention. Rows are described by their global row keys and group ids, e.g.
a compiled plan's ``initial_key`` and ``group[-1]`` (a K = 1 plan keeps its rows in order).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .. import solvers as SV
from ..ops.nvtx import annotate
from . import noise as N
from . import graphs as G
from .graphs import GraphedModel
from .plan import PlanError, check_chunk_size
from .rollout import INITIAL_STEP, ChunkedEvaluation


@dataclass
class FinalSamples:
    """What a deterministic rollout returns: the final samples, their groups and row keys."""

    x0: Tensor          # [R, ...]
    group: Tensor       # [R] group (prompt) id
    key: Tensor         # [R] global row key (the noise coordinate of x_T)
    nfe: dict           # model rows: steps / cfg / total (+ padding, not counted in total)


class SolverRollout(ChunkedEvaluation):
    def __init__(self, model: Callable, solver: str, native: str, grid: SV.Grid, *, keys: Tensor, group: Tensor,
                 chunk_size: int | None = None, seed: int = 0, cfg_scale: float | None = None, device="cpu",
                 dtype=torch.float32, graphs: bool = False):
        keys, group = torch.as_tensor(keys).flatten(), torch.as_tensor(group).flatten()
        if keys.numel() == 0 or keys.shape != group.shape:
            raise PlanError(f"keys and group must be non-empty and of one length, got {tuple(keys.shape)} and "
                            f"{tuple(group.shape)}")
        self.plan = SV.make_plan(solver, native, grid)        # one-line ValueErrors: solver, native, grid
        self.grid = grid
        self.model, self.seed, self.cfg_scale = model, int(seed), cfg_scale
        self.device, self.dtype = torch.device(device), dtype
        self.graphs_active = bool(graphs) and G.graphs_supported(self.device)
        if self.graphs_active:
            self.model = model if isinstance(model, GraphedModel) else GraphedModel(model)
        self.keys = keys.to(self.device, torch.long)
        self.group = group.to(self.device, torch.long)
        self.rows = int(keys.numel())
        self.chunk = check_chunk_size(chunk_size if chunk_size is not None else self.rows)
        self.chunk_exact = chunk_size is not None
        self._t = grid.model_t.to(self.device, dtype)
        self.num_steps = self.plan.num_steps

    @property
    def nfe_per_rollout(self) -> int:
        """Model rows one :meth:`run` evaluates (CFG counted), padding excluded."""
        return self.rows * self.num_steps * (2 if self.cfg_scale is not None else 1)

    def epoch_seed(self, epoch: int) -> int:
        return (self.seed * 1_000_003 + int(epoch)) & ((1 << 62) - 1)     # as RolloutEngine.epoch_seed

    def initial_latents(self, shape: tuple[int, ...], epoch: int = 0) -> Tensor:
        return N.gaussian(self.epoch_seed(epoch), self.keys, INITIAL_STEP, shape, dtype=self.dtype, device=self.device)

    @torch.no_grad()
    def run(self, cond: Tensor | None = None, uncond: Tensor | None = None, *, x_init: Tensor | None = None,
            latent_shape: tuple[int, ...] | None = None, epoch: int = 0) -> FinalSamples:
        """Solve from ``x_init`` (or the counter-based ``x_T`` of ``latent_shape``) to the final
        samples. ``cond``: ``[P, ...]`` per group; ``uncond``: ``[1, ...]`` for CFG."""
        if x_init is None:
            if latent_shape is None:
                raise PlanError("run() needs x_init or latent_shape")
            x = self.initial_latents(tuple(latent_shape), epoch)
        else:
            if x_init.shape[0] != self.rows:
                raise PlanError(f"x_init has {x_init.shape[0]} rows but the rollout has {self.rows}")
            x = x_init.to(self.device, self.dtype)
        rows_cond = None if cond is None else cond.index_select(0, self.group)
        if self.graphs_active:
            self.model.begin_epoch(epoch)      # frees the graphs no rollout used for a few epochs
        state = SV.init_state(self.plan, x)
        nfe = {"steps": 0, "cfg": 0, "padding": 0}
        for i in range(self.num_steps):
            with annotate(f"rollout/solver step {i}", self.device):
                f = self._evaluate(x, self._t[i:i + 1], rows_cond, uncond, nfe)
                x, _, state = SV.step(self.plan, i, x, f.to(x.dtype), state)
            nfe["steps"] += self.rows
            if self.cfg_scale is not None:
                nfe["cfg"] += self.rows
        nfe["total"] = nfe["steps"] + nfe["cfg"]
        return FinalSamples(x0=x, group=self.group, key=self.keys, nfe=nfe)
