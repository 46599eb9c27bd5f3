"""Preflight (rsm_fast/preflight.py): the plan's size and the records' bytes computed from the config
alone equal what the trainer really compiles and allocates; a run that cannot fit is refused with
one line naming the estimate, what is available and the setting to change; the diffusers task's
files are checked before any model loads."""
from __future__ import annotations

import math
import os

import pytest

from rsm_fast import preflight as P
from rsm_fast.config import ConfigError, build_config
from rsm_fast.trainer import Trainer

TOY = ["train.threads=1", "policy.hidden=16", "task.num_steps=10", "train.batch_size=32", "task.eval_samples=16"]
DIGITS = ["task.name=digits-ddim", "task.num_steps=4", "train.batch_size=4", "method.group_size=2",
          "task.eval_samples=4", "train.threads=1"]

pytestmark = pytest.mark.usefixtures("one_thread")

PLANS = [
    ("grpo", TOY),
    ("grpo", TOY + ["train.timestep_fraction=0.5"]),
    ("mix-grpo", TOY + ["rollout.window=3", "method.group_size=16"]),
    ("grpo", TOY + ["rollout.waves=2"]),
    ("rsm-fo-terminal", TOY),
    ("tempflow-grpo", TOY + ["method.group_size=4"]),
    ("tempflow-grpo", TOY + ["method.group_size=4", "rollout.profile=", "rollout.k=[0,3,0,2,0,0,5,0,0,1]"]),
    ("grpo", TOY + ["rollout.plan=tree", "rollout.k=[2,1,3,1,1,1,1,1,1]", "train.batch_size=16"]),
    ("grpo", DIGITS),
    ("grpo", DIGITS + ["task.name=digits-flow", "rollout.plan=branch", "rollout.k=[2,0,3,0]",
                       "train.timestep_fraction=1"]),       # grpo's digits-flow section trains int(0.99 N) SDE steps
]


@pytest.mark.parametrize("preset, sets", PLANS)
def test_plan_counts_equal_the_compiled_plan(preset, sets):
    cfg = build_config(preset, None, sets)
    geo = P.task_geometry(cfg)
    tr = Trainer(cfg)
    assert geo.sde_mask == tuple(bool(v) for v in tr.task.transition.sde_mask)
    assert geo.latent_shape == tuple(tr.task.latent_shape)
    assert geo.cfg_guidance == (tr.task.cfg_scale is not None)
    counts = P.plan_counts(cfg, geo.sde_mask)
    assert counts.rows == tuple(tr.plan.rows)
    assert counts.records == tr.plan.num_records > 0


@pytest.mark.parametrize("preset, sets", [PLANS[0], PLANS[5], PLANS[7], PLANS[8]])
def test_record_bytes_equal_the_rollout_tensors(preset, sets):
    """The estimate's per-record bytes are those of the tensors a real rollout keeps (x, z, f_old,
    log_prob, step) plus the reference pass's f_ref; the evaluation's record count is the real one."""
    cfg = build_config(preset, None, sets)
    tr = Trainer(cfg)
    est = P.estimate_memory(cfg, P.task_geometry(cfg))
    tr.conds = tr.task.conditions(tr.plan.spec.groups, tr.gen)
    rec, f_ref, _ = tr._rollout(tr.engines, tr.plan, tr.conds, tr.gen, 0)
    real = sum(t.numel() * t.element_size() for t in (rec.x, rec.z, rec.f_old, rec.log_prob, rec.step, f_ref))
    assert est.train["records"] == real
    assert est.train["record copies"] == 3 * rec.x.numel() * rec.x.element_size()
    assert est.total > real
    n = cfg.task.eval_samples
    assert P.eval_counts(n, P.task_geometry(cfg).sde_mask).records == n * int(tr.task.transition.sde_mask.sum())


def test_allocator_budget_scales_the_estimated_profile():
    base = ["method.group_size=4"] + TOY
    a = P.plan_counts(build_config("tempflow-evr", None, base))
    b = P.plan_counts(build_config("tempflow-evr", None, base + ["rollout.alloc_budget=540"]))
    assert b.records >= 9 * a.records         # const:6 over 9 steps = 54 branches per trunk -> 540
    assert P.plan_counts(build_config("tempflow-evr", None, base + ["rollout.alloc_budget=540"]),
                         budgeted=False) == a


def test_defaults_fit_this_machine():
    for preset in ("rsm-soft-zo", "grpo", "tempflow-grpo"):
        est = P.check_memory(build_config(preset))
        assert est is not None and 0 < est.total < 2**30


def test_memory_available_is_read():
    host = P.host_available()
    assert host is None or host > 0
    assert P.available_memory("cpu") == host


def _too_big(preset, sets, available, **kw):
    with pytest.raises(ConfigError) as e:
        P.check_memory(build_config(preset, None, sets), available=available, **kw)
    msg = str(e.value)
    assert "\n" not in msg and "available" in msg and "about" in msg
    return msg


def test_huge_batch_is_refused_on_any_machine():
    msg = _too_big("grpo", ["train.batch_size=1000000000"], None)
    assert msg.startswith("config field 'train.batch_size'") and "TiB" in msg


@pytest.mark.parametrize("sets, available, setting", [
    (TOY + ["train.batch_size=100000"], 50 * 2**20, "train.batch_size"),
    (TOY + ["task.eval_samples=1000000"], 500 * 2**20, "task.eval_samples"),
    # the training forward's activations alone do not fit: more micro-batches
    (TOY + ["policy.hidden=1024", "train.batch_size=100000", "rollout.chunk_size=1000"], 6 * 2**30, "train.grad_accum"),
    # a whole step's rows in one model call do not fit, the records do
    (DIGITS + ["train.batch_size=512", "train.grad_accum=512"], 300 * 2**20, "rollout.chunk_size"),
    (TOY + ["policy.hidden=65536"], 8 * 2**30, "policy.hidden"),
])
def test_the_message_names_the_setting_to_change(sets, available, setting):
    msg = _too_big("grpo", sets, available)
    assert msg.startswith(f"config field '{setting}'"), msg
    assert P.fmt_bytes(available) in msg


def test_the_named_setting_fixes_it():
    """Following the advice (chunk the model calls) makes the same run fit."""
    cfg = build_config("grpo", None, DIGITS + ["train.batch_size=512", "train.grad_accum=512"])
    est = P.check_memory(cfg, available=10**15)
    fixed = P.check_memory(build_config("grpo", None, DIGITS + ["train.batch_size=512", "train.grad_accum=512",
                                                                 "rollout.chunk_size=64"]), available=300 * 2**20)
    assert fixed.total < 300 * 2**20 < est.total


def test_cuda_checks_the_host_too():
    """On CUDA the records live on the device, the plan is also compiled on the host: both count
    (the device's free bytes and the host's are given here, so no GPU is needed)."""
    cfg = build_config("grpo", None, TOY + ["train.batch_size=100000"])
    with pytest.raises(ConfigError, match="host memory"):
        P.check_memory(cfg, "cuda", available=10**15, host=1024)
    with pytest.raises(ConfigError, match="of cuda memory"):
        P.check_memory(cfg, "cuda", available=1024, host=10**15)
    assert P.check_memory(cfg, "cuda", available=10**15, host=10**15) is not None


# -- inputs -------------------------------------------------------------------------------------
DIFF = ["task.name=diffusers", "task.model=sd15-tiny"]


def _inputs_fail(sets, field="task.prompts"):
    with pytest.raises(ConfigError) as e:
        P.check_inputs(build_config("grpo", None, DIFF + sets))
    assert field in str(e.value) and "\n" not in str(e.value)
    return str(e.value)


def test_prompt_file_checks(tmp_path):
    (tmp_path / "ok.txt").write_text("a cat\n\na dog\n")
    P.check_inputs(build_config("grpo", None, DIFF + [f"task.prompts={tmp_path / 'ok.txt'}"]))
    assert "not found" in _inputs_fail([f"task.prompts={tmp_path / 'missing.txt'}"])
    assert "regular file" in _inputs_fail([f"task.prompts={tmp_path}"])
    (tmp_path / "latin.txt").write_bytes(b"caf\xe9\n")
    assert "UTF-8" in _inputs_fail([f"task.prompts={tmp_path / 'latin.txt'}"])
    (tmp_path / "empty.txt").write_text("\n  \n")
    assert "no prompts" in _inputs_fail([f"task.prompts={tmp_path / 'empty.txt'}"])
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{"prompt": \n')
    assert "bad.jsonl:2" in _inputs_fail([f"task.prompts={tmp_path / 'bad.jsonl'}"])
    (tmp_path / "p.csv").write_text("a\n")
    assert ".csv" in _inputs_fail([f"task.prompts={tmp_path / 'p.csv'}"])
    fifo = tmp_path / "fifo.txt"
    os.mkfifo(fifo)                              # must not block
    assert "regular file" in _inputs_fail([f"task.prompts={fifo}"])


def test_unreadable_prompt_file(tmp_path, monkeypatch):
    """A permission error (simulated: the tests may run as root, who reads a mode-000 file)."""
    from rsm_fast.models import text

    def denied(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(text, "read_prompts", denied)
    f = tmp_path / "secret.txt"
    f.write_text("a cat\n")
    assert "cannot read" in _inputs_fail([f"task.prompts={f}"])


def test_model_and_resolution_checks(tmp_path):
    _inputs_fail(["task.model=no-such-model"], "task.model")
    _inputs_fail([f"task.model={tmp_path}"], "task.model")               # a folder without model_index.json
    (tmp_path / "f.txt").write_text("x")
    _inputs_fail([f"task.model={tmp_path / 'f.txt'}"], "task.model")
    _inputs_fail(["task.resolution=21"], "task.resolution")
    P.check_inputs(build_config("grpo", None, DIFF + ["task.resolution=32"]))
    P.check_inputs(build_config("grpo", None, ["task.prompts=/no/such/file"]))   # the 2-D task reads no prompts


def test_prompt_typo_fails_before_the_model_loads(tmp_path, monkeypatch):
    """The task itself reads the prompt file before it builds the model (also without preflight)."""
    from rsm_fast import models as M

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the prompt file was read")

    monkeypatch.setattr(M, "build_model", boom)
    monkeypatch.setattr(M, "load_model", boom)
    cfg = build_config("grpo", None, DIFF + [f"task.prompts={tmp_path / 'typo.txt'}"])
    with pytest.raises(ConfigError, match="task.prompts"):
        Trainer(cfg)


def test_geometry_of_the_diffusers_task_without_loading():
    cfg = build_config("grpo", None, DIFF + ["task.resolution=32"])
    geo = P.task_geometry(cfg)
    assert geo.latent_shape == (4, 16, 16) and geo.cfg_guidance and len(geo.sde_mask) == cfg.task.num_steps
    assert P.task_geometry(build_config("grpo", None, ["task.name=diffusers", "task.model=/no/such"])) is None
    assert math.prod(geo.latent_shape) * 4 == geo.latent_bytes
