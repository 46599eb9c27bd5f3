"""CUDA-graph replay of the rollout model (rsm_fast.engine.graphs): a transparent pass-through on
CPU; on CUDA, replay equals eager, in-place parameter updates are seen, reset() re-captures, and
the graphed rollout loop never syncs with the host."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from rsm_fast import schedules as S
from rsm_fast import transitions as T
from rsm_fast.engine.graphs import GraphedModel
from rsm_fast.engine.plan import PlanSpec, compile_plan
from rsm_fast.engine.rollout import RolloutEngine
from test_engine import LATENT, PLANS, TinyModel, _cond

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class Net(nn.Module):
    """Like TinyModel but built on GEMMs (what a real model replays inside a graph, and what TF32
    would change) and device-agnostic (no tensors created inside forward)."""

    def __init__(self, d=18, c=4):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w1 = nn.Parameter(torch.randn(d + 1 + c, 64, generator=g) * 0.2)
        self.w2 = nn.Parameter(torch.randn(64, d, generator=g) * 0.2)

    def forward(self, x, t, cond):
        B = x.shape[0]
        h = torch.cat([x.reshape(B, -1), (t / 1000.0)[:, None].to(x.dtype), cond], 1)
        return (torch.tanh(h @ self.w1) @ self.w2).reshape(x.shape)


def _flow():
    return T.flow_grpo_sde(S.rf_sigmas(10, 3.0), noise_level=0.7)


# -- CPU: pass-through ------------------------------------------------------------------------
def test_passthrough_on_cpu_is_identical():
    m = TinyModel()
    gm = GraphedModel(m)
    x, t, c = torch.randn(5, *LATENT), torch.rand(5) * 1000, torch.randn(5, 4)
    assert torch.equal(gm(x, t, c), m(x, t, c))
    assert torch.equal(gm(x, t, None), m(x, t, None))
    assert gm.num_graphs == 0 and gm.captures == 0
    assert list(gm.parameters()) == list(m.parameters())    # attributes forward to the model


@pytest.mark.parametrize("cfg", [None, 4.5])
@pytest.mark.parametrize("name", ["sde", "branch"])
def test_engine_graphs_flag_on_cpu_is_bitwise_eager(name, cfg):
    spec = PLANS[name]
    runs = []
    for graphs in (False, True):
        eng = RolloutEngine(TinyModel(), _flow(), compile_plan(spec), chunk_size=4, seed=3, cfg_scale=cfg,
                            graphs=graphs)
        assert eng.graphs_active is False
        runs.append(eng.run(cond=_cond(spec), uncond=torch.zeros(1, 4), latent_shape=LATENT))
    a, b = runs
    for k in ("x", "z", "f_old", "log_prob", "x0"):
        assert torch.equal(getattr(a, k), getattr(b, k)), k
    assert a.nfe == b.nfe


# -- CUDA ---------------------------------------------------------------------------------------
def _gpu_engine(graphs, model, cfg=4.5, chunk=4):
    spec = PlanSpec(kind="branch", num_steps=10, groups=2, trunks=1, k=(3, 2, 4, 0, 0, 0, 0, 0, 0, 0))
    return spec, RolloutEngine(model, _flow(), compile_plan(spec), chunk_size=chunk, seed=3, cfg_scale=cfg,
                               device="cuda", graphs=graphs)


def _gpu_inputs(spec, eng):
    cond = _cond(spec).cuda()
    return eng.initial_latents(LATENT), cond, torch.zeros(1, 4, device="cuda")


def _close(a, b):
    for k in ("x", "z", "f_old", "log_prob", "x0"):
        torch.testing.assert_close(getattr(a, k), getattr(b, k), rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("cfg,chunk", [(4.5, 4), (None, 4), (4.5, 64)])
def test_graph_replay_equals_eager_in_a_branch_plan(cfg, chunk):
    torch.backends.cuda.matmul.allow_tf32 = False
    model = Net().cuda()
    spec, eager = _gpu_engine(False, model, cfg, chunk)
    _, graphed = _gpu_engine(True, model, cfg, chunk)
    assert graphed.graphs_active and isinstance(graphed.model, GraphedModel)
    x, cond, unc = _gpu_inputs(spec, eager)
    ref = eager.run(x, cond, unc)
    first = graphed.run(x, cond, unc)      # captures (one graph per chunk shape)
    second = graphed.run(x, cond, unc)     # replays only
    assert graphed.model.captures == graphed.model.num_graphs >= 1
    _close(first, ref)
    _close(second, ref)
    assert graphed.model.captures == graphed.model.num_graphs   # no re-capture on the second run


@pytest.mark.gpu
@cuda
def test_inplace_parameter_update_is_seen_and_reset_recaptures():
    torch.backends.cuda.matmul.allow_tf32 = False
    model = Net().cuda()
    spec, eager = _gpu_engine(False, model)
    _, graphed = _gpu_engine(True, model)
    x, cond, unc = _gpu_inputs(spec, eager)
    before = graphed.run(x, cond, unc)
    with torch.no_grad():                  # what optimizer.step() does: update the storage in place
        model.w1.mul_(1.5).add_(0.01)
    after = graphed.run(x, cond, unc)
    _close(after, eager.run(x, cond, unc))
    assert not torch.allclose(after.x0, before.x0)
    n = graphed.model.captures
    model.w2 = nn.Parameter(model.w2.detach() * 0.5)   # replaced by assignment: needs reset()
    graphed.model.reset()
    _close(graphed.run(x, cond, unc), eager.run(x, cond, unc))
    assert graphed.model.captures > n


@pytest.mark.gpu
@cuda
def test_graphed_rollout_loop_has_no_host_sync():
    model = Net().cuda()
    spec, graphed = _gpu_engine(True, model)
    x, cond, unc = _gpu_inputs(spec, graphed)
    graphed.run(x, cond, unc)              # capture outside the guard (capture itself synchronises)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        rec = graphed.run(x, cond, unc)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(rec.x0).all()
