"""The training rollout's plan from the config (:func:`plan_spec`): the trainer compiles it at start,
the MixGRPO window moves it (rsm_fast/families.py), and the memory estimate mirrors it."""
from __future__ import annotations

from torch import Tensor

from .config import GROUPED, RunConfig
from .engine.plan import PlanSpec
from .engine.profiles import resolve_profile


def plan_spec(cfg: RunConfig, num_steps: int, sde_mask: Tensor, epoch: int = 0) -> PlanSpec:
    """The training rollout's plan from the config: ``batch_size`` trunks in groups of
    ``group_size`` (zeroth order; 0, and first order, one group of the whole batch). For ``sde`` plans the trained steps
    are the first ``timestep_fraction`` of the noisy ones (flow_grpo ``timestep_fraction``); with
    ``rollout.window`` only a MixGRPO window of them is SDE (and trained) at this ``epoch``, the
    rest ODE: the window starts at step 0 and moves ``window_stride`` steps every ``window_every``
    epochs through that range, wrapping to the start (MixGRPO's progressive strategy with roll-back)."""
    tc, mc, ro = cfg.train, cfg.method, cfg.rollout
    G = mc.group_size if mc.estimator in GROUPED and mc.group_size else tc.batch_size
    noisy = [bool(v) for v in sde_mask]
    if ro.plan == "sde":
        stoch = [i for i, v in enumerate(noisy) if v]
        span = stoch[:max(1, int(tc.timestep_fraction * len(stoch)))]   # flow_grpo: int(N x fraction)
        if ro.window:
            W = min(ro.window, len(span))
            start = ((epoch // ro.window_every) * ro.window_stride) % (len(span) - W + 1)
            span = span[start:start + W]
            noisy = [i in span for i in range(num_steps)]
        keep = set(span)
        return PlanSpec("sde", num_steps, tc.batch_size // G, G, sde_mask=tuple(noisy),
                        train_mask=tuple(i in keep for i in range(num_steps)))
    k = resolve_profile(ro.profile, num_steps) if ro.profile else list(ro.k)
    return PlanSpec(ro.plan, num_steps, tc.batch_size // G, G, k=tuple(k),
                    sde_mask=tuple(noisy) if ro.plan == "tree" else (), truncate=ro.truncate)
