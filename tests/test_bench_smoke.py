"""The fused-loss benchmark code still runs: one tiny shape, one repeat, no timing assertions.

Checks the table's columns and that the fused and eager losses (and gradients) it timed agree. The
fused ops run on the plain-torch ``decomposed`` backend here, so the test needs no C++ build and
stays fast; the backends themselves are tested in test_ops_*.py.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name: str):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def rlb():
    return _load("run_loss_bench")


@pytest.mark.parametrize("op", ["zo", "score", "nft", "awm"])
def test_measure_tiny_case(rlb, op, monkeypatch):
    monkeypatch.setenv("RSM_FAST_OPS_BACKEND", "decomposed")
    LC, cpu = rlb.LC, torch.device("cpu")
    case = LC.Case(op, 3, (2, 4, 4), "fp32")
    rows = rlb.measure([case], cpu, impls=("fused", "eager"), repeats=1, warmup=0, flush=False, copy_gbps=10.0)

    assert [r["pass"] for r in rows] == list(LC.PASSES)
    for r in rows:
        for impl in ("fused", "eager"):
            assert r[f"us_{impl}"] > 0 and r[f"kernels_{impl}"] > 0, r
            assert f"error_{impl}" not in r, r
        assert r["us_compiled"] is None and r["peak_mib_fused"] is None  # not asked for / CPU
        assert r["bytes"] == LC.min_bytes(case, r["pass"]) > 0
        assert r["err_loss"] < 1e-5 and r["err_grad"] < 1e-5, r   # fused == eager (fp32)

    lines = rlb.table(rows).splitlines()
    assert lines[0] == "| " + " | ".join(rlb.COLUMNS) + " |"
    assert len(lines) == 2 + len(rows)
    assert all(line.count("|") == len(rlb.COLUMNS) + 1 for line in lines)

    env = dict(rlb.environment(cpu), backend="decomposed")
    meta = dict(grid="custom", repeats=1, warmup=0, flush=False, check=False, compile=False, copy_gbps=10.0)
    heads = rlb.headline(rows, env)
    assert any("not measured" in h for h in heads)
    md = rlb.markdown(env, meta, rows, {"status": "not measured (needs a GPU and diffusers)"}, heads)
    assert "## Headline" in md and "| op | rows |" in md and "not measured (needs a GPU and diffusers)" in md


def test_grids(rlb):
    LC = rlb.LC
    assert LC.OPS == ("zo", "score", "nft", "awm")
    assert len(LC.grid("full", torch.device("cpu"))) == 4 * 4 * 3 * 3
    quick = LC.grid("quick", torch.device("cpu"))
    assert {(c.op, c.rows, c.latent, c.dtype) for c in quick} >= {("zo", 12, (16, 64, 64), "fp32"),
                                                                 ("zo", 12, (16, 64, 64), "bf16")}
    assert LC.min_bytes(LC.Case("zo", 12, (16, 64, 64), "bf16"), "fwd+bwd") == 9 * 12 * 16 * 64 * 64 * 2
    assert LC.min_bytes(LC.Case("awm", 12, (16, 64, 64), "bf16"), "fwd+bwd") == 11 * 12 * 16 * 64 * 64 * 2
