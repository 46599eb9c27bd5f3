"""Interleaved A/B timing (bench/ab_timing.py, bench/ab_stats.py): the round order, the interval
arithmetic, the contention flags and the stop rule on injected measurements (no clock is
asserted), one tiny end-to-end run on the 2-D task with its CPU-seconds-to-target table, and the
refusal of a fallback backend."""
from __future__ import annotations

import csv
import json
import math
import random
import statistics
from types import SimpleNamespace

import pytest

from bench import ab_stats as S
from bench import ab_timing as A
from bench import gpu_hours_report as R


def _opts(**kw):
    o = dict(tol=0.03, probe_tol=0.15, max_wall_cpu=1.10, min_rounds=8, max_rounds=60, max_seconds=0.0)
    return SimpleNamespace(**{**o, **kw})


class FakeBench:
    """Scripted measurements: preset i's CPU seconds per epoch in round r = cost[i] x noise(i, r);
    probes (wall, cpu) from ``probe`` (a function of the probe's index)."""

    def __init__(self, cost, noise=lambda i, r: 1.0, probe=lambda k: (0.03, 0.03), wall_factor=lambda r: 1.0, n=2):
        self.cost, self.noise, self.probe_of, self.wall_factor, self.n = cost, noise, probe, wall_factor, n
        self.calls, self.probes = [], 0

    def slot(self, i):
        r = len(self.calls) // self.n
        self.calls.append(i)
        cpu = self.cost[i] * self.noise(i, r)
        return {"epochs": 1, "cpu_s": cpu, "wall_s": cpu * self.wall_factor(r), "nfe": 1000 * (i + 1)}

    def probe(self):
        self.probes += 1
        return self.probe_of(self.probes - 1)


def _run(fake, labels=("A", "B"), **kw):
    return A.run_rounds(list(labels), labels[0], fake.slot, fake.probe, _opts(**kw), log=lambda *a, **k: None)


def test_round_order_alternates_abba_and_balances_positions():
    assert [S.round_order(r, 2) for r in range(4)] == [[0, 1], [1, 0], [0, 1], [1, 0]]      # slots ABBA ABBA
    fake = FakeBench([1.0, 1.2], noise=lambda i, r: 1.0 + 0.1 * (r % 3) * i)     # never tight at 1e-9
    assert _run(fake, min_rounds=2, max_rounds=4, tol=1e-9)["stop"] == "max-rounds"
    assert "".join("AB"[i] for i in fake.calls) == "ABBAABBA"
    for n in (3, 4, 5):                 # each pair of rounds is a forward and a reversed order
        for k in range(n):
            a, b = S.round_order(2 * k, n), S.round_order(2 * k + 1, n)
            assert sorted(a) == list(range(n)) and b == a[::-1]
            pos = [a.index(i) + b.index(i) for i in range(n)]
            assert len(set(pos)) == 1                                  # same mean position for every preset
        assert len({S.round_order(2 * k, n)[0] for k in range(n)}) == n   # every preset gets to go first


def test_t_interval_on_log_ratios_by_hand():
    ratios = [1.10, 1.20, 1.00, 1.15]
    logs = [math.log(x) for x in ratios]
    m = sum(logs) / 4
    sd = math.sqrt(sum((x - m) ** 2 for x in logs) / 3)
    hw = 3.1824 * sd / 2                                               # t_{0.975, 3} x sd / sqrt(4)
    iv = S.log_interval(ratios)
    assert iv["n"] == 4 and iv["ratio"] == pytest.approx(math.exp(m)) and iv["sd_log"] == pytest.approx(sd)
    assert (iv["lo"], iv["hi"]) == (pytest.approx(math.exp(m - hw)), pytest.approx(math.exp(m + hw)))
    assert iv["hw_ratio"] == pytest.approx(math.exp(hw) - 1)
    assert S.log_interval([1.3, 1.3, 1.3])["hw_ratio"] == 0 and S.log_interval([1.3])["hw_ratio"] == math.inf
    assert S.t975(1) == 12.7062 and S.t975(30) == 2.0423
    for df, exact in ((31, 2.039513), (40, 2.021075), (60, 2.000298), (120, 1.979930), (10 ** 6, 1.959966)):
        assert abs(S.t975(df) - exact) < 1e-4, df


def test_contended_rounds_are_flagged_bracketed_and_excluded():
    # probe 3 (after round 2, before round 3) is 40 % slow: rounds 2 and 3 are contended; B's cost
    # doubles exactly there, so the ratio of the clean rounds is B's true 1.2
    fake = FakeBench([1.0, 1.2], noise=lambda i, r: 2.0 if (i == 1 and r in (2, 3)) else 1.0,
                     probe=lambda k: (0.042, 0.042) if k == 3 else (0.030, 0.030))
    res = _run(fake, min_rounds=4, max_rounds=10)
    assert res["stop"] == "tight" and len(res["flags"]) == 6          # 4 clean rounds needed: 0, 1, 4, 5
    assert [bool(f) for f in res["flags"]] == [False, False, True, True, False, False]
    assert "after: probe slow (1.40x median)" in res["flags"][2] and "before: probe slow" in res["flags"][3]
    b = res["summary"]["B"]
    assert b["rounds_clean"] == 4 and b["ratio_cpu"]["ratio"] == pytest.approx(1.2) and b["ratio_cpu"]["hw_ratio"] == 0
    assert b["ratio_cpu_per_nfe"]["ratio"] == pytest.approx(0.6)      # 1.2 x the CPU for 2 x the NFE
    # a probe that waited for a core, or a round whose epochs did, flags too
    pf = S.probe_flags([(0.03, 0.03), (0.045, 0.03), (0.03, 0.03)], 0.15, 1.10)
    assert pf[0] == "" and "probe waited (wall/CPU 1.50)" in pf[1]
    rf = S.round_flags([(0.03, 0.03)] * 3, [(1.0, 1.0), (1.3, 1.0)], 0.15, 1.10)
    assert rf == ["", "epochs waited (wall/CPU 1.30)"]


def test_stop_rule_stops_at_min_rounds_when_tight_and_flags_at_max_rounds():
    wobble = lambda i, r: 1.0 + 0.004 * (-1) ** (r + i)                          # noqa: E731  +-0.4 %
    res = _run(FakeBench([1.0, 1.2], noise=wobble), min_rounds=8)
    assert res["stop"] == "tight" and len(res["flags"]) == 8                  # tight at once: min_rounds binds
    assert res["summary"]["B"]["ratio_cpu"]["hw_ratio"] < 0.03
    # +-20 % noise never gets within 3 %: stops at --max-rounds and the row says so
    loud = lambda i, r: 1.0 + 0.2 * (-1) ** (r // 2 + i)                         # noqa: E731
    res = _run(FakeBench([1.0, 1.2], noise=loud), min_rounds=4, max_rounds=12)
    s = res["summary"]["B"]
    assert res["stop"] == "max-rounds" and len(res["flags"]) == 12 and s["ratio_cpu"]["hw_ratio"] > 0.03
    assert any(f.startswith("interval not tight") for f in S.row_flags(s, False, 0.03, 4))
    # in between: it stops at the first round where the interval is tight, not before
    rng = random.Random(3)
    draws = [1.0 + rng.gauss(0, 0.05) for _ in range(400)]
    res = _run(FakeBench([1.0, 1.2, 0.9], noise=lambda i, r: draws[3 * r + i], n=3), labels=("A", "B", "C"),
               min_rounds=4, max_rounds=60)
    n = len(res["flags"])
    assert res["stop"] == "tight" and 4 < n < 60

    def widest(k):
        sm = S.summarize([s for s in res["slots"] if s["round"] < k], [""] * k, ["A", "B", "C"], "A")
        return max(sm[p]["ratio_cpu"]["hw_ratio"] for p in "BC")
    assert widest(n) < 0.03 <= widest(n - 1)
    # a wall-clock cap, from an injected clock
    ticks = iter(range(1000))
    res = A.run_rounds(["A", "B"], "A", FakeBench([1.0, 1.2], noise=loud).slot, lambda: (0.03, 0.03),
                       _opts(min_rounds=4, max_seconds=5), now=lambda: float(next(ticks)), log=lambda *a, **k: None)
    assert res["stop"] == "max-seconds" and len(res["flags"]) == 5


def test_to_target_product_and_propagated_interval():
    ep = {"median": 1.5, "min": 1.2, "max": 2.0}
    iv = {"ratio": 1.25, "lo": 1.2, "hi": 1.3}
    t = S.to_target(ep, iv)
    assert t["speedup"] == pytest.approx(1.2) and t["lo"] == pytest.approx(1.5 / 1.3) and t["hi"] == pytest.approx(1.25)
    assert (t["seed_lo"], t["seed_hi"]) == (pytest.approx(0.96), pytest.approx(1.6))
    assert S.to_target(ep, None)["speedup"] == 1.0


def _gh_curve(preset, seed, rewards, cpu=0.05):
    nan = math.nan
    return [{"preset": preset, "seed": seed, "epoch": e, "nfe": 100 * e, "nfe_rollout": 100 * e, "nfe_reference": 0,
             "nfe_train": 0, "wall_s": cpu * e, "cpu_s": cpu * e, "train_reward": nan, "train_kl": nan, "eval_reward": r,
             "eval_kl": 0.1, "eval_s": 0.0, "eval_nfe": 0, "rollout_s": 0.0, "reward_s": 0.0, "train_s": 0.0,
             "alloc_s": 0.0, "eval_objective": nan, "eval_gain": nan, "eval_gain_marginal": nan, "ops_backend": "cpp"}
            for e, r in enumerate(rewards)]


def test_tiny_run_on_toy2d_writes_the_tables_and_cpu_to_target(tmp_path):
    out = tmp_path / "ab"
    rc = A.main(["--task", "toy2d", "--presets", "rsm-soft-zo,diffusion-nft", "--baseline", "rsm-soft-zo",
                 "--set", "train.batch_size=16", "--set", "policy.hidden=16", "--warmup", "1", "--min-rounds", "2",
                 "--max-rounds", "3", "--probe-ms", "5", "--out", str(out),
                 "--probe-tol", "1e9", "--max-wall-cpu", "1e9"])   # no round contended: the machine may be busy
    assert rc == 0
    rows = list(csv.DictReader(open(f"{out}.csv")))
    assert tuple(rows[0]) == A.SLOT_FIELDS and len(rows) == 6
    assert [r["preset"] for r in rows] == ["rsm-soft-zo", "diffusion-nft", "diffusion-nft", "rsm-soft-zo",
                                           "rsm-soft-zo", "diffusion-nft"]
    assert all(r["ops_backend"] == "cpp" and int(r["nfe"]) > 0 and float(r["cpu_s"]) > 0 for r in rows)
    assert [int(r["epoch_start"]) for r in rows if r["preset"] == "diffusion-nft"] == [1, 2, 3]   # after 1 warm-up
    assert all(int(r["nfe"]) == int(r["nfe_rollout"]) + int(r["nfe_reference"]) + int(r["nfe_train"]) for r in rows)
    meta = json.loads((tmp_path / "ab.json").read_text())
    assert meta["result"]["stop"] in ("tight", "max-rounds") and len(meta["result"]["probes"]) == 4
    assert meta["ops_backend"] == {"rsm-soft-zo": "cpp", "diffusion-nft": "cpp"}
    md = (tmp_path / "ab.md").read_text()
    for s in ("| preset | clean rounds | CPU ms/epoch | CPU/epoch vs baseline [95 % CI] | NFE/epoch | CPU ms per 1k NFE",
              "| diffusion-nft | ", "1× (baseline)", "torch ", "rsm-soft-zo: `cpp`", "Load average (1/5/15 min) before / after",
              "Command: `python bench/ab_timing.py --task toy2d", "t-interval on the log ratios", "online allocator"):
        assert s in md, s
    # epochs to target from a (synthetic) gpu_hours run x the timing just made
    gh = tmp_path / "gh"
    base_curves = {0: [3.0, 3.5, 4.0, 4.5], 1: [3.0, 3.4, 3.8, 4.2]}          # target 4: 2 and 2.5 epochs
    fast_curves = {0: [3.0, 4.0, 4.4, 4.6], 1: [3.0, 3.8, 4.2, 4.4]}          # 1 and 1.5 epochs
    ghrows = [r for s in (0, 1) for r in _gh_curve("rsm-soft-zo", s, base_curves[s]) + _gh_curve("diffusion-nft", s, fast_curves[s])]
    R.write_csv(tmp_path / "gh.csv", ghrows)          # the columns of a gpu_hours CSV this code reads
    (tmp_path / "gh.json").write_text(json.dumps({"command": "python bench/gpu_hours.py (synthetic)", "args": {
        "task": "toy2d", "baseline": "rsm-soft-zo", "target": 4.0, "target_frac": None, "target_gain": None, "set": []}}))
    rc = A.main(["--timing", str(out), "--from-gpu-hours", str(gh), "--out", str(out)])
    assert rc == 0
    tt = {r["preset"]: r for r in csv.DictReader(open(f"{out}_to_target.csv"))}
    b, f = tt["rsm-soft-zo"], tt["diffusion-nft"]
    summ = meta["result"]["summary"]
    assert float(b["epochs_to_target"]) == pytest.approx(2.25) and float(f["epochs_to_target"]) == pytest.approx(1.25)
    assert float(b["cpu_s_to_target"]) == pytest.approx(2.25 * summ["rsm-soft-zo"]["cpu_s_per_epoch"])
    ep = statistics.median([2 / 1, 2.5 / 1.5])                                   # paired by seed
    rho = summ["diffusion-nft"]["ratio_cpu"]
    assert float(f["epoch_speedup"]) == pytest.approx(ep) and float(f["cpu_speedup"]) == pytest.approx(ep / rho["ratio"])
    assert float(f["cpu_speedup_lo"]) == pytest.approx(ep / rho["hi"]) and float(b["cpu_speedup"]) == 1.0
    md = (tmp_path / "ab_to_target.md").read_text()
    assert "| diffusion-nft | 2/2 | 1.25 |" in md and "CPU speedup to target [95 % CI]" in md


def test_a_fallback_backend_refuses_and_bad_arguments_are_one_line(tmp_path, monkeypatch, capsys):
    from rsm_fast.ops import backends

    monkeypatch.delenv("RSM_FAST_OPS_BACKEND", raising=False)
    monkeypatch.setattr(backends, "for_device", lambda device: backends._DECOMPOSED)
    args = ["--presets", "grpo,awm", "--set", "train.batch_size=8", "--set", "method.group_size=4", "--max-rounds", "2",
            "--min-rounds", "2", "--warmup", "0"]
    rc = A.main(args + ["--out", str(tmp_path / "fb")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "fell back to 'decomposed' instead of 'cpp'" in err and "\n" not in err
    assert not list(tmp_path.glob("fb*"))
    for extra, word in ((["--presets", "grpo,nope"], "nope"), (["--presets", "grpo,awm", "--set", "train.nope=1"], "train.nope")):
        rc = A.main(extra + ["--out", str(tmp_path / "x")])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and err.startswith("error:") and "\n" not in err and word in err
    for bad, word in ((["--presets", "grpo"], "at least two"), (["--presets", "grpo,awm", "--baseline", "ddpo"], "--baseline"),
                      (["--presets", "grpo,awm", "--min-rounds", "9", "--max-rounds", "3"], "--min-rounds"),
                      (["--timing", "x"], "--from-gpu-hours")):
        with pytest.raises(SystemExit):
            A.main(bad + ["--out", str(tmp_path / "x")])
        assert word in capsys.readouterr().err
    assert not list(tmp_path.glob("x*"))
