"""Regional compile keeps channel and spatial sizes static (issue 21 item 7; rsm_fast/train_step.py):
one block class at several widths and resolutions (a toy UNet, pure torch) compiles one graph per
block shape with only the row dim symbolic; a new row count (also an uneven micro-batch) compiles
nothing; outputs and gradients are eager's; more block shapes than Dynamo's default recompile
limit all compile (no silent eager fallback)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rsm_fast.train_step import CompiledRegions, TrainStep, compile_policy, graphs_compiled

pytestmark = pytest.mark.usefixtures("one_thread")   # conftest: tiny models, one intra-op thread


class Block(nn.Module):
    """A down block: used at C = 8 -> 8 (twice), 8 -> 16, 16 -> 32 and H = 8, 8, 4, 2."""

    def __init__(self, cin: int, cout: int, demb: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(demb, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(x)) + self.emb(emb)[:, :, None, None]
        return self.skip(x) + self.conv2(F.silu(h))


class UpBlock(nn.Module):
    """An up block taking its skip connection in a tuple (as diffusers' ``res_hidden_states_tuple``):
    the rows of tensors nested in arguments are dynamic too."""

    def __init__(self, cin: int, cskip: int, cout: int):
        super().__init__()
        self.block = Block(cin + cskip, cout)

    def forward(self, x, emb, res_hidden_states_tuple=()):
        return self.block(torch.cat([x, res_hidden_states_tuple[-1]], 1), emb)


class ToyUNet(nn.Module):
    # distinct block shapes: Block 8->8@8, 8->16@4, 16->32@2; UpBlock (32+32)->16@2, (16+16)->8@4, (8+8)->8@8
    SHAPES = 6

    def __init__(self):
        super().__init__()
        self.inp = nn.Conv2d(1, 8, 3, padding=1)
        self.down = nn.ModuleList([Block(8, 8), Block(8, 8), Block(8, 16), Block(16, 32)])
        self.up = nn.ModuleList([UpBlock(32, 32, 16), UpBlock(16, 16, 8), UpBlock(8, 8, 8), UpBlock(8, 8, 8)])
        self.out = nn.Conv2d(8, 1, 3, padding=1)

    def forward(self, x, t):
        emb = torch.stack([t, t.sin(), t.cos(), t * t], -1)
        h, skips = self.inp(x), []
        for i, b in enumerate(self.down):
            if i in (2, 3):
                h = F.avg_pool2d(h, 2)
            h = b(h, emb)
            skips.append(h)
        for i, b in enumerate(self.up):
            if i in (1, 2):
                h = F.interpolate(h, scale_factor=2.0)
            h = b(h, emb, res_hidden_states_tuple=(skips.pop(),))
        return self.out(h)


class Recorder:
    """A Dynamo backend (aot_eager underneath) that keeps every graph's placeholder example values."""

    def __init__(self):
        self.graphs: list[list[tuple[str, object]]] = []

    def __call__(self, gm, example_inputs):
        self.graphs.append([(n.name, n.meta.get("example_value")) for n in gm.graph.nodes if n.op == "placeholder"])
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    def symbolic_dims(self) -> list[tuple[str, int]]:
        """``(placeholder, dim)`` of every size that is not a plain int, in every graph."""
        return [(name, d) for g in self.graphs for name, v in g if isinstance(v, torch.Tensor)
                for d, s in enumerate(v.shape) if not isinstance(s, int)]


@pytest.fixture
def fresh_dynamo():
    """Exact graph counts: no compiled code of these classes from an earlier test."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _data(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.rand(n, generator=g)


def _step(net, rec, grad_accum=1):
    params = list(net.parameters())
    return TrainStep(net, params, torch.optim.SGD(params, lr=0.0), compile="regional", backend=rec,
                     grad_accum=grad_accum, max_grad_norm=0.0)


def _run(step, net, M):
    x, t = _data(M, seed=M)
    return step.run(M, 1, lambda sl: (net(x[sl], t[sl]).square().mean(), None), lambda n: None, RuntimeError, 0)[0]


def test_only_the_row_dim_is_symbolic_and_one_graph_per_block_shape(fresh_dynamo):
    """Warm-up at 8 rows in micro-batches of 4, then 7 rows (4 + 3): every graph has concrete
    channel / spatial / parameter sizes and a symbolic row dim; one graph per block shape."""
    torch.manual_seed(0)
    net, rec = ToyUNet(), Recorder()
    step = _step(net, rec, grad_accum=2)
    assert step.compiled == [f"down.{i}" for i in range(4)] + [f"up.{i}" for i in range(4)]
    first = _run(step, net, 8)
    second = _run(step, net, 7)
    sym = rec.symbolic_dims()
    assert sym and all(d == 0 for _, d in sym), sym                 # rows symbolic, nothing else
    assert not [n for n, _ in sym if "parameters" in n], sym         # parameter shapes static
    rows_args = {n for n, _ in sym}
    assert any("res_hidden_states_tuple" in n for n in rows_args), rows_args   # nested tensors: rows too
    assert len(rec.graphs) == ToyUNet.SHAPES, [[tuple(v.shape) for _, v in g if isinstance(v, torch.Tensor)]
                                              for g in rec.graphs]
    assert first["recompiles"] == ToyUNet.SHAPES and first["compiled_shapes"] == ToyUNet.SHAPES
    assert second["recompiles"] == 0 and second["compiled_shapes"] == ToyUNet.SHAPES


def test_new_row_counts_compile_nothing_and_match_eager(fresh_dynamo):
    """After the warm-up no row count (uneven micro-batches included) compiles a graph; the loss and
    the gradients are the eager model's to float rounding."""
    torch.manual_seed(0)
    net, rec = ToyUNet(), Recorder()
    ref = copy.deepcopy(net)
    assert _run(_step(net, rec), net, 6)["recompiles"] == ToyUNet.SHAPES
    for M, k in [(5, 1), (7, 2), (11, 3), (9, 4), (16, 2)]:
        step = _step(net, rec, grad_accum=k)
        st = _run(step, net, M)
        assert st["recompiles"] == 0, (M, k, st)
        x, t = _data(M, seed=M)
        ref.zero_grad(set_to_none=True)
        loss = ref(x, t).square().mean()
        loss.backward()
        assert st["loss"] == pytest.approx(float(loss.detach()), rel=1e-5)
        for (name, p), q in zip(net.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")
    with step.regions.active():
        x, t = _data(3, seed=1)
        torch.testing.assert_close(net(x, t), ref(x, t), rtol=1e-6, atol=1e-6)
    assert len(rec.graphs) == ToyUNet.SHAPES
    assert all(d == 0 for _, d in rec.symbolic_dims())


class Wide(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        return x + torch.tanh(self.lin(x))


class Ladder(nn.Module):
    """One block class at 12 widths: more shapes than Dynamo's default recompile limit (8)."""

    def __init__(self, widths=tuple(range(2, 14))):
        super().__init__()
        self.blocks = nn.ModuleList(Wide(d) for d in widths)

    def forward(self, x):
        return sum(b(x[:, :b.lin.in_features]).sum(1) for b in self.blocks)


def test_many_block_shapes_all_compile(fresh_dynamo):
    """12 widths of one class: 12 static graphs, none left to eager by the recompile limit."""
    torch.manual_seed(0)
    net, rec = Ladder(), Recorder()
    ref = copy.deepcopy(net)
    regions = compile_policy(net, "regional", backend=rec)
    g0 = graphs_compiled()
    with regions.active():
        for n in (5, 3):
            x = torch.randn(n, 16)
            torch.testing.assert_close(net(x), ref(x), rtol=1e-6, atol=1e-6)
    assert graphs_compiled() - g0 == len(rec.graphs) == 12
    assert all(d == 0 for _, d in rec.symbolic_dims())


def test_recompile_limit_hit_is_an_error_not_eager(fresh_dynamo):
    """Should the raised limit still be hit, the step fails naming the class (never a silent eager run)."""
    net = Ladder()
    regions = compile_policy(net, "regional", backend="aot_eager")
    regions.recompile_limit = 3
    with regions.active(), pytest.raises(RuntimeError, match="Wide.*recompile limit"):
        net(torch.randn(4, 16))


def test_regions_keep_the_class_compile(fresh_dynamo):
    """Still one compiled function per block class (every repetition with the same shapes reuses a graph)."""
    regions = CompiledRegions(ToyUNet(), "regional", backend="aot_eager")
    assert sorted(c.__name__ for c in regions._fns) == ["Block", "UpBlock"]
