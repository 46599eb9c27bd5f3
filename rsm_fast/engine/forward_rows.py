"""Forward-process training rows (DiffusionNFT, AWM): timestep selection and ``x_t`` at clean samples.

Both methods keep only the clean rollout samples ``x0``; for each sample ``b`` and each chosen grid
point ``i`` (a step of the sampler's grid, 0 = noisiest) they draw fresh noise and regress the model at

    x_t = alpha_i x0 + sigma_i eps,   eps ~ N(0, I),
    flow: alpha_i = 1 - t_i, sigma_i = t_i;   VP: alpha_i = sqrt(abar_i), sigma_i = sqrt(1 - abar_i),

with the network evaluated at ``grid.model_t[i]`` (flow: ``t_i``; VP: the training-timestep index).

Randomness. Everything is drawn from the counter-based Philox streams of :mod:`.noise`, keyed by the
plan's row key of the sample, so a sample's steps and noise do not depend on the batch layout, the chunk
size, the row order or the number of ranks. Stream ids (the 32-bit "step" word of the Philox counter)
are disjoint from the rollout's, which uses ``[0, N)`` for the SDE noise and ``2^31 - 1`` for ``x_T``:

    FORWARD_NOISE_STREAM + i   (i < 2^29)  the forward-process eps of grid point i
    NFT_STEPS_STREAM, AWM_STEPS_STREAM     the uniforms behind the timestep choices

Rows are ordered sample-major: row ``b * S + s`` is sample ``b`` at its ``s``-th step; ``S`` is fixed
by the config (static shapes: ``B * S`` rows).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import noise as N

__all__ = ["FORWARD_NOISE_STREAM", "NFT_STEPS_STREAM", "AWM_STEPS_STREAM", "ForwardRows", "nft_count",
           "nft_steps", "awm_strata", "awm_steps", "forward_rows"]

FORWARD_NOISE_STREAM = 1 << 31          # + grid point index; rollout streams are < 2^31
NFT_STEPS_STREAM = (1 << 31) + (1 << 30)
AWM_STEPS_STREAM = NFT_STEPS_STREAM + 1
_MAX_STEP = 1 << 29


def _int(name: str, v, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    return v


def _keys(row_keys) -> Tensor:
    if not isinstance(row_keys, Tensor) or row_keys.dim() != 1 or row_keys.dtype.is_floating_point \
            or row_keys.dtype.is_complex or row_keys.dtype == torch.bool:
        raise ValueError("row_keys must be a 1-D integer tensor [B]")
    return row_keys.to(torch.int64)


def _uniform(seed: int, row_keys: Tensor, stream: int, n: int) -> Tensor:
    """``[B, n]`` float64 uniforms ``(w >> 8) 2^-24`` in [0, 1) (exact; the 24-bit grid of torch.rand)
    from the Philox words of each key's stream ``stream``."""
    w = N.philox_words(seed, row_keys, stream, n)
    return (w >> 8).to(torch.float64) * 2.0 ** -24


def nft_count(num_steps: int, fraction: float = 0.99) -> int:
    """``K = int(N * fraction)`` as in DiffusionNFT ``scripts/train_nft_sd3.py`` (main: ``num_train_timesteps
    = int(config.sample.num_steps * config.train.timestep_fraction)``, Python float product truncated)."""
    _int("num_steps", num_steps, 1)
    if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    k = int(num_steps * fraction)
    if k < 1:
        raise ValueError(f"fraction {fraction!r} of num_steps {num_steps} selects no step")
    return k


def nft_steps(num_steps: int, fraction: float = 0.99, row_keys: Tensor | None = None, *, seed: int = 0) -> Tensor:
    """DiffusionNFT timesteps: ``K = int(N * fraction)`` of the sampler's N grid points per sample.

    Released rule (``scripts/train_nft_sd3.py``, main training loop): the rollout stores the scheduler's
    N timesteps per sample; each inner epoch draws ``perms_time = stack([randperm(N) for each sample])``,
    permutes every sample's timesteps independently, and trains on columns ``j < K`` of the permuted
    list. So each sample trains on a uniformly random K-subset of its N grid points, drawn per sample
    (for N = 10, K = 9: all but one random step), not on the first K. All K rows of a sample enter one
    gradient accumulation, so their order is irrelevant; we return the subset sorted ascending.

    ``row_keys`` [B] given: the per-sample subsets ``[B, K]`` (int64): a random permutation per sample
    from argsort of the key's Philox words on ``NFT_STEPS_STREAM`` (stable, ties broken by index).
    ``row_keys`` None: the deterministic first K grid points ``[K]`` (the reading "the sampler's first
    floor(N * 0.99) steps"; NOT the release's rule, kept for ablations and fixed-step tests).
    """
    k = nft_count(num_steps, fraction)
    if row_keys is None:
        return torch.arange(k, dtype=torch.int64)
    keys = _keys(row_keys).cpu()
    w = N.philox_words(seed, keys, NFT_STEPS_STREAM, num_steps)                       # [B, N]
    perm = torch.sort(w, dim=1, stable=True).indices
    return torch.sort(perm[:, :k], dim=1).values


def awm_strata(num_steps: int, count: int = 6, fraction: float = 0.9) -> tuple[Tensor, Tensor]:
    """AWM ``discrete_wo_init`` strata ``(lower, upper)`` [count] int64, as released (``advantage_weighted_
    matching/scripts/train_sd3_awm.py``, ``time_type == 'discrete_wo_init'``)::

        M = int(N * timestep_fraction)
        boundaries = torch.linspace(1, M, count + 1)         # float32, truncated by .long()
        lower, upper = boundaries[:-1].long(), boundaries[1:].long()

    Stratum j is the grid points ``[lower_j, upper_j)`` (point 0, pure noise, is never chosen; points
    ``>= M`` neither); an empty stratum (``lower_j == upper_j``) always yields ``lower_j``.
    """
    _int("num_steps", num_steps, 1)
    _int("count", count, 1)
    if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    m = int(num_steps * fraction)
    if m < 2:
        raise ValueError(f"fraction {fraction!r} of num_steps {num_steps} leaves no step after the first")
    b = torch.linspace(1, m, count + 1, dtype=torch.float32)
    return b[:-1].long(), b[1:].long()


def awm_steps(num_steps: int, count: int = 6, fraction: float = 0.9, row_keys: Tensor | None = None, *,
              seed: int = 0, generator: torch.Generator | None = None) -> Tensor:
    """AWM ``discrete_wo_init``: one grid point per stratum of :func:`awm_strata`,
    ``idx_j = lower_j + floor(u_j (upper_j - lower_j))``, ``u_j ~ U[0, 1)``.

    Released draw: ``rand_u = torch.rand(train_timesteps)`` once per training micro-batch, then
    ``repeat_interleave(t_indices, batch_size)``: the ``count`` indices are SHARED by all samples of a
    micro-batch (``train.batch_size`` = 3 in ``config/dgx_awm.py::geneval_sd3_no_cfg_1node``) and
    redrawn for the next micro-batch.

    Decision: by default (``row_keys`` [B] given) the draw is per sample, keyed by the row key on
    ``AWM_STEPS_STREAM`` -> ``[B, count]``. The release's sharing follows the micro-batch, a layout knob,
    so it cannot be chunking- or rank-invariant; per sample, each sample's law of steps is exactly the
    release's, only the correlation between samples of a micro-batch is dropped (which lowers the
    variance of the batch gradient). To share a draw invariantly, pass the same key for the samples that
    should share it (e.g. a prompt group's key). ``generator`` given instead: the release's shared draw
    bit for bit (``torch.rand(count, generator=generator)`` in float32) -> ``[count]``.
    """
    lower, upper = awm_strata(num_steps, count, fraction)
    if (row_keys is None) == (generator is None):
        raise ValueError("awm_steps: give exactly one of row_keys or generator")
    if generator is not None:
        u = torch.rand(count, generator=generator, dtype=torch.float32)
        return lower + (u * (upper - lower)).long()
    u = _uniform(seed, _keys(row_keys).cpu(), AWM_STEPS_STREAM, count)                   # [B, count]
    width = (upper - lower).to(torch.float64)
    return lower + torch.minimum((u * width).floor(), (width - 1).clamp(min=0)).long()


@dataclass
class ForwardRows:
    """``B * S`` training rows, sample-major (row ``b * S + s``)."""

    x_t: Tensor      # [B*S, ...]  alpha x0 + sigma eps (float32, float64 if x0 is float64)
    eps: Tensor      # [B*S, ...]  the noise (flow target v* = eps - x0)
    t: Tensor        # [B*S]       model time grid.model_t[step] (compute dtype)
    alpha: Tensor    # [B*S]       grid.alpha[step]
    sigma: Tensor    # [B*S]       grid.sigma[step]
    step: Tensor     # [B*S] int64 grid point index
    sample: Tensor   # [B*S] int64 index into x0
    key: Tensor      # [B*S] int64 row key of the sample


def forward_rows(x0: Tensor, row_keys: Tensor, steps: Tensor, grid, *, seed: int) -> ForwardRows:
    """Forward-process rows for every (sample, step): ``x_t = alpha_i x0_b + sigma_i eps_{b,i}``.

    Args:
        x0: clean samples ``[B, ...]`` (any float dtype; math in float32, or float64 for float64 x0).
        row_keys: ``[B]`` integer row keys of the samples (the plan's keys; chunk-invariant identities).
        steps: grid point indices in ``[0, N)``: ``[S]`` (the same steps for every sample) or ``[B, S]``.
        grid: a :class:`rsm_fast.solvers.Grid` (flow or VP).
        seed: the epoch's noise seed (Python int; as for :func:`noise.gaussian`).

    ``eps_{b,i} = gaussian(seed, key_b, FORWARD_NOISE_STREAM + i)``: a pure function of (seed, key, step),
    so the same sample gets the same noise on every rank and chunk size, and distinct (key, step) give
    independent streams (distinct Philox counters). Steps are range-checked on the host (CPU tensors).
    """
    if not isinstance(x0, Tensor) or x0.dim() < 1 or not x0.dtype.is_floating_point:
        raise ValueError("x0 must be a floating tensor [B, ...]")
    keys = _keys(row_keys)
    B = x0.shape[0]
    if keys.shape[0] != B:
        raise ValueError(f"row_keys must have shape [{B}], got {tuple(keys.shape)}")
    if not all(hasattr(grid, a) for a in ("alpha", "sigma", "model_t")):
        raise ValueError("grid must be an rsm_fast.solvers.Grid (alpha, sigma, model_t)")
    n = int(grid.model_t.shape[0])
    if not isinstance(steps, Tensor) or steps.dtype.is_floating_point or steps.dtype == torch.bool \
            or steps.dim() not in (1, 2) or (steps.dim() == 2 and steps.shape[0] != B):
        raise ValueError(f"steps must be an integer tensor [S] or [{B}, S]")
    if steps.shape[-1] < 1:
        raise ValueError("steps must select at least one step per sample (S >= 1)")
    if steps.device.type == "cpu" and steps.numel() and not (0 <= int(steps.min()) and int(steps.max()) < min(n, _MAX_STEP)):
        raise ValueError(f"steps must lie in [0, {n}) (grid points with a model time), got "
                         f"[{int(steps.min())}, {int(steps.max())}]")
    dev = x0.device
    dt = torch.float64 if x0.dtype == torch.float64 else torch.float32
    S = int(steps.shape[-1])
    step = (steps.expand(B, S) if steps.dim() == 1 else steps).reshape(B * S).to(device=dev, dtype=torch.int64)
    sample = torch.arange(B, device=dev).repeat_interleave(S)
    key = keys.to(dev).repeat_interleave(S)
    alpha = grid.alpha.to(device=dev, dtype=torch.float64)[step]
    sigma = grid.sigma.to(device=dev, dtype=torch.float64)[step]
    t = grid.model_t.to(device=dev, dtype=torch.float64)[step]
    eps = N.gaussian(seed, key, step + FORWARD_NOISE_STREAM, x0.shape[1:], dtype=dt, device=dev)
    view = (B * S,) + (1,) * (x0.dim() - 1)
    a, s = alpha.to(dt), sigma.to(dt)
    x_t = a.view(view) * x0.to(dt).index_select(0, sample) + s.view(view) * eps
    return ForwardRows(x_t, eps, t.to(dt), a, s, step, sample, key)
