"""The project's GPU validation, one command (issue 21 item 11): what a session lent a GPU runs first.

    python -m rsm_fast.gpucheck [--out DIR] [--stages a,b,...] [--dry-run]

Stages, each a subprocess with its own time limit (the sum stays under ten minutes on one H100),
its output kept in ``DIR/logs.txt`` and its verdict in ``DIR/summary.{json,md}`` (with the JSON the benchmarks write):

1. ``install``: Python, torch (+ its CUDA), the Triton that torch's wheel pins against the one
   installed, numpy, the NVIDIA driver (a CUDA 13 build of torch needs >= 580), the GPU, the
   optional packages (diffusers, peft, transformers, nvtx, bitsandbytes, xformers, torch-tensorrt),
   and that ``rsm_fast.kernels`` imports (the project installed, ``pip install -e .``).
2. ``launch``: ``bench/bench_triton_launch.py --check``: direct launches pass what Triton passes.
3. ``pytest-gpu``: ``pytest -m gpu`` without the interpreter: the Triton kernels against their
   float64 references in fp32 / bf16 / fp16, the noise kernel, graphed vs eager rollout parity and
   padding, rewards on the device.
4. ``loss``: ``bench/run_loss_bench.py --grid quick``: fused vs eager vs torch.compile timings,
   errors, bandwidth.
5. ``host``: ``bench/bench_host_overhead.py --device cuda``: host / device / wall µs per fused
   forward + backward, eager and CUDA-graphed.
6. ``rollout``: ``bench/run_rollout_bench.py``: graphed vs eager vs a per-step loop on the tiny UNet.
7. ``train``: a short ``python -m rsm_fast.train`` on the tiny SD3 model (random weights).
8. ``fused``: ``bench/fused_epoch_check.py``: ``rsm-soft-fo`` with and without ``train.fused_epoch``
   on the tiny SD3 model: peak memory and time per epoch against the memory preflight's estimate.

``--dry-run`` (the default without CUDA; CI runs it): the same stages with CPU-sized arguments,
so every command, its parser and the summary are exercised: ``pytest-gpu`` collects the GPU tests
(in the files that hold them) instead of running them (they would all skip), ``host`` is skipped (its CPU table is
``bench/bench_host_overhead.py`` without ``--device``), the benchmarks run a tiny grid, and the
training run is one CPU epoch. Exit status 1 when a stage fails, 0 otherwise.

The summary names the device, the versions, the commit and the date. A GPU session copies
``DIR`` under ``bench/results/`` and commits it (never a number it did not measure).
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = ("diffusers", "peft", "transformers", "nvtx", "bitsandbytes", "xformers", "torch_tensorrt")
STAGES = ("install", "launch", "pytest-gpu", "loss", "host", "rollout", "train", "fused")   # in the order they run
MIN_DRIVER_CUDA13 = 580     # CUDA 13.0 release notes: minimum Linux driver 580 (issue 21, item 1)


@dataclass
class Stage:
    name: str
    status: str = "pending"          # pass | fail | skip
    seconds: float = 0.0
    command: str = ""
    detail: dict = field(default_factory=dict)
    note: str = ""


def _tail(text: str, n: int = 4000) -> str:
    return text if len(text) <= n else "...\n" + text[-n:]


def _version(mod: str) -> str | None:
    try:
        from importlib import metadata

        return metadata.version(mod.replace("_", "-"))
    except Exception:   # noqa: BLE001 -- not installed, or no metadata
        try:
            m = importlib.import_module(mod)
            return getattr(m, "__version__", "?")
        except Exception:   # noqa: BLE001
            return None


def pinned_triton() -> str | None:
    """The triton version torch's wheel requires (``triton==X``), None when it names none (CPU wheels)."""
    from importlib import metadata

    try:
        reqs = metadata.requires("torch") or []
    except metadata.PackageNotFoundError:
        return None
    for r in reqs:
        m = re.match(r"^\s*triton\s*==\s*([0-9][^;\s]*)", r)
        if m:
            return m.group(1)
    return None


def driver_version() -> str | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=60).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        return None
    return out[0].strip() if out else None


def install_check(cuda: bool) -> Stage:
    """Stage 1, in process (module docstring)."""
    import torch

    st = Stage("install", command="(in process)")
    d = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
         "triton": _version("triton"), "triton_pinned_by_torch": pinned_triton(), "numpy": _version("numpy"),
         "driver": driver_version(), "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        d.update(gpu=p.name, capability=f"{p.major}.{p.minor}", gpu_memory_gib=round(p.total_memory / 2**30, 1),
                 sms=p.multi_processor_count)
    d["optional"] = {m: _version(m) for m in OPTIONAL}
    problems = []
    try:
        importlib.import_module("rsm_fast.kernels")
        d["rsm_fast.kernels"] = "importable"
    except ImportError as e:
        problems.append(f"rsm_fast.kernels does not import ({e}): install the project (pip install -e .)")
    if d["triton_pinned_by_torch"] and d["triton"] and d["triton"] != d["triton_pinned_by_torch"]:
        problems.append(f"triton {d['triton']} is installed but torch {d['torch']} pins {d['triton_pinned_by_torch']}")
    if cuda:
        if not d["cuda_available"]:
            problems.append("torch sees no CUDA device")
        drv = d["driver"]
        if drv and (d["torch_cuda"] or "").startswith("13") and int(drv.split(".")[0]) < MIN_DRIVER_CUDA13:
            problems.append(f"driver {drv} is older than {MIN_DRIVER_CUDA13}, which CUDA 13 builds of torch need")
    st.detail = d
    st.status = "fail" if problems else "pass"
    st.note = "; ".join(problems)
    return st


def _py(*args: str) -> list[str]:
    return [sys.executable, *args]


def gpu_test_files() -> list[str]:
    """The test files that hold ``gpu``-marked tests (the dry run collects these, not the whole suite)."""
    return [str(f) for f in sorted((ROOT / "tests").glob("test_*.py")) if "mark.gpu" in f.read_text()]


def _sets(*kv: str) -> list[str]:
    return [x for pair in kv for x in ("--set", pair)]


def commands(out: Path, cuda: bool, scratch: Path) -> dict:
    """``{stage: (argv, time limit in s) or a skip reason}`` for the subprocess stages. The limits
    on CUDA add up to about nine minutes (each stage also stops at the run's ``--budget``)."""
    b = lambda name: str(ROOT / "bench" / name)  # noqa: E731
    run_dir = str(scratch / "train-run")       # outside DIR: a run folder holds many files
    if cuda:
        return {
            "launch": (_py(b("bench_triton_launch.py"), "--check"), 40),
            "pytest-gpu": (_py("-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", str(ROOT / "tests")), 180),
            "loss": (_py(b("run_loss_bench.py"), "--device", "cuda", "--rows", "12", "--latents", "16x64x64",
                         "--dtypes", "fp32,bf16", "--no-sd3", "--out", str(out)), 110),
            "host": (_py(b("bench_host_overhead.py"), "--device", "cuda", "--calls", "100", "--repeats", "5"), 60),
            "rollout": (_py(b("run_rollout_bench.py"), "--device", "cuda", "--model", "tiny", "--rows", "8,48",
                            "--samplers", "flow10", "--out", str(out)), 60),
            "train": (_py("-m", "rsm_fast.train", "--model", "sd3-tiny", "--preset", "tempflow-grpo", "--quiet",
                          "--out", run_dir, "--set", "train.device=cuda", "--set", "train.epochs=3"), 60),
            "fused": (_py(b("fused_epoch_check.py"), "--device", "cuda", "--epochs", "3", "--batch", "8", "--steps", "10",
                          "--out", str(out)), 60),
        }
    return {
        "launch": (_py(b("bench_triton_launch.py"), "--check"), 600),
        "pytest-gpu": (_py("-m", "pytest", "-q", "-m", "gpu", "--collect-only", "-p", "no:cacheprovider",
                           *gpu_test_files()), 600),
        "loss": (_py(b("run_loss_bench.py"), "--device", "cpu", "--ops", "zo,nft", "--rows", "4", "--latents", "4x8x8",
                     "--dtypes", "fp32", "--no-compile", "--no-sd3", "--repeats", "2", "--warmup", "1",
                     "--out", str(out)), 600),
        "host": "needs CUDA (bench/bench_host_overhead.py without --device is the CPU table)",
        "rollout": (_py(b("run_rollout_bench.py"), "--device", "cpu", "--rows", "2", "--samplers", "flow10",
                        "--impls", "eager,loop", "--repeats", "1", "--warmup", "0", "--out", str(out)), 600),
        "train": (_py("-m", "rsm_fast.train", "--model", "sd3-tiny", "--preset", "tempflow-grpo", "--quiet",
                      "--out", run_dir, "--set", "train.device=cpu", "--set", "train.epochs=1",
                      *_sets("task.num_steps=4", "train.batch_size=4", "method.group_size=4", "task.eval_samples=4")),
                  900),
        "fused": (_py(b("fused_epoch_check.py"), "--device", "cpu", "--epochs", "1", "--batch", "2", "--steps", "3",
                      "--out", str(out)), 900),
    }


def parse(name: str, text: str) -> dict:
    """The numbers a stage's output carries (pytest's counts, the training run's last line)."""
    d: dict = {}
    if name == "pytest-gpu":
        for n, what in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)", text):
            d[what] = int(n)
        m = re.search(r"(\d+)(?:/\d+)? tests? collected", text)
        if m:
            d["collected"] = int(m.group(1))
    elif name == "launch":
        try:
            res = json.loads(text[text.index("{"):])
            d = {"ok": res.get("ok"), "cases": {k: v["ok"] for k, v in res.get("launches", {}).items()}}
        except ValueError:
            pass
    else:
        lines = [ln for ln in text.strip().splitlines() if ln.strip()]
        d["last_line"] = lines[-1][:300] if lines else ""
    return d


def run_stage(name: str, spec, log, left: float, out: Path | None = None) -> Stage:
    """One subprocess stage; ``left``: seconds of the run's budget still unspent. JSON files the
    stage writes into ``out`` move into the stage's ``detail["tables"]`` (a device call brings
    back at most 8 files: DIR keeps the summary, the log and the markdown tables)."""
    st = Stage(name)
    if isinstance(spec, str):
        st.status, st.note = "skip", spec
        return st
    argv, limit = spec
    if left < 5:
        st.status, st.note = "skip", "the run's --budget was spent"
        return st
    limit = max(5, min(limit, int(left)))
    st.command = " ".join(Path(a).name if a == sys.executable else a for a in argv)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if name == "pytest-gpu" and "--collect-only" in argv:
        env["TRITON_INTERPRET"] = "1"       # the CPU suite's setting, so collection imports as in CI
    env["PYTHONUNBUFFERED"] = "1"
    before = set(out.glob("*.json")) if out is not None else set()
    t0 = time.perf_counter()
    try:
        r = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit)
        rc, text = r.returncode, r.stdout + r.stderr
    except subprocess.TimeoutExpired as e:
        rc = "timeout"
        text = ((e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or ""))
        text += f"\n[gpucheck: stage {name} passed its {limit} s limit]"
    st.seconds = round(time.perf_counter() - t0, 1)
    log.write(f"\n===== {name}: {st.command} (rc {rc}, {st.seconds} s)\n{_tail(text, 20000)}\n")
    log.flush()
    st.detail = parse(name, text)
    st.detail["rc"] = rc
    for f in sorted(set(out.glob("*.json")) - before) if out is not None else ():
        try:
            st.detail.setdefault("tables", {})[f.name] = json.loads(f.read_text())
            f.unlink()
        except (OSError, ValueError):
            pass
    if name == "pytest-gpu" and "--collect-only" in argv:
        ok = rc == 0 and st.detail.get("collected", 0) > 0
    elif name == "pytest-gpu":
        ok = rc == 0 and st.detail.get("passed", 0) > 0 and not st.detail.get("failed")
    else:
        ok = rc == 0
    st.status = "pass" if ok else "fail"
    if not ok:
        st.note = _tail(text, 600).strip().splitlines()[-1] if text.strip() else f"rc {rc}"
    return st


def _commit() -> str | None:
    try:
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=30)
        return r.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def markdown(summary: dict) -> str:
    s = summary
    inst = next((x for x in s["stages"] if x["name"] == "install"), {"detail": {}})["detail"]
    lines = [f"# GPU validation ({'CPU dry run' if s['dry_run'] else s.get('device')}) — {s['date']}", "",
             f"- command: `{s['command']}`", f"- commit: {s['commit']}; device: {s['device']}",
             f"- python {inst.get('python')}, torch {inst.get('torch')} (CUDA {inst.get('torch_cuda')}), triton "
             f"{inst.get('triton')} (torch pins {inst.get('triton_pinned_by_torch')}), driver {inst.get('driver')}",
             f"- verdict: **{'pass' if s['ok'] else 'FAIL'}**, {s['seconds']} s in all", "",
             "| stage | status | s | command | detail |", "|---|---|---|---|---|"]
    for st in s["stages"]:
        det = {k: v for k, v in st["detail"].items() if k not in ("optional",)} if st["name"] != "install" else {}
        text = st["note"] or json.dumps(det)[:200]
        lines.append(f"| {st['name']} | {st['status']} | {st['seconds']} | `{st['command'][:120]}` | {text} |")
    if inst.get("optional"):
        lines += ["", "Optional packages: " + ", ".join(f"{k} {v or 'missing'}" for k, v in inst["optional"].items())]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m rsm_fast.gpucheck", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None, help="output folder (default bench/results/gpucheck_<device>_<date>)")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma list of {STAGES}")
    p.add_argument("--dry-run", action="store_true", help="CPU-sized stages (the default without CUDA)")
    p.add_argument("--budget", type=float, default=540.0,
                   help="seconds for all stages together (default 540, inside a 10-minute device call); a stage "
                        "still running when it is spent is stopped and fails, later stages are skipped")
    a = p.parse_args(argv)
    stages = [s.strip() for s in a.stages.split(",") if s.strip()]
    bad = [s for s in stages if s not in STAGES]
    if bad:
        p.error(f"--stages: unknown stage {bad[0]!r}; choose from {', '.join(STAGES)}")
    import torch

    cuda = torch.cuda.is_available() and not a.dry_run
    device = torch.cuda.get_device_name(0) if cuda else "cpu (dry run)"
    today = dt.date.today().isoformat()
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    out = a.out or ROOT / "bench" / "results" / f"gpucheck_{slug}_{today}"
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    done: list[Stage] = []
    scratch = Path(tempfile.mkdtemp(prefix="gpucheck-"))
    cmds = commands(out, cuda, scratch)
    budget = a.budget if cuda else max(a.budget, 3600.0)
    with open(out / "logs.txt", "w") as log:
        for name in stages:
            left = budget - (time.perf_counter() - t0)
            st = install_check(cuda) if name == "install" else run_stage(name, cmds[name], log, left, out)
            done.append(st)
            print(f"[gpucheck] {name}: {st.status} ({st.seconds} s){' - ' + st.note if st.note else ''}", flush=True)
    ok = all(s.status != "fail" for s in done)
    summary = {"ok": ok, "dry_run": not cuda, "device": device, "date": today, "commit": _commit(),
               "command": "python -m rsm_fast.gpucheck " + " ".join(argv if argv is not None else sys.argv[1:]),
               "seconds": round(time.perf_counter() - t0, 1), "stages": [asdict(s) for s in done]}
    shutil.rmtree(scratch, ignore_errors=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "summary.md").write_text(markdown(summary))
    print(f"[gpucheck] {'pass' if ok else 'FAIL'} in {summary['seconds']} s; summary: {out / 'summary.md'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
