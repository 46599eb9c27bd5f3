"""Statistics that span ranks, computed as one process computes them (rsm_fast/distributed.py)."""
from __future__ import annotations

import torch
from torch import Tensor

from .advantages import set_advantages
from .distributed import World


def global_set_advantages(world: World, values: Tensor, set_id: Tensor, set_sizes: list[int], *, baseline: str,
                          clip: float | None) -> Tensor:
    """:func:`~rsm_fast.advantages.set_advantages` with ``normalize="global"`` over every rank's
    records: the values, set ids (offset past the earlier ranks' sets) and set sizes are gathered in
    rank order, the one-process arithmetic runs on the whole epoch, and this rank keeps its rows."""
    m = values.shape[0]
    counts = [int(v) for v in world.all_counts(m, "advantage row count").tolist()]
    n_sets = [int(v) for v in world.all_counts(len(set_sizes), "advantage set count").tolist()]
    offset = sum(n_sets[:world.rank])
    all_v = world.gather(values, counts, "advantage gather")
    all_s = world.gather(set_id + offset, counts, "advantage set gather")
    sizes = world.gather(torch.tensor(set_sizes, dtype=torch.int64, device=set_id.device), n_sets, "set size gather")
    adv = set_advantages(all_v, all_s, sizes.tolist(), baseline=baseline, normalize="global", clip=clip)
    first = sum(counts[:world.rank])
    return adv[first:first + m]


def gather_eval(world: World, r: Tensor, kl: Tensor, x0: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """An evaluation's rewards, path KLs and (for task metrics) final samples from every rank."""
    counts = [int(v) for v in world.all_counts(r.shape[0], "evaluation count").tolist()]
    r = world.gather(r, counts, "evaluation reward gather")
    kl = world.gather(kl, counts, "evaluation KL gather")
    if x0 is not None:
        x0 = world.gather(x0, counts, "evaluation sample gather")
    return r, kl, x0
