"""Branching profiles as short strings (``rollout.profile``), resolved against the step count.

A preset cannot list one K per step when it must run on tasks with different step counts, so it
names a rule instead:

* ``const:K`` — ``K`` children at every step but the last (TempFlow-GRPO's released ``K_i = 6``,
  spec §7.1 ``base``);
* ``every:S:K`` — ``K`` at steps ``0, S, 2S, ...`` (the SD1.5 sparse redesign: ``K = 4`` at steps
  0, 10, 20, 30, 40 of 50, spec §7.1);
* ``at:I,J,...:K`` — ``K`` at the listed steps (BranchGRPO's split points ``0,3,6,9``, its
  released ``finetune_flux_branchgrpo_8gpus.sh``);
* ``first:F:K`` — ``K`` at the first ``ceil(F * (N - 1))`` steps, ``0 < F <= 1`` (a low-SNR
  concentration in the spirit of ``lowsnr2``, which puts all budget on the first 4 of 9 steps);
* a released SD3.5 profile name (``base``, ``highsnr``, ``base2``, ``highsnr2``, ``lowsnr``,
  ``lowsnr2``; spec §7.1) — exactly as released, so only for 10-step sampling.

Entries are integers >= 0, one per step (the last step's entry is 0: nothing follows it).
"""
from __future__ import annotations

import math

from .plan import PlanError

# spec §7.1 (RSM-code sd35_zeroth_order/config/sd3_matrix.py): K per transition 0..8 of 10 steps
RELEASED = {
    "base": (6, 6, 6, 6, 6, 6, 6, 6, 6),
    "highsnr": (3, 3, 4, 5, 6, 7, 7, 8, 11),
    "base2": (7, 7, 7, 7, 7, 7, 6, 6, 0),
    "highsnr2": (4, 5, 5, 6, 7, 8, 9, 10, 0),
    "lowsnr": (6, 6, 8, 10, 11, 13, 0, 0, 0),
    "lowsnr2": (6, 6, 8, 10, 0, 0, 0, 0, 0),
}


def _int(text: str, what: str, spec: str, lo: int = 0) -> int:
    try:
        v = int(text)
    except ValueError:
        raise PlanError(f"rollout.profile {spec!r}: {what} must be an integer, got {text!r}") from None
    if v < lo:
        raise PlanError(f"rollout.profile {spec!r}: {what} must be >= {lo}, got {v}")
    return v


def resolve_profile(spec: str, num_steps: int) -> list[int]:
    """K per step (``num_steps`` entries) for a profile string; :class:`PlanError` names the problem."""
    s = spec.strip()
    N = num_steps
    if s in RELEASED:
        prof = list(RELEASED[s])
        if N != len(prof) + 1:
            raise PlanError(f"rollout.profile {s!r} is the released 10-step SD3.5 profile; this task samples {N} "
                            f"steps (use const:/every:/at:/first: forms)")
        return prof + [0]
    kind, _, rest = s.partition(":")
    parts = rest.split(":") if rest else []
    k = [0] * N
    if kind == "const" and len(parts) == 1:
        K = _int(parts[0], "K", s, 1)
        k[:N - 1] = [K] * (N - 1)
    elif kind == "every" and len(parts) == 2:
        S, K = _int(parts[0], "the stride", s, 1), _int(parts[1], "K", s, 1)
        for i in range(0, N - 1, S):
            k[i] = K
    elif kind == "at" and len(parts) == 2:
        K = _int(parts[1], "K", s, 1)
        for p in parts[0].split(","):
            i = _int(p.strip(), "a step", s)
            if i >= N - 1:
                raise PlanError(f"rollout.profile {s!r}: step {i} has nothing after it ({N} steps: 0..{N - 2} can branch)")
            k[i] = K
    elif kind == "first" and len(parts) == 2:
        try:
            F = float(parts[0])
        except ValueError:
            F = -1.0
        if not 0 < F <= 1:
            raise PlanError(f"rollout.profile {s!r}: the fraction must be in (0, 1], got {parts[0]!r}")
        K = _int(parts[1], "K", s, 1)
        for i in range(max(1, math.ceil(F * (N - 1)))):
            k[i] = K
    else:
        raise PlanError(f"rollout.profile {s!r} is not one of const:K, every:S:K, at:I,J:K, first:F:K or a released "
                        f"name {sorted(RELEASED)}")
    return k
