"""Reward centering and GRPO group advantages (rsm_fast.advantages, spec §4.5)."""
import pytest
import torch

from rsm_fast.advantages import BASELINES, NORMALIZATIONS, center, group_advantages


def _rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_choices_are_exported():
    assert BASELINES == ("mean", "loo", "none")
    assert NORMALIZATIONS == ("none", "group", "global")


@pytest.mark.parametrize("K", [2, 3, 7])
def test_center_mean_and_loo_algebra(K):
    r = _rand(5, K, seed=K) * 3 + 2
    m = center(r, dim=1, baseline="mean")
    loo = center(r, dim=1, baseline="loo")
    torch.testing.assert_close(m.sum(1), torch.zeros(5, dtype=r.dtype), atol=1e-12, rtol=0)
    # r_k - (S - r_k)/(K-1) = K/(K-1) (r_k - S/K), hence also for the sums
    torch.testing.assert_close(loo, K / (K - 1) * m, atol=1e-12, rtol=0)
    explicit = torch.stack([r[:, k] - torch.cat([r[:, :k], r[:, k + 1:]], 1).mean(1) for k in range(K)], 1)
    torch.testing.assert_close(loo, explicit, atol=1e-12, rtol=0)
    torch.testing.assert_close(center(r, dim=1, baseline="none"), r)


def test_center_along_other_dim_and_default_last():
    r = _rand(4, 6, 3, seed=1)
    torch.testing.assert_close(center(r, dim=1), r - r.mean(1, keepdim=True))
    torch.testing.assert_close(center(r), r - r.mean(-1, keepdim=True))
    torch.testing.assert_close(center(r, dim=0, baseline="loo"), 4 / 3 * (r - r.mean(0, keepdim=True)))


def test_loo_baseline_is_unbiased_mean_is_shrunk():
    """E[(r_k - b_k) z_k] with r_k = 5 + c z_k + noise: LOO gives c, the group mean (1 - 1/K) c."""
    g = torch.Generator().manual_seed(3)
    n, K, c = 200_000, 4, 0.7
    z = torch.randn(n, K, generator=g, dtype=torch.float64)
    r = 5.0 + c * z + 0.5 * torch.randn(n, K, generator=g, dtype=torch.float64)
    est_loo = (center(r, baseline="loo") * z).mean()
    est_mean = (center(r, baseline="mean") * z).mean()
    se = float(((center(r, baseline="loo") * z).mean(1)).std() / n**0.5)  # ~1.4e-3
    assert abs(float(est_loo) - c) < 4 * se
    assert abs(float(est_mean) - (1 - 1 / K) * c) < 4 * se
    assert abs(float(est_mean) - c) > 20 * se


def test_group_std_normalisation_matches_formula():
    r = _rand(6, 8, seed=4) * 2 + 1
    adv = group_advantages(r, clip=None)
    std = r.std(1, correction=0, keepdim=True)        # numpy np.std (ddof = 0), as flow_grpo
    torch.testing.assert_close(adv, (r - r.mean(1, keepdim=True)) / (std + 1e-4))
    adv_loo = group_advantages(r, baseline="loo", clip=None)
    torch.testing.assert_close(adv_loo, 8 / 7 * adv)
    adv_none = group_advantages(r, baseline="none", clip=None, eps=0.0)
    torch.testing.assert_close(adv_none, r / std)


def test_global_std_and_no_normalisation():
    r = _rand(5, 4, seed=5) * 3
    adv = group_advantages(r, normalize="global", clip=None, eps=1e-3)
    torch.testing.assert_close(adv, (r - r.mean(1, keepdim=True)) / (r.std(correction=0) + 1e-3))
    torch.testing.assert_close(group_advantages(r, normalize="none", clip=None), r - r.mean(1, keepdim=True))


@pytest.mark.parametrize("baseline", ["mean", "none", "loo"])
def test_zero_std_groups_get_zero_advantage(baseline):
    r = _rand(3, 4, seed=6)
    r[1] = 0.1          # a degenerate group (identical rewards, not exactly representable)
    adv = group_advantages(r, baseline=baseline)
    assert torch.all(adv[1] == 0)
    assert torch.all(adv[0] != 0) and torch.all(adv[2] != 0)
    same = torch.full((2, 3), 7.3, dtype=torch.float64)
    assert torch.all(group_advantages(same, baseline=baseline, normalize="global") == 0)
    # K = 1 groups carry no signal either
    assert torch.all(group_advantages(_rand(4, 1), normalize="group") == 0)


def test_clipping():
    r = torch.tensor([[0.0] * 30 + [100.0]], dtype=torch.float64)   # outlier: (100 - m)/std ~ 5.5
    adv = group_advantages(r)
    assert float(adv.max()) == 5.0
    unclipped = group_advantages(r, clip=None)
    assert float(unclipped.max()) > 5.0
    torch.testing.assert_close(group_advantages(r, clip=0.5), unclipped.clamp(-0.5, 0.5))
    big = _rand(2, 5, seed=7) * 100
    assert float(group_advantages(big, normalize="none", clip=2.0).abs().max()) == 2.0


def test_dtypes():
    r = _rand(2, 4, seed=8)
    assert group_advantages(r).dtype == torch.float64
    assert group_advantages(r.to(torch.bfloat16)).dtype == torch.float32
    assert center(r.to(torch.float16)).dtype == torch.float32
    assert group_advantages(torch.zeros(0, 4)).shape == (0, 4)


@pytest.mark.parametrize("kwargs,name", [
    (dict(baseline="median"), "baseline"),
    (dict(normalize="batch"), "normalize"),
    (dict(eps=-1.0), "eps"),
    (dict(clip=0.0), "clip"),
    (dict(clip=-3.0), "clip"),
])
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        group_advantages(_rand(2, 4), **kwargs)


def test_bad_shapes_and_loo_size():
    with pytest.raises(ValueError, match="rewards"):
        group_advantages(_rand(8))
    with pytest.raises(ValueError, match="loo"):
        center(_rand(3, 1), baseline="loo")
    with pytest.raises(ValueError, match="loo"):
        group_advantages(_rand(3, 1), baseline="loo")
    with pytest.raises(ValueError, match="baseline"):
        center(_rand(3, 2), baseline="LOO")
