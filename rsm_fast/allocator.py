"""Cost-aware allocation of the branching budget over timesteps (spec §4.6, §7; performance.md §3).

Model. At a trained step i a branching parent spawns K_i one-step SDE children; the zeroth-order
guidance estimate is the mean of K_i per-child terms ``psi_j = (sigma_i/b_i) A_j z_j`` (score
units; ``omega_i A_j z_j`` in native units), so its variance is ``v_i / K_i`` with ``v_i`` the
per-branch variance (spec §4.6: ``v_i ~ Sigma_i/b_i^2`` for std-normalised advantages).

Cost. In the engine's ``branch`` plan (``engine/plan.py``) a child at step i is produced from the
trunk's model output at step i (no forward of its own) and continues by ODE, so one more branch
at step i costs ``g (N-1-i)`` forwards (g = 2 with CFG) + decode + reward of its final sample +
one training record + the reference evaluation of that record (``g`` forwards, trainer.py).
The trunk is evaluated up to the last branching step only ([DECISION] in plan.py): a fixed
``g (last+1)`` forwards per trunk, kept out of the linear per-branch price and passed to
:func:`allocate` as ``overhead[last]`` (see :class:`BranchCosts`). Spec §7.3's TempFlow price
``1 + (N-1-i)`` counts the SDE step's forward per child; that is another valid price vector.

Rule. Minimise ``sum_i w_i v_i / K_i`` s.t. ``sum_i c_i K_i <= B``: ``K_i = B sqrt(w_i v_i/c_i) /
sum_j sqrt(w_j v_j c_j)`` (``rule='sqrt'``), or spec §7.3's equal-variance ``K_i = B w_i v_i /
sum_j c_j w_j v_j`` (``rule='linear'``). Steps above ``k_max`` are pinned there and the rest
re-solved (water-filling). [UNCERTAIN] (spec §7.2, §13) whether the paper's "Equal Variance
Reallocation" used K ~ v or K ~ sqrt(v): the default is ``'sqrt'``, because it is the
budget-optimal rule and it reproduces the released integers (highsnr, highsnr2) within +-1 from
``v = Sigma/b^2`` while K ~ v misses them by up to 5 (tests/test_allocator.py).

Dual rule (``objective='variance'`` online, :func:`allocate_for_variance`): the cheapest K with
``sum_i w_i v_i / K_i <= V``, V = the variance the reference profile (the starting one) would have
under the current estimates: ``K_i = clamp(mu sqrt(w_i v_i / c_i), k_min, k_max)`` with mu set by
bisection so the variance is V, then ceilings (variance <= V) and greedy removal of the dearest
branch whose removal keeps it <= V. Steps are never switched off to save variance (dropping a
step would drop its term), only by the clip/SNR tests. The budget stays a cap.

``k_min = 1`` admits single-branch steps: a step with K = 1 has no siblings, so the plan centres
its record on its group at that step (TempFlow's K = 1 original) and its v is measured from that
baseline set's spread (``observe`` takes the baseline-set ids as parents); the default 2 keeps
every branching step centred on siblings.

Integerisation: floor, then largest remainder while the next branch fits the budget, then
greedy fill (largest remaining deficit first) until no single branch fits; ``K_i in {0} u
[k_min, k_max]``. Deactivation: a step whose ideal K is below ``k_min`` is set to 0 (the smallest
first, one at a time) and the budget re-solved on the rest; ``active`` switches steps off for
other reasons (clip fraction, SNR, not trained). Deactivated steps are never re-added.

Online (:class:`OnlineAllocator`): per-step EMAs of the within-parent variance of psi (unbiased,
``1/(K-1)``), of the signal ``|psi_bar|^2/d - var/K`` and of the clip fraction. ``propose`` re-solves
every ``every`` epochs on the eligible steps (not clipped above ``clip_tau``, SNR not below
``snr_min``, not cooling down), then applies hysteresis: each K moves at most ``max_step`` (the
jump between 0 and ``k_min`` counts as one move); a step switched off stays off ``patience`` epochs
(its clip statistic is then forgotten so it can be probed again). Budget after hysteresis:
branches are removed (largest surplus over the target first, inside the hysteresis band; outside
it only if the band cannot reach the budget - the budget wins) until ``sum c K + overhead <= B``,
then added toward the target (largest deficit first) while they fit. Budget left over during a
transition is not spent beyond the target (no oscillation).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .engine.profiles import RELEASED

RULES = ("sqrt", "linear")
OBJECTIVES = ("budget", "variance")

# Released static profiles, K per transition (one entry per sampling step; the last step's entry is
# 0). SD3.5-M 10 steps, shift 3, a = 0.7: spec §7.1 (RSM-code sd35_zeroth_order/config/sd3_matrix.py);
# SD1.5 50 DDIM steps, K = 4 at steps 0,10,20,30,40: spec §7.1
# (RSM-code sd15_zeroth_order/configs/train/base_grpo_pr_uwsigma_lora10.yaml).
PROFILES: dict[str, tuple[int, ...]] = {
    **{name: k + (0,) for name, k in RELEASED.items()},   # one table: rsm_fast.engine.profiles.RELEASED
    "sd15_sparse": tuple(4 if i % 10 == 0 else 0 for i in range(50)),
}


def static_profile(name: str, num_steps: int) -> list[int]:
    """A released profile as K per step; ValueError for an unknown name or another step count."""
    if name not in PROFILES:
        raise ValueError(f"profile {name!r} is not a released profile (known: {', '.join(PROFILES)})")
    prof = PROFILES[name]
    if num_steps != len(prof):
        raise ValueError(f"profile {name!r} is released for {len(prof)} sampling steps, got num_steps={num_steps}")
    return list(prof)


# ------------------------------------------------------------------------------------------------
def _vec(x, name: str, n: int | None = None, lo: float | None = None, strict: bool = False) -> list[float]:
    if isinstance(x, Tensor):
        x = x.detach().to("cpu", torch.float64).reshape(-1).tolist()
    try:
        vals = [float(a) for a in x]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a sequence of numbers, got {type(x).__name__}") from None
    if n is not None and len(vals) != n:
        raise ValueError(f"{name} has {len(vals)} entries, expected {n} (one per step)")
    for i, a in enumerate(vals):
        if not math.isfinite(a) or (lo is not None and (a <= lo if strict else a < lo)):
            raise ValueError(f"{name}[{i}] must be finite and {'>' if strict else '>='} {lo}, got {a}")
    return vals


def _int_arg(x, name: str, lo: int) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or x < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {x!r}")
    return x


def _fits(used: float, budget: float) -> bool:
    return used <= budget + 1e-12 * max(1.0, abs(budget))


def closed_form_variance(transition) -> list[float]:
    """Per-branch variance ``Sigma_i / b_i^2`` of each step (spec §4.6; 0 where sigma or b is 0)."""
    S, b = transition.table("sigma") ** 2, transition.table("b")
    return [float(s / (bb * bb)) if s > 0 and bb != 0 else 0.0 for s, bb in zip(S.tolist(), b.tolist())]


def step_scale(transition, units: str = "score") -> list[float]:
    """Per-step factor of ``psi = scale A z``: ``sigma_i/b_i`` (score units) or ``omega_i`` (native)."""
    if units == "native":
        return transition.table("omega").tolist()
    if units != "score":
        raise ValueError(f"units must be 'score' or 'native', got {units!r}")
    return [s / b if s > 0 and b != 0 else 0.0 for s, b in zip(transition.table("sigma").tolist(), transition.table("b").tolist())]


# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BranchCosts:
    """Per-trunk costs of a branch plan. ``marginal[i]``: one more child at step i (the trunk
    reaching i); ``trunk[i]``: the trunk's forwards when i is the last branching step (the
    ``overhead`` of :func:`allocate`); ``trunks``: trunks per epoch."""

    marginal: list[float]
    rollout: list[float]
    decode_reward: list[float]
    train: list[float]
    reference: list[float]
    trunk: list[float]
    trunks: int

    def profile_cost(self, k) -> float:
        """Exact cost per trunk of the branch plan with ``k`` children per step."""
        k = _vec(k, "k", len(self.marginal), 0.0)
        on = [i for i, a in enumerate(k) if a > 0]
        return sum(c * a for c, a in zip(self.marginal, k)) + (self.trunk[on[-1]] if on else 0.0)

    def epoch_cost(self, k) -> float:
        return self.trunks * self.profile_cost(k)


def branch_costs(plan_or_num_steps, *, f_fwd: float = 1.0, f_decode: float = 0.0, f_reward: float = 0.0,
                 f_train: float = 0.0, f_ref: float | None = None, cfg: bool = False,
                 truncate: int = -1) -> BranchCosts:
    """Marginal cost of one more branch per step in the engine's ``branch`` plan (see module doc).

    Units follow the inputs: ``f_fwd=1`` and the rest 0 gives model evaluations (NFE); measured
    seconds per unit (:func:`seconds_per_unit`) give seconds. ``f_train`` is per training record
    (as in ``Plan.epoch_cost``: include inner updates and CFG), ``f_ref`` per reference row
    (default ``f_fwd``; 0 = not counted), doubled with ``cfg`` like the rollout forwards.
    ``truncate`` (a step count only; a plan carries its own ``spec.truncate``): children finish after
    that many ODE steps with an x0_hat jump, so a child at step i costs ``min(N - 1 - i, d + 1)``."""
    if isinstance(plan_or_num_steps, int) and not isinstance(plan_or_num_steps, bool):
        N, T, d = _int_arg(plan_or_num_steps, "plan_or_num_steps", 1), 1, truncate
    elif hasattr(plan_or_num_steps, "spec"):
        spec = plan_or_num_steps.spec
        if spec.kind != "branch":
            raise ValueError(f"plan_or_num_steps must be a 'branch' plan, got kind {spec.kind!r}")
        N, T, d = spec.num_steps, spec.groups * spec.trunks, spec.truncate
    else:
        raise ValueError(f"plan_or_num_steps must be a compiled Plan or a step count, got {type(plan_or_num_steps).__name__}")
    f_fwd, f_decode, f_reward, f_train = (_vec([x], n, None, 0.0)[0] for x, n in
                                          ((f_fwd, "f_fwd"), (f_decode, "f_decode"), (f_reward, "f_reward"), (f_train, "f_train")))
    f_ref = f_fwd if f_ref is None else _vec([f_ref], "f_ref", None, 0.0)[0]
    g = 2.0 if cfg else 1.0
    _int_arg(d, "truncate", -1)
    # a child at step i runs N - 1 - i forwards, or d ODE steps plus its x0_hat jump (plan.py)
    roll = [g * f_fwd * (N - 1 - i if d < 0 else min(N - 1 - i, d + 1)) for i in range(N)]
    dr, tr, ref = [f_decode + f_reward] * N, [f_train] * N, [g * f_ref] * N
    return BranchCosts([a + b + c + d for a, b, c, d in zip(roll, dr, tr, ref)], roll, dr, tr, ref,
                       [g * f_fwd * (i + 1) for i in range(N)], T)


def seconds_per_unit(plan, seconds: dict, cfg: bool = False) -> dict[str, float]:
    """Seconds per cost unit from one epoch's trainer phase clock: ``rollout`` (plan forwards and
    the reference rows), ``reward`` (decode + reward of the final samples), ``train`` (all inner
    updates). With reward waves the reward phase is only the wait, so f_reward is a lower bound."""
    g = 2 if cfg else 1
    M = max(plan.num_records, 1)
    return {"f_fwd": seconds["rollout"] / max(g * (plan.evaluated_rows + plan.num_records), 1),
            "f_decode": 0.0, "f_reward": seconds["reward"] / max(plan.rows[-1], 1), "f_train": seconds["train"] / M}


# ------------------------------------------------------------------------------------------------
def _check(v, c, budget, w, k_min, k_max, rule, active, overhead):
    v = _vec(v, "v", None, 0.0)
    n = len(v)
    c = [1.0] * n if c is None else _vec(c, "c", n, 0.0, strict=True)
    w = [1.0] * n if w is None else _vec(w, "w", n, 0.0)
    budget = _vec([budget], "budget", None, 0.0)[0]
    _int_arg(k_min, "k_min", 1)
    if k_max is not None:
        _int_arg(k_max, "k_max", k_min)
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    act = [True] * n if active is None else [bool(a) for a in (active.tolist() if isinstance(active, Tensor) else active)]
    if len(act) != n:
        raise ValueError(f"active has {len(act)} entries, expected {n} (one per step)")
    overhead = None if overhead is None else _vec(overhead, "overhead", n, 0.0)
    return v, c, budget, w, act, overhead


def _solve(wv, c, B, act, k_max, rule) -> list[float]:
    """Continuous allocation on the active steps with the k_max caps (water-filling)."""
    n = len(wv)
    K, free = [0.0] * n, [i for i in range(n) if act[i] and wv[i] > 0]
    while free and B > 0:
        if rule == "sqrt":
            den = sum(math.sqrt(wv[i] * c[i]) for i in free)
            for i in free:
                K[i] = B * math.sqrt(wv[i] / c[i]) / den
        else:
            den = sum(c[i] * wv[i] for i in free)
            for i in free:
                K[i] = B * wv[i] / den
        over = [i for i in free if k_max is not None and K[i] > k_max]
        if not over:
            break
        for i in over:
            K[i] = float(k_max)
            B -= c[i] * k_max
        free = [i for i in free if i not in over]
    return K


def _active_set(v, c, budget, w, k_min, k_max, rule, act, overhead):
    wv = [a * b for a, b in zip(w, v)]
    act = [a and x > 0 for a, x in zip(act, wv)]
    while True:
        on = [i for i, a in enumerate(act) if a]
        B = budget - (overhead[on[-1]] if overhead is not None and on else 0.0)
        K = _solve(wv, c, B, act, k_max, rule)
        low = [i for i in on if K[i] < k_min - 1e-12]
        if not low:
            return act, K, B
        act[min(low, key=lambda i: (K[i], i))] = False


def continuous_allocation(v, c=None, budget=0.0, w=None, k_max=None, rule="sqrt", active=None) -> list[float]:
    """The real-valued allocation (no k_min deactivation, caps at ``k_max``)."""
    v, c, budget, w, act, _ = _check(v, c, budget, w, 2, k_max, rule, active, None)
    return _solve([a * b for a, b in zip(w, v)], c, budget, act, k_max, rule)


def allocate(v, c=None, budget=0.0, w=None, k_min: int = 2, k_max: int | None = None, rule: str = "sqrt",
             active=None, overhead=None) -> list[int]:
    """Integer K per step with ``sum c K (+ overhead[last active]) <= budget`` (see module doc).
    ``c=None`` prices every branch at 1 (budget in branches)."""
    v, c, budget, w, act, overhead = _check(v, c, budget, w, k_min, k_max, rule, active, overhead)
    act, Kc, B = _active_set(v, c, budget, w, k_min, k_max, rule, act, overhead)
    on = [i for i, a in enumerate(act) if a]
    K = [0] * len(v)
    for i in on:       # Kc >= k_min - 1e-12 here, so max() only absorbs round-off
        K[i] = max(k_min, math.floor(Kc[i]))
    used = sum(c[i] * K[i] for i in on)
    cap = k_max if k_max is not None else math.inf
    for i in sorted(on, key=lambda j: (-(Kc[j] - K[j]), j)):      # largest remainder
        if K[i] < cap and _fits(used + c[i], B):
            K[i] += 1
            used += c[i]
    while True:                                                    # fill: no single branch fits afterwards
        cand = [i for i in on if K[i] < cap and _fits(used + c[i], B)]
        if not cand:
            return K
        i = max(cand, key=lambda j: (Kc[j] - K[j], -j))
        K[i] += 1
        used += c[i]


def allocate_for_variance(v, c=None, target: float = 1.0, w=None, k_min: int = 2, k_max: int | None = None,
                          active=None) -> list[int]:
    """Cheapest integer K (``sum c K``) with ``sum_i w_i v_i / K_i <= target`` over the active steps
    with ``w v > 0``, each K in [k_min, k_max]; the rest get 0. If even k_max everywhere misses the
    target: k_max everywhere. See the module doc."""
    v, c, target, w, act, _ = _check(v, c, target, w, k_min, k_max, "sqrt", active, None)
    if not target > 0:
        raise ValueError(f"target must be > 0, got {target}")
    wv = [a * b for a, b in zip(w, v)]
    on = [i for i in range(len(v)) if act[i] and wv[i] > 0]
    K = [0] * len(v)

    def var(k) -> float:
        return sum(wv[i] / k[i] for i in on)

    if k_max is not None and var({i: k_max for i in on}) >= target:
        for i in on:
            K[i] = k_max
        return K
    cap = math.inf if k_max is None else float(k_max)

    def cont(mu) -> dict:
        return {i: min(max(mu * math.sqrt(wv[i] / c[i]), float(k_min)), cap) for i in on}

    lo, hi = 0.0, 1.0
    while var(cont(hi)) > target:          # the variance falls as mu grows (to below target: see above)
        lo, hi = hi, hi * 2.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if var(cont(mid)) > target else (lo, mid)
    for i, x in cont(hi).items():
        K[i] = max(k_min, math.ceil(x - 1e-9))
    tol = 1e-12 * target
    while var(K) > target + tol:           # round-off of the ceilings: add the cheapest variance cut
        i = max((j for j in on if k_max is None or K[j] < k_max),
                key=lambda j: ((wv[j] / K[j] - wv[j] / (K[j] + 1)) / c[j], -j))
        K[i] += 1
    while True:                            # drop the dearest branch that keeps the variance within target
        slack = target + tol - var(K)
        cand = [i for i in on if K[i] > k_min and wv[i] / (K[i] - 1) - wv[i] / K[i] <= slack]
        if not cand:
            return K
        i = max(cand, key=lambda j: (c[j], -(wv[j] / (K[j] - 1) - wv[j] / K[j]), -j))
        K[i] -= 1


# ------------------------------------------------------------------------------------------------
def sibling_variance(steps: Tensor, parents: Tensor, rows: Tensor, coef: Tensor, n: int, max_elems: int = 1 << 24):
    """Per step: the sum over branching parents (>= 2 children) of the unbiased within-parent
    variance of ``psi = coef * rows`` per dim, the sum of the signal ``|psi_bar|^2/d - var/K``, and
    the number of such parents (float64 ``[n]`` each). Works in blocks of ~``max_elems`` elements."""
    M, dev = steps.numel(), steps.device
    d = max(rows[0].numel(), 1) if M else 1
    var_sum = torch.zeros(n, dtype=torch.float64, device=dev)
    sig_sum, n_par = torch.zeros_like(var_sum), torch.zeros_like(var_sum)
    if M:
        key = steps * (int(parents.max()) + 1) + parents
        uniq, inv, counts = torch.unique(key, return_inverse=True, return_counts=True)
        gstep = uniq // (int(parents.max()) + 1)
        order = torch.argsort(inv, stable=True)
        cnt, start, G = counts.tolist(), 0, len(counts)
        g0 = 0
        while g0 < G:                                   # blocks of whole parent groups
            g1, nrow = g0, 0
            while g1 < G and (g1 == g0 or (nrow + cnt[g1]) * d <= max_elems):
                nrow += cnt[g1]
                g1 += 1
            idx = order[start:start + nrow]
            li = inv.index_select(0, idx) - g0
            x = rows.index_select(0, idx).reshape(nrow, -1).to(torch.float64) * coef.index_select(0, idx)[:, None]
            nb = counts[g0:g1].to(torch.float64)
            mean = torch.zeros(g1 - g0, x.shape[1], dtype=torch.float64, device=dev).index_add_(0, li, x) / nb[:, None]
            ss = torch.zeros(g1 - g0, dtype=torch.float64, device=dev).index_add_(0, li, ((x - mean[li]) ** 2).sum(1))
            ok = nb >= 2
            var = torch.where(ok, ss / ((nb - 1).clamp(min=1) * d), torch.zeros_like(ss))
            sig = torch.where(ok, (mean**2).sum(1) / d - var / nb, torch.zeros_like(ss))
            st = gstep[g0:g1]
            var_sum.index_add_(0, st, var)
            sig_sum.index_add_(0, st, sig)
            n_par.index_add_(0, st, ok.to(torch.float64))
            start, g0 = start + nrow, g1
    return var_sum, sig_sum, n_par


class OnlineAllocator:
    """Online variance-aware allocator (spec §7.3); see the module doc for the rules.

    ``costs``/``overhead``: per-step price and trunk overhead in the budget's unit (default: one
    per branch); ``init``: the starting profile (default: :func:`allocate` on ``prior`` or on
    equal variances); ``trainable``: steps that may branch (default all but the last);
    ``scale``: per-step factor used by ``observe(adv=, z=)`` when no per-record ``scale`` is given
    (:func:`step_scale`); ``prior``: variance of steps not observed yet (default: mean observed);
    ``objective``: ``'budget'`` (least variance at the budget) or ``'variance'`` (least cost at the
    variance the starting profile would have now; the budget stays a cap)."""

    def __init__(self, num_steps: int, budget: float, *, costs=None, overhead=None, weights=None, init=None,
                 trainable=None, scale=None, prior=None, rule: str = "sqrt", k_min: int = 2, k_max: int | None = None,
                 ema: float = 0.9, every: int = 1, max_step: int | None = 2, patience: int = 5,
                 clip_tau: float = 0.5, snr_min: float | None = None, objective: str = "budget"):
        n = self.n = _int_arg(num_steps, "num_steps", 2)
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        self.objective = objective
        self.trainable = [i < n - 1 for i in range(n)] if trainable is None else [bool(a) for a in trainable]
        if len(self.trainable) != n:
            raise ValueError(f"trainable has {len(self.trainable)} entries, expected {n} (one per step)")
        self.prior = None if prior is None else _vec(prior, "prior", n, 0.0)
        self.scale = [1.0] * n if scale is None else _vec(scale, "scale", n, 0.0)
        if not 0.0 <= ema < 1.0:
            raise ValueError(f"ema must be in [0, 1), got {ema!r}")
        if not 0.0 <= clip_tau <= 1.0:
            raise ValueError(f"clip_tau must be in [0, 1], got {clip_tau!r}")
        self.ema, self.clip_tau, self.snr_min = float(ema), float(clip_tau), snr_min
        self.every, self.patience = _int_arg(every, "every", 1), _int_arg(patience, "patience", 0)
        self.max_step = None if max_step is None else _int_arg(max_step, "max_step", 1)
        self.rule, self.k_min, self.k_max = rule, k_min, k_max
        v0 = self.prior or [1.0] * n
        costs = None if costs is None else _vec(costs, "costs", n, 0.0, strict=True)
        weights = None if weights is None else _vec(weights, "weights", n, 0.0)
        _, self.cost, self.budget, self.weights, _, self.overhead = _check(v0, costs, budget, weights, k_min, k_max,
                                                                           rule, self.trainable, overhead)
        if init is None:
            init = allocate(v0, self.cost, self.budget, self.weights, k_min, k_max, rule, self.trainable, self.overhead)
        self.profile = [int(a) for a in _vec(init, "init", n, 0.0)]
        if any(0 < a < k_min or (k_max is not None and a > k_max) for a in self.profile):
            raise ValueError(f"init entries must be 0 or in [k_min, k_max], got {self.profile}")
        self.reference = list(self.profile)     # objective 'variance': the profile whose variance is kept
        self.v: list[float | None] = [None] * n
        self.m: list[float | None] = [None] * n
        self.clip: list[float | None] = [None] * n
        self.off_since: list[int | None] = [None] * n
        self.epochs = self.last_update = self.updates = 0

    # -- statistics -------------------------------------------------------------------------------
    def _ema(self, old, new):
        return new if old is None else self.ema * old + (1.0 - self.ema) * new

    @torch.no_grad()
    def observe(self, step_ids, parent_ids, psi=None, *, adv=None, z=None, scale=None, clipped=None,
                max_elems: int = 1 << 24, reduce=None) -> dict:
        """One epoch's records: ``step_ids``/``parent_ids`` ``[M]`` (record step, baseline-set or
        parent id), and either ``psi [M, ...]`` or ``adv [M]`` + ``z [M, ...]`` (+ per-record
        ``scale [M]``; default the per-step ``scale``); ``clipped [M]`` bool. Works on the inputs'
        device in blocks of ~``max_elems`` elements; returns this epoch's per-step estimates.
        ``reduce`` (several ranks): sums a float64 ``[5, n]`` tensor of per-step sums over ranks."""
        steps = torch.as_tensor(step_ids).reshape(-1).long()
        dev, M = steps.device, steps.numel()
        parents = torch.as_tensor(parent_ids, device=dev).reshape(-1).long()
        if parents.numel() != M:
            raise ValueError(f"parent_ids has {parents.numel()} entries, step_ids has {M}")
        if M and (int(steps.min()) < 0 or int(steps.max()) >= self.n):
            raise ValueError(f"step_ids must lie in [0, {self.n - 1}], got [{int(steps.min())}, {int(steps.max())}]")
        if M and int(parents.min()) < 0:
            raise ValueError(f"parent_ids must be >= 0, got {int(parents.min())}")
        if (psi is None) == (z is None) or (z is None) != (adv is None):
            raise ValueError("observe needs either psi, or adv and z (not both)")
        rows = psi if psi is not None else z
        if rows.shape[0] != M:
            raise ValueError(f"{'psi' if psi is not None else 'z'} has {rows.shape[0]} rows, step_ids has {M}")
        if psi is not None:
            coef = torch.ones(M, dtype=torch.float64, device=dev)
        else:
            a = torch.as_tensor(adv, device=dev).reshape(-1).to(torch.float64)
            if a.numel() != M:
                raise ValueError(f"adv has {a.numel()} entries, step_ids has {M}")
            s = (torch.tensor(self.scale, dtype=torch.float64, device=dev).index_select(0, steps) if scale is None
                 else torch.as_tensor(scale, device=dev).reshape(-1).to(torch.float64))
            if s.numel() != M:
                raise ValueError(f"scale has {s.numel()} entries, step_ids has {M}")
            coef = a * s
        var_sum, sig_sum, n_par = sibling_variance(steps, parents, rows, coef, self.n, max_elems)
        n_rec = torch.bincount(steps, minlength=self.n).to(torch.float64)
        n_clip = torch.zeros_like(n_rec)
        if clipped is not None:
            cl = torch.as_tensor(clipped, device=dev).reshape(-1)
            if cl.numel() != M:
                raise ValueError(f"clipped has {cl.numel()} entries, step_ids has {M}")
            n_clip = torch.bincount(steps, weights=cl.to(torch.float64), minlength=self.n)
        if reduce is not None:      # every rank's sums (parents never span ranks)
            var_sum, sig_sum, n_par, n_rec, n_clip = reduce(torch.stack([var_sum, sig_sum, n_par, n_rec, n_clip])).unbind(0)
        clip_ep = [None] * self.n if clipped is None else (n_clip / n_rec.clamp(min=1)).tolist()
        npar, nrec = n_par.tolist(), n_rec.tolist()
        v_ep = [a / p if p > 0 else None for a, p in zip(var_sum.tolist(), npar)]
        m_ep = [a / p if p > 0 else None for a, p in zip(sig_sum.tolist(), npar)]
        for i in range(self.n):
            if v_ep[i] is not None:
                self.v[i], self.m[i] = self._ema(self.v[i], v_ep[i]), self._ema(self.m[i], m_ep[i])
            if clipped is not None and nrec[i] > 0:
                self.clip[i] = self._ema(self.clip[i], clip_ep[i])
        self.epochs += 1
        return {"v_epoch": v_ep, "signal_epoch": m_ep, "clip_epoch": [c if r > 0 else None for c, r in zip(clip_ep, nrec)]}

    def update_costs(self, costs, overhead=None, ema: float | None = None) -> None:
        """New per-step prices (e.g. :func:`branch_costs` on measured seconds); ``ema`` blends."""
        new = _vec(costs, "costs", self.n, 0.0, strict=True)
        mix = (lambda o, x: x) if ema is None else (lambda o, x: ema * o + (1 - ema) * x)
        self.cost = [mix(o, x) for o, x in zip(self.cost, new)]
        if overhead is not None:
            ov = _vec(overhead, "overhead", self.n, 0.0)
            self.overhead = ov if self.overhead is None else [mix(o, x) for o, x in zip(self.overhead, ov)]

    def set_weights(self, weights) -> None:
        self.weights = [1.0] * self.n if weights is None else _vec(weights, "weights", self.n, 0.0)

    # -- proposal ---------------------------------------------------------------------------------
    def _cooling(self, i: int) -> bool:
        return self.profile[i] == 0 and self.off_since[i] is not None and self.epochs - self.off_since[i] < self.patience

    def eligible(self) -> list[bool]:
        """Steps the next update may branch at (trainable, not cooling down, clip and SNR tests).
        The tests only rank steps against each other: when they would switch off every trainable
        step (e.g. a trust region clipping most rows everywhere), the clip and SNR tests are
        ignored for this update, then the cooling test too, so the plan always keeps a branch."""
        kref = self.k_max or max(max(self.profile), self.k_min)
        cooling = [self._cooling(i) for i in range(self.n)]
        noisy = [(self.clip[i] is not None and self.clip[i] > self.clip_tau)
                 or (self.snr_min is not None and self.v[i] is not None and self.v[i] > 0
                     and self.m[i] * kref / self.v[i] < self.snr_min) for i in range(self.n)]
        for ignore_tests, ignore_cooling in ((False, False), (True, False), (True, True)):
            out = [self.trainable[i] and (ignore_cooling or not cooling[i]) and (ignore_tests or not noisy[i])
                   for i in range(self.n)]
            if any(out):
                return out
        return out

    def _used(self, K) -> float:
        on = [i for i, a in enumerate(K) if a > 0]
        return sum(c * a for c, a in zip(self.cost, K)) + (self.overhead[on[-1]] if self.overhead is not None and on else 0.0)

    def _ok(self, cur: int, new: int) -> bool:
        valid = new == 0 or (new >= self.k_min and (self.k_max is None or new <= self.k_max))
        near = (self.max_step is None or abs(new - cur) <= self.max_step or {cur, new} == {0, self.k_min})
        return valid and near

    def _hysteresis(self, cur: list[int], target: list[int]) -> list[int]:
        new = []
        for a, t in zip(cur, target):
            x = t if self.max_step is None else min(max(t, a - self.max_step), a + self.max_step)
            x = self.k_min if 0 < x < self.k_min else x
            new.append(min(x, self.k_max) if self.k_max is not None else x)
        down = lambda x: x - 1 if x - 1 >= self.k_min else 0  # noqa: E731
        for band in (True, False):                          # remove: budget first, the band if possible
            while not _fits(self._used(new), self.budget):
                cand = [i for i in range(self.n) if new[i] > 0 and (not band or self._ok(cur[i], down(new[i])))]
                if not cand:
                    break
                i = max(cand, key=lambda j: (new[j] - target[j], j))
                new[i] = down(new[i])
        while True:                                         # add toward the target while it fits
            up = lambda x: x + 1 if x >= self.k_min else self.k_min  # noqa: E731
            cand = [i for i in range(self.n) if new[i] < target[i] and up(new[i]) <= target[i]
                    and self._ok(cur[i], up(new[i]))
                    and _fits(self._used(new[:i] + [up(new[i])] + new[i + 1:]), self.budget)]
            if not cand:
                return new
            i = max(cand, key=lambda j: (target[j] - new[j], -j))
            new[i] = up(new[i])

    def target(self) -> list[int]:
        """The unconstrained-by-hysteresis allocation for the current estimates."""
        known = [x for x in self.v if x is not None]
        fill = (sum(known) / len(known)) if known else 1.0
        v = [x if x is not None else (self.prior[i] if self.prior is not None else fill) for i, x in enumerate(self.v)]
        elig = self.eligible()
        if self.objective == "variance":
            act = [e and r > 0 and w * x > 0 for e, r, w, x in zip(elig, self.reference, self.weights, v)]
            if any(act):
                V = sum(w * x / r for a, r, w, x in zip(act, self.reference, self.weights, v) if a)
                return allocate_for_variance(v, self.cost, V, self.weights, self.k_min, self.k_max, act)
        return allocate(v, self.cost, self.budget, self.weights, self.k_min, self.k_max, self.rule,
                        elig, self.overhead)

    def propose(self) -> list[int]:
        """The profile for the next epoch (unchanged between updates or before any observation)."""
        if self.epochs == 0 or self.epochs - self.last_update < self.every:
            return list(self.profile)
        for i in range(self.n):   # an off step whose patience is over: forget its clip fraction, probe again
            if self.profile[i] == 0 and not self._cooling(i) and self.clip[i] is not None and self.clip[i] > self.clip_tau:
                self.clip[i] = None
        new = self._hysteresis(self.profile, self.target())
        for i in range(self.n):
            if self.profile[i] > 0 and new[i] == 0:
                self.off_since[i] = self.epochs
        self.profile, self.last_update, self.updates = new, self.epochs, self.updates + 1
        return list(new)

    # -- checkpoints ------------------------------------------------------------------------------
    _STATE = ("profile", "reference", "v", "m", "clip", "off_since", "cost", "overhead", "weights", "epochs",
              "last_update", "updates")

    def state_dict(self) -> dict:
        out = {"num_steps": self.n}
        for k in self._STATE:
            x = getattr(self, k)
            out[k] = list(x) if isinstance(x, list) else x
        return out

    def load_state_dict(self, state: dict) -> None:
        state = {"reference": self.reference, **state}     # checkpoints from before 'reference' existed
        if state.get("num_steps") != self.n:
            raise ValueError(f"state num_steps {state.get('num_steps')!r} does not match this allocator's {self.n}")
        missing = [k for k in self._STATE if k not in state]
        if missing:
            raise ValueError(f"state is missing {missing}")
        for k in self._STATE:
            x = state[k]
            if isinstance(x, (list, tuple)):
                if len(x) != self.n:
                    raise ValueError(f"state[{k!r}] has {len(x)} entries, expected {self.n}")
                x = list(x)
            setattr(self, k, x)
