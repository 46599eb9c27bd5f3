"""fo_terminal's reward gradient in chunks of ``method.fo_grad_chunk`` final samples (issue 21):
the same gradient as one call over every sample (rows are independent), each call scoring at most
a chunk (0 = ``rollout.chunk_size``, 0 there = all), every sample counted once in
``scored["reward_grad"]``, and a non-finite gradient in any chunk still refused."""
from __future__ import annotations

import pytest
import torch

from rsm_fast import rewards as R
from rsm_fast.config import build_config
from rsm_fast.trainer import Trainer

# the digits classifier's label log-probability: a differentiable model reward scored through task.decode
DIGITS = ["task.name=digits-ddim", "task.num_steps=3", "train.batch_size=6", "method.group_size=3",
          "task.eval_samples=4", "train.threads=1"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def rollout():
    """One fo_terminal trainer and one epoch's rollout (6 final samples)."""
    torch.manual_seed(0)
    tr = Trainer(build_config("rsm-fo-terminal", None, DIGITS))
    tr.conds = tr.task.conditions(tr.plan.spec.groups, tr.gen)
    rec, f_ref, _ = tr._rollout(tr.engines, tr.plan, tr.conds, tr.gen, 0)
    c, _ = tr._record_kl(rec, f_ref)
    assert rec.x0.shape[0] == 6 and not tr.builtin_reward
    return tr, rec, c


def _grads(tr, rec, c, fo_grad_chunk: int, chunk_size: int = 0):
    """``_fo_grads`` under the given settings, with the batch size of every decode it made."""
    tr.cfg.method.fo_grad_chunk, tr.cfg.rollout.chunk_size = fo_grad_chunk, chunk_size
    sizes, decode = [], tr.task.decode
    tr.task.decode = lambda x0: (sizes.append(x0.shape[0]), decode(x0))[1]
    before = tr.scored["reward_grad"]
    try:
        g = tr._fo_grads(rec, c)
    finally:
        tr.task.decode = decode
    return g, sizes, tr.scored["reward_grad"] - before


@pytest.mark.parametrize("fo_grad_chunk, chunk_size, calls", [(4, 0, [4, 2]), (1, 5, [1] * 6), (0, 4, [4, 2]),
                                                              (6, 2, [6]), (9, 0, [6])])
def test_chunked_terminal_gradient_equals_one_call(rollout, fo_grad_chunk, chunk_size, calls):
    tr, rec, c = rollout
    whole, sizes, scored = _grads(tr, rec, c, 0)
    assert sizes == [6] and scored == 6
    g, sizes, scored = _grads(tr, rec, c, fo_grad_chunk, chunk_size)
    assert sizes == calls and scored == 6
    assert g.shape == rec.x0.shape and g.dtype == whole.dtype
    assert whole.abs().amax() > 0
    torch.testing.assert_close(g, whole, rtol=1e-5, atol=1e-7)


def test_a_non_finite_gradient_in_a_later_chunk_is_refused(rollout):
    """The reward's value stays finite, its gradient is NaN in the last chunk (2 rows) only."""
    tr, rec, c = rollout

    def reward(images, prompts, metadata):
        r = images.flatten(1).mean(1)
        return r + torch.sqrt(images.flatten(1)[:, 0] * 0) if images.shape[0] == 2 else r

    own = tr.reward_fn
    tr.reward_fn = R.as_reward(reward, "sqrt-at-zero")
    try:
        assert torch.isfinite(_grads(tr, rec, c, 3)[0]).all()      # two chunks of 3: finite
        with pytest.raises(R.RewardError, match="non-finite gradient"):
            _grads(tr, rec, c, 4)
    finally:
        tr.reward_fn = own
