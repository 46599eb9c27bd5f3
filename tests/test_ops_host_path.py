"""The fused losses' host path (issue 21 item 6): one output block per forward, the NaN/inf check
optional per call or deferred to one device flag, no host read anywhere in a forward + backward,
the registered ops still one node each under torch.compile(fullgraph=True), cached launch plans
and constant rows; values unchanged (float64 against the decomposed reference, through every
backend available here: plain torch, C++, Triton under TRITON_INTERPRET=1)."""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os

import pytest
import torch

from fpcases import make_fp_case, oracle, raw_args, split
from opcases import available_backends, decomposed_args, make_zo_case
from rsm_fast import ops
from rsm_fast.ops import FusedOpInputError, FusedOpNonFiniteError
from rsm_fast.ops import api as A
from rsm_fast.ops import backends
from rsm_fast.ops import decomposed as D
from rsm_fast.ops import decomposed_fp as DF
from rsm_fast.ops import library as L

F64, F32 = torch.float64, torch.float32
BACKENDS = available_backends()
BLOCK_BACKENDS = [b for b in BACKENDS if b != "decomposed"]    # those that allocate one block


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("RSM_FAST_OPS_BACKEND", request.param)
    return request.param


def _zo(c, f, **kw):
    kw = dict(form="hinge", reweight="fair", clip_eps=1e-3, f_ref=c["f_ref"], kl_coef=0.1,
              row_weight=c["row_weight"]) | kw
    return ops.zo_loss(f, c["f_old"], c["z"], c["adv"], c["co"], **kw)


ZO_FIELDS = ("loss", "policy", "kl", "clipped", "log_ratio", "lin")


def _fields(out) -> list:
    return [getattr(out, k) for k in ZO_FIELDS]


def _storages(ts) -> set:
    return {t.untyped_storage().data_ptr() for t in ts}


@contextlib.contextmanager
def _stubbed_triton_launches():
    """Every jitted kernel of the Triton loss modules replaced by a no-op ``k[grid](...)``, so the
    interpreter's own copies stay out of an allocation count (only the wrappers' host work runs)."""
    import importlib

    jit = pytest.importorskip("triton.runtime.jit")

    class Stub:
        def __getitem__(self, grid):
            return lambda *a, **k: None

    with pytest.MonkeyPatch.context() as mp:
        for m in ("zo_loss", "score_loss", "fp_loss"):
            mod = importlib.import_module(f"rsm_fast.kernels.{m}")
            for name, obj in list(vars(mod).items()):
                if isinstance(obj, jit.KernelInterface):
                    mp.setattr(mod, name, Stub())
        yield


def _launches_stubbed(name):
    return _stubbed_triton_launches() if name == "triton" else contextlib.nullcontext()


def _ops_during(fn) -> list:
    """The aten ops dispatched below autograd while ``fn()`` runs."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    with Mode():
        fn()
    return seen


# -- values: unchanged, float64 against the decomposed reference ---------------------------------------
@pytest.mark.parametrize("name", BLOCK_BACKENDS)
@pytest.mark.parametrize("with_kl", [True, False])
def test_zo_backend_outputs_match_decomposed_float64(name, with_kl):
    c = make_zo_case("flow", 11, B=9, latent=(3, 5, 7))
    args = decomposed_args(c, with_kl, F64)
    modes = (2, 3, 1e-3, 2.25, False, True)
    be = backends._cpp() if name == "cpp" else backends._triton()
    got, want = be.zo_fwd(*args, *modes), D.zo_fwd(*args, *modes)
    for i, (a, b) in enumerate(zip(got, want)):
        if b.dtype == torch.bool:
            assert torch.equal(a, b), i
        else:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=f"output {i}")
    gs = [torch.randn(9, dtype=F64, generator=torch.Generator().manual_seed(k)) for k in range(3)]
    bw = (*gs, *args[:4], args[5], *got[6:], True)
    torch.testing.assert_close(be.zo_bwd(*bw), D.zo_bwd(*gs, *args[:4], args[5], *want[6:], True),
                               rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", BLOCK_BACKENDS)
@pytest.mark.parametrize("kind", ["nft", "awm"])
def test_fp_backend_outputs_match_decomposed_float64(name, kind):
    c = make_fp_case(kind, 5, B=7)
    o, ra = split(dict(beta=0.5, kl_beta=0.1) if kind == "nft" else
                  dict(weighting="ghuber", clip=0.2, off_policy=True, kl_beta=0.1, ema_beta=0.3))
    _, _, rows = oracle(c, kind, **o)
    args = raw_args(c, kind, rows, **ra)
    be = backends._cpp() if name == "cpp" else backends._triton()
    got, want = be.fp_fwd(*args), DF.fp_fwd(*args)
    for i, (a, b) in enumerate(zip(got, want)):
        if b.dtype == torch.bool:
            assert torch.equal(a, b), i
        else:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=f"output {i}")


def test_api_results_do_not_depend_on_the_check_mode(backend):
    """check=True, check=False and the deferred check give bitwise the same values and gradients."""
    c = make_zo_case("ddim", 12, B=8, latent=(2, 3, 4))
    res = []
    for mode in ("on", "off", "deferred"):
        f = c["f_theta"].clone().requires_grad_(True)
        ctx = ops.deferred_finite_check() if mode == "deferred" else contextlib.nullcontext()
        with ctx:
            out = _zo(c, f, check=mode != "off")
        (grad,) = torch.autograd.grad(out.loss.sum() + 0.5 * out.kl.sum(), f)
        res.append((out, grad))
    for out, grad in res[1:]:
        for a, b in zip(_fields(out), _fields(res[0][0])):
            assert torch.equal(a, b)
        assert torch.equal(grad, res[0][1])


def test_score_loss_matches_reference_float64(backend):
    from rsm_fast.losses import score_regression_loss

    g = torch.Generator().manual_seed(3)
    s, s_ref, psi, s_old = (torch.randn(5, 4, 6, generator=g, dtype=F64) for _ in range(4))
    c1 = torch.rand(5, generator=g, dtype=F64)
    sv = s.clone().requires_grad_(True)
    got = ops.score_loss(sv, s_ref, s_old, psi, c1, 0.7, 0.2, check=False)
    ref = score_regression_loss(s, s_ref, s_old, psi, C1=c1, gamma=0.7, C2=0.2)
    torch.testing.assert_close(got.detach(), ref, rtol=1e-12, atol=1e-14)


# -- one output block ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", BLOCK_BACKENDS)
def test_zo_forward_is_one_allocation_and_its_outputs_share_it(name, monkeypatch):
    monkeypatch.setenv("RSM_FAST_OPS_BACKEND", name)
    c = make_zo_case("flow", 2, B=6, latent=(2, 3, 4), dtype=F32)
    args = decomposed_args(c, True, F32)
    be = backends.for_device(torch.device("cpu"))
    out = []
    with _launches_stubbed(name):
        seen = _ops_during(lambda: out.extend(be.zo_fwd(*args, 2, 3, 1e-3, 2.25, False, True)))
    allocs = [f for f in seen if f.__name__.startswith(("empty", "new_empty", "zeros", "full"))]
    assert len(allocs) == 1, allocs
    assert len(_storages(out)) == 1
    assert [o.shape for o in out] == [(6,)] * 9 and out[3].dtype == torch.bool
    assert all(o.is_contiguous() for o in out)
    # the public API hands out the same views
    f = c["f_theta"].clone().requires_grad_(True)
    res = _zo(c | {"adv": c["adv"].float(), "row_weight": c["row_weight"].float()}, f, check=False)
    assert len(_storages(_fields(res))) == 1
    assert not any(t.requires_grad for t in (res.clipped, res.log_ratio, res.lin))


@pytest.mark.parametrize("name", BLOCK_BACKENDS)
def test_fp_and_score_forward_are_one_allocation(name, monkeypatch):
    monkeypatch.setenv("RSM_FAST_OPS_BACKEND", name)
    be = backends.for_device(torch.device("cpu"))
    c = make_fp_case("awm", 3, B=5)
    o, ra = split(dict(weighting="t", clip=0.2, off_policy=True, kl_beta=0.1, ema_beta=0.3))
    _, _, rows = oracle(c, "awm", **o)
    args = raw_args(c, "awm", rows, **ra)
    out = []
    s = [torch.randn(5, 3, 4, dtype=F64) for _ in range(4)]
    r = [torch.rand(5, dtype=F64) for _ in range(3)]
    with _launches_stubbed(name):
        seen = _ops_during(lambda: out.extend(be.fp_fwd(*args)))
        seen_score = _ops_during(lambda: be.score_fwd(*s, *r, True))
    assert sum(f.__name__.startswith("empty") for f in seen) == 1
    assert len(_storages(out)) == 1
    assert out[4].shape == (5, 4) and out[6].shape == (5, 2) and out[4].is_contiguous() and out[6].is_contiguous()
    assert sum(f.__name__.startswith("empty") for f in seen_score) == 1


def test_registered_ops_return_the_block_without_a_copy(backend):
    """torch.library ops may not return aliasing outputs: rsm_fast::zo_loss / fp_loss return the
    block; on the backends that allocate one it is the very block (no copy), on the plain-torch
    fallback a copy laid out the same way."""
    c = make_zo_case("ddim", 4, B=5, latent=(3, 4))
    co = c["co"]
    args = (c["f_theta"], c["f_old"], c["z"], c["f_ref"], c["adv"], co.omega, co.sigma, co.dt, co.stochastic,
            c["row_weight"], c["kl_coef"], c["omega_train"], 2, 3, 1e-3, 2.25, False, True)
    block = L.zo_loss(*args)
    assert block.shape == (L.ZO_K, 5)
    ref = D.zo_fwd(*args)
    for a, b in zip(L.zo_outputs(block), ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    if backend != "decomposed":
        seen = _ops_during(lambda: L.zo_loss(*args))
        assert not [f for f in seen if f.__name__.startswith("copy")]


# -- the NaN/inf check: per call, off, deferred ------------------------------------------------------
def _bad_case(dtype=F32):
    c = make_zo_case("ddim", 2, B=4, latent=(2, 3), dtype=dtype)
    cd = torch.float64 if dtype == F64 else F32
    c["adv"] = torch.tensor([0.0, float("nan"), 1.0, 2.0], dtype=cd)
    c["row_weight"] = c["row_weight"].to(cd)
    return c


def test_default_check_still_raises_and_names_the_field(backend):
    c = _bad_case()
    with pytest.raises(FusedOpNonFiniteError, match="adv"):
        _zo(c, c["f_theta"])
    with pytest.raises(FusedOpInputError, match="row_weight"):
        _zo(c | {"adv": c["adv"].nan_to_num()}, c["f_theta"],
            row_weight=torch.tensor([1.0, float("inf"), 1.0, 1.0]))
    with pytest.raises(FusedOpNonFiniteError, match="kl_coef"):       # a number: checked on the host
        _zo(c | {"adv": c["adv"].nan_to_num()}, c["f_theta"], kl_coef=float("inf"))


def test_check_false_skips_the_check_without_a_host_read(backend, no_host_sync):
    c = _bad_case()
    f = c["f_theta"].clone().requires_grad_(True)
    with no_host_sync():
        out = _zo(c, f, check=False)
        (grad,) = torch.autograd.grad(out.loss.mean(), f)
    assert torch.isnan(out.loss[1]) and torch.isfinite(out.loss[[0, 2, 3]]).all()


def test_deferred_check_records_on_the_device_and_raises_once(backend, no_host_sync):
    c = _bad_case()
    good = c | {"adv": c["adv"].nan_to_num()}
    f = c["f_theta"].clone().requires_grad_(True)
    with no_host_sync():
        with ops.deferred_finite_check() as fc:
            out = _zo(good, f)
            (grad,) = torch.autograd.grad(out.loss.mean(), f)
            ok_after_good = fc.ok
            out = _zo(c, f)                                     # NaN adv: recorded, not raised
            (grad,) = torch.autograd.grad(out.loss.mean(), f)
            s = ops.score_loss(f, c["f_ref"], c["f_old"], c["z"], torch.ones(4), 0.5, 0.1)
        verdict = fc.ok
    assert isinstance(verdict, torch.Tensor) and verdict.dim() == 0 and verdict.dtype == torch.bool
    assert bool(ok_after_good) and not bool(verdict)
    assert fc.first_bad() == "adv"
    with pytest.raises(FusedOpNonFiniteError, match="^adv holds NaN or inf"):
        fc.raise_if_bad()
    fc.reset()
    assert fc.ok is None and fc.first_bad() is None
    fc.raise_if_bad()
    assert s.shape == (4,)
    assert A._DEFERRED.get() is None                            # the context is left
    outer, inner = ops.deferred_finite_check(), ops.deferred_finite_check()
    with outer:
        with inner:
            _zo(c, f)
        assert A._DEFERRED.get() is outer
        _zo(good, f)
    assert inner.first_bad() == "adv" and outer.first_bad() is None and A._DEFERRED.get() is None


def test_deferred_check_covers_the_forward_process_losses(backend):
    c = make_fp_case("awm", 4, B=5, dtype=F32)
    t = c["t"].float()
    adv = c["adv"].float().clone()
    adv[2] = float("inf")
    with ops.deferred_finite_check() as fc:
        ops.awm_loss(c["v"], c["eps"], c["x0"], t, adv, v_ref=c["v_ref"], v_ema=c["v_ema"])
    assert fc.first_bad() == "adv"
    n = make_fp_case("nft", 4, B=5, dtype=F32)
    tn = n["t"].float().clone()
    tn[0] = float("nan")
    with ops.deferred_finite_check() as fc:
        ops.nft_loss(n["v"], n["v_old"], n["v_ref"], n["x_t"], n["x0"], tn, n["adv"].float(), beta=0.5)
    with pytest.raises(FusedOpNonFiniteError, match="^t holds"):
        fc.raise_if_bad()


def test_rows_finite_is_a_device_verdict_without_a_host_read(no_host_sync):
    good = {"a": torch.ones(4), "b": torch.zeros(4, dtype=F64), "n": 3.0, "skip": None}
    with no_host_sync():
        v_good = ops.rows_finite(good)
        v_nan = ops.rows_finite(good | {"c": torch.tensor([1.0, float("nan")])})
        v_inf = ops.rows_finite([torch.ones(3), torch.tensor([float("-inf")])])
        v_num = ops.rows_finite([torch.ones(3), float("inf")])
        v_bool = ops.rows_finite([torch.ones(3, dtype=torch.bool)])
    for v in (v_good, v_nan, v_inf, v_num, v_bool):
        assert isinstance(v, torch.Tensor) and v.dim() == 0 and v.dtype == torch.bool
    assert bool(v_good) and not bool(v_nan) and not bool(v_inf) and not bool(v_num) and bool(v_bool)


# -- capturability: no host read in forward + backward -----------------------------------------------
@pytest.mark.parametrize("loss", ["zo", "score", "nft", "awm"])
def test_forward_and_backward_never_read_the_device(backend, loss, no_host_sync):
    """No Tensor method that reads device memory on the host runs in a forward + backward with
    check=False or inside the deferred check: the step can be captured in a CUDA graph."""
    if loss in ("zo", "score"):
        c = make_zo_case("flow", 7, B=6, latent=(2, 3, 4), dtype=F32)
        c = c | {"adv": c["adv"].float(), "row_weight": c["row_weight"].float()}
        x = c["f_theta"].clone().requires_grad_(True)

        def run(check):
            if loss == "zo":
                return _zo(c, x, check=check).loss
            return ops.score_loss(x, c["f_ref"], c["f_old"], c["z"], c["co"].omega.float(), 0.5, 0.1, check=check)
    else:
        c = make_fp_case(loss, 7, B=6, dtype=F32)
        x = c["v"].clone().requires_grad_(True)

        def run(check):
            if loss == "nft":
                return ops.nft_loss(x, c["v_old"], c["v_ref"], c["x_t"], c["x0"], c["t"].float(), c["adv"].float(),
                                    beta=0.5, check=check)[0]
            return ops.awm_loss(x, c["eps"], c["x0"], c["t"].float(), c["adv"].float(), v_ref=c["v_ref"],
                                v_ema=c["v_ema"], check=check)[0]

    with no_host_sync():
        g1 = torch.autograd.grad(run(False).sum(), x)[0]
        with ops.deferred_finite_check() as fc:
            g2 = torch.autograd.grad(run(True).sum(), x)[0]
            ok = fc.ok
    assert torch.equal(g1, g2) and bool(ok)


# -- torch.compile: still one opaque node each -------------------------------------------------------
def test_compile_fullgraph_one_node_per_op_forward_and_backward():
    from torch._dynamo.backends.common import aot_autograd

    c = make_zo_case("flow", 30, B=6, latent=(2, 3, 4), dtype=F32)
    co = c["co"]
    graphs = {"dynamo": [], "fw": [], "bw": []}

    from functorch.compile import make_boxed_func

    def keep(kind):
        def compiler(gm, example_inputs):
            graphs[kind].append(gm)
            return make_boxed_func(gm.forward)
        return compiler

    def backend_fn(gm, example_inputs):
        graphs["dynamo"].append(gm)
        return aot_autograd(fw_compiler=keep("fw"), bw_compiler=keep("bw"))(gm, example_inputs)

    def step(f):
        out = ops.zo_loss(f, c["f_old"], c["z"], c["adv"].float(), co, form="hinge", reweight="fair", clip_eps=1e-3,
                          f_ref=c["f_ref"], kl_coef=0.5)
        return out.loss.mean() + 0.1 * out.policy.sum()

    f = c["f_theta"].clone().requires_grad_(True)
    torch._dynamo.reset()
    loss = torch.compile(step, fullgraph=True, backend=backend_fn)(f)
    loss.backward()

    def count(gms, name):
        return sum(1 for gm in gms for n in gm.graph.nodes if n.op == "call_function" and name in str(n.target))

    assert len(graphs["dynamo"]) == 1
    assert count(graphs["dynamo"], "rsm_fast.zo_loss") == 1
    assert count(graphs["fw"], "rsm_fast.zo_loss.default") == 1
    assert count(graphs["bw"], "rsm_fast.zo_loss_backward") == 1
    f2 = c["f_theta"].clone().requires_grad_(True)
    eager = step(f2)
    eager.backward()
    torch.testing.assert_close(loss, eager)
    torch.testing.assert_close(f.grad, f2.grad)


# -- cached per-call work ----------------------------------------------------------------------------
def test_launch_plans_are_cached_per_shape_and_follow_the_tiling_constants(monkeypatch):
    launch = pytest.importorskip("rsm_fast.kernels._launch")
    t = torch.empty(12, 4, 8, 8)
    p1, p2 = launch.plan(t), launch.plan(torch.empty(12, 256))
    assert p1 is p2                                     # same B and row length: the same plan object
    assert p1.grid == (12, p1.n_chunks) and p1.epi_grid == (math.ceil(12 / launch.EPI_BLOCK_B),) and p1.n == 256
    assert launch.plan(torch.empty(13, 256)) is not p1
    monkeypatch.setattr(launch, "INTERP_PROGRAMS", 200)
    assert launch.plan(t).n_chunks > p1.n_chunks
    for B, n, block, target in [(1, 1, 64, 12), (12, 256, 64, 12), (5, 1000, 128, 528), (48, 65536, 1024, 528)]:
        import triton

        tiles = max(1, triton.cdiv(n, block))
        want = min(tiles, max(1, triton.cdiv(target, B)))
        assert launch.plan_chunks(B, n, block, target) == (triton.cdiv(n, (tiles // want) * block),
                                                           (tiles // want) * block)
        assert launch.next_power_of_2(n) == triton.next_power_of_2(n)


def test_number_rows_are_cached_constants():
    like = torch.empty(7, 3)
    a = A._const_row(0.25, 7, F32, like.device)
    assert A._const_row(0.25, 7, F32, like.device) is a and torch.equal(a, torch.full((7,), 0.25))
    assert A._const_row(0.25, 7, F64, like.device) is not a
    with torch.inference_mode():
        b = A._const_row(0.5, 7, F32, like.device)
    assert A._const_row(0.5, 7, F32, like.device) is not b          # not cached under inference mode
    key = (0.5, 7, F32, like.device)
    assert key not in A._CONST_ROWS or not A._CONST_ROWS[key].is_inference()
    nan = A._const_row(float("nan"), 7, F32, like.device)
    assert torch.isnan(nan).all() and not any(isinstance(k[0], float) and math.isnan(k[0]) for k in A._CONST_ROWS)


def test_backend_lookup_follows_the_environment(monkeypatch):
    monkeypatch.setenv("RSM_FAST_OPS_BACKEND", "decomposed")
    assert backends.for_device(torch.device("cpu")).name == "decomposed"
    monkeypatch.delenv("RSM_FAST_OPS_BACKEND")
    assert backends.for_device(torch.device("cpu")).name in ("cpp", "decomposed")
    monkeypatch.setenv("RSM_FAST_OPS_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="RSM_FAST_OPS_BACKEND"):
        backends.for_device(torch.device("cpu"))
    if os.environ.get("TRITON_INTERPRET") == "1" and "triton" in BACKENDS:
        monkeypatch.setenv("RSM_FAST_OPS_BACKEND", "triton")
        assert backends.for_device(torch.device("cpu")).name == "triton"


def test_fast_apply_is_function_apply(backend, monkeypatch):
    """library.zo_apply (the API's entry point) gives Function.apply's outputs and gradients, and
    defers to it under a functorch transform."""
    c = make_zo_case("flow", 9, B=6, latent=(2, 3))
    co = c["co"]
    rest = (c["f_old"], c["z"], c["f_ref"], c["adv"], co.omega, co.sigma, co.dt, co.stochastic, c["row_weight"],
            c["kl_coef"], c["omega_train"], 2, 3, 1e-3, 2.25, False, True)
    res = []
    for fn in (L.zo_apply, L.ZOLossFn.apply):
        f = c["f_theta"].clone().requires_grad_(True)
        out = fn(f, *rest)
        res.append((out, torch.autograd.grad(out[0].sum() + out[2].sum(), f)[0]))
    for a, b in zip(res[0][0], res[1][0]):
        assert torch.equal(a, b)
    assert torch.equal(res[0][1], res[1][1])
    calls = []
    monkeypatch.setattr(torch._C, "_are_functorch_transforms_active", lambda: True)
    monkeypatch.setattr(L.ZOLossFn, "apply", classmethod(lambda cls, *a: calls.append(a) or "deferred"))
    zo_apply = L._fast_apply(L.ZOLossFn)
    assert zo_apply(c["f_theta"], *rest) == "deferred" and len(calls) == 1


# -- CUDA graphs (needs a GPU) ------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("loss", ["zo", "score", "awm"])
def test_forward_and_backward_capture_in_a_cuda_graph(loss, monkeypatch):
    """The loss forward + backward (check off, and with the deferred check) captured in one CUDA
    graph; replays on new inputs copied into the static ones match eager, and the deferred
    verdict read after a replay sees that replay's inputs."""
    monkeypatch.delenv("RSM_FAST_OPS_BACKEND", raising=False)
    dev = torch.device("cuda")
    if loss in ("zo", "score"):
        c = make_zo_case("flow", 17, B=6, latent=(4, 16, 16), dtype=torch.bfloat16)
        co = c["co"]
        c = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in c.items()}
        c["co"] = type(co)(**{f.name: getattr(co, f.name).to(dev) for f in dataclasses.fields(co)})
        static = {"x": c["f_theta"].clone(), "adv": c["adv"].float().clone()}

        def run(check):
            x = static["x"].requires_grad_(True)
            if loss == "zo":
                out = ops.zo_loss(x, c["f_old"], c["z"], static["adv"], c["co"], form="hinge", reweight="fair",
                                  f_ref=c["f_ref"], kl_coef=0.1, check=check).loss
            else:
                out = ops.score_loss(x, c["f_ref"], c["f_old"], c["z"], static["adv"].abs(), 0.5, 0.1, check=check)
            return out, torch.autograd.grad(out.mean(), x)[0]
    else:
        c = {k: v.to(dev) for k, v in make_fp_case("awm", 17, B=6, latent=(4, 16, 16), dtype=torch.bfloat16).items()}
        static = {"x": c["v"].clone(), "adv": c["adv"].float().clone()}

        def run(check):
            x = static["x"].requires_grad_(True)
            out = ops.awm_loss(x, c["eps"], c["x0"], c["t"].float(), static["adv"], v_ref=c["v_ref"], v_ema=c["v_ema"],
                               check=check)[0]
            return out, torch.autograd.grad(out, x)[0]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):                  # compile the kernels, fill the constant-row cache
            want = run(False)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    fc = ops.deferred_finite_check()
    with fc, torch.cuda.graph(graph):
        got = run(True)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])
    assert bool(fc.ok)
    static["adv"][1] = float("nan")        # the next replay reads it: the verdict turns
    graph.replay()
    assert not bool(fc.ok) and fc.first_bad() == "adv"
