"""Presets that claim a release reproduce its loss lines in float64 on the same inputs (issue 20,
item 5). The oracle transcribes the released code from its formulas; it never calls rsm_fast's
transitions or losses.

``grpo`` on a flow task = flow_grpo's GenEval config (yifan123/flow_grpo scripts/train_sd3.py,
flow_grpo/diffusers_patch/sd3_sde_with_logprob.py::sde_step_with_logprob, config/grpo.py
geneval_sd3, flow_grpo/stat_tracking.py) with the toy-scale clip of the preset::

    std_dev_t = sqrt(sigma / (1 - (sigma_max if sigma == 1 else sigma))) * noise_level
    mean(v)   = x (1 + std_dev_t^2 / (2 sigma) dt) + v (1 + std_dev_t^2 (1 - sigma) / (2 sigma)) dt
    x'        = mean(v_old) + std_dev_t sqrt(-dt) z,           dt = sigma_next - sigma < 0
    log_prob  = mean_dims(-(x' - mean)^2 / (2 (std_dev_t sqrt(-dt))^2) - log(std_dev_t sqrt(-dt)) - log sqrt(2 pi))
    A         = clamp(A, -adv_clip_max, adv_clip_max);  ratio = exp(log_prob - log_prob_old)
    policy    = mean(max(-A ratio, -A clamp(ratio, 1 - clip_range, 1 + clip_range)))
    kl        = mean(mean_dims((mean_theta - mean_ref)^2) / (2 std_dev_t^2))        (no sqrt(dt))
    loss      = policy + beta kl                             (averaged over the trained steps' rows)

trained steps ``range(int(num_steps * 0.99))``, advantages ``(r - mean_prompt) / (np.std(all r) + 1e-4)``.

``tempflow-grpo`` = TempFlow-GRPO (train_sd3_pr.py, sd3_sde_with_logprob_perstep.py): the same
Euler-SDE step, whose returned std is the transition's own ``std_dev_t sqrt(-dt)``, so::

    policy    = mean(2.25 std_dev_t sqrt(-dt) max(-A ratio, -A clamp(ratio, 1 - clip_range, 1 + clip_range)))
    kl        = mean(mean_dims((mean_theta - mean_ref)^2) / (2 (std_dev_t sqrt(-dt))^2))   (the true KL)

over the one-step SDE branches of every step but the last; ``tempflow-grpo-rsm`` is the same with
flow_grpo's KL weight (``x dt``).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rsm_fast.advantages import set_advantages
from rsm_fast.config import build_config
from rsm_fast.trainer import Rows, Trainer

F64 = torch.float64


def _flow_grpo_step(v, x, sigma, sigma_next, sigma_max, noise_level):
    """sde_step_with_logprob's mean and std_dev_t for per-row sigmas (float64, [B, ...] latents)."""
    view = lambda a: a.view(-1, *([1] * (x.dim() - 1)))  # noqa: E731
    sg, sp = view(sigma), view(sigma_next)
    dt = sp - sg
    std = torch.sqrt(sg / (1 - torch.where(sg == 1, torch.full_like(sg, sigma_max), sg))) * noise_level
    mean = x * (1 + std**2 / (2 * sg) * dt) + v * (1 + std**2 * (1 - sg) / (2 * sg)) * dt
    return mean, std, dt


def _flow_grpo_loss(v, v_old, v_ref, x, z, adv, sigma, sigma_next, sigma_max, noise_level, clip_range, adv_clip_max,
                    beta):
    mean_old, std, dt = _flow_grpo_step(v_old, x, sigma, sigma_next, sigma_max, noise_level)
    prev = mean_old + std * torch.sqrt(-1 * dt) * z
    dims = tuple(range(1, x.dim()))

    def log_prob(mean):
        lp = (-((prev.detach() - mean) ** 2) / (2 * ((std * torch.sqrt(-1 * dt)) ** 2))
              - torch.log(std * torch.sqrt(-1 * dt)) - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi, dtype=F64))))
        return lp.mean(dim=dims)

    mean, _, _ = _flow_grpo_step(v, x, sigma, sigma_next, sigma_max, noise_level)
    mean_ref, _, _ = _flow_grpo_step(v_ref, x, sigma, sigma_next, sigma_max, noise_level)
    a = torch.clamp(adv, -adv_clip_max, adv_clip_max)
    ratio = torch.exp(log_prob(mean) - log_prob(mean_old))
    policy = torch.mean(torch.maximum(-a * ratio, -a * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)))
    kl = torch.mean(((mean - mean_ref) ** 2).mean(dim=dims, keepdim=True) / (2 * std**2))
    return policy + beta * kl


def _tempflow_loss(v, v_old, v_ref, x, z, adv, sigma, sigma_next, sigma_max, noise_level, clip_range, beta,
                   kl_dt):
    mean_old, std, dt = _flow_grpo_step(v_old, x, sigma, sigma_next, sigma_max, noise_level)
    std_t = std * torch.sqrt(-1 * dt)                    # what the per-step sampler returns
    prev = mean_old + std_t * z
    dims = tuple(range(1, x.dim()))

    def log_prob(mean):
        lp = (-((prev.detach() - mean) ** 2) / (2 * std_t**2) - torch.log(std_t)
              - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi, dtype=F64))))
        return lp.mean(dim=dims)

    mean, _, _ = _flow_grpo_step(v, x, sigma, sigma_next, sigma_max, noise_level)
    mean_ref, _, _ = _flow_grpo_step(v_ref, x, sigma, sigma_next, sigma_max, noise_level)
    ratio = torch.exp(log_prob(mean) - log_prob(mean_old))
    w = 2.25 * std_t.flatten()
    policy = torch.mean(w * torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)))
    kl = ((mean - mean_ref) ** 2).mean(dim=dims) / (2 * std_t.flatten() ** 2)
    if kl_dt:                                            # RSM's port: flow_grpo's weight, x |dt|
        kl = kl * (-dt.flatten())
    return policy + beta * torch.mean(kl)


def _stat_tracker_global_std(prompts, rewards):
    """PerPromptStatTracker(global_std=True).update(...) for type 'grpo', one epoch."""
    prompts, rewards = np.array(prompts), np.array(rewards, dtype=np.float64)
    adv = np.empty_like(rewards)
    std = np.std(rewards, axis=0, keepdims=True) + 1e-4
    for p in np.unique(prompts):
        pr = rewards[prompts == p]
        adv[prompts == p] = (pr - np.mean(pr, axis=0, keepdims=True)) / std
    return adv


def _random_rows(tr, seed):
    """Random float64 rows at the trainer's trained steps and a policy output ``v`` off-policy by
    10^-3 .. 1 per row, so the ratio lands on both sides of the clip. The trainer clips advantages
    when it forms them (set_advantages(clip=method.adv_clip)); the releases clamp them in the loss:
    the same numbers reach the surrogate."""
    g = torch.Generator().manual_seed(seed)
    idx = tr.plan.record_step.clone()
    M, shape = idx.numel(), tuple(tr.task.latent_shape)
    r = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    x, z, v_old, v_ref = r(M, *shape), r(M, *shape), r(M, *shape), r(M, *shape)
    clip = tr.cfg.method.adv_clip
    rows = Rows(idx=idx, t=tr._t_table.index_select(0, idx).double(), x=x, z=z, f_old=v_old, f_ref=v_ref,
                adv=(3 * r(M)).clamp(-clip, clip))
    size = torch.logspace(-3, 0, M, dtype=F64)[torch.randperm(M, generator=g)]
    v = (v_old + size.view(-1, *([1] * len(shape))) * r(M, *shape)).requires_grad_(True)
    return rows, v


@pytest.fixture(scope="module")
def grpo_flow():
    return Trainer(build_config("grpo", None, ["task.name=digits-flow", "task.condition=none",
                                               "train.loss_impl=reference", "train.threads=1"]))


def test_grpo_on_flow_tasks_trains_flow_grpos_steps(grpo_flow):
    tr = grpo_flow
    N = tr.cfg.task.num_steps
    assert tr.task.transition.name.startswith("flow_grpo_sde") and tr.cfg.task.noise_level == 0.7
    assert sorted(set(tr.plan.record_step.tolist())) == list(range(int(N * 0.99))) == list(range(9))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grpo_on_flow_tasks_is_flow_grpo_geneval_loss(grpo_flow, seed):
    """The trainer's loss and its gradient on random float64 rows at the trained steps, off-policy
    on both sides of the clip, against the transcription of train_sd3.py's loss lines."""
    tr, mc = grpo_flow, grpo_flow.cfg.method
    rows, v = _random_rows(tr, seed)
    idx, T = rows.idx, tr.task.transition
    c = T.coeffs(idx, torch.ones_like(idx, dtype=torch.bool), dtype=F64)
    ours, out = tr._loss(rows, c, v, None)
    assert out.clipped.any() and not out.clipped.all()
    (g_ours,) = torch.autograd.grad(ours, v)

    sig_tab, nxt_tab = T.table("t").to(F64), T.table("t_next").to(F64)
    v2 = v.detach().clone().requires_grad_(True)
    theirs = _flow_grpo_loss(v2, rows.f_old, rows.f_ref, rows.x, rows.z, rows.adv, sig_tab[idx], nxt_tab[idx],
                             float(sig_tab[1]), tr.cfg.task.noise_level, mc.clip_eps, mc.adv_clip, mc.kl_coef)
    (g_theirs,) = torch.autograd.grad(theirs, v2)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-9, atol=1e-14)


def test_grpo_on_flow_tasks_uses_flow_grpos_global_std(grpo_flow):
    mc = grpo_flow.cfg.method
    assert mc.adv_norm == "global" and mc.baseline == "mean"
    g = torch.Generator().manual_seed(4)
    G, n = 4, mc.group_size
    rewards = torch.randn(G * n, generator=g, dtype=F64) * torch.arange(1, G + 1, dtype=F64).repeat_interleave(n)
    sid = torch.arange(G).repeat_interleave(n)
    ours = set_advantages(rewards, sid, [n] * G, baseline=mc.baseline, normalize=mc.adv_norm, clip=mc.adv_clip)
    theirs = _stat_tracker_global_std([f"p{i}" for i in sid.tolist()], rewards.numpy())
    theirs = np.clip(theirs, -5.0, 5.0)           # the loss's clamp to train.adv_clip_max (base.py: 5)
    assert mc.adv_clip == 5.0 and np.abs(theirs).max() > 1.0
    np.testing.assert_allclose(ours.numpy(), theirs, rtol=1e-12, atol=1e-12)


def test_grpo_keeps_ddpo_like_settings_on_vp_tasks():
    for sets in ([], ["task.name=digits-ddim"]):
        mc = build_config("grpo", None, sets).method
        assert (mc.kl_dt_weight, mc.adv_norm) == (False, "group")


@pytest.fixture(scope="module", params=["tempflow-grpo", "tempflow-grpo-rsm"])
def tempflow_flow(request):
    return request.param, Trainer(build_config(request.param, None, [
        "task.name=digits-flow", "task.condition=none", "train.loss_impl=reference", "train.threads=1"]))


def test_tempflow_trains_the_branches_of_every_step_but_the_last(tempflow_flow):
    _, tr = tempflow_flow
    N = tr.cfg.task.num_steps
    assert tr.task.transition.name.startswith("flow_grpo_sde") and N == 10
    steps = tr.plan.record_step
    assert sorted(set(steps.tolist())) == list(range(N - 1))
    assert torch.bincount(steps).tolist() == [6 * tr.cfg.train.batch_size] * (N - 1)


@pytest.mark.parametrize("seed", [0, 1])
def test_tempflow_presets_are_tempflow_grpos_loss(tempflow_flow, seed):
    """tempflow-grpo's loss and gradient = TempFlow-GRPO's lines with the true KL; tempflow-grpo-rsm's
    = the same with the KL x dt. Off-policy rows on both sides of the clip, float64."""
    name, tr = tempflow_flow
    mc = tr.cfg.method
    assert mc.kl_dt_weight == (name == "tempflow-grpo-rsm") and mc.kl_coef > 0
    rows, v = _random_rows(tr, seed)
    T = tr.task.transition
    c = T.coeffs(rows.idx, torch.ones_like(rows.idx, dtype=torch.bool), dtype=F64)
    ours, out = tr._loss(rows, c, v, None)
    assert out.clipped.any() and not out.clipped.all()
    (g_ours,) = torch.autograd.grad(ours, v)
    sig, nxt = T.table("t").to(F64), T.table("t_next").to(F64)
    v2 = v.detach().clone().requires_grad_(True)
    theirs = _tempflow_loss(v2, rows.f_old, rows.f_ref, rows.x, rows.z, rows.adv, sig[rows.idx], nxt[rows.idx],
                            float(sig[1]), tr.cfg.task.noise_level, mc.clip_eps, mc.kl_coef, mc.kl_dt_weight)
    (g_theirs,) = torch.autograd.grad(theirs, v2)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-9, atol=1e-14)
    # the two KL weights differ by dt (0.07-0.13 on this schedule): a transcription that ignored
    # the flag would fail one of the two presets
    other = _tempflow_loss(v.detach(), rows.f_old, rows.f_ref, rows.x, rows.z, rows.adv, sig[rows.idx], nxt[rows.idx],
                           float(sig[1]), tr.cfg.task.noise_level, mc.clip_eps, mc.kl_coef, not mc.kl_dt_weight)
    assert abs(float(other) - float(ours.detach())) > 1e-3 * abs(float(ours.detach()))


def test_tempflow_grpo_rsm_differs_from_tempflow_grpo_only_in_the_kl_weight():
    from dataclasses import asdict
    for task in ("toy2d", "digits-flow", "diffusers"):
        a = asdict(build_config("tempflow-grpo", None, [f"task.name={task}"]))
        b = asdict(build_config("tempflow-grpo-rsm", None, [f"task.name={task}"]))
        diff = {(s, k) for s in a if isinstance(a[s], dict) for k in a[s] if a[s][k] != b[s][k]}
        diff |= {s for s in a if not isinstance(a[s], dict) and a[s] != b[s]}
        assert ("method", "kl_dt_weight") in diff
        assert diff <= {("method", "kl_dt_weight"), "preset", "description"}, (task, diff)
