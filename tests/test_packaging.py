"""The checkout's top-level ``kernels/`` folder must not shadow PyPI's ``kernels`` package (the
Hugging Face kernel hub that transformers installs and diffusers imports) when a command runs from
the repository root, where ``python -m ...`` puts the root first on sys.path."""
from __future__ import annotations

import importlib.metadata as md
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_top_level_kernels_gives_way_to_the_installed_package():
    try:
        md.distribution("kernels")
    except md.PackageNotFoundError:
        pytest.skip("PyPI's kernels package is not installed: nothing to shadow")
    out = _run("import kernels; print(kernels.__file__)")
    assert out.returncode == 0, out.stderr
    assert not Path(out.stdout.strip()).resolve().is_relative_to(ROOT / "kernels")


def test_rsm_fast_kernels_and_diffusers_import_from_the_repo_root():
    pytest.importorskip("diffusers")
    out = _run("import sys; sys.path.insert(0, ''); import rsm_fast.kernels._launch as k; "
               "from diffusers import UNet2DModel; print(k.__file__)")
    assert out.returncode == 0, out.stderr.splitlines()[-1:]
    assert Path(out.stdout.strip()).resolve() == (ROOT / "kernels" / "_launch.py").resolve()
