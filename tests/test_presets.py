"""Every method preset (issue 6, must-show): on random float64 inputs, the gradient of the loss the
trainer builds from the preset equals the canonical RSM gradient with that method's Table-1
coefficients (spec §3.3, §5.2, §5.3, §6); every preset runs on the 2-D task and raises its reward.

The oracle is written from the spec's table, not from the loss code. Per trained row, in score
space (``f = p_x x + p_s s``, mean over ``d`` latent dims, mean over the ``M`` rows)::

    dL/ds = W (b^2 / Sigma) [alpha (s - s_ref) - m_gamma A' (sigma/b) z + m_C2 A' (s - s_old)] / (d M)

with ``alpha`` the KL weight (x dt with the heuristic), ``W = Kbar/K_i`` the step weight, and per
method the guidance multiplier ``m_gamma`` (Table 1's gamma) and trust-region multiplier ``m_C2``
(its C2 in units of A/alpha). ``A'`` is the advantage, times the importance ratio for PPO's ratio
form (Table 1 states the ratio form at r = 1; off-policy PPO weighs each row by its ratio, which
the oracle computes from explicit Gaussian densities). Inputs are kept inside the clip region (the
clipped rows' zero policy gradient is covered in test_losses), and the test checks they are.
"""
from __future__ import annotations

import pytest
import torch

from rsm_fast.config import build_config, preset_names
from rsm_fast.trainer import Rows, Trainer

TOY = ["train.threads=1", "task.eval_samples=256", "policy.hidden=16"]

# Table 1 (spec §6) per reweight: (m_gamma, m_C2) from (sigma, dt, rho)
TABLE1 = {
    "base": lambda sg, dt, rho: (torch.ones_like(sg), torch.ones_like(sg)),             # PPO / GRPO / PCPO-base
    "tempflow": lambda sg, dt, rho: (2.25 * sg, 2.25 * sg),                            # TempFlow: gamma = 2.25 sigma
    "tempflow_outer": lambda sg, dt, rho: (2.25 * sg, 2.25 * sg),
    "guard": lambda sg, dt, rho: (sg / dt, torch.zeros_like(sg)),                       # GRPO-Guard: C2 = 0
    "fair_guard": lambda sg, dt, rho: (sg / dt, sg / dt),                               # fair_clip2 (spec §5.3)
    "fair": lambda sg, dt, rho: (torch.ones_like(sg), torch.ones_like(sg)),
    "pcpo": lambda sg, dt, rho: (rho, rho**2),                                         # PCPO-reweight, matching form
}
ZO = [p for p in preset_names() if build_config(p, None, TOY).method.estimator == "zo"]
FO = ["rsm-fo-terminal"]     # the pruned first-order originals (sqdf, residual-nabla-db, vgg-flow): test_presets_fo.py


def _rows(tr: Trainer, seed: int):
    g = torch.Generator().manual_seed(seed)
    M = tr.plan.num_records
    idx = tr.plan.record_step.clone()
    c = tr.task.transition.coeffs(idx, torch.ones_like(idx, dtype=torch.bool), dtype=torch.float64)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x, z, f_old, f_ref = r(M, 2), r(M, 2), r(M, 2), r(M, 2)
    rows = Rows(idx=idx, t=tr._t_table.index_select(0, idx).double(), x=x, z=z, f_old=f_old, f_ref=f_ref,
                adv=r(M).clamp(-3, 3))
    return rows, c, r


def _rho(tr: Trainer, c) -> torch.Tensor:
    """PCPO's omega'/omega, recomputed from the schedule (spec §5.3): const = mean omega over the
    noisy steps, dt = zeta dt with zeta = sum omega / sum dt over the trained noisy steps (all but
    the final transition), summed here step by step."""
    tab = tr.task.transition
    N = tab.num_steps
    if tr.cfg.method.pcpo_target == "const":
        steps = torch.arange(N)
        all_c = tab.coeffs(steps, torch.ones_like(steps, dtype=torch.bool), dtype=torch.float64)
        on = tab.sde_mask.to(torch.bool) & (all_c.omega > 0)
        target = all_c.omega[on].mean() * torch.ones_like(c.omega)
    else:
        num = den = 0.0
        for i in range(N - 1):
            ci = tab.coeffs(torch.tensor([i]), torch.tensor([True]), dtype=torch.float64)
            if bool(tab.sde_mask[i]) and float(ci.omega) > 0:
                num, den = num + float(ci.omega), den + float(ci.dt)
        target = c.dt * (num / den)
    return target / c.omega


def test_pcpo_flow_zeta_on_sd3_ten_steps():
    """zeta over SD3's 10-step shift-3 schedule: 3.970 from the 9 trained steps (the released
    constant is 4.3152; with the final transition the sum would give 5.705)."""
    from rsm_fast import schedules as S
    from rsm_fast import transitions as T

    tr = T.flow_grpo_sde(S.rf_sigmas(10, 3.0), noise_level=0.7)
    c = tr.coeffs(torch.arange(10), torch.ones(10, dtype=torch.bool), dtype=torch.float64)
    zeta = T.pcpo_target(tr, "dt") / c.dt
    assert torch.allclose(zeta, zeta[0].expand(10), rtol=1e-14, atol=0)
    assert abs(float(zeta[0]) - float(c.omega[:9].sum() / c.dt[:9].sum())) < 1e-12
    assert abs(float(zeta[0]) - 3.9702) < 1e-4


def _log_ratio_per_dim_mean(c, x, f, f_old, z):
    """mean_d [log N(x'; mu_theta, Sigma) - log N(x'; mu_old, Sigma)] with x' = mu_old + sigma z."""
    mu_t = c.c_x[:, None] * x + c.c_f[:, None] * f
    mu_o = c.c_x[:, None] * x + c.c_f[:, None] * f_old
    xp = mu_o + c.sigma[:, None] * z
    S = c.Sigma[:, None]
    return (-(xp - mu_t) ** 2 / (2 * S) + (xp - mu_o) ** 2 / (2 * S)).mean(1), ((mu_t - mu_o) ** 2 / (2 * S)).mean(1)


@pytest.mark.parametrize("preset", ZO)
@pytest.mark.parametrize("seed", [0, 1])
def test_zeroth_order_preset_gradient_is_table1(preset, seed):
    tr = Trainer(build_config(preset, None, TOY + ["train.loss_impl=reference"]))
    mc = tr.cfg.method
    rows, c, r = _rows(tr, seed)
    M, d = rows.x.shape
    # a small off-policy step: the trust-region term is active, nothing is clipped
    f = (rows.f_old + 1e-3 * mc.clip_eps * r(M, 2)).requires_grad_(True)
    loss, out = tr._loss(rows, c, f, None)
    assert not bool(out.clipped.any()), "inputs must stay inside the clip region"
    (grad_f,) = torch.autograd.grad(loss, f)
    grad_s = grad_f * c.p_s[:, None]                                 # f = p_x x + p_s s
    s = lambda v: (v - c.p_x[:, None] * rows.x) / c.p_s[:, None]     # noqa: E731
    alpha = mc.kl_coef * (c.dt if mc.kl_dt_weight else torch.ones_like(c.dt))
    m_gamma, m_c2 = TABLE1[mc.reweight](c.sigma, c.dt, _rho(tr, c) if mc.reweight == "pcpo" else None)
    A = rows.adv
    if mc.surrogate == "ratio":
        lr_, quad = _log_ratio_per_dim_mean(c, rows.x, f.detach(), rows.f_old, rows.z)
        L = c.sigma * (lr_ + quad) if mc.reweight == "guard" else lr_   # RatioNorm (spec §5.3)
        A = A * torch.exp(L)
    W = torch.ones(M, dtype=torch.float64) if tr._row_weight is None else tr._row_weight.double()
    b, sg = c.b, c.sigma
    want = (W * b**2 / c.Sigma)[:, None] * (
        alpha[:, None] * (s(f.detach()) - s(rows.f_ref)) - (m_gamma * A * sg / b)[:, None] * rows.z
        + (m_c2 * A)[:, None] * (s(f.detach()) - s(rows.f_old))) / (d * M)
    torch.testing.assert_close(grad_s, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("preset", FO)
def test_first_order_preset_gradient_is_table1(preset):
    """rsm-fo-terminal (spec §9.3 redesign, kappa = sigma, gamma = 1, K = 1/alpha):
    dL/ds = W (b^2/Sigma) [(s - s_ref) - K (Sigma/b) g] / (d M)."""
    tr = Trainer(build_config(preset, None, TOY + ["train.loss_impl=reference"]))
    assert tr.cfg.method.estimator == "fo_terminal" and tr.cfg.method.fo_gamma == "one"
    rows, c, r = _rows(tr, 3)
    rows.adv, rows.g = None, r(*rows.x.shape)
    M, d = rows.x.shape
    shift = tr._fo_guidance(rows, c)
    f = (rows.f_old + 0.1 * r(M, 2)).requires_grad_(True)
    loss, _ = tr._loss(rows, c, f, shift)
    (grad_f,) = torch.autograd.grad(loss, f)
    grad_s = grad_f * c.p_s[:, None]
    s = lambda v: (v - c.p_x[:, None] * rows.x) / c.p_s[:, None]     # noqa: E731
    K = tr.cfg.method.fo_reward_scale
    want = (c.b**2 / c.Sigma)[:, None] * ((s(f.detach()) - s(rows.f_ref)) - K * (c.Sigma / c.b)[:, None] * rows.g) / (d * M)
    torch.testing.assert_close(grad_s, want, rtol=1e-9, atol=1e-12)


def test_every_method_of_the_issue_has_a_preset():
    want = {"reinforce", "ddpo", "grpo", "pcpo", "pcpo-reweight", "pcpo-reweight-flow", "tempflow-grpo",
            "tempflow-grpo-k1", "branch-grpo", "mix-grpo", "grpo-guard", "rsm-uniform-realloc", "rsm-lowsnr",
            "rsm-sparse", "rsm-fo-terminal", "rsm-soft-zo", "rsm-evr", "rsm-evr-cost", "tempflow-evr",
            "tempflow-evr-cost", "tempflow-evr-k1", "tempflow-grpo-rsm"}
    assert want <= set(preset_names())


@pytest.mark.parametrize("preset", preset_names())
def test_preset_trains_the_toy(preset):
    """Short runs (8 epochs, small batches): the reward rises above the reference's 3.0 and the
    plan is the preset's (records only at its trained steps, step weights Kbar/K_i)."""
    sets = TOY + ["train.epochs=8", "task.eval_samples=1024", "policy.hidden=32"]
    cfg = build_config(preset, None, sets)
    if cfg.rollout.plan == "sde":
        sets += ["train.batch_size=128"]
    tr = Trainer(build_config(preset, None, sets))
    s = tr.run(progress=False)
    assert s["reward_mean"] > 3.2, s
    # (a MixGRPO window or the online allocator changes the plan between epochs)
    assert tr.nfe["rollout"] == tr.epochs_done * tr.plan.nfe()["total"] or cfg.rollout.window or cfg.rollout.allocator


def test_mix_grpo_window_slides_and_wraps():
    cfg = build_config("mix-grpo", None, TOY + ["train.batch_size=32", "rollout.window_every=1", "train.epochs=1"])
    tr = Trainer(cfg)
    seen = []
    for _ in range(13):
        tr.epoch()
        seen.append(tuple(sorted(set(tr.plan.record_step.tolist()))))
    # 25 steps, timestep_fraction 0.6 -> 15 trained steps, window 4 -> 12 positions, then back to 0
    assert seen[0] == (0, 1, 2, 3) and seen[1] == (1, 2, 3, 4) and seen[11] == (11, 12, 13, 14) and seen[12] == seen[0]
    assert tr.plan.nfe()["total"] == 32 * 25


def test_step_weights_equalise_steps():
    """Kbar/K_i: with K = (4, 2, 0, ...) the rows of step 1 weigh twice those of step 0."""
    tr = Trainer(build_config("grpo", None, TOY + ["rollout.plan=branch", "train.batch_size=8", "method.group_size=8",
                                                   "task.num_steps=5", "rollout.k=[4, 2, 0, 0, 0]"]))
    w = tr._row_weight
    steps = tr.plan.record_step
    assert torch.allclose(w[steps == 0], torch.tensor(0.75)) and torch.allclose(w[steps == 1], torch.tensor(1.5))
    tr2 = Trainer(build_config("grpo", None, TOY + ["rollout.plan=branch", "train.batch_size=8", "method.group_size=8",
                                                    "task.num_steps=5", "rollout.k=[4, 2, 0, 0, 0]",
                                                    "method.step_weight=records"]))
    assert tr2._row_weight is None


@pytest.mark.parametrize("sets, needle", [
    (["rollout.plan=branch", "rollout.profile=const:x"], "rollout.profile"),
    (["rollout.plan=branch", "rollout.profile=highsnr2"], "rollout.profile"),     # 50 steps, released is 10
    (["rollout.plan=branch", "rollout.profile=at:3,60:2"], "rollout.profile"),
    (["rollout.profile=const:2"], "rollout.profile"),                            # sde plan
    (["rollout.plan=branch", "rollout.profile=const:2", "rollout.k=[1, 1]"], "rollout.k"),
    (["rollout.window=60"], "rollout.window"),
])
def test_bad_profile_and_window_name_the_field(sets, needle):
    from rsm_fast.config import ConfigError

    with pytest.raises(ConfigError, match=needle.replace(".", "\\.")):
        build_config("grpo", None, TOY + sets)
