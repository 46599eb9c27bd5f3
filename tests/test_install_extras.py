"""The install metadata (issue 21, item 1): a GPU install must resolve beside a CUDA torch wheel,
which pins its own triton, while the CPU quick start keeps Triton's interpreter for the tests."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

packaging = pytest.importorskip("packaging.requirements")
from packaging.requirements import Requirement  # noqa: E402
from packaging.version import Version  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
EXTRAS = PROJECT["optional-dependencies"]

# triton versions the interpreter suites (test_kernels_triton*, test_noise, test_kernel_row_checks)
# were run on, and the one torch 2.13.0's CUDA wheel pins (issue 21's review)
TESTED_TRITON = ("3.6.0", "3.7.1")
CUDA_TORCH_TRITON = {"2.13.0": "3.7.1"}


def _reqs(extra: str) -> dict[str, Requirement]:
    out = {}
    for line in EXTRAS[extra]:
        if line.startswith("rsm_fast["):
            continue
        r = Requirement(line)
        out[r.name.lower()] = r
    return out


def test_dev_triton_admits_the_cuda_wheels_pin_and_the_tested_interpreters():
    spec = _reqs("dev")["triton"].specifier
    assert not any(s.operator == "==" for s in spec), "an exact pin cannot resolve beside a CUDA torch"
    for v in TESTED_TRITON + tuple(CUDA_TORCH_TRITON.values()):
        assert Version(v) in spec, v
    assert Version("3.9.0") not in spec          # untested majors stay out


def test_core_torch_range_and_numpy_cap_for_the_interpreter():
    core = {Requirement(x).name.lower(): Requirement(x) for x in PROJECT["dependencies"]}
    assert Version("2.13.0") in core["torch"].specifier and Version("2.14.0") not in core["torch"].specifier
    assert Version("2.4.0") not in core["numpy"].specifier      # Triton's interpreter needs numpy<2.4


def test_gpu_extra_carries_the_gpu_only_packages_the_code_imports():
    gpu = _reqs("gpu")
    assert {"nvtx", "bitsandbytes"} <= set(gpu)
    assert "torch" not in gpu and "triton" not in gpu         # the CUDA torch wheel decides those
    src = "\n".join(p.read_text() for p in (ROOT / "rsm_fast").rglob("*.py"))
    for mod, pkg in (("nvtx", "nvtx"), ("bitsandbytes", "bitsandbytes")):
        assert re.search(rf"(import {mod}\b|find_spec\(\"{mod}\"\))", src), mod
        assert pkg in gpu


def test_installed_triton_is_in_range_when_present():
    try:
        import importlib.metadata as md
        have = md.version("triton")
    except Exception:  # noqa: BLE001 - not installed: nothing to check
        pytest.skip("triton is not installed")
    assert Version(have) in _reqs("dev")["triton"].specifier, have


def test_readme_documents_the_gpu_install():
    text = (ROOT / "README.md").read_text()
    section = text.split("### On a GPU machine", 1)[1].split("\n### ", 1)[0]
    assert 'pip install -e ".[models,gpu]"' in section
    assert "580" in section and "triton" in section.lower()
    # the CPU quick start stays the one the CI runs
    assert 'python -m pip install "torch==2.13.0" -e ".[dev]" && python -m rsm_fast.train' in text
