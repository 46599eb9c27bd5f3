"""The plain-torch decomposition of the fused ops (rsm_fast.ops.decomposed) against the float64
reference losses: every form x reweight, with and without the KL term, mean and sum reductions,
ODE rows, clipped and unclipped rows and both signs of A; backward against autograd."""
from __future__ import annotations

import itertools
import zlib

import pytest
import torch

from rsm_fast.losses import score_regression_loss
from rsm_fast.losses.reference import REWEIGHTS as REF_REWEIGHTS, SURROGATE_FORMS
from rsm_fast.ops import decomposed as D
from opcases import decomposed_args, make_zo_case, zo_reference

F64 = torch.float64


def test_mode_codes_follow_the_reference_names():
    assert D.FORMS == SURROGATE_FORMS
    assert D.REWEIGHTS == REF_REWEIGHTS


@pytest.mark.parametrize("family", ["ddim", "flow"])
@pytest.mark.parametrize("form,reweight", list(itertools.product(D.FORMS, D.REWEIGHTS)))
@pytest.mark.parametrize("with_kl,kl_dt,mean", [(True, False, True), (True, True, False), (False, False, True)])
def test_zo_fwd_bwd_match_reference(family, form, reweight, with_kl, kl_dt, mean):
    seed = zlib.crc32(repr((family, form, reweight, with_kl, kl_dt, mean)).encode())
    c = make_zo_case(family, seed)
    eps = 0.02 if form == "ratio" else 1e-3
    ref, (gl, gp, gk), want = zo_reference(c, form, reweight, eps, with_kl, kl_dt, mean, seed)
    args = decomposed_args(c, with_kl)
    out = D.zo_fwd(*args, D.FORMS.index(form), D.REWEIGHTS.index(reweight), eps, 2.25, kl_dt, mean)
    loss, policy, kl, clipped, log_ratio, lin, d_lin, d_quad, d_kl = out
    for got, exp in [(loss, ref.loss), (policy, ref.policy), (kl, ref.kl), (log_ratio, ref.log_ratio), (lin, ref.lin)]:
        torch.testing.assert_close(got, exp.detach(), rtol=1e-10, atol=1e-12)
    assert torch.equal(clipped, ref.clipped)
    grad = D.zo_bwd(gl, gp, gk, c["f_theta"], c["f_old"], c["z"], c["f_ref"] if with_kl else None,
                    c["co"].omega, d_lin, d_quad, d_kl, mean)
    torch.testing.assert_close(grad, want, rtol=1e-9, atol=1e-12)


def test_cases_cover_clipped_and_unclipped_rows():
    c = make_zo_case("flow", 3, B=64)
    out = D.zo_fwd(*decomposed_args(c, True), 2, 0, 1e-3, 2.25, False, True)
    clipped = out[3]
    assert clipped.any() and (~clipped & c["co"].stochastic).any()


@pytest.mark.parametrize("with_old,mean", [(True, True), (False, True), (True, False)])
def test_score_fwd_bwd_match_reference(with_old, mean):
    g = torch.Generator().manual_seed(11 + 2 * with_old + mean)
    B, shape = 9, (9, 4, 6)
    s, s_ref, psi, s_old = (torch.randn(*shape, generator=g, dtype=F64) for _ in range(4))
    c1, gamma, c2 = (torch.rand(B, generator=g, dtype=F64) + 0.1 for _ in range(3))
    sv = s.clone().requires_grad_(True)
    ref = score_regression_loss(sv, s_ref, s_old if with_old else None, psi, C1=c1, gamma=gamma,
                                C2=c2 if with_old else 0.0, reduce="mean" if mean else "sum")
    gl = torch.randn(B, generator=g, dtype=F64)
    want = torch.autograd.grad((gl * ref).sum(), sv)[0]
    so = s_old if with_old else None
    got = D.score_fwd(s, s_ref, psi, so, c1, gamma, c2, mean)
    torch.testing.assert_close(got, ref.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(D.score_bwd(gl, s, s_ref, psi, so, c1, gamma, c2, mean), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("family", ["ddim", "flow"])
@pytest.mark.parametrize("mean", [True, False])
def test_step_matches_transition(family, mean):
    c = make_zo_case(family, 5 + mean)
    co = c["co"]
    x = torch.randn(c["f_old"].shape, generator=torch.Generator().manual_seed(9), dtype=F64)
    xn, lp = D.step_fwd(x, c["f_old"], c["z"], co.c_x, co.c_f, co.sigma, co.stochastic, mean)
    z_eff = torch.where(co.stochastic.reshape(-1, 1, 1, 1), c["z"], torch.zeros_like(c["z"]))
    want_x = co.step(x, c["f_old"], z_eff)
    torch.testing.assert_close(xn, want_x, rtol=1e-12, atol=1e-12)
    want_lp = co.log_prob(want_x, x, c["f_old"], reduce="mean" if mean else "sum")
    torch.testing.assert_close(lp, want_lp, rtol=1e-9, atol=1e-9)
