"""Branching plans as data: which rows exist at every step, where they come from, which are trained.

A plan is compiled once on the host from a :class:`PlanSpec` and then lives on the device; the
rollout engine only gathers by its index tensors, so the step loop never reads anything back.

Execution model. ``R_i`` rows enter step ``i`` (``i = 0..N-1``, 0 = noisiest). The model is
evaluated once per entering row (NFE ``R_i``, doubled with CFG). The ``R_{i+1}`` rows leaving the
step are produced from their source rows ``src[i]``::

    x_{i+1}[r] = c_x x_i[src[r]] + c_f f_i[src[r]] + (sigma_i z[r] if noisy[i][r] else 0)

so children of one parent share the parent's latent and model output bit for bit and differ only
in their noise ``z[r]``, which is a function of ``(seed, key[i][r], i)`` alone (counter-based, see
``noise.py``). A transition with ``trained[i][r]`` becomes one training record.

Kinds (spec §4.4, §7.1):

* ``sde`` — K = 1 trajectories, ``P * S`` rows at every step; a row is noisy where ``sde_mask``
  is on (all steps: Flow-GRPO/DDPO/PCPO; a window: MixGRPO) and trained where also ``train_mask``.
* ``branch`` — an ODE trunk per trajectory; at step i each trunk spawns ``k[i]`` children with one
  SDE step, each child continues by ODE to the end (TempFlow-GRPO, the RSM profiles such as
  ``[6, 6, 8, 10, 0, ...]``, SD1.5 sparse branching ``K = 4`` at every 10th step). Only the
  branching transitions are trained. [DECISION] The trunk is dropped after its last branching
  step (its own final sample is never scored), which saves ``N - 1 - last`` forwards per trunk.
  ``truncate = d >= 0`` (issue 20 item 6, "truncated branches"): a child takes ``d`` ODE steps and
  then jumps to its Tweedie estimate ``x0_hat`` in one step (``x0_hat = (x + sigma_t^2 s) / alpha``,
  affine in the model output), so it costs ``min(d + 1, N - 1 - i)`` forwards instead of
  ``N - 1 - i``. A finished row is *parked*: it stays in the row sets (so records, ancestors and
  the final-sample order do not change) but is not evaluated again (``live[i]`` False) and is
  carried unchanged to the end. ``d = -1`` (default): every child runs to the end.
* ``tree`` — BranchGRPO-style recursive tree: every live row steps with noise where ``sde_mask``
  is on and splits into ``k[i]`` children at steps with ``k[i] > 1``; every noisy transition is
  trained, and shared prefixes are evaluated once.

Row keys are derived from the trajectory id and the path (step and child index of every split),
never from a row's position, so a permuted or re-chunked execution draws the same noise.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

KINDS = ("sde", "branch", "tree")
_MASK64 = (1 << 64) - 1


class PlanError(ValueError):
    """A branching plan that cannot run; raised before any compute."""


def _mix(key: int, step: int, child: int) -> int:
    """A child's key from its parent's key and the split (step, child): splitmix64 finaliser of a
    combination, folded into the positive int64 range. Collisions need ~2^31 rows per epoch."""
    z = (key * 0x9E3779B97F4A7C15 + (step + 1) * 0xBF58476D1CE4E5B9 + (child + 1) * 0x94D049BB133111EB) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def _mix_many(key: Tensor, step: int, child: Tensor) -> Tensor:
    """:func:`_mix` of every ``(key[n], step, child[n])`` at once, in numpy ``uint64`` (whose
    arithmetic wraps modulo 2^64 and shifts logically, as the Python-int version's masks do)."""
    u = np.uint64
    kk = key.numpy().astype(np.uint64)
    cc = child.numpy().astype(np.uint64) + u(1)
    with np.errstate(over="ignore"):
        z = kk * u(0x9E3779B97F4A7C15) + u(((step + 1) * 0xBF58476D1CE4E5B9) & _MASK64) + cc * u(0x94D049BB133111EB)
        z = (z ^ (z >> u(30))) * u(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> u(27))) * u(0x94D049BB133111EB)
        z = (z ^ (z >> u(31))) & u((1 << 63) - 1)
    return torch.from_numpy(z.astype(np.int64))


@dataclass(frozen=True)
class PlanSpec:
    """User-facing description of a rollout (configuration data)."""

    kind: str = "sde"
    num_steps: int = 10
    groups: int = 1                    # P: prompts / conditioning groups
    trunks: int = 1                    # S: trajectories per group (sde: the group size)
    k: tuple[int, ...] = ()            # branch/tree: children per step (len num_steps; the last is ignored)
    sde_mask: tuple[bool, ...] = ()    # sde/tree: noisy steps (default all)
    train_mask: tuple[bool, ...] = ()  # sde: trained steps among the noisy ones (default all)
    group_offset: int = 0              # first group id (a wave of a larger plan: keys and group ids stay global)
    truncate: int = -1                 # branch: ODE steps a child takes before its x0_hat jump (-1 = to the end)


@dataclass
class Plan:
    """A compiled plan. Per step ``i``: ``src[i], noisy[i], trained[i], key[i]`` are ``[R_{i+1}]``;
    ``group[i]`` is ``[R_i]`` (``group[N]`` for the final rows); ``record[i]`` maps each leaving row
    to its record id (-1 if not trained); ``leaf_ancestor`` is ``[N, R_N]``: the record id of each
    final sample's ancestor transition at every step (-1 where that transition is not a record)."""

    spec: PlanSpec
    rows: list[int]                    # R_0 .. R_N
    src: list[Tensor]
    noisy: list[Tensor]
    trained: list[Tensor]
    key: list[Tensor]
    group: list[Tensor]
    record: list[Tensor]
    trunk_rows: list[int]              # rows entering step i that belong to a trunk (branch kind; else 0)
    leaf_ancestor: Tensor
    record_step: Tensor                # [M] step index of each record
    record_group: Tensor               # [M]
    record_parent: Tensor              # [M] record id of the nearest trained ancestor transition, or -1
    initial_key: Tensor                # [R_0] keys of the initial rows (the x_T noise)
    record_set: Tensor = None          # [M] baseline set of each record (see compile_plan)
    set_sizes: list[int] = field(default_factory=list)  # records per baseline set (host)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    live: list[Tensor] = None          # [R_i] per step: rows the model evaluates (False: a parked, finished row)
    jump: list[Tensor] = None          # [R_{i+1}] per step: leaving rows that take the x0_hat jump
    live_rows: list[int] = None        # host: live rows per step (the forwards of step i)

    def __post_init__(self):
        if self.live is None:          # no truncation: every row is evaluated, none jumps
            self.live = [torch.ones(n, dtype=torch.bool, device=self.device) for n in self.rows[:-1]]
            self.jump = [torch.zeros(n, dtype=torch.bool, device=self.device) for n in self.rows[1:]]
        if self.live_rows is None:
            self.live_rows = [int(m.sum()) for m in self.live]

    @property
    def evaluated_rows(self) -> int:
        """Model row-evaluations of one rollout (without CFG): the live rows of every step."""
        return sum(self.live_rows)

    @property
    def num_steps(self) -> int:
        return len(self.src)

    @property
    def num_records(self) -> int:
        return int(self.record_step.numel())

    def nfe(self, cfg: bool = False) -> dict[str, int]:
        """Row-evaluations of the model predicted from the plan: trunk, branch and CFG extras."""
        total = self.evaluated_rows
        trunk = sum(self.trunk_rows)
        g = 2 if cfg else 1
        return {"trunk": trunk, "branch": total - trunk, "cfg": (g - 1) * total, "total": g * total}

    def epoch_cost(self, f_fwd: float = 1.0, f_train: float = 0.0, f_decode: float = 0.0, f_reward: float = 0.0,
                   cfg: bool = False) -> dict[str, float]:
        """The per-epoch cost model of performance.md §3 evaluated on this plan: rollout forwards,
        decode + reward per final sample, and ``f_train`` per training record."""
        g = 2.0 if cfg else 1.0
        out = {"rollout": g * f_fwd * self.evaluated_rows, "decode_reward": (f_decode + f_reward) * self.rows[-1],
               "train": f_train * self.num_records}
        out["total"] = sum(out.values())
        return out

    def to(self, device) -> "Plan":
        dev = torch.device(device)
        mv = lambda ts: [t.to(dev) for t in ts]  # noqa: E731
        return Plan(self.spec, list(self.rows), mv(self.src), mv(self.noisy), mv(self.trained), mv(self.key),
                    mv(self.group), mv(self.record), list(self.trunk_rows), self.leaf_ancestor.to(dev),
                    self.record_step.to(dev), self.record_group.to(dev), self.record_parent.to(dev),
                    self.initial_key.to(dev), self.record_set.to(dev), list(self.set_sizes), dev,
                    mv(self.live), mv(self.jump), list(self.live_rows))


# ---------------------------------------------------------------------------------------------
def _check_spec(spec: PlanSpec) -> tuple[list[int], list[bool], list[bool]]:
    if spec.kind not in KINDS:
        raise PlanError(f"plan.kind must be one of {KINDS}, got {spec.kind!r}")
    N = spec.num_steps
    for name in ("num_steps", "groups", "trunks"):
        v = getattr(spec, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise PlanError(f"plan.{name} must be an integer >= 1, got {v!r}")
    v = spec.group_offset
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise PlanError(f"plan.group_offset must be an integer >= 0, got {v!r}")
    v = spec.truncate
    if isinstance(v, bool) or not isinstance(v, int) or v < -1:
        raise PlanError(f"plan.truncate must be an integer >= -1 (-1 = off), got {v!r}")
    if v >= 0 and spec.kind != "branch":
        raise PlanError(f"plan.truncate finishes the children of a 'branch' plan early; got kind {spec.kind!r}")
    k = list(spec.k)
    if spec.kind == "sde":
        if k:
            raise PlanError("plan.k is only used by 'branch' and 'tree' plans; leave it empty for 'sde'")
    else:
        if len(k) not in (N, N - 1):
            raise PlanError(f"plan.k must list one K per step ({N} or {N - 1} entries), got {len(k)}: a branch at a "
                            f"step that does not exist")
        k = k + [0] * (N - len(k))
        for i, v in enumerate(k):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise PlanError(f"plan.k[{i}] must be an integer >= 0, got {v!r}")
        if not any(k):
            raise PlanError("plan.k has no branching step (all zeros): nothing would be trained")
    sde = list(spec.sde_mask) if spec.sde_mask else [True] * N
    train = list(spec.train_mask) if spec.train_mask else [True] * N
    for name, m in (("sde_mask", sde), ("train_mask", train)):
        if len(m) != N:
            raise PlanError(f"plan.{name} must have {N} entries (one per step), got {len(m)}")
    return k, [bool(b) for b in sde], [bool(b) for b in train]


def compile_plan(spec: PlanSpec, require_records: bool = True) -> Plan:
    """Build the per-step index tensors of ``spec`` on the host (validated first).

    Baseline sets (``record_set``). The records that share a baseline are the transitions that
    leave the same parent row at the same step when there are several of them (the ``K_i``
    siblings of a branching point: their common parent makes the sibling mean an estimate of the
    parent's value), otherwise every record of the same group at the same step (K = 1
    trajectories: the group of one prompt, as in GRPO). ``sde`` plans therefore get one set per
    (step, group), ``branch`` plans one per (step, trunk) and ``tree`` plans one per split point
    plus one per (step, group) at non-splitting steps. ``require_records=False`` allows a plan
    that trains nothing (evaluation rollouts).

    Vectorised per step (the online allocator recompiles the plan whenever it moves a K, so this
    runs every epoch): each live row emits ``counts[j]`` leaving rows in order (a branch trunk: its
    ODE continuation, then its ``k[i]`` children), built with ``repeat_interleave``; ``slot`` is
    the child's index within its parent. The row-by-row loop this replaced is the test oracle
    (``tests/plan_reference.py``), field for field."""
    k, sde, train = _check_spec(spec)
    N, T = spec.num_steps, spec.groups * spec.trunks
    i64 = dict(dtype=torch.int64)
    traj = torch.arange(spec.group_offset * spec.trunks, spec.group_offset * spec.trunks + T, **i64)
    key = traj << 20                                    # live rows: key, group, is-trunk, last record
    grp = traj // spec.trunks
    trunk = torch.full((T,), spec.kind == "branch", dtype=torch.bool)
    last = torch.full((T,), -1, **i64)
    path = torch.empty((T, 0), **i64)                   # record id per step so far (-1: none)
    initial_key = key.clone()
    rows, src, noisy, trained, keys, groups, records, trunk_rows = [T], [], [], [], [], [], [], []
    rec_step, rec_group, rec_parent, rec_src = [], [], [], []
    n_rec = 0
    last_branch = max((i for i, v in enumerate(k) if v > 0), default=-1) if spec.kind == "branch" else -1
    d = spec.truncate
    rem = torch.full((T,), -1, **i64)                   # truncated children: ODE steps left before the jump
    done = torch.zeros(T, dtype=torch.bool)             # parked (already jumped to x0_hat)
    live, jump = [], []
    for i in range(N):
        R = key.numel()
        groups.append(grp)
        trunk_rows.append(int(trunk.sum()))
        live.append(~done)
        cont = int(i < last_branch)                     # branch: does the trunk continue past step i
        if spec.kind == "sde":
            counts = torch.ones(R, **i64)
        elif spec.kind == "branch":
            counts = torch.where(trunk, cont + k[i], 1)
        else:
            counts = torch.full((R,), max(k[i], 1), **i64)
        s_i = torch.repeat_interleave(torch.arange(R, **i64), counts)
        key_s = key.index_select(0, s_i)
        if spec.kind == "sde":
            n_i = torch.full((s_i.numel(),), sde[i])
            t_i = torch.full((s_i.numel(),), sde[i] and train[i])
            new_trunk, k_i = torch.zeros_like(n_i), key_s
        else:
            slot = torch.arange(s_i.numel(), **i64) - (torch.cumsum(counts, 0) - counts).index_select(0, s_i)
            if spec.kind == "branch":
                from_trunk = trunk.index_select(0, s_i)
                n_i = from_trunk & (slot >= cont)       # a one-step SDE child (trained)
                t_i, new_trunk = n_i, from_trunk & ~n_i
                k_i = key_s.clone()
                k_i[n_i] = _mix_many(key_s[n_i], i, slot[n_i] - cont)
            else:
                n_i = torch.full((s_i.numel(),), sde[i])
                t_i, new_trunk = n_i, torch.zeros_like(n_i)
                k_i = key_s if k[i] <= 1 else _mix_many(key_s, i, slot)
        m = int(t_i.sum())
        rid = torch.full((s_i.numel(),), -1, **i64)
        rid[t_i] = torch.arange(n_rec, n_rec + m, **i64)
        grp_s, last_s = grp.index_select(0, s_i), last.index_select(0, s_i)
        rec_step.append(torch.full((m,), i, **i64))
        rec_group.append(grp_s[t_i])
        rec_parent.append(last_s[t_i])
        rec_src.append(s_i[t_i])
        n_rec += m
        if s_i.numel() == 0:
            raise PlanError(f"plan leaves no rows after step {i}")
        if d >= 0:
            rem_s, done_s = rem.index_select(0, s_i), done.index_select(0, s_i)
            child = ~trunk.index_select(0, s_i) & ~done_s          # a live child continuing by ODE
            j_i = child & (rem_s == 0) & (i < N - 1)               # the last step lands on x0 anyway
            rem = torch.where(n_i, d, torch.where(child, rem_s - 1, -1))
            done = done_s | j_i
        else:
            j_i = torch.zeros(s_i.numel(), dtype=torch.bool)
            done = torch.zeros(s_i.numel(), dtype=torch.bool)
        jump.append(j_i)
        key, grp, trunk = k_i, grp_s, new_trunk
        last = torch.where(t_i, rid, last_s)
        path = torch.cat([path.index_select(0, s_i), rid[:, None]], 1)
        rows.append(s_i.numel())
        src.append(s_i)
        noisy.append(n_i)
        trained.append(t_i)
        keys.append(k_i)
        records.append(rid)
    groups.append(grp)
    if n_rec == 0 and require_records:
        raise PlanError("plan trains no transition (check sde_mask / train_mask / k)")
    leaf_ancestor = path.T.contiguous()
    rs, rg, rp, rsrc = (torch.cat(v) for v in (rec_step, rec_group, rec_parent, rec_src))
    record_set, set_sizes = _baseline_sets(rs, rg, rsrc)
    return Plan(spec, rows, src, noisy, trained, keys, groups, records, trunk_rows, leaf_ancestor,
                rs, rg, rp, initial_key, record_set, set_sizes, live=live, jump=jump)


def _first_seen_ids(code: Tensor) -> tuple[Tensor, list[int]]:
    """Id per element of ``code`` numbering the distinct values in order of first appearance, and
    the count of each id."""
    if code.numel() == 0:
        return code.new_empty(0), []
    uniq, inv = torch.unique(code, return_inverse=True)
    first = torch.full((uniq.numel(),), code.numel(), dtype=torch.int64)
    first = first.scatter_reduce(0, inv, torch.arange(code.numel()), reduce="amin")
    rank = torch.empty_like(first)
    rank[torch.argsort(first)] = torch.arange(uniq.numel())
    ids = rank.index_select(0, inv)
    return ids, torch.bincount(ids, minlength=uniq.numel()).tolist()


def _baseline_sets(step: Tensor, group: Tensor, src: Tensor) -> tuple[Tensor, list[int]]:
    """Set id per record (first-seen order): (step, parent row) when the parent has several
    trained children at that step, else (step, group). See :func:`compile_plan`."""
    if step.numel() == 0:
        return step.new_empty(0), []
    W = int(max(int(src.max()), int(group.max()))) + 1
    pair = step * W + src
    _, inv, cnt = torch.unique(pair, return_inverse=True, return_counts=True)
    by_group = cnt.index_select(0, inv) == 1            # an only child: the (step, group) set
    code = step * (2 * W) + by_group.long() * W + torch.where(by_group, group, src)
    return _first_seen_ids(code)


def check_chunk_size(chunk_size) -> int:
    """Model calls take ``chunk_size`` rows (the last chunk of a step padded). Every row's result
    depends only on its own inputs and key, so any size >= 1 is valid; there is no group that a
    chunk has to hold (advantages are computed from the records after the rollout)."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise PlanError(f"rollout.chunk_size must be an integer >= 1, got {chunk_size!r}")
    return chunk_size
