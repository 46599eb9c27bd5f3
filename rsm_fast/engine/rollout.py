"""The rollout engine: executes a compiled :class:`~rsm_fast.engine.plan.Plan` with static shapes.

Per step ``i``: the ``R_i`` entering rows are evaluated by the model in chunks of ``chunk_size``
rows; the leaving rows gather their
source row's latent and output (``plan.src``) and take one fused step + log-prob
(``rsm_fast.ops.sampler_step``) with the transition's SDE or ODE coefficients per row
(``plan.noisy``). The noise of row ``r`` is ``noise.gaussian(seed, key[r], i)``: it does not
depend on chunking, row order or process count. Everything the loop indexes with is built on the
host when the engine is created, so the loop never reads a device value back (no host sync).

Model adapter: ``model(x [C, ...], t [C], cond [C, ...] | None) -> native output [C, ...]`` where
``t`` is the transition's time value per row (VP: train-timestep index; RF: t in [0, 1]). With
``cfg_scale`` set, the model is called on ``2C`` rows (cond, then uncond) and combined as
``f_u + w (f_c - f_u)``; NFE counts both halves.

``graphs=True`` on a CUDA device replays the model from CUDA graphs
(:class:`~rsm_fast.engine.graphs.GraphedModel`; see its contract on in-place parameter updates and
``reset()``); elsewhere the flag is ignored and ``graphs_active`` is False.

[DECISION] A graph replays one row count, so a graphed engine splits the rows a step sends to
the model (its live rows) into chunks from a fixed ladder (:func:`~rsm_fast.engine.graphs.chunk_sizes`:
``rollout.chunk_size``, else the largest power of two not above the widest step, and the powers of
two below it), padding a step's last chunk only when that costs at most 2 % of its rows. Padding
every step to the widest one (the rule before issue 21) evaluated 1.35-1.94x the rows of the
branching presets and captured a new graph whenever the online allocator changed the widest step;
the ladder holds padding under 2 % and the graphs to ``1 + ceil(log2 cap)`` row counts. Eager
calls take ``chunk_size`` rows and the rest, unpadded: a branching plan's steps hold very
different row counts (TempFlow's const:6 grows from P to 55 P rows). ``nfe["padding"]`` counts
the padded rows that were evaluated. Every chunk's rows are copied out of the graph's static
output right after its call, so nothing the engine returns aliases a graph buffer.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .. import ops
from ..ops.nvtx import annotate
from ..transitions import GaussianTransition, StepCoeffs
from . import noise as N
from . import graphs as G
from .graphs import GraphedModel
from .plan import Plan, PlanError, check_chunk_size

INITIAL_STEP = (1 << 31) - 1          # noise "step" index of the initial latents x_T


@dataclass
class Records:
    """What the trainer needs from one rollout. ``M`` training records, ``R_N`` final samples."""

    x: Tensor           # [M, ...] state entering the trained transition
    step: Tensor        # [M] step index
    z: Tensor           # [M, ...] sampling noise (x' = mean_old + sigma z)
    f_old: Tensor       # [M, ...] rollout native output (CFG-combined) at x
    log_prob: Tensor    # [M] log pi_old(x'|x) (mean over latent dims)
    group: Tensor       # [M] group (prompt) id
    parent: Tensor      # [M] record id of the nearest trained ancestor, -1 if none
    x0: Tensor          # [R_N, ...] final samples
    x0_group: Tensor    # [R_N]
    leaf_ancestor: Tensor  # [N, R_N] record id of each sample's ancestor transition per step (-1: none)
    nfe: dict           # row-evaluations: trunk / branch / cfg / total (+ padding, not counted in total)
    # run(grad=True) only: {step i: {"x": leaf state [R, ...] (requires grad), "f": the model's
    # output [R, ...] with its graph}} per trained step; the records are those steps' rows, step-major
    graph: dict | None = None


def finish_rows(c: StepCoeffs, transition: GaussianTransition, step: int, jump: Tensor, parked: Tensor) -> StepCoeffs:
    """Step ``step``'s per-row coefficients with truncated-branch rows rewritten (plan.py, ``truncate``):
    a ``jump`` row lands on its Tweedie estimate ``x0_hat = (x + sigma_t^2 s) / alpha`` with
    ``s = (f - p_x x) / p_s``, i.e. ``c_x = (1 - sigma_t^2 p_x / p_s) / alpha`` and
    ``c_f = sigma_t^2 / (p_s alpha)`` (no noise); a ``parked`` row is copied (``c_x = 1, c_f = 0``)."""
    tab = {k: float(transition.table(k)[step]) for k in ("alpha", "sigma_t", "p_x", "p_s")}
    s2, a, px, ps = tab["sigma_t"] ** 2, tab["alpha"], tab["p_x"], tab["p_s"]
    one, zero = torch.ones_like(c.c_x), torch.zeros_like(c.c_x)
    return dataclasses.replace(
        c, c_x=torch.where(jump, (1.0 - s2 * px / ps) / a * one, torch.where(parked, one, c.c_x)),
        c_f=torch.where(jump, s2 / (ps * a) * one, torch.where(parked, zero, c.c_f)),
        sigma=torch.where(jump | parked, zero, c.sigma), stochastic=c.stochastic & ~(jump | parked))


class ChunkedEvaluation:
    """Model calls on many rows in fixed-size chunks, with CFG and graph replay: needs ``model``,
    ``chunk``, ``cfg_scale`` and ``graphs_active`` (the rollout engines of this package);
    ``chunk_exact`` (``chunk`` was the user's ``rollout.chunk_size``, not a default) and
    ``graph_pad_tol`` shape the graphed chunks (:func:`~rsm_fast.engine.graphs.chunk_sizes`)."""

    chunk_exact = True
    graph_pad_tol = G.PAD_TOL

    def _evaluate(self, x: Tensor, t_rows: Tensor, cond: Tensor | None, uncond: Tensor | None, nfe: dict,
                  model: Callable | None = None, chunk: int | None = None) -> Tensor:
        """Model output for every row (``t_rows``: ``[1]`` shared or ``[R]`` per row), in
        chunks of at most ``chunk`` rows (default the engine's)."""
        R, C = x.shape[0], chunk or self.chunk
        model = self.model if model is None else model
        if self.graphs_active and model is self.model and R > 0:
            cap = G.graph_cap(C, exact=self.chunk_exact and C == self.chunk)
            sizes = G.chunk_sizes(R, cap, self.graph_pad_tol)
            return self._evaluate_graphed(x, t_rows, cond, uncond, nfe, model, sizes)
        outs = []
        for s in range(0, R, C):
            xs = x[s:s + C]
            n = xs.shape[0]
            cs = None if cond is None else cond[s:s + C]
            t = t_rows.expand(n) if t_rows.numel() == 1 else t_rows[s:s + C]
            outs.append(self._call(model, xs, t, cs, uncond))
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def _evaluate_graphed(self, x: Tensor, t_rows: Tensor, cond: Tensor | None, uncond: Tensor | None, nfe: dict,
                          model: Callable, sizes: list[int]) -> Tensor:
        """Calls of ``sizes`` rows each (the last one padded to its captured shape; padding rows
        are discarded), every chunk's rows copied into one fresh output at once: the next replay
        overwrites a graph's output buffer, and the caller may keep the result."""
        R, out, s = x.shape[0], None, 0
        for m in sizes:
            xs = x[s:s + m]
            n = xs.shape[0]
            cs = None if cond is None else cond[s:s + m]
            t = t_rows.expand(m) if t_rows.numel() == 1 else t_rows[s:s + m]
            if n < m:  # pad to the captured shape
                pad = m - n
                xs = torch.cat([xs, xs.new_zeros((pad, *xs.shape[1:]))])
                cs = None if cs is None else torch.cat([cs, cs[:1].expand(pad, *cs.shape[1:])])
                if t.shape[0] < m:
                    t = torch.cat([t, t[:1].expand(m - t.shape[0])])
                nfe["padding"] += pad * (2 if self.cfg_scale is not None else 1)
            f = self._call(model, xs, t, cs, uncond)
            if out is None:
                out = f.new_empty((R, *f.shape[1:]))
            out[s:s + n].copy_(f[:n])
            s += n
        return out

    def _call(self, model: Callable, xs: Tensor, t: Tensor, cs: Tensor | None, uncond: Tensor | None) -> Tensor:
        """One model call on ``m`` rows, CFG-combined (``2m`` rows in the call) when ``cfg_scale`` is set."""
        if self.cfg_scale is None:
            return model(xs, t, cs)
        m = xs.shape[0]
        uc = uncond.expand(m, *uncond.shape[1:]) if uncond is not None else None
        both = model(torch.cat([xs, xs]), torch.cat([t, t]), None if cs is None else torch.cat([cs, uc]))
        f_c, f_u = both[:m], both[m:]
        return f_u + self.cfg_scale * (f_c - f_u)


class RolloutEngine(ChunkedEvaluation):
    def __init__(self, model: Callable, transition: GaussianTransition, plan: Plan, *, chunk_size: int | None = None,
                 seed: int = 0, cfg_scale: float | None = None, device="cpu", dtype=torch.float32,
                 graphs: bool = False):
        if plan.num_steps != transition.num_steps:
            raise PlanError(f"plan has {plan.num_steps} steps but the transition has {transition.num_steps}")
        self.model, self.seed, self.cfg_scale = model, int(seed), cfg_scale
        self.device, self.dtype = torch.device(device), dtype
        self.graphs_active = bool(graphs) and G.graphs_supported(self.device)
        if self.graphs_active:  # engines of one epoch's waves (and epochs' plans) share one set of graphs
            self.model = model if isinstance(model, GraphedModel) else GraphedModel(model)
        self.plan = plan.to(self.device)
        self.chunk = check_chunk_size(chunk_size if chunk_size is not None else max(plan.rows))
        self.chunk_exact = chunk_size is not None
        # index sets from the host copy, once, here (their sizes are host metadata in the loop)
        self._noisy_idx = [torch.nonzero(m).flatten().to(self.device) for m in plan.noisy]
        self._train_idx = [torch.nonzero(m).flatten().to(self.device) for m in plan.trained]
        tr = transition
        # per step: time value of the entering rows, coefficients of the leaving rows (SDE/ODE per row)
        self._t = tr.table("t").to(self.device, dtype)
        self._coeffs = [tr.coeffs(torch.full((plan.rows[i + 1],), i, dtype=torch.long, device=self.device),
                                  self.plan.noisy[i], dtype=dtype) for i in range(plan.num_steps)]
        # truncated branches: rows the model evaluates (None = all), jump and parked rows' coefficients
        self._live_idx = [None if n == r else torch.nonzero(m).flatten().to(self.device)
                          for n, r, m in zip(plan.live_rows, plan.rows, plan.live)]
        for i in range(plan.num_steps):
            if self._live_idx[i] is not None or bool(plan.jump[i].any()):
                self._coeffs[i] = finish_rows(self._coeffs[i], tr, i, self.plan.jump[i],
                                              ~self.plan.live[i].index_select(0, self.plan.src[i]))
        self._row_ids = [torch.full((t.numel(),), i, dtype=torch.long, device=self.device)
                         for i, t in enumerate(self._train_idx)]
        # records leave the loop step by step in row order; the plan numbers them its own way (a
        # compiled plan: the same order; merged waves: wave-major), so put them where the plan says
        emitted = torch.cat([plan.record[i][torch.nonzero(m).flatten()] for i, m in enumerate(plan.trained)])
        ident = torch.arange(emitted.numel())
        self._record_order = None if torch.equal(emitted, ident) else torch.argsort(emitted).to(self.device)

    # ------------------------------------------------------------------------------------------
    def initial_latents(self, shape: tuple[int, ...], epoch: int = 0) -> Tensor:
        """Standard-normal ``x_T`` per initial row from the counter-based generator."""
        seed = self.epoch_seed(epoch)
        return N.gaussian(seed, self.plan.initial_key, INITIAL_STEP, shape, dtype=self.dtype, device=self.device)

    def epoch_seed(self, epoch: int) -> int:
        return (self.seed * 1_000_003 + int(epoch)) & ((1 << 62) - 1)

    def graph_unfit(self) -> str | None:
        """Why this plan cannot keep its forwards' graphs (``run(grad=True)``), or None: every
        trained step must train every row it evaluates, in row order, with no branching, truncation
        or CUDA graphs, so that step i's records are its rows and their graph is the step's call."""
        if not hasattr(self, "_unfit"):       # host metadata of a fixed plan: once per engine
            self._unfit = self._check_graph_fit()
        return self._unfit

    def _check_graph_fit(self) -> str | None:
        plan = self.plan
        if self.graphs_active:
            return "rollout.graphs replays graphs without autograd"
        if self._record_order is not None:
            return "the plan's records are not in step-major row order (merged waves)"
        for i in range(plan.num_steps):
            if not self._train_idx[i].numel():
                continue
            R = plan.rows[i]
            if (plan.rows[i + 1] != R or self._train_idx[i].numel() != R or self._live_idx[i] is not None
                    or bool(plan.jump[i].any()) or not torch.equal(plan.src[i].cpu(), torch.arange(R))
                    or not torch.equal(plan.leaf_ancestor[i].cpu(), plan.record[i].cpu())):
                return f"step {i} branches, truncates or trains only some of its rows"
        return None

    def run(self, x_init: Tensor | None = None, cond: Tensor | None = None, uncond: Tensor | None = None, *,
            latent_shape: tuple[int, ...] | None = None, epoch: int = 0, grad: bool = False,
            joint: Callable | None = None) -> Records:
        """Roll out the plan. ``cond``: ``[P, ...]`` per group (rows gather by group id); ``uncond``:
        one ``[1, ...]`` unconditional embedding for CFG. Without ``x_init`` the initial latents are
        standard normal from the counter-based generator (``latent_shape`` per row).

        ``grad=True`` (the fused first-order epoch, :mod:`rsm_fast.fused_path`): every trained
        step's model call runs with autograd on a leaf copy of its state, and ``Records.graph``
        keeps the leaves and outputs, so later passes differentiate the rollout's own forwards
        instead of repeating them. The sampled path is the same as without (the step itself is
        taken on detached values). Needs :meth:`graph_unfit` to be None. ``joint(x, t, cond) -> (f,
        f_ref)``: with ``grad``, a call that returns the policy's and the reference's outputs together
        (one reference evaluation for both, :func:`rsm_fast.fused_path.shared_reference`); the
        graphs then keep ``"f_ref"`` too. Without CFG only (it replaces the engine's model call)."""
        if grad:
            why = self.graph_unfit()
            if why is not None:
                raise PlanError(f"run(grad=True): {why}")
        if joint is not None and (not grad or self.cfg_scale is not None):
            raise PlanError("run(joint=...) needs grad=True and no CFG")
        with torch.no_grad():
            return self._run(x_init, cond, uncond, latent_shape, epoch, grad, joint)

    def _run(self, x_init, cond, uncond, latent_shape, epoch: int, grad: bool, joint: Callable | None) -> Records:
        plan = self.plan
        if x_init is None:
            if latent_shape is None:
                raise PlanError("run() needs x_init or latent_shape")
            x = self.initial_latents(tuple(latent_shape), epoch)
        else:
            if x_init.shape[0] != plan.rows[0]:
                raise PlanError(f"x_init has {x_init.shape[0]} rows but the plan starts with {plan.rows[0]}")
            x = x_init.to(self.device, self.dtype)
        shape = tuple(x.shape[1:])
        seed = self.epoch_seed(epoch)
        if self.graphs_active:
            self.model.begin_epoch(epoch)      # frees the graphs no rollout used for a few epochs
        nfe = {"trunk": 0, "branch": 0, "cfg": 0, "padding": 0}
        keep = {k: [] for k in ("x", "step", "z", "f_old", "log_prob", "group", "parent")}
        graph = {} if grad else None
        for i in range(plan.num_steps):
            label = "trunk" if plan.trunk_rows[i] == plan.rows[i] else "branch"
            with annotate(f"rollout/{label} step {i}", self.device):
                rows_cond = None if cond is None else cond.index_select(0, plan.group[i])
                live = self._live_idx[i]
                if grad and self._train_idx[i].numel():   # graph_unfit: every row trained, none parked
                    leaf = x.detach().requires_grad_(True)
                    with torch.enable_grad():
                        if joint is None:
                            f_g = self._evaluate(leaf, self._t[i:i + 1], rows_cond, uncond, nfe)
                            graph[i] = {"x": leaf, "f": f_g}
                        else:
                            f_g, f_r = joint(leaf, self._t[i:i + 1].expand(leaf.shape[0]), rows_cond)
                            graph[i] = {"x": leaf, "f": f_g, "f_ref": f_r}
                    f = f_g.detach()
                elif live is None:
                    f = self._evaluate(x, self._t[i:i + 1], rows_cond, uncond, nfe)
                elif live.numel() == 0:            # every row parked: nothing to evaluate
                    f = torch.zeros_like(x)
                else:                              # parked rows get f = 0 (their c_f is 0)
                    f_live = self._evaluate(x.index_select(0, live), self._t[i:i + 1],
                                            None if rows_cond is None else rows_cond.index_select(0, live), uncond, nfe)
                    f = f_live.new_zeros((x.shape[0], *f_live.shape[1:])).index_copy_(0, live, f_live)
                nfe["trunk"] += plan.trunk_rows[i]
                nfe["branch"] += plan.live_rows[i] - plan.trunk_rows[i]
                if self.cfg_scale is not None:
                    nfe["cfg"] += plan.live_rows[i]
                src = plan.src[i]
                xs, fs = x.index_select(0, src), f.index_select(0, src)
                z = torch.zeros_like(xs)
                if self._noisy_idx[i].numel():
                    idx = self._noisy_idx[i]
                    z.index_copy_(0, idx, N.gaussian(seed, plan.key[i].index_select(0, idx), i, shape,
                                                     dtype=self.dtype, device=self.device))
                x_next, logp = ops.sampler_step(self._coeffs[i], xs, fs, z)
                if self._train_idx[i].numel():
                    ti = self._train_idx[i]
                    keep["x"].append(xs.index_select(0, ti))
                    keep["z"].append(z.index_select(0, ti))
                    keep["f_old"].append(fs.index_select(0, ti))
                    keep["log_prob"].append(logp.index_select(0, ti))
                    keep["step"].append(self._row_ids[i])
                x = x_next
        nfe["total"] = nfe["trunk"] + nfe["branch"] + nfe["cfg"]
        if not keep["x"]:  # an evaluation plan: no records
            empty = x.new_empty((0, *shape))
            keep = {"x": [empty], "z": [empty], "f_old": [empty], "log_prob": [x.new_empty(0, dtype=torch.float32)],
                    "step": [plan.record_step]}
        out = {k: torch.cat(v) for k, v in keep.items() if v}
        if self._record_order is not None:
            out = {k: v.index_select(0, self._record_order) for k, v in out.items()}
        return Records(x=out["x"], step=out["step"], z=out["z"], f_old=out["f_old"], log_prob=out["log_prob"],
                       group=plan.record_group, parent=plan.record_parent, x0=x, x0_group=plan.group[-1],
                       leaf_ancestor=plan.leaf_ancestor, nfe=nfe, graph=graph)

    @torch.no_grad()
    def evaluate_records(self, model: Callable, records: Records, cond: Tensor | None = None,
                         uncond: Tensor | None = None, chunk_size: int | None = None) -> tuple[Tensor, int]:
        """Another model's output (e.g. the frozen reference) at every record's state and time, with
        the rollout's CFG and chunking (``chunk_size`` defaults to the rollout's). Returns the outputs
        ``[M, ...]`` and the row-evaluations spent (CFG doubles them, padding excluded)."""
        M = records.x.shape[0]
        if M == 0:
            return records.x.new_empty(records.x.shape), 0
        nfe = {"padding": 0}
        t = self._t.index_select(0, records.step)
        rows_cond = None if cond is None else cond.index_select(0, records.group)
        out = self._evaluate(records.x, t, rows_cond, uncond, nfe, model=model, chunk=chunk_size)
        return out, M * (2 if self.cfg_scale is not None else 1)
