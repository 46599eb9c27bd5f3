"""Trajectory rollout with the records training needs (spec §14, "rollout").

This is the plain reference sampler: one batch, one step at a time, all rows at the same
step. The static-shape, branching, graph-captured engine of a later issue must reproduce it.
Per step it stores the state, the sampling noise ``z``, the old (rollout) native output and the
reference output, so the zeroth-order loss needs no log-prob recomputation and the on-policy
log-ratio is exactly 0 by construction.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Rollout:
    x: Tensor           # [N, B, *latent] state before step i
    z: Tensor           # [N, B, *latent] sampling noise (zeros on deterministic steps)
    f_old: Tensor       # [N, B, *latent] rollout policy's native output
    f_ref: Tensor       # [N, B, *latent] reference native output
    kl: Tensor          # [N, B] KL(pi_old || pi_ref) per step in nats (summed over latent dims)
    stochastic: Tensor  # [N] bool
    x0: Tensor          # [B, *latent] final samples
    nfe_policy: int     # row-evaluations of the policy network
    nfe_ref: int        # row-evaluations of the reference


@torch.no_grad()
def sample(policy, task, n: int, gen: torch.Generator, device="cpu", record: bool = True) -> Rollout | Tensor:
    """Roll ``n`` trajectories of ``policy`` through ``task.transition``.

    ``policy(x, coeffs, f_ref)`` returns the native output; ``task.reference_output(x, coeffs)``
    the reference's. Noise comes from ``gen`` (CPU generator: identical across devices).
    With ``record=False`` only the final samples are returned.
    """
    tr = task.transition
    x = task.sample_initial(n, gen).to(device)
    N = tr.num_steps
    keep = {k: [] for k in ("x", "z", "f_old", "f_ref", "kl")} if record else None
    stoch = tr.sde_mask
    for i in range(N):
        c = tr.coeffs_at(i, n, device=device)
        f_ref = task.reference_output(x, c)
        f = policy(x, c, f_ref)
        if bool(stoch[i]):  # host-side table, not a device read
            z = torch.randn(x.shape, generator=gen, dtype=torch.float32).to(device)
        else:
            z = torch.zeros_like(x)
        x_next = c.step(x, f, z).to(x.dtype)
        if record:
            keep["x"].append(x)
            keep["z"].append(z)
            keep["f_old"].append(f)
            keep["f_ref"].append(f_ref)
            keep["kl"].append(c.kl(f, f_ref, reduce="sum"))
        x = x_next
    if not record:
        return x
    st = {k: torch.stack(v) for k, v in keep.items()}
    return Rollout(stochastic=stoch.to(device), x0=x, nfe_policy=n * N, nfe_ref=n * N, **st)
