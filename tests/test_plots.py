"""TensorBoard logging and the run plots (rsm_fast.runlog, rsm_fast.plots, train --tensorboard --plots)."""
from __future__ import annotations

import pytest

from rsm_fast import plots
from rsm_fast.runlog import RunDirError, scalars
from rsm_fast.train import main

ARGS = ["--preset", "rsm-evr", "--set", "train.epochs=3", "--set", "train.batch_size=8", "--set", "train.threads=1",
        "--set", "task.eval_samples=64", "--set", "policy.hidden=16", "--quiet"]


def test_scalars_flattens_nested_records_and_skips_gaps():
    rec = {"epoch": 3, "reward_mean": 1.5, "ok": True, "name": "x", "seconds_epoch": {"rollout": 0.25},
           "per_step": {"K": [6.0, None, 2.0]}, "bad": float("nan")}
    assert dict(scalars(rec)) == {"epoch": 3.0, "reward_mean": 1.5, "seconds_epoch/rollout": 0.25,
                                  "per_step/K/00": 6.0, "per_step/K/02": 2.0}


def test_train_writes_tensorboard_and_plots(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(ARGS + ["--out", str(out), "--tensorboard", "--plots"]) == 0
    printed = capsys.readouterr().out
    for name in ("influence.png", "branches.png", "reward_hours.png", "reward_kl.png"):
        f = out / "plots" / name
        assert f.stat().st_size > 5000 and f"plot: {f}" in printed
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"reward_mean", "kl", "per_step/K/00", "per_step/v/08", "per_step/h_g/00", "alloc/next_k/00",
            "seconds_epoch/rollout", "nfe_epoch/rollout"} <= tags
    assert [e.step for e in acc.Scalars("reward_mean")] == [0, 1, 2]
    # overwriting the run clears the old event files
    assert main(ARGS + ["--out", str(out), "--tensorboard", "--overwrite"]) == 0
    assert len(list((out / "tb").iterdir())) == 1


def test_plots_cli_compares_runs_and_rejects_a_non_run(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(ARGS + ["--out", str(a)]) == 0
    assert main(ARGS + ["--out", str(b), "--set", "rollout.allocator="]) == 0
    assert plots.main([str(a), str(b), "--out", str(tmp_path / "cmp")]) == 0
    assert len(list((tmp_path / "cmp").glob("*.png"))) == 4
    capsys.readouterr()
    assert plots.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "log.jsonl" in err and "\n" not in err


def test_corrupt_log_line_is_named(tmp_path):
    (tmp_path / "log.jsonl").write_text('{"epoch": 0, "reward_mean": 1}\n{oops\n')
    with pytest.raises(RunDirError, match="line 2"):
        plots.read_log(tmp_path)
