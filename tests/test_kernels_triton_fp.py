"""The Triton kernels of the forward-process loss (rsm_fast.kernels.fp_loss: DiffusionNFT / AWM)
against the float64 oracle of tests/fpcases.py and the contract rsm_fast.ops.decomposed_fp.

fp64 runs must equal the oracle (and its autograd gradient) to rounding for every configuration
in fpcases.CONFIGS; fp32 / bf16 latents are checked against the oracle evaluated on the same
(rounded) inputs. Also: the sum reduction, one row, two epilogue programs, rows split into more
chunks than one epilogue tile holds (with an odd row length), bitwise determinism, and the
boundary checks of every per-row input.

Without CUDA the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set before Triton
is imported), which is slow: the latents here are small."""
from __future__ import annotations

import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from rsm_fast.kernels import _launch, fp_loss  # noqa: E402
from rsm_fast.ops import decomposed_fp as D  # noqa: E402
from fpcases import CONFIGS, make_fp_case, oracle, oracle_grad, raw_args, split  # noqa: E402

if not torch.cuda.is_available() and not _launch.INTERPRET:
    pytest.skip("no CUDA device and Triton was imported without TRITON_INTERPRET=1", allow_module_level=True)

# The interpreter's tensor-bound loops convert 1-element arrays to int (a numpy deprecation).
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

F64, F32, BF16 = torch.float64, torch.float32, torch.bfloat16
DEV = "cuda" if torch.cuda.is_available() else "cpu"
RTOL = {F64: 1e-10, F32: 1e-5, BF16: 1e-2}
# The gradient against the float64 oracle. The cases put rows at distances down to 1e-3 from v*, so
# X0 = v - (eps - x0) (and NFT's c = (x_t - x0) - t v_old) cancel terms of size 1: fp32 arithmetic
# on them loses up to ~1e3 ulps there. decomposed_fp itself, run in fp32, is 3.8e-5 off on these
# cases (measured); the kernels' fp32 gradient is held to that contract at RTOL instead.
GRAD_RTOL = {F64: 1e-10, F32: 1e-4, BF16: 1e-2}
OUT_NAMES = ("loss", "policy", "kl", "ema_kl", "aux", "clipped", "coef")
CONFIG_IDS = [f"{i}-{kind}-{opts.get('weighting', 'beta=%g' % opts.get('beta', 1.0))}"
              for i, (kind, opts) in enumerate(CONFIGS)]


def seed_of(*key) -> int:
    return zlib.crc32(repr(key).encode())


def on_dev(x):
    return x.to(DEV) if isinstance(x, torch.Tensor) else x


def to64(x):
    return x.detach().cpu().double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def check(got, want, rtol, what=""):
    """|got - want| <= rtol (|want| + max|want|), elementwise, in float64."""
    got, want = got.detach().cpu().double(), want.detach().cpu().double()
    scale = want.abs().max().item() if want.numel() else 0.0
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * scale, msg=lambda m: f"{what}: {m}")


def slice_case(c: dict, B: int) -> dict:
    """The first ``B`` rows of a case (make_fp_case needs B >= 3 for its fixed advantages)."""
    return {k: x[:B].contiguous() for k, x in c.items()}


def run(c, kind, opts, dtype, seed, mean=True):
    """The kernels' forward and backward on case ``c`` -> ``(args, out, grad, gs)``, plus the oracle
    ``(o_out, o_grad)`` on the same (rounded) latents."""
    cd = F64 if dtype == F64 else F32
    o, ra = split(opts)
    v, o_out, rows = oracle(c, kind, **o)
    gs64, o_grad = oracle_grad(v, o_out, seed)
    args = tuple(on_dev(a) for a in raw_args(c, kind, rows, **ra, mean=mean, cd=cd))
    out = fp_loss.fp_fwd(*args)
    gs = tuple(on_dev(g.to(cd)) for g in gs64)
    grad = fp_loss.fp_bwd(*gs, *bwd_args(args, out[6]))
    return args, out, grad, gs, o_out, o_grad


def bwd_args(args, coef):
    """fp_bwd's arguments after the four upstream grads, from fp_fwd's ``args``."""
    return (*args[:7], args[9], args[10], coef, args[11], args[12], args[17])


def check_shapes(args, out, grad):
    v, B = args[0], args[0].shape[0]
    cd = F64 if v.dtype == F64 else F32
    shapes = {"aux": (B, 4), "coef": (B, 2)}
    for name, x in zip(OUT_NAMES, out):
        assert x.shape == shapes.get(name, (B,)), name
        assert x.dtype == (torch.bool if name == "clipped" else cd), name
        assert x.device == v.device, name
    assert grad.shape == v.shape and grad.dtype == v.dtype and grad.device == v.device


def check_vs_oracle(out, grad, o_out, o_grad, dtype):
    for name, k in (("loss", 0), ("policy", 1), ("kl", 2), ("ema_kl", 3), ("aux", 4)):
        check(out[k], o_out[name], RTOL[dtype], name)
    assert torch.equal(out[5].cpu(), o_out["clipped"]), "clipped"
    check(grad, o_grad, GRAD_RTOL[dtype], "grad")


def check_vs_contract(args, out, grad, gs, rtol, cast=to64):
    """Against rsm_fast.ops.decomposed_fp on the same inputs, in float64 (``cast=to64``) or in the
    kernels' own compute dtype (``cast=on_dev``); coef included, which the oracle does not form."""
    a = tuple(cast(x) for x in args)
    ref = D.fp_fwd(*a)
    for name, o, r in zip(OUT_NAMES, out, ref):
        if name == "clipped":
            assert torch.equal(o.cpu(), r.cpu()), name
        else:
            check(o, r, rtol, name)
    gref = D.fp_bwd(*(cast(g) for g in gs), *bwd_args(a, ref[6]))
    check(grad, gref, rtol, "grad vs decomposed_fp")


# ---------------------------------------------------------------------------------------------
# Accuracy
# ---------------------------------------------------------------------------------------------
def test_constants_match_the_contract():
    assert (fp_loss.NSUMS, fp_loss.NFT_WEIGHT_FLOOR, fp_loss.AWM_MSE_EPS, fp_loss.HUBER_OFFSET) == \
        (D.NSUMS, D.NFT_WEIGHT_FLOOR, D.AWM_MSE_EPS, D.HUBER_OFFSET)
    assert fp_loss.N_WEIGHTINGS == len(D.WEIGHTINGS)


@pytest.mark.parametrize("kind,opts", CONFIGS, ids=CONFIG_IDS)
def test_fp64_matches_oracle(kind, opts):
    """Every configuration: forward outputs and the gradient equal the float64 oracle to rounding."""
    seed = seed_of("fp64", kind, sorted(opts.items()))
    c = make_fp_case(kind, seed)
    args, out, grad, gs, o_out, o_grad = run(c, kind, opts, F64, seed)
    check_shapes(args, out, grad)
    check_vs_oracle(out, grad, o_out, o_grad, F64)
    check_vs_contract(args, out, grad, gs, RTOL[F64])
    if kind == "awm" and not opts.get("off_policy"):
        assert (out[4][:, 1] == 1).all()           # on-policy: the ratio is exactly 1


@pytest.mark.parametrize("dtype", [F64, F32], ids=["fp64", "fp32"])
def test_nft_weight_floor(dtype):
    """Rows on the target (v = v_old = eps - x0, so x0_hat = x0 to rounding): NFT's adaptive
    weights sit on their 1e-5 floor, which the random cases never reach. There the gradient is
    1e5 times the rounding residue of x0_hat - x0, so fp32 is held to the fp32 contract only."""
    kind, opts = CONFIGS[0]
    seed = seed_of("floor", str(dtype))
    c = make_fp_case(kind, seed, dtype=dtype)
    for r in (3, 4):
        c["v_old"][r] = c["eps"][r] - c["x0"][r]
        c["v"][r] = c["v_old"][r]
    args, out, grad, gs, o_out, o_grad = run(c, kind, opts, dtype, seed)
    floor = torch.tensor(D.NFT_WEIGHT_FLOOR, dtype=out[4].dtype)
    assert (out[4][3:5, :2].cpu() == floor).all() and (out[4][5:, :2].cpu() > floor).all()
    if dtype == F64:
        check_vs_oracle(out, grad, o_out, o_grad, dtype)
    check_vs_contract(args, out, grad, gs, RTOL[dtype], cast=to64 if dtype == F64 else on_dev)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")     # exp -> inf, on purpose
@pytest.mark.parametrize("dtype", [F64, F32], ids=["fp64", "fp32"])
def test_awm_overflowing_ratio(dtype):
    """A ratio that overflows to inf: a row with A' = 0 keeps policy 0 (the contract's where, not
    -0 * inf = nan), a row with A' > 0 is clipped to -A' (1 + c). The oracle (the release) gives
    nan on the first, so this is against decomposed_fp only."""
    kind, opts = CONFIGS[7]
    cd = F64 if dtype == F64 else F32
    c = make_fp_case(kind, seed_of("inf", str(dtype)), dtype=dtype)
    o, ra = split(opts)
    rows = oracle(c, kind, **o)[2]
    rows["logp_old"] = rows["logp_old"].clone()
    rows["logp_old"][[0, 2]] -= 1e4                 # rows 0 and 2: A' = 7.5 and 0 (make_fp_case)
    args = tuple(on_dev(a) for a in raw_args(c, kind, rows, **ra, cd=cd))
    out = fp_loss.fp_fwd(*args)
    ref = D.fp_fwd(*(to64(a) if dtype == F64 else a for a in args))
    assert torch.isinf(out[4][[0, 2], 1]).all() and out[1][2] == 0 and out[5][0] and not out[5][2]
    assert torch.equal(out[6][[0, 2], 0].cpu(), torch.zeros(2, dtype=cd))      # no 0 * inf in the backward
    for name, got, want in zip(OUT_NAMES[:5], out, ref):
        torch.testing.assert_close(got.cpu().double(), want.cpu().double(), rtol=RTOL[dtype], atol=0.0,
                                   equal_nan=True, msg=lambda m: f"{name}: {m}")
    assert torch.equal(out[5].cpu(), ref[5].cpu())


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind,opts", CONFIGS, ids=CONFIG_IDS)
def test_low_precision_matches_oracle(kind, opts, dtype):
    """fp32 / bf16 latents (fp32 arithmetic) against the oracle on the rounded latents, and against
    decomposed_fp computing in the same fp32 on the same inputs."""
    seed = seed_of("lowp", kind, sorted(opts.items()), str(dtype))
    c = make_fp_case(kind, seed, dtype=dtype)
    args, out, grad, gs, o_out, o_grad = run(c, kind, opts, dtype, seed)
    check_shapes(args, out, grad)
    check_vs_oracle(out, grad, o_out, o_grad, dtype)
    check_vs_contract(args, out, grad, gs, RTOL[dtype], cast=on_dev)


@pytest.mark.parametrize("dtype", [F64, F32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("i", [0, 2, 7])
def test_sum_reduction(i, dtype):
    """mean=False (norm = 1) against decomposed_fp: NFT's adaptive weights and AWM's mse then see
    the row sums, which the oracle (mean-only) does not cover. fp32 against the contract in fp32
    (see GRAD_RTOL)."""
    kind, opts = CONFIGS[i]
    seed = seed_of("sum", i, str(dtype))
    c = make_fp_case(kind, seed, dtype=dtype)
    args, out, grad, gs, _, _ = run(c, kind, opts, dtype, seed, mean=False)
    check_shapes(args, out, grad)
    check_vs_contract(args, out, grad, gs, RTOL[dtype], cast=to64 if dtype == F64 else on_dev)


@pytest.mark.parametrize("i", [0, 7])
def test_single_row(i):
    kind, opts = CONFIGS[i]
    seed = seed_of("one", i)
    c = slice_case(make_fp_case(kind, seed), 1)
    args, out, grad, gs, o_out, o_grad = run(c, kind, opts, F64, seed)
    check_shapes(args, out, grad)
    check_vs_oracle(out, grad, o_out, o_grad, F64)


@pytest.mark.parametrize("i", [2, 6])
def test_two_epilogue_programs(i):
    """B > EPI_BLOCK_B: the epilogue's row mask and a second program."""
    kind, opts = CONFIGS[i]
    seed = seed_of("wide", i)
    c = make_fp_case(kind, seed, B=_launch.EPI_BLOCK_B + 5)
    args, out, grad, gs, o_out, o_grad = run(c, kind, opts, F64, seed)
    check_vs_oracle(out, grad, o_out, o_grad, F64)


MANY_CHUNKS = (5, 9, 61)     # 2745 elements: 43 chunks of one 64-element tile, a 57-element tail


@pytest.mark.parametrize("i", [2, 7])
def test_many_chunks_odd_rows(monkeypatch, i):
    """Rows split into more chunks than one epilogue partial tile (EPI_BLOCK_C) holds, with an odd
    row length, so both the epilogue's chunk loop and the masked tail are exercised."""
    monkeypatch.setattr(_launch, "INTERP_PROGRAMS", 80)
    kind, opts = CONFIGS[i]
    seed = seed_of("chunks", i)
    c = slice_case(make_fp_case(kind, seed, latent=MANY_CHUNKS), 2)
    if DEV == "cpu":
        assert _launch.plan(c["v"]).n_chunks > _launch.EPI_BLOCK_C
    args, out, grad, gs, o_out, o_grad = run(c, kind, opts, F64, seed)
    check_vs_oracle(out, grad, o_out, o_grad, F64)


@pytest.mark.parametrize("i", [0, 5])
def test_bitwise_determinism(monkeypatch, i):
    """Two identical calls give identical bits (fixed-order partial sums, no atomics)."""
    monkeypatch.setattr(_launch, "INTERP_PROGRAMS", 80)
    kind, opts = CONFIGS[i]
    seed = seed_of("det", i)
    c = slice_case(make_fp_case(kind, seed, latent=MANY_CHUNKS, dtype=F32), 2)
    first, second = run(c, kind, opts, F32, seed), run(c, kind, opts, F32, seed)
    for a, b in zip([*first[1], first[2]], [*second[1], second[2]]):
        assert torch.equal(a, b)
    check_vs_oracle(*first[1:3], *first[4:], F32)


def test_empty_batch():
    kind, opts = CONFIGS[7]
    c = slice_case(make_fp_case(kind, 0), 0)
    o, ra = split(opts)
    rows = oracle(c, kind, **o)[2]
    args = tuple(on_dev(a) for a in raw_args(c, kind, rows, **ra))
    out = fp_loss.fp_fwd(*args)
    zeros = tuple(on_dev(torch.zeros(0, dtype=F64)) for _ in range(4))
    grad = fp_loss.fp_bwd(*zeros, *bwd_args(args, out[6]))
    check_shapes(args, out, grad)


# ---------------------------------------------------------------------------------------------
# Boundary checks
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small():
    """A float32 AWM off-policy case: fp_fwd's args and fp_bwd's, as lists to edit."""
    kind, opts = CONFIGS[7]
    c = make_fp_case(kind, 11, B=4, dtype=F32)
    o, ra = split(opts)
    rows = oracle(c, kind, **o)[2]
    args = [on_dev(a) for a in raw_args(c, kind, rows, **ra, cd=F32)]
    gs = [on_dev(torch.ones(4)) for _ in range(4)]
    coef = on_dev(torch.zeros(4, 2))
    return args, [*gs, *bwd_args(args, coef)]


FWD_POS = {"t": 6, "w": 7, "logp_old": 8, "kl_coef": 9, "ema_coef": 10}
BWD_POS = {"g_loss": 0, "g_policy": 1, "g_kl": 2, "g_ema": 3, "t": 10, "kl_coef": 11, "ema_coef": 12, "coef": 13}


def strided(x):
    return torch.stack([x, x], -1)[..., 0]          # same values and shape, stride 2


BAD_ROWS = {
    "strided": strided,
    "dtype": lambda x: x.double(),
    "column": lambda x: x[:, None],
    "short": lambda x: x[1:],
}


@pytest.mark.parametrize("bad", list(BAD_ROWS))
@pytest.mark.parametrize("name", list(FWD_POS))
def test_fwd_rejects_bad_row_inputs(small, name, bad):
    args = list(small[0])
    args[FWD_POS[name]] = BAD_ROWS[bad](args[FWD_POS[name]])
    with pytest.raises(ValueError, match=f"^{name} must be"):
        fp_loss.fp_fwd(*args)


@pytest.mark.parametrize("bad", ["strided", "dtype", "column"])
@pytest.mark.parametrize("name", list(BWD_POS))
def test_bwd_rejects_bad_row_inputs(small, name, bad):
    args = list(small[1])
    x = args[BWD_POS[name]]
    if name == "coef":    # [B, 2]: a transposed copy, a double, a single column
        x = {"strided": x.t().contiguous().t(), "dtype": x.double(), "column": x[:, :1]}[bad]
    else:
        x = BAD_ROWS[bad](x)
    args[BWD_POS[name]] = x
    with pytest.raises(ValueError, match=f"^{name} must be"):
        fp_loss.fp_bwd(*args)


def test_the_named_cases_and_modes_raise(small):
    fwd, bwd = small
    B = fwd[0].shape[0]
    bad_w = fwd.copy()
    bad_w[7] = torch.arange(2.0 * B, device=DEV)[::2]                      # a strided w
    bad_t = fwd.copy()
    bad_t[6] = fwd[6].to(BF16)                                             # a wrong-dtype t
    bad_k = fwd.copy()
    bad_k[9] = fwd[9][:, None].contiguous()                                # a [B, 1] kl_coef
    bad_c = bwd.copy()
    bad_c[13] = torch.zeros(B, 3, device=DEV)                              # a [B, 3] coef
    for f, args, name in [(fp_loss.fp_fwd, bad_w, "w"), (fp_loss.fp_fwd, bad_t, "t"),
                          (fp_loss.fp_fwd, bad_k, "kl_coef"), (fp_loss.fp_bwd, bad_c, "coef")]:
        with pytest.raises(ValueError, match=f"^{name} must be"):
            f(*args)
    for pos, value, what in [(11, 2, "kind"), (14, 5, "weighting"), (14, -1, "weighting")]:
        args = fwd.copy()
        args[pos] = value
        with pytest.raises(ValueError, match=what):
            fp_loss.fp_fwd(*args)
    nft = fwd.copy()
    nft[11] = 0                                                            # NFT without v_old
    with pytest.raises(ValueError, match="v_old"):
        fp_loss.fp_fwd(*nft)
    with pytest.raises(ValueError, match="v_old"):
        fp_loss.fp_bwd(*bwd[:14], 0, *bwd[15:])
    with pytest.raises(ValueError):                                        # latents: check_latents
        fp_loss.fp_fwd(fwd[0], None, fwd[2].double(), *fwd[3:])


# ---------------------------------------------------------------------------------------------
# Real GPU, larger shapes
# ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [BF16, F32, F64], ids=["bf16", "fp32", "fp64"])
@pytest.mark.parametrize("i", [0, 7, 8])
def test_gpu_large(i, dtype):
    kind, opts = CONFIGS[i]
    seed = seed_of("gpu", i, str(dtype))
    c = make_fp_case(kind, seed, B=12, latent=(16, 64, 64), dtype=dtype)
    first, second = run(c, kind, opts, dtype, seed), run(c, kind, opts, dtype, seed)
    check_vs_oracle(*first[1:3], *first[4:], dtype)
    for a, b in zip([*first[1], first[2]], [*second[1], second[2]]):
        assert torch.equal(a, b)
