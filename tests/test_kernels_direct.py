"""Direct Triton launches (kernels/_direct.py, issue 21 item 6), checked without a GPU.

The launch path exists only outside Triton's interpreter, so the checks run in a subprocess
(``bench/bench_triton_launch.py --check``) with ``TRITON_INTERPRET`` unset and Triton's driver
replaced by a recording one (kernels/_nodriver.py): real sm_90 compiles, launches recorded."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("direct")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp / "triton-cache")      # this test's own compiles, no shared cache
    out = tmp / "checks.json"
    # no wall-clock limit a loaded machine could trip; 30 min only stops a hang
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_triton_launch.py"), "--check", "--json", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    if not out.exists():
        pytest.fail(f"the launch checks did not run (rc {r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    res = json.loads(out.read_text())
    res["rc"] = r.returncode
    return res


@pytest.mark.parametrize("case", ["zo", "score", "nft", "awm", "step", "noise"])
def test_direct_launch_passes_what_triton_passes(checks, case):
    """Triton's own launch and the direct one record the same launcher call: grid, stream,
    function, packed metadata, every argument (constexprs included) in order; no metadata/hooks."""
    c = checks["launches"][case]
    assert c["ok"], c["why"]
    assert c["launches"] == {"zo": 3, "score": 3, "nft": 3, "awm": 3, "step": 2, "noise": 1}[case]


@pytest.mark.parametrize("kernel", ["_zo_partials", "_noise_kernel"])
def test_direct_key_is_at_least_as_fine_as_tritons(checks, kernel):
    """Random arguments that share a direct-launch key share Triton's cache key (same compiled
    kernel), many draws do share one, and a key without the alignment bit is caught."""
    c = checks["keys"][kernel]
    assert c["ok"] and c["coarse_key_caught"], c
    assert c["shared"] > 50 and c["triton_keys"] > 20, c


def test_a_launch_hook_sends_launches_through_triton(checks):
    c = checks["hook"]
    assert c["ok"] and c["with_metadata"] == c["launches"] == 3, c
    assert checks["rc"] == 0


def test_interpreter_keeps_the_jitted_kernel():
    """Under TRITON_INTERPRET=1 (the suite's setting) ``direct`` returns the kernel itself."""
    from rsm_fast.kernels import _direct, _launch as L, zo_loss

    assert L.INTERPRET
    assert not isinstance(zo_loss._zo_partials, _direct.DirectKernel)
    assert _direct.direct(zo_loss._zo_partials) is zo_loss._zo_partials
