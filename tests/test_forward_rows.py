"""Forward-process training rows: released step rules, x_t formula, counter-based noise invariances."""
import pytest
import torch

from rsm_fast.engine import forward_rows as F
from rsm_fast.schedules import ddim_timesteps, sd15_alphas_cumprod
from rsm_fast.solvers import flow_grid, vp_grid


def _vp():
    return vp_grid(sd15_alphas_cumprod(1000), ddim_timesteps(1000, 10, 1))


GRIDS = {"flow": lambda: flow_grid(10, 3.0), "vp": _vp}

# Values transcribed from advantage_weighted_matching/scripts/train_sd3_awm.py, discrete_wo_init:
# boundaries = torch.linspace(1, int(N * 0.9), 7); lower = boundaries[:-1].long(); upper = boundaries[1:].long()
AWM_STRATA = {
    10: ([1, 2, 3, 5, 6, 7], [2, 3, 5, 6, 7, 9]),
    14: ([1, 2, 4, 6, 8, 10], [2, 4, 6, 8, 10, 12]),
    20: ([1, 3, 6, 9, 12, 15], [3, 6, 9, 12, 15, 18]),
    25: ([1, 4, 8, 11, 15, 18], [4, 8, 11, 15, 18, 22]),
    40: ([1, 6, 12, 18, 24, 30], [6, 12, 18, 24, 30, 36]),
    8: ([1, 2, 3, 4, 5, 6], [2, 3, 4, 5, 6, 7]),
    5: ([1, 1, 2, 2, 3, 3], [1, 2, 2, 3, 3, 4]),    # empty strata -> their lower bound
}
# DiffusionNFT scripts/train_nft_sd3.py: num_train_timesteps = int(num_steps * 0.99)
NFT_K = {2: 1, 10: 9, 25: 24, 40: 39, 100: 99, 200: 198}


@pytest.mark.parametrize("n", sorted(NFT_K))
def test_nft_count_and_steps(n):
    k = NFT_K[n]
    assert F.nft_count(n) == k
    assert F.nft_steps(n).tolist() == list(range(k))
    keys = torch.arange(64) * 7 + 3
    s = F.nft_steps(n, row_keys=keys, seed=5)
    assert s.shape == (64, k) and s.dtype == torch.int64
    assert bool((s[:, 1:] > s[:, :-1]).all()) and int(s.min()) >= 0 and int(s.max()) < n   # distinct, sorted
    assert torch.equal(s[10:20], F.nft_steps(n, row_keys=keys[10:20], seed=5))            # chunking-invariant
    if n == 10:   # one random step dropped per sample; every step gets dropped by some sample
        dropped = {(set(range(10)) - set(r)).pop() for r in s.tolist()}
        assert dropped == set(range(10))


@pytest.mark.parametrize("n", sorted(AWM_STRATA))
def test_awm_strata_and_steps(n):
    lo, up = F.awm_strata(n)
    assert (lo.tolist(), up.tolist()) == AWM_STRATA[n]
    keys = torch.arange(500)
    s = F.awm_steps(n, row_keys=keys, seed=1)
    assert s.shape == (500, 6)
    hi = torch.maximum(up - 1, lo)
    assert bool((s >= lo).all()) and bool((s <= hi).all())
    for j in range(6):   # every point of a stratum is hit
        assert set(s[:, j].tolist()) == set(range(int(lo[j]), int(hi[j]) + 1))
    assert torch.equal(s[123:321], F.awm_steps(n, row_keys=keys[123:321], seed=1))
    assert not torch.equal(s, F.awm_steps(n, row_keys=keys, seed=2)) or n in (5, 8)


def test_awm_generator_matches_release_snippet():
    for n in (10, 14, 25):
        g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
        got = F.awm_steps(n, generator=g1)
        b = torch.linspace(1, int(n * 0.9), steps=6 + 1)
        lower, upper = b[:-1].long(), b[1:].long()
        rand_u = torch.rand(6, generator=g2)
        assert torch.equal(got, lower + (rand_u * (upper - lower)).long())


@pytest.mark.parametrize("path", sorted(GRIDS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_xt_formula(path, dtype):
    grid = GRIDS[path]()
    x0 = torch.randn(3, 2, 4, 5, generator=torch.Generator().manual_seed(0)).to(dtype)
    keys = torch.tensor([11, 42, 7])
    steps = torch.tensor([[0, 3, 9], [1, 2, 8], [4, 5, 6]])
    r = F.forward_rows(x0, keys, steps, grid, seed=3)
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    assert r.x_t.shape == (9, 2, 4, 5) and r.x_t.dtype == cd and r.eps.dtype == cd
    assert r.sample.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2] and r.step.tolist() == steps.flatten().tolist()
    assert r.key.tolist() == [11] * 3 + [42] * 3 + [7] * 3
    st = steps.flatten()
    assert torch.equal(r.t, grid.model_t[st].to(cd))
    if path == "flow":
        assert torch.allclose(r.alpha.double(), 1 - grid.model_t[st], atol=1e-7)
        assert torch.allclose(r.sigma.double(), grid.model_t[st], atol=1e-7)
    else:
        ab = grid.alpha[st] ** 2
        assert torch.allclose(r.sigma.double(), (1 - ab).sqrt(), atol=1e-7)
    ref = grid.alpha[st].view(-1, 1, 1, 1) * x0.double()[r.sample] + grid.sigma[st].view(-1, 1, 1, 1) * r.eps.double()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert torch.allclose(r.x_t.double(), ref, atol=tol, rtol=0)


@pytest.mark.parametrize("path", sorted(GRIDS))
def test_noise_chunking_invariant_and_reproducible(path):
    grid = GRIDS[path]()
    x0 = torch.randn(7, 3, 8, 8)
    keys = torch.arange(7) * 1000 + 5
    for steps in (torch.tensor([0, 4, 9]), F.awm_steps(10, row_keys=keys, seed=9)):
        full = F.forward_rows(x0, keys, steps, grid, seed=9)
        again = F.forward_rows(x0, keys, steps, grid, seed=9)
        assert torch.equal(full.x_t, again.x_t) and torch.equal(full.eps, again.eps)
        k = 3
        parts = [F.forward_rows(x0[a:b], keys[a:b], steps if steps.dim() == 1 else steps[a:b], grid, seed=9)
                 for a, b in ((0, k), (k, 7))]
        assert torch.equal(torch.cat([p.eps for p in parts]), full.eps)
        assert torch.equal(torch.cat([p.x_t for p in parts]), full.x_t)
        perm = torch.tensor([6, 2, 0, 5, 1, 3, 4])   # row order does not matter either
        pr = F.forward_rows(x0[perm], keys[perm], steps if steps.dim() == 1 else steps[perm], grid, seed=9)
        assert torch.equal(pr.eps.view(7, -1, *x0.shape[1:]), full.eps.view(7, -1, *x0.shape[1:])[perm])
    assert not torch.equal(F.forward_rows(x0, keys, torch.tensor([0]), grid, seed=10).eps,
                           F.forward_rows(x0, keys, torch.tensor([0]), grid, seed=9).eps)


def test_noise_independent_and_distinct_from_rollout_streams():
    from rsm_fast.engine import noise as N
    grid = flow_grid(10)
    B, S = 400, 10
    x0 = torch.zeros(B, 4, 16)
    keys = torch.arange(B)
    r = F.forward_rows(x0, keys, torch.arange(S), grid, seed=0)
    e = r.eps.view(B * S, -1)
    assert abs(float(e.mean())) < 0.01 and abs(float(e.var()) - 1) < 0.01
    flat = e.view(B, S, -1)
    for a, b in (((0, 0), (0, 1)), ((0, 0), (1, 0)), ((3, 2), (4, 3))):
        assert not torch.equal(flat[a], flat[b])
    # correlation between rows of the same sample at different steps and between samples ~ 0
    cs = (flat[:, 0] * flat[:, 1]).mean()
    cb = (flat[:-1, 0] * flat[1:, 0]).mean()
    assert abs(float(cs)) < 0.02 and abs(float(cb)) < 0.02
    # not the rollout's noise for the same key and step
    roll = N.gaussian(0, keys[:5], 3, (4, 16))
    assert not torch.equal(roll, flat[:5, 3])


def test_bad_arguments():
    grid = flow_grid(10)
    x0 = torch.randn(2, 3)
    keys = torch.tensor([1, 2])
    cases = [
        (lambda: F.nft_count(0), "num_steps"),
        (lambda: F.nft_count(10, 1.5), "fraction"),
        (lambda: F.nft_count(1, 0.99), "fraction"),
        (lambda: F.awm_strata(10, count=0), "count"),
        (lambda: F.awm_strata(2, fraction=0.9), "fraction"),
        (lambda: F.awm_steps(10), "row_keys"),
        (lambda: F.awm_steps(10, row_keys=torch.tensor([1.0])), "row_keys"),
        (lambda: F.forward_rows(x0, torch.tensor([1]), torch.tensor([0]), grid, seed=0), "row_keys"),
        (lambda: F.forward_rows(x0, keys, torch.tensor([10]), grid, seed=0), "steps"),
        (lambda: F.forward_rows(x0, keys, torch.tensor([-1]), grid, seed=0), "steps"),
        (lambda: F.forward_rows(x0, keys, torch.tensor([0.5]), grid, seed=0), "steps"),
        (lambda: F.forward_rows(x0, keys, torch.zeros(3, 2, dtype=torch.long), grid, seed=0), "steps"),
        (lambda: F.forward_rows(x0, keys, torch.zeros(0, dtype=torch.long), grid, seed=0), "steps"),
        (lambda: F.forward_rows(x0.long(), keys, torch.tensor([0]), grid, seed=0), "x0"),
        (lambda: F.forward_rows(x0, keys, torch.tensor([0]), object(), seed=0), "grid"),
    ]
    for fn, name in cases:
        with pytest.raises(ValueError) as ei:
            fn()
        msg = str(ei.value)
        assert name in msg and "\n" not in msg, msg
