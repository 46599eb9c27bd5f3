"""The first update is exactly on-policy on any device (issue 21, item 8): the records are re-expressed
against the training forward, so a rollout forward that differs from it by rounding (a GPU's other
kernels) neither moves the first log-ratio off 0 nor moves the sampled states."""
from __future__ import annotations

import pytest
import torch

from rsm_fast import families as F
from rsm_fast import schedules as S
from rsm_fast import transitions as T
from rsm_fast.config import build_config
from rsm_fast.trainer import Trainer


@pytest.mark.parametrize("family", ["flow", "ddim"])
def test_reexpression_keeps_the_sample_and_zeroes_the_ratio(family):
    tr = (T.flow_grpo_sde(S.rf_sigmas(10, 3.0), noise_level=0.7) if family == "flow"
          else T.ddim(S.ddpm_linear_alphas_cumprod(), S.ddim_timesteps(1000, 10), eta=1.0))
    g = torch.Generator().manual_seed(0)
    B = 6
    idx = torch.arange(B) % 10
    stoch = torch.tensor([True, True, True, True, False, True])
    c = tr.coeffs(idx, stoch, dtype=torch.float64)
    x, f_old, z = (torch.randn(B, 3, 4, generator=g, dtype=torch.float64) for _ in range(3))
    f = f_old + 1e-3 * torch.randn(B, 3, 4, generator=g, dtype=torch.float64)   # "another kernel's" forward
    x_next = c.step(x, f_old, z)
    assert c.log_ratio(f, f_old, z).abs().max() > 1e-6                         # without: off-policy by rounding
    f_old2, z2 = f_old.clone(), z.clone()
    F.reexpress_on_policy(f, f_old2, z2, c)
    torch.testing.assert_close(c.step(x, f_old2, z2), x_next, rtol=0, atol=1e-12)
    on = stoch.clone()
    assert torch.equal(f_old2[on], f[on]) and torch.equal(c.log_ratio(f, f_old2, z2), torch.zeros(B, dtype=torch.float64))
    assert torch.equal(z2[4], z[4]) and torch.equal(f_old2[4], f_old[4])        # a deterministic row is kept


def _toy(preset):
    return Trainer(build_config(preset, None, ["train.batch_size=32", "train.epochs=1", "train.inner_updates=2"]
                                + (["method.group_size=8"] if preset == "grpo" else [])))


@pytest.mark.parametrize("preset", ["grpo", "tempflow-grpo"])
def test_a_training_forward_that_differs_from_the_rollouts_is_still_on_policy(monkeypatch, preset):
    """The policy's forward adds 1e-4 with grad enabled (the training forward) and nothing under
    no_grad (the rollout): the first update's log-ratio is exactly 0 with the re-expression and
    not without it (the same run with the switch off)."""
    def run(reexpress: bool) -> dict:
        monkeypatch.setattr(F, "REEXPRESS_ON_POLICY", reexpress)
        tr = _toy(preset)
        inner = tr.policy.forward
        tr.policy.forward = lambda *a, **k: inner(*a, **k) + (1e-4 if torch.is_grad_enabled() else 0.0)
        return tr.epoch()

    on, off = run(True), run(False)
    assert on["onpolicy_logratio_absmax"] == 0.0
    assert off["onpolicy_logratio_absmax"] > 1e-7


def test_cpu_records_are_untouched_when_the_forwards_agree():
    """On the CPU the two forwards agree bit for bit: re-expressing changes no record."""
    tr = _toy("grpo")
    batch = tr.family.sample()
    rows = tr.family.rows(batch)
    z0, f0 = rows.rows.z.clone(), rows.rows.f_old.clone()
    tr.family.loss(rows, slice(0, rows.rows.x.shape[0]))
    assert torch.equal(rows.rows.z, z0) and torch.equal(rows.rows.f_old, f0)
