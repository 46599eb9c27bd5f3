"""The reference plan compiler: the original row-by-row Python loop, kept only as the test oracle
for the vectorised :func:`rsm_fast.engine.plan.compile_plan` (tests/test_plan_compile.py checks
every field of both on random specs of every kind)."""
from __future__ import annotations

import torch
from torch import Tensor

from rsm_fast.engine.plan import Plan, PlanError, PlanSpec, _check_spec

_MASK64 = (1 << 64) - 1


def _mix(key: int, step: int, child: int) -> int:
    """A child's key from its parent's key and the split (step, child): splitmix64 finaliser of a
    combination, folded into the positive int64 range. Collisions need ~2^31 rows per epoch."""
    z = (key * 0x9E3779B97F4A7C15 + (step + 1) * 0xBF58476D1CE4E5B9 + (child + 1) * 0x94D049BB133111EB) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def compile_plan_reference(spec: PlanSpec, require_records: bool = True) -> Plan:
    """Build the per-step index tensors of ``spec`` on the host (validated first).

    Baseline sets (``record_set``). The records that share a baseline are the transitions that
    leave the same parent row at the same step when there are several of them (the ``K_i``
    siblings of a branching point: their common parent makes the sibling mean an estimate of the
    parent's value), otherwise every record of the same group at the same step (K = 1
    trajectories: the group of one prompt, as in GRPO). ``sde`` plans therefore get one set per
    (step, group), ``branch`` plans one per (step, trunk) and ``tree`` plans one per split point
    plus one per (step, group) at non-splitting steps. ``require_records=False`` allows a plan
    that trains nothing (evaluation rollouts)."""
    k, sde, train = _check_spec(spec)
    N, T = spec.num_steps, spec.groups * spec.trunks
    t0 = spec.group_offset * spec.trunks       # global id of the first trajectory
    # a live row: (key, group, is_trunk, last record id on its path)
    live = [(t << 20, t // spec.trunks, spec.kind == "branch", -1) for t in range(t0, t0 + T)]
    initial_key = torch.tensor([r[0] for r in live], dtype=torch.int64)
    rows, src, noisy, trained, keys, groups, records, trunk_rows = [len(live)], [], [], [], [], [], [], []
    rec_step, rec_group, rec_parent, rec_src = [], [], [], []
    path_records: list[list[int]] = [[] for _ in live]   # per live row: record id per step so far
    last_branch = max((i for i, v in enumerate(k) if v > 0), default=-1) if spec.kind == "branch" else -1
    for i in range(N):
        groups.append(torch.tensor([r[1] for r in live], dtype=torch.int64))
        trunk_rows.append(sum(1 for r in live if r[2]))
        nxt, s_i, n_i, t_i, k_i, rec_i, paths = [], [], [], [], [], [], []

        def emit(j, key, grp, is_trunk, noise, train_it):
            rid = -1
            if train_it:
                rid = len(rec_step)
                rec_step.append(i)
                rec_group.append(grp)
                rec_parent.append(live[j][3])
                rec_src.append(j)
            nxt.append((key, grp, is_trunk, rid if rid >= 0 else live[j][3]))
            s_i.append(j)
            n_i.append(noise)
            t_i.append(train_it)
            k_i.append(key)
            rec_i.append(rid)
            paths.append(path_records[j] + [rid])

        for j, (key, grp, is_trunk, _) in enumerate(live):
            if spec.kind == "sde":
                emit(j, key, grp, False, sde[i], sde[i] and train[i])
            elif spec.kind == "branch":
                if is_trunk:
                    if i < last_branch:                       # the trunk continues by ODE
                        emit(j, key, grp, True, False, False)
                    for c in range(k[i]):                      # one-step SDE children
                        emit(j, _mix(key, i, c), grp, False, True, True)
                else:                                          # a child continues by ODE
                    emit(j, key, grp, False, False, False)
            else:  # tree
                width = max(k[i], 1)
                for c in range(width):
                    ck = key if width == 1 else _mix(key, i, c)
                    emit(j, ck, grp, False, sde[i], sde[i])
        if not nxt:
            raise PlanError(f"plan leaves no rows after step {i}")
        live, path_records = nxt, paths
        rows.append(len(live))
        src.append(torch.tensor(s_i, dtype=torch.int64))
        noisy.append(torch.tensor(n_i, dtype=torch.bool))
        trained.append(torch.tensor(t_i, dtype=torch.bool))
        keys.append(torch.tensor(k_i, dtype=torch.int64))
        records.append(torch.tensor(rec_i, dtype=torch.int64))
    groups.append(torch.tensor([r[1] for r in live], dtype=torch.int64))
    if not rec_step and require_records:
        raise PlanError("plan trains no transition (check sde_mask / train_mask / k)")
    leaf_ancestor = (torch.tensor(path_records, dtype=torch.int64).reshape(len(live), N).T.contiguous()
                     if live else torch.empty(N, 0, dtype=torch.int64))
    record_set, set_sizes = _baseline_sets(rec_step, rec_group, rec_src)
    return Plan(spec, rows, src, noisy, trained, keys, groups, records, trunk_rows, leaf_ancestor,
                torch.tensor(rec_step, dtype=torch.int64), torch.tensor(rec_group, dtype=torch.int64),
                torch.tensor(rec_parent, dtype=torch.int64), initial_key, record_set, set_sizes)


def _baseline_sets(step: list[int], group: list[int], src: list[int]) -> tuple[Tensor, list[int]]:
    """Set id per record (first-seen order): (step, parent row) when the parent has several
    trained children at that step, else (step, group). See :func:`compile_plan`."""
    per_parent: dict[tuple[int, int], int] = {}
    for i, j in zip(step, src):
        per_parent[(i, j)] = per_parent.get((i, j), 0) + 1
    ids: dict[tuple, int] = {}
    sizes: list[int] = []
    out = []
    for i, g, j in zip(step, group, src):
        key = ("parent", i, j) if per_parent[(i, j)] > 1 else ("group", i, g)
        if key not in ids:
            ids[key] = len(sizes)
            sizes.append(0)
        sizes[ids[key]] += 1
        out.append(ids[key])
    return torch.tensor(out, dtype=torch.int64), sizes
