"""The fair-baseline sweep (bench/sweep.py): the grid-growth logic on fake scores, the sweep's
bookkeeping on faked runs, bad input refused before any training, one tiny real sweep on the 2-D
task and ``gpu_hours.py --tuned`` applying its choice (about 15 s on a 2-core CPU)."""
from __future__ import annotations

import csv
import json
import math

import pytest

from bench import gpu_hours as G
from bench import sweep as S

TINY = ["--set", "train.batch_size=32", "--set", "task.eval_samples=256", "--set", "policy.hidden=16"]


def _peaked(at: float, fail_above: float = math.inf):
    """A fake score, highest at lr = ``at`` (log scale); -inf above ``fail_above``; logs its calls."""
    calls = []

    def score(lr, knob):
        calls.append((lr, knob))
        return -math.inf if lr > fail_above else -abs(math.log(lr / at)) + (0.5 if knob == "b" else 0.0)
    return score, calls


# ------------------------------------------------------------------------------------------------
# the grid, without training
# ------------------------------------------------------------------------------------------------
def test_best_at_the_low_edge_grows_downward_until_interior():
    score, calls = _peaked(0.004)
    r = S.search([0.04, 0.01, 0.02], [None], score, max_grow=3)
    assert r["grown"] == [{"edge": "low", "lr": 0.005}, {"edge": "low", "lr": 0.0025}]
    assert r["grid"] == [0.0025, 0.005, 0.01, 0.02, 0.04] and r["best"] == (0.005, None)
    assert r["interior"] and r["edge"] is None and len(calls) == 5      # each point scored once


def test_best_at_the_high_edge_grows_upward():
    score, _ = _peaked(0.1)
    r = S.search([0.01, 0.02, 0.04], [None], score, max_grow=3)
    assert [g["edge"] for g in r["grown"]] == ["high", "high"] and r["grid"][-2:] == [0.08, 0.16]
    assert r["best"] == (0.08, None) and r["interior"]


def test_an_interior_best_stops_at_once_and_max_grow_is_respected():
    score, calls = _peaked(0.02)
    r = S.search([0.01, 0.02, 0.04], [None], score, max_grow=3)
    assert r["grown"] == [] and r["interior"] and len(calls) == 3
    score, calls = _peaked(1e-6)
    r = S.search([0.01, 0.02, 0.04], [None], score, max_grow=2)
    assert len(r["grown"]) == 2 and r["best"] == (0.0025, None) and not r["interior"] and r["edge"] == "low"
    assert len(calls) == 5
    assert S.search([0.01, 0.02], [None], _peaked(1e-6)[0], max_grow=0)["grid"] == [0.01, 0.02]


def test_a_failed_point_is_never_chosen():
    score, _ = _peaked(1.0, fail_above=0.03)           # the best-looking lr diverges
    r = S.search([0.01, 0.02, 0.04], [None], score, max_grow=3)
    assert r["best"] == (0.02, None) and r["interior"] and r["scores"][(0.04, None)] == -math.inf
    score, calls = _peaked(0.001, fail_above=0.0)      # every point fails: grow downward, choose nothing
    r = S.search([0.01, 0.02], [None], score, max_grow=2)
    assert r["best"] is None and not r["interior"] and [g["lr"] for g in r["grown"]] == [0.005, 0.0025]
    calls.clear()

    def first_fail(lr, knob):                          # all fail, then the grown lower lr works
        return 1.0 if lr < 0.01 else -math.inf
    r = S.search([0.01, 0.02], [None], first_fail, max_grow=1)
    assert r["best"] == (0.005, None) and not r["interior"] and r["edge"] == "low"


def test_knob_grid_grows_along_lr_with_every_knob_value_and_ties_go_to_the_smaller_lr():
    score, calls = _peaked(0.004)
    r = S.search([0.01, 0.02], ["a", "b"], score, max_grow=1)
    assert r["best"] == (0.005, "b") and r["grown"] == [{"edge": "low", "lr": 0.005}]
    assert sorted(calls[-2:]) == [(0.005, "a"), (0.005, "b")] and len(calls) == 6
    assert S.best_point({(1.0, None): 2.0, (2.0, None): 2.0}, [1.0, 2.0], [None]) == (1.0, None)
    assert S.beyond([0.002, 0.004], "low") == 0.001 and S.beyond([0.002, 0.004, 0.008], "high") == 0.016


def test_scores_of_a_final_evaluation():
    last = {"eval_reward": 4.0, "eval_kl": 0.5, "eval_gain": 0.8, "eval_gain_marginal": 0.9}
    assert S.run_score(last, "gain", 1.0) == 0.8 and S.run_score(last, "gain-marginal", 1.0) == 0.9
    assert S.run_score(last, "objective", 2.0) == 3.0 and S.run_score(last, "reward", 2.0) == 4.0
    assert S.run_score({**last, "eval_gain": math.nan}, "gain", 1.0) == -math.inf


# ------------------------------------------------------------------------------------------------
# the sweep's bookkeeping with faked runs
# ------------------------------------------------------------------------------------------------
def _fake_run_one(label, seed, args, log=print):
    """Gain peaks at lr 0.02 (knob 0.02 a little better); lr >= 0.1 diverges; seed 101 is 0.1 lower."""
    _, own = G.parse_variant(label)
    sets = dict(x.split("=") for x in own)
    lr, knob = float(sets["train.lr"]), float(sets.get("method.clip_eps", 0))
    if lr >= 0.1:
        raise G.NonFiniteError("loss became non-finite")
    gain = 1 - abs(math.log(lr / 0.02)) + knob - 0.1 * (seed == 101)
    row = {"epoch": 2, "nfe": 100, "cpu_s": 1.0, "wall_s": 1.0, "eval_reward": 3 + gain, "eval_kl": 0.1,
           "eval_gain": gain, "eval_gain_marginal": gain}
    return [row], "epochs"


def test_fake_sweep_records_failures_flags_edges_and_writes_strict_json(tmp_path, monkeypatch):
    monkeypatch.setattr(S.G, "run_one", _fake_run_one)
    out = tmp_path / "f"
    rc = S.main(["--presets", "grpo,rsm-soft-zo[method.kl_coef=0.5]", "--lr", "0.005,0.01", "--seeds", "100,101",
                 "--knob", "method.clip_eps=0.01,0.02", "--epochs", "2", "--max-grow", "1", "--out", str(out)])
    assert rc == 0
    meta = json.loads((tmp_path / "f.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
    e = meta["presets"]["grpo"]
    assert e["grid"] == [0.005, 0.01, 0.02] and e["chosen"] == ["train.lr=0.02", "method.clip_eps=0.02"]
    assert not e["interior"] and e["edge"] == "high" and e["runs"] == 3 * 2 * 2
    top = [p for p in e["points"] if p["lr"] == 0.02 and p["knob"] == "0.02"][0]
    assert top["seeds"] == {"100": pytest.approx(1.02), "101": pytest.approx(0.92)} and top["min"] == pytest.approx(0.92)
    assert "rsm-soft-zo[method.kl_coef=0.5]" in meta["presets"]
    md = (tmp_path / "f.md").read_text()
    assert "**no: best at the high edge after 1 growth(s)**" in md and "| **0.97** |" in md
    assert md.startswith("# Learning-rate sweep: toy2d\n\nCommand: `python bench/sweep.py --presets 'grpo,rsm")
    # a diverging lr: failed points, -inf (null in JSON), never chosen, the sweep goes on
    rc = S.main(["--presets", "grpo", "--lr", "0.05,0.1,0.2", "--seeds", "100", "--epochs", "2", "--max-grow", "0",
                 "--out", str(tmp_path / "d")])
    meta = json.loads((tmp_path / "d.json").read_text())
    e = meta["presets"]["grpo"]
    assert rc == 0 and e["chosen"] == ["train.lr=0.05"] and not e["interior"]
    assert [p["mean"] for p in e["points"]][1:] == [None, None] and len(meta["failed_runs"]) == 2
    rows = list(csv.DictReader(open(tmp_path / "d.csv")))
    assert [r["stop"] for r in rows] == ["epochs", "failed", "failed"] and "non-finite" in rows[1]["error"]
    assert f"| grpo | **{1 - math.log(2.5):.4g}** | fail | fail |" in (tmp_path / "d.md").read_text()


@pytest.mark.parametrize("extra, word", [
    (["--presets", "nope"], "'nope'"),
    (["--knob", "method.nope=1,2"], "'method.nope' is not a config field"),
    (["--knob", "method.clip_eps=-1,0.1"], "method.clip_eps"),
    (["--lr", ","], "--lr: empty"),
    (["--lr", "0.01,0"], "--lr: 0 is not a positive"),
    (["--lr", "0.01,abc"], "--lr: 'abc'"),
    (["--lr", "0.01"], "--lr: one value"),
    (["--set", "train.lr=0.1"], "--set train.lr"),
    (["--presets", "grpo[train.lr=0.1]"], "its own overrides set train.lr"),
    (["--task", "digits-flow", "--score", "gain"], "--score gain"),
    (["--set", "train.nope=1"], "train.nope"),
])
def test_bad_input_is_one_line_before_any_training(tmp_path, monkeypatch, capsys, extra, word):
    monkeypatch.setattr(S.G, "run_one", lambda *a, **k: pytest.fail("trained"))
    rc = S.main(["--presets", "grpo", "--lr", "0.01,0.02", "--epochs", "1", "--out", str(tmp_path / "x")] + extra)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error:") and "\n" not in err and word in err, err
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------------
# one real sweep, and gpu_hours --tuned
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "s"
    rc = S.main(["--task", "toy2d", "--presets", "rsm-soft-zo,grpo", "--lr", "0.005,0.01", "--seeds", "100",
                 "--epochs", "2", "--max-grow", "1", "--out", str(out)] + TINY)
    assert rc == 0
    return out


def test_real_sweep_writes_tables_and_chooses_the_best(real_sweep):
    meta = json.loads(real_sweep.with_suffix(".json").read_text())
    assert meta["command"].startswith("python bench/sweep.py --task toy2d") and meta["machine"]["cores"]
    assert meta["args"]["seeds"] == [100] and meta["args"]["eval_samples"] == 256 and meta["score"] == "gain"
    rows = list(csv.DictReader(open(real_sweep.with_suffix(".csv"))))
    assert len(rows) == sum(e["runs"] for e in meta["presets"].values()) and {r["stop"] for r in rows} == {"epochs"}
    assert all(float(r["score"]) == float(r["eval_gain"]) for r in rows)
    for label, e in meta["presets"].items():
        assert set(e) >= {"grid", "points", "best", "chosen", "interior", "edge", "grown"}
        assert len(e["grid"]) == 2 + len(e["grown"]) == len(e["points"]) <= 3
        best = max(e["points"], key=lambda p: p["mean"])
        assert e["chosen"] == [f"train.lr={best['lr']!r}"] and e["best"]["mean"] == best["mean"]
        assert e["interior"] == (e["grid"][0] < best["lr"] < e["grid"][-1])
    md = real_sweep.with_suffix(".md").read_text()
    assert "Command: `python bench/sweep.py --task toy2d" in md and "| rsm-soft-zo |" in md and "**" in md
    assert "Sweep seeds [100]" in md and "2 epochs" in md


def test_gpu_hours_tuned_applies_the_chosen_overrides(real_sweep, tmp_path, capsys):
    tuned = str(real_sweep.with_suffix(".json"))
    chosen = {p: e["chosen"] for p, e in json.loads(open(tuned).read())["presets"].items()}
    out = tmp_path / "gh"
    rc = G.main(["--task", "toy2d", "--presets", "rsm-soft-zo,grpo", "--baseline", "grpo", "--seeds", "0",
                 "--epochs", "1", "--eval-samples", "32", "--target", "3.1", "--tuned", tuned, "--out", str(out)]
                + TINY[:2] + TINY[4:])
    assert rc == 0 and "was tuned with other epochs, set" in capsys.readouterr().err
    labels = [f"{p}[{','.join(chosen[p])}]" for p in ("rsm-soft-zo", "grpo")]
    meta = json.loads((tmp_path / "gh.json").read_text())
    assert meta["args"]["presets"] == labels and meta["args"]["baseline"] == labels[1]
    assert meta["tuned"]["overrides"] == chosen and meta["tuned"]["sweep_seeds"] == [100]
    assert {r["preset"] for r in csv.DictReader(open(tmp_path / "gh.csv"))} == set(labels)
    assert f"| {labels[0]} |" in (tmp_path / "gh.md").read_text() and "speedup NFE" in (tmp_path / "gh.md").read_text()
    args = G.parse(["--seeds", "0", "--epochs", "1", "--target", "1", "--out", "x"])
    lr = float(chosen["grpo"][0].split("=")[1])
    assert G.run_config(labels[1], args, 0).train.lr == lr
    assert G.add_overrides("a[x=1]", ["y=2"]) == "a[x=1,y=2]" and G.add_overrides("a", []) == "a"


@pytest.mark.parametrize("extra, word", [
    (["--seeds", "100"], "seeds [100] were used to tune"),
    (["--presets", "tempflow-grpo"], "no chosen overrides for preset tempflow-grpo"),
    (["--set", "train.lr=0.1"], "--set train.lr would replace"),
    (["--task", "digits-flow"], "the sweep ran task toy2d"),
    (["--tuned", "/nonexistent.json"], "cannot read a sweep JSON"),
])
def test_gpu_hours_tuned_refuses_a_mismatch_in_one_line(real_sweep, tmp_path, capsys, extra, word):
    args = {"--presets": "grpo", "--seeds": "0", "--tuned": str(real_sweep.with_suffix(".json"))}
    args.update(dict(zip(extra[::2], extra[1::2])))
    rc = G.main([x for kv in args.items() for x in kv] + ["--epochs", "1", "--target", "1", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error:") and "\n" not in err and word in err, err
    assert not list(tmp_path.iterdir())


def test_gpu_hours_tuned_takes_several_sweeps_each_preset_from_one(real_sweep, tmp_path, capsys):
    full = json.loads(real_sweep.with_suffix(".json").read_text())
    parts = []
    for p in ("rsm-soft-zo", "grpo"):                # one sweep per preset, as lr-only and lr x beta sweeps
        part = dict(full, presets={p: full["presets"][p]})
        parts.append(tmp_path / f"{p}.json")
        parts[-1].write_text(json.dumps(part))
    base = ["--task", "toy2d", "--presets", "rsm-soft-zo,grpo", "--seeds", "0", "--epochs", "1",
            "--target", "1", "--eval-samples", "32"] + TINY[:2] + TINY[4:]
    out = tmp_path / "two"
    assert G.main(base + ["--tuned", ",".join(map(str, parts)), "--out", str(out)]) == 0
    meta = json.loads((tmp_path / "two.json").read_text())
    assert meta["tuned"]["overrides"] == {p: e["chosen"] for p, e in full["presets"].items()}
    assert len(meta["tuned"]["sweep_command"]) == 2
    capsys.readouterr()
    twice = f"{parts[0]},{parts[0]}"
    assert G.main(base + ["--tuned", twice, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "tuned by two sweeps" in err and "\n" not in err
