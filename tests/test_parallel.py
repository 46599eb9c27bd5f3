"""rsm_fast.parallel on CPU / gloo with real processes (``torchrun --standalone``).

Three launches, each shared by the tests that read it (module-scoped fixtures):

* ``ddp`` (2 ranks): composable DDP on the 2-D task's MLP and on a rank-4 LoRA of the digits UNet,
  each without and with gradient accumulation 2; every step also calls the module under
  ``no_grad`` (a rollout before the training forward, and a rollout / the LoRA-gated reference
  between the forward and its backward). Then DCP checkpoints: save on 2 ranks, load on the same 2,
  on 1 rank under torchrun (second launch ``ddp_load``) and in this plain process.
* ``fsdp`` (2 ranks): FSDP2 full fine-tuning of the digits UNet against a sharded frozen reference,
  without and with accumulation; the trainer-side DTensor facts; DCP save / load on 2 ranks and the
  2-rank checkpoint loaded in this plain process.

Ranks see uneven halves of a global batch (6 + 4 rows) with the loss ``sum(rows) * world / B``, so
the averaged gradient is the full-batch mean; the one-process reference (computed here) trains on
all rows at once. Each worker is this file, imported by a stub script written to ``tmp_path``.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent
B = 10                      # global batch rows
RANK_ROWS = (slice(0, 6), slice(6, 10))
STEPS = 3
LR = 1e-3
MAX_NORM = 0.5
TOL = 1e-5                  # relative, per tensor (float32 all-reduce order)
CASES_DDP = ("toy_k1", "toy_k2", "lora_k1", "lora_k2")
CASES_FSDP = ("full_k1", "full_k2")


# ------------------------------------------------------------------------------------------------
# The experiments (run by the workers and, in one process, by the tests)
# ------------------------------------------------------------------------------------------------
@dataclass
class Case:
    module: torch.nn.Module
    params: list                                   # trainable, in a fixed order
    names: list                                    # their names
    batch: Callable[[int], tuple]
    rows: Callable[[tuple, slice], torch.Tensor]   # per-row losses (with grad) of rows sl
    rollout: Callable[[tuple], None]               # a no-grad call of the policy on the whole batch


def _trainable(module):
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    return [p for _, p in named], [n for n, _ in named]


def toy_case() -> Case:
    from rsm_fast.tasks.toy2d import Toy2D, Toy2DConfig

    torch.manual_seed(0)
    net = Toy2D(Toy2DConfig(num_steps=10)).build_policy(hidden=32, layers=2, emb_dim=8)
    with torch.no_grad():                  # the head starts at zero: give the body a gradient
        net.head.weight.normal_(0.0, 0.3)
        net.head.bias.normal_(0.0, 0.3)

    def batch(step):
        g = torch.Generator().manual_seed(1000 + step)
        return torch.randn(B, 2, generator=g), torch.randint(0, 500, (B,), generator=g), torch.randn(B, 2, generator=g)

    def rows(b, sl):
        x, t, y = b
        out = net(x[sl], t[sl])
        with torch.no_grad():              # a call between the training forward and its backward
            net(x, t)
        return ((out - y[sl]) ** 2).sum(1)

    def rollout(b):
        with torch.no_grad():
            net(b[0], b[1])

    return Case(net, *_trainable(net), batch, rows, rollout)


def _digits_batch(step):
    g = torch.Generator().manual_seed(2000 + step)
    return (torch.randn(B, 1, 16, 16, generator=g), torch.randint(0, 1000, (B,), generator=g).float(),
            torch.randint(0, 11, (B,), generator=g), torch.randn(B, 1, 16, 16, generator=g))


def _digits_rows(model, reference):
    def rows(b, sl):
        x, t, c, y = b
        out = model(x[sl], t[sl], c[sl])
        with torch.no_grad():
            ref = reference(x[sl], t[sl], c[sl])
        return ((out - y[sl]) ** 2).mean((1, 2, 3)) + 0.5 * ((out - ref) ** 2).mean((1, 2, 3))
    return rows


def _digits_rollout(model):
    def rollout(b):
        with torch.no_grad():
            model(b[0], b[1], b[2])
    return rollout


def lora_case() -> Case:
    """A rank-4 LoRA of the digits UNet through the task's own policy handle (reference = gate 0)."""
    from rsm_fast.config import PolicyConfig, TaskConfig
    from rsm_fast.tasks import make_task

    pc = PolicyConfig(lora_rank=4)
    task = make_task(TaskConfig(name="digits-ddim", num_steps=4), policy=pc)
    torch.manual_seed(1)                   # peft draws LoRA A from the global generator
    handle = task.make_policy(pc)
    unet = handle.module
    with torch.no_grad():                  # LoRA B starts at zero: give A a gradient too
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.05)
    return Case(unet, *_trainable(unet), _digits_batch, _digits_rows(handle.model, handle.reference),
                _digits_rollout(handle.model))


def full_case():
    """The digits UNet fully trainable, and a frozen copy as the reference (returned too)."""
    import copy

    from rsm_fast.tasks import digits as D

    dg = D.Digits("ddim", 4)
    unet = dg.build_model()
    frozen = copy.deepcopy(unet).requires_grad_(False)
    model, reference = dg.model_fn(unet), dg.model_fn(frozen)
    return Case(unet, *_trainable(unet), _digits_batch, _digits_rows(model, reference), _digits_rollout(model)), frozen


def _full(t):
    from torch.distributed.tensor import DTensor

    t = t.detach()
    return t.full_tensor() if isinstance(t, DTensor) else t.clone()


def _parts(sl: slice, k: int) -> list[slice]:
    n = sl.stop - sl.start
    cuts = [sl.start + (n * j) // k for j in range(k + 1)]
    return [slice(a, b) for a, b in zip(cuts[:-1], cuts[1:])]


def train(case: Case, rows: slice, k: int, world: int, steps: int = STEPS) -> tuple[torch.optim.Optimizer, dict]:
    """``steps`` AdamW updates on ``rows`` of each step's batch in ``k`` micro-batches (all but the
    last under ``gradient_sync(False)``), loss ``sum(rows) * world / B``. Records the first step's
    gradients after the first micro-batch and after all of them, and each step's clipped norm."""
    from rsm_fast import parallel as P

    opt = torch.optim.AdamW(case.params, lr=LR, weight_decay=0.01)
    rec: dict = {"norms": []}
    for s in range(steps):
        b = case.batch(s)
        case.rollout(b)
        opt.zero_grad(set_to_none=True)
        parts = _parts(rows, k)
        for j, sl in enumerate(parts):
            with P.gradient_sync(case.module, j == len(parts) - 1):
                (case.rows(b, sl).sum() * (world / B)).backward()
            if s == 0 and j == 0 and k > 1 and not P.is_sharded(case.module):
                rec["micro_grads"] = [p.grad.detach().clone() for p in case.params]
        if s == 0:
            rec["grads"] = [_full(p.grad) for p in case.params]
        rec["norms"].append(float(P.clip_grad_norm(case.params, MAX_NORM)))
        opt.step()
    return opt, rec


def build_ddp(name: str) -> Case:
    return toy_case() if name.startswith("toy") else lora_case()


# ------------------------------------------------------------------------------------------------
# Workers (run under torchrun; rank-local results go to files in outdir)
# ------------------------------------------------------------------------------------------------
def _rank() -> tuple[int, int]:
    import torch.distributed as dist

    return dist.get_rank(), dist.get_world_size()


def _state(module, opt) -> tuple[dict, dict]:
    """Model and optimizer state (local shards, flattened to name -> tensor / value) for bitwise checks."""
    from torch.distributed.checkpoint.state_dict import _flatten_optim_state_dict, get_state_dict

    msd, osd = get_state_dict(module, [opt])
    loc = lambda v: v.to_local().clone() if hasattr(v, "to_local") else (v.clone() if torch.is_tensor(v) else v)
    return {k: loc(v) for k, v in msd.items()}, {k: loc(v) for k, v in _flatten_optim_state_dict(osd).items()}


def _same(a: dict, b: dict) -> list[str]:
    """Keys whose values differ (bitwise for tensors)."""
    bad = [k for k in a.keys() | b.keys() if k not in a or k not in b]
    for k in a.keys() & b.keys():
        x, y = a[k], b[k]
        if torch.is_tensor(x) or torch.is_tensor(y):
            if not (torch.is_tensor(x) and torch.is_tensor(y) and x.dtype == y.dtype and torch.equal(x, y)):
                bad.append(k)
        elif x != y:
            bad.append(k)
    return sorted(bad)


def _ema(params) -> dict:
    return {f"ema.{i}": p.detach().float().clone() * 0.5 for i, p in enumerate(params)}


def _local(d: dict) -> dict:
    return {k: (v.to_local() if hasattr(v, "to_local") else v) for k, v in d.items()}


def work_ddp(out: Path) -> None:
    from rsm_fast import parallel as P

    rank, world = _rank()
    for name in CASES_DDP:
        case = build_ddp(name)
        P.replicate_policy(case.module)
        assert P.is_replicated(case.module)
        assert [n for n, p in case.module.named_parameters() if p.requires_grad] == case.names
        opt, rec = train(case, RANK_ROWS[rank], 2 if name.endswith("k2") else 1, world)
        rec["params"] = [_full(p) for p in case.params]
        torch.save(rec, out / f"{name}.{rank}.pt")
    # -- DCP: the last case (LoRA, accumulation 2) after its three steps --------------------------
    res: dict = {}
    ckpt, lora_only = out / "ckpt_ddp", out / "ckpt_lora_only"
    extra = _ema(case.params)
    P.save_sharded(ckpt, case.module, opt, extra)
    P.save_sharded(lora_only, case.module, opt, include_frozen=False)
    msd, osd = _state(case.module, opt)
    if rank == 0:
        torch.save({"model": msd, "optim": osd, "extra": extra}, out / "expected_ddp.pt")
    res["full_state_keys_same"] = sorted(P.full_state_dict(case.module) or {}) == (sorted(msd) if rank == 0 else [])
    fresh = lora_case()
    P.replicate_policy(fresh.module)
    fopt = torch.optim.AdamW(fresh.params, lr=LR, weight_decay=0.01)
    got = P.load_sharded(ckpt, fresh.module, fopt)
    m2, o2 = _state(fresh.module, fopt)
    res["load2_model_diff"], res["load2_optim_diff"] = _same(msd, m2), _same(osd, o2)
    res["load2_extra_diff"] = _same(extra, got)
    fresh = lora_case()
    P.replicate_policy(fresh.module)
    fopt = torch.optim.AdamW(fresh.params, lr=LR, weight_decay=0.01)
    P.load_sharded(lora_only, fresh.module, fopt, include_frozen=False)
    m3, o3 = _state(fresh.module, fopt)
    res["lora_only_model_diff"], res["lora_only_optim_diff"] = _same(msd, m3), _same(osd, o3)
    res["lora_only_files_smaller"] = (sum(f.stat().st_size for f in lora_only.iterdir())
                                      < 0.5 * sum(f.stat().st_size for f in ckpt.iterdir()))
    (out / f"ddp_ckpt.{rank}.json").write_text(json.dumps(res))


def load_ddp_checkpoint(out: Path) -> dict:
    """Load the ``ddp`` launch's checkpoint into a fresh LoRA policy (replicated when a process
    group exists) and compare with what the 2-rank run saved."""
    from rsm_fast import parallel as P

    exp = torch.load(out / "expected_ddp.pt", weights_only=False)
    case = lora_case()
    P.replicate_policy(case.module)
    opt = torch.optim.AdamW(case.params, lr=LR, weight_decay=0.01)
    got = P.load_sharded(out / "ckpt_ddp", case.module, opt)
    msd, osd = _state(case.module, opt)
    return {"model_diff": _same(exp["model"], msd), "optim_diff": _same(exp["optim"], osd),
            "extra_diff": _same(exp["extra"], got)}


def work_ddp_load(out: Path) -> None:
    res = load_ddp_checkpoint(out)
    res["world"] = _rank()[1]
    (out / "ddp_load1.json").write_text(json.dumps(res))


def work_fsdp(out: Path) -> None:
    from torch.distributed.tensor import DTensor

    from rsm_fast import parallel as P

    rank, world = _rank()
    res: dict = {}
    for name in CASES_FSDP:
        case, frozen = full_case()
        names = case.names
        P.shard_policy(case.module, reference=frozen)
        case.params, case.names = _trainable(case.module)    # fully_shard swaps in new (DTensor) parameters
        res[f"{name}_sharded_blocks"] = len(P.shard_blocks(case.module))
        res[f"{name}_ref_local_fraction"] = (sum(p.to_local().numel() for p in frozen.parameters())
                                             / sum(p.numel() for p in frozen.parameters()))
        res[f"{name}_names_same"] = case.names == names
        opt, rec = train(case, RANK_ROWS[rank], 2 if name.endswith("k2") else 1, world)
        full = P.full_state_dict(case.module)
        res[f"{name}_full_state_on_rank"] = full is not None
        rec["params"] = [full[n] for n in case.names] if full is not None else None
        torch.save(rec, out / f"{name}.{rank}.pt")
    params = case.params
    # -- the trainer's DTensor facts --------------------------------------------------------------
    res["param_type"] = type(params[0]).__name__
    res["empty_local_shards"] = sum(p.to_local().numel() == 0 for p in params)
    res["grad_norm_vs_torch"] = float(P.grad_norm(params)) - float(
        torch.nn.utils.get_total_norm([p.grad for p in params]).full_tensor())
    res["grad_norm_inf_vs_full"] = float(P.grad_norm(params, float("inf"))) - max(
        float(_full(p.grad).abs().max()) for p in params)
    res["nonfinite_before"] = P.count_nonfinite(params)
    # one NaN in one shard of rank 1 only: every rank must see it
    idx = torch.tensor([next(i for i, p in enumerate(params) if p.to_local().numel() > 0)])
    torch.distributed.broadcast(idx, src=1)
    v = params[int(idx)]
    keep, gkeep = v.detach().to_local().clone(), v.grad.to_local().clone()
    if rank == 1:
        with torch.no_grad():
            v.to_local().view(-1)[0] = float("nan")
            v.grad.to_local().view(-1)[0] = float("nan")
    res["nonfinite_one_shard"] = P.count_nonfinite(params)
    res["grad_norm_nan_one_shard"] = [float(P.grad_norm(params)), float(P.grad_norm(params, float("inf")))]
    with torch.no_grad():
        v.to_local().copy_(keep)
        v.grad.to_local().copy_(gkeep)
    try:                                        # what the trainer's guard does today
        torch._foreach_copy_([p.detach() for p in params], [p.detach() for p in params])
        res["foreach_copy_dtensor"] = "ok"
    except Exception as e:                      # noqa: BLE001 - recorded for the report
        res["foreach_copy_dtensor"] = type(e).__name__
    try:
        torch._foreach_norm([p.detach() for p in params], float("inf"))
        res["foreach_norm_inf_dtensor"] = "ok"
    except Exception as e:                      # noqa: BLE001
        res["foreach_norm_inf_dtensor"] = type(e).__name__
    # snapshot / restore through the local shards
    snap = [t.clone() for t in P.local_tensors(params)]
    before = [_full(p) for p in params]
    with torch.no_grad():
        for p in params:
            p.add_(1.0)
    torch._foreach_copy_(P.local_tensors(params), snap)
    res["restore_exact"] = all(torch.equal(a, _full(p)) for a, p in zip(before, params))
    # an EMA shadow of DTensor params, updated and swapped in
    shadow = [p.detach().to(torch.float32).clone() for p in params]
    with torch.no_grad():
        for s_, p in zip(shadow, params):
            s_.add_(p.detach().to(torch.float32) * 2 - s_, alpha=0.5)
    res["ema_is_dtensor"] = all(isinstance(s_, DTensor) for s_ in shadow)
    res["ema_exact"] = all(torch.equal(_full(s_), 1.5 * a) for s_, a in zip(shadow, before))
    # a no-grad forward of the policy (rollout / evaluation) right before the state is read
    case.rollout(case.batch(0))
    res["all_dtensor_after_nograd"] = all(isinstance(p, DTensor) for p in case.module.parameters())
    res["ref_all_dtensor_after_nograd"] = all(isinstance(p, DTensor) for p in frozen.parameters())
    # -- DCP: save on 2 ranks, load into a fresh sharded model on the same 2 ------------------------
    extra = {f"ema.{i}": s_ for i, s_ in enumerate(shadow)}
    ckpt = out / "ckpt_fsdp"
    P.save_sharded(ckpt, case.module, opt, extra)
    msd, osd = _state(case.module, opt)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    fm, fo = get_state_dict(case.module, [opt], options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        torch.save({"model": fm, "optim": fo, "extra": {k: _full(v) for k, v in extra.items()}},
                   out / "expected_fsdp.pt")
    else:
        _ = [_full(v) for v in extra.values()]   # full_tensor is a collective
    fresh, ffrozen = full_case()
    P.shard_policy(fresh.module, reference=ffrozen)
    fresh.params, fresh.names = _trainable(fresh.module)
    fopt = torch.optim.AdamW(fresh.params, lr=LR, weight_decay=0.01)
    template = {f"ema.{i}": p.detach().float().clone() for i, p in enumerate(fresh.params)}
    got = P.load_sharded(ckpt, fresh.module, fopt, template)
    m2, o2 = _state(fresh.module, fopt)
    res["load2_model_diff"], res["load2_optim_diff"] = _same(msd, m2), _same(osd, o2)
    res["load2_extra_diff"] = _same(_local(extra), _local(got))
    res["load2_extra_dtensor"] = all(isinstance(v, DTensor) for v in got.values())
    fresh, ffrozen = full_case()
    P.shard_policy(fresh.module, reference=ffrozen)
    fresh.params, fresh.names = _trainable(fresh.module)
    fopt = torch.optim.AdamW(fresh.params, lr=LR, weight_decay=0.01)
    got = P.load_sharded(ckpt, fresh.module, fopt)          # no template: full plain tensors
    res["load2_untemplated_extra_diff"] = _same({k: _full(v) for k, v in extra.items()}, got)
    (out / f"fsdp.{rank}.json").write_text(json.dumps(res))


WORKERS = {"ddp": work_ddp, "ddp_load": work_ddp_load, "fsdp": work_fsdp}


def worker_main(name: str, outdir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        WORKERS[name](Path(outdir))
        dist.barrier()
    finally:
        dist.destroy_process_group()


STUB = """import importlib.util, sys
spec = importlib.util.spec_from_file_location("rsm_parallel_worker", {path!r})
mod = sys.modules["rsm_parallel_worker"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
mod.worker_main(sys.argv[1], sys.argv[2])
"""


def torchrun(tmp: Path, name: str, nproc: int, outdir: Path) -> None:
    stub = tmp / "parallel_worker.py"
    stub.write_text(STUB.format(path=str(HERE)))
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(stub), name, str(outdir)]
    r = subprocess.run(cmd, cwd=str(REPO), env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"torchrun {name} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"


# ------------------------------------------------------------------------------------------------
# Fixtures: one launch each
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ddp_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    torchrun(out, "ddp", 2, out)
    return out


@pytest.fixture(scope="module")
def fsdp_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    torchrun(out, "fsdp", 2, out)
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _worst(xs, ys) -> float:
    return max(_rel(a, b) for a, b in zip(xs, ys))


def _noise(grads) -> list[bool]:
    """Tensors whose exact gradient is zero and whose float gradient is rounding noise (below
    1e-7 of the global norm): the attention key biases (softmax is shift-invariant). Their
    gradients are compared against the global norm, and AdamW turns their noise into updates of
    about +-lr, so their parameters get a looser bound."""
    total = torch.stack([g.double().norm() for g in grads]).norm()
    return [bool(g.double().norm() < 1e-7 * total) for g in grads]


def _assert_grads_equal(got, ref):
    total = float(torch.stack([g.double().norm() for g in ref]).norm())
    for a, b, z in zip(got, ref, _noise(ref)):
        err = float((a.double() - b.double()).norm())
        assert err <= (1e-7 * total if z else TOL * float(b.double().norm())), (err, z)


def _assert_params_equal(got, ref, ref_grads):
    for a, b, z in zip(got, ref, _noise(ref_grads)):
        assert _rel(a, b) <= (1e-4 if z else TOL)


def _check_against_one_process(out: Path, name: str, case_fn, k: int):
    """2-rank results == one process on the whole batch; the synced gradient is not either rank's."""
    got = [torch.load(out / f"{name}.{r}.pt", weights_only=False) for r in (0, 1)]
    case = case_fn()
    _, ref = train(case, slice(0, B), 1, 1)
    ref["params"] = [p.detach().clone() for p in case.params]
    for r in (0, 1):
        _assert_grads_equal(got[r]["grads"], ref["grads"])
        assert got[r]["norms"] == pytest.approx(ref["norms"], rel=TOL)
        if got[r]["params"] is not None:
            _assert_params_equal(got[r]["params"], ref["params"], ref["grads"])
    # what each rank would have without the all-reduce: far from the synced mean
    for r in (0, 1):
        case = case_fn()
        _, loc = train(case, RANK_ROWS[r], k, 2, steps=1)
        assert _worst(got[r]["grads"], loc["grads"]) > 1e-2
        if "micro_grads" in got[r]:          # the no-sync micro-batch really did not communicate
            assert _worst(got[r]["micro_grads"], loc["micro_grads"]) <= TOL
    return got, ref


# ------------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", CASES_DDP)
def test_ddp_equals_one_process(ddp_out, name):
    case_fn = toy_case if name.startswith("toy") else lora_case
    got, _ = _check_against_one_process(ddp_out, name, case_fn, 2 if name.endswith("k2") else 1)
    for a, b in zip(got[0]["params"], got[1]["params"]):
        assert torch.equal(a, b)                      # replicas stay bit-identical


def test_ddp_checkpoint_same_world(ddp_out):
    for r in (0, 1):
        res = json.loads((ddp_out / f"ddp_ckpt.{r}.json").read_text())
        assert res["full_state_keys_same"]
        for k in ("load2_model_diff", "load2_optim_diff", "load2_extra_diff",
                  "lora_only_model_diff", "lora_only_optim_diff"):
            assert res[k] == [], (k, res[k][:5])
        assert res["lora_only_files_smaller"]


def test_ddp_checkpoint_one_rank_torchrun(ddp_out):
    torchrun(ddp_out, "ddp_load", 1, ddp_out)
    res = json.loads((ddp_out / "ddp_load1.json").read_text())
    assert res["world"] == 1
    assert res["model_diff"] == [] and res["optim_diff"] == [] and res["extra_diff"] == []


def test_ddp_checkpoint_plain_process(ddp_out):
    import torch.distributed as dist

    assert not dist.is_initialized()
    res = load_ddp_checkpoint(ddp_out)
    assert res["model_diff"] == [] and res["optim_diff"] == [] and res["extra_diff"] == []


@pytest.mark.parametrize("name", CASES_FSDP)
def test_fsdp_equals_one_process(fsdp_out, name):
    def case_fn():
        return full_case()[0]

    got, _ = _check_against_one_process(fsdp_out, name, case_fn, 2 if name.endswith("k2") else 1)
    res = [json.loads((fsdp_out / f"fsdp.{r}.json").read_text()) for r in (0, 1)]
    assert res[0][f"{name}_full_state_on_rank"] and not res[1][f"{name}_full_state_on_rank"]
    for r in (0, 1):
        assert res[r][f"{name}_names_same"]
        assert res[r][f"{name}_sharded_blocks"] == 5           # 2 down, 2 up, the mid block
        assert res[r][f"{name}_ref_local_fraction"] < 0.6      # the reference is sharded too


def test_fsdp_dtensor_facts(fsdp_out):
    for r in (0, 1):
        res = json.loads((fsdp_out / f"fsdp.{r}.json").read_text())
        assert res["param_type"] == "DTensor"
        assert abs(res["grad_norm_vs_torch"]) < 1e-5 and abs(res["grad_norm_inf_vs_full"]) < 1e-7
        assert res["nonfinite_before"] == 0 and res["nonfinite_one_shard"] == 1
        assert all(math.isnan(x) for x in res["grad_norm_nan_one_shard"])
        assert res["restore_exact"] and res["ema_is_dtensor"] and res["ema_exact"]
        assert res["all_dtensor_after_nograd"] and res["ref_all_dtensor_after_nograd"]
    assert res["empty_local_shards"] > 0            # rank 1 holds empty shards (uneven dim 0)


def test_fsdp_checkpoint_same_world(fsdp_out):
    for r in (0, 1):
        res = json.loads((fsdp_out / f"fsdp.{r}.json").read_text())
        for k in ("load2_model_diff", "load2_optim_diff", "load2_extra_diff", "load2_untemplated_extra_diff"):
            assert res[k] == [], (k, res[k][:5])
        assert res["load2_extra_dtensor"]


def test_fsdp_checkpoint_plain_process(fsdp_out):
    """A 2-rank FSDP2 checkpoint loads into a plain module in a process without a process group."""
    from rsm_fast import parallel as P

    exp = torch.load(fsdp_out / "expected_fsdp.pt", weights_only=False)
    case, _ = full_case()
    opt = torch.optim.AdamW(case.params, lr=LR, weight_decay=0.01)
    got = P.load_sharded(fsdp_out / "ckpt_fsdp", case.module, opt)
    msd, osd = _state(case.module, opt)
    from torch.distributed.checkpoint.state_dict import _flatten_optim_state_dict

    assert _same(exp["model"], msd) == []
    assert _same(_flatten_optim_state_dict(exp["optim"]), osd) == []
    assert _same(exp["extra"], got) == []


def test_single_process_noops():
    """Without a process group the wrappers do nothing and the reductions are local."""
    from rsm_fast import parallel as P

    case = toy_case()
    assert P.replicate_policy(case.module) is case.module and not P.is_replicated(case.module)
    with pytest.raises(RuntimeError):
        P.shard_policy(case.module)
    (case.rows(case.batch(0), slice(0, B)).sum()).backward()
    want = torch.nn.utils.get_total_norm([p.grad for p in case.params])
    assert float(P.grad_norm(case.params)) == pytest.approx(float(want), rel=1e-6)
    with P.gradient_sync(case.module, False):
        pass
    g = [p.grad.clone() for p in case.params]
    n = P.clip_grad_norm(case.params, float("inf"))
    assert all(torch.equal(a, p.grad) for a, p in zip(g, case.params)) and n.dim() == 0
    n2 = P.clip_grad_norm(case.params, 0.1)
    assert float(n2) == float(n) and float(P.grad_norm(case.params)) == pytest.approx(0.1, rel=1e-4)
    assert P.count_nonfinite(case.params) == 0
    with torch.no_grad():
        case.params[0].view(-1)[0] = float("inf")
        case.params[1].view(-1)[0] = float("nan")
    assert P.count_nonfinite(case.params) == 2
    full = P.full_state_dict(case.module)
    assert set(full) == set(case.module.state_dict())
