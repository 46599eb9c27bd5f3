"""The registered fused ops (rsm_fast.ops): values and gradients against the float64 reference
through every backend available on this machine, torch.library's opcheck, gradcheck in float64,
torch.compile(fullgraph=True) against eager, and the input checks."""
from __future__ import annotations

import itertools
import zlib

import pytest
import torch

from opcases import available_backends, make_zo_case
from rsm_fast.losses import score_regression_loss, zo_row_loss
from rsm_fast.ops import FusedOpInputError, sampler_step, score_loss, zo_loss
from rsm_fast.ops import library as L

F64 = torch.float64


BACKENDS = available_backends()


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("RSM_FAST_OPS_BACKEND", request.param)
    return request.param


def _kw(c, form, reweight, with_kl, kl_dt, mean):
    return dict(form=form, reweight=reweight, clip_eps=0.02 if form == "ratio" else 1e-3,
                f_ref=c["f_ref"] if with_kl else None, kl_coef=c["kl_coef"] if with_kl else 0.0, kl_dt_weight=kl_dt,
                row_weight=c["row_weight"], omega_train=c["omega_train"], reduce="mean" if mean else "sum")


def _loss_and_grad(fn, c, f, kw, g):
    f = f.clone().requires_grad_(True)
    out = fn(f, c["f_old"], c["z"], c["adv"], c["co"], **kw)
    gl, gp, gk = g
    (grad,) = torch.autograd.grad((gl * out.loss + gp * out.policy + gk * out.kl).sum(), f)
    return out, grad


MODES = [("pg", "base"), ("ratio", "base"), ("hinge", "base"), ("ratio", "fair"), ("hinge", "fair_guard"),
         ("ratio", "guard"), ("hinge", "tempflow"), ("ratio", "tempflow_outer"), ("hinge", "pcpo"), ("ratio", "pcpo")]


@pytest.mark.parametrize("form,reweight", MODES)
@pytest.mark.parametrize("with_kl,kl_dt,mean", [(True, False, True), (True, True, False), (False, False, True)])
def test_zo_loss_matches_reference_float64(backend, form, reweight, with_kl, kl_dt, mean):
    seed = zlib.crc32(repr((form, reweight, with_kl, kl_dt, mean)).encode())
    c = make_zo_case("flow" if seed % 2 else "ddim", seed, B=12, latent=(2, 3, 5))
    kw = _kw(c, form, reweight, with_kl, kl_dt, mean)
    g = tuple(torch.randn(12, generator=torch.Generator().manual_seed(seed), dtype=F64) for _ in range(3))
    ref, want = _loss_and_grad(zo_row_loss, c, c["f_theta"], kw, g)
    got, grad = _loss_and_grad(zo_loss, c, c["f_theta"], kw, g)
    for name in ("loss", "policy", "kl", "log_ratio", "lin"):
        torch.testing.assert_close(getattr(got, name), getattr(ref, name).detach(), rtol=1e-10, atol=1e-12, msg=name)
    assert torch.equal(got.clipped, ref.clipped)
    torch.testing.assert_close(grad, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 1e-2)])
def test_zo_loss_low_precision_against_float64_of_rounded_inputs(backend, dtype, tol):
    c = make_zo_case("flow", 21, B=8, latent=(4, 7, 9))
    low = {k: c[k].to(dtype) for k in ("f_theta", "f_old", "z", "f_ref")}
    kw = _kw(c, "hinge", "fair", True, False, True) | {"f_ref": low["f_ref"]}
    kw64 = kw | {"f_ref": low["f_ref"].to(F64)}
    c64 = c | {k: low[k].to(F64) for k in ("f_old", "z")}
    g = tuple(torch.randn(8, generator=torch.Generator().manual_seed(3), dtype=F64) for _ in range(3))
    ref, want = _loss_and_grad(zo_row_loss, c64, low["f_theta"].to(F64), kw64, g)
    got, grad = _loss_and_grad(zo_loss, c | low, low["f_theta"], kw, g)
    assert got.loss.dtype == torch.float32 and grad.dtype == dtype
    scale = ref.loss.abs().max()
    assert (got.loss.double() - ref.loss).abs().max() <= tol * scale
    gscale = want.abs().max()
    assert (grad.double() - want).abs().max() <= tol * gscale


def test_opcheck_zo_and_score_ops():
    c = make_zo_case("ddim", 4, B=5, latent=(3, 4))
    co = c["co"]
    args = (c["f_theta"].clone().requires_grad_(True), c["f_old"], c["z"], c["f_ref"], c["adv"], co.omega, co.sigma,
            co.dt, co.stochastic, c["row_weight"], c["kl_coef"], c["omega_train"], 2, 3, 1e-3, 2.25, False, True)
    torch.library.opcheck(L.zo_loss, args)
    s = torch.randn(5, 3, 4, dtype=F64, requires_grad=True)
    o = [torch.randn(5, 3, 4, dtype=F64) for _ in range(3)]
    rows = [torch.rand(5, dtype=F64) + 0.1 for _ in range(3)]
    torch.library.opcheck(L.score_loss, (s, o[0], o[1], o[2], *rows, True))
    torch.library.opcheck(L.sampler_step, (o[0], o[1], o[2], co.c_x, co.c_f, co.sigma, co.stochastic, True))


@pytest.mark.parametrize("form", ["pg", "ratio", "hinge"])
def test_gradcheck_float64(backend, form):
    c = make_zo_case("flow", 8, B=4, latent=(2, 3), ode_frac=0.0)
    f = c["f_theta"].clone().requires_grad_(True)
    kw = _kw(c, form, "base", True, False, True)
    # stay away from the clip boundary, where the loss is not differentiable
    kw["clip_eps"] = 10.0
    fn = lambda x: zo_loss(x, c["f_old"], c["z"], c["adv"], c["co"], **kw).loss  # noqa: E731
    assert torch.autograd.gradcheck(fn, (f,), eps=1e-6, atol=1e-7)
    s = torch.randn(4, 2, 3, dtype=F64, requires_grad=True)
    o = [torch.randn(4, 2, 3, dtype=F64) for _ in range(3)]
    c1 = torch.rand(4, dtype=F64)
    assert torch.autograd.gradcheck(lambda x: score_loss(x, o[0], o[1], o[2], c1, 0.7, 0.3), (s,))


def test_score_loss_matches_reference(backend):
    g = torch.Generator().manual_seed(17)
    s, s_ref, psi, s_old = (torch.randn(6, 5, 7, generator=g, dtype=F64) for _ in range(4))
    c1, gamma, c2 = torch.rand(6, generator=g, dtype=F64), 0.8, torch.rand(6, generator=g, dtype=F64)
    sv = s.clone().requires_grad_(True)
    ref = score_regression_loss(sv, s_ref, s_old, psi, C1=c1, gamma=gamma, C2=c2)
    (want,) = torch.autograd.grad(ref.sum(), sv)
    sv2 = s.clone().requires_grad_(True)
    got = score_loss(sv2, s_ref, s_old, psi, c1, gamma, c2)
    (grad,) = torch.autograd.grad(got.sum(), sv2)
    torch.testing.assert_close(got, ref.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, want, rtol=1e-12, atol=1e-12)


def test_sampler_step_matches_transition(backend):
    c = make_zo_case("ddim", 12, B=10, latent=(3, 5))
    co = c["co"]
    x = torch.randn(c["f_old"].shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    xn, lp = sampler_step(co, x, c["f_old"], c["z"])
    want = co.step(x, c["f_old"], c["z"] * co.stochastic.to(F64)[:, None, None])
    torch.testing.assert_close(xn, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lp, co.log_prob(want, x, c["f_old"]), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("backend_name", ["aot_eager", "inductor"])
def test_compile_fullgraph_matches_eager(backend_name):
    """The public API (input checks included) traces into one graph with the op as a single node."""
    c = make_zo_case("flow", 30, B=6, latent=(2, 3, 4), dtype=torch.float32)
    co = c["co"]

    def step(f):
        out = zo_loss(f, c["f_old"], c["z"], c["adv"].float(), co, form="hinge", reweight="fair", clip_eps=1e-3,
                      f_ref=c["f_ref"], kl_coef=0.5)
        s = score_loss(f, c["f_ref"], c["f_old"], c["z"], co.omega.float(), 0.5, 0.1)
        return out.loss.mean() * 3.0 + s.mean()

    f1 = c["f_theta"].clone().requires_grad_(True)
    eager = step(f1)
    eager.backward()
    f2 = c["f_theta"].clone().requires_grad_(True)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=backend_name)(f2)
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(f2.grad, f1.grad)


# -- bad input ----------------------------------------------------------------------------------
def _call(**over):
    c = make_zo_case("ddim", 2, B=4, latent=(2, 3), dtype=torch.float32)
    kw = dict(f_theta=c["f_theta"], f_old=c["f_old"], z=c["z"], adv=c["adv"], coeffs=c["co"], f_ref=c["f_ref"],
              kl_coef=0.1)
    kw.update(over)
    return zo_loss(**kw)


@pytest.mark.parametrize("over,field", [
    (dict(z=torch.zeros(4, 2, 4)), "z"),
    (dict(f_old=torch.zeros(4, 2, 3, dtype=torch.bfloat16)), "f_old"),
    (dict(f_ref=torch.zeros(4, 3, 2).transpose(1, 2)), "f_ref"),
    (dict(adv=torch.tensor([0.0, float("nan"), 1.0, 2.0])), "adv"),
    (dict(adv=torch.zeros(3)), "adv"),
    (dict(row_weight=torch.tensor([1.0, 1.0, float("inf"), 1.0])), "row_weight"),
    (dict(form="clip"), "form"),
    (dict(f_ref=None), "f_ref"),
])
def test_bad_input_names_the_field(over, field):
    with pytest.raises(FusedOpInputError, match=field):
        _call(**over)


def test_nan_check_is_one_line_and_leaves_outputs_unwritten():
    with pytest.raises(FusedOpInputError) as e:
        _call(adv=torch.tensor([float("nan")] * 4))
    assert "\n" not in str(e.value)


def test_all_modes_run_through_the_public_api():
    c = make_zo_case("flow", 5, B=6, latent=(2, 2), dtype=torch.float32)
    for form, rw in itertools.product(("pg", "ratio", "hinge"), ("base", "tempflow", "tempflow_outer", "fair",
                                                                 "fair_guard", "guard", "pcpo")):
        out = zo_loss(c["f_theta"], c["f_old"], c["z"], c["adv"], c["co"], form=form, reweight=rw, clip_eps=0.1,
                      omega_train=c["omega_train"])
        assert torch.isfinite(out.loss).all()


@pytest.mark.parametrize("form,reweight,with_kl", [("hinge", "fair", True), ("ratio", "guard", False), ("pg", "pcpo", True)])
def test_registered_op_and_eager_fast_path_agree(backend, form, reweight, with_kl):
    """Outside torch.compile the API runs ZOLossFn/ScoreLossFn; the registered ops (used under
    compile and by torch.ops callers) must give the same values and gradients."""
    c = make_zo_case("flow", 44, B=7, latent=(3, 4))
    co = c["co"]
    args = (c["f_old"], c["z"], c["f_ref"] if with_kl else None, c["adv"], co.omega, co.sigma, co.dt, co.stochastic,
            c["row_weight"], c["kl_coef"] if with_kl else torch.zeros(7, dtype=F64), c["omega_train"],
            ("pg", "ratio", "hinge").index(form),
            ("base", "tempflow", "tempflow_outer", "fair", "fair_guard", "guard", "pcpo").index(reweight),
            0.05, 2.25, False, True)
    g = torch.randn(7, dtype=F64, generator=torch.Generator().manual_seed(2))
    res = []
    # the registered op returns the outputs' [9, B] block; zo_outputs cuts them out (as the API does)
    for fn in (lambda *a: L.zo_outputs(L.zo_loss(*a)), L.ZOLossFn.apply):
        f = c["f_theta"].clone().requires_grad_(True)
        out = fn(f, *args)
        (grad,) = torch.autograd.grad((g * out[0]).sum() + out[1].sum() + 0.5 * out[2].sum(), f)
        res.append((out, grad))
    for a, b in zip(res[0][0], res[1][0]):
        assert torch.equal(a, b)
    assert torch.equal(res[0][1], res[1][1])
    s = torch.randn(7, 3, 4, dtype=F64)
    o = [torch.randn(7, 3, 4, dtype=F64) for _ in range(3)]
    rows = [torch.rand(7, dtype=F64) for _ in range(3)]
    grads = []
    for fn in (L.score_loss, L.ScoreLossFn.apply):
        sv = s.clone().requires_grad_(True)
        grads.append(torch.autograd.grad(fn(sv, *o, *rows, True).sum(), sv)[0])
    assert torch.equal(grads[0], grads[1])
