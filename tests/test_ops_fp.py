"""The fused forward-process loss op (``rsm_fast::fp_loss``, DiffusionNFT / AWM): the plain-torch
contract against the float64 oracle of ``fpcases`` (an independent transcription of the released
lines); the public ``nft_loss`` / ``awm_loss`` / ``awm_log_likelihood`` against the reference
losses of ``rsm_fast.losses.forward_process`` through every backend available here, in float64
and on rounded low-precision inputs; opcheck, gradcheck, torch.compile(fullgraph=True) against
eager, the registered op against the eager fast path; the input checks; and the forward family
trained with the fused op against the reference."""
from __future__ import annotations

import zlib

import pytest
import torch

from fpcases import CONFIGS, make_fp_case, oracle, oracle_grad, raw_args, split
from opcases import available_backends
from rsm_fast import ops
from rsm_fast.losses import forward_process as FP
from rsm_fast.ops import FusedOpInputError
from rsm_fast.ops import decomposed_fp as DF
from rsm_fast.ops import library as L

F64 = torch.float64
OUT = ("loss", "policy", "kl", "ema_kl", "aux")


BACKENDS = available_backends()


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("RSM_FAST_OPS_BACKEND", request.param)
    return request.param


def _seed(*key) -> int:
    return zlib.crc32(repr(key).encode())


# -- the contract ---------------------------------------------------------------------------------
@pytest.mark.parametrize("i", range(len(CONFIGS)))
def test_contract_matches_the_release_transcription_float64(i):
    kind, opts = CONFIGS[i]
    o, ra = split(opts)
    c = make_fp_case(kind, _seed(i))
    v, out, rows = oracle(c, kind, **o)
    args = raw_args(c, kind, rows, mean=True, **ra)
    got = DF.fp_fwd(*args)
    for name, g in zip(OUT, got):
        torch.testing.assert_close(g, out[name].detach(), rtol=1e-10, atol=1e-13, msg=name)
    assert torch.equal(got[5], out["clipped"])
    gs, want = oracle_grad(v, out, _seed(i))
    grad = DF.fp_bwd(*gs, *args[:7], args[9], args[10], got[6], args[11], args[12], True)
    torch.testing.assert_close(grad, want, rtol=1e-10, atol=1e-13)


def test_cases_cover_clipped_rows_both_signs_and_zero_advantages():
    c = make_fp_case("awm", 3)
    o, _ = split(dict(weighting="t", clip=0.2, off_policy=True))
    _, out, rows = oracle(c, "awm", **o)
    ratio, a = out["aux"][:, 1], rows["w"]
    assert out["clipped"].any() and (~out["clipped"] & (a != 0)).any()
    assert (ratio > 1.2).any() and (ratio < 0.8).any() and ((ratio > 0.8) & (ratio < 1.2)).any()
    assert (a > 0).any() and (a < 0).any() and (a == 0).any()


def test_sum_reduction_scales_every_row_sum():
    """``mean=False``: the same epilogue on sums; the KL rows scale by n exactly."""
    c = make_fp_case("awm", 9)
    o, ra = split(dict(weighting="uniform", clip=0.2, kl_beta=0.1, ema_beta=0.2))
    _, _, rows = oracle(c, "awm", **o)
    n = c["v"][0].numel()
    m = DF.fp_fwd(*raw_args(c, "awm", rows, mean=True, **ra))
    s = DF.fp_fwd(*raw_args(c, "awm", rows, mean=False, **ra))
    torch.testing.assert_close(s[2], n * m[2], rtol=1e-12, atol=0)
    torch.testing.assert_close(s[4][:, 2], n * m[4][:, 2], rtol=1e-12, atol=0)


# -- the public API against the reference losses -----------------------------------------------------
def _nft(fn, c, v, beta, kl_beta):
    return fn(v, c["v_old"], c["v_ref"], c["x_t"], c["x0"], c["t"], c["adv"], beta=beta, kl_beta=kl_beta)


def _awm(fn, c, v, logp_old, **kw):
    return fn(v, c["eps"], c["x0"], c["t"], c["adv"], logp_old=logp_old, v_ref=c["v_ref"], v_ema=c["v_ema"], **kw)


AWM_KW = [dict(weighting=w, clip_range=0.2, kl_beta=0.1, ema_beta=0.5, kl_weight="elbo") for w in FP.AWM_WEIGHTINGS]
AWM_KW += [dict(weighting="ghuber", clip_range=1.0, advantage_max=None, kl_ema_weight="elbo")]


def _compare(ref, got, v_ref, v_got, rtol, atol):
    (want,) = torch.autograd.grad(ref[0], v_ref)
    (grad,) = torch.autograd.grad(got[0], v_got)
    torch.testing.assert_close(got[0].double(), ref[0].detach().double(), rtol=rtol, atol=atol)
    for k, x in got[1].items():
        torch.testing.assert_close(x.double() if x.dtype != torch.bool else x, ref[1][k].double()
                                   if x.dtype != torch.bool else ref[1][k], rtol=rtol, atol=atol, msg=k)
    scale = float(want.abs().max())
    torch.testing.assert_close(grad.double(), want.double(), rtol=rtol, atol=atol * max(scale, 1.0))


@pytest.mark.parametrize("beta,kl_beta", [(1.0, 1e-4), (0.1, 0.0), (0.5, 0.3)])
def test_nft_loss_matches_reference_float64(backend, beta, kl_beta):
    c = make_fp_case("nft", _seed("nft", beta))
    a, b = c["v"].clone().requires_grad_(True), c["v"].clone().requires_grad_(True)
    ref, got = _nft(FP.nft_loss, c, a, beta, kl_beta), _nft(ops.nft_loss, c, b, beta, kl_beta)
    assert set(got[1]) == set(ref[1]) - {"old_deviate"}
    _compare(ref, got, a, b, 1e-10, 1e-13)


@pytest.mark.parametrize("j", range(len(AWM_KW)))
@pytest.mark.parametrize("off_policy", [False, True])
def test_awm_loss_matches_reference_float64(backend, j, off_policy):
    kw = AWM_KW[j]
    c = make_fp_case("awm", _seed("awm", j))
    wk = dict(weighting=kw["weighting"], p=0.25)
    lo_ref = FP.awm_log_likelihood(c["v"], c["eps"], c["x0"], c["t"], **wk) - c["logp_shift"] if off_policy else None
    lo_got = ops.awm_log_likelihood(c["v"], c["eps"], c["x0"], c["t"], **wk) - c["logp_shift"] if off_policy else None
    a, b = c["v"].clone().requires_grad_(True), c["v"].clone().requires_grad_(True)
    ref, got = _awm(FP.awm_loss, c, a, lo_ref, **kw), _awm(ops.awm_loss, c, b, lo_got, **kw)
    assert set(got[1]) == set(ref[1])
    if off_policy and kw["clip_range"] < 1:
        assert got[1]["clipped"].any()
    _compare(ref, got, a, b, 1e-10, 1e-13)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 2e-5)])
@pytest.mark.parametrize("kind", ["nft", "awm"])
def test_low_precision_against_float64_of_rounded_inputs(backend, dtype, tol, kind):
    """bf16 latents: the op computes in fp32; the float64 reference on the same (rounded) values
    agrees to fp32 rounding (the outputs are fp32 whatever the latent dtype)."""
    c = make_fp_case(kind, _seed("lowp", kind), dtype=dtype)
    c64 = {k: (x.double() if x.dim() > 1 else x) for k, x in c.items()}
    rows32 = {k: x.float() for k, x in c.items() if x.dim() == 1}
    a, b = c64["v"].clone().requires_grad_(True), c["v"].clone().requires_grad_(True)
    if kind == "nft":
        ref = _nft(FP.nft_loss, c64, a, 0.5, 0.1)
        got = _nft(ops.nft_loss, {**c, **rows32}, b, 0.5, 0.1)
    else:
        kw = dict(weighting="ghuber", clip_range=1.0, kl_beta=0.1, ema_beta=0.5)
        ref, got = _awm(FP.awm_loss, c64, a, None, **kw), _awm(ops.awm_loss, {**c, **rows32}, b, None, **kw)
    assert got[0].dtype == torch.float32 and b.dtype == dtype
    (want,) = torch.autograd.grad(ref[0], a)
    (grad,) = torch.autograd.grad(got[0], b)
    torch.testing.assert_close(got[0].double(), ref[0].detach(), rtol=tol, atol=0)
    # the gradient is stored in the latent dtype; in fp32 NFT's x_t - x0 - t v_old cancels to ~1e-7
    gtol = 1e-4 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(grad.double(), want, rtol=gtol, atol=gtol * float(want.abs().max()))


def test_fused_likelihood_gives_ratio_exactly_one_at_equal_weights(backend):
    """AWM's off-policy pass at unchanged weights: the fused logp_old and the fused loss's logp are
    the same fp32 numbers, so no row is clipped at any clip range."""
    c = make_fp_case("awm", 21, dtype=torch.float32)
    t, adv = c["t"].float(), c["adv"].float()
    lo = ops.awm_log_likelihood(c["v"], c["eps"], c["x0"], t, weighting="ghuber")
    _, stats = ops.awm_loss(c["v"], c["eps"], c["x0"], t, adv, logp_old=lo, clip_range=1e-6, kl_beta=0, ema_beta=0)
    assert torch.equal(stats["ratio"], torch.ones_like(stats["ratio"]))
    assert not stats["clipped"].any()


# -- the op under torch.library / compile -------------------------------------------------------
def _raw(kind: str, seed: int, dtype=F64):
    c = make_fp_case(kind, seed, B=5, latent=(3, 4), dtype=dtype)
    o, ra = split(dict(beta=0.5, kl_beta=0.1) if kind == "nft" else
                  dict(weighting="huber", clip=0.2, off_policy=True, kl_beta=0.1, ema_beta=0.3))
    _, _, rows = oracle(c, kind, **o)
    return list(raw_args(c, kind, rows, cd=F64 if dtype == F64 else torch.float32, **ra))


@pytest.mark.parametrize("kind", ["nft", "awm"])
def test_opcheck(kind):
    args = _raw(kind, 4)
    args[0] = args[0].clone().requires_grad_(True)
    torch.library.opcheck(L.fp_loss, tuple(args))


@pytest.mark.parametrize("kind", ["nft", "awm"])
def test_gradcheck_float64(backend, kind):
    args = _raw(kind, 8)
    if kind == "awm":
        args[16] = 10.0                        # away from the clip boundary, where the loss has a kink
    v = args[0].clone().requires_grad_(True)
    g = torch.rand(5, dtype=F64, generator=torch.Generator().manual_seed(3))

    def fn(x):
        out = L.FPLossFn.apply(x, *args[1:])
        return (out[0] + g * out[1] + 0.3 * out[2] + 0.7 * out[3]).sum()

    # NFT's adaptive weights are constants of the gradient (no_grad, as released): check the AWM
    # loss fully and NFT's with the weights frozen at v by comparing the directional derivative
    if kind == "awm":
        assert torch.autograd.gradcheck(fn, (v,), eps=1e-6, atol=1e-7)
    else:
        (grad,) = torch.autograd.grad(fn(v), v)
        assert torch.isfinite(grad).all() and grad.abs().max() > 0


@pytest.mark.parametrize("kind", ["nft", "awm"])
def test_registered_op_and_eager_fast_path_agree(backend, kind):
    args = _raw(kind, 44)
    res = []
    # the registered op returns the outputs' [11, B] block; fp_outputs cuts them out (as the API does)
    for fn in (lambda *a: L.fp_outputs(L.fp_loss(*a)), L.FPLossFn.apply):
        v = args[0].clone().requires_grad_(True)
        out = fn(v, *args[1:])
        (grad,) = torch.autograd.grad(out[0].sum() + 0.5 * out[1].sum() + out[2].sum() - out[3].sum(), v)
        res.append((out, grad))
    for a, b in zip(res[0][0], res[1][0]):
        assert torch.equal(a, b)
    assert torch.equal(res[0][1], res[1][1])


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_matches_eager(compile_backend):
    c = make_fp_case("awm", 30, B=6, latent=(2, 3, 4), dtype=torch.float32)
    n = make_fp_case("nft", 31, B=6, latent=(2, 3, 4), dtype=torch.float32)
    t, adv = c["t"].float(), c["adv"].float()

    def step(v):
        la, _ = ops.awm_loss(v, c["eps"], c["x0"], t, adv, v_ref=c["v_ref"], v_ema=c["v_ema"], clip_range=0.2)
        ln, _ = ops.nft_loss(v, n["v_old"], n["v_ref"], n["x_t"], n["x0"], n["t"].float(), n["adv"].float(), beta=0.5)
        return la * 2.0 + ln

    v1 = c["v"].clone().requires_grad_(True)
    eager = step(v1)
    eager.backward()
    v2 = c["v"].clone().requires_grad_(True)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=compile_backend)(v2)
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(v2.grad, v1.grad)


# -- bad input ------------------------------------------------------------------------------------
def _awm_call(**over):
    c = make_fp_case("awm", 2, B=4, latent=(2, 3), dtype=torch.float32)
    kw = dict(v_theta=c["v"], eps=c["eps"], x0=c["x0"], t=c["t"].float(), adv=c["adv"].float(), v_ref=c["v_ref"],
              ema_beta=0.0)
    kw.update(over)
    return ops.awm_loss(**kw)


@pytest.mark.parametrize("over,field", [
    (dict(eps=torch.zeros(4, 2, 4)), "eps"),
    (dict(x0=torch.zeros(4, 2, 3, dtype=torch.bfloat16)), "x0"),
    (dict(v_ref=torch.zeros(4, 3, 2).transpose(1, 2)), "v_ref"),
    (dict(adv=torch.tensor([0.0, float("nan"), 1.0, 2.0])), "adv"),
    (dict(t=torch.zeros(3)), "t"),
    (dict(logp_old=torch.zeros(4, 1)), "logp_old"),
    (dict(weighting="l2"), "weighting"),
    (dict(clip_range=0), "clip_range"),
    (dict(v_ref=None), "v_ref"),
    (dict(v_ema=None, ema_beta=1.0), "v_ema"),
])
def test_bad_awm_input_names_the_field(over, field):
    with pytest.raises(FusedOpInputError, match=field):
        _awm_call(**over)


@pytest.mark.parametrize("over,field", [
    (dict(beta=0), "beta"), (dict(kl_beta=-1.0), "kl_beta"), (dict(adv_mode="top"), "adv_mode"),
    (dict(v_ref=None), "v_ref"), (dict(v_old=torch.zeros(4, 6)), "v_old"),
])
def test_bad_nft_input_names_the_field(over, field):
    c = make_fp_case("nft", 2, B=4, latent=(2, 3), dtype=torch.float32)
    kw = dict(v_theta=c["v"], v_old=c["v_old"], v_ref=c["v_ref"], x_t=c["x_t"], x0=c["x0"], t=c["t"].float(),
              adv=c["adv"].float(), beta=1.0, kl_beta=1e-4)
    kw.update(over)
    with pytest.raises(FusedOpInputError, match=field) as e:
        ops.nft_loss(**kw)
    assert "\n" not in str(e.value)


# -- the family on the fused op ---------------------------------------------------------------------
@pytest.mark.parametrize("preset,extra", [("diffusion-nft", []), ("awm", ["train.inner_updates=2"])])
def test_forward_family_trains_the_same_on_the_fused_op(preset, extra):
    """Three epochs on the 2-D task: the fused op (this machine's backend) and the float64-capable
    reference give the same first-epoch loss rows and parameters within fp32 rounding."""
    from rsm_fast.config import build_config
    from rsm_fast.trainer import Trainer

    sets = ["train.threads=1", "task.eval_samples=256", "train.batch_size=64", "method.group_size=8"] + extra
    params = []
    for impl in ("fused", "reference"):
        tr = Trainer(build_config(preset, None, sets + [f"train.loss_impl={impl}"]))
        logs = [tr.epoch() for _ in range(3)]
        params.append(torch.cat([p.detach().flatten() for p in tr.params]))
        assert all(torch.isfinite(torch.tensor(x["loss"])) for x in logs)
    rel = float((params[0] - params[1]).norm() / params[1].norm())
    assert rel < 1e-4, rel


def test_clipped_overflowing_ratio_has_a_zero_gradient(backend):
    """An off-policy row whose ratio overflows to inf and is clipped (A' > 0), and one with A' = 0:
    policy finite, gradient exactly 0 on both (autograd of the released lines gives 0 * inf = NaN)."""
    c = make_fp_case("awm", 5, dtype=torch.float32)
    t, adv = c["t"].float(), c["adv"].float()
    lo = ops.awm_log_likelihood(c["v"], c["eps"], c["x0"], t, weighting="t") - c["logp_shift"].float()
    lo[[0, 2]] -= 1e4                                   # rows 0 and 2: A = 7.5 and 0 (make_fp_case)
    v = c["v"].clone().requires_grad_(True)
    loss, stats = ops.awm_loss(v, c["eps"], c["x0"], t, adv, logp_old=lo, weighting="t", clip_range=0.2,
                               kl_beta=0.0, ema_beta=0.0)
    (grad,) = torch.autograd.grad(loss, v)
    assert torch.isinf(stats["ratio"][[0, 2]]).all() and stats["clipped"][0] and torch.isfinite(loss)
    assert torch.equal(grad[[0, 2]], torch.zeros_like(grad[[0, 2]])) and torch.isfinite(grad).all()
    assert grad[3:].abs().sum() > 0
