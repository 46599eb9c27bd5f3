"""The GPU validation command (rsm_fast/gpucheck.py, issue 21 item 11): its CPU dry run passes, and
the CUDA-only commands it would run name flags their scripts accept."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rsm_fast import gpucheck as G

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpucheck")
    env = dict(os.environ, TRITON_CACHE_DIR=str(out / "triton-cache"))
    # no wall-clock limit a loaded machine could trip; 30 min only stops a hang
    r = subprocess.run([sys.executable, "-m", "rsm_fast.gpucheck", "--dry-run", "--out", str(out / "check")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    return r, out / "check"


def test_dry_run_passes_every_stage_and_writes_its_summary(dry_run):
    r, out = dry_run
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["ok"] and s["dry_run"] and s["device"] == "cpu (dry run)"
    status = {st["name"]: st["status"] for st in s["stages"]}
    assert list(status) == list(G.STAGES)
    assert status.pop("host") == "skip"                   # needs CUDA
    assert set(status.values()) == {"pass"}, status
    by = {st["name"]: st for st in s["stages"]}
    assert by["pytest-gpu"]["detail"]["collected"] >= 30   # the GPU tests are there to run
    assert len(G.gpu_test_files()) >= 5
    assert by["launch"]["detail"]["ok"] is True
    assert by["install"]["detail"]["rsm_fast.kernels"] == "importable"
    for stage in ("loss", "rollout", "fused"):            # the benchmarks' JSON, moved into the summary
        assert by[stage]["detail"]["tables"], stage
    rows = next(iter(by["fused"]["detail"]["tables"].values()))["rows"]
    assert [r["fused_epoch"] for r in rows] == [False, True]
    assert rows[1]["nfe_by_kind"]["train"] == 0 < rows[0]["nfe_by_kind"]["train"]   # the fused epoch's point
    assert rows[1]["rollout_graphs_mb"] > 0 == rows[0]["rollout_graphs_mb"]
    md = (out / "summary.md").read_text()
    assert "CPU dry run" in md and "| train | pass |" in md
    # what a device call brings back: at most 8 files, none deeper than the folder
    files = sorted(p.name for p in out.rglob("*") if p.is_file())
    assert len(files) <= 8 and all(p.parent == out for p in out.rglob("*") if p.is_file()), files
    assert not [f for f in files if f.endswith(".json") and f != "summary.json"], files
    assert "=====" in (out / "logs.txt").read_text()


def _flags(argv: list[str]) -> list[str]:
    return [a for a in argv if a.startswith("--")]


def test_cuda_commands_use_flags_their_scripts_accept(tmp_path):
    """The CUDA commands never run on CPU; each flag must appear in its script's --help."""
    cmds = G.commands(tmp_path, True, tmp_path)
    assert sum(limit for _, limit in cmds.values()) <= 600, "the CUDA stages' limits must fit one 10-minute call"
    assert "gpu" in cmds["pytest-gpu"][0] and "--collect-only" not in cmds["pytest-gpu"][0]
    helps = {}
    for name, (argv, _) in cmds.items():      # the scripts' --help, started together
        if name == "pytest-gpu":
            continue
        target = argv[1:3] if argv[1] == "-m" else argv[1:2]
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} if name == "launch" else None
        helps[name] = (argv, target, subprocess.Popen([sys.executable, *target, "--help"], cwd=ROOT, env=env, text=True,
                                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    for name, (argv, target, proc) in helps.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, (name, err[-2000:])
        for f in _flags(argv):
            assert f in out, f"{name}: {f} not accepted by {target}"


def test_budget_spent_skips_the_remaining_stages(tmp_path):
    with open(tmp_path / "log", "w") as log:
        st = G.run_stage("launch", ([sys.executable, "-c", "pass"], 60), log, left=1.0)
    assert st.status == "skip" and "budget" in st.note


def test_stage_failure_is_reported_with_its_last_line(tmp_path):
    with open(tmp_path / "log", "w") as log:
        st = G.run_stage("train", ([sys.executable, "-c", "import sys; print('boom: bad'); sys.exit(3)"], 60), log,
                         left=100.0)
    assert st.status == "fail" and st.detail["rc"] == 3 and st.note == "boom: bad"


def test_pytest_counts_are_parsed():
    d = G.parse("pytest-gpu", "....\n37 passed, 2 skipped, 1 failed, 5059 deselected in 12.0s\n")
    assert d == {"passed": 37, "skipped": 2, "failed": 1, "deselected": 5059}
    assert G.parse("pytest-gpu", "37/5096 tests collected (5059 deselected) in 14s")["collected"] == 37


def test_unknown_stage_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        G.main(["--stages", "install,warp"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--stages: unknown stage 'warp'" in err


def test_pinned_triton_reads_torchs_requirement(monkeypatch):
    from importlib import metadata

    monkeypatch.setattr(metadata, "requires", lambda name: ["filelock", 'triton==3.7.1; platform_system == "Linux"'])
    assert G.pinned_triton() == "3.7.1"
    monkeypatch.setattr(metadata, "requires", lambda name: ["filelock"])
    assert G.pinned_triton() is None
