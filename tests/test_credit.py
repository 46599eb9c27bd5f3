"""Credit assignment from final samples to the engine's records: baseline sets of a plan, values
as descendant means (hard and soft returns), ragged-set advantages; all against brute force."""
from __future__ import annotations

import pytest
import torch

from rsm_fast.advantages import group_advantages, set_advantages
from rsm_fast.engine.credit import Credit
from rsm_fast.engine.plan import PlanSpec, compile_plan
from rsm_fast.estimators import soft_returns

N = 6
SPECS = {
    "sde": PlanSpec("sde", N, groups=3, trunks=4),
    "sde-window": PlanSpec("sde", N, groups=2, trunks=3, train_mask=(False, True, True, False, True, True)),
    "branch": PlanSpec("branch", N, groups=2, trunks=2, k=(3, 1, 2, 0, 4, 0)),
    "tree": PlanSpec("tree", N, groups=2, trunks=1, k=(2, 0, 3, 0, 0, 0)),
}


def _descendants(plan):
    """Brute force: record id -> list of final-sample indices, walking the leaf paths."""
    anc = plan.leaf_ancestor
    out = {m: [] for m in range(plan.num_records)}
    for i in range(anc.shape[0]):
        for leaf in range(anc.shape[1]):
            m = int(anc[i, leaf])
            if m >= 0:
                out[m].append(leaf)
    return out


def _parent_row(plan, m):
    """The row a record leaves from (its src) at its step."""
    i = int(plan.record_step[m])
    pos = int(torch.nonzero(plan.record[i] == m)[0])
    return i, int(plan.src[i][pos])


@pytest.mark.parametrize("name", list(SPECS))
def test_baseline_sets_follow_the_rule(name):
    plan = compile_plan(SPECS[name])
    sets = {}
    for m in range(plan.num_records):
        sets.setdefault(int(plan.record_set[m]), []).append(m)
    assert sorted(len(v) for v in sets.values()) == sorted(plan.set_sizes)
    children = {}                                                 # (step, parent row) -> records
    for m in range(plan.num_records):
        children.setdefault(_parent_row(plan, m), []).append(m)
    for members in sets.values():
        steps = {int(plan.record_step[m]) for m in members}
        assert len(steps) == 1                                   # one step per set
        parents = {_parent_row(plan, m) for m in members}
        if len(parents) == 1 and len(members) > 1:               # the siblings of one parent...
            assert sorted(children[parents.pop()]) == sorted(members)
            continue
        assert len({int(plan.record_group[m]) for m in members}) == 1   # ...else one group at one step
        assert all(len(children[p]) == 1 for p in parents)       # of parents with a single child
    if name.startswith("sde"):
        assert set(plan.set_sizes) == {SPECS[name].trunks}
    if name == "branch":                                          # K_i children per trunk, K=1 -> group
        assert sorted(plan.set_sizes) == sorted([3] * 4 + [2] * 4 + [4] * 4 + [2] * 2)


@pytest.mark.parametrize("name", list(SPECS))
def test_values_are_descendant_means(name):
    plan = compile_plan(SPECS[name])
    cr = Credit(plan)
    g = torch.Generator().manual_seed(1)
    r = torch.randn(plan.rows[-1], dtype=torch.float64, generator=g)
    grad = torch.randn(plan.rows[-1], 2, dtype=torch.float64, generator=g)
    desc = _descendants(plan)
    want = torch.stack([r[desc[m]].mean() for m in range(plan.num_records)])
    torch.testing.assert_close(cr.mean_over_leaves(r), want, rtol=1e-12, atol=1e-12)
    want_g = torch.stack([grad[desc[m]].mean(0) for m in range(plan.num_records)])
    torch.testing.assert_close(cr.mean_over_leaves(grad), want_g, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(SPECS))
def test_soft_values_brute_force(name):
    plan = compile_plan(SPECS[name])
    cr = Credit(plan)
    g = torch.Generator().manual_seed(2)
    r = torch.randn(plan.rows[-1], dtype=torch.float64, generator=g)
    kl = torch.rand(plan.num_records, dtype=torch.float64, generator=g)
    alpha = 0.7
    anc = plan.leaf_ancestor
    want = []
    for m, leaves in _descendants(plan).items():
        i = int(plan.record_step[m])
        q = [r[L] - alpha * sum(kl[int(anc[j, L])] for j in range(i + 1, N) if anc[j, L] >= 0) for L in leaves]
        want.append(torch.stack(q).mean())
    torch.testing.assert_close(cr.soft_values(r, kl, alpha), torch.stack(want), rtol=1e-12, atol=1e-12)


def test_soft_values_equal_soft_returns_for_k1_trajectories():
    """K = 1, every step trained: the record value is exactly the trajectory's soft return."""
    spec = PlanSpec("sde", N, groups=1, trunks=5)
    plan = compile_plan(spec)
    cr = Credit(plan)
    g = torch.Generator().manual_seed(3)
    r = torch.randn(5, dtype=torch.float64, generator=g)
    kl = torch.rand(plan.num_records, dtype=torch.float64, generator=g)
    # records are step-major: record m = step * 5 + trajectory
    kl_steps = kl.view(N, 5)
    torch.testing.assert_close(cr.soft_values(r, kl, 0.3), soft_returns(r, kl_steps, 0.3).flatten())
    torch.testing.assert_close(cr.path_kl(kl), kl_steps)


def test_credit_needs_no_host_sync(no_host_sync):
    plan = compile_plan(SPECS["tree"])
    cr = Credit(plan)
    r = torch.randn(plan.rows[-1])
    kl = torch.rand(plan.num_records)
    with no_host_sync():
        v = cr.soft_values(r, kl, 1.0)
        a = set_advantages(v, plan.record_set, plan.set_sizes, baseline="loo", normalize="group")
    assert torch.isfinite(a).all()


# -- ragged-set advantages ----------------------------------------------------------------------
@pytest.mark.parametrize("baseline", ["mean", "loo", "none"])
@pytest.mark.parametrize("normalize", ["none", "group", "global"])
def test_set_advantages_equal_group_advantages_on_equal_sets(baseline, normalize):
    g = torch.Generator().manual_seed(4)
    r = torch.randn(5, 6, dtype=torch.float64, generator=g)
    r[2] = 1.5                                                    # an all-equal group
    want = group_advantages(r, baseline=baseline, normalize=normalize, clip=2.0)
    # shuffled membership: the sets need not be contiguous
    perm = torch.randperm(30, generator=g)
    set_id = torch.arange(5).repeat_interleave(6)[perm]
    got = set_advantages(r.flatten()[perm], set_id, [6] * 5, baseline=baseline, normalize=normalize, clip=2.0)
    torch.testing.assert_close(got, want.flatten()[perm], rtol=1e-12, atol=1e-12)


def test_set_advantages_ragged_brute_force():
    g = torch.Generator().manual_seed(5)
    sizes = [2, 5, 3, 1, 4]
    set_id = torch.arange(5).repeat_interleave(torch.tensor(sizes))
    v = torch.randn(sum(sizes), dtype=torch.float64, generator=g)
    got = set_advantages(v, set_id, sizes, baseline="mean", normalize="group", clip=None, eps=0.0)
    for s in range(5):
        x = v[set_id == s]
        want = torch.zeros_like(x) if len(x) == 1 else (x - x.mean()) / x.std(correction=0)
        torch.testing.assert_close(got[set_id == s], want, rtol=1e-12, atol=1e-12)


def test_set_advantages_bad_input():
    v = torch.zeros(4)
    with pytest.raises(ValueError, match="loo"):
        set_advantages(v, torch.tensor([0, 0, 0, 1]), [3, 1], baseline="loo")
    with pytest.raises(ValueError, match="sum to M"):
        set_advantages(v, torch.tensor([0, 0, 1, 1]), [2, 1])
    with pytest.raises(ValueError, match="baseline"):
        set_advantages(v, torch.tensor([0, 0, 1, 1]), [2, 2], baseline="median")
