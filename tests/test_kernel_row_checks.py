"""Checks at the kernel boundary (issue 21, item 3): every per-row input of every backend function
(``zo_fwd``, ``zo_bwd``, ``score_fwd``, ``score_bwd``, ``step_fwd``, ``fp_fwd``, ``fp_bwd``, ``noise``,
``noise_words``) is checked for shape, dtype, device and contiguity, the same way on the C++ backend
(``csrc/rsm_ops_detail.h`` ``check_row``, ``rsm_noise.cpp`` ``check_stream``) and on the Triton one
(``rsm_fast.kernels._launch.check_rows``; under ``TRITON_INTERPRET=1`` on CPU tensors, on CUDA
tensors where there is a GPU).

For each op and per-row argument: a strided tensor (``x.repeat_interleave(2)[::2]``), a stride-0
expanded scalar, a short / long / column / 0-d tensor, a wrong dtype and a tensor on another device
must raise a ``RuntimeError`` naming the argument on both backends, with the same text there (up
to the op prefix / suffix, "have shape" / "be of shape" and the device wording). The other device
is ``meta``: without a GPU there is no second real device, so a CPU row beside CUDA latents is
tested only where CUDA is (``test_cpu_row_beside_cuda_latents``); cuda:1 beside cuda:0 is not tested
(the check is the same ``x.device != latents' device``).
Valid calls (rows with a storage offset included) still match the plain-torch backend, and the
public API (``rsm_fast.ops.api``), which accepts strided / expanded / 0-d rows, still does.
"""
from __future__ import annotations

import os
import re

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from rsm_fast.ops import backends  # noqa: E402
from opcases import make_zo_case  # noqa: E402

# The interpreter's tensor-bound loops convert 1-element arrays to int (a numpy deprecation).
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

F32, F64 = torch.float32, torch.float64
B = 5
LATENT = (B, 3, 4)


# ---------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------
def _cpp():
    mod = backends._cpp()
    if mod is None:
        pytest.skip("C++ extension unavailable (no compiler or RSM_FAST_NO_CPP=1)")
    return mod


def _triton():
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no CUDA device and TRITON_INTERPRET is not 1")
    try:
        return backends._triton()
    except Exception as e:  # noqa: BLE001 - kernels absent or triton missing
        pytest.skip(f"Triton kernels unavailable: {e}")


GET = {"cpp": _cpp, "triton": _triton}
# Where each backend's inputs live: the Triton kernels run on CUDA when there is one.
DEV = {"cpp": "cpu", "triton": "cuda" if torch.cuda.is_available() else "cpu"}


def _to(args, dev):
    return [a.to(dev) if isinstance(a, torch.Tensor) else a for a in args]


def _cpu(out):
    return tuple(o.cpu() for o in out) if isinstance(out, (tuple, list)) else out.cpu()


@pytest.fixture(params=["cpp", "triton"])
def be(request):
    return GET[request.param]()


# ---------------------------------------------------------------------------------------------
# Cases: (backend function name, positional args, {per-row argument: position})
# ---------------------------------------------------------------------------------------------
def _g(seed):
    return torch.Generator().manual_seed(seed)


def _rows(g, dtype, **spec):
    """Per-row [B] tensors: spec ``name=(lo, hi)`` draws uniform values in [lo, hi)."""
    return {k: lo + (hi - lo) * torch.rand(B, generator=g, dtype=F64).to(dtype) for k, (lo, hi) in spec.items()}


def _latents(g, k, dtype):
    return [torch.randn(LATENT, generator=g, dtype=F64).to(dtype) for _ in range(k)]


STOCH = torch.tensor([True, True, False, True, True])


def zo_fwd_case(dtype=F32, form=2, reweight=6):
    g, cd = _g(1), F64 if dtype == F64 else F32
    ft, fo, z, fr = _latents(g, 4, dtype)
    r = _rows(g, cd, adv=(-1, 1), omega=(0.5, 1.5), sigma=(0.2, 0.8), dt=(0.05, 0.15))
    r2 = _rows(g, cd, row_weight=(0.5, 1.5), kl_coef=(0, 0.1), omega_train=(0.5, 1.5))
    args = [ft, fo, z, fr, r["adv"], r["omega"], r["sigma"], r["dt"], STOCH.clone(), r2["row_weight"],
            r2["kl_coef"], r2["omega_train"], form, reweight, 1e-3, 2.25, True, True]
    names = ["adv", "omega", "sigma", "dt", "stochastic", "row_weight", "kl_coef", "omega_train"]
    return "zo_fwd", args, {n: 4 + i for i, n in enumerate(names)}


def zo_bwd_case(dtype=F32):
    g, cd = _g(2), F64 if dtype == F64 else F32
    ft, fo, z, fr = _latents(g, 4, dtype)
    r = _rows(g, cd, g_loss=(-1, 1), g_policy=(-1, 1), g_kl=(-1, 1), omega=(0.5, 1.5), d_lin=(-1, 1),
              d_quad=(-1, 1), d_kl=(0, 1))
    args = [r["g_loss"], r["g_policy"], r["g_kl"], ft, fo, z, fr, r["omega"], r["d_lin"], r["d_quad"], r["d_kl"], True]
    return "zo_bwd", args, {"g_loss": 0, "g_policy": 1, "g_kl": 2, "omega": 7, "d_lin": 8, "d_quad": 9, "d_kl": 10}


def score_fwd_case(dtype=F32):
    g, cd = _g(3), F64 if dtype == F64 else F32
    s, sr, psi, so = _latents(g, 4, dtype)
    r = _rows(g, cd, c1=(0.5, 1.5), gamma=(-1, 1), c2=(0, 1))
    return "score_fwd", [s, sr, psi, so, r["c1"], r["gamma"], r["c2"], True], {"c1": 4, "gamma": 5, "c2": 6}


def score_bwd_case(dtype=F32):
    g, cd = _g(4), F64 if dtype == F64 else F32
    s, sr, psi, so = _latents(g, 4, dtype)
    r = _rows(g, cd, g_loss=(-1, 1), c1=(0.5, 1.5), gamma=(-1, 1), c2=(0, 1))
    args = [r["g_loss"], s, sr, psi, so, r["c1"], r["gamma"], r["c2"], False]
    return "score_bwd", args, {"g_loss": 0, "c1": 5, "gamma": 6, "c2": 7}


def step_fwd_case(dtype=F32):
    g, cd = _g(5), F64 if dtype == F64 else F32
    x, f, z = _latents(g, 3, dtype)
    r = _rows(g, cd, c_x=(0.5, 1.5), c_f=(-1, 1), sigma=(0.1, 0.9))
    args = [x, f, z, r["c_x"], r["c_f"], r["sigma"], STOCH.clone(), True]
    return "step_fwd", args, {"c_x": 3, "c_f": 4, "sigma": 5, "stochastic": 6}


def fp_fwd_case(dtype=F32):
    """AWM (kind 1), off-policy (logp_old present), with both KL terms: every per-row input is read."""
    g, cd = _g(6), F64 if dtype == F64 else F32
    v, eps, x0, vr, ve = _latents(g, 5, dtype)
    r = _rows(g, cd, t=(0.1, 0.9), w=(-1, 1), logp_old=(-1.2, -0.8), kl_coef=(0, 0.1), ema_coef=(0, 0.1))
    args = [v, None, eps, x0, vr, ve, r["t"], r["w"], r["logp_old"], r["kl_coef"], r["ema_coef"], 1, 1.0, 1.0, 4,
            0.25, 0.2, True]
    return "fp_fwd", args, {"t": 6, "w": 7, "logp_old": 8, "kl_coef": 9, "ema_coef": 10}


def fp_fwd_nft_case(dtype=F32):
    """DiffusionNFT (kind 0), no logp_old: a valid call only (same per-row arguments as fp_fwd_case)."""
    g, cd = _g(7), F64 if dtype == F64 else F32
    v, vo, xt, x0, vr = _latents(g, 5, dtype)
    r = _rows(g, cd, t=(0.1, 0.9), w=(0, 1), kl_coef=(0, 0.1), ema_coef=(0, 0))
    args = [v, vo, xt, x0, vr, None, r["t"], r["w"], None, r["kl_coef"], r["ema_coef"], 0, 1.0, 5.0, 0, 1.0, 1.0,
            True]
    return "fp_fwd", args, {"t": 6, "w": 7, "kl_coef": 9, "ema_coef": 10}


def fp_bwd_case(dtype=F32):
    g, cd = _g(8), F64 if dtype == F64 else F32
    v, vo, xt, x0, vr, ve = _latents(g, 6, dtype)
    r = _rows(g, cd, g_loss=(-1, 1), g_policy=(-1, 1), g_kl=(-1, 1), g_ema=(-1, 1), t=(0.1, 0.9), kl_coef=(0, 0.1),
              ema_coef=(0, 0.1))
    coef = torch.randn(B, 2, generator=g, dtype=F64).to(cd)
    args = [r["g_loss"], r["g_policy"], r["g_kl"], r["g_ema"], v, vo, xt, x0, vr, ve, r["t"], r["kl_coef"],
            r["ema_coef"], coef, 0, 1.0, True]
    return "fp_bwd", args, {"g_loss": 0, "g_policy": 1, "g_kl": 2, "g_ema": 3, "t": 10, "kl_coef": 11,
                            "ema_coef": 12, "coef": 13}


def _keys():
    g = _g(9)
    keys = torch.randint(-2**62, 2**62, (B,), generator=g, dtype=torch.int64)
    steps = torch.randint(0, 2**32, (B,), generator=g, dtype=torch.int64)
    return keys, steps


def noise_case(dtype=F32):
    keys, steps = _keys()
    return "noise", [keys, steps, 0, 12345, 0, 10, dtype], {"row_keys": 0, "steps": 1}


def noise_words_case(dtype=F32):
    keys, steps = _keys()
    return "noise_words", [keys, steps, 0, 2**63 + 5, 3, 9], {"row_keys": 0, "steps": 1}


CASES = {"zo_fwd": zo_fwd_case, "zo_bwd": zo_bwd_case, "score_fwd": score_fwd_case, "score_bwd": score_bwd_case,
         "step_fwd": step_fwd_case, "fp_fwd": fp_fwd_case, "fp_bwd": fp_bwd_case, "noise": noise_case,
         "noise_words": noise_words_case}
OP_ARGS = [(op, name) for op, make in CASES.items() for name in make()[2]]


# ---------------------------------------------------------------------------------------------
# Bad per-row inputs
# ---------------------------------------------------------------------------------------------
def _scalar_like(x):
    one = {torch.bool: True, torch.int64: 3}.get(x.dtype, 1.0)
    return torch.tensor(one, dtype=x.dtype, device=x.device)


def _wrong_dtype(x):
    return {torch.bool: x.float(), torch.int64: x.int(), F32: x.double(), F64: x.float()}[x.dtype]


BAD = {
    "strided": lambda x: x.repeat_interleave(2, dim=0)[::2],              # a [::2] view of a 2B tensor
    "expanded": lambda x: _scalar_like(x).expand(x.shape),                # stride 0: one element read B times
    "short": lambda x: x[1:],
    "long": lambda x: torch.cat([x, x[:1]]),
    "column": lambda x: x[:, None] if x.dim() == 1 else x[:, :1],
    "scalar": lambda x: x[0] if x.dim() == 1 else x[0, 0],                # a 0-d tensor
    "dtype": _wrong_dtype,
    "device": lambda x: x.to("meta"),
}
SHAPE_KINDS = ("short", "long", "column", "scalar")


def _expected(name, bad, x, lead_dtype):
    """The regex both backends' messages must match for ``name`` spoiled by ``bad``."""
    n = re.escape(name)
    if bad == "device":
        # C++: "must be a CPU tensor"; Triton: "must be a tensor on cpu (the device of ...)" (rows) or
        # "must be a CUDA tensor (or a CPU tensor under TRITON_INTERPRET=1)" (row_keys); C++'s coef
        # message has no "got" part
        return rf"\b{n} must be a (CPU tensor|tensor on \S+ \(the device of \w+\)|CUDA tensor \(.*\))(, got meta|$)"
    if name in ("row_keys", "steps"):
        return rf"\b{n} must be a contiguous int64 tensor \[(R|{B})\], got \w+ \["
    if bad in ("strided", "expanded"):
        return rf"\b{n} must be contiguous"
    if bad in SHAPE_KINDS:
        return rf"\b{n} must (have|be of) shape \[{', '.join(map(str, x.shape))}\], got \["
    if x.dtype == torch.bool:
        return rf"\b{n} must be a bool tensor, got Float"
    cd = "Double" if lead_dtype == F64 else "Float"
    lat = {F64: "Double", F32: "Float", torch.bfloat16: "BFloat16", torch.float16: "Half"}[lead_dtype]
    return rf"\b{n} must be {cd} \(the compute dtype of {lat} latents\), got \w+"


def _spoil(op, name, bad, dtype=F32, dev="cpu"):
    fn, args, pos = CASES[op](dtype)
    args = _to(args, dev)
    x = args[pos[name]]
    if name == "row_keys" and bad in ("short", "long"):
        pytest.skip("row_keys fixes R: a shorter / longer one is a valid call (steps then mismatch, tested there)")
    args[pos[name]] = BAD[bad](x)
    return fn, args, x


@pytest.mark.parametrize("bad", list(BAD))
@pytest.mark.parametrize("op,name", OP_ARGS)
def test_bad_row_input_raises_naming_it(be, op, name, bad):
    fn, args, x = _spoil(op, name, bad, dev=DEV[be.name])
    with pytest.raises(RuntimeError, match=_expected(name, bad, x, F32)):
        getattr(be, fn)(*args)


@pytest.mark.parametrize("op,name", [(op, n) for op, n in OP_ARGS if n not in ("row_keys", "steps", "stochastic")])
@pytest.mark.parametrize("dtype", [F64, torch.bfloat16])
def test_wrong_row_dtype_for_other_latents(be, op, name, dtype):
    """fp64 latents want float64 rows, bf16 latents float32 rows (the compute dtype): a row of the
    latent dtype itself (bf16) or of the other float type is refused."""
    fn, args, pos = CASES[op](dtype)
    args = _to(args, DEV[be.name])
    x = args[pos[name]]
    args[pos[name]] = x.to(torch.bfloat16 if dtype == torch.bfloat16 else F32)
    with pytest.raises(RuntimeError, match=_expected(name, "dtype", x, dtype)):
        getattr(be, fn)(*args)


def _body(msg: str) -> str:
    """A message without the backend's op prefix (C++) / suffix (Triton), shape wording unified."""
    msg = re.sub(r"^rsm_fast \w+: ", "", msg)
    msg = re.sub(r" \(rsm_fast\.kernels \w+\)$", "", msg)
    return msg.replace("must be of shape", "must have shape")


@pytest.mark.parametrize("bad", [b for b in BAD if b != "device"])
@pytest.mark.parametrize("op,name", OP_ARGS)
def test_same_error_text_on_both_backends(op, name, bad):
    cpp, tri = _cpp(), _triton()
    msgs = []
    for be in (cpp, tri):
        fn, args, _ = _spoil(op, name, bad, dev=DEV[be.name])
        with pytest.raises(RuntimeError) as e:
            getattr(be, fn)(*args)
        msgs.append(_body(str(e.value)))
    assert msgs[0] == msgs[1]


def test_triton_error_is_a_runtime_and_a_value_error():
    from rsm_fast.kernels import _launch

    assert issubclass(_launch.KernelInputError, RuntimeError) and issubclass(_launch.KernelInputError, ValueError)
    tri = _triton()
    fn, args, _ = _spoil("score_fwd", "gamma", "strided", dev=DEV["triton"])
    with pytest.raises(_launch.KernelInputError, match=r"^gamma must be contiguous \(rsm_fast\.kernels score_fwd\)$"):
        getattr(tri, fn)(*args)


@pytest.mark.parametrize("what,value,match", [("form", 3, "form must be in 0..2"),
                                              ("reweight", 7, "reweight must be in 0..6")])
def test_zo_mode_codes_checked(be, what, value, match):
    fn, args, _ = zo_fwd_case()
    args = _to(args, DEV[be.name])
    args[12 if what == "form" else 13] = value
    with pytest.raises(RuntimeError, match=match):
        getattr(be, fn)(*args)


@pytest.mark.parametrize("fix,match", [(dict(step=2**32), r"step 4294967296 outside \[0, 2\^32\)"),
                                       (dict(numel=-1), "numel must be >= 0"),
                                       (dict(block0=2**32 - 2), "exceed the 2\\^32 counter range")])
def test_noise_scalars_checked(be, fix, match):
    fn, args, _ = noise_words_case()
    args = _to(args, DEV[be.name])
    args[1] = None                                   # no steps: the scalar step is used (and checked)
    for k, v in fix.items():
        args[{"step": 2, "block0": 4, "numel": 5}[k]] = v
    with pytest.raises(RuntimeError, match=match):
        getattr(be, fn)(*args)


# ---------------------------------------------------------------------------------------------
# Valid calls: accepted, and equal to the plain-torch backend
# ---------------------------------------------------------------------------------------------
def _offset(x):
    """The same values in a contiguous view with a storage offset (a legal row input)."""
    big = torch.empty((x.shape[0] + 2, *x.shape[1:]), dtype=x.dtype, device=x.device)
    big[1:-1] = x
    return big[1:-1]


def _compare(got, want, what):
    got = got if isinstance(got, (tuple, list)) else (got,)
    want = want if isinstance(want, (tuple, list)) else (want,)
    assert len(got) == len(want), what
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == b.dtype and a.shape == b.shape, (what, i)
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6, msg=lambda m: f"{what}[{i}]: {m}")
        else:
            assert torch.equal(a, b), (what, i)


VALID = dict(CASES, fp_fwd_nft=fp_fwd_nft_case, zo_fwd_ratio=lambda d=F32: zo_fwd_case(d, form=1, reweight=4))


@pytest.mark.parametrize("layout", ["plain", "offset"])
@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("op", list(VALID))
def test_valid_call_matches_decomposed(be, op, dtype, layout):
    if op == "noise_words" and dtype == F64:
        pytest.skip("no dtype")
    fn, args, pos = VALID[op](dtype)
    want = getattr(backends._DECOMPOSED, fn)(*args)
    args = _to(args, DEV[be.name])
    if layout == "offset":
        for p in pos.values():
            if args[p] is not None:
                args[p] = _offset(args[p])
    _compare(_cpu(getattr(be, fn)(*args)), want, f"{be.name} {op}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("op,name", OP_ARGS)
def test_cpu_row_beside_cuda_latents(op, name):
    tri = _triton()
    fn, args, pos = CASES[op]()
    args = _to(args, "cuda")
    args[pos[name]] = args[pos[name]].cpu()
    where = r"(tensor on cuda:\d+ \(the device of \w+\)|CUDA tensor \(.*\))"      # a row / row_keys
    with pytest.raises(RuntimeError, match=rf"\b{name} must be a {where}, got cpu"):
        getattr(tri, fn)(*args)


@pytest.mark.parametrize("op", ["zo_fwd", "score_fwd", "step_fwd", "fp_fwd"])
def test_single_row_expanded_scalar_is_legal(be, op):
    """With B = 1 an expanded 0-d tensor is contiguous ([1], stride 0 on a size-1 dim): accepted."""
    fn, args, pos = CASES[op]()
    cut = [a[:1].contiguous() if isinstance(a, torch.Tensor) else a for a in args]
    want = getattr(backends._DECOMPOSED, fn)(*cut)
    cut = _to(cut, DEV[be.name])
    for p in pos.values():
        if cut[p] is not None:
            cut[p] = cut[p][0].expand(1)
            assert cut[p].is_contiguous()
    _compare(_cpu(getattr(be, fn)(*cut)), want, f"{be.name} {op} B=1")


# ---------------------------------------------------------------------------------------------
# Through the registered ops and the public API
# ---------------------------------------------------------------------------------------------
@pytest.fixture(params=["cpp", "triton"])
def forced(request, monkeypatch):
    """Forces a backend for CPU tensors (Triton: under the interpreter only)."""
    GET[request.param]()
    if DEV[request.param] != "cpu":
        pytest.skip("forcing Triton on CPU tensors needs TRITON_INTERPRET=1 (no CUDA)")
    monkeypatch.setenv("RSM_FAST_OPS_BACKEND", request.param)
    assert backends.for_device(torch.device("cpu")).name == request.param
    return request.param


def test_registered_op_rejects_a_strided_adv(forced):
    """The issue's case: ``torch.ops.rsm_fast.zo_loss`` with a strided ``adv`` raises on both
    backends (Triton used to read it as contiguous and return wrong losses)."""
    import rsm_fast.ops.library  # noqa: F401 - registers torch.ops.rsm_fast.*

    _, args, pos = zo_fwd_case()
    args[pos["adv"]] = BAD["strided"](args[pos["adv"]])
    with pytest.raises(RuntimeError, match=r"\badv must be contiguous"):
        torch.ops.rsm_fast.zo_loss(*args)
    args[pos["adv"]] = BAD["expanded"](args[pos["adv"]])
    with pytest.raises(RuntimeError, match=r"\badv must be contiguous"):
        torch.ops.rsm_fast.zo_loss(*args)


def test_api_still_accepts_strided_and_scalar_rows(forced):
    """``rsm_fast.ops.api`` makes rows contiguous ``[B]`` before the backend sees them: strided,
    expanded, 0-d and number rows give the contiguous call's result."""
    from rsm_fast.ops import api

    c = make_zo_case("flow", 3, B=B, latent=LATENT[1:], dtype=F32)
    adv = c["adv"].float()
    kw = dict(form="hinge", reweight="base", f_ref=c["f_ref"], kl_coef=0.05)
    want = api.zo_loss(c["f_theta"], c["f_old"], c["z"], adv, c["co"], **kw)
    strided = adv.repeat_interleave(2)[::2]
    assert not strided.is_contiguous()
    got = api.zo_loss(c["f_theta"], c["f_old"], c["z"], strided, c["co"], **kw)
    torch.testing.assert_close(got.loss, want.loss)
    kl_rows = torch.tensor(0.05).expand(B)                         # stride 0
    got = api.zo_loss(c["f_theta"], c["f_old"], c["z"], adv, c["co"], **dict(kw, kl_coef=kl_rows))
    torch.testing.assert_close(got.loss, want.loss)
    got = api.zo_loss(c["f_theta"], c["f_old"], c["z"], adv, c["co"], **dict(kw, kl_coef=torch.tensor(0.05)))
    torch.testing.assert_close(got.loss, want.loss)
    s = c["f_theta"]
    gam = torch.linspace(-1, 1, 2 * B)[::2]
    want = api.score_loss(s, c["f_ref"], c["f_old"], c["z"], 1.5, gam.contiguous(), 0.5)
    torch.testing.assert_close(api.score_loss(s, c["f_ref"], c["f_old"], c["z"], torch.tensor(1.5).expand(B), gam,
                                              torch.tensor(0.5)), want)


# ---------------------------------------------------------------------------------------------
# Cost: metadata only
# ---------------------------------------------------------------------------------------------
def test_row_checks_never_sync(no_host_sync):
    """The checks read metadata only (no .item(), .tolist(), bool(tensor), ...): a valid call's
    checks and a failing one's message run inside the no-host-sync guard."""
    _triton()
    from rsm_fast.kernels import _launch

    fn, args, pos = zo_fwd_case()
    rows = {n: args[p] for n, p in pos.items()}
    with no_host_sync():
        _launch.check_rows("zo_fwd", args[0], "f_theta", ("stochastic",), **rows)
        for bad in BAD:
            spoiled = dict(rows, adv=BAD[bad](rows["adv"]))
            with pytest.raises(_launch.KernelInputError, match="adv must be"):
                _launch.check_rows("zo_fwd", args[0], "f_theta", ("stochastic",), **spoiled)
