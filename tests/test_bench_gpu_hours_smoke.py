"""The GPU-hours benchmark suite (bench/gpu_hours.py): its arithmetic on synthetic curves and a
tiny end-to-end run on the 2-D task (about 10 s on a 2-core CPU)."""
from __future__ import annotations

import csv
import json
import math

import pytest

from bench import gpu_hours as G
from bench import gpu_hours_report as R


def _curve(preset, seed, rewards, nfe_per_epoch=100, cpu_per_epoch=2.0, kl=0.1):
    """Synthetic per-epoch rows with an evaluation at every epoch (epoch 0 = before training)."""
    return [{"preset": preset, "seed": seed, "epoch": e, "nfe": e * nfe_per_epoch, "cpu_s": e * cpu_per_epoch,
             "wall_s": e * cpu_per_epoch * 1.5, "eval_reward": r, "eval_kl": kl * e, "eval_s": 0.0, "eval_nfe": 0}
            for e, r in enumerate(rewards)]


def test_crossing_interpolates_and_reports_misses():
    pts = [(1.0, 0.0, 0.0), (2.0, 100.0, 10.0), (4.0, 300.0, 20.0)]
    assert R.crossing(pts, 3.0) == [200.0, 15.0]          # half-way between the 2nd and 3rd points
    assert R.crossing(pts, 2.0) == [100.0, 10.0]          # exactly on a point
    assert R.crossing(pts, 0.5) == [0.0, 0.0]             # reached at the first point: no cost
    assert R.crossing(pts, 4.5) is None                   # never reached
    assert R.crossing([(1.0, 0.0), (3.0, 10.0), (2.0, 20.0), (5.0, 30.0)], 2.5) == [7.5]   # the first crossing counts


def test_summarize_costs_to_target_on_synthetic_curves():
    rows = (_curve("base", 0, [1.0, 2.0, 3.0, 4.0]) + _curve("fast", 0, [1.0, 3.0, 5.0, 6.0], nfe_per_epoch=50)
            + _curve("slow", 0, [1.0, 1.5, 2.0, 2.5]) + _curve("early", 0, [3.5, 3.6, 3.7, 3.8]))
    runs = {r["preset"]: r for r in R.summarize(rows, 3.5, "base")}
    b, f, s, e = runs["base"], runs["fast"], runs["slow"], runs["early"]
    assert b["reached"] and b["epochs_to_target"] == pytest.approx(2.5) and b["nfe_to_target"] == pytest.approx(250)
    assert b["cpu_s_to_target"] == pytest.approx(5.0) and b["wall_s_to_target"] == pytest.approx(7.5)
    assert f["epochs_to_target"] == pytest.approx(1.25) and f["nfe_to_target"] == pytest.approx(62.5)
    assert f["speedup_nfe"] == pytest.approx(4.0) and f["speedup_cpu_s"] == pytest.approx(2.0) and f["speedup_nfe_kind"] == ""
    assert not s["reached"] and s["nfe_to_target"] is None and s["speedup_nfe_kind"] == "<"
    assert s["speedup_nfe"] == pytest.approx(250 / 300)                 # upper bound: the baseline's cost / its spend
    assert e["nfe_to_target"] == 0 and e["speedup_nfe"] == math.inf     # at the target before training
    assert b["final_reward"] == 4.0 and b["final_kl"] == pytest.approx(0.3) and b["nfe_per_epoch"] == 100


def test_paired_ratios_are_per_seed_with_bounds():
    base = {0: (100.0, 300.0), 1: (200.0, 300.0), 2: (None, 300.0), 3: (50.0, 300.0), 4: (None, 300.0), 9: (1.0, 1.0)}
    other = {0: (50.0, 200.0), 1: (400.0, 500.0), 2: (150.0, 200.0), 3: (None, 200.0), 4: (None, 200.0)}
    r = R.paired_ratios(base, other)
    assert [s for s, _, _ in r] == [0, 1, 2, 3, 4]                       # seed 9 unpaired: skipped
    assert r[0][1:] == (2.0, "") and r[1][1:] == (0.5, "")
    assert r[2][1:] == (2.0, ">") and r[3][1:] == (0.25, "<")            # 300/150 lower bound, 50/200 upper bound
    assert math.isnan(r[4][1]) and r[4][2] == "na"
    st = R.ratio_stats(r)
    assert st["median"] == pytest.approx(1.25) and (st["min"], st["max"]) == (0.5, 2.0) and st["n_exact"] == 2
    assert st["faster"] == 2 and st["n"] == 5                            # seed 0 exact, seed 2 lower bound
    assert "s2: >2×" in R._ratio_cell(st) and "faster 2/5" in R._ratio_cell(st)
    assert R.paired_ratios({0: (10.0, 20.0), 1: (0.0, 20.0)}, {0: (0.0, 5.0), 1: (0.0, 5.0)}) == [(0, math.inf, ""), (1, 1.0, "")]


def test_target_frac_and_pareto():
    rows = _curve("a", 0, [3.0, 5.0, 7.0]) + _curve("a", 1, [3.0, 6.0, 9.0]) + _curve("b", 0, [3.0, 4.0, 5.0])
    t, note = R.resolve_target(rows, None, 0.5)
    assert t == pytest.approx(3.0 + 0.5 * (8.0 - 3.0)) and "--target-frac" in note     # a's median final 8
    assert R.resolve_target(rows, 4.2, None)[0] == 4.2
    pts = [("a", 5.0, 1.0), ("b", 4.0, 2.0), ("c", 6.0, 3.0), ("d", 5.0, 1.0)]
    assert R.pareto(pts) == [True, False, True, True]


def test_tiny_run_writes_tables_and_reanalyzes(tmp_path):
    out = tmp_path / "gh"
    common = ["--task", "toy2d", "--seeds", "0,1", "--eval-samples", "32", "--set", "train.batch_size=8",
              "--set", "policy.hidden=16"]
    rc = G.main(common + ["--presets", "tempflow-grpo,rsm-uniform-realloc", "--epochs", "3", "--eval-every", "2",
                          "--target", "3.1", "--out", str(out)])
    assert rc == 0
    runs = list(csv.DictReader(open(f"{out}_summary.csv")))
    assert [(r["preset"], r["seed"]) for r in runs] == [("tempflow-grpo", "0"), ("tempflow-grpo", "1"),
                                                        ("rsm-uniform-realloc", "0"), ("rsm-uniform-realloc", "1")]
    epochs = list(csv.DictReader(open(f"{out}.csv")))
    assert len(epochs) == 4 * 4                                           # epoch 0 (evaluation) + 3 epochs
    mine = [r for r in epochs if r["preset"] == "tempflow-grpo" and r["seed"] == "0"]
    nfe = [int(r["nfe"]) for r in mine]
    assert nfe[0] == 0 and nfe[1] > 0 and nfe[3] == 3 * nfe[1]           # a static plan costs the same every epoch
    assert all(int(r["nfe"]) == int(r["nfe_rollout"]) + int(r["nfe_reference"]) + int(r["nfe_train"]) for r in mine)
    evald = [r["eval_reward"] != "nan" for r in mine]
    assert evald == [True, False, True, True]                            # before, every 2nd epoch, at the end
    assert float(mine[-1]["cpu_s"]) > 0 and float(mine[-1]["wall_s"]) > 0 and int(mine[-1]["eval_nfe"]) > 0
    assert 0 < float(mine[-1]["rollout_s"]) + float(mine[-1]["train_s"]) <= float(mine[-1]["wall_s"])   # phases of epoch()
    md = (tmp_path / "gh.md").read_text()
    for s in ("| rsm-uniform-realloc | ", "speedup NFE", "CPU-hours to target", "Target reward: 3.1", "torch ",
              "Command: `python bench/gpu_hours.py --task toy2d", "## Reward–KL", "Pareto", "Code: rsm_fast from",
              "## Cost per epoch", "| alloc ms |"):
        assert s in md, s
    assert "GPU-hours to target" not in md
    assert (tmp_path / "gh.png").stat().st_size > 10000
    assert json.loads((tmp_path / "gh.json").read_text())["args"]["seeds"] == "0,1"
    # the same runs, another target, no training
    rc = G.main(["--reanalyze", str(out), "--target-frac", "0.5", "--out", str(tmp_path / "re")])
    assert rc == 0 and "--target-frac" in (tmp_path / "re.md").read_text() and "tables rewritten by" in (tmp_path / "re.md").read_text()
    assert len(list(csv.DictReader(open(tmp_path / "re_summary.csv")))) == 4 and not (tmp_path / "re.csv").exists()


def test_nfe_budget_stops_the_run(tmp_path):
    out = tmp_path / "b"
    rc = G.main(["--presets", "tempflow-grpo", "--seeds", "0", "--budget-nfe", "10000", "--eval-every", "5",
                 "--eval-samples", "16", "--set", "train.batch_size=8", "--set", "policy.hidden=16", "--target", "3",
                 "--out", str(out)])
    rows = list(csv.DictReader(open(f"{out}.csv")))
    nfe = [int(r["nfe"]) for r in rows]
    assert rc == 0 and nfe[-2] < 10000 <= nfe[-1]                           # stops at the epoch crossing 10,000
    assert rows[-1]["eval_reward"] != "nan"                                  # and evaluates there


def test_bad_preset_or_override_is_one_line(tmp_path, capsys):
    for extra, word in ((["--presets", "nope"], "nope"), (["--presets", "grpo", "--set", "train.lr=-1"], "train.lr"),
                        (["--presets", "grpo", "--set", "train.nope=1"], "train.nope")):
        rc = G.main(["--target", "1", "--epochs", "1", "--out", str(tmp_path / "x")] + extra)
        err = capsys.readouterr().err.strip()
        assert rc == 2 and err.startswith("error:") and "\n" not in err and word in err
    assert not list(tmp_path.glob("x*"))                                     # nothing written
    for bad in (["--target", "1", "--seeds", "a,b", "--epochs", "1"], ["--target", "1"], ["--epochs", "1"]):
        with pytest.raises(SystemExit):                                      # argparse: bad seeds / no budget / no target
            G.main(bad + ["--out", str(tmp_path / "x")])


def test_a_fallback_backend_fails_the_benchmark_and_rows_name_the_backend(tmp_path, monkeypatch, capsys):
    """The fused ops' backend is in every epoch row and the header; a silent fallback to plain torch
    refuses to start (one line, nothing written), while a backend forced on purpose is measured."""
    from rsm_fast.ops import backends

    real = backends.for_device
    monkeypatch.delenv("RSM_FAST_OPS_BACKEND", raising=False)
    monkeypatch.setattr(backends, "for_device", lambda device: backends._DECOMPOSED)
    args = ["--task", "toy2d", "--presets", "grpo", "--baseline", "grpo", "--seeds", "0", "--epochs", "1",
            "--eval-samples", "16",
            "--set", "train.batch_size=8", "--set", "method.group_size=4", "--set", "policy.hidden=16",
            "--target", "3.1"]
    rc = G.main(args + ["--out", str(tmp_path / "fb")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "fell back to 'decomposed' instead of 'cpp'" in err and "\n" not in err
    assert not list(tmp_path.glob("fb*"))
    monkeypatch.setattr(backends, "for_device", real)
    monkeypatch.setenv("RSM_FAST_OPS_BACKEND", "decomposed")
    assert G.main(args + ["--out", str(tmp_path / "ok")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "ok.csv")))
    assert rows and all(r["ops_backend"] == "decomposed" for r in rows)
    assert "fused ops on `decomposed`" in (tmp_path / "ok.md").read_text()
    assert R.read_epochs(tmp_path / "ok.csv")[0]["ops_backend"] == "decomposed"


def test_a_run_that_fails_midway_is_recorded_and_the_suite_goes_on(tmp_path, monkeypatch):
    real = G.Trainer.epoch

    def epoch(self):                       # the allocator deactivating every step, at epoch 2 of seed 1
        if self.cfg.train.seed == 1 and self.epochs_done == 1:
            self.nfe["rollout"] += 5
            raise G.ConfigError("config field 'rollout.waves': plan.k has no branching step")
        return real(self)

    monkeypatch.setattr(G.Trainer, "epoch", epoch)
    out = tmp_path / "f"
    rc = G.main(["--presets", "tempflow-grpo,tempflow-grpo-k1", "--seeds", "0,1", "--epochs", "3", "--eval-samples", "16",
                 "--set", "train.batch_size=16", "--set", "policy.hidden=16", "--target", "100", "--out", str(out)])
    assert rc == 0
    runs = {(r["preset"], r["seed"]): r for r in csv.DictReader(open(f"{out}_summary.csv"))}
    bad = runs[("tempflow-grpo-k1", "1")]
    assert bad["stop"].startswith("failed: config field") and bad["epochs"] == "2" and bad["speedup_nfe_kind"] == "failed"
    assert runs[("tempflow-grpo-k1", "0")]["stop"] == "epochs" and runs[("tempflow-grpo-k1", "0")]["speedup_nfe_kind"] == "na"
    rows = [r for r in csv.DictReader(open(f"{out}.csv")) if r["preset"] == "tempflow-grpo-k1" and r["seed"] == "1"]
    assert rows[-1]["train_reward"] == "nan" and rows[-1]["eval_reward"] != "nan"    # the failed epoch: cost, evaluation
    md = (tmp_path / "f.md").read_text()
    assert "| failed (1) |" in md and "1. config field 'rollout.waves'" in md


def test_variant_labels_parse_and_bad_ones_are_one_line():
    assert G.split_presets("a,b[x.y=1,z.w=q],c") == ["a", "b[x.y=1,z.w=q]", "c"]
    assert G.parse_variant("b[x.y=1,z.w=q]") == ("b", ["x.y=1", "z.w=q"])
    assert G.parse_variant("plain") == ("plain", [])
    assert G.parse_variant("b[r.k=[2,2,0],r.p=]") == ("b", ["r.k=[2,2,0]", "r.p="])
    assert G.split_presets("a[r.k=[1,2]],b") == ["a[r.k=[1,2]]", "b"]
    for bad in ("b[x.y=1", "b[]", "b[novalue]", "[x=1]", "b[x=]]", "b[x=[1]"):
        with pytest.raises(G.ConfigError) as e:
            G.parse_variant(bad)
        assert "--presets" in str(e.value) and "\n" not in str(e.value)


def test_variants_in_parallel_jobs_equal_the_serial_runs(tmp_path):
    """A preset[k=v] variant runs with its own override (its label in the tables), and --jobs 2
    (one spawned process per run) gives the serial run's NFE and rewards run for run."""
    common = ["--task", "toy2d", "--seeds", "0", "--eval-samples", "32", "--set", "train.batch_size=8",
              "--set", "policy.hidden=16", "--epochs", "2", "--target", "3.1",
              "--presets", "tempflow-grpo,tempflow-grpo[rollout.allocator=online,rollout.alloc_units=nfe]"]
    assert G.main(common + ["--out", str(tmp_path / "serial")]) == 0
    assert G.main(common + ["--jobs", "2", "--out", str(tmp_path / "par")]) == 0
    ser = list(csv.DictReader(open(tmp_path / "serial.csv")))
    par = list(csv.DictReader(open(tmp_path / "par.csv")))
    assert [r["preset"] for r in ser] == [r["preset"] for r in par]
    assert {r["preset"] for r in ser} == {"tempflow-grpo", "tempflow-grpo[rollout.allocator=online,rollout.alloc_units=nfe]"}
    for a, b in zip(ser, par):
        assert (a["nfe"], a["eval_reward"], a["train_reward"]) == (b["nfe"], b["eval_reward"], b["train_reward"])
    base, var = [[r for r in ser if r["preset"] == p and r["epoch"] == "2"][0]
                 for p in ("tempflow-grpo", "tempflow-grpo[rollout.allocator=online,rollout.alloc_units=nfe]")]
    assert base["nfe"] != var["nfe"]                                     # the override reached the variant only
    assert "own overrides" in (tmp_path / "par.md").read_text()


def test_forward_process_presets_run_as_baselines(tmp_path):
    """diffusion-nft and awm (issue 19) in the harness beside a trajectory preset: their runs, NFE
    kinds and speedups are measured the same way."""
    out = tmp_path / "fp"
    rc = G.main(["--task", "toy2d", "--seeds", "0", "--eval-samples", "32", "--set", "train.batch_size=16",
                 "--set", "method.group_size=8", "--set", "policy.hidden=16",
                 "--presets", "tempflow-grpo,diffusion-nft,awm", "--baseline", "diffusion-nft", "--epochs", "2",
                 "--eval-every", "1", "--target", "3.05", "--out", str(out)])
    assert rc == 0
    runs = {r["preset"]: r for r in csv.DictReader(open(f"{out}_summary.csv"))}
    assert set(runs) == {"tempflow-grpo", "diffusion-nft", "awm"}
    epochs = [r for r in csv.DictReader(open(f"{out}.csv")) if r["preset"] in ("diffusion-nft", "awm")]
    assert all(int(r["nfe"]) == int(r["nfe_rollout"]) + int(r["nfe_reference"]) + int(r["nfe_train"]) for r in epochs)
    assert all(int(r["nfe_rollout"]) > 0 for r in epochs if r["epoch"] != "0")


def test_target_gain_crosses_the_regularised_objective(tmp_path, capsys):
    """--target-gain: the crossing is on the evaluation's objective gain, (J - J_ref)/(J* - J_ref);
    the rows record J and the gain, the table names the target and the final gain; a digits run or
    an old CSV without the columns is refused in one line."""
    out = tmp_path / "g"
    rc = G.main(["--task", "toy2d", "--presets", "grpo", "--baseline", "grpo", "--seeds", "0", "--epochs", "2",
                 "--eval-samples", "64", "--set", "train.batch_size=8", "--set", "method.group_size=4",
                 "--set", "policy.hidden=16", "--target-gain", "0.05", "--out", str(out)])
    assert rc == 0
    rows = R.read_epochs(tmp_path / "g.csv")
    ev = [r for r in rows if not math.isnan(r["eval_reward"])]
    assert all(r["eval_objective"] == pytest.approx(r["eval_reward"] - r["eval_kl"], abs=1e-6) for r in ev)
    assert ev[0]["eval_kl"] == 0.0 and abs(ev[0]["eval_gain"]) < 0.5
    run = R.summarize(rows, 0.05, "grpo", key="eval_gain")[0]
    want = R.crossing([(r["eval_gain"], r["epoch"], r["nfe"], r["cpu_s"], r["wall_s"]) for r in ev], 0.05)
    assert run["reached"] == (want is not None) and run["final_gain"] == ev[-1]["eval_gain"]
    md = (tmp_path / "g.md").read_text()
    assert "Target objective gain: 0.05 of J*'s gain" in md and "final J gain" in md and "with path KL" in md
    assert all(not math.isnan(r["eval_gain_marginal"]) for r in ev)
    assert G.main(["--reanalyze", str(out), "--target-gain", "0.05", "--gain-kl", "marginal", "--out",
                   str(tmp_path / "gm")]) == 0
    assert "samples' marginal KL (--target-gain, --gain-kl marginal)" in (tmp_path / "gm.md").read_text()
    runm = R.summarize(rows, 0.05, "grpo", key="eval_gain_marginal")[0]
    assert runm["final_gain"] == ev[-1]["eval_gain_marginal"]
    with pytest.raises(SystemExit):       # digits has no k-NN marginal KL
        G.main(["--task", "digits-flow", "--presets", "grpo", "--epochs", "1", "--target-gain", "0.5",
                "--gain-kl", "marginal", "--out", str(tmp_path / "d")])
    old = tmp_path / "old"
    cols = [c for c in R.EPOCH_FIELDS if c not in ("eval_objective", "eval_gain", "eval_gain_marginal")]
    R.write_csv(tmp_path / "old.csv", [{c: r[c] for c in cols} for r in rows], cols)
    (tmp_path / "old.json").write_text((tmp_path / "g.json").read_text())
    capsys.readouterr()
    assert G.main(["--reanalyze", str(old), "--target-gain", "0.5", "--out", str(tmp_path / "re")]) == 2
    assert "recorded no objective gain" in capsys.readouterr().err


def test_target_gain_on_digits_uses_the_monte_carlo_optimum(tmp_path):
    """digits has no closed-form J*: --target-gain estimates it once from reference samples
    (rsm_fast/optimum.py), every evaluation row's gain is (J - J_ref) / (J* - J_ref) with that
    estimate, the table states it, and --eval-every-nfe evaluates on one cost cadence (with
    --eval-every 0: no evaluation by epoch count)."""
    from rsm_fast.optimum import SoftOptimum

    out = tmp_path / "dg"
    rc = G.main(["--task", "digits-ddim", "--presets", "tempflow-grpo,rsm-soft-zo,rsm-soft-zo[task.num_steps=4]",
                 "--seeds", "0",
                 "--eval-samples", "8", "--budget-nfe", "1500", "--eval-every", "0", "--eval-every-nfe", "500",
                 "--optimum-samples", "24", "--set", "task.reward=digit_logprob:3", "--set", "task.condition=none",
                 "--set", "task.num_steps=3", "--set", "train.batch_size=4", "--set", "method.group_size=2",
                 "--target-gain", "0.01", "--out", str(out)])
    assert rc == 0
    meta = json.loads((tmp_path / "dg.json").read_text())
    assert set(meta["optimum"]) == {"tempflow-grpo", "rsm-soft-zo", "rsm-soft-zo[task.num_steps=4]"}
    assert meta["optimum"]["tempflow-grpo"] == meta["optimum"]["rsm-soft-zo"]    # one sampler: one estimate
    own = meta["optimum"]["rsm-soft-zo[task.num_steps=4]"]                      # its own sampler: its own
    assert own["num_steps"] == 4 and own["objective"] != meta["optimum"]["rsm-soft-zo"]["objective"]
    rows = R.read_epochs(tmp_path / "dg.csv")
    for p in meta["optimum"]:
        opt = SoftOptimum(**{k: v for k, v in meta["optimum"][p].items() if k not in ("seconds", "num_steps")})
        assert opt.samples == 24 and opt.objective > opt.reference and opt.alpha == 1.0
        ev = [r for r in rows if r["preset"] == p and not math.isnan(r["eval_reward"])]
        assert all(r["eval_gain"] == pytest.approx(opt.gain(r["eval_reward"], r["eval_kl"]), rel=1e-9, abs=1e-12)
                   for r in ev)
        assert all(r["eval_objective"] == pytest.approx(r["eval_reward"] - r["eval_kl"]) for r in ev)
        nfe = [r["nfe"] for r in ev]
        # before training, then after the epoch crossing each 500 NFE, and the last epoch
        want = [0] + [min(r["nfe"] for r in rows if r["preset"] == p and r["nfe"] >= k)
                      for k in range(500, max(nfe) + 1, 500)]
        assert sorted(set(want + [max(nfe)])) == sorted(set(nfe))
    md = (tmp_path / "dg.md").read_text()
    assert "J* = " in md and "24 reference samples" in md and "KL at target" in md
    assert "for tempflow-grpo, rsm-soft-zo (3 sampling steps)" in md and "(4 sampling steps)" in md
    assert "after the epoch crossing each 500 training NFE, and at the end" in md and "epoch(s)" not in md
    for run in R.summarize(rows, 0.01, "tempflow-grpo", key="eval_gain"):
        if run["reached"]:
            assert run["kl_at_target"] is not None and run["kl_at_target"] >= 0
