"""The run directory (issue 17, item 3): an exclusive lock for the run's lifetime (stale locks
recognised), ``--overwrite`` that keeps the old run until the new one has its first checkpoint and
touches only its own files, temp files cleaned at open, one file mode, strict JSON, a default
folder that cannot leave ``runs/``."""
from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rsm_fast import rundir as RD
from rsm_fast.rundir import RunDir, RunDirError
from rsm_fast.train import main

SMALL = ["--set", "train.epochs=2", "--set", "train.batch_size=32", "--set", "task.eval_samples=64",
         "--set", "task.num_steps=10"]
TIMEOUT = 900


def _no_nan(text: str):
    def refuse(c):
        raise ValueError(f"non-JSON constant {c}")
    return json.loads(text, parse_constant=refuse)


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def test_lock_is_exclusive_and_names_the_holder(tmp_path):
    a = RunDir(tmp_path / "run")
    a.lock()
    b = RunDir(tmp_path / "run")
    with pytest.raises(RunDirError, match=f"in use by pid {os.getpid()}"):
        b.lock()
    a.close()
    b.lock()          # released with the holder
    b.close()


def test_a_killed_holder_leaves_no_lock_behind(tmp_path):
    code = ("import sys, time; from rsm_fast.rundir import RunDir; r = RunDir(sys.argv[1]); r.lock(); "
            "print('locked', flush=True); time.sleep(600)")
    p = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    with pytest.raises(RunDirError, match=f"pid {p.pid}"):
        RunDir(tmp_path / "run").lock()
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=TIMEOUT)
    assert str(p.pid) in (tmp_path / "run" / ".lock").read_text()   # the stale file is still there...
    r = RunDir(tmp_path / "run")
    r.lock()                                                         # ...and is recognised as stale
    assert (tmp_path / "run" / ".lock").read_text().split()[0] == str(os.getpid())
    r.close()


def test_two_runs_into_one_directory(tmp_path):
    """The second run into a directory that a live run holds exits 2 with one line naming the pid;
    the first is unaffected."""
    env = {k: v for k, v in os.environ.items() if k != "RSM_FAST_FAULT"}
    first = subprocess.Popen([sys.executable, "-m", "rsm_fast.train", "--quiet", "--out", "run", "--set",
                              "train.epochs=100000", "--set", "train.batch_size=32", "--set", "task.eval_samples=64"],
                             cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "run" / "log.jsonl"
    t0 = time.monotonic()
    while time.monotonic() - t0 < TIMEOUT and not (log.exists() and log.stat().st_size > 0):
        time.sleep(0.05)
    second = subprocess.run([sys.executable, "-m", "rsm_fast.train", "--quiet", "--out", "run", "--overwrite",
                             "--set", "train.seed=1"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=TIMEOUT)
    assert second.returncode == 2
    assert second.stderr.count("\n") == 1 and f"in use by pid {first.pid}" in second.stderr, second.stderr
    assert first.poll() is None
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=TIMEOUT)
    assert first.returncode == 143
    assert "seed: 0" in (tmp_path / "run" / "config.yaml").read_text()


def test_failed_overwrite_puts_the_old_run_back(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert main(["--out", str(out), "--quiet", *SMALL]) == 0
    before = _tree(out)
    from rsm_fast.trainer import Trainer

    def boom(self):
        raise RuntimeError("simulated crash in the first epoch")

    monkeypatch.setattr(Trainer, "epoch", boom)
    assert main(["--out", str(out), "--quiet", "--overwrite", *SMALL, "--set", "train.seed=3"]) == 1
    err = capsys.readouterr().err
    assert "simulated crash" in err and err.count("\n") == 1
    after = _tree(out)
    after.pop("error.log", None)
    assert after == before and not (out / RD.PREVIOUS).exists()


def test_killed_overwrite_keeps_the_old_run_until_the_new_one_checkpoints(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RSM_FAST_FAULT"}

    def cli(*args, fault=None):
        e = dict(env, **({"RSM_FAST_FAULT": fault} if fault else {}))
        return subprocess.run([sys.executable, "-m", "rsm_fast.train", "--quiet", "--out", "run", *args, *SMALL],
                              cwd=tmp_path, env=e, capture_output=True, text=True, timeout=TIMEOUT)

    assert cli().returncode == 0
    old = _tree(tmp_path / "run")
    # killed after its first epoch, before any checkpoint (checkpoints every 5 epochs)
    assert cli("--overwrite", "--set", "train.seed=5", "--set", "train.checkpoint_every=5",
               fault="after-log:1").returncode == -9
    prev = tmp_path / "run" / RD.PREVIOUS
    kept = _tree(prev)
    kept.pop(RD.MANIFEST, None)
    assert kept == {k: v for k, v in old.items() if k != RD.MANIFEST}
    p = cli()                          # a plain run says where the old run is
    assert p.returncode == 2 and ".previous-run" in p.stderr
    assert cli("--overwrite", "--set", "train.seed=6").returncode == 0
    assert not prev.exists()
    assert "seed: 6" in (tmp_path / "run" / "config.yaml").read_text()


def test_overwrite_touches_only_its_own_files(tmp_path):
    out = tmp_path / "run"
    (out / "tb").mkdir(parents=True)
    (out / "tb" / "mine.txt").write_text("a user's own tensorboard folder")
    (out / "notes.md").write_text("the user's notes")
    assert main(["--out", str(out), "--quiet", *SMALL]) == 0
    assert main(["--out", str(out), "--quiet", "--overwrite", *SMALL, "--set", "train.seed=2"]) == 0
    assert (out / "tb" / "mine.txt").read_text() == "a user's own tensorboard folder"
    assert (out / "notes.md").read_text() == "the user's notes"
    assert not (out / RD.PREVIOUS).exists()


def test_temp_files_are_removed_at_open_and_outputs_share_one_mode(tmp_path):
    out = tmp_path / "run"
    assert main(["--out", str(out), "--quiet", *SMALL, "--set", "train.checkpoint_every=1",
                 "--set", "train.epochs=3"]) == 0
    (out / ".summary.json.x1.tmp").write_text("half")
    (out / "checkpoints" / ".tmp-epoch-000009-1").mkdir()
    r = RunDir(out, overwrite=True)
    r.open({"x": 1})
    r.close()
    assert not (out / ".summary.json.x1.tmp").exists() and not (out / "checkpoints" / ".tmp-epoch-000009-1").exists()

    out2 = tmp_path / "run2"
    assert main(["--out", str(out2), "--quiet", *SMALL, "--set", "train.checkpoint_every=1"]) == 0
    modes = {p.relative_to(out2).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in out2.rglob("*") if p.is_file()}
    assert set(modes.values()) == {RD.FILE_MODE}, modes
    assert {"config.yaml", "log.jsonl", "summary.json", "checkpoint.pt", "checkpoints/epoch-000001/state.pt"} <= set(modes)


def test_keep_checkpoints_prunes_the_oldest(tmp_path):
    out = tmp_path / "run"
    assert main(["--out", str(out), "--quiet", *SMALL, "--set", "train.epochs=5", "--set", "train.checkpoint_every=1",
                 "--set", "train.keep_checkpoints=3"]) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch-000003", "epoch-000004", "epoch-000005"]
    meta = json.loads((out / "checkpoints" / "epoch-000005" / "meta.json").read_text())
    assert meta["epoch"] == 5 and meta["log_bytes"] == (out / "log.jsonl").stat().st_size


def test_outputs_are_strict_json(tmp_path):
    """A one-sample evaluation has no standard deviation: null in summary.json, never NaN."""
    out = tmp_path / "run"
    assert main(["--out", str(out), "--quiet", *SMALL, "--set", "task.eval_samples=1"]) == 0
    summary = _no_nan((out / "summary.json").read_text())
    assert summary["reward_std"] is None
    for line in (out / "log.jsonl").read_text().splitlines():
        _no_nan(line)
    assert RD.dumps({"a": float("nan"), "b": [float("inf"), 1.0]}) == '{"a": null, "b": [null, 1.0]}'


def test_default_folder_stays_under_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["--quiet", *SMALL, "--set", "preset=../../escape"]) == 0
    made = [p for p in tmp_path.rglob("summary.json")]
    assert len(made) == 1 and made[0].parent.parent == tmp_path / "runs", made
    assert RD.default_out("../x/..").parent == Path("runs")
    assert RD.default_out("").name.startswith("custom-")


@pytest.mark.parametrize("case", ["under_a_file", "too_long", "read_only", "nul"])
def test_unusable_out_is_one_line(tmp_path, capsys, case):
    if case == "under_a_file":
        (tmp_path / "f").write_text("x")
        out = str(tmp_path / "f" / "run")
    elif case == "too_long":
        out = str(tmp_path / ("x" * 300))
    elif case == "read_only":
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        out = str(ro / "run")
    else:
        out = str(tmp_path / "a\x00b")
    assert main(["--out", out, "--quiet", *SMALL]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out") and err.count("\n") == 1, err
