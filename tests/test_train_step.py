"""The optimizer side of an epoch (rsm_fast/train_step.py): compiled regions against eager (toy
task with Inductor, tiny digits UNet with the aot_eager backend), recompiles after warm-up,
gradient accumulation, the EMA, config errors and the non-finite guard."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from rsm_fast.families import TrajectoryRows
from rsm_fast.config import ConfigError, build_config
from rsm_fast.train_step import EMA, TrainStep, compile_policy, find_regions, graphs_compiled, micro_batches
from rsm_fast.trainer import NonFiniteError, Trainer, _slice_coeffs, _slice_rows

TOY = ["train.threads=1", "task.eval_samples=64", "policy.hidden=16", "train.batch_size=32"]
# unconditional tiny digits: 4 trajectories x 2 trained steps = 8 rows, LoRA on the attention
DIGITS = ["task.name=digits-ddim", "task.condition=none", "task.reward=digit_logprob:3", "task.num_steps=3",
          "train.batch_size=4", "method.group_size=2", "task.eval_samples=4", "train.threads=1", "train.lr=0.01"]

pytestmark = pytest.mark.usefixtures("one_thread")   # conftest: tiny models, one intra-op thread


def _trainer(preset="grpo", *sets, base=TOY):
    return Trainer(build_config(preset, None, list(base) + list(sets)))


def _params(tr):
    return {n: p.detach().clone() for n, p in tr.policy.named_parameters() if p.requires_grad}


def _grads(tr):
    """The last inner update's (clipped) gradient: left in .grad until the next update."""
    return {n: p.grad.detach().clone() for n, p in tr.policy.named_parameters() if p.requires_grad}


def _close(a: dict, b: dict, **tol):
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(b[n], a[n], **tol, msg=lambda m, n=n: f"{n}: {m}")


# -- micro-batches and gradient accumulation ------------------------------------------------------
@pytest.mark.parametrize("M, k", [(10, 3), (7, 7), (5, 9), (1, 1), (64, 4)])
def test_micro_batches_cover_the_rows(M, k):
    parts = micro_batches(M, k)
    idx = [i for sl in parts for i in range(sl.start, sl.stop)]
    assert idx == list(range(M)) and all(sl.stop > sl.start for sl in parts)
    assert max(sl.stop - sl.start for sl in parts) - min(sl.stop - sl.start for sl in parts) <= 1


def test_grad_accumulation_is_the_full_batch_gradient_in_float64():
    """A weighted mean loss over 11 rows split 4/4/3: the accumulated gradient and the update equal
    the single batch's to float64 rounding."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x, y = torch.randn(11, 3, dtype=torch.float64), torch.randn(11, 2, dtype=torch.float64)
    w = torch.rand(11, dtype=torch.float64)

    def run(k):
        m = copy.deepcopy(net)
        params = list(m.parameters())
        step = TrainStep(m, params, torch.optim.SGD(params, lr=0.1), grad_accum=k, max_grad_norm=0.0)

        def loss_fn(sl):       # per-row weights, mean over the micro-batch's rows
            return (w[sl] * (m(x[sl]) - y[sl]).square().sum(1)).mean(), None

        stats, clipped = step.run(11, 1, loss_fn, lambda n: None, RuntimeError, 0)
        assert clipped is None
        return stats, [p.grad.clone() for p in params] + [p.detach().clone() for p in params]

    s1, t1 = run(1)
    s3, t3 = run(3)
    assert s3["loss"] == pytest.approx(s1["loss"], rel=1e-14)
    assert s3["grad_norm"] == pytest.approx(s1["grad_norm"], rel=1e-13)
    for a, b in zip(t1, t3):
        torch.testing.assert_close(b, a, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("preset", ["grpo", "rsm-uniform-realloc", "rsm-fo-terminal"])
def test_grad_accumulation_gives_the_full_batch_update(preset):
    """k micro-batches in the trainer: the same loss, gradient, clip mask (over all rows) and
    weights after two inner updates (row weights K-bar/K_i and first-order targets are sliced
    with their rows)."""
    ref = _trainer(preset, "train.inner_updates=2")
    acc = _trainer(preset, "train.inner_updates=2", "train.grad_accum=3")
    a, b = ref.epoch(), acc.epoch()
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)    # on-policy GRPO loss ~ 1e-7: fp32 sums
    assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    assert b.get("clip_frac_last") == a.get("clip_frac_last")
    assert acc.nfe == ref.nfe                                            # the same rows are evaluated
    if ref._last_clipped is None:
        assert preset == "rsm-fo-terminal" and acc._last_clipped is None
    else:
        assert acc._last_clipped.shape == (a["records"],)
        assert torch.equal(acc._last_clipped, ref._last_clipped)
    _close(_grads(ref), _grads(acc), rtol=1e-4, atol=1e-7)
    _close(_params(ref), _params(acc), rtol=1e-4, atol=1e-6)


# -- EMA ------------------------------------------------------------------------------------------
def test_ema_matches_rsm_code_average():
    """RSM-code's EMAModuleWrapper: after optimizer step n, if (n + 1) % every == 0,
    ema += (1 - min(decay, (1 + n) / (10 + n))) (theta - ema)."""
    p = [torch.zeros(3), torch.ones(2)]
    ema = EMA(p, decay=0.9, every=3)
    shadow = [x.clone().double() for x in p]
    for n in range(1, 40):
        with torch.no_grad():
            p[0].add_(1.0)
            p[1].mul_(1.1)
        ema.update()
        if (n + 1) % 3 == 0:
            d = min(0.9, (1 + n) / (10 + n))
            shadow = [d * s + (1 - d) * x.double() for s, x in zip(shadow, p)]
    assert ema.steps == 39 and ema.decay_at(2) == pytest.approx(3 / 12) and ema.decay_at(200) == 0.9
    for s, e in zip(shadow, ema.shadow):
        torch.testing.assert_close(e, s.float(), rtol=1e-6, atol=1e-5)
    raw = [x.clone() for x in p]
    with ema.applied():
        torch.testing.assert_close(p[0], shadow[0].float(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(p[0], raw[0])                              # restored afterwards


def test_ema_weights_evaluate_and_checkpoint(tmp_path):
    tr = _trainer("grpo", "train.ema_decay=0.5", "train.inner_updates=2")
    for _ in range(2):
        tr.epoch()
    raw = _params(tr)
    ev = tr.evaluate(64)
    assert all(torch.equal(raw[n], p) for n, p in _params(tr).items())   # weights restored
    assert ev != tr._evaluate(64)                                         # the raw weights evaluate differently
    with torch.no_grad():                                                 # ... and the EMA weights give ev
        for p, s in zip(tr.params, tr.step.ema.shadow):
            p.copy_(s)
    assert tr._evaluate(64) == ev
    with torch.no_grad():
        for p, n in zip(tr.params, [n for n, q in tr.policy.named_parameters() if q.requires_grad]):
            p.copy_(raw[n])
    state = tr.state_dict()
    assert state["ema"]["steps"] == 4
    assert all(torch.equal(state["policy"][n], raw[n]) for n in raw)      # 'policy' = raw weights (resume)
    torch.save(state, tmp_path / "ck.pt")
    back = _trainer("grpo", "train.ema_decay=0.5", "train.inner_updates=2")
    back.load_state_dict(torch.load(tmp_path / "ck.pt", weights_only=False))
    for a, b in zip(back.step.ema.shadow, tr.step.ema.shadow):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="ema"):
        _trainer("grpo").load_state_dict(state)


# -- compiled regions -------------------------------------------------------------------------------
class _Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        return x + torch.tanh(self.lin(x))


class _Net(nn.Module):
    def __init__(self, d=8, n=3):
        super().__init__()
        self.blocks = nn.ModuleList(_Block(d) for _ in range(n))
        self.head = nn.Sequential(nn.Linear(d, d), nn.SiLU())

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def test_regional_compile_reuses_one_graph_per_block_type():
    torch.manual_seed(0)
    net = _Net()
    ref = copy.deepcopy(net)
    regions = compile_policy(net, "regional", backend="aot_eager")
    assert regions.names == ["blocks.0", "blocks.1", "blocks.2"]
    assert [n for n, _ in find_regions(net, "full")] == ["<policy>"]
    assert list(net.state_dict()) == list(ref.state_dict())             # checkpoints / LoRA names unchanged
    g0 = graphs_compiled()
    with regions.active():
        for n in (5, 9, 4):                                              # dynamic batch: any row count >= 2
            x = torch.randn(n, 8, requires_grad=True)
            torch.testing.assert_close(net(x), ref(x), rtol=1e-6, atol=1e-7)
            (g1,) = torch.autograd.grad(net(x).square().sum(), x)
            (g2,) = torch.autograd.grad(ref(x).square().sum(), x)
            torch.testing.assert_close(g1, g2, rtol=1e-6, atol=1e-7)
    assert graphs_compiled() - g0 == 1                                   # three blocks, three sizes: one graph
    assert all("forward" not in b.__dict__ for b in net.blocks)         # eager again outside the step
    net(torch.randn(3, 8))
    assert graphs_compiled() - g0 == 1


@pytest.mark.parametrize("mode", ["regional", "full"])
def test_compiled_toy_step_matches_eager_and_stops_recompiling(mode):
    """Inductor on the 2-D task (its MLP has no model-code blocks: both modes compile the policy
    forward). Same loss, gradients and weights as eager; after the first epoch no new graphs,
    although the online allocator changes the number of rows every epoch; the rollout and the
    evaluation stay eager (no graphs)."""
    alloc = ("train.inner_updates=2", "rollout.alloc_units=nfe")        # NFE budget: the row count moves
    eager = _trainer("rsm-evr", *alloc)
    comp = _trainer("rsm-evr", *alloc, f"train.compile={mode}")
    assert comp.step.compiled == ["<policy>"]
    rows, recompiles = [], []
    for _ in range(4):
        a, b = eager.epoch(), comp.epoch()
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-7)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
        assert b["onpolicy_logratio_absmax"] < 1e-5      # eager rollout vs compiled forward: ~1e-6 (clip_eps 1e-4)
        _close(_grads(eager), _grads(comp), rtol=1e-5, atol=1e-7)
        rows.append(b["records"])
        recompiles.append(b["recompiles"])
    _close(_params(eager), _params(comp), rtol=1e-5, atol=1e-6)
    assert len(set(rows)) > 1, rows                                       # the row count did change
    # epoch 0 compiles (unless an earlier test in this process compiled the same forward already)
    assert recompiles[1:] == [0, 0, 0], recompiles
    assert "recompiles" not in eager.epoch()
    g0 = graphs_compiled()
    comp.evaluate(64)
    assert graphs_compiled() == g0


SD3 = ["task.name=diffusers", "task.model=sd3-tiny", "task.num_steps=3", "train.batch_size=4", "method.group_size=2",
       "task.eval_samples=2", "train.threads=1", "policy.lora_rank=4", "train.lr=0.01"]
DIGITS_REGIONS = ["down_blocks.0", "down_blocks.1", "up_blocks.0", "up_blocks.1", "mid_block.attentions.0",
                  "mid_block.resnets.0", "mid_block.resnets.1"]


@pytest.mark.parametrize("base, mode, regions", [
    (DIGITS, "regional", DIGITS_REGIONS),
    (DIGITS, "full", ["<policy>"]),
    pytest.param(SD3, "regional", ["transformer_blocks.0", "transformer_blocks.1"],
                 marks=pytest.mark.slow),   # ~15 s of tracing: the transformer-block case of regional
], ids=["digits-regional", "digits-full", "sd3-tiny-regional"])
def test_compiled_image_model_step_matches_eager(monkeypatch, base, mode, regions):
    """The tiny digits UNet and the tiny SD3 transformer (LoRA) under Dynamo + AOTAutograd
    (aot_eager backend: the same capture, graphs and compiled backward as Inductor, without kernel
    generation): the same loss and gradients as eager in two epochs of one inner update each (a
    second update would compare Adam's first, sign-like steps on LoRA gradients that are ~0 up to
    rounding); no new graph in the second epoch or for fewer rows."""
    monkeypatch.setenv("RSM_FAST_COMPILE_BACKEND", "aot_eager")
    eager = _trainer("grpo", "train.inner_updates=1", base=base)
    comp = _trainer("grpo", "train.inner_updates=1", f"train.compile={mode}", base=base)
    assert comp.step.compiled == regions
    for e in range(2):
        if e:   # Adam turns float-rounding differences of ~0 LoRA gradients into lr-sized steps: resync
            comp.load_state_dict(eager.state_dict())
        a, b = eager.epoch(), comp.epoch()
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-7)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
        _close(_grads(eager), _grads(comp), rtol=1e-5, atol=1e-7)
        assert b["recompiles"] > 0 if e == 0 else b["recompiles"] == 0, b["recompiles"]
    # fewer rows (as the online allocator would give): the dynamic batch dim needs no new graph
    captured = {}
    real = comp._optimize

    def grab(*a):
        captured["args"] = a
        return real(*a)

    monkeypatch.setattr(comp, "_optimize", grab)
    comp.epoch()
    (tr_rows,) = captured["args"]          # rsm_fast.families.TrajectoryRows
    rows, c, shift, group = tr_rows.rows, tr_rows.coeffs, tr_rows.shift, tr_rows.group
    sl = slice(0, rows.x.shape[0] - 3)
    st = real(TrajectoryRows(_slice_rows(rows, sl), _slice_coeffs(c, sl), shift, group[sl]))
    assert st["recompiles"] == 0 and comp._last_clipped.shape == (rows.x.shape[0] - 3,)


# -- config and the non-finite guard -----------------------------------------------------------------
@pytest.mark.parametrize("sets, field", [
    (["train.compile=fast"], "train.compile"),
    (["train.compile=0"], "train.compile"),
    (["train.grad_accum=0"], "train.grad_accum"),
    (["train.grad_accum=1.5"], "train.grad_accum"),
    (["train.ema_decay=1.0"], "train.ema_decay"),
    (["train.ema_decay=-0.1"], "train.ema_decay"),
    (["train.ema_every=0"], "train.ema_every"),
])
def test_bad_step_config_names_the_field(sets, field):
    with pytest.raises(ConfigError) as e:
        build_config("grpo", None, sets)
    assert field in str(e.value) and "\n" not in str(e.value)


def test_step_config_defaults_and_good_values():
    tc = build_config("grpo", None, ["train.compile=regional", "train.grad_accum=4", "train.ema_decay=0.9",
                                     "train.ema_every=8"]).train
    assert (tc.compile, tc.grad_accum, tc.ema_decay, tc.ema_every) == ("regional", 4, 0.9, 8)
    d = build_config("grpo", None, []).train
    assert (d.compile, d.grad_accum, d.ema_decay, d.ema_every) == ("off", 1, 0.0, 1)


def test_nonfinite_loss_with_accumulation_leaves_weights_and_ema(monkeypatch):
    tr = _trainer("grpo", "train.grad_accum=2", "train.ema_decay=0.9")
    before = _params(tr)
    shadow = [s.clone() for s in tr.step.ema.shadow]
    real = tr._loss
    calls = {"n": 0}

    def bad(*a, **k):       # the second micro-batch's loss is NaN
        loss, out = real(*a, **k)
        calls["n"] += 1
        return (loss * float("nan"), out) if calls["n"] == 2 else (loss, out)

    monkeypatch.setattr(tr, "_loss", bad)
    with pytest.raises(NonFiniteError, match=r"loss became nan at epoch 0 \(update 0\); weights left unchanged"):
        tr.epoch()
    assert all(torch.equal(before[n], p) for n, p in _params(tr).items())
    assert all(p.grad is None for p in tr.params)
    assert all(torch.equal(a, b) for a, b in zip(shadow, tr.step.ema.shadow)) and tr.step.ema.steps == 0


def test_compile_benchmark_runs(tmp_path, monkeypatch):
    """bench/bench_compile.py still runs (toy, one repeat, aot_eager): its table has every mode,
    the compiled modes match eager and nothing recompiles after the warm-up."""
    import importlib.util
    import json
    from pathlib import Path

    monkeypatch.setenv("RSM_FAST_COMPILE_BACKEND", "aot_eager")
    path = Path(__file__).resolve().parents[1] / "bench" / "bench_compile.py"
    spec = importlib.util.spec_from_file_location("_bench_compile", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setitem(mod.CASES, "toy2d", ("grpo", TOY))
    assert mod.main(["--cases", "toy2d", "--repeats", "2", "--warmup", "1", "--out", str(tmp_path / "c")]) == 0
    res = json.loads((tmp_path / "c.json").read_text())["results"]
    assert [r["mode"] for r in res] == ["off", "regional", "full", "full+loss"]
    for r in res:
        assert r["recompiles_timed"] == 0 and r["recompiles_rows"] == 0
        assert r["grad_norm"] == pytest.approx(res[0]["grad_norm"], rel=1e-5)
    assert "| toy2d |" in (tmp_path / "c.md").read_text()


def test_compile_off_in_yaml_or_set_is_the_string():
    assert build_config("grpo", None, ["train.compile=off"]).train.compile == "off"
    with pytest.raises(ConfigError, match="train.compile"):
        build_config("grpo", None, ["train.compile=yes"])       # YAML true -> 'on', not a choice


# -- the optimizer-step guard: no non-finite parameter survives the step that made it ------------
from rsm_fast.train_step import StepGuard  # noqa: E402


class _Boom(RuntimeError):
    pass


def _guarded(params, opt, loss_fn):
    step = TrainStep(nn.Linear(1, 1), params, opt)
    return step, lambda: step.run(1, 1, lambda sl: (loss_fn(), None), lambda n: None, _Boom, 0)


def _opt_state(opt):
    return {id(p): {k: (v.clone() if torch.is_tensor(v) else v) for k, v in st.items()} for p, st in opt.state.items()}


def test_step_that_makes_weights_nonfinite_is_undone():
    """AdamW with lr 1e30 and decay 1e8: the decay factor 1 - 1e38 fits float32, the product with a
    weight of 10 does not. After two good steps the bad one is undone: weights bit for bit, the
    step count exactly, the moments to float rounding, gradients cleared."""
    w = nn.Parameter(torch.tensor([10.0, -0.5]))
    opt = torch.optim.AdamW([w], lr=1e-2, weight_decay=0.0)
    step, run = _guarded([w], opt, lambda: (w * torch.tensor([1.0, 2.0])).sum())
    run()
    run()
    before, state = w.detach().clone(), _opt_state(opt)
    opt.param_groups[0].update(lr=1e30, weight_decay=1e8)
    with pytest.raises(_Boom, match=r"made 1 of 1 trained parameter tensors non-finite with train\.lr=1e\+30, "
                                    r"train\.weight_decay=1e\+08"):
        run()
    assert torch.equal(w.detach(), before) and w.grad is None
    st = opt.state[w]
    assert float(st["step"]) == float(state[id(w)]["step"]) == 2.0
    torch.testing.assert_close(st["exp_avg"], state[id(w)]["exp_avg"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(st["exp_avg_sq"], state[id(w)]["exp_avg_sq"], rtol=1e-4, atol=1e-9)
    opt.param_groups[0].update(lr=1e-2, weight_decay=0.0)        # training goes on from there
    run()
    assert torch.isfinite(w).all() and float(opt.state[w]["step"]) == 3.0


def test_first_step_undone_drops_the_state_it_created():
    w = nn.Parameter(torch.tensor([10.0]))
    opt = torch.optim.AdamW([w], lr=1e30, weight_decay=1e8)
    _, run = _guarded([w], opt, lambda: w.sum())
    with pytest.raises(_Boom, match="non-finite"):
        run()
    assert torch.equal(w.detach(), torch.tensor([10.0])) and not opt.state


def test_step_that_cannot_be_computed_changes_nothing():
    """lr 1e300: torch's step would raise halfway (the step size overflows float32); the guard
    refuses it first, naming train.lr, with weights and state untouched."""
    w = nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = torch.optim.AdamW([w], lr=1e-2)
    _, run = _guarded([w], opt, lambda: w.square().sum())
    run()
    before, state = w.detach().clone(), _opt_state(opt)
    opt.param_groups[0]["lr"] = 1e300
    with pytest.raises(_Boom, match=r"train\.lr=1e\+300.*step size.*overflows"):
        run()
    assert torch.equal(w.detach(), before)
    assert all(torch.equal(opt.state[w][k], v) for k, v in state[id(w)].items())


def test_other_optimizers_are_restored_from_an_exact_copy():
    w = nn.Parameter(torch.tensor([3.0, -1.0]))
    opt = torch.optim.SGD([w], lr=1e-2, momentum=0.9)
    guard = StepGuard([w], opt)
    assert not guard.invertible
    _, run = _guarded([w], opt, lambda: w.square().sum())
    run()
    before, buf = w.detach().clone(), opt.state[w]["momentum_buffer"].clone()
    opt.param_groups[0]["lr"] = float("inf")
    with pytest.raises(_Boom, match="non-finite"):
        run()
    assert torch.equal(w.detach(), before) and torch.equal(opt.state[w]["momentum_buffer"], buf)


def test_guard_counts_with_one_reduction():
    ps = [torch.tensor([1e38, 3e38]), torch.tensor([float("nan")]), torch.tensor([float("-inf"), 0.0])]
    assert StepGuard(ps, torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=1.0)).count_nonfinite() == 2


def test_huge_lr_stops_the_trainer_with_the_weights_of_before():
    """train.lr=1e300 passes validation (it is finite); the first optimizer step stops the run,
    naming train.lr, and the weights are those before it; the EMA never saw it."""
    tr = _trainer("grpo", "train.lr=1e300", "train.ema_decay=0.5")
    before = _params(tr)
    shadow = [s.clone() for s in tr.step.ema.shadow]
    with pytest.raises(NonFiniteError) as e:
        tr.epoch()
    assert "train.lr=1e+300" in str(e.value) and "\n" not in str(e.value)
    assert all(torch.equal(before[n], p) for n, p in _params(tr).items())
    assert all(torch.equal(a, b) for a, b in zip(shadow, tr.step.ema.shadow)) and tr.step.ema.steps == 0


def test_nonfinite_weights_after_a_real_epoch_are_undone():
    """The post-step check on the trainer: a weight of 10 times the decay factor 1 - 1e38."""
    tr = _trainer("grpo", "train.lr=1e30", "train.weight_decay=1e8")
    with torch.no_grad():
        tr.policy.head.bias.fill_(10.0)
    before = _params(tr)
    with pytest.raises(NonFiniteError, match="non-finite with train.lr=1e.30"):
        tr.epoch()
    assert all(torch.equal(before[n], p) for n, p in _params(tr).items())
    assert all(torch.isfinite(v).all() for v in tr.state_dict()["policy"].values())


def test_huge_lr_on_the_command_line(tmp_path, capsys):
    from rsm_fast.train import main

    out = tmp_path / "run"
    rc = main(["--preset", "grpo", "--quiet", "--out", str(out), "--set", "train.lr=1e300"]
              + [f"--set={s}" for s in TOY + ["train.epochs=2", "task.num_steps=10"]])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == 1 and len(lines) == 1 and "train.lr" in lines[0] and "Traceback" not in err
    for f in out.rglob("*.pt"):       # whatever a run directory kept holds finite weights only
        state = torch.load(f, map_location="cpu", weights_only=False)
        assert all(torch.isfinite(v).all() for v in state.get("policy", {}).values())
