"""The rollout benchmark code still runs: one tiny config, one repeat, no timing assertions.

Checks the table columns, that the engine and the diffusers-style loop return final samples of the
same shape, and that on the same noise (the engine's counter-based noise fed to the loop) the
loop reproduces the engine's samples: flow SDE in fp32; DDIM in fp64 (in fp32 the two differ by
~1e-2 after 50 steps: rounding amplified by 1/sqrt(alpha_bar) at the noisiest steps)."""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def rrb():
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("_bench_run_rollout_bench", BENCH / "run_rollout_bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_measure_tiny_config(rrb):
    cpu = torch.device("cpu")
    model, latent, cond_dim, _ = rrb.build_model("tiny", cpu, torch.float32)
    cases = [("flow10", "sde", 2, None), ("ddim50", "sde", 2, 4.5), ("flow10", "branch", 1, 4.5)]
    rows = rrb.measure(model, latent, cond_dim, cpu, torch.float32, cases, repeats=1, warmup=0, peak_tflops=0.1,
                       flops_row=rrb.flops_per_row(model, latent, cond_dim, cpu, torch.float32), check_noise=True)
    assert len(rows) == 3
    for r in rows:
        assert r["error_graphed"].startswith("n/a") and "ms_graphed" not in r
        assert r["shape_eager"] == r["shape_loop"]
        assert all(math.isfinite(r[k]) and r[k] > 0 for k in ("ms_nfe_eager", "ms_nfe_loop", "x_eager", "mfu_eager"))
    assert rows[0]["shape_eager"] == [2, *latent] and rows[0]["nfe"] == 20
    assert rows[2]["shape_eager"][0] == 30                      # branch k=[6,6,8,10,0..] on one trunk
    assert rows[0]["max_abs_diff"] < 1e-5, rows[0]               # flow, fp32: same noise -> same samples
    md = rrb.table(rows)
    head = md.splitlines()[0]
    assert all(c in head for c in rrb.COLUMNS)
    assert len(md.splitlines()) == 2 + len(rows)


def test_ddim_loop_matches_engine_in_fp64(rrb):
    cpu = torch.device("cpu")
    model, latent, cond_dim, _ = rrb.build_model("tiny", cpu, torch.float64)
    (r,) = rrb.measure(model, latent, cond_dim, cpu, torch.float64, [("ddim50", "sde", 2, 4.5)], impls=("eager", "loop"),
                       repeats=1, warmup=0, check_noise=True)
    assert r["max_abs_diff"] < 1e-5, r
