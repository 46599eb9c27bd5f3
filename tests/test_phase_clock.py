"""Phase clocks that charge GPU work to the phase that queued it (issue 21, item 4), with an NVTX
range per phase (item 10). CUDA is mocked: ``torch.cuda.synchronize`` waits for the "queued"
work of a fake device, so the test shows where that wait is charged."""
from __future__ import annotations

import contextlib
import time

import pytest
import torch

from rsm_fast import runlog
from rsm_fast.runlog import PhaseClock


@pytest.fixture
def ranges(monkeypatch):
    seen = []

    def annotate(name, device=None):
        seen.append((name, None if device is None else device.type))
        return contextlib.nullcontext()

    monkeypatch.setattr(runlog, "annotate", annotate)
    return seen


class FakeDevice:
    """Queued GPU work: ``launch(s)`` returns at once; ``synchronize`` sleeps until it is done."""

    def __init__(self):
        self.pending, self.calls = 0.0, []

    def launch(self, seconds: float):
        self.pending += seconds

    def synchronize(self, device=None):
        self.calls.append(str(device))
        time.sleep(self.pending)
        self.pending = 0.0


def test_cpu_clock_never_synchronises(monkeypatch, ranges):
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: pytest.fail("synchronize on a CPU run"))
    clock = PhaseClock("cpu")
    with clock("rollout"):
        pass
    with clock("rollout"):
        pass
    assert set(clock.seconds) == {"rollout"} and clock.syncs == 0
    assert ranges == [("phase/rollout", "cpu")] * 2


def test_cuda_work_is_charged_to_the_phase_that_queued_it(monkeypatch, ranges):
    dev = FakeDevice()
    monkeypatch.setattr(torch.cuda, "synchronize", dev.synchronize)
    clock = PhaseClock("cuda:0")
    with clock("rollout"):
        dev.launch(0.05)            # returns at once, like a kernel launch
    with clock("reward"):
        pass                        # would have waited for the rollout's kernels without the edge sync
    assert clock.seconds["rollout"] >= 0.05          # a lower bound: safe on a loaded machine
    assert dev.pending == 0.0 and clock.syncs == 4 and dev.calls == ["cuda:0"] * 4
    assert [r for r, _ in ranges] == ["phase/rollout", "phase/reward"] and {d for _, d in ranges} == {"cuda"}

    # the same two phases with an unsynchronised clock: the rollout's work lands in the reward phase
    naive = PhaseClock()
    with naive("rollout"):
        dev.launch(0.05)
    with naive("reward"):
        dev.synchronize()           # the reward reads the samples: the host waits here
    assert naive.seconds["reward"] >= 0.05 and naive.syncs == 0


def test_a_failing_phase_is_not_masked_by_the_edge_sync(monkeypatch, ranges):
    dev = FakeDevice()
    monkeypatch.setattr(torch.cuda, "synchronize", dev.synchronize)
    clock = PhaseClock(torch.device("cuda", 1))
    with pytest.raises(ValueError, match="boom"):
        with clock("train"):
            raise ValueError("boom")
    assert dev.calls == ["cuda:1"] and "train" in clock.seconds        # entering sync only


def test_profile_epoch_script_dry_run_on_cpu(capsys):
    """profiles/profile_epoch.py (the Nsight Systems recipe's script) runs one epoch of a tiny SD3
    task on the CPU as a dry run and prints the epoch's phases and NFE; a bad --set is one line."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "profiles" / "profile_epoch.py"
    spec = importlib.util.spec_from_file_location("profile_epoch", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--device", "cpu", "--warmup", "0", "--preset", "grpo", "--set", "task.num_steps=3",
                     "--set", "train.batch_size=4", "--set", "method.group_size=4"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["profiled"] is False and out["phase_syncs"] == 0
    assert {"rollout", "reward", "train"} <= set(out["seconds_epoch"]) and out["nfe_epoch"]["rollout"] == 4 * 3 * 2   # 4 rows x 3 steps, CFG pairs
    assert mod.main(["--device", "cpu", "--set", "train.lr=-1"]) == 2
    assert "train.lr" in capsys.readouterr().err


def test_training_step_and_reference_are_nvtx_sub_phases(monkeypatch):
    """train/forward, train/backward (per micro-batch), train/optimizer and reference ranges open
    during an epoch (recorded through a patched annotate)."""
    from rsm_fast import train_step as TS
    from rsm_fast import trainer as TR
    from rsm_fast.config import build_config

    seen = []

    def annotate(name, device=None):
        seen.append(name)
        return contextlib.nullcontext()

    monkeypatch.setattr(TS, "annotate", annotate)
    monkeypatch.setattr(TR, "annotate", annotate)
    tr = TR.Trainer(build_config("grpo", None, ["train.batch_size=16", "method.group_size=8", "train.grad_accum=2",
                                                "train.inner_updates=2"]))
    tr.epoch()
    assert seen.count("train/forward") == seen.count("train/backward") == 4
    assert seen.count("train/optimizer") == 2 and seen.count("reference") == 1
