"""Host syncs inside the training step (issue 21, item 5): the finite checks and the logged values
of one update are read together, once; the last step's parameter check once more per epoch.

The count is of host-reading Tensor methods (tests/conftest.py ``HOST_SYNC_METHODS``) called during
``TrainStep.run``, except on the optimizer's ``step`` counters: Adam keeps them on the host
(``capturable=False``), so reading them is no device sync on a GPU either."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from conftest import HOST_SYNC_METHODS
from rsm_fast.train_step import TrainStep


class _Stop(Exception):
    pass


def _counting(monkeypatch, opt):
    calls = []
    for name in HOST_SYNC_METHODS:
        orig = getattr(torch.Tensor, name)

        def wrapped(self, *a, _orig=orig, _name=name, **k):
            if not any(self is st.get("step") for st in opt.state.values()):
                calls.append(_name)
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapped)
    return calls


def _problem(seed=0, rows=12):
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    x, y = torch.randn(rows, 4, generator=g), torch.randn(rows, 1, generator=g)

    def loss_fn(sl):
        pred = model(x[sl])
        err = (pred - y[sl]).squeeze(1)
        out = SimpleNamespace(clipped=err.detach().abs() > 0.5, log_ratio=err.detach() * 0.0)
        return (err**2).mean(), out

    return model, loss_fn


@pytest.mark.parametrize("updates,accum", [(1, 1), (3, 1), (3, 4)])
def test_one_host_read_per_update_plus_one_per_epoch(monkeypatch, updates, accum):
    model, loss_fn = _problem()
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-2)
    step = TrainStep(model, params, opt, grad_accum=accum, max_grad_norm=1.0, ema_decay=0.9)
    calls = _counting(monkeypatch, opt)
    stats, mask = step.run(12, updates, loss_fn, lambda n: None, _Stop, 0)
    monkeypatch.undo()
    assert len(calls) == updates + 1, calls
    assert stats["loss"] > 0 and stats["grad_norm"] > 0 and 0 <= stats["clip_frac"] <= 1
    assert stats["onpolicy_logratio_absmax"] == 0.0 and mask.shape == (12,)
    assert step.ema.steps == updates                  # every good step fed the EMA


def test_the_read_values_equal_the_per_micro_batch_ones():
    """The loss logged from the one read equals the share-weighted sum of the micro-batches' losses
    computed the old way (a float per micro-batch), and training is unchanged."""
    model, loss_fn = _problem(seed=1)
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-2)
    w0 = [p.detach().clone() for p in params]
    want = sum(float(loss_fn(sl)[0].detach()) * (sl.stop - sl.start) / 12 for sl in (slice(0, 6), slice(6, 12)))
    stats, _ = TrainStep(model, params, opt, grad_accum=2).run(12, 1, loss_fn, lambda n: None, _Stop, 0)
    assert stats["loss"] == pytest.approx(want, rel=1e-12)
    assert any(not torch.equal(a, b) for a, b in zip(w0, params))


def test_a_bad_step_is_found_by_the_next_read_and_undone(monkeypatch):
    """The parameter check of update 0 is read with update 1's values: the bad step is undone (the
    weights of before it) and the run stops before update 1 steps; the EMA never saw it."""
    model, loss_fn = _problem(seed=2)
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=1.0)
    step = TrainStep(model, params, opt, max_grad_norm=0.0, ema_decay=0.9)
    w0 = [p.detach().clone() for p in params]
    real = opt.step

    def poisoned(*a, **k):          # the first step writes a NaN into one weight
        real(*a, **k)
        with torch.no_grad():
            params[0].view(-1)[0] = float("nan")

    monkeypatch.setattr(opt, "step", poisoned)
    with pytest.raises(_Stop, match=r"update 0\) made 1 of 4 trained parameter tensors non-finite"):
        step.run(12, 3, loss_fn, lambda n: None, _Stop, 0)
    assert all(torch.equal(a, b) for a, b in zip(w0, params))
    assert all(p.grad is None for p in params) and step.ema.steps == 0
