"""Waves: one epoch's rollout split into sequential sub-rollouts so rewards overlap sampling.

A plan over ``P`` groups is cut into ``W`` waves of whole groups (``split_groups``). Each wave is
compiled with ``PlanSpec.group_offset``, so its rows carry the *global* trajectory keys and group
ids of the full plan: wave ``w`` draws exactly the noise the unsplit plan would draw for those
rows. While wave ``w + 1`` samples, the reward of wave ``w`` runs on a worker thread
(:class:`~rsm_fast.rewards.AsyncReward`); the trainer waits only for what is left at the end.

:func:`merge_plans` glues the waves' compiled plans into one :class:`Plan` (rows, records and
baseline sets in wave order, every index offset), and :func:`merge_records` glues their
:class:`Records` the same way, so credit assignment and advantages run once on the merged epoch
exactly as on an unsplit plan. Baseline sets never cross waves: a set lives inside one group
(``compile_plan``), and waves hold whole groups.
"""
from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from .plan import Plan, PlanError, PlanSpec, compile_plan
from .rollout import Records


def split_groups(groups: int, waves: int) -> list[tuple[int, int]]:
    """``[(first_group, n_groups), ...]``: ``groups`` in ``waves`` contiguous, near-equal parts
    (the first ``groups % waves`` waves get one more)."""
    if isinstance(waves, bool) or not isinstance(waves, int) or waves < 1:
        raise PlanError(f"rollout.waves must be an integer >= 1, got {waves!r}")
    if waves > groups:
        raise PlanError(f"rollout.waves {waves} > the epoch's {groups} group(s): a wave holds whole groups "
                        f"(lower rollout.waves or use more, smaller groups)")
    base, extra = divmod(groups, waves)
    out, g0 = [], 0
    for w in range(waves):
        n = base + (1 if w < extra else 0)
        out.append((g0, n))
        g0 += n
    return out


def wave_plans(spec: PlanSpec, waves: int) -> list[Plan]:
    """The compiled plans of ``spec``'s waves (one plan, ``compile_plan(spec)``, for ``waves == 1``)."""
    if waves == 1:
        return [compile_plan(spec)]
    return [compile_plan(replace(spec, groups=n, group_offset=spec.group_offset + g0))
            for g0, n in split_groups(spec.groups, waves)]


def _offset(t: Tensor, by: int) -> Tensor:
    """``t + by`` where ``t >= 0`` (``-1`` means "none" and stays)."""
    return torch.where(t >= 0, t + by, t)


def merge_plans(plans: list[Plan]) -> Plan:
    """One plan equivalent to running ``plans`` side by side (wave-major row and record order)."""
    if len(plans) == 1:
        return plans[0]
    first = plans[0]
    N = first.num_steps
    if any(p.num_steps != N for p in plans):
        raise PlanError("waves of one epoch must have the same number of steps")
    rows = [sum(p.rows[i] for p in plans) for i in range(N + 1)]
    src, rec = [], []
    for i in range(N):
        row_off, rec_off, s_i, r_i = 0, 0, [], []
        for p in plans:
            s_i.append(p.src[i] + row_off)
            r_i.append(_offset(p.record[i], rec_off))
            row_off += p.rows[i]
            rec_off += p.num_records
        src.append(torch.cat(s_i))
        rec.append(torch.cat(r_i))
    cat = lambda attr, i: torch.cat([getattr(p, attr)[i] for p in plans])  # noqa: E731
    rec_offs, set_offs, r, s = [], [], 0, 0
    for p in plans:
        rec_offs.append(r)
        set_offs.append(s)
        r += p.num_records
        s += len(p.set_sizes)
    spec = replace(first.spec, groups=sum(p.spec.groups for p in plans))
    return Plan(
        spec, rows, src, [cat("noisy", i) for i in range(N)], [cat("trained", i) for i in range(N)],
        [cat("key", i) for i in range(N)], [cat("group", i) for i in range(N + 1)], rec,
        [sum(p.trunk_rows[i] for p in plans) for i in range(N)],
        torch.cat([_offset(p.leaf_ancestor, o) for p, o in zip(plans, rec_offs)], dim=1),
        torch.cat([p.record_step for p in plans]), torch.cat([p.record_group for p in plans]),
        torch.cat([_offset(p.record_parent, o) for p, o in zip(plans, rec_offs)]),
        torch.cat([p.initial_key for p in plans]),
        torch.cat([p.record_set + o for p, o in zip(plans, set_offs)]),
        [n for p in plans for n in p.set_sizes], first.device,
        [cat("live", i) for i in range(N)], [cat("jump", i) for i in range(N)],
        [sum(p.live_rows[i] for p in plans) for i in range(N)])


def merge_records(records: list[Records], merged: Plan) -> Records:
    """The waves' records as one epoch, indexed like ``merged = merge_plans(waves)``."""
    if len(records) == 1:
        return records[0]
    cat = lambda attr: torch.cat([getattr(r, attr) for r in records])  # noqa: E731
    nfe: dict = {}
    for r in records:
        for k, v in r.nfe.items():
            nfe[k] = nfe.get(k, 0) + v
    return Records(x=cat("x"), step=cat("step"), z=cat("z"), f_old=cat("f_old"), log_prob=cat("log_prob"),
                   group=merged.record_group, parent=merged.record_parent, x0=cat("x0"),
                   x0_group=merged.group[-1], leaf_ancestor=merged.leaf_ancestor, nfe=nfe)
