"""The Triton kernels (rsm_fast.kernels) against the float64 reference: the ZO loss (forward and
backward) for every form x reweight, with and without the KL term, kl dt weight on/off, mean and
sum; the score-regression loss; the fused sampler step. fp64 runs are checked against the oracle of
rsm_fast.losses (and autograd), fp32/bf16/fp16 runs against rsm_fast.ops.decomposed in float64 on
the same (rounded) inputs. Row lengths are multiples of the tile, not, and shorter than one tile.

Without CUDA the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set before Triton is
imported), which is slow: the shapes here are small and the cases a sample of the product."""
from __future__ import annotations

import itertools
import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from rsm_fast.kernels import _launch, sampler_step, score_loss, zo_loss  # noqa: E402
from rsm_fast.losses import score_regression_loss  # noqa: E402
from rsm_fast.ops import decomposed as D  # noqa: E402
from opcases import decomposed_args, make_zo_case, zo_reference  # noqa: E402

if not torch.cuda.is_available() and not _launch.INTERPRET:
    pytest.skip("no CUDA device and Triton was imported without TRITON_INTERPRET=1", allow_module_level=True)

# The interpreter's tensor-bound loops convert 1-element arrays to int (a numpy deprecation).
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16
DEV = "cuda" if torch.cuda.is_available() else "cpu"
RTOL = {F64: 1e-10, F32: 1e-5, BF16: 1e-2, F16: 1e-2}
# Row shapes (interpreter tile: 64): shorter than a tile, a multiple of it, neither (multi-chunk).
SHAPES = [(1, 3, 7), (4, 4, 8, 8), (7, 3, 5, 13)]
# (with_kl, kl_dt_weight, mean) configurations, cycled through the cases.
KL_CONFIGS = [(True, False, True), (True, True, False), (False, False, True), (False, True, False)]


def seed_of(*key) -> int:
    return zlib.crc32(repr(key).encode())


def to64(x):
    """A float tensor as float64 on the CPU (the reference's inputs); other tensors on the CPU."""
    if not isinstance(x, torch.Tensor):
        return x
    return x.detach().cpu().double() if x.is_floating_point() else x.cpu()


def on_dev(x):
    return x.to(DEV) if isinstance(x, torch.Tensor) else x


def check(got, want, rtol, what=""):
    """|got - want| <= rtol (|want| + max|want|), elementwise, in float64."""
    got, want = got.detach().cpu().double(), want.detach().cpu().double()
    scale = want.abs().max().item() if want.numel() else 0.0
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * scale, msg=lambda m: f"{what}: {m}")


def zo_case(family, seed, B, latent, dtype):
    cd = F64 if dtype == F64 else F32
    return make_zo_case(family, seed, B=B, latent=latent, dtype=dtype), cd


def run_zo(c, cd, form, reweight, with_kl, kl_dt, mean, seed, eps=None):
    """Kernel forward + backward and the float64 decomposition on the same (rounded) inputs."""
    eps = (0.02 if form == 1 else 1e-3) if eps is None else eps
    args = [on_dev(a) for a in decomposed_args(c, with_kl, cd)]
    args64 = [to64(a) for a in args]
    modes = (form, reweight, eps, 2.25, kl_dt, mean)
    out = zo_loss.zo_fwd(*args, *modes)
    ref = D.zo_fwd(*args64, *modes)
    g = torch.Generator().manual_seed(seed + 1)
    gs = [torch.randn(args[0].shape[0], generator=g, dtype=F64).to(cd) for _ in range(3)]
    lat = [args[0], args[1], args[2], args[3]]
    grad = zo_loss.zo_bwd(*[on_dev(t) for t in gs], *lat, args[5], out[6], out[7], out[8], mean)
    gref = D.zo_bwd(*[to64(t) for t in gs], *[to64(t) for t in lat], args64[5], ref[6], ref[7], ref[8], mean)
    return args, out, ref, grad, gref


def check_zo(args, out, ref, grad, gref, cd, rtol):
    names = ("loss", "policy", "kl", "clipped", "log_ratio", "lin", "d_lin", "d_quad", "d_kl")
    B = args[0].shape[0]
    for name, o, r in zip(names, out, ref):
        assert o.shape == (B,) and o.device.type == args[0].device.type
        if name == "clipped":
            assert o.dtype == torch.bool and torch.equal(o.cpu(), r.cpu()), name
        else:
            assert o.dtype == cd, name
            check(o, r, rtol, name)
    assert grad.dtype == args[0].dtype and grad.shape == args[0].shape
    check(grad, gref, rtol, "grad")


# ---------------------------------------------------------------------------------------------
# ZO loss
# ---------------------------------------------------------------------------------------------
FORM_REWEIGHT = list(itertools.product(range(len(D.FORMS)), range(len(D.REWEIGHTS))))


@pytest.mark.parametrize("i,form,reweight", [(i, f, r) for i, (f, r) in enumerate(FORM_REWEIGHT)])
def test_zo_fp64_matches_oracle(i, form, reweight):
    """fp64 kernels against rsm_fast.losses.zo_row_loss and its autograd gradient, every mode."""
    with_kl, kl_dt, mean = KL_CONFIGS[i % len(KL_CONFIGS)]
    family = ("ddim", "flow")[i % 2]
    seed = seed_of("oracle", form, reweight)
    c, cd = zo_case(family, seed, 6, (3, 5, 7), F64)
    args, out, ref, grad, gref = run_zo(c, cd, form, reweight, with_kl, kl_dt, mean, seed)
    check_zo(args, out, ref, grad, gref, cd, 1e-10)
    eps = 0.02 if form == 1 else 1e-3
    oracle, _, want = zo_reference(c, D.FORMS[form], D.REWEIGHTS[reweight], eps, with_kl, kl_dt, mean, seed)
    for name, k, o in [("loss", 0, oracle.loss), ("policy", 1, oracle.policy), ("kl", 2, oracle.kl),
                       ("log_ratio", 4, oracle.log_ratio), ("lin", 5, oracle.lin)]:
        check(out[k], o, 1e-10, name)
    assert torch.equal(out[3].cpu(), oracle.clipped)
    check(grad, want, 1e-9, "grad vs autograd")


LOWP_CASES = ([(F32, f, r) for f, r in FORM_REWEIGHT]
              + [(dt, (r + k) % 3, r) for k, dt in enumerate((BF16, F16)) for r in range(len(D.REWEIGHTS))])


@pytest.mark.parametrize("i,dtype,form,reweight", [(i, *c) for i, c in enumerate(LOWP_CASES)])
def test_zo_low_precision_matches_float64(i, dtype, form, reweight):
    """fp32 / bf16 / fp16 latents against float64 on the rounded inputs, all three row shapes."""
    with_kl, kl_dt, mean = KL_CONFIGS[(i + 1) % len(KL_CONFIGS)]
    shape = SHAPES[i % len(SHAPES)]
    seed = seed_of("lowp", str(dtype), form, reweight)
    c, cd = zo_case(("flow", "ddim")[i % 2], seed, shape[0], shape[1:], dtype)
    check_zo(*run_zo(c, cd, form, reweight, with_kl, kl_dt, mean, seed), cd, RTOL[dtype])


@pytest.mark.parametrize("form", [1, 2])
def test_zo_cases_cover_clipped_rows_and_both_signs(form):
    """A bigger batch (two epilogue programs) with clipped and unclipped rows for both signs of A."""
    seed = 1      # a case with every regime in both forms (checked below)
    c, cd = zo_case("flow", seed, 40, (3, 5, 7), F32)
    args, out, ref, grad, gref = run_zo(c, cd, form, 0, True, False, True, seed, eps=2e-3)
    check_zo(args, out, ref, grad, gref, cd, RTOL[F32])
    clipped, st, A = out[3].cpu(), c["co"].stochastic, c["adv"]
    assert (clipped & (A > 0)).any() and (clipped & (A < 0)).any()
    assert (~clipped & st & (A > 0)).any() and (~clipped & st & (A < 0)).any()


# ---------------------------------------------------------------------------------------------
# Score regression and the sampler step
# ---------------------------------------------------------------------------------------------
SCORE_CASES = [(F64, True, True), (F64, False, False), (F32, True, False), (F32, False, True),
               (BF16, True, True), (F16, True, False)]


@pytest.mark.parametrize("i,dtype,with_old,mean", [(i, *c) for i, c in enumerate(SCORE_CASES)])
def test_score_fwd_bwd(i, dtype, with_old, mean):
    shape = SHAPES[i % len(SHAPES)]
    B, cd = shape[0], (F64 if dtype == F64 else F32)
    g = torch.Generator().manual_seed(seed_of("score", i))
    s, s_ref, psi, s_old = (torch.randn(*shape, generator=g, dtype=F64).to(dtype) for _ in range(4))
    c1, gamma, c2, gl = (torch.rand(B, generator=g, dtype=F64).to(cd) + 0.1 for _ in range(4))
    so = s_old if with_old else None
    got = score_loss.score_fwd(*map(on_dev, (s, s_ref, psi, so, c1, gamma, c2)), mean)
    grad = score_loss.score_bwd(*map(on_dev, (gl, s, s_ref, psi, so, c1, gamma, c2)), mean)
    assert got.dtype == cd and got.shape == (B,) and grad.dtype == dtype and grad.shape == s.shape
    sv = to64(s).requires_grad_(True)
    if dtype == F64:   # the oracle and its autograd gradient
        want = score_regression_loss(sv, s_ref, so, psi, C1=c1, gamma=gamma, C2=c2 if with_old else 0.0,
                                     reduce="mean" if mean else "sum")
    else:
        want = D.score_fwd(sv, *map(to64, (s_ref, psi, so, c1, gamma, c2)), mean)
    gwant = torch.autograd.grad((to64(gl) * want).sum(), sv)[0]
    check(got, want, RTOL[dtype], "score loss")
    check(grad, gwant, RTOL[dtype] * (10 if dtype == F64 else 1), "score grad")


STEP_CASES = [(F64, True), (F32, False), (BF16, True), (F16, False)]


@pytest.mark.parametrize("i,dtype,mean", [(i, *c) for i, c in enumerate(STEP_CASES)])
def test_step_fwd(i, dtype, mean):
    shape = SHAPES[(i + 1) % len(SHAPES)]
    c = make_zo_case(("ddim", "flow")[i % 2], seed_of("step", i), B=shape[0], latent=shape[1:], dtype=dtype)
    co, cd = c["co"], (F64 if dtype == F64 else F32)
    x = torch.randn(c["z"].shape, generator=torch.Generator().manual_seed(i), dtype=F64).to(dtype)
    stoch = co.stochastic.clone()
    stoch[0] = not bool(stoch[0]) if shape[0] > 1 else stoch[0]      # ODE and SDE rows in every batch
    rows = [co.c_x.to(cd), co.c_f.to(cd), co.sigma.to(cd), stoch]
    xn, lp = sampler_step.step_fwd(*map(on_dev, (x, c["f_old"], c["z"], *rows)), mean)
    xw, lw = D.step_fwd(*map(to64, (x, c["f_old"], c["z"], *rows)), mean)
    assert xn.dtype == dtype and xn.shape == x.shape and lp.dtype == cd and lp.shape == (shape[0],)
    check(xn, xw, RTOL[dtype], "x_next")
    check(lp, lw, RTOL[dtype], "log_prob")
    assert (lp.cpu()[~stoch] == 0).all()


def test_step_all_ode_rows_skip_the_noise():
    B, shape = 3, (3, 4, 5, 6)
    g = torch.Generator().manual_seed(3)
    x, f = (torch.randn(*shape, generator=g) for _ in range(2))
    z = torch.full(shape, float("nan"))        # never read on ODE rows
    c_x, c_f, sigma = (torch.rand(B, generator=g) + 0.1 for _ in range(3))
    xn, lp = sampler_step.step_fwd(*map(on_dev, (x, f, z, c_x, c_f, sigma, torch.zeros(B, dtype=torch.bool))), True)
    check(xn, to64(c_x[:, None, None, None] * x + c_f[:, None, None, None] * f), RTOL[F32], "x_next")
    assert (lp == 0).all()


# ---------------------------------------------------------------------------------------------
# Determinism, planning and contract checks
# ---------------------------------------------------------------------------------------------
def test_determinism_and_many_chunks(monkeypatch):
    """Two calls are bitwise equal; a row split into > EPI_BLOCK_C chunks (under the interpreter)
    exercises the epilogue's loop over partial tiles."""
    monkeypatch.setattr(_launch, "INTERP_PROGRAMS", 40)
    seed = seed_of("det")
    c, cd = zo_case("flow", seed, 1, (4, 16, 40), BF16)
    p = _launch.plan(on_dev(c["f_theta"]))
    if DEV == "cpu":
        assert p.n_chunks == 40 > _launch.EPI_BLOCK_C
    first = run_zo(c, cd, 2, 6, True, True, True, seed)
    second = run_zo(c, cd, 2, 6, True, True, True, seed)
    check_zo(*first, cd, RTOL[BF16])
    for a, b in zip([*first[1], first[3]], [*second[1], second[3]]):
        assert torch.equal(a, b)
    args = [on_dev(t) for t in (c["f_theta"], c["f_old"], c["z"])]
    rows = [on_dev(torch.rand(1, dtype=cd) + 0.5) for _ in range(3)]
    st = on_dev(torch.ones(1, dtype=torch.bool))
    s1 = sampler_step.step_fwd(*args, *rows, st, False)
    s2 = sampler_step.step_fwd(*args, *rows, st, False)
    assert torch.equal(s1[0], s2[0]) and torch.equal(s1[1], s2[1])
    check(s1[1], D.step_fwd(*map(to64, (*args, *rows, st)), False)[1], RTOL[BF16], "log_prob")


@pytest.mark.parametrize("block,target", [(64, 12), (1024, 4 * 132), (512, 4 * 78)])
def test_plan_chunks_cover_rows_in_whole_tiles(block, target):
    for B, n in itertools.product([1, 3, 12, 48], [1, 21, block - 1, block, block + 1, 7 * block + 5, 262144]):
        n_chunks, chunk_len = _launch.plan_chunks(B, n, block, target)
        assert chunk_len % block == 0 and chunk_len > 0
        assert (n_chunks - 1) * chunk_len < n <= n_chunks * chunk_len
        assert B * n_chunks >= min(target, B * -(-n // block))


def test_contract_checks():
    a = on_dev(torch.randn(2, 3, 4))
    with pytest.raises(ValueError):
        zo_loss.zo_bwd(*[on_dev(torch.zeros(2))] * 3, a.transpose(1, 2), a.transpose(1, 2), a.transpose(1, 2), None,
                       *[on_dev(torch.zeros(2))] * 4, True)
    with pytest.raises(ValueError):
        score_loss.score_fwd(a, a.double(), a, None, *[on_dev(torch.zeros(2))] * 3, True)


# ---------------------------------------------------------------------------------------------
# Real GPU, larger shapes
# ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
class TestGPU:
    def test_plan_fills_the_device(self):
        sms = _launch.sm_count(torch.cuda.current_device())
        for B in (1, 12, 48):
            p = _launch.plan(torch.empty(B, 16, 128, 128, device="cuda", dtype=BF16))
            assert B * p.n_chunks >= min(2 * sms, B * 256)

    @pytest.mark.parametrize("dtype,form,reweight,with_kl", [(BF16, 2, 0, True), (BF16, 1, 3, True),
                                                             (F16, 0, 6, False), (F32, 2, 5, True)])
    def test_zo_large(self, dtype, form, reweight, with_kl):
        seed = seed_of("gpu", str(dtype), form, reweight)
        c, cd = zo_case("flow", seed, 12, (16, 64, 64), dtype)
        first = run_zo(c, cd, form, reweight, with_kl, True, True, seed)
        check_zo(*first, cd, RTOL[dtype])
        second = run_zo(c, cd, form, reweight, with_kl, True, True, seed)
        for a, b in zip([*first[1], first[3]], [*second[1], second[3]]):
            assert torch.equal(a, b)

    @pytest.mark.parametrize("dtype", [BF16, F32])
    def test_score_and_step_large(self, dtype):
        g = torch.Generator().manual_seed(5)
        B, shape, cd = 12, (12, 16, 64, 64), F32
        s, s_ref, psi, s_old = (torch.randn(*shape, generator=g).to(dtype) for _ in range(4))
        c1, gamma, c2, gl = (torch.rand(B, generator=g) + 0.1 for _ in range(4))
        got = score_loss.score_fwd(*map(on_dev, (s, s_ref, psi, s_old, c1, gamma, c2)), True)
        check(got, D.score_fwd(*map(to64, (s, s_ref, psi, s_old, c1, gamma, c2)), True), RTOL[dtype], "score")
        grad = score_loss.score_bwd(*map(on_dev, (gl, s, s_ref, psi, s_old, c1, gamma, c2)), True)
        check(grad, D.score_bwd(*map(to64, (gl, s, s_ref, psi, s_old, c1, gamma, c2)), True), RTOL[dtype], "grad")
        st = torch.rand(B, generator=g) > 0.3
        xn, lp = sampler_step.step_fwd(*map(on_dev, (s, s_ref, psi, c1, gamma, c2, st)), False)
        xw, lw = D.step_fwd(*map(to64, (s, s_ref, psi, c1, gamma, c2, st)), False)
        check(xn, xw, RTOL[dtype], "x_next")
        check(lp, lw, RTOL[dtype], "log_prob")
