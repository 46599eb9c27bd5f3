"""The GPU-hours benchmark suite (bench/gpu_hours.py): its arithmetic and a tiny end-to-end run."""
from __future__ import annotations

import csv
import math

import pytest

from bench import gpu_hours as G


def test_crossing_interpolates_and_reports_misses():
    pts = [(1.0, 0.0, 0.0), (2.0, 100.0, 10.0), (4.0, 300.0, 20.0)]
    assert G.crossing(pts, 3.0) == [200.0, 15.0]          # half-way between the 2nd and 3rd points
    assert G.crossing(pts, 2.0) == [100.0, 10.0]
    assert G.crossing(pts, 0.5) == [0.0, 0.0]             # already there before training
    assert G.crossing(pts, 4.5) is None
    assert G.crossing([(1.0, 0.0), (3.0, 10.0), (2.0, 20.0)], 2.5) == [7.5]   # the first crossing counts


def test_paired_ratios_are_per_seed_and_mark_misses():
    base = {0: 100.0, 1: 200.0, 2: None, 3: 50.0}
    other = {0: 50.0, 1: 400.0, 2: 80.0, 3: None}
    r = G.paired_ratios(base, other)
    assert r[0] == (2.0, "") and r[1] == (0.5, "")
    assert math.isnan(r[2][0]) and r[2][1] == ">" and r[3][1] == "<"
    assert "[2 seed(s): >, <]" in G._ratio_cell(r)
    assert G.paired_ratios({0: 10.0, 1: 0.0}, {0: 0.0, 1: 0.0}) == [(math.inf, ""), (1.0, "")]


def test_pareto_flags():
    pts = [("a", 5.0, 1.0), ("b", 4.0, 2.0), ("c", 6.0, 3.0), ("d", 5.0, 1.0)]
    assert G.pareto(pts) == [True, False, True, True]


def test_tiny_run_writes_tables(tmp_path):
    out = tmp_path / "gh"
    rc = G.main(["--task", "toy2d", "--presets", "tempflow-grpo,rsm-evr", "--seeds", "0,1", "--epochs", "2",
                 "--eval-every", "1", "--eval-samples", "32", "--target", "3.1", "--set", "train.batch_size=8",
                 "--set", "policy.hidden=16", "--out", str(out)])
    assert rc == 0
    runs = list(csv.DictReader(open(f"{out}_runs.csv")))
    assert [(r["preset"], r["seed"]) for r in runs] == [("tempflow-grpo", "0"), ("tempflow-grpo", "1"),
                                                        ("rsm-evr", "0"), ("rsm-evr", "1")]
    epochs = list(csv.DictReader(open(f"{out}_epochs.csv")))
    assert len(epochs) == 4 * 3                                   # an evaluation before training + 2 epochs
    nfe = [int(r["nfe"]) for r in epochs if r["preset"] == "tempflow-grpo" and r["seed"] == "0"]
    assert nfe[0] == 0 and nfe[1] > 0 and nfe[2] == 2 * nfe[1]     # a static plan costs the same every epoch
    md = (tmp_path / "gh.md").read_text()
    assert "| rsm-evr | " in md and "speedup in NFE" in md and "Target reward 3.1" in md
    assert (tmp_path / "gh.png").stat().st_size > 10000


def test_bad_preset_or_override_is_one_line(tmp_path, capsys):
    for extra in (["--presets", "nope"], ["--presets", "grpo", "--set", "train.lr=-1"]):
        rc = G.main(["--target", "1", "--epochs", "1", "--out", str(tmp_path / "x")] + extra)
        err = capsys.readouterr().err.strip()
        assert rc == 2 and err.startswith("error:") and "\n" not in err
    with pytest.raises(SystemExit):
        G.main(["--target", "1", "--seeds", "a,b", "--out", str(tmp_path / "x")])
