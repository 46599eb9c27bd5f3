"""The fused epoch (train.fused_epoch, rsm_fast/fused_path.py): the rollout keeps its forwards'
graphs, the first-order path sweep and the first update differentiate them.

* A grad rollout samples the same path as the no-grad one, bit for bit, and keeps one graph per
  trained step; plans it cannot serve say why.
* The sweep through the stored graphs gives the unfused sweep's path gradients, and the fused
  epochs train the same weights as the unfused ones (rounding only), for the path preset, the
  per-record first order and zeroth order; the first update's training forward is not run or
  counted, later inner updates run their own.
* Zeroth order: the first update's log-ratio is exactly 0 (the loss is built on the rollout's own
  outputs), which would fail if the rollout and training forwards differed.
* Configurations it cannot serve are refused in one line naming the field.
* A policy that is the reference plus a correction shares one reference evaluation per step
  between the rollout's two outputs (bitwise the separate calls; the same weights to rounding).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from rsm_fast.config import ConfigError, build_config
from rsm_fast.engine.plan import PlanError
from rsm_fast.fused_path import mode_dependent
from rsm_fast.trainer import Trainer

SMALL = ["train.batch_size=8", "task.num_steps=6", "policy.hidden=16", "train.threads=1"]


def _trainer(preset: str, *sets: str) -> Trainer:
    torch.manual_seed(0)
    return Trainer(build_config(preset, None, SMALL + list(sets)))


def _perturb(tr: Trainer, scale: float = 0.3) -> None:
    """A policy away from the reference (the last layer starts at zero), the same for every call."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in tr.policy.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def test_grad_rollout_samples_the_same_path_and_keeps_each_trained_steps_graph():
    tr = _trainer("rsm-soft-fo")
    eng = tr.engines[0]
    assert eng.graph_unfit() is None
    x_init = tr.task.initial_latents(eng.plan.rows[0], torch.Generator().manual_seed(3))
    plain = eng.run(x_init, epoch=2)
    kept = eng.run(x_init, epoch=2, grad=True)
    assert plain.graph is None
    for k in ("x", "z", "f_old", "log_prob", "x0"):
        assert torch.equal(getattr(plain, k), getattr(kept, k)), k
        assert not getattr(kept, k).requires_grad, k
    steps = sorted(kept.graph)
    assert steps == sorted(set(plain.step.tolist()))
    for i in steps:
        e = kept.graph[i]
        assert e["x"].is_leaf and e["x"].requires_grad and e["f"].grad_fn is not None
        assert torch.equal(e["f"].detach(), plain.f_old[plain.step == i])


def test_a_residual_policy_shares_one_reference_evaluation_with_the_rollout():
    """The 2-D policy is the reference plus a correction (``PolicyHandle.model_on_reference``): the
    fused rollout evaluates the reference once per step for both outputs, which are bitwise the
    separate calls' and whose graphs share it; the sweep then evaluates nothing. An epoch calls the
    reference once less per trained step, and trains the same weights (rounding only:
    the sweep's product sums the two reference terms before one backward instead of after two)."""
    from rsm_fast.fused_path import shared_reference

    calls, weights = {}, {}
    for share in (True, False):
        tr = _trainer("rsm-soft-fo-trap", "train.ema_decay=0")
        _perturb(tr, 0.1)
        if not share:
            tr.handle.model_on_reference = None
        assert (shared_reference(tr.handle, tr.engines[0]) is not None) == share
        n, ref_eps = [0], tr.task.reference_eps

        def counted(x, t, _f=ref_eps):
            n[0] += 1
            return _f(x, t)
        tr.task.reference_eps = counted
        x_init = tr.task.initial_latents(tr.engines[0].plan.rows[0], torch.Generator().manual_seed(3))
        rec = tr.engines[0].run(x_init, epoch=1, grad=True, joint=shared_reference(tr.handle, tr.engines[0]))
        if share:
            for i, e in rec.graph.items():
                with torch.no_grad():
                    assert torch.equal(e["f_ref"], ref_eps(e["x"], tr.engines[0]._t[i:i + 1].expand(e["x"].shape[0])))
                    assert torch.equal(e["f"], tr.handle.model(e["x"], tr.engines[0]._t[i:i + 1].expand(e["x"].shape[0])))
        else:
            assert all("f_ref" not in e for e in rec.graph.values())
        n[0] = 0
        tr.epoch()
        calls[share] = (n[0], len(rec.graph))
        for _ in range(2):
            tr.epoch()
        weights[share] = [p.detach().clone() for p in tr.params]
    steps = calls[True][1]          # (the trapezoid's sweep evaluates the last state again, in both)
    assert steps > 0 and calls[False][0] - calls[True][0] == steps
    moved = max(float(p.abs().max()) for p in weights[False])
    assert max(float((p - q).abs().max()) for p, q in zip(weights[True], weights[False])) <= 1e-5 * moved


def test_the_shared_reference_needs_a_plain_engine_and_no_cfg():
    from rsm_fast.fused_path import shared_reference

    tr = _trainer("rsm-soft-fo-trap")
    eng = tr.engines[0]
    assert shared_reference(tr.handle, eng) is not None
    eng.cfg_scale = 2.0
    assert shared_reference(tr.handle, eng) is None
    with pytest.raises(PlanError, match="joint"):
        eng.run(None, latent_shape=(2,), grad=True, joint=lambda x, t, c: (x, x))
    eng.cfg_scale = None
    eng.model = lambda x, t, cond=None: tr.handle.model(x, t, cond)    # e.g. a graphed wrapper
    assert shared_reference(tr.handle, eng) is None
    with pytest.raises(PlanError, match="joint"):
        eng.run(None, latent_shape=(2,), joint=lambda x, t, c: (x, x))


def test_branching_plans_cannot_keep_graphs():
    tr = _trainer("tempflow-grpo")
    eng = tr.engines[0]
    assert "branches" in eng.graph_unfit()
    with pytest.raises(PlanError, match="grad=True"):
        eng.run(None, latent_shape=(2,), grad=True)


@pytest.mark.parametrize("rule", ["next", "trapezoid"])
def test_sweep_through_the_rollouts_graphs_equals_the_unfused_sweep(rule):
    grads = {}
    for fused in (False, True):
        tr = _trainer("rsm-soft-fo", f"method.fo_path_rule={rule}")
        _perturb(tr)
        grads[fused] = tr._sample_and_score(grad=fused)[-1]
    scale = float(grads[False].abs().max())
    assert scale > 0
    assert float((grads[True] - grads[False]).abs().max()) <= 1e-5 * scale


@pytest.mark.parametrize("preset,sets", [
    ("rsm-soft-fo-trap", []),
    ("rsm-soft-fo", ["method.returns=hard"]),
    ("sqdf", []),
    ("rsm-soft-zo", []),
])
def test_fused_epochs_train_the_unfused_weights(preset, sets):
    out = {}
    for fused in (False, True):
        tr = _trainer(preset, *sets, f"train.fused_epoch={fused}", "train.ema_decay=0")
        _perturb(tr, 0.1)
        logs = [tr.epoch() for _ in range(3)]
        out[fused] = ([p.detach().clone() for p in tr.params], logs, dict(tr.nfe))
    (w0, l0, n0), (w1, l1, n1) = out[False], out[True]
    moved = max(float((p - q).abs().max()) for p, q in zip(w0, (p.detach() for p in _trainer(preset, *sets).params)))
    diff = max(float((p - q).abs().max()) for p, q in zip(w0, w1))
    assert moved > 1e-3 and diff <= 1e-4 * moved
    for a, b in zip(l0, l1):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-7)
    # the first (only) update's training forward is the rollout's: not run, not counted
    assert n0["train"] > 0 and n1["train"] == 0
    assert n1["rollout"] == n0["rollout"] and n1["reference"] == n0["reference"]


def test_later_inner_updates_run_and_count_their_own_forward():
    tr = _trainer("rsm-soft-zo", "train.inner_updates=2", "train.fused_epoch=true")
    ref = _trainer("rsm-soft-zo", "train.inner_updates=2")
    tr.epoch()
    ref.epoch()
    assert tr.nfe["train"] == ref.nfe["train"] // 2 > 0


def test_zeroth_order_first_update_is_exactly_on_policy():
    tr = _trainer("rsm-soft-zo", "train.fused_epoch=true")
    _perturb(tr, 0.1)
    for _ in range(2):
        assert tr.epoch()["onpolicy_logratio_absmax"] == 0.0


@pytest.mark.parametrize("preset,sets,why", [
    ("tempflow-grpo", [], "rollout.plan=branch"),
    ("rsm-soft-zo", ["rollout.waves=2"], "rollout.waves=2"),
    ("rsm-soft-zo", ["train.grad_accum=2"], "train.grad_accum=2"),
    ("rsm-soft-zo", ["rollout.graphs=true"], "rollout.graphs"),
    ("mix-grpo", ["train.batch_size=16"], "rollout.window"),
    ("rsm-soft-zo", ["task.name=digits-ddim", "policy.gradient_checkpointing=true"], "policy.gradient_checkpointing"),
])
def test_unservable_configurations_are_refused_in_one_line(preset, sets, why):
    with pytest.raises(ConfigError) as e:
        build_config(preset, None, SMALL + sets + ["train.fused_epoch=true"])
    msg = str(e.value)
    assert "\n" not in msg and "'train.fused_epoch'" in msg and why in msg


def test_modules_that_differ_between_train_and_eval_are_named():
    assert mode_dependent(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.0))) is None
    assert mode_dependent(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1))) == "1"
    assert mode_dependent(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))) == "1"
    tr = _trainer("rsm-soft-zo", "train.fused_epoch=true")
    tr.policy.net_extra = nn.Dropout(0.2)        # a mode-dependent module anywhere in the policy
    from rsm_fast.fused_path import FusedTrajectoryFamily

    with pytest.raises(ConfigError, match="'train.fused_epoch'.*'net_extra'"):
        FusedTrajectoryFamily(tr)


def test_memory_estimate_holds_every_records_graphs_and_names_the_field():
    from rsm_fast import preflight as P

    sets = ["task.name=digits-ddim", "train.batch_size=8", "task.eval_samples=4"]
    plain = build_config("rsm-soft-fo", None, sets)
    fused = build_config("rsm-soft-fo", None, sets + ["train.fused_epoch=true"])
    geo = P.task_geometry(plain)
    a, b = P.estimate_memory(plain, geo), P.estimate_memory(fused, geo)
    from rsm_fast.memory_estimate import plan_counts

    records = plan_counts(fused, geo.sde_mask or (True,) * fused.task.num_steps).records
    g = 2 if geo.cfg_guidance else 1
    assert "rollout graphs" not in a.train and "training activations" not in b.train
    assert b.train["rollout graphs"] == 2 * g * records * geo.act_grad + geo.act_fixed > 0
    assert b.total > a.total
    assert b.setting(b.total - b.train["rollout graphs"] // 2) == "train.fused_epoch"
