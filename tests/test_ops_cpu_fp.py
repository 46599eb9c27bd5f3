"""The C++ CPU forward-process loss op (csrc/rsm_fp.cpp via rsm_fast.ops.cpu_ext: ``fp_fwd`` /
``fp_bwd``) against the float64 oracle of tests/fpcases.py (a transcription of the released
DiffusionNFT / AWM losses) and the plain-torch contract rsm_fast.ops.decomposed_fp: every
configuration of ``fpcases.CONFIGS``, mean and sum, all latent dtypes, rows spanning several work
items, B = 1; backward against autograd; NFT's weight floor; bitwise determinism across thread
counts; argument checks.

The first run builds the extension (about a minute); later runs reuse torch's extensions cache."""
from __future__ import annotations


import pytest
import torch

from rsm_fast.ops import decomposed_fp as DF
from fpcases import CONFIGS, make_fp_case, oracle, oracle_grad, raw_args, split
from opcases import close_rel, ext, seed_of  # noqa: F401 (ext: fixture)

F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16
LOWP = {F32: 1e-5, BF16: 1e-2, F16: 1e-2}  # relative tolerances vs float64
# The fp32 gradient against float64: X0 = v - (xa - x0) (AWM) and ep / en (NFT) cancel, so a row
# whose v lies 1e-3 from the target carries fp32 rounding of O(1) operands, ~1e-4 relative per
# element, and ghuber's dl ~ mse^(p - 1) makes those rows the largest. Both fp32 backends share it
# (checked against each other at LOWP[F32]).
GRAD_F32_VS_F64 = 1e-3
CHUNK = 8192  # kChunk of rsm_ops_detail.h
LONG = (3, 61, 97)  # 17751 elements: three chunks, the last one odd-sized
OUT = ("loss", "policy", "kl", "ema_kl", "aux")  # the float outputs compared with the oracle
CFG_IDS = [f"{k}-{o.get('weighting', 'b' + str(o.get('beta')))}-{i}" for i, (k, o) in enumerate(CONFIGS)]


def _close64(got, exp):
    assert got.dtype == F64
    close_rel(got, exp, 1e-10)


def _bwd(fn, grads, args, coef):
    """fp_bwd on the fp_fwd arguments `args` (raw_args order)."""
    v, v_old, xa, x0, v_ref, v_ema, t, _w, _lo, kl_coef, ema_coef, kind, beta = args[:13]
    return fn(*grads, v, v_old, xa, x0, v_ref, v_ema, t, kl_coef, ema_coef, coef, kind, beta, args[-1])


def _with_mean(args, mean):
    return (*args[:-1], mean)


def _rows_of(c, idx):
    """The case restricted to the rows `idx` (a slice), contiguous."""
    return {k: x[idx].contiguous() for k, x in c.items()}


def _check_vs_oracle(out, exp, rel):
    for i, name in enumerate(OUT):
        close_rel(out[i], exp[name].detach(), rel)
    assert torch.equal(out[5], exp["clipped"])


# ---------------------------------------------------------------------------------------------
# float64: against the oracle and autograd
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,opts", CONFIGS, ids=CFG_IDS)
def test_fp64_matches_oracle(ext, kind, opts):
    o, ra = split(opts)
    seed = seed_of("fp64", kind, repr(opts))
    B = 12
    c = make_fp_case(kind, seed, B=B, clip=o.get("clip", 0.2))
    v, exp, rows = oracle(c, kind, **o)
    args = raw_args(c, kind, rows, **ra)
    out = ext.fp_fwd(*args)
    assert [tuple(x.shape) for x in out] == [(B,)] * 4 + [(B, 4), (B,), (B, 2)]
    assert all(x.dtype == F64 for i, x in enumerate(out) if i != 5) and out[5].dtype == torch.bool
    for i, name in enumerate(OUT):
        _close64(out[i], exp[name].detach())
    assert torch.equal(out[5], exp["clipped"])
    _close64(out[6], DF.fp_fwd(*args)[6])  # coef: the contract's own derivative coefficients
    grads, want = oracle_grad(v, exp, seed)
    grad = _bwd(ext.fp_bwd, grads, args, out[6])
    assert grad.dtype == F64 and grad.shape == c["v"].shape
    _close64(grad, want)


def test_awm_cases_cover_every_clip_branch(ext):
    kind, opts = CONFIGS[3]  # awm, clip 0.2, off-policy
    o, ra = split(opts)
    c = make_fp_case(kind, 7, B=64)
    _, exp, rows = oracle(c, kind, **o)
    loss, policy, _, _, aux, clipped, coef = ext.fp_fwd(*raw_args(c, kind, rows, **ra))
    a, ratio = rows["w"], aux[:, 1]
    assert (clipped & (a > 0)).any() and (clipped & (a < 0)).any()
    assert (~clipped & (a > 0) & ((ratio - 1).abs() > 0.2)).any()  # outside the range, unclipped branch larger
    assert (~clipped & ((ratio - 1).abs() < 0.2) & (a != 0)).any()
    assert (coef[clipped, 0] == 0).all() and (coef[~clipped & (a != 0), 0] != 0).all()
    assert policy[2] == 0 and coef[2, 0] == 0  # A' = 0: no policy term, no gradient


def test_nft_weight_floor(ext):
    """Rows whose x0_hat lies within 1e-5 (mean |.|) of x0 take the floor, as the release clips."""
    kind, opts = CONFIGS[0]
    o, ra = split(opts)
    c = make_fp_case(kind, 11, B=12)
    # x0 = v_old = 0 keeps x0_hat - x0 free of cancellation, so the tiny rows compare at 1e-10 too
    g = torch.Generator().manual_seed(3)
    c["x0"][:5], c["v_old"][:5] = 0.0, 0.0
    c["x_t"][:5] = 1e-7 * torch.randn(c["v"][:5].shape, generator=g, dtype=F64)
    c["v"][:5] = 1e-7 * torch.randn(c["v"][:5].shape, generator=g, dtype=F64)
    v, exp, rows = oracle(c, kind, **o)
    args = raw_args(c, kind, rows, **ra)
    out = ext.fp_fwd(*args)
    assert (out[4][:5, :2] == 1e-5).all() and (out[4][5:, :2] > 1e-5).all()
    _check_vs_oracle(out, exp, 1e-10)
    grads, want = oracle_grad(v, exp, 11)
    _close64(_bwd(ext.fp_bwd, grads, args, out[6]), want)


# ---------------------------------------------------------------------------------------------
# Sum reduction, B = 1 and rows over several work items (float64, against the contract)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("B,latent,mean", [(12, (3, 5, 7), False), (1, LONG, True), (3, LONG, False)],
                         ids=["sum", "B1long", "B3long-sum"])
@pytest.mark.parametrize("kind,opts", CONFIGS, ids=CFG_IDS)
def test_fp64_sum_and_long_rows(ext, kind, opts, B, latent, mean):
    o, ra = split(opts)
    seed = seed_of("fp64-long", kind, repr(opts), B, latent)
    c = make_fp_case(kind, seed, B=4 if B == 1 else B, latent=latent, clip=o.get("clip", 0.2))
    if B == 1:
        c = _rows_of(c, slice(3, 4))  # a row with a random advantage
    v, exp, rows = oracle(c, kind, **o)
    args = _with_mean(raw_args(c, kind, rows, **ra), mean)
    out, dec = ext.fp_fwd(*args), DF.fp_fwd(*args)
    for got, want in zip(out, dec):
        if want.dtype == torch.bool:
            assert torch.equal(got, want)
        else:
            _close64(got, want)
    grads = tuple(torch.randn(B, dtype=F64, generator=torch.Generator().manual_seed(seed)) for _ in range(4))
    _close64(_bwd(ext.fp_bwd, grads, args, out[6]), _bwd(DF.fp_bwd, grads, args, dec[6]))
    if mean:  # the oracle reduces by the mean only
        _check_vs_oracle(out, exp, 1e-10)
        grads, want = oracle_grad(v, exp, seed)
        _close64(_bwd(ext.fp_bwd, grads, args, out[6]), want)


# ---------------------------------------------------------------------------------------------
# fp32 / bf16 / fp16 latents: against the oracle on the rounded inputs and the contract
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,opts", CONFIGS, ids=CFG_IDS)
@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=str)
def test_low_precision(ext, dtype, kind, opts):
    o, ra = split(opts)
    seed = seed_of("lowp", str(dtype), kind, repr(opts))
    rel = LOWP[dtype]
    # make_fp_case rounds the latents to `dtype`; the oracle reads them back as float64
    c = make_fp_case(kind, seed, B=12, dtype=dtype, clip=o.get("clip", 0.2))
    v, exp, rows = oracle(c, kind, **o)
    args = raw_args(c, kind, rows, **ra, cd=F32)
    out, dec = ext.fp_fwd(*args), DF.fp_fwd(*args)
    assert all(x.dtype == F32 for i, x in enumerate(out) if i != 5)
    _check_vs_oracle(out, exp, rel)
    for got, want in zip(out, dec):
        if want.dtype == torch.bool:
            assert torch.equal(got, want)
        else:
            close_rel(got, want, rel)
    grads, want = oracle_grad(v, exp, seed)
    g32 = tuple(x.to(F32) for x in grads)
    grad = _bwd(ext.fp_bwd, g32, args, out[6])
    assert grad.dtype == dtype and grad.shape == c["v"].shape
    close_rel(grad, _bwd(DF.fp_bwd, g32, args, dec[6]), rel)
    close_rel(grad, want, GRAD_F32_VS_F64 if dtype == F32 else rel)


# ---------------------------------------------------------------------------------------------
# Determinism across thread counts
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["nft", "awm"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_bitwise_identical_across_thread_counts(ext, dtype, kind):
    B = 3
    c = make_fp_case(kind, 17, B=B, latent=(4 * CHUNK + 77,), dtype=dtype)
    o = dict(off_policy=True, kl_beta=0.1, ema_beta=0.5) if kind == "awm" else dict(beta=0.5, kl_beta=0.1)
    _, _, rows = oracle(c, kind, **o)
    args = raw_args(c, kind, rows, beta=0.5, with_ref=True, with_ema=True, cd=F32)
    g = torch.linspace(-1.0, 1.0, B)

    def run():
        out = ext.fp_fwd(*args)
        return [*out, _bwd(ext.fp_bwd, (g, g, g, g), args, out[6])]

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(2)
        two = run()
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------
NAMES = ("v", "v_old", "xa", "x0", "v_ref", "v_ema", "t", "w", "logp_old", "kl_coef", "ema_coef", "kind", "beta",
         "scale", "weighting", "power", "clip", "mean")


def test_bad_arguments_raise_clear_errors(ext):
    c = make_fp_case("nft", 1, B=4, dtype=F32)
    _, _, rows = oracle(c, "nft", kl_beta=0.1)
    args = raw_args(c, "nft", rows, with_ema=True, cd=F32)
    ext.fp_fwd(*args)  # the unmodified arguments are accepted

    def fails(match, **repl):
        a = list(args)
        for k, val in repl.items():
            a[NAMES.index(k)] = val
        with pytest.raises(RuntimeError, match=match):
            ext.fp_fwd(*a)

    fails("x0 must have the shape of v", x0=args[3][:, :2].contiguous())
    fails("v_ema must have the shape of v", v_ema=args[5][:3])
    fails("xa must have the dtype of v", xa=args[2].double())
    fails("v_ref must be contiguous", v_ref=args[4].transpose(2, 3).contiguous().transpose(2, 3))
    fails("v_old must be a tensor for kind 0", v_old=None)
    fails(r"t must be Float \(the compute dtype", t=args[6].double())
    fails(r"w must have shape \[4\]", w=args[7][:3])
    fails("logp_old must be Float", logp_old=args[6].double())
    fails("ema_coef must be contiguous", ema_coef=torch.stack([args[10], args[10]], 1)[:, 0])
    fails("v must be float64, float32, bfloat16 or float16", v=args[0].int())
    fails("kind must be 0 .nft. or 1 .awm.", kind=2)
    fails("weighting must be in 0..4", kind=1, weighting=5)
    out = ext.fp_fwd(*args)
    g = torch.zeros(4)
    grads = (g, g, g, g)
    with pytest.raises(RuntimeError, match="g_ema must be Float"):
        _bwd(ext.fp_bwd, (g, g, g, g.double()), args, out[6])
    with pytest.raises(RuntimeError, match=r"coef must have shape \[4, 2\]"):
        _bwd(ext.fp_bwd, grads, args, out[6][:, :1].contiguous())
    with pytest.raises(RuntimeError, match="coef must be Float"):
        _bwd(ext.fp_bwd, grads, args, out[6].double())
    with pytest.raises(RuntimeError, match="coef must be contiguous"):
        _bwd(ext.fp_bwd, grads, args, out[6].t().contiguous().t())
    with pytest.raises(RuntimeError, match="v_old must be a tensor for kind 0"):
        _bwd(ext.fp_bwd, grads, (*args[:1], None, *args[2:]), out[6])
