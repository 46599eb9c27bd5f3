"""Forward-process losses (DiffusionNFT, AWM) against independent transcriptions of the released loss lines.

The ``_release_*`` helpers below follow the released code's order of operations from the formulas
(NVlabs/DiffusionNFT @ 24af5554 scripts/train_nft_sd3.py; scxue/advantage_weighted_matching @ be513723
advantage_weighted_matching/scripts/train_sd3_awm.py); they do not call the module under test.
"""
from __future__ import annotations

import math
import zlib

import pytest
import torch

from rsm_fast.losses.forward_process import (
    awm_ema_decay,
    awm_log_likelihood,
    awm_loss,
    ema_update_,
    nft_loss,
    nft_old_decay,
)

F64 = torch.float64
TOL = dict(rtol=1e-12, atol=1e-12)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _batch(seed: int, shape, adv_scale: float = 4.0):
    """Fresh float64 rows: x0, eps, t in (0.02, 0.98), x_t on the forward process, model outputs near v*."""
    g = _gen(seed)
    x0 = torch.randn(shape, generator=g, dtype=F64)
    eps = torch.randn(shape, generator=g, dtype=F64)
    t = 0.02 + 0.96 * torch.rand(shape[0], generator=g, dtype=F64)
    te = t.view(-1, *([1] * (len(shape) - 1)))
    x_t = (1 - te) * x0 + te * eps
    v_star = eps - x0
    v_old = v_star + 0.3 * torch.randn(shape, generator=g, dtype=F64)
    v_theta = v_old + 0.05 * torch.randn(shape, generator=g, dtype=F64)
    v_ref = v_old + 0.1 * torch.randn(shape, generator=g, dtype=F64)
    v_ema = v_theta + 0.02 * torch.randn(shape, generator=g, dtype=F64)
    adv = adv_scale * torch.randn(shape[0], generator=g, dtype=F64)
    adv[0] = 7.5        # clipped above
    if shape[0] > 1:
        adv[1] = -6.0   # clipped below
    return dict(x0=x0, eps=eps, t=t, x_t=x_t, v_star=v_star, v_old=v_old, v_theta=v_theta, v_ref=v_ref,
                v_ema=v_ema, adv=adv)


# ----------------------------------------------------------------------------------------------
# Release transcriptions
# ----------------------------------------------------------------------------------------------
def _release_nft(forward_prediction, old_prediction, ref_forward_prediction, xt, x0, t, adv, beta, adv_clip_max,
                 train_beta, adv_mode="all"):
    t_expanded = t.view(-1, *([1] * (len(x0.shape) - 1)))
    advantages_clip = torch.clamp(adv, -adv_clip_max, adv_clip_max)
    if adv_mode == "positive_only":
        advantages_clip = torch.clamp(advantages_clip, 0, adv_clip_max)
    elif adv_mode == "negative_only":
        advantages_clip = torch.clamp(advantages_clip, -adv_clip_max, 0)
    elif adv_mode == "one_only":
        advantages_clip = torch.where(advantages_clip > 0, torch.ones_like(advantages_clip),
                                      torch.zeros_like(advantages_clip))
    elif adv_mode == "binary":
        advantages_clip = torch.sign(advantages_clip)
    normalized_advantages_clip = (advantages_clip / adv_clip_max) / 2.0 + 0.5
    r = torch.clamp(normalized_advantages_clip, 0, 1)
    positive_prediction = beta * forward_prediction + (1 - beta) * old_prediction.detach()
    implicit_negative_prediction = (1.0 + beta) * old_prediction.detach() - beta * forward_prediction
    x0_prediction = xt - t_expanded * positive_prediction
    with torch.no_grad():
        weight_factor = (torch.abs(x0_prediction.double() - x0.double())
                         .mean(dim=tuple(range(1, x0.ndim)), keepdim=True).clip(min=0.00001))
    positive_loss = ((x0_prediction - x0) ** 2 / weight_factor).mean(dim=tuple(range(1, x0.ndim)))
    negative_x0_prediction = xt - t_expanded * implicit_negative_prediction
    with torch.no_grad():
        negative_weight_factor = (torch.abs(negative_x0_prediction.double() - x0.double())
                                  .mean(dim=tuple(range(1, x0.ndim)), keepdim=True).clip(min=0.00001))
    negative_loss = ((negative_x0_prediction - x0) ** 2 / negative_weight_factor).mean(dim=tuple(range(1, x0.ndim)))
    ori_policy_loss = r * positive_loss / beta + (1.0 - r) * negative_loss / beta
    policy_loss = (ori_policy_loss * adv_clip_max).mean()
    loss = policy_loss
    kl_div_loss = ((forward_prediction - ref_forward_prediction) ** 2).mean(dim=tuple(range(1, x0.ndim)))
    loss = loss + train_beta * torch.mean(kl_div_loss)
    return loss


def _release_log_prob(noise_pred, random_noise, clean_latents, timestep, weighting, ghuber_power):
    model_output = noise_pred.double()
    log_prob = -(model_output - (random_noise.double() - clean_latents.double())) ** 2
    log_prob = log_prob.mean(dim=tuple(range(1, log_prob.ndim)))
    if weighting == "t":
        log_prob = log_prob * timestep.view(-1)
    elif weighting == "t**2":
        log_prob = log_prob * timestep.view(-1) ** 2
    elif weighting == "uniform":
        log_prob = log_prob
    elif weighting == "huber":
        log_prob = -(torch.sqrt(-log_prob + 1e-10) - 1e-5) * timestep.view(-1)
    elif weighting == "ghuber":
        log_prob = -(torch.pow(-log_prob + 1e-10, ghuber_power)
                     - torch.pow(torch.tensor(1e-10, dtype=log_prob.dtype), ghuber_power)) \
            * timestep.view(-1) / ghuber_power
    std_dev_t = torch.sqrt(timestep / (1 - torch.clamp(timestep, 0, 0.99))) * 0.7
    return log_prob, model_output, std_dev_t


def _release_awm(v_theta, old_log_probs, v_ref, v_ema, noise, clean, t, adv, *, n_t, weighting, p, clip_range,
                 adv_clip_max, advantage_max, beta, ema_beta, kl_weight, kl_ema_weight):
    """Rows ordered [T * B] as in the release (timestep-major); advantages given per sample [B]."""
    timesteps = t.view(-1, 1, 1, 1)
    log_prob, model_output, std_dev_t = _release_log_prob(v_theta, noise, clean, timesteps, weighting, p)
    _, model_output_ref, _ = _release_log_prob(v_ref, noise, clean, timesteps, weighting, p)
    _, model_output_ema, _ = _release_log_prob(v_ema, noise, clean, timesteps, weighting, p)
    bsz = v_theta.shape[0] // n_t
    if old_log_probs is None:
        old_log_probs = log_prob.reshape(n_t, bsz).detach()
    log_probs = log_prob.reshape(n_t, bsz)
    model_output = model_output.reshape(n_t, bsz, *model_output.shape[1:])
    model_output_ref = model_output_ref.reshape(n_t, bsz, *model_output_ref.shape[1:])
    model_output_ema = model_output_ema.reshape(n_t, bsz, *model_output_ema.shape[1:])
    std_dev_t = std_dev_t.reshape(n_t, bsz, *std_dev_t.shape[1:])
    advantages = torch.clamp(adv, -adv_clip_max, adv_clip_max)
    if advantage_max is not None:
        advantages = advantages / adv_clip_max * advantage_max
    ratio = torch.exp(log_probs.view(-1) - old_log_probs.reshape(-1).detach())
    advantages = advantages.unsqueeze(0).repeat(n_t, 1).view(-1)
    unclipped_loss = -advantages * ratio
    clipped_loss = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    policy_loss = torch.mean(torch.maximum(unclipped_loss, clipped_loss))
    if kl_weight == "elbo":
        kl_loss = ((model_output - model_output_ref) ** 2).mean(dim=(2, 3, 4), keepdim=True) / (2 * std_dev_t ** 2)
    else:
        kl_loss = ((model_output - model_output_ref) ** 2).mean(dim=(2, 3, 4), keepdim=True)
    kl_loss = kl_loss.mean(dim=0).mean()
    if kl_ema_weight == "elbo":
        ema_kl_loss = ((model_output - model_output_ema) ** 2).mean(dim=(2, 3, 4), keepdim=True) / (2 * std_dev_t ** 2)
    else:
        ema_kl_loss = ((model_output - model_output_ema) ** 2).mean(dim=(2, 3, 4), keepdim=True)
    ema_kl_loss = ema_kl_loss.mean(dim=0).mean()
    return policy_loss + beta * kl_loss + ema_beta * ema_kl_loss


def _release_return_decay(step, decay_type):
    if decay_type == 0:
        flat, uprate, uphold = 0, 0.0, 0.0
    elif decay_type == 1:
        flat, uprate, uphold = 0, 0.001, 0.5
    elif decay_type == 2:
        flat, uprate, uphold = 75, 0.0075, 0.999
    if step < flat:
        return 0.0
    return min((step - flat) * uprate, uphold)


def _grad(fn, v):
    v = v.clone().requires_grad_(True)
    out = fn(v)
    (g,) = torch.autograd.grad(out, v)
    return out.detach(), g


# ----------------------------------------------------------------------------------------------
# DiffusionNFT
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(4, 3, 5), (6, 2, 4, 4), (3, 7)])
@pytest.mark.parametrize("beta", [1.0, 0.1, 0.37])
@pytest.mark.parametrize("adv_mode", ["all", "positive_only", "binary"])
def test_nft_matches_release(shape, beta, adv_mode):
    seed = zlib.crc32(repr((shape, beta, adv_mode)).encode()) % 10_000
    b = _batch(seed, shape)
    ours = lambda v: nft_loss(v, b["v_old"], b["v_ref"], b["x_t"], b["x0"], b["t"], b["adv"], beta=beta,
                              kl_beta=1e-4, adv_mode=adv_mode)[0]
    rel = lambda v: _release_nft(v, b["v_old"], b["v_ref"], b["x_t"], b["x0"], b["t"], b["adv"], beta, 5.0, 1e-4,
                                 adv_mode)
    l1, g1 = _grad(ours, b["v_theta"])
    l2, g2 = _grad(rel, b["v_theta"])
    assert l1.dtype == F64
    torch.testing.assert_close(l1, l2, **TOL)
    torch.testing.assert_close(g1, g2, **TOL)


def test_nft_weight_floor_applies_after_mean():
    b = _batch(11, (3, 4, 4))
    te = b["t"].view(-1, 1, 1)
    # make row 0's positive x0 prediction exact: x_t - t v+ == x0 at beta = 1 means v_theta == v*
    v = b["v_theta"].clone()
    v[0] = b["v_star"][0]
    _, st = nft_loss(v, b["v_old"], None, b["x_t"], b["x0"], b["t"], b["adv"], beta=1.0, kl_beta=0.0)
    assert st["w_pos"][0] == 1e-5
    expect = (b["x_t"][1:] - te[1:] * v[1:] - b["x0"][1:]).abs().flatten(1).mean(1)
    torch.testing.assert_close(st["w_pos"][1:], expect, **TOL)


def test_nft_r_one_is_positive_term_only():
    b = _batch(3, (5, 3, 4))
    adv = torch.full((5,), 5.0, dtype=F64)
    adv[2] = 40.0                                         # clipped, still r = 1
    beta = 0.25

    def pos_only(v):
        vp = beta * v + (1 - beta) * b["v_old"]
        err = b["x_t"] - b["t"].view(-1, 1, 1) * vp - b["x0"]
        w = err.detach().abs().flatten(1).mean(1).clamp(min=1e-5).view(-1, 1, 1)
        return ((err**2 / w).flatten(1).mean(1) / beta * 5.0).mean()

    ours = lambda v: nft_loss(v, b["v_old"], None, b["x_t"], b["x0"], b["t"], adv, beta=beta, kl_beta=0.0)[0]
    l1, g1 = _grad(ours, b["v_theta"])
    l2, g2 = _grad(pos_only, b["v_theta"])
    torch.testing.assert_close(l1, l2, **TOL)
    torch.testing.assert_close(g1, g2, **TOL)
    _, st = nft_loss(b["v_theta"], b["v_old"], None, b["x_t"], b["x0"], b["t"], adv, beta=beta, kl_beta=0.0)
    assert torch.all(st["r"] == 1)


def _reward_centred_fm_grad(b, v_at, adv, clip=5.0):
    """Gradient of mean_rows(A_c t^2 / w mean((v - v*)^2)) at v = v_at, w = mean|x0_hat(v_at) - x0|:
    advantage-weighted (reward-centred) flow matching around ``v_at``."""
    shape = v_at.shape
    d = math.prod(shape[1:])
    te = b["t"].view(-1, *([1] * (len(shape) - 1)))
    a = adv.clamp(-clip, clip).view_as(te)
    w = (b["x_t"] - te * v_at - b["x0"]).abs().flatten(1).mean(1).clamp(min=1e-5).view_as(te)
    return a * (2.0 / d) * te**2 / w * (v_at - b["v_star"]) / shape[0]


@pytest.mark.parametrize("beta", [1.0, 0.1, 1e-3])
def test_nft_grad_at_old_is_reward_centred_fm(beta):
    b = _batch(21, (6, 3, 4))
    v = b["v_old"]
    fn = lambda u: nft_loss(u, b["v_old"], None, b["x_t"], b["x0"], b["t"], b["adv"], beta=beta, kl_beta=0.0)[0]
    _, g = _grad(fn, v)
    torch.testing.assert_close(g, _reward_centred_fm_grad(b, v, b["adv"]), rtol=1e-10, atol=1e-13)


def test_nft_small_beta_approaches_reward_centred_fm():
    b = _batch(22, (6, 3, 4))
    target = _reward_centred_fm_grad(b, b["v_old"], b["adv"])
    errs = []
    for beta in (1e-1, 1e-2, 1e-3, 1e-4):
        fn = lambda u: nft_loss(u, b["v_old"], None, b["x_t"], b["x0"], b["t"], b["adv"], beta=beta, kl_beta=0.0)[0]
        _, g = _grad(fn, b["v_theta"])
        errs.append(((g - target).norm() / target.norm()).item())
    assert errs[-1] < 1e-3
    for e_big, e_small in zip(errs, errs[1:]):   # O(beta): ~10x smaller per decade
        assert e_small < 0.2 * e_big


def test_nft_low_precision_inputs_compute_in_float32():
    b = _batch(5, (2, 3, 4))
    args = [b[k].to(torch.bfloat16) for k in ("v_theta", "v_old", "v_ref", "x_t", "x0")]
    loss, st = nft_loss(*args, b["t"].float(), b["adv"].float(), beta=1.0)
    assert loss.dtype == torch.float32 and st["policy"].dtype == torch.float32


# ----------------------------------------------------------------------------------------------
# AWM
# ----------------------------------------------------------------------------------------------
AWM_CASES = [
    dict(weighting="ghuber", p=0.25, clip_range=1.0, advantage_max=1.0, kl_weight="uniform", kl_ema_weight="uniform"),
    dict(weighting="ghuber", p=0.5, clip_range=0.2, advantage_max=None, kl_weight="elbo", kl_ema_weight="uniform"),
    dict(weighting="huber", p=0.25, clip_range=0.1, advantage_max=2.0, kl_weight="uniform", kl_ema_weight="elbo"),
    dict(weighting="uniform", p=0.25, clip_range=0.3, advantage_max=1.0, kl_weight="elbo", kl_ema_weight="elbo"),
    dict(weighting="t", p=0.25, clip_range=0.3, advantage_max=1.0, kl_weight="uniform", kl_ema_weight="uniform"),
    dict(weighting="t**2", p=0.25, clip_range=0.05, advantage_max=1.0, kl_weight="uniform", kl_ema_weight="uniform"),
]


@pytest.mark.parametrize("case", AWM_CASES, ids=lambda c: f"{c['weighting']}-c{c['clip_range']}")
@pytest.mark.parametrize("n_t,bsz", [(2, 3), (1, 4), (3, 2)])
@pytest.mark.parametrize("first_pass", [True, False])
def test_awm_matches_release(case, n_t, bsz, first_pass):
    seed = zlib.crc32(repr((case, n_t, bsz, first_pass)).encode()) % 10_000
    b = _batch(seed, (n_t * bsz, 4, 3, 3))
    g = _gen(seed + 1)
    adv_sample = 4.0 * torch.randn(bsz, generator=g, dtype=F64)
    adv_sample[0] = 9.0
    adv_rows = adv_sample.repeat(n_t)                        # row k = (timestep k // B, sample k % B)
    old = None
    if not first_pass:   # an older policy's outputs: ratios spread around 1, some outside the clip range
        v_older = b["v_theta"] + 0.3 * torch.randn(b["v_theta"].shape, generator=g, dtype=F64)
        old = _release_log_prob(v_older, b["eps"], b["x0"], b["t"].view(-1, 1, 1, 1), case["weighting"],
                                case["p"])[0].detach()
    kw = dict(case)
    ours = lambda v: awm_loss(v, b["eps"], b["x0"], b["t"], adv_rows, logp_old=old, v_ref=b["v_ref"],
                              v_ema=b["v_ema"], kl_beta=1e-3, ema_beta=1.0, **kw)[0]
    rel = lambda v: _release_awm(v, None if old is None else old.reshape(n_t, bsz), b["v_ref"], b["v_ema"],
                                 b["eps"], b["x0"], b["t"], adv_sample, n_t=n_t, adv_clip_max=5.0, beta=1e-3,
                                 ema_beta=1.0, **kw)
    l1, g1 = _grad(ours, b["v_theta"])
    l2, g2 = _grad(rel, b["v_theta"])
    torch.testing.assert_close(l1, l2, **TOL)
    torch.testing.assert_close(g1, g2, **TOL)


def test_awm_log_likelihood_ghuber_formula():
    b = _batch(31, (4, 2, 3))
    mse = ((b["v_theta"] - b["v_star"]) ** 2).flatten(1).mean(1)
    expect = -((mse + 1e-10) ** 0.25 - 1e-10**0.25) * b["t"] / 0.25
    got = awm_log_likelihood(b["v_theta"], b["eps"], b["x0"], b["t"], weighting="ghuber", p=0.25)
    torch.testing.assert_close(got, expect, **TOL)


@pytest.mark.parametrize("weighting", ["ghuber", "huber", "t"])
def test_awm_first_pass_ratio_one_gradient(weighting):
    b = _batch(41, (6, 3, 4))
    fn = lambda v: awm_loss(v, b["eps"], b["x0"], b["t"], b["adv"], weighting=weighting, kl_beta=0.0,
                            ema_beta=0.0)[0]
    _, st = awm_loss(b["v_theta"], b["eps"], b["x0"], b["t"], b["adv"], weighting=weighting, kl_beta=0.0,
                     ema_beta=0.0)
    assert torch.all(st["ratio"] == 1.0) and not st["clipped"].any()
    _, g = _grad(fn, b["v_theta"])
    a = b["adv"].clamp(-5, 5) / 5.0
    pg = lambda v: (-a * awm_log_likelihood(v, b["eps"], b["x0"], b["t"], weighting=weighting)).mean()
    _, g_pg = _grad(pg, b["v_theta"])
    torch.testing.assert_close(g, g_pg, **TOL)
    # passing the detached first-pass likelihood explicitly is the same thing
    old = awm_log_likelihood(b["v_theta"], b["eps"], b["x0"], b["t"], weighting=weighting)
    fn2 = lambda v: awm_loss(v, b["eps"], b["x0"], b["t"], b["adv"], logp_old=old, weighting=weighting,
                             kl_beta=0.0, ema_beta=0.0)[0]
    torch.testing.assert_close(_grad(fn2, b["v_theta"])[1], g, **TOL)


def test_awm_clipping_zeroes_clipped_rows():
    b = _batch(51, (6, 3, 4))
    c = 0.2
    logp = awm_log_likelihood(b["v_theta"], b["eps"], b["x0"], b["t"])
    log_r = torch.tensor([0.4, -0.5, -0.5, 0.4, 0.05, -0.05], dtype=F64)    # ratios 1.49, 0.61, ..., ~1
    adv = torch.tensor([2.0, -2.0, 2.0, -2.0, 1.0, -1.0], dtype=F64)
    expect_clipped = torch.tensor([True, True, False, False, False, False])
    old = logp - log_r
    fn = lambda v: awm_loss(v, b["eps"], b["x0"], b["t"], adv, logp_old=old, clip_range=c, kl_beta=0.0,
                            ema_beta=0.0)[0]
    _, st = awm_loss(b["v_theta"], b["eps"], b["x0"], b["t"], adv, logp_old=old, clip_range=c, kl_beta=0.0,
                     ema_beta=0.0)
    assert torch.equal(st["clipped"], expect_clipped)
    _, g = _grad(fn, b["v_theta"])
    row_norm = g.flatten(1).norm(dim=1)
    assert torch.all(row_norm[expect_clipped] == 0)
    assert torch.all(row_norm[~expect_clipped] > 0)


# ----------------------------------------------------------------------------------------------
# Decay schedules, EMA
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("decay_type", [0, 1, 2])
def test_nft_old_decay_matches_release(decay_type):
    for step in (0, 1, 2, 50, 74, 75, 76, 100, 208, 209, 499, 500, 501, 10_000):
        assert nft_old_decay(step, decay_type) == _release_return_decay(step, decay_type)


def test_nft_old_decay_values():
    assert nft_old_decay(0, 1) == 0.0
    assert nft_old_decay(100, 1) == pytest.approx(0.1)
    assert nft_old_decay(600, 1) == 0.5
    assert nft_old_decay(74, 2) == 0.0 and nft_old_decay(75, 2) == 0.0
    assert nft_old_decay(175, 2) == pytest.approx(0.75)
    assert nft_old_decay(300, 2) == 0.999
    assert nft_old_decay(1000, 0) == 0.0


def test_awm_ema_decay_values():
    assert awm_ema_decay(0) == 0.0
    assert awm_ema_decay(150) == pytest.approx(0.15)
    assert awm_ema_decay(300) == pytest.approx(0.3)
    assert awm_ema_decay(5000) == 0.3
    assert awm_ema_decay(10, "constant") == 0.3
    for step in (0, 7, 299, 301, 1234):
        assert awm_ema_decay(step) == min(0.3, 0.001 * step)


def test_ema_update_in_place():
    g = _gen(61)
    tgt = [torch.randn(3, 4, generator=g, dtype=F64), torch.randn(5, generator=g, dtype=F64)]
    src = [torch.randn(3, 4, generator=g, dtype=F64), torch.randn(5, generator=g, dtype=F64)]
    before = [x.clone() for x in tgt]
    ids = [id(x) for x in tgt]
    ema_update_(tgt, src, 0.3)
    for x, x0, s, i in zip(tgt, before, src, ids):
        assert id(x) == i
        torch.testing.assert_close(x, 0.3 * x0 + 0.7 * s, **TOL)
    ema_update_(tgt, src, 0.0)
    for x, s in zip(tgt, src):
        assert torch.equal(x, s)


# ----------------------------------------------------------------------------------------------
# Bad arguments
# ----------------------------------------------------------------------------------------------
def _one_line_error(fn, match):
    with pytest.raises(ValueError, match=match) as ei:
        fn()
    assert "\n" not in str(ei.value)


def test_bad_arguments():
    b = _batch(71, (3, 2, 2))
    nft = lambda **kw: nft_loss(kw.pop("v_theta", b["v_theta"]), b["v_old"], kw.pop("v_ref", b["v_ref"]), b["x_t"],
                                b["x0"], kw.pop("t", b["t"]), kw.pop("adv", b["adv"]), **{"beta": 1.0, **kw})
    _one_line_error(lambda: nft(beta=0.0), "beta")
    _one_line_error(lambda: nft(beta=-1.0), "beta")
    _one_line_error(lambda: nft(adv_clip_max=0), "adv_clip_max")
    _one_line_error(lambda: nft(kl_beta=-1e-4), "kl_beta")
    _one_line_error(lambda: nft(adv_mode="nope"), "adv_mode")
    _one_line_error(lambda: nft(v_theta=b["v_theta"][:, :1]), "v_old")
    _one_line_error(lambda: nft(v_theta=b["v_theta"][:, 0, 0]), "v_theta")
    _one_line_error(lambda: nft(t=b["t"][:2]), "t")
    _one_line_error(lambda: nft(adv=b["adv"][:, None]), "adv")
    _one_line_error(lambda: nft(v_ref=None), "v_ref")
    awm = lambda **kw: awm_loss(kw.pop("v_theta", b["v_theta"]), b["eps"], b["x0"], b["t"], b["adv"],
                                **{"v_ref": b["v_ref"], "v_ema": b["v_ema"], **kw})
    _one_line_error(lambda: awm(weighting="l2"), "weighting")
    _one_line_error(lambda: awm(kl_weight="x"), "kl_weight")
    _one_line_error(lambda: awm(p=0.0), "p")
    _one_line_error(lambda: awm(clip_range=-0.1), "clip_range")
    _one_line_error(lambda: awm(logp_old=torch.zeros(2, dtype=F64)), "logp_old")
    _one_line_error(lambda: awm(v_ema=None), "v_ema")
    _one_line_error(lambda: awm(v_ref=b["v_ref"][:2]), "v_ref")
    _one_line_error(lambda: awm(v_theta=b["v_theta"][:, :1]), "eps")
    _one_line_error(lambda: nft_old_decay(3, 5), "decay_type")
    _one_line_error(lambda: awm_ema_decay(3, "cosine"), "decay_type")
    _one_line_error(lambda: ema_update_([torch.zeros(2)], [torch.zeros(3)], 0.5), "source_params")
