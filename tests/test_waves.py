"""Waves (rsm_fast.engine.waves): an epoch split into sequential sub-rollouts draws the same rows,
noise and records as the unsplit plan, and the trainer scores a wave on a worker thread while the
next wave samples, with the same result as scoring after the rollout."""
from __future__ import annotations

import importlib

import pytest
import torch

from rsm_fast.config import ConfigError, build_config
from rsm_fast.engine.plan import PlanError, PlanSpec, compile_plan
from rsm_fast.engine.rollout import RolloutEngine
from rsm_fast.engine.waves import merge_plans, merge_records, split_groups, wave_plans
from rsm_fast.rewards import RewardError
from rsm_fast.tasks.toy2d import Toy2D, Toy2DConfig
from rsm_fast.trainer import Trainer

SPECS = [
    PlanSpec("sde", 6, 5, 3, sde_mask=(True,) * 5 + (False,), train_mask=(True, True, False, True, True, False)),
    PlanSpec("branch", 6, 4, 2, k=(3, 0, 2, 2, 0, 0)),
    PlanSpec("tree", 6, 3, 2, k=(2, 0, 3, 0, 0, 0), sde_mask=(True, True, True, False, True, False)),
]


def test_split_groups_covers_every_group_once():
    assert split_groups(10, 3) == [(0, 4), (4, 3), (7, 3)]
    assert split_groups(4, 4) == [(0, 1), (1, 1), (2, 1), (3, 1)]
    for bad, needle in ((0, "rollout.waves"), (5, "whole groups"), (True, "rollout.waves")):
        with pytest.raises(PlanError, match=needle):
            split_groups(4, bad)


def _record_table(plan):
    """Per record: (step, leaving key, group) -> record id, and the same for the final rows."""
    recs = {}
    for i in range(plan.num_steps):
        for r in torch.nonzero(plan.record[i] >= 0).flatten().tolist():
            recs[(i, int(plan.key[i][r]), int(plan.group[i + 1][r]))] = int(plan.record[i][r])
    return recs


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.kind)
@pytest.mark.parametrize("waves", [2, 3])
def test_merged_waves_equal_the_whole_plan_up_to_order(spec, waves):
    full = compile_plan(spec)
    merged = merge_plans(wave_plans(spec, waves))
    assert merged.rows == full.rows and merged.num_records == full.num_records
    assert merged.nfe() == full.nfe() and merged.trunk_rows == full.trunk_rows
    a, b = _record_table(full), _record_table(merged)
    assert a.keys() == b.keys()                      # same rows, keys and groups
    perm = torch.empty(full.num_records, dtype=torch.long)   # merged record id -> full record id
    for k, rid in b.items():
        perm[rid] = a[k]
    assert torch.equal(full.record_step[perm], merged.record_step)
    assert torch.equal(full.record_group[perm], merged.record_group)
    par = merged.record_parent
    assert torch.equal(torch.where(par >= 0, perm[par.clamp(min=0)], par), full.record_parent[perm])
    # baseline sets: the same partition of the records
    pairs = lambda sets: {frozenset(torch.nonzero(sets == s).flatten().tolist()) for s in sets.unique().tolist()}  # noqa: E731
    assert {frozenset(perm[sorted(p)].tolist()) for p in pairs(merged.record_set)} == pairs(full.record_set)
    assert sorted(merged.set_sizes) == sorted(full.set_sizes)
    # every final sample keeps its ancestors (final keys are unique per leaf)
    fk = {int(k): j for j, k in enumerate(full.key[-1].tolist())}
    for j, k in enumerate(merged.key[-1].tolist()):
        anc_m, anc_f = merged.leaf_ancestor[:, j], full.leaf_ancestor[:, fk[int(k)]]
        assert torch.equal(torch.where(anc_m >= 0, perm[anc_m.clamp(min=0)], anc_m), anc_f)


def _toy_engine(plan, model, tr):
    return RolloutEngine(model, tr, plan, seed=3, chunk_size=4)


@pytest.mark.parametrize("spec", SPECS[1:], ids=lambda s: s.kind)
def test_wave_rollouts_draw_the_whole_plans_noise_and_records(spec):
    """Waves run by separate engines and merged == the merged plan run by one engine (same noise,
    same states, bit for bit: every row's result depends only on its own inputs and key)."""
    task = Toy2D(Toy2DConfig(num_steps=spec.num_steps))
    tr = task.transition
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    model = lambda x, t, c: net(torch.cat([x, t[:, None] / 500.0], 1))  # noqa: E731
    plans = wave_plans(spec, 2)
    merged = merge_plans(plans)
    recs = [_toy_engine(p, model, tr).run(latent_shape=(2,)) for p in plans]
    got = merge_records(recs, merged)
    want = _toy_engine(merged, model, tr).run(latent_shape=(2,))
    for name in ("x", "z", "f_old", "log_prob", "step", "group", "parent", "x0", "x0_group", "leaf_ancestor"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert got.nfe["total"] == want.nfe["total"] == merged.nfe()["total"]


SMALL = ["train.batch_size=64", "method.group_size=8", "task.eval_samples=256", "policy.hidden=32",
         "train.threads=1", "task.num_steps=10"]


def _params_after(sets, epochs=2):
    tr = Trainer(build_config("grpo", None, SMALL + sets))
    stats = [tr.epoch() for _ in range(epochs)]
    tr.close()
    return tr, [p.detach().clone() for p in tr.params], stats


def test_trainer_scores_waves_on_the_worker_with_the_same_result():
    bad_rewards = importlib.import_module("tests.bad_rewards")   # the module the reward spec resolves to
    # reward_timeout=0: called inline (no deadline thread), so the thread names show who scores
    reward = ["task.reward=tests.bad_rewards:thread_logging_linear", "task.reward_timeout=0"]
    bad_rewards.THREADS.clear()
    _, sync, s1 = _params_after(reward)
    assert bad_rewards.THREADS and all(n == "MainThread" for n in bad_rewards.THREADS)
    bad_rewards.THREADS.clear()
    tr, over, s4 = _params_after(reward + ["rollout.waves=4"])
    assert len(tr.engines) == 4 and bad_rewards.THREADS.count("rsm-reward_0") == 4 * 2
    for a, b in zip(s1, s4):
        assert a["reward_mean"] == pytest.approx(b["reward_mean"], abs=1e-6)
        assert a["records"] == b["records"]
    # the loss is a mean over records in another order: equal up to float summation
    assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in zip(sync, over))


def test_waves_with_the_builtin_reward_train_like_one_rollout():
    _, one, _ = _params_after([])
    tr, two, _ = _params_after(["rollout.waves=2"])
    assert tr.async_reward is None and len(tr.engines) == 2
    assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in zip(one, two))


def test_wave_reward_faults_follow_the_policy():
    sets = SMALL + ["rollout.waves=2", "task.reward=tests.bad_rewards:nan_reward"]
    tr = Trainer(build_config("grpo", None, sets + ["train.reward_faults=skip"]))
    before = [p.detach().clone() for p in tr.params]
    st = tr.epoch()
    assert "skipped" in st and all(torch.equal(a, b) for a, b in zip(before, tr.params))
    tr.close()
    tr = Trainer(build_config("grpo", None, sets))
    with pytest.raises(RewardError, match="nan_reward"):
        tr.epoch()
    tr.close()


@pytest.mark.parametrize("sets, needle", [
    (["rollout.waves=0"], "rollout.waves"),
    (["rollout.waves=9"], "rollout.waves"),     # 64 / 8 = 8 groups
    (["method.group_size=0", "rollout.waves=2"], "rollout.waves"),
])
def test_bad_waves_name_the_field(sets, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", "\\.")):
        Trainer(build_config("grpo", None, SMALL + sets))
