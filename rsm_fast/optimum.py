"""The optimum of the regularised objective by Monte Carlo, for tasks without a closed form (issue 20).

The task's objective is ``J(P) = E_P[r(x_0)] - alpha KL(P || P_ref)`` over path measures ``P`` of the
sampler. Its maximiser is the tilt ``P* ∝ P_ref exp(r / alpha)`` (Donsker-Varadhan), with value

    J* = alpha log E_{P_ref}[exp(r / alpha)],      E*[r] = E_ref[r e^{r/alpha}] / E_ref[e^{r/alpha}],
    KL(P* || P_ref) = (E*[r] - J*) / alpha,        J_ref = E_ref[r]  (KL 0).

Only ``x_0`` enters the tilt, so ``J*`` is also the optimum over marginals: the path KL of ``P*``
equals its marginal KL. With conditions (digit labels, prompts) the tilt is per condition and
``J* = E_c[alpha log E_ref[e^{r/alpha} | c]]``. Every quantity above is an expectation under the
frozen reference, so ``n`` reference samples estimate them: ``J*`` by a log-mean-exp per condition
(shifted by its max, float64), the rest self-normalised. ``log`` of a sample mean is biased low by
about ``var(w) / (2 n mean(w)^2)``; the standard error printed beside it (delta method) is of the
same order, so a reader sees when ``n`` is too small.

On the 2-D task the closed form exists (``Toy2D.objective_target``) and a test checks this
estimate against it. On digits it turns ``J``'s target into a share of J*'s gain, as on the 2-D
task, instead of a share of the best preset's reward: a target a run can reach only by buying
reward with KL beyond p*'s is then never the headline (bench/gpu_hours.py ``--target-gain``).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor


# the reference samples' generator seed: one fixed stream for every run and preset of a benchmark,
# apart from the training seeds and from Trainer.evaluate's (seed + 1_000_003)
OPTIMUM_SEED = 7_777_777


@dataclass(frozen=True)
class SoftOptimum:
    objective: float        # J* = alpha E_c log E_ref[exp(r/alpha) | c]
    objective_se: float     # its Monte-Carlo standard error (delta method)
    reference: float        # J_ref = E_ref[r]
    reward: float           # E*[r], self-normalised
    kl: float               # KL(P* || P_ref) = (E*[r] - J*) / alpha
    alpha: float
    samples: int
    conditions: int         # distinct conditions (1 = unconditional)

    def gain(self, reward: float, kl: float) -> float:
        """The share of J*'s gain over the reference reached by ``J = reward - alpha kl``."""
        den = self.objective - self.reference
        return (reward - self.alpha * kl - self.reference) / den if den > 0 else math.nan

    def as_dict(self) -> dict:
        return asdict(self)


def soft_optimum_from_rewards(r: Tensor, alpha: float, cond_id: Tensor | None = None) -> SoftOptimum:
    """The estimate from reference rewards ``r`` ``[n]`` and each sample's condition ``cond_id``
    ``[n]`` (ints; None = one condition). Conditions weigh by their sample counts. A condition
    with a single sample is refused: its log-mean-exp would be its one reward, no tilt at all."""
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"task.alpha must be a positive finite number for the optimum, got {alpha!r}")
    r = r.detach().reshape(-1).to(torch.float64).cpu()
    if r.numel() < 2 or not bool(torch.isfinite(r).all()):
        raise ValueError(f"the optimum needs >= 2 finite reference rewards, got {r.numel()} "
                         f"({int((~torch.isfinite(r)).sum())} non-finite)")
    ids = torch.zeros_like(r, dtype=torch.long) if cond_id is None else cond_id.reshape(-1).to(torch.long).cpu()
    uniq, inv = torch.unique(ids, return_inverse=True)
    n = r.numel()
    j_star = var = e_reward = 0.0
    for k in range(uniq.numel()):
        rk = r[inv == k]
        m = rk.numel()
        if m < 2:
            raise ValueError(f"condition {int(uniq[k])} has {m} reference sample: give more samples "
                             "(each condition needs several for its tilt)")
        s = rk / alpha
        w = torch.exp(s - s.max())                       # weights up to exp(max): the shift cancels
        mw = w.mean()
        j_star += (m / n) * alpha * (float(torch.log(mw)) + float(s.max()))
        # delta method: var(log mean w) ~= var(w) / (m mean(w)^2); J*'s share is (m/n) alpha that
        var += (m / n) ** 2 * alpha ** 2 * float(w.var(unbiased=True) / (m * mw ** 2))
        e_reward += (m / n) * float((w * rk).sum() / w.sum())
    return SoftOptimum(objective=j_star, objective_se=math.sqrt(var), reference=float(r.mean()),
                       reward=e_reward, kl=(e_reward - j_star) / alpha, alpha=float(alpha),
                       samples=n, conditions=int(uniq.numel()))


@torch.no_grad()
def reference_rewards(trainer, n: int, seed: int = OPTIMUM_SEED) -> tuple[Tensor, Tensor]:
    """``n`` samples of the trainer's frozen reference through the evaluation's full-SDE plan (one
    group each, the task's own conditions and initial latents from ``seed``): their rewards ``[n]``
    and condition ids ``[n]`` (rows of equal conditioning share an id). The trainer's NFE and scored
    counters are left as they were."""
    if n < 2:
        raise ValueError(f"the optimum needs >= 2 reference samples, got {n}")
    engine = trainer.sde_engine(trainer.handle.reference, n, seed, trainer.cfg.rollout.chunk_size or min(n, 2048))
    gen = torch.Generator().manual_seed(seed)
    conds = trainer.task.conditions(n, gen)
    rec, _, _ = trainer._rollout([engine], engine.plan, conds, gen, 0, reference=False)
    scored = dict(trainer.scored)
    try:
        r = trainer._score(rec.x0, rec.x0_group, conds, kind="eval")
    finally:
        trainer.scored.clear()
        trainer.scored.update(scored)
    group = rec.x0_group.cpu()
    if conds.cond is None:
        ids = torch.zeros(n, dtype=torch.long)
    else:
        rows = conds.cond.cpu().index_select(0, group).reshape(n, -1)
        ids = torch.unique(rows, dim=0, return_inverse=True)[1]
    return r.detach().reshape(-1).cpu(), ids


def soft_optimum(trainer, n: int, seed: int = OPTIMUM_SEED) -> SoftOptimum:
    """J*, E*[r], KL* and J_ref of the trainer's task, reward and config ``task.alpha`` from ``n``
    reference samples (see the module docstring)."""
    r, ids = reference_rewards(trainer, n, seed)
    return soft_optimum_from_rewards(r, float(trainer.cfg.task.alpha), ids)
