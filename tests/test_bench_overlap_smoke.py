"""The reward/rollout overlap benchmark still runs end to end (reward server in a child process,
HTTP reward, digits trainer with waves 1 and 2) and writes its table; no timing assertions beyond
the wave with overlap having waited no longer for rewards than the one without."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
ROOT = Path(__file__).resolve().parents[1]


def test_overlap_bench_tiny(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "run_overlap_bench.py"), "--epochs", "2", "--waves", "1", "2",
                        "--steps", "3", "--batch", "8", "--group", "2", "--per-image-ms", "30", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    (md,) = tmp_path.glob("overlap_cpu_*.md")
    (js,) = tmp_path.glob("overlap_cpu_*.json")
    res = json.loads(js.read_text())["results"]
    assert [r["waves"] for r in res] == [1, 2] and "| waves | epoch wall s |" in md.read_text()
    # 8 images x 30 ms = 0.24 s of server time: without overlap the trainer waits for all of it,
    # with two waves at most for the second half
    assert res[0]["reward_s"] > 0.2 and res[1]["reward_s"] < res[0]["reward_s"]
