"""Host time per call of the fused losses (issue 21 item 6): what one forward + backward costs the
CPU *besides* the kernels, broken down by layer, as a markdown table.

    python bench/bench_host_overhead.py                       # CPU: C++ path + Triton path, launches stubbed
    python bench/bench_host_overhead.py --json out.json --label after
    python bench/bench_host_overhead.py --baseline 44244ab --rounds 3      # before (a git revision) / after table
    python bench/bench_host_overhead.py --device cuda         # GPU: real launches, host / device / wall

Method (CPU). Each measured callable runs ``--calls`` times back to back between two
``time.perf_counter`` reads; that is one repeat, and the table gives the median over ``--repeats``
repeats of (elapsed / calls), in µs. Python's GC is off inside a repeat; one intra-op thread.
Paths:

* ``cpp``: the C++ CPU extension doing the real work, at a tiny latent (``--tiny``, default
  12 x 4x8x8) so the kernels' own time is a few µs and the rest is host work;
* ``triton``: the Triton wrappers on CPU tensors under ``TRITON_INTERPRET=1`` with every
  ``@triton.jit`` kernel of ``rsm_fast.kernels`` replaced by a stub whose ``kernel[grid](...)``
  only counts the launch, so nothing of the kernels runs and only host work is timed, at the
  issue's shape (12 x 16x64², bf16). Triton's own launch path (the binder, the kernel-cache key,
  the driver call) is *not* in these numbers: it exists only on a GPU (``--device cuda``).

Rows of the breakdown (each a separately timed callable; differences are attributed to the layer
between them):

* ``fwd+bwd``: ``rsm_fast.ops.<loss>(...)`` then ``torch.autograd.grad`` of its row losses (the
  benchmark step of ``bench/loss_cases.py``), with ``check=True`` (the default) and ``check=False``;
* ``api``: the public function with the autograd.Function's entry point (``<Loss>Fn.apply``, or
  ``library.<loss>_apply`` where it exists) replaced by one returning a stored output: option
  checks, latent checks, per-row conversions (+ the NaN/inf check when on);
* ``function``: that entry point + ``torch.autograd.grad`` on the prepared raw arguments;
* ``backend``: the backend's ``*_fwd`` + ``*_bwd`` called directly (argument checks, launch plan,
  allocations, launches);
* ``ops`` / ``allocs`` / ``launches``: aten ops dispatched per fwd+bwd (check off) that would each be
  a device kernel on CUDA (fills, copies, reductions; not views or allocations), allocations
  (``empty*``), and Triton launches.

On CUDA (``--device cuda``, no stubs), for ``check=True``, ``check=False`` and the ``check=False``
forward + backward captured in one CUDA graph (``graph``: replays): host µs = the enqueue time of
``--calls`` back-to-back calls (no sync inside), device µs = CUDA events around one call, wall µs =
one call + synchronize. Not run yet (no GPU was lent to the session that wrote it).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
CUDA = "--device=cuda" in sys.argv or any(a == "--device" and b == "cuda" for a, b in zip(sys.argv, sys.argv[1:]))
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")   # before anything imports triton
import rsm_fast  # noqa: E402,F401  (first: a PYTHONPATH checkout wins over loss_cases' sys.path entry)

sys.path.insert(0, str(HERE))
import loss_cases as LC  # noqa: E402
from host_timing import capture, per_call_us  # noqa: E402
import machine_info  # noqa: E402

from rsm_fast import ops  # noqa: E402
from rsm_fast.ops import backends  # noqa: E402
from rsm_fast.ops import library as L  # noqa: E402

OPS_ = ("zo", "score", "nft", "awm")
FN_OF = {"zo": "ZOLossFn", "score": "ScoreLossFn", "nft": "FPLossFn", "awm": "FPLossFn"}
APPLY_OF = {"zo": "zo_apply", "score": "score_apply", "nft": "fp_apply", "awm": "fp_apply"}
BE_FWD = {"zo": ("zo_fwd", "zo_bwd"), "score": ("score_fwd", "score_bwd"), "nft": ("fp_fwd", "fp_bwd"),
          "awm": ("fp_fwd", "fp_bwd")}
KERNEL_MODULES = ("zo_loss", "score_loss", "fp_loss")


# ---------------------------------------------------------------------------------------------
# Stubbed Triton launches
# ---------------------------------------------------------------------------------------------
class _StubKernel:
    """Stands in for a ``@triton.jit`` kernel: ``k[grid](*args, **kw)`` counts and returns."""

    launches = 0

    def __init__(self, name):
        self.__name__ = name

    def __getitem__(self, grid):
        return self._launch

    def _launch(self, *args, **kwargs):
        _StubKernel.launches += 1


@contextlib.contextmanager
def stubbed_launches():
    """Every jitted kernel of the Triton loss modules replaced by a :class:`_StubKernel`."""
    import importlib

    from triton.runtime.jit import KernelInterface

    saved = []
    for m in KERNEL_MODULES:
        mod = importlib.import_module(f"rsm_fast.kernels.{m}")
        for name, obj in list(vars(mod).items()):
            if isinstance(obj, KernelInterface):
                saved.append((mod, name, obj))
                setattr(mod, name, _StubKernel(name))
    try:
        yield
    finally:
        for mod, name, obj in saved:
            setattr(mod, name, obj)


# ---------------------------------------------------------------------------------------------
# Counting dispatched aten ops
# ---------------------------------------------------------------------------------------------
def count_ops(fn) -> dict:
    """aten ops below autograd during ``fn()``: device kernels (non-view, non-alloc), allocations."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen: list = []

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    launches0 = _StubKernel.launches
    with Mode():
        fn()
    allocs = [f for f in seen if f.__name__.startswith(("empty", "new_empty"))]
    meta = ("detach", "alias", "lift_fresh", "_to_copy_noop")
    kernels = [f for f in seen if f not in allocs and not getattr(f, "is_view", False)
               and not f.__name__.startswith(meta) and f._schema.name not in ("aten::view", "aten::_unsafe_view")]
    return {"ops": len(kernels), "allocs": len(allocs), "launches": _StubKernel.launches - launches0,
            "op_names": sorted({f.__name__ for f in kernels})}


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _replaced(obj, name, value):
    orig = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, orig)


def _has_check(fn) -> bool:
    import inspect

    return "check" in inspect.signature(fn).parameters


def measure(op: str, backend: str, case: LC.Case, calls: int, repeats: int) -> dict:
    os.environ["RSM_FAST_OPS_BACKEND"] = backend
    device = torch.device("cpu")
    inp = LC.make_inputs(case, device)
    x, go = inp["x"], inp["grad_out"]
    fused = {c: LC.loss_fns(case, ("fused",), check=c)["fused"] for c in (True, False)}

    def step(check):
        f = fused[check]

        def run():
            loss = f(inp)
            return torch.autograd.grad(loss, x, go if loss.dim() else None)[0]
        return run

    res = {"op": op, "backend": backend, "case": str(case)}
    res["fwd+bwd check"] = per_call_us(step(True), calls, repeats)
    res["fwd+bwd nocheck"] = per_call_us(step(False), calls, repeats)

    # the API layer alone: the autograd.Function's entry point replaced by one returning a stored output
    if hasattr(L, APPLY_OF[op]):         # this checkout: the API calls library.<loss>_apply
        owner, attr = L, APPLY_OF[op]
    else:                                # before: <Loss>Fn.apply
        owner, attr = getattr(L, FN_OF[op]), "apply"
    store: list = []
    with capture(owner, attr, store):
        fused[False](inp)
    fargs, _, fout = store[0]
    entry = getattr(owner, attr)
    with _replaced(owner, attr, lambda *a: fout):
        res["api check"] = per_call_us(lambda: fused[True](inp), calls, repeats)
        res["api nocheck"] = per_call_us(lambda: fused[False](inp), calls, repeats)

    # autograd.Function + backend on the prepared raw arguments
    first = fout if isinstance(fout, torch.Tensor) else fout[0]
    gout = torch.full_like(first, 1.0 / first.shape[-1])   # prepared once: d/d(first output)

    def function_step():
        out = entry(*fargs)
        return torch.autograd.grad(out if isinstance(out, torch.Tensor) else out[0], fargs[0], gout)[0]

    res["function"] = per_call_us(function_step, calls, repeats)

    # backend functions alone
    be = backends.for_device(device)
    fname, bname = BE_FWD[op]
    if hasattr(be, fname + "_unchecked"):      # what the eager Function calls (this checkout on)
        fname, bname = fname + "_unchecked", bname + "_unchecked"
    fstore: list = []
    bstore: list = []
    with capture(be, fname, fstore), capture(be, bname, bstore):
        step(False)()
    (fa, fk, _), (ba, bk, _) = fstore[0], bstore[0]
    fwd, bwd = getattr(be, fname), getattr(be, bname)

    def backend_step():
        fwd(*fa, **fk)
        return bwd(*ba, **bk)

    res["be_us"] = per_call_us(backend_step, calls, repeats)
    res.update(count_ops(step(False)))
    return res


@contextlib.contextmanager
def _nothing():
    yield


def autograd_floor(calls: int, repeats: int) -> float:
    """A one-input autograd.Function returning a [12] view, then torch.autograd.grad: the fixed
    cost of one custom node and of the harness's grad call, whatever the op does."""
    class Ident(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.view(-1)[:12]

        @staticmethod
        def backward(ctx, g):
            return None

    x = torch.zeros(12, 4, requires_grad=True)
    go = torch.ones(12)

    def step():
        return torch.autograd.grad(Ident.apply(x), x, go, allow_unused=True)

    return per_call_us(step, calls, repeats)


def run_cpu(args) -> list[dict]:
    torch.set_num_threads(1)
    tiny = LC.parse_latent(args.tiny)
    rows = []
    for backend in args.backends:
        stub = stubbed_launches if backend == "triton" else _nothing
        latent = LC.HEADLINE[1] if backend == "triton" else tiny
        with stub():
            for op in args.ops:
                case = LC.Case(op, LC.HEADLINE[0], latent, "bf16")
                rows.append(measure(op, backend, case, args.calls, args.repeats))
                print(f"  {backend:6s} {op:5s} fwd+bwd {rows[-1]['fwd+bwd check']:.1f} / "
                      f"{rows[-1]['fwd+bwd nocheck']:.1f} us", file=sys.stderr, flush=True)
    return rows


# ---------------------------------------------------------------------------------------------
# CUDA: real launches
# ---------------------------------------------------------------------------------------------
def _cuda_times(fn, calls: int, repeats: int) -> dict:
    """host: enqueue time per call of ``calls`` back-to-back calls (no sync inside); device: CUDA
    events around one call; wall: one call + synchronize. Medians."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    host, dev, wall = [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        host.append((time.perf_counter() - t0) / calls * 1e6)
        torch.cuda.synchronize()
        for _ in range(calls):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            t1 = time.perf_counter()
            s.record()
            fn()
            e.record()
            e.synchronize()
            wall.append((time.perf_counter() - t1) * 1e6)
            dev.append(s.elapsed_time(e) * 1e3)
    return {"host": statistics.median(host), "device": statistics.median(dev), "wall": statistics.median(wall)}


def run_cuda(args) -> list[dict]:
    """Eager fwd+bwd with the check on and off, and the check-off fwd+bwd captured in one CUDA
    graph (replayed), for each loss at the headline shape."""
    device = torch.device("cuda")
    out = []
    for op in args.ops:
        case = LC.Case(op, LC.HEADLINE[0], LC.HEADLINE[1], "bf16")
        inp = LC.make_inputs(case, device)
        x, go = inp["x"], inp["grad_out"]
        for mode in ("check=True", "check=False", "graph"):
            f = LC.loss_fns(case, ("fused",), check=mode == "check=True")["fused"]

            def run():
                loss = f(inp)
                return torch.autograd.grad(loss, x, go if loss.dim() else None)[0]

            fn = run
            if mode == "graph":
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(3):
                        run()
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    run()
                fn = graph.replay
            row = {"op": op, "backend": backends.for_device(device).name, "case": str(case), "mode": mode}
            row.update(_cuda_times(fn, args.calls, args.repeats))
            out.append(row)
            print(row, file=sys.stderr, flush=True)
    return out


# ---------------------------------------------------------------------------------------------
def table(rows: list[dict], label: str) -> str:
    head = ("| path | loss | case | fwd+bwd check=True | fwd+bwd check=False | api (check on) | api (check off) "
            "| NaN/inf check | Function+backend | backend | aten ops | allocs | launches |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(f"| {r['backend']}{' (stubbed)' if r['backend'] == 'triton' else ''} | {r['op']} | {r['case']} "
                     f"| {r['fwd+bwd check']:.1f} | {r['fwd+bwd nocheck']:.1f} | {r['api check']:.1f} "
                     f"| {r['api nocheck']:.1f} | {r['api check'] - r['api nocheck']:.1f} | {r['function']:.1f} "
                     f"| {r['be_us']:.1f} | {r['ops']} | {r['allocs']} | {r['launches']} |")
    return f"**{label}** (µs per call, median of repeats)\n\n" + "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Before / after: this checkout against a git revision, interleaved
# ---------------------------------------------------------------------------------------------
COLS = (("fwd+bwd check", "fwd+bwd, check=True"), ("fwd+bwd nocheck", "fwd+bwd, check=False"),
        ("api check", "api, check on"), ("api nocheck", "api, check off"), ("nan", "NaN/inf check"),
        ("function", "Function+backend"), ("be_us", "backend"))
COUNTS = (("ops", "aten ops"), ("allocs", "allocs"), ("launches", "launches"))


def export_revision(rev: str, dest: Path) -> Path:
    """``rsm_fast``, ``kernels`` and ``csrc`` of git revision ``rev`` under ``dest``, laid out as
    the installed package (``rsm_fast/kernels``, ``rsm_fast/csrc`` links), for ``PYTHONPATH``."""
    import subprocess

    dest.mkdir(parents=True, exist_ok=True)
    root = HERE.parent
    tar = subprocess.run(["git", "-C", str(root), "archive", rev, "rsm_fast", "kernels", "csrc"], check=True,
                         capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=tar, check=True)
    for sub in ("kernels", "csrc"):
        link = dest / "rsm_fast" / sub
        if not link.exists():
            link.symlink_to(Path("..") / sub)
    return dest


def compare(args) -> str:
    """Run this script ``--rounds`` times on the baseline revision and on this checkout,
    alternating (so both see the same machine load), and tabulate the per-cell median over rounds."""
    import subprocess
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="rsm_host_overhead_"))
    base = export_revision(args.baseline, tmp / "base")
    sides = {"before": str(base), "after": str(HERE.parent)}
    runs: dict = {"before": [], "after": []}
    common = ["--calls", str(args.calls), "--repeats", str(args.repeats), "--tiny", args.tiny, "--ops", *args.ops,
              "--backends", *args.backends]
    for r in range(args.rounds):
        for side, path in sides.items():
            out = tmp / f"{side}_{r}.json"
            env = dict(os.environ, PYTHONPATH=path)
            subprocess.run([sys.executable, str(Path(__file__).resolve()), *common, "--label", side, "--json",
                            str(out)], check=True, env=env, cwd=str(tmp), stdout=subprocess.DEVNULL)
            runs[side].append(json.loads(out.read_text())["rows"])
            print(f"  round {r + 1}/{args.rounds} {side} done", file=sys.stderr, flush=True)

    def cell(side, i, key):
        vals = []
        for rows in runs[side]:
            row = rows[i]
            vals.append(row["api check"] - row["api nocheck"] if key == "nan" else row[key])
        return statistics.median(vals)

    n = len(runs["after"][0]) - 1          # the last row is the autograd floor
    head = "| path | loss | case | " + " | ".join(h for _, h in COLS + COUNTS) + " |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for i in range(n):
        a = runs["after"][0][i]
        cells = [f"{cell('before', i, k):.0f} → **{cell('after', i, k):.0f}**" for k, _ in COLS]
        cells += [f"{runs['before'][0][i][k]} → {a[k]}" for k, _ in COUNTS]
        path = a["backend"] + (" (launches stubbed)" if a["backend"] == "triton" else "")
        lines.append(f"| {path} | {a['op']} | {a['case']} | " + " | ".join(cells) + " |")
    floor = {s: statistics.median(rows[-1]["autograd_floor"] for rows in runs[s]) for s in runs}
    return ("\n".join(lines) + f"\n\nautograd floor (one trivial autograd.Function + torch.autograd.grad, the "
            f"harness's fixed cost): {floor['before']:.0f} µs / {floor['after']:.0f} µs (before / after runs)\n")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--backends", nargs="+", default=["cpp", "triton"], choices=("cpp", "triton", "decomposed"))
    p.add_argument("--ops", nargs="+", default=list(OPS_), choices=OPS_)
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--tiny", default="4x8x8", help="latent of the C++ rows (host-bound size)")
    p.add_argument("--label", default="this checkout")
    p.add_argument("--json", default=None)
    p.add_argument("--baseline", default=None, metavar="REV",
                   help="CPU: also run git revision REV (before) against this checkout (after), interleaved")
    p.add_argument("--rounds", type=int, default=3, help="with --baseline: runs per side")
    args = p.parse_args(argv)
    if args.baseline:
        print(compare(args))
        return
    print(f"torch {torch.__version__}, {platform.python_implementation()} {platform.python_version()}, "
          f"{machine_info.cpu_model()}, {os.cpu_count()} CPUs, rsm_fast from {Path(ops.__file__).parents[1]}",
          file=sys.stderr)
    if args.device == "cuda":
        rows = run_cuda(args)
        lines = ["| loss | case | mode | host µs | device µs | wall µs |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['op']} | {r['case']} | {r['mode']} | {r['host']:.1f} | {r['device']:.1f} | {r['wall']:.1f} |"
                  for r in rows]
        print(f"**{args.label}** ({torch.cuda.get_device_name()})\n\n" + "\n".join(lines))
    else:
        rows = run_cpu(args)
        floor = autograd_floor(args.calls, args.repeats)
        print(table(rows, args.label))
        print(f"\nautograd floor (a trivial autograd.Function + torch.autograd.grad): {floor:.1f} µs")
        rows.append({"autograd_floor": floor})
    if args.json:
        Path(args.json).write_text(json.dumps({"label": args.label, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
