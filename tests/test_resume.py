"""Kill-and-resume (issue 17, must-show): a run killed (SIGKILL) or stopped (SIGTERM / SIGINT) at
many points and continued with ``--resume`` ends with final weights, log and summary identical to
the uninterrupted run: at ten points in a row for the 2-D task's zeroth-order preset, and at four
of them for an allocator preset with EMA, a MixGRPO window preset and the digits task.

Deterministic kill points come from the fault hook (``RSM_FAST_FAULT=<point>:<n>[:<SIGNAL>]``,
rsm_fast/interrupts.py): the process signals itself the n-th time it passes the point. One test
kills the run from outside at an arbitrary moment instead. All runs are real subprocesses of
``python -m rsm_fast.train``; every comparison is exact (bitwise on the CPU).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

# timing fields and the process's peak RSS are measurements of the process, not of the run
MEASURED = ("seconds", "seconds_epoch", "peak_memory_mb")
TIMEOUT = 900      # generous: a hang fails the test, a loaded machine does not

TOY = ["train.epochs=8", "train.checkpoint_every=2", "task.eval_samples=256"]
CONFIGS = {
    "default": ["--preset", "rsm-soft-zo", *TOY, "train.batch_size=64"],
    "allocator-ema": ["--preset", "rsm-evr", *TOY, "train.batch_size=32", "train.ema_decay=0.9"],
    "mixgrpo-window": ["--preset", "mix-grpo", *TOY, "train.batch_size=32", "rollout.window_every=2"],
    "digits": ["--preset", "grpo", "--task", "digits-ddim", "train.epochs=8", "train.checkpoint_every=2",
               "task.condition=none", "task.reward=digit_logprob:3", "task.num_steps=6", "train.batch_size=16",
               "method.group_size=4", "task.eval_samples=32", "train.threads=1", "train.ema_decay=0.9"],
}
# (fault, expected exit): six SIGKILL points -- mid-rollout, inside a checkpoint write, after a log
# line, after an update (before its log line), at the start of the final evaluation, after the
# final checkpoint but before the summary -- and three stops: SIGTERM after an update (the epoch
# finishes and is checkpointed), SIGTERM mid-rollout (the epoch is abandoned), SIGINT in the final
# evaluation. Each step resumes the previous one; the last resume completes the run.
CHAIN = [("after-rollout:2", -9), ("checkpoint-write:2", -9), ("after-epoch:1:TERM", 143), ("after-log:2", -9),
         ("after-epoch:2", -9), ("after-rollout:2:TERM", 143), ("final-eval:1", -9), ("final-eval:1:INT", 130),
         ("summary:1", -9), (None, 0)]
# the other configurations (whose extra state -- allocator, EMA, window, an image task -- is what
# they test) take four of those points: a kill mid-rollout, one inside a checkpoint write, a
# SIGTERM stop after an update and a kill in the final evaluation (five processes instead of ten)
SHORT_CHAIN = [("after-rollout:2", -9), ("checkpoint-write:2", -9), ("after-epoch:1:TERM", 143),
               ("final-eval:1", -9), (None, 0)]


def _args(cfg: list[str]) -> list[str]:
    out, it = [], iter(cfg)
    for a in it:
        out += [a, next(it)] if a.startswith("--") else ["--set", a]
    return out


def cli(cwd: Path, *args: str, fault: str | None = None, any_code: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RSM_FAST_FAULT", "RSM_FAST_RESUME_ANY_CODE")}
    if any_code or os.environ.get("RSM_FAST_TEST_ANY_CODE") == "1":   # the latter: developing while files change
        env["RSM_FAST_RESUME_ANY_CODE"] = "1"
    if fault:
        env["RSM_FAST_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "rsm_fast.train", "--quiet", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT)


def log_records(run: Path) -> list[dict]:
    recs = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    for r in recs:
        for k in MEASURED:
            r.pop(k, None)
    return recs


def assert_same_run(a: Path, b: Path) -> None:
    ra, rb = log_records(a), log_records(b)
    assert [r["epoch"] for r in rb] == list(range(len(ra))), "every epoch exactly once"
    assert ra == rb
    ca = torch.load(a / "checkpoint.pt", weights_only=True)
    cb = torch.load(b / "checkpoint.pt", weights_only=True)
    assert ca["policy"].keys() == cb["policy"].keys()
    for k in ca["policy"]:
        assert torch.equal(ca["policy"][k], cb["policy"][k]), k
    assert (ca["ema"] is None) == (cb["ema"] is None)
    if ca["ema"] is not None:
        assert all(torch.equal(x, y) for x, y in zip(ca["ema"]["shadow"], cb["ema"]["shadow"]))
    assert ca["allocator"] == cb["allocator"]
    sa, sb = (json.loads((p / "summary.json").read_text()) for p in (a, b))
    sa.pop("seconds"), sb.pop("seconds")
    assert sa == sb


@pytest.mark.parametrize("name", list(CONFIGS))
def test_killed_and_stopped_runs_resume_to_the_uninterrupted_run(tmp_path, name):
    args = _args(CONFIGS[name])
    ref = cli(tmp_path, "--out", "ref", *args)
    assert ref.returncode == 0, ref.stderr
    for i, (fault, rc) in enumerate(CHAIN if name == "default" else SHORT_CHAIN):
        if i == 0:
            p = cli(tmp_path, "--out", "run", *args, fault=fault)
        else:
            p = cli(tmp_path, "--resume", "run", fault=fault)
        assert p.returncode == rc, (fault, p.returncode, p.stderr[-2000:])
        if rc > 0:       # a stop: one line saying how to continue, and a checkpoint to continue from
            assert "--resume run" in p.stderr and "Traceback" not in p.stderr, p.stderr
            assert list((tmp_path / "run" / "checkpoints").glob("epoch-*/state.pt"))
        if fault and fault.startswith("checkpoint-write"):     # the interrupted write left a temp folder
            assert list((tmp_path / "run" / "checkpoints").glob(".tmp-*"))
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp-*")), "temp folders cleaned at open"
    assert_same_run(tmp_path / "ref", tmp_path / "run")
    done = cli(tmp_path, "--resume", "run")
    assert done.returncode == 2 and "complete" in done.stderr


def test_kill_at_an_arbitrary_moment_resumes_exactly(tmp_path):
    """SIGKILL from outside once a few epochs are logged (wherever the run then is)."""
    args = _args(["--preset", "rsm-soft-zo", "train.epochs=14", "train.checkpoint_every=3", "train.batch_size=64",
                  "task.eval_samples=256"])
    assert cli(tmp_path, "--out", "ref", *args).returncode == 0
    env = {k: v for k, v in os.environ.items() if k != "RSM_FAST_FAULT"}
    proc = subprocess.Popen([sys.executable, "-m", "rsm_fast.train", "--quiet", "--out", "run", *args], cwd=tmp_path,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = tmp_path / "run" / "log.jsonl"
    t0 = time.monotonic()
    while proc.poll() is None and time.monotonic() - t0 < TIMEOUT:
        if log.exists() and len(log.read_text().splitlines()) >= 5:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=TIMEOUT)
    p = cli(tmp_path, "--resume", "run")
    assert p.returncode == 0, p.stderr
    assert_same_run(tmp_path / "ref", tmp_path / "run")


def test_second_sigint_exits_at_once(tmp_path):
    """The first SIGINT (sent by the fault hook as the update starts, where the run finishes the
    epoch before stopping) asks for a safe stop; a second one, sent as soon as the first is
    acknowledged, ends the process at once: no checkpoint of that epoch, exit 130, one line each."""
    args = _args(["--preset", "rsm-soft-zo", "train.epochs=100", "train.batch_size=4096", "task.eval_samples=64",
                  "train.checkpoint_every=0", "train.inner_updates=4"])
    env = {k: v for k, v in os.environ.items() if k != "RSM_FAST_FAULT"}
    env["RSM_FAST_FAULT"] = "train-start:1:INT"
    proc = subprocess.Popen([sys.executable, "-m", "rsm_fast.train", "--quiet", "--out", "run", *args], cwd=tmp_path,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if "SIGINT received" in line:
            proc.send_signal(signal.SIGINT)
            break
    err = "".join(lines) + proc.stderr.read()
    proc.wait(timeout=TIMEOUT)
    assert proc.returncode == 130, err
    assert "second SIGINT" in err and "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert not (tmp_path / "run" / "checkpoints").exists()      # the first epoch never finished


def test_stop_controller_in_process(monkeypatch):
    """First signal: flag (or RunInterrupted inside an abandonable region); second: os._exit."""
    from rsm_fast.interrupts import RunInterrupted, StopController

    exits = []
    monkeypatch.setattr(os, "_exit", lambda code: exits.append(code))
    before = signal.getsignal(signal.SIGINT)    # default_int_handler, or SIG_IGN under a background shell
    with StopController() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert stop.requested and not exits
        with pytest.raises(RunInterrupted) as e:
            with stop.abandonable():
                pass
        assert e.value.exit_code == 143
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert exits == [130]
    assert signal.getsignal(signal.SIGINT) is before


def test_resume_refuses_a_different_config_naming_the_field(tmp_path):
    args = _args(["--preset", "rsm-soft-zo", "train.epochs=4", "train.checkpoint_every=2", "train.batch_size=64",
                  "task.eval_samples=64"])
    assert cli(tmp_path, "--out", "run", *args, fault="after-log:3").returncode == -9
    p = cli(tmp_path, "--resume", "run", "--set", "method.clip_eps=0.5")
    assert p.returncode == 2
    assert p.stderr.count("\n") == 1 and "method.clip_eps" in p.stderr and "0.5" in p.stderr, p.stderr
    # a field that changes no number may differ; then the run completes
    p = cli(tmp_path, "--resume", "run", "--set", "train.checkpoint_every=1")
    assert p.returncode == 0, p.stderr
    assert len(log_records(tmp_path / "run")) == 4


def test_resume_refuses_a_checkpoint_of_other_code(tmp_path):
    args = _args(["--preset", "rsm-soft-zo", "train.epochs=4", "train.checkpoint_every=2", "train.batch_size=64",
                  "task.eval_samples=64"])
    assert cli(tmp_path, "--out", "run", *args, fault="after-log:3").returncode == -9
    ck = next((tmp_path / "run" / "checkpoints").glob("epoch-*"))
    state = torch.load(ck / "state.pt", weights_only=True)
    state["code_version"] = "0" * 16
    state["code_files"]["rsm_fast/trainer.py"] = "0" * 16
    torch.save(state, ck / "state.pt")
    env = {k: v for k, v in os.environ.items() if k not in ("RSM_FAST_FAULT", "RSM_FAST_RESUME_ANY_CODE")}
    p = subprocess.run([sys.executable, "-m", "rsm_fast.train", "--quiet", "--resume", "run"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode == 2 and p.stderr.count("\n") == 1
    assert "other rsm_fast code" in p.stderr and "trainer.py" in p.stderr, p.stderr
    p = cli(tmp_path, "--resume", "run", any_code=True)     # the escape hatch: resumes with a warning
    assert p.returncode == 0 and "RSM_FAST_RESUME_ANY_CODE=1" in p.stderr, p.stderr


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path):
    args = _args(["--preset", "rsm-soft-zo", "train.epochs=6", "train.checkpoint_every=2", "train.batch_size=64",
                  "task.eval_samples=64"])
    assert cli(tmp_path, "--out", "ref", *args).returncode == 0
    assert cli(tmp_path, "--out", "run", *args, fault="after-log:5").returncode == -9
    newest = sorted((tmp_path / "run" / "checkpoints").glob("epoch-*"))[-1]
    assert newest.name == "epoch-000004"
    data = (newest / "state.pt").read_bytes()
    (newest / "state.pt").write_bytes(data[: len(data) // 2])       # e.g. a disk that lost the tail
    p = cli(tmp_path, "--resume", "run")
    assert p.returncode == 0, p.stderr
    assert "epoch-000004" in p.stderr and "unreadable" in p.stderr and "after epoch 2" in p.stderr
    assert_same_run(tmp_path / "ref", tmp_path / "run")
