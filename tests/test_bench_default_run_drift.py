"""bench/default_run_drift.py (issue 20 item 7's diagnostic): a tiny end-to-end run of both phases
and of the re-evaluation of run directories, on the 2-D task."""
from __future__ import annotations

import re

import torch

from bench import default_run_drift as D


def _rows(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| phase") and not line.startswith("| run")]


def test_drift_starts_from_the_ceiling_and_reports_every_evaluation(capsys):
    assert D.main(["--ceiling-epochs", "2", "--epochs", "3", "--every", "2", "--batch-size", "16",
                   "--threads", "1"]) == 0
    out = capsys.readouterr().out
    rows = _rows(out)
    assert [r[1] for r in rows] == ["2", "2", "3"]          # the ceiling's end, then epochs 2 and 3 (the last)
    for r in rows:
        w = [float(v) for v in r[2].split(" / ")]
        assert abs(sum(w) - 1) < 2e-3 and 0 <= float(r[3]) <= 1
        assert float(r[5]) >= 0                               # a path KL
    assert re.search(r"exact weights 0\.039 / 0\.786 / 0\.175", out)


def test_evaluate_reads_run_checkpoints_on_one_common_set(tmp_path, capsys):
    from rsm_fast.config import build_config
    from rsm_fast.trainer import Trainer

    tr = Trainer(build_config("rsm-soft-zo", overrides=["train.epochs=1", "train.batch_size=16"]))
    tr.close()
    d = tmp_path / "run"
    d.mkdir()
    torch.save({"policy": tr.policy.state_dict(), "epochs_done": 0}, d / "checkpoint.pt")
    assert D.main(["--evaluate", str(d), str(d), "--eval-samples", "512", "--threads", "1"]) == 0
    rows = _rows(capsys.readouterr().out)
    assert len(rows) == 2 and rows[0][2:] == rows[1][2:]     # one common set: the same run reads the same
    assert D.main(["--evaluate", str(tmp_path / "missing"), "--threads", "1"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
