"""The C++ CPU kernels (csrc/ via rsm_fast.ops.cpu_ext) against the float64 reference
losses and the plain-torch decomposition (rsm_fast.ops.decomposed): every form x reweight, with
and without the KL term, mean and sum, all latent dtypes, odd and multi-chunk row lengths, B = 1;
backward against autograd; bitwise determinism across thread counts; argument checks; the
fallback when the extension is switched off or no compiler is found.

The first run builds the extension (about a minute); later runs reuse torch's extensions cache."""
from __future__ import annotations

import itertools
import os
import subprocess
import sys

import pytest
import torch

from rsm_fast.losses import score_regression_loss
from rsm_fast.ops import decomposed as D
from opcases import close_rel, decomposed_args, ext, make_zo_case, seed_of, zo_reference  # noqa: F401 (ext: fixture)

F64, F32 = torch.float64, torch.float32
LOWP = {F32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}  # relative tolerances vs float64
CHUNK = 8192  # kChunk of rsm_ops_detail.h: rows longer than this are split across work items
LONG = (3, 61, 97)  # 17751 elements: three chunks, the last one odd-sized


def _zo_call(fn, args, form, reweight, eps, kl_dt, mean):
    return fn(*args, form, reweight, eps, 2.25, kl_dt, mean)


def _bwd(fn, grads, args, d_out, mean):
    f_theta, f_old, z, f_ref, _, omega = args[:6]
    return fn(*grads, f_theta, f_old, z, f_ref, omega, *d_out, mean)


# ---------------------------------------------------------------------------------------------
# ZO loss, float64: against the reference losses and autograd
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("form,reweight", list(itertools.product(D.FORMS, D.REWEIGHTS)))
@pytest.mark.parametrize("with_kl,kl_dt,mean", [(True, False, True), (True, True, False), (False, False, True)])
def test_zo_fp64_matches_reference(ext, form, reweight, with_kl, kl_dt, mean):
    seed = seed_of("zo64", form, reweight, with_kl, kl_dt, mean)
    family = "ddim" if seed % 2 else "flow"
    c = make_zo_case(family, seed, B=16, latent=(3, 5, 7))
    eps = 0.02 if form == "ratio" else 1e-3
    ref, grads, want = zo_reference(c, form, reweight, eps, with_kl, kl_dt, mean, seed)
    args = decomposed_args(c, with_kl)
    fi, ri = D.FORMS.index(form), D.REWEIGHTS.index(reweight)
    out = _zo_call(ext.zo_fwd, args, fi, ri, eps, kl_dt, mean)
    dec = _zo_call(D.zo_fwd, args, fi, ri, eps, kl_dt, mean)
    loss, policy, kl, clipped, log_ratio, lin = out[:6]
    for got, exp in [(loss, ref.loss), (policy, ref.policy), (kl, ref.kl), (log_ratio, ref.log_ratio), (lin, ref.lin)]:
        assert got.dtype == F64
        torch.testing.assert_close(got, exp.detach(), rtol=1e-10, atol=1e-12)
    assert clipped.dtype == torch.bool and torch.equal(clipped, ref.clipped)
    for got, exp in zip(out[6:], dec[6:]):  # d_lin, d_quad, d_kl
        torch.testing.assert_close(got, exp, rtol=1e-10, atol=1e-12)
    grad = _bwd(ext.zo_bwd, grads, args, out[6:], mean)
    assert grad.dtype == F64 and grad.shape == c["f_theta"].shape
    torch.testing.assert_close(grad, want, rtol=1e-10, atol=1e-12)


def test_zo_cases_cover_clipped_unclipped_and_both_signs(ext):
    c = make_zo_case("flow", 3, B=64)
    for form in (1, 2):
        clipped = ext.zo_fwd(*decomposed_args(c, True), form, 0, 1e-3, 2.25, False, True)[3]
        st, A = c["co"].stochastic, c["adv"]
        assert (clipped & (A > 0)).any() and (clipped & (A < 0)).any()
        assert (~clipped & st & (A > 0)).any() and (~clipped & st & (A < 0)).any()


@pytest.mark.parametrize("B", [1, 5])
@pytest.mark.parametrize("form,reweight", [(0, 0), (1, 4), (2, 6)])
def test_zo_long_rows_fp64(ext, B, form, reweight):
    """Rows longer than one work item (partial sums reduced across chunks), B = 1 included."""
    c = make_zo_case("flow", seed_of("long", B, form), B=B, latent=LONG, ode_frac=0.0)
    args = decomposed_args(c, True)
    eps = 0.02 if form == 1 else 1e-3
    out = _zo_call(ext.zo_fwd, args, form, reweight, eps, True, True)
    dec = _zo_call(D.zo_fwd, args, form, reweight, eps, True, True)
    for got, exp in zip(out, dec):
        if exp.dtype == torch.bool:
            assert torch.equal(got, exp)
        else:
            torch.testing.assert_close(got, exp, rtol=1e-10, atol=1e-14)
    grads = tuple(torch.randn(B, dtype=F64, generator=torch.Generator().manual_seed(B)) for _ in range(3))
    torch.testing.assert_close(_bwd(ext.zo_bwd, grads, args, out[6:], True),
                               _bwd(D.zo_bwd, grads, args, dec[6:], True), rtol=1e-10, atol=1e-14)


# ---------------------------------------------------------------------------------------------
# ZO loss, fp32 / bf16 / fp16: against float64 computed from the rounded inputs
# ---------------------------------------------------------------------------------------------
def _rounded(c, dtype, with_kl):
    """Kernel args in `dtype` (per-row fp32) and the float64 oracle args on the same rounded values."""
    args = decomposed_args(c, with_kl, F32)
    low = tuple(a.to(dtype) if i < 4 and a is not None else a for i, a in enumerate(args))
    oracle = tuple(a.to(F64) if a is not None and a.dtype != torch.bool else a for a in low)
    return low, oracle


@pytest.mark.parametrize("dtype", [F32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("form,reweight", [(0, 0), (0, 2), (1, 0), (1, 3), (1, 6), (2, 0), (2, 4), (2, 5), (2, 6)])
@pytest.mark.parametrize("latent", [(3, 5, 7), LONG], ids=["odd", "long"])
def test_zo_low_precision(ext, dtype, form, reweight, latent):
    seed = seed_of("lowp", str(dtype), form, reweight, latent)
    B = 1 if latent == LONG else 16
    c = make_zo_case("ddim" if seed % 2 else "flow", seed, B=B, latent=latent)
    mean, kl_dt = bool(seed % 3), bool(seed % 5 < 2)
    rel, eps = LOWP[dtype], (0.02 if form == 1 else 1e-3)
    low, oracle = _rounded(c, dtype, True)
    out = _zo_call(ext.zo_fwd, low, form, reweight, eps, kl_dt, mean)
    exp = _zo_call(D.zo_fwd, oracle, form, reweight, eps, kl_dt, mean)
    assert all(t.dtype == F32 for i, t in enumerate(out) if i != 3)
    # a row right at the clip boundary may land on the other side in fp32; its derivatives jump there
    same = out[3] == exp[3]
    assert int((~same).sum()) <= 1
    for i, (got, want) in enumerate(zip(out, exp)):
        if i != 3:
            close_rel(got[same], want[same], rel)
    g = torch.Generator().manual_seed(seed)
    grads = tuple(torch.randn(B, generator=g, dtype=F64) for _ in range(3))
    grad = _bwd(ext.zo_bwd, tuple(x.to(F32) for x in grads), low, out[6:], mean)
    want = _bwd(D.zo_bwd, tuple(x.to(F32).to(F64) for x in grads), oracle, exp[6:], mean)
    assert grad.dtype == dtype and grad.shape == low[0].shape
    close_rel(grad[same], want[same], rel)


# ---------------------------------------------------------------------------------------------
# Score regression and sampler step
# ---------------------------------------------------------------------------------------------
def _score_case(seed, B, latent, with_old):
    g = torch.Generator().manual_seed(seed)
    s, s_ref, psi, s_old = (torch.randn(B, *latent, generator=g, dtype=F64) for _ in range(4))
    c1, gamma, c2 = (torch.rand(B, generator=g, dtype=F64) + 0.1 for _ in range(3))
    gl = torch.randn(B, generator=g, dtype=F64)
    return s, s_ref, psi, (s_old if with_old else None), c1, gamma, (c2 if with_old else torch.zeros_like(c2)), gl


@pytest.mark.parametrize("with_old,mean", [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("B,latent", [(9, (9, 4, 7)), (1, LONG)], ids=["B9", "B1long"])
def test_score_fp64_matches_reference(ext, with_old, mean, B, latent):
    s, s_ref, psi, s_old, c1, gamma, c2, gl = _score_case(seed_of("score", with_old, mean, B), B, latent, with_old)
    sv = s.clone().requires_grad_(True)
    ref = score_regression_loss(sv, s_ref, s_old, psi, C1=c1, gamma=gamma, C2=c2, reduce="mean" if mean else "sum")
    want = torch.autograd.grad((gl * ref).sum(), sv)[0]
    got = ext.score_fwd(s, s_ref, psi, s_old, c1, gamma, c2, mean)
    torch.testing.assert_close(got, ref.detach(), rtol=1e-10, atol=1e-12)
    grad = ext.score_bwd(gl, s, s_ref, psi, s_old, c1, gamma, c2, mean)
    assert grad.dtype == F64
    torch.testing.assert_close(grad, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [F32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("with_old,mean", [(True, True), (False, False)])
def test_score_low_precision(ext, dtype, with_old, mean):
    seed = seed_of("score-lp", str(dtype), with_old)
    s, s_ref, psi, s_old, c1, gamma, c2, gl = _score_case(seed, 7, (5, 11, 13), with_old)
    lat = [t.to(dtype) if t is not None else None for t in (s, s_ref, psi, s_old)]
    rows = [t.to(F32) for t in (c1, gamma, c2, gl)]
    o_lat = [t.to(F64) if t is not None else None for t in lat]
    o_rows = [t.to(F64) for t in rows]
    got = ext.score_fwd(*lat, *rows[:3], mean)
    assert got.dtype == F32
    close_rel(got, D.score_fwd(*o_lat, *o_rows[:3], mean), LOWP[dtype])
    grad = ext.score_bwd(rows[3], *lat, *rows[:3], mean)
    assert grad.dtype == dtype
    close_rel(grad, D.score_bwd(o_rows[3], *o_lat, *o_rows[:3], mean), LOWP[dtype])


@pytest.mark.parametrize("dtype", [F64, F32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("mean", [True, False])
@pytest.mark.parametrize("B,latent", [(16, (3, 5, 7)), (1, LONG)], ids=["B16", "B1long"])
def test_step(ext, dtype, mean, B, latent):
    c = make_zo_case("ddim" if mean else "flow", seed_of("step", str(dtype), mean, B), B=B, latent=latent,
                     ode_frac=0.25 if B > 1 else 0.0)
    co = c["co"]
    cd = F64 if dtype == F64 else F32
    x = torch.randn(c["f_old"].shape, generator=torch.Generator().manual_seed(9), dtype=F64).to(dtype)
    f, z = c["f_old"].to(dtype), c["z"].to(dtype)
    rows = [co.c_x.to(cd), co.c_f.to(cd), co.sigma.to(cd)]
    xn, lp = ext.step_fwd(x, f, z, *rows, co.stochastic, mean)
    assert xn.dtype == dtype and lp.dtype == cd
    exn, elp = D.step_fwd(x.to(F64), f.to(F64), z.to(F64), *[r.to(F64) for r in rows], co.stochastic, mean)
    if dtype == F64:
        torch.testing.assert_close(xn, exn, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(lp, elp, rtol=1e-10, atol=1e-10)
    else:
        close_rel(xn, exn, LOWP[dtype])
        close_rel(lp, elp, max(LOWP[dtype], 1e-5))
    assert (lp[~co.stochastic] == 0).all()  # ODE rows: log-prob 0


def _same_bits(a, b):
    nan = torch.isnan(a.float())
    assert torch.equal(nan, torch.isnan(b.float()))
    assert torch.equal(a[~nan].view(torch.int16), b[~nan].view(torch.int16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_conversions_match_torch(ext, dtype):
    """The kernels' own branch-free bf16/fp16 <-> fp32 conversions against torch's, bit for bit:
    every 16-bit pattern loaded, and stores of floats spanning ties, subnormals, overflow, inf, NaN."""
    every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype).reshape(-1, 1)
    B = every.shape[0]
    zero, one, no = torch.zeros(B), torch.ones(B), torch.zeros(B, dtype=torch.bool)
    # loads: sum s^2 over a 1-element row is exact in fp32
    sq = ext.score_fwd(every, torch.zeros_like(every), torch.zeros_like(every), None, one, zero, zero, False)
    want = every.float().reshape(-1) ** 2
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(sq), nan) and torch.equal(sq[~nan], want[~nan])
    # load + store round trip: x' = 1 x + 0 f + 0 z
    xn, _ = ext.step_fwd(every, torch.zeros_like(every), torch.zeros_like(every), one, zero, zero, no, True)
    _same_bits(xn, (every.float() + 0.0 + 0.0).to(dtype))
    # stores: x' = c_x * 1 with arbitrary fp32 c_x
    g = torch.Generator().manual_seed(5)
    mags = torch.exp2(torch.empty(20000).uniform_(-30, 20, generator=g)) * torch.randn(20000, generator=g).sign()
    lo16 = torch.randint(0, 2**16, (20000,), generator=g, dtype=torch.int32)
    low = 16 if dtype == torch.bfloat16 else 13  # fp32 mantissa bits dropped by the conversion
    base = every.reshape(-1)[::3].float()
    ties = ((base.view(torch.int32) & ~((1 << low) - 1)) | (1 << (low - 1))).view(torch.float32)  # halfway cases
    edge = torch.tensor([65504.0, 65519.99, 65520.0, 1e6, 2.0**-14, 2.0**-24, 2.0**-25, 3 * 2.0**-26, 1e-45,
                         float("inf"), -float("inf"), float("nan"), 0.0, -0.0])
    c_x = torch.cat([mags, (mags.view(torch.int32) ^ lo16).view(torch.float32), ties, edge, -edge])
    ones = torch.ones(c_x.shape[0], 1, dtype=dtype)
    n0, s0 = torch.zeros(c_x.shape[0]), torch.zeros(c_x.shape[0], dtype=torch.bool)
    xn, _ = ext.step_fwd(ones, torch.zeros_like(ones), torch.zeros_like(ones), c_x, n0, n0, s0, True)
    _same_bits(xn.reshape(-1), (c_x + 0.0 + 0.0).to(dtype))


# ---------------------------------------------------------------------------------------------
# Determinism across thread counts
# ---------------------------------------------------------------------------------------------
def _run_all(ext, c, low, s_args):
    out = ext.zo_fwd(*low, 2, 6, 1e-3, 2.25, True, True)
    g = torch.ones(low[0].shape[0])
    grad = ext.zo_bwd(g, g, g, *low[:4], low[5], *out[6:], True)
    sc = ext.score_fwd(*s_args, True)
    sg = ext.score_bwd(g, *s_args, True)
    step = ext.step_fwd(low[0], low[1], low[2], low[5], low[6], low[6], c["co"].stochastic, True)
    return [*out, grad, sc, sg, *step]


@pytest.mark.parametrize("dtype", [F32, torch.bfloat16], ids=str)
def test_bitwise_identical_across_thread_counts(ext, dtype):
    B = 3
    c = make_zo_case("flow", 17, B=B, latent=(4 * CHUNK + 77,), ode_frac=0.0)
    low, _ = _rounded(c, dtype, True)
    s_args = (low[0], low[1], low[2], low[3], low[4].abs() + 0.1, low[5], low[9])
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run_all(ext, c, low, s_args)
        torch.set_num_threads(2)
        two = _run_all(ext, c, low, s_args)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------
def test_bad_arguments_raise_clear_errors(ext):
    c = make_zo_case("flow", 1, B=4, dtype=F32)
    args = list(decomposed_args(c, True, F32))
    tail = (2, 0, 1e-3, 2.25, False, True)

    def fails(match, **repl):
        a = list(args)
        names = ["f_theta", "f_old", "z", "f_ref", "adv", "omega", "sigma", "dt", "stochastic", "row_weight",
                 "kl_coef", "omega_train"]
        for k, v in repl.items():
            a[names.index(k)] = v
        with pytest.raises(RuntimeError, match=match):
            ext.zo_fwd(*a, *tail)

    fails("f_old must have the shape of f_theta", f_old=args[1][:, :2].contiguous())
    fails("f_ref must have the shape of f_theta", f_ref=args[3][:3])
    fails("z must have the dtype of f_theta", z=args[2].double())
    strided = lambda t: t.transpose(2, 3).contiguous().transpose(2, 3)  # noqa: E731 - same shape, not contiguous
    fails("f_theta must be contiguous", f_theta=strided(args[0]))
    fails("f_ref must be contiguous", f_ref=strided(args[3]))
    fails(r"adv must be Float \(the compute dtype", adv=args[4].double())
    fails(r"omega must have shape \[4\]", omega=args[5][:3])
    fails("sigma must be contiguous", sigma=torch.stack([args[6], args[6]], 1)[:, 0])
    fails("stochastic must be a bool tensor", stochastic=args[8].float())
    fails("f_theta must be float64, float32, bfloat16 or float16", f_theta=args[0].int())
    with pytest.raises(RuntimeError, match="form must be in 0..2"):
        ext.zo_fwd(*args, 3, 0, 1e-3, 2.25, False, True)
    with pytest.raises(RuntimeError, match="reweight must be in 0..6"):
        ext.zo_fwd(*args, 0, 7, 1e-3, 2.25, False, True)
    g = torch.zeros(4)
    with pytest.raises(RuntimeError, match="g_kl must be Float"):
        ext.zo_bwd(g, g, g.double(), *args[:4], args[5], g, g, g, True)
    s = args[0]
    with pytest.raises(RuntimeError, match="psi must have the shape of s"):
        ext.score_fwd(s, s, s[:, :1].contiguous(), None, g, g, g, True)
    with pytest.raises(RuntimeError, match="c_f must have shape"):
        ext.step_fwd(s, s, s, g, torch.zeros(5), g, args[8], True)


# ---------------------------------------------------------------------------------------------
# Fallback: one one-line warning, load() is None
# ---------------------------------------------------------------------------------------------
_PROBE = "from rsm_fast.ops import cpu_ext; print(cpu_ext.load() is None, cpu_ext.load() is None, cpu_ext.available())"


@pytest.mark.parametrize("env", [{"RSM_FAST_NO_CPP": "1"}, {"CXX": "/nonexistent/c++"}], ids=["no_cpp", "no_compiler"])
def test_fallback_warns_once(env):
    full = {k: v for k, v in os.environ.items() if k not in ("RSM_FAST_NO_CPP", "CXX")}
    full.update(env)
    # -W always: a second warning would be shown too, so exactly one line proves "once per process"
    res = subprocess.run([sys.executable, "-W", "always", "-c", _PROBE], env=full, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["True", "True", "False"]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "UserWarning: rsm_fast: C++ CPU ops unavailable (" in lines[0]
    assert lines[0].endswith("); using the PyTorch fallback")
