"""The row counts a graphed rollout replays (issue 21 item 2): chunks from a fixed ladder keep the
padding under 2 % of every branching preset's rows (truncated variants too) with at most
``1 + ceil(log2 cap)`` captured shapes; graphs no rollout used for ``keep_epochs`` epochs are
freed; captures use ``capture_error_mode="thread_local"`` in one shared pool; nothing the engine
returns aliases a graph's static output; the eager path is the one before this change.

CUDA is faked on CPU: ``graphs_supported`` and ``GraphedModel._active`` are forced on, and
``torch.cuda.graph`` / ``CUDAGraph`` / streams are replaced by a recorder whose "graph" re-runs the
captured call into the same output buffer on replay (and leaves NaN in it until the first replay),
which is what a real graph's static output does. The engine's real ``_capture`` runs.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from types import SimpleNamespace

import pytest
import torch

from rsm_fast import presets
from rsm_fast.config import build_config
from rsm_fast.engine import graphs as G
from rsm_fast.engine.graphs import GraphedModel, chunk_sizes, graph_cap, ladder, max_shapes, schedule
from rsm_fast.engine.plan import PlanSpec, compile_plan
from rsm_fast.engine.rollout import RolloutEngine
from rsm_fast.engine.solver_rollout import SolverRollout
from test_engine import LATENT, PLANS, TinyModel, _cond, flow


# -- a fake CUDA graph runtime --------------------------------------------------------------------
class FakeGraph:
    capturing = None                  # the graph whose capture is running

    def __init__(self):
        self.replay_fns = []
        self.replays = 0

    def replay(self):
        self.replays += 1
        for fn in self.replay_fns:
            fn()


class _Stream:
    def __init__(self, *a, **k):
        pass

    def wait_stream(self, other):
        pass


class Cooperative:
    """What the wrapped model looks like to a fake capture: during capture it returns a fresh
    static buffer (NaN until replayed) and registers the call for replay; otherwise eager."""

    def __init__(self, inner, log):
        self.inner, self.log = inner, log

    def __call__(self, x, t, cond):
        g = FakeGraph.capturing
        if g is None:
            self.log["eager_rows"].append(x.shape[0])
            return self.inner(x, t, cond)
        res = self.inner(x, t, cond)
        out = torch.full_like(res, float("nan"))
        g.replay_fns.append(lambda: out.copy_(self.inner(x, t, cond)))
        self.log["captured_rows"].append(x.shape[0])
        self.log["outs"].append(out)
        return out

    def __getattr__(self, name):
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


@pytest.fixture
def fake_cuda(monkeypatch):
    log = {"graph_kwargs": [], "captured_rows": [], "eager_rows": [], "outs": [], "pools": []}

    @contextlib.contextmanager
    def graph(g, pool=None, stream=None, capture_error_mode="global", **kw):
        log["graph_kwargs"].append({"pool": pool, "capture_error_mode": capture_error_mode})
        FakeGraph.capturing = g
        try:
            yield
        finally:
            FakeGraph.capturing = None

    def pool_handle():
        h = object()
        log["pools"].append(h)
        return h

    init = GraphedModel.__init__

    def wrapped_init(self, model, **kw):
        kw.setdefault("keep_epochs", log.get("keep_epochs", G.KEEP_EPOCHS))
        init(self, Cooperative(model, log), **kw)

    monkeypatch.setattr(G, "graphs_supported", lambda device: True)
    monkeypatch.setattr(GraphedModel, "_active", lambda self, x: self.enabled and not torch.is_grad_enabled())
    monkeypatch.setattr(GraphedModel, "__init__", wrapped_init)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "Stream", _Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a, **k: _Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", pool_handle)
    return log


# -- the ladder (pure functions) ------------------------------------------------------------------
def test_ladder_and_examples():
    assert ladder(8) == [8, 4, 2, 1] and ladder(12) == [12, 8, 4, 2, 1] and ladder(1) == [1]
    assert [max_shapes(c) for c in (1, 2, 8, 12, 2048)] == [1, 2, 4, 5, 12]
    assert graph_cap(3456, exact=False) == 2048 and graph_cap(12, exact=True) == 12
    assert chunk_sizes(3456, 2048) == [2048, 1024, 256, 128]
    assert chunk_sizes(47, 8) == [8] * 5 + [4, 2, 1]          # 2 % of 47 rows buys no padding
    assert chunk_sizes(2007, 8) == [8] * 251                   # the last 7 padded to 8 (1 row <= 40)
    assert chunk_sizes(0, 8) == []
    with pytest.raises(ValueError):
        chunk_sizes(5, 0)


@pytest.mark.parametrize("cap", [1, 2, 3, 8, 9, 12, 64, 100, 2048])
def test_chunk_sizes_bounds(cap):
    for rows in list(range(0, 300)) + [1000, 1984, 3456, 4097, 10_001]:
        for tol in (0.0, G.PAD_TOL, 0.1):
            s = chunk_sizes(rows, cap, tol)
            pad = sum(s) - rows
            assert 0 <= pad <= math.floor(tol * rows), (rows, cap, tol, s)
            assert set(s) <= set(ladder(cap)) and s == sorted(s, reverse=True)
            assert sum(s[:-1]) < rows or not s                 # only the last call can hold padding
            assert len(s) <= rows // cap + (cap - 1).bit_length()


def _branching_presets():
    folder = os.path.dirname(presets.__file__)
    names = sorted(f[:-5] for f in os.listdir(folder) if f.endswith(".yaml"))
    return [n for n in names if build_config(preset=n).rollout.plan != "sde"]


BRANCHING = _branching_presets()


def _preset_plans(name):
    from rsm_fast.tasks import make_task
    from rsm_fast.training_plan import plan_spec
    cfg = build_config(preset=name)
    tr = make_task(cfg.task).transition
    spec = plan_spec(cfg, tr.num_steps, tr.sde_mask)
    ds = [spec.truncate] + ([0, 1] if spec.kind == "branch" else [])
    return cfg, [compile_plan(dataclasses.replace(spec, truncate=d)) for d in ds]


def test_the_branching_presets_are_found():
    assert {"tempflow-grpo", "rsm-evr", "rsm-evr-cost", "rsm-uniform-realloc", "rsm-lowsnr"} <= set(BRANCHING)


@pytest.mark.parametrize("name", BRANCHING)
def test_preset_plans_pad_under_2_percent_with_few_shapes(name):
    """Every branching preset on the 2-D task (and its truncated d = 0, 1 variants): the rows that
    reach the model (``live_rows``) padded by < 2 % (before: 35-94 % untruncated, up to 13x
    truncated), the shapes within ``1 + ceil(log2 cap)``; also at the rows-per-call sizes the
    presets use on images (2, 8, 12)."""
    cfg, plans = _preset_plans(name)
    assert cfg.rollout.chunk_size == 0
    for plan in plans:
        for chunk in (None, 2, 8, 12):
            cap = graph_cap(chunk or max(plan.rows), exact=chunk is not None)
            s = schedule(plan.live_rows, cap)
            assert s["padding"] <= G.PAD_TOL * s["rows"] < 0.03 * s["rows"], (plan.spec, chunk, s)
            assert len(s["shapes"]) <= max_shapes(cap)
            if chunk is None:
                assert all(r & (r - 1) == 0 for r in s["shapes"])
        before = sum(max(plan.rows) for r in plan.live_rows if r) - sum(plan.live_rows)
        assert before > 0.3 * sum(plan.live_rows)       # what padding to the widest step cost


def test_allocator_profiles_stay_on_one_ladder():
    """The online allocator's plans: whatever K moves to, every shape is a power of two no larger
    than the widest step, so 15 epochs capture at most ``bit_length(widest)`` graphs in all (the
    old rule: one per new widest step)."""
    g = torch.Generator().manual_seed(0)
    k = [6] * 9 + [0]
    shapes, widest = set(), set()
    for _ in range(15):
        k = [max(0, min(10, v + int(torch.randint(-2, 3, (1,), generator=g)))) for v in k[:9]] + [0]
        if not any(k):
            k[8] = 2
        plan = compile_plan(PlanSpec(kind="branch", num_steps=10, groups=16, trunks=4, k=tuple(k)))
        shapes |= set(schedule(plan.live_rows, graph_cap(max(plan.rows), exact=False))["shapes"])
        widest.add(max(plan.rows))
    assert len(shapes) <= max(widest).bit_length() and all(r & (r - 1) == 0 for r in shapes)
    assert len(widest) > len(shapes) / 2          # the old rule's count (one graph per widest step)


# -- the eager path is unchanged ------------------------------------------------------------------
def _old_evaluate(self, x, t_rows, cond, uncond, nfe, model=None, chunk=None):
    """``ChunkedEvaluation._evaluate`` before issue 21 item 2 (verbatim; graphed branches included)."""
    R, C = x.shape[0], chunk or self.chunk
    model = self.model if model is None else model
    graphed = self.graphs_active and model is self.model
    outs = []
    for s in range(0, R, C):
        xs = x[s:s + C]
        n = xs.shape[0]
        cs = None if cond is None else cond[s:s + C]
        if n < C and graphed:
            pad = C - n
            xs = torch.cat([xs, xs.new_zeros((pad, *xs.shape[1:]))])
            cs = None if cs is None else torch.cat([cs, cs[:1].expand(pad, *cs.shape[1:])])
            nfe["padding"] += pad * (2 if self.cfg_scale is not None else 1)
        m = xs.shape[0]
        t = t_rows.expand(m) if t_rows.numel() == 1 else t_rows[s:s + C]
        if t.shape[0] < m:
            t = torch.cat([t, t[:1].expand(m - t.shape[0])])
        if self.cfg_scale is None:
            f = model(xs, t, cs)
        else:
            uc = uncond.expand(m, *uncond.shape[1:]) if uncond is not None else None
            both = model(torch.cat([xs, xs]), torch.cat([t, t]), None if cs is None else torch.cat([cs, uc]))
            f_c, f_u = both[:m], both[m:]
            f = f_u + self.cfg_scale * (f_c - f_u)
        if graphed and self.cfg_scale is None and R > C:
            f = f.clone()
        outs.append(f[:n])
    return torch.cat(outs) if len(outs) > 1 else outs[0]


class _Rows:
    def __init__(self, model):
        self.model, self.rows = model, []

    def __call__(self, x, t, c):
        self.rows.append(x.shape[0])
        return self.model(x, t, c)


@pytest.mark.parametrize("cfg", [None, 4.5])
@pytest.mark.parametrize("chunk", [None, 1, 3, 7, 64])
@pytest.mark.parametrize("per_row_t", [False, True])
@pytest.mark.parametrize("with_cond", [False, True])
def test_eager_evaluate_is_the_old_one(cfg, chunk, per_row_t, with_cond):
    eng = RolloutEngine(TinyModel(), flow(), compile_plan(PLANS["branch"]), chunk_size=chunk, cfg_scale=cfg)
    assert not eng.graphs_active
    g = torch.Generator().manual_seed(1)
    for R in (1, 5, 19, 40):
        x = torch.randn(R, *LATENT, generator=g)
        t = torch.rand(R if per_row_t else 1, generator=g) * 1000
        c = torch.randn(R, 4, generator=g) if with_cond else None
        u = torch.zeros(1, 4)
        outs, calls = [], []
        for fn in (type(eng)._evaluate, _old_evaluate):
            eng.model = _Rows(TinyModel())
            nfe = {"padding": 0}
            outs.append(fn(eng, x, t, c, u, nfe))
            calls.append((eng.model.rows, nfe))
        assert torch.equal(outs[0], outs[1]) and calls[0] == calls[1]


def test_eager_rollout_has_no_padding_and_the_old_chunks(monkeypatch):
    spec = PLANS["branch"]
    runs = []
    for fn in (None, _old_evaluate):
        if fn is not None:
            monkeypatch.setattr(RolloutEngine, "_evaluate", fn)
        eng = RolloutEngine(_Rows(TinyModel()), flow(), compile_plan(spec), chunk_size=4, seed=3, cfg_scale=4.5)
        rec = eng.run(cond=_cond(spec), uncond=torch.zeros(1, 4), latent_shape=LATENT)
        runs.append((rec, eng.model.rows))
    (a, ra), (b, rb) = runs
    assert ra == rb and a.nfe == b.nfe and a.nfe["padding"] == 0
    for k in ("x", "z", "f_old", "log_prob", "x0"):
        assert torch.equal(getattr(a, k), getattr(b, k)), k


# -- the graphed engine (fake CUDA) ---------------------------------------------------------------
def _truncated():
    return PlanSpec(kind="branch", num_steps=10, groups=2, trunks=3, k=(3, 2, 4, 0, 5, 0, 0, 2, 0, 0), truncate=1)


SPECS = {**PLANS, "truncated": _truncated()}


@pytest.mark.parametrize("cfg", [None, 4.5])
@pytest.mark.parametrize("chunk", [None, 4, 3])
@pytest.mark.parametrize("name", list(SPECS))
def test_graphed_rollout_equals_eager_on_the_ladder(fake_cuda, name, chunk, cfg):
    """TinyModel's rows are independent of the batch, so graphed chunks give eager's bits; every
    call's row count is on the ladder; a second run replays without capturing; padding as
    predicted by :func:`schedule`."""
    spec = SPECS[name]
    plan = compile_plan(spec)
    cond, unc = _cond(spec), torch.zeros(1, 4)
    eager = RolloutEngine(TinyModel(), flow(), plan, chunk_size=chunk, seed=3, cfg_scale=cfg)
    graphed = RolloutEngine(TinyModel(), flow(), plan, chunk_size=chunk, seed=3, cfg_scale=cfg, graphs=True)
    assert graphed.graphs_active and isinstance(graphed.model, GraphedModel) and not eager.graphs_active
    ref = eager.run(cond=cond, uncond=unc, latent_shape=LATENT)
    for _ in range(2):
        rec = graphed.run(cond=cond, uncond=unc, latent_shape=LATENT)
        for k in ("x", "z", "f_old", "log_prob", "x0"):
            assert torch.equal(getattr(rec, k), getattr(ref, k)), k
        drop = lambda d: {k: v for k, v in d.items() if k != "padding"}  # noqa: E731
        assert drop(rec.nfe) == drop(ref.nfe)
    gm = graphed.model
    cap = graph_cap(chunk or max(plan.rows), exact=chunk is not None)
    s = schedule(plan.live_rows, cap)
    g = 2 if cfg else 1
    assert rec.nfe["padding"] == g * s["padding"]
    assert sorted(set(fake_cuda["captured_rows"])) == [g * r for r in s["shapes"]]
    assert gm.captures == gm.num_graphs == len(s["shapes"]) <= max_shapes(cap)
    assert gm.replays == 2 * s["calls"] - gm.captures          # a capture's own call is not a replay
    assert fake_cuda["eager_rows"] == [r for r in fake_cuda["captured_rows"] for _ in range(gm.warmup)]


def test_evaluate_records_and_f_old_never_alias_a_graph_buffer(fake_cuda):
    """A graph's static output is overwritten by the next replay of its shape: results taken
    earlier must keep their values (before: a single-chunk call returned the buffer itself)."""
    spec = PLANS["sde"]                                        # 6 rows, one chunk of 6 (cap = widest)
    eng = RolloutEngine(TinyModel(), flow(), compile_plan(spec), seed=3, graphs=True)
    cond = _cond(spec)
    rec = eng.run(cond=cond, latent_shape=LATENT)
    sub = SimpleNamespace(x=rec.x[:4], step=rec.step[:4], group=rec.group[:4])   # one call of 4 rows (cap 4)
    a = eng.evaluate_records(eng.model, sub, cond)[0]
    sub2 = SimpleNamespace(x=rec.x[4:8], step=rec.step[4:8], group=rec.group[4:8])
    a_ref = TinyModel()(sub.x, eng._t.index_select(0, sub.step), cond.index_select(0, sub.group))
    b = eng.evaluate_records(eng.model, sub2, cond)[0]        # replays the same graph
    assert torch.equal(a, a_ref) and not torch.equal(a, b)
    rec3 = eng.run(cond=cond, latent_shape=LATENT, epoch=1)
    assert not torch.equal(rec3.x0, rec.x0)
    bufs = {o.untyped_storage().data_ptr() for o in fake_cuda["outs"]}
    assert len(bufs) == eng.model.num_graphs
    for t in (a, b, rec.f_old, rec.x0, rec.x, rec3.f_old, rec3.x0):
        assert t.untyped_storage().data_ptr() not in bufs
    assert torch.isfinite(a).all() and torch.isfinite(rec.f_old).all()   # no NaN of an unreplayed buffer


def test_capture_is_thread_local_in_one_shared_pool(fake_cuda):
    eng = RolloutEngine(TinyModel(), flow(), compile_plan(PLANS["branch"]), chunk_size=3, graphs=True)
    eng.run(cond=_cond(PLANS["branch"]), latent_shape=LATENT)
    kw = fake_cuda["graph_kwargs"]
    assert len(kw) == eng.model.captures >= 2
    assert {k["capture_error_mode"] for k in kw} == {"thread_local"}
    assert len(fake_cuda["pools"]) == 1 and all(k["pool"] is fake_cuda["pools"][0] for k in kw)


def test_lru_frees_graphs_unused_for_keep_epochs(fake_cuda):
    gm = GraphedModel(TinyModel(), keep_epochs=2)
    call = lambda n: gm(torch.randn(n, *LATENT), torch.rand(n), None)  # noqa: E731
    with torch.no_grad():
        gm.begin_epoch(0)
        call(8), call(4)
        gm.begin_epoch(0)                       # another wave of the same epoch: nothing moves
        gm.begin_epoch(1)
        call(8)
        gm.begin_epoch(2)
        call(8)
        assert gm.shapes == [4, 8] and gm.frees == 0      # 4 unused in epochs 1 and 2 only... so far kept
        gm.begin_epoch(3)                       # 4: not used in the last 2 epochs (1, 2) -> freed
        assert gm.shapes == [8] and gm.frees == 1
        call(4)                                 # needed again: re-captured
        assert gm.shapes == [4, 8] and gm.captures == 3
        assert gm.stats() == {"graphs": 2, "captures": 3, "frees": 1, "replays": 2}
        gm.reset()
        assert gm.stats()["frees"] == 3 and gm.num_graphs == 0
    with pytest.raises(ValueError):
        GraphedModel(TinyModel(), keep_epochs=0)


def test_engines_of_changing_plans_share_graphs_and_free_stale_ones(fake_cuda):
    """As the trainer does when the allocator moves K: a new engine per plan on the same
    GraphedModel. Shapes no plan used for ``keep_epochs`` epochs go; the held graphs stay within
    the ladder's bound at every epoch."""
    profiles = [(6,) * 9 + (0,)] * 2 + [(2, 2, 2, 0, 0, 0, 0, 0, 0, 0)] * 5 + [(6,) * 9 + (0,)]
    model, used = TinyModel(), []
    for epoch, k in enumerate(profiles):
        plan = compile_plan(PlanSpec(kind="branch", num_steps=10, groups=2, trunks=4, k=k))
        eng = RolloutEngine(model, flow(), plan, seed=3, graphs=True)
        model = eng.model
        eng.run(cond=torch.randn(2, 4), latent_shape=LATENT, epoch=epoch)
        used.append(set(schedule(plan.live_rows, graph_cap(max(plan.rows), exact=False))["shapes"]))
        recent = set().union(*used[-(model.keep_epochs + 1):])   # this epoch and the K before
        assert set(model.shapes) == recent and model.num_graphs <= max(plan.rows).bit_length()
    assert model.frees > 0 and model.captures == model.num_graphs + model.frees


def _rowwise(x, t, cond):
    """Row-wise (no batch statistic), non-linear in x and t."""
    c = 0.0 if cond is None else cond.reshape(cond.shape[0], *[1] * (x.dim() - 1))
    return torch.tanh(0.8 * x + 0.3 * t.reshape(-1, *[1] * (x.dim() - 1)).to(x.dtype)) + 0.5 * c - 0.2 * x


def test_solver_rollout_graphed_equals_eager(fake_cuda):
    from rsm_fast import solvers as SV
    SHAPE, _model = (3, 4), _rowwise
    kw = dict(keys=torch.arange(100, 137), group=torch.arange(37) // 4, seed=7)
    grid = SV.flow_grid(6, 3.0, "flow_match")
    eager = SolverRollout(_model, "dpm2", "v", grid, **kw)
    graphed = SolverRollout(_model, "dpm2", "v", grid, graphs=True, **kw)
    cond = torch.randn(10)
    a, b = eager.run(cond, latent_shape=SHAPE), graphed.run(cond, latent_shape=SHAPE)
    assert torch.equal(a.x0, b.x0) and b.nfe["padding"] == 0
    assert sorted(set(fake_cuda["captured_rows"])) == [1, 4, 32]      # 37 rows, cap 32
    # the forward family's per-row evaluations go through the same ladder, results fresh
    x, t = torch.randn(50, *SHAPE), torch.rand(50)
    with torch.no_grad():
        f = graphed._evaluate(x, t, None, None, {"padding": 0})
        f2 = graphed._evaluate(x * 2, t, None, None, {"padding": 0})
    assert torch.equal(f, _model(x, t, None)) and not torch.equal(f, f2)


def test_trainer_online_allocator_holds_a_bounded_set_of_graphs(fake_cuda):
    """rsm-evr-cost on the 2-D task, 15 epochs with ``rollout.graphs`` (faked; ``keep_epochs`` 1 so
    frees show within 15 epochs): the allocator moves K every epoch (the old rule captured a graph
    per new widest step, 7 here, none freed); the graphs held are exactly the shapes of this
    epoch's plan and the previous one's, all powers of two. The allocator's decisions are the
    eager run's, bit for bit."""
    from rsm_fast.trainer import Trainer
    fake_cuda["keep_epochs"] = 1
    ov = ["train.batch_size=16", "train.epochs=15"]
    runs = []
    for graphs in (False, True):
        torch.manual_seed(0)
        tr = Trainer(build_config(preset="rsm-evr-cost", overrides=ov + [f"rollout.graphs={str(graphs).lower()}"]))
        ks, used, widest = [], [], set()
        for _ in range(15):
            plan = tr.plan
            widest.add(max(plan.rows))
            used.append(set(schedule(plan.live_rows, graph_cap(max(plan.rows), exact=False))["shapes"]))
            tr.epoch()
            ks.append(tr._spec.k)
            if graphs:
                gm = tr.engine.model
                assert isinstance(gm, GraphedModel) and gm.keep_epochs == 1
                assert set(gm.shapes) == set().union(*used[-2:])
        runs.append(ks)
    assert runs[0] == runs[1]
    assert gm.frees > 0 and gm.captures == gm.num_graphs + gm.frees
    assert len(widest) >= 5 and all(r & (r - 1) == 0 for r in fake_cuda["captured_rows"])
    assert len(set(fake_cuda["captured_rows"])) <= max(widest).bit_length()


# -- CUDA (the real capture; skipped without a GPU) -----------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("cfg", [None, 4.5])
def test_cuda_ladder_replay_equals_eager_and_outputs_are_fresh(cfg):
    from test_engine_graphs import Net
    torch.backends.cuda.matmul.allow_tf32 = False
    spec = PlanSpec(kind="branch", num_steps=10, groups=2, trunks=3, k=(6,) * 9 + (0,))   # 6 .. 330 rows
    plan = compile_plan(spec)
    model = Net().cuda()
    eager = RolloutEngine(model, flow(), plan, seed=3, cfg_scale=cfg, device="cuda")
    graphed = RolloutEngine(model, flow(), plan, seed=3, cfg_scale=cfg, device="cuda", graphs=True)
    cond, unc = _cond(spec).cuda(), torch.zeros(1, 4, device="cuda")
    x = eager.initial_latents(LATENT)
    ref = eager.run(x, cond, unc)
    first, second = graphed.run(x, cond, unc), graphed.run(x, cond, unc)
    s = schedule(plan.live_rows, graph_cap(max(plan.rows), exact=False))
    gm = graphed.model
    assert gm.captures == gm.num_graphs == len(s["shapes"]) and sorted(set(gm.shapes)) == [
        (2 if cfg else 1) * r for r in s["shapes"]]
    for rec in (first, second):
        for k in ("x", "z", "f_old", "log_prob", "x0"):
            torch.testing.assert_close(getattr(rec, k), getattr(ref, k), rtol=1e-4, atol=1e-5, msg=k)
    bufs = {g.out.untyped_storage().data_ptr() for g in gm._graphs.values()}
    sub = SimpleNamespace(x=first.x[:4], step=first.step[:4], group=first.group[:4])
    a = graphed.evaluate_records(gm, sub, cond, unc)[0]
    a0 = a.clone()
    graphed.evaluate_records(gm, SimpleNamespace(x=first.x[4:8] * 2, step=first.step[4:8], group=first.group[4:8]),
                             cond, unc)
    assert torch.equal(a, a0)
    for t in (a, first.f_old, first.x0, second.f_old):
        assert t.untyped_storage().data_ptr() not in bufs


@pytest.mark.gpu
@cuda
def test_cuda_capture_while_another_thread_uses_cuda():
    """capture_error_mode="thread_local": a reward thread's CUDA work (allocations, syncs) during a
    capture neither invalidates it nor fails."""
    import threading
    from test_engine_graphs import Net
    stop, errors = threading.Event(), []

    def reward_worker():
        try:
            while not stop.is_set():
                y = torch.randn(256, 256, device="cuda")
                float((y @ y).sum())          # a host sync, as a reward's .item() / .cpu()
        except Exception as e:                # noqa: BLE001
            errors.append(e)

    th = threading.Thread(target=reward_worker)
    th.start()
    try:
        model = Net().cuda()
        spec = PlanSpec(kind="branch", num_steps=10, groups=2, trunks=3, k=(6,) * 9 + (0,))
        eng = RolloutEngine(model, flow(), compile_plan(spec), seed=3, device="cuda", graphs=True)
        for _ in range(3):
            eng.model.reset()
            rec = eng.run(eng.initial_latents(LATENT), _cond(spec).cuda())
    finally:
        stop.set()
        th.join()
    assert not errors and torch.isfinite(rec.x0).all() and eng.model.captures >= 3


@pytest.mark.gpu
@cuda
def test_cuda_changing_plans_keep_a_bounded_set_of_graphs():
    """Allocator-like K moves on the GPU: one GraphedModel across the epochs' engines holds only
    power-of-two shapes, at most ``bit_length`` of the widest step seen, stale ones freed."""
    from test_engine_graphs import Net
    model = Net().cuda()
    g = torch.Generator().manual_seed(0)
    k, widest = [6] * 9 + [0], 0
    for epoch in range(12):
        k = [max(0, min(10, v + int(torch.randint(-3, 3, (1,), generator=g)))) for v in k[:9]] + [0]
        k[8] = max(k[8], 1)
        spec = PlanSpec(kind="branch", num_steps=10, groups=2, trunks=4, k=tuple(k))
        eng = RolloutEngine(model, flow(), compile_plan(spec), seed=3, device="cuda", graphs=True)
        model = eng.model
        widest = max(widest, max(eng.plan.rows))
        rec = eng.run(eng.initial_latents(LATENT), _cond(spec).cuda(), epoch=epoch)
        assert torch.isfinite(rec.x0).all()
        assert all(r & (r - 1) == 0 for r in model.shapes) and model.num_graphs <= widest.bit_length()
    assert model.captures == model.num_graphs + model.frees
