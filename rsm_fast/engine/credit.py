"""Credit assignment from final samples to training records, read off a compiled plan.

A record (a trained transition) leads to one final sample in a K = 1 plan and to several in a
branching plan. Its value estimate is the mean, over the final samples descending from it, of
their return: the hard reward ``r(x0)``, or the soft, entropy-augmented return
``r(x0) - alpha * sum_{j > i} KL_j`` that counts the KL of the *later* recorded transitions on the
sample's path (spec §4.3; for a K = 1 trajectory this is exactly ``estimators.soft_returns``).
The (record, leaf) pairs are fixed by the plan, so they are built once on the host and every
epoch's mapping is a gather + ``index_add`` on the device, with no host synchronisation.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .plan import Plan, PlanError


class Credit:
    def __init__(self, plan: Plan):
        anc = plan.leaf_ancestor.cpu()                       # [N, R_N]
        N, R = anc.shape
        M = plan.num_records
        steps, leaves = torch.nonzero(anc >= 0, as_tuple=True)   # host: once per plan
        recs = anc[steps, leaves]
        count = torch.bincount(recs, minlength=M)
        if M and int(count.min()) == 0:
            raise PlanError("a trained transition has no final sample downstream (plan bug)")
        dev = plan.device
        self.M, self.N, self.R = M, N, R
        self._rec, self._leaf = recs.to(dev), leaves.to(dev)
        self._flat = (steps * R + leaves).to(dev)             # index into an [N, R] table
        self._count = count.to(dev)
        self._anc = anc.clamp(min=0).flatten().to(dev)
        self._valid = (anc >= 0).flatten().to(dev)

    def mean_over_leaves(self, leaf_values: Tensor) -> Tensor:
        """``[R_N, ...]`` per final sample -> ``[M, ...]`` mean over each record's descendants."""
        v = leaf_values.index_select(0, self._leaf)
        out = leaf_values.new_zeros((self.M, *leaf_values.shape[1:])).index_add_(0, self._rec, v)
        return out / self._count.to(out.dtype).reshape(-1, *([1] * (out.dim() - 1)))

    def path_kl(self, record_kl: Tensor) -> Tensor:
        """``[N, R_N]``: the KL of each final sample's recorded transition at every step (0 where
        the step has no record on its path)."""
        kl = record_kl.index_select(0, self._anc) * self._valid.to(record_kl.dtype)
        return kl.view(self.N, self.R)

    def soft_values(self, reward: Tensor, record_kl: Tensor, alpha: float) -> Tensor:
        """Per record: mean over its descendants of ``r - alpha * sum_{j > i} KL_j``."""
        kl = self.path_kl(record_kl.to(reward.dtype))
        later = kl.flip(0).cumsum(0).flip(0)                  # sum_{j >= i}
        later = torch.cat([later[1:], torch.zeros_like(later[:1])])   # sum_{j > i}
        q = reward[None] - alpha * later                       # [N, R_N]
        out = q.new_zeros(self.M).index_add_(0, self._rec, q.flatten().index_select(0, self._flat))
        return out / self._count.to(out.dtype)
