"""The fused epoch (``train.fused_epoch``, issue 20 item 7): one policy forward per record.

An unfused first-order path epoch evaluates the policy three times at every record: in the
rollout (no grad), in the adjoint sweep (grad with respect to the state, :meth:`FirstOrderMixin.
_fo_path_grads`) and in the training step (grad with respect to the weights); the reference twice
(rollout, sweep). Between the rollout and the first optimizer step the weights do not change, so
these are the same functions at the same points. Here the rollout keeps each trained step's graph
(:meth:`RolloutEngine.run` with ``grad=True``: the step's state as a leaf, the model's output
with its graph), the reference is evaluated once with grad at those leaves, the sweep takes
vector-Jacobian products through both (``retain_graph``), and the first inner update's loss is
built on the rollout's own outputs, so its backward is the only pass left. Later inner updates
(``train.inner_updates`` > 1) run their own forwards, as without fusion. Where the policy is the
reference plus a correction (``PolicyHandle.model_on_reference``, the 2-D task's), the rollout
evaluates the reference once per step for both outputs (:func:`shared_reference`), so the sweep's
product also runs the reference's backward once.

The zeroth-order and the per-record first-order estimators gain the training forward only; the
path estimator gains the sweep's two forwards as well. What it costs: every record's activations
are alive at once, from the rollout to the first backward (the memory estimate counts them), so it
is for models where the whole epoch's activations fit -- the 2-D task and digits here, not SD-size
latents. The rollout then runs in the mode the training step would: with grad, and its ``f`` is
the training forward's output exactly (no re-expression of the noise is needed for an exact
on-policy ratio of 1, issue 21 item 8). Modules whose forward depends on ``train()`` / ``eval()``
(dropout, batch norm) are refused: the fused update would see the rollout's eval-mode forward.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
from torch import Tensor, nn

from .families import TrajectoryFamily

if TYPE_CHECKING:
    from .engine.rollout import Records, RolloutEngine
    from .trainer import Trainer

_MODE_DEPENDENT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                   nn.modules.batchnorm._BatchNorm)


def mode_dependent(module: nn.Module) -> str | None:
    """The name of a submodule whose forward differs between train() and eval(), or None."""
    for name, m in module.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) or (isinstance(m, _MODE_DEPENDENT) and m.p > 0):
            return name or type(m).__name__
    return None


def shared_reference(handle, engine: RolloutEngine) -> Callable | None:
    """The rollout's joint call ``(x, t, cond) -> (f, f_ref)`` for :meth:`RolloutEngine.run`, where the
    policy is the reference plus a correction (``PolicyHandle.model_on_reference``): the reference is
    evaluated once and the policy's output built on it, the same ops on the same inputs as two
    separate calls, so ``f`` and ``f_ref`` are bitwise those values; their graphs share the
    reference's, so the sweep's one product also runs its backward once. None where the engine
    calls another model (CUDA graphs) or combines CFG passes."""
    pol = handle.model_on_reference
    if pol is None or engine.cfg_scale is not None or engine.model is not handle.model:
        return None
    ref = handle.reference

    def joint(x: Tensor, t: Tensor, cond: Tensor | None):
        f_ref = ref(x, t, cond)
        return pol(x, t, f_ref, cond), f_ref
    return joint


def reference_with_graph(engine: RolloutEngine, reference, rec: Records, cond: Tensor | None,
                         uncond: Tensor | None) -> tuple[Tensor, int]:
    """The reference's output at every record, evaluated with grad at the rollout's leaf states
    (stored in ``rec.graph[i]["f_ref"]``; kept where the rollout's joint call made it,
    :func:`shared_reference`). Returns the records' outputs (detached, record order) and the
    row-evaluations spent, like :meth:`RolloutEngine.evaluate_records` (a shared evaluation counts
    as the reference's: the policy's output reused it)."""
    outs, nfe = [], {"padding": 0}
    for i in sorted(rec.graph):
        e = rec.graph[i]
        if "f_ref" not in e:
            rows_cond = None if cond is None else cond.index_select(0, engine.plan.group[i])
            with torch.enable_grad():
                e["f_ref"] = engine._evaluate(e["x"], engine._t[i:i + 1], rows_cond, uncond, nfe, model=reference)
        outs.append(e["f_ref"].detach())
    f_ref = torch.cat(outs) if outs else rec.x.new_empty(rec.x.shape)
    return f_ref, rec.x.shape[0] * (2 if engine.cfg_scale is not None else 1)


def sweep_step(tr: Trainer, rec: Records, j: int, ids: Tensor, c, a: Tensor, chunk: int) -> Tensor:
    """:meth:`FirstOrderMixin._fo_sweep_step` on the rollout's graphs: ``a_j = grad_{x_j} [mean_j(x_j,
    f(x_j)) . a_{j+1} - alpha KL_j]`` through step ``j``'s stored policy and reference outputs
    (their rows are the records ``ids``, in order: :meth:`RolloutEngine.graph_unfit`). No model is
    evaluated; the policy's graph is retained for the training backward.

    The outer derivatives are written out (``mean = c_x x + c_f f``, ``KL = 0.5 omega^2 |f -
    f_ref|^2``: ``d/df = c_f a - alpha omega^2 (f - f_ref) = -d/df_ref - ...``), so one
    vector-Jacobian product through the two networks is the step's only autograd call (fp32)."""
    from .transitions import compute_dtype, rowwise

    e = rec.graph[j]
    x, f = e["x"], e["f"]
    dt = compute_dtype(f, a, c.c_f)
    soft = tr.cfg.method.returns == "soft"
    g_f = rowwise(c.c_f, a).to(dt) * a.to(dt)
    outs, grads = [f], [g_f]
    if soft:
        d = float(tr.kl_alpha) * rowwise(c.omega, a).to(dt) ** 2 * (f.detach().to(dt) - e["f_ref"].detach().to(dt))
        grads = [g_f - d]
        if e["f_ref"].requires_grad:    # (the diffusers adapter's reference runs without grad, as unfused)
            outs, grads = [f, e["f_ref"]], grads + [d]
    gx = torch.autograd.grad(outs, x, grad_outputs=[g.to(o.dtype) for o, g in zip(outs, grads)], retain_graph=True)[0]
    gx = gx.to(dt) + rowwise(c.c_x, a).to(dt) * a.to(dt)
    # priced as the forwards it replaces (an input vector-Jacobian product costs about one forward,
    # rsm_fast/cost.py), so NFE budgets never favour the fused sweep; only the reused training
    # forward of the first update leaves the count
    tr.nfe["reference"] += (2 if soft else 1) * ids.shape[0] * (2 if tr.task.cfg_scale is not None else 1)
    return gx.to(a.dtype)


class FusedTrajectoryFamily(TrajectoryFamily):
    """:class:`TrajectoryFamily` with ``train.fused_epoch``: the rollout keeps its graphs and the
    first update's loss reuses its outputs (no training forward is run or counted for it)."""

    def __init__(self, trainer: Trainer):
        super().__init__(trainer)
        from .config import ConfigError

        if trainer.world.active:
            raise ConfigError("config field 'train.fused_epoch' runs in one process (the rollout's forward does "
                              "not go through the DDP / FSDP wrapper)")
        bad = mode_dependent(trainer.policy)
        if bad is not None:
            raise ConfigError(f"config field 'train.fused_epoch': the policy's module {bad!r} behaves differently "
                              "in train() and eval(), so the rollout's forward is not the training forward")
        # the rollout's leaf states require grad: the training backward differentiates the weights only
        trainer.step.backward_inputs = list(trainer.params)
        self._f: Tensor | None = None     # the rollout's outputs with their graphs, record order
        self.reused_forward = False       # the last loss() built on them (no training forward)

    def prepare(self) -> None:
        super().prepare()
        from .config import ConfigError

        for engine in self.tr.engines:
            why = engine.graph_unfit()
            if why is not None:
                raise ConfigError(f"config field 'train.fused_epoch': {why}")

    def sample(self):
        self._f = None
        return self.tr._sample_and_score(grad=True)

    def rows(self, batch):
        rows = super().rows(batch)        # the path sweep runs here, through the graphs
        rec = batch[0]
        if rec.graph is not None:
            self._f = torch.cat([rec.graph[i]["f"] for i in sorted(rec.graph)])
            rec.graph = None              # the states and the reference's graphs are done with
        return rows

    def loss(self, rows, sl: slice):
        self.reused_forward = self._f is not None
        try:
            return super().loss(rows, sl)
        finally:
            self._f = None

    def _forward(self, r, rows, sl: slice) -> Tensor:
        """The first update: the rollout's outputs (their graphs); a later one: its own forward.
        (For zeroth order the re-expression then finds ``f == f_old`` exactly and changes nothing.)"""
        return super()._forward(r, rows, sl) if self._f is None else self._f[sl]

    def after_update(self, rows) -> None:
        self._f = None
