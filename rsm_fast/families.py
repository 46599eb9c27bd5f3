"""Estimator families: what differs between zeroth-order, first-order and forward-process methods.

:meth:`Trainer.epoch <rsm_fast.trainer.Trainer.epoch>` is one loop for all of them; a family fills
its steps (issue 19 item 5). A family is picked from ``method.estimator`` by :func:`make_family`;
adding one is one new module and one line in :data:`FAMILIES`, not a change to the loop.

The interface (every method is called once per epoch, in this order)::

    prepare()                        before the rollout (a MixGRPO window moves the plan)
    sample() -> batch | dict         rollout + rewards, inside the abandonable region; a dict is a
                                     skipped epoch's record (the reward policy said "skip")
    rows(batch) -> rows              the training rows (advantages, guidance, forward-process rows,
                                     no-grad evaluations of other weights)
    num_rows(rows), total_rows(rows) this rank's rows; every rank's (the loss's global normalisation)
    loss(rows, sl) -> (loss, out)    the mean loss of the rows ``sl`` (one micro-batch, with grad);
                                     ``out`` carries ``clipped`` / ``log_ratio`` or is None
    after_update(rows)               after the optimizer steps (shadow weights follow)
    logs(batch, rows, stats) -> dict reward / KL / record counts of the epoch (collectives allowed)
    per_step(batch, rows, seconds)   per-timestep diagnostics and the allocator, timed as "alloc"
    state_dict() / load_state_dict() what the family carries between epochs (checkpoints); None: nothing

Families: :class:`TrajectoryFamily` (``zo``, ``fo_*``: trajectory records of the rollout engine,
the trainer's own zeroth-order and first-order code, :mod:`rsm_fast.fo_guidance`) and
:class:`~rsm_fast.forward_family.ForwardFamily` (``forward``: DiffusionNFT, AWM).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .trainer import Trainer


# Issue 21 item 8: on the first update the training forward re-expresses the rollout's records (zo).
REEXPRESS_ON_POLICY = True


@dataclass
class TrajectoryRows:
    rows: Any            # rsm_fast.trainer.Rows
    coeffs: Any          # the records' StepCoeffs
    shift: Any           # first order: the guidance target shift per record (None for zo)
    group: torch.Tensor  # [M] group id per record
    seen: set = field(default_factory=set)   # micro-batches (start, stop) already re-expressed


@torch.no_grad()
def reexpress_on_policy(f: torch.Tensor, f_old: torch.Tensor, z: torch.Tensor, c) -> None:
    """Make the first update exactly on-policy on any device (issue 21 item 8), in place.

    The rollout sampled ``x' = c_x x + c_f f_old + sigma z``. On a GPU the training forward ``f``
    of the same weights runs other kernels (other batch shapes, compiled regions), so ``f != f_old``
    by rounding, the first update's log-ratio is not 0 and at image clip ranges (1e-4) on-policy
    rows can clip. Writing ``z <- z + (c_f / sigma)(f_old - f)`` and ``f_old <- f`` keeps the sampled
    ``x'`` (up to rounding) and makes ``f - f_old`` exactly 0 at the first update, so its ratio is
    exactly 1; later updates measure the policy's move from there. Deterministic rows (sigma 0)
    keep their ``z`` and ``f_old`` (their ratio is 1 by definition). Arithmetic in float32 (float64
    for float64 records). On the CPU the two forwards agree bit for bit and nothing changes."""
    from .transitions import compute_dtype, rowwise

    sig = c.sigma
    on = sig > 0
    scale = torch.where(on, c.c_f / torch.where(on, sig, torch.ones_like(sig)), torch.zeros_like(sig))
    cd = compute_dtype(f, f_old, z)
    fd = f.detach()
    z.copy_((z.to(cd) + rowwise(scale, z).to(cd) * (f_old.to(cd) - fd.to(cd))).to(z.dtype))
    f_old.copy_(torch.where(rowwise(on, f_old), fd.to(f_old.dtype), f_old))


class TrajectoryFamily:
    """``zo`` and ``fo_*``: the rollout engine's trajectory records, trained where they were sampled."""

    def __init__(self, trainer: "Trainer"):
        self.tr = trainer

    def prepare(self) -> None:
        tr = self.tr
        if tr.cfg.rollout.window:     # MixGRPO: the SDE window moves every window_every epochs
            from .training_plan import plan_spec

            trans = tr.task.transition
            spec = plan_spec(tr.cfg, trans.num_steps, trans.sde_mask, tr.epochs_done)
            if spec != tr._spec:
                tr._build_plan(spec)

    def sample(self):
        return self.tr._sample_and_score()

    def rows(self, batch) -> TrajectoryRows:
        from .trainer import Rows

        tr, mc = self.tr, self.tr.cfg.method
        rec, f_ref, _, c, record_kl, r, g = batch
        rows = Rows(idx=rec.step, t=tr._t_table.index_select(0, rec.step), x=rec.x, z=rec.z, f_old=rec.f_old,
                    f_ref=f_ref)
        if mc.estimator == "zo":
            rows.adv = tr._advantages(r, record_kl)
        elif g is not None:
            rows.g = tr.credit.mean_over_leaves(g) if mc.estimator == "fo_terminal" else g
        shift = None if mc.estimator == "zo" else tr._fo_guidance(rows, c)
        return TrajectoryRows(rows, c, shift, rec.group)

    def num_rows(self, rows: TrajectoryRows) -> int:
        return rows.rows.x.shape[0]

    def total_rows(self, rows: TrajectoryRows) -> int:
        return self.tr._gplan.num_records

    def loss(self, rows: TrajectoryRows, sl: slice):
        from .trainer import _slice_coeffs, _slice_rows

        tr = self.tr
        r, cs = _slice_rows(rows.rows, sl), _slice_coeffs(rows.coeffs, sl)
        f = self._forward(r, rows, sl)
        key = (sl.start, sl.stop)
        if tr.cfg.method.estimator == "zo" and REEXPRESS_ON_POLICY and key not in rows.seen:
            rows.seen.add(key)             # first update of these rows: f is the rollout policy's
            reexpress_on_policy(f, r.f_old, r.z, cs)
        rw = None if tr._row_weight is None else tr._row_weight[sl]
        return tr._loss(r, cs, f, None if rows.shift is None else rows.shift[sl], rw)

    def _forward(self, r, rows: TrajectoryRows, sl: slice) -> torch.Tensor:
        """The policy's output at the rows ``sl`` (``r``: those rows), with grad."""
        return self.tr._policy_out(r.x, r.t, rows.group[sl])

    def after_update(self, rows: TrajectoryRows) -> None:
        pass

    def logs(self, batch, rows: TrajectoryRows, stats: dict) -> dict:
        tr = self.tr
        r, record_kl = batch[5], batch[4]
        path_kl = tr.credit.path_kl(record_kl).sum(0)          # KL along each final sample's path
        r, path_kl = tr.world.gather(r, op="reward gather"), tr.world.gather(path_kl, op="KL gather")
        return {"reward_mean": float(r.mean()), "reward_std": float(r.std()), "kl": float(path_kl.mean()),
                "records": tr._gplan.num_records}

    def per_step(self, batch, rows: TrajectoryRows, seconds: dict) -> dict:
        return self.tr._per_step(batch[0], rows.rows, rows.shift, rows.coeffs, seconds)

    def state_dict(self) -> None:
        return None

    def load_state_dict(self, state) -> None:
        pass


FAMILIES = {"zo": TrajectoryFamily, "fo_terminal": TrajectoryFamily, "fo_current": TrajectoryFamily,
            "fo_lookahead": TrajectoryFamily, "forward": "forward"}


def make_family(trainer: "Trainer"):
    """The family of ``method.estimator`` (:data:`FAMILIES`; the forward family is imported lazily;
    ``train.fused_epoch``: the trajectory family on the rollout's graphs, :mod:`rsm_fast.fused_path`)."""
    cls = FAMILIES[trainer.cfg.method.estimator]
    if cls == "forward":
        from .forward_family import ForwardFamily as cls
    elif trainer.cfg.train.fused_epoch:
        from .fused_path import FusedTrajectoryFamily as cls
    return cls(trainer)
