"""Triton's per-launch host work, and the direct launches that skip it (issue 21 item 6), without a GPU.

    python bench/bench_triton_launch.py                   # host µs per fwd+bwd: Triton's launch path vs direct
    python bench/bench_triton_launch.py --check --json out.json   # the launch checks the tests assert on

Runs the Triton wrappers of ``rsm_fast.kernels`` outside the interpreter, with Triton's driver
replaced by :func:`rsm_fast.kernels._nodriver.recording_driver`: every kernel is really compiled
for sm_90 (Triton's own ptxas), Triton's whole launch path runs (binder, cache key, launch metadata,
hooks), and the launcher records its arguments instead of launching. The tensors are CPU tensors
whose addresses stand in for device pointers; nothing reads them.

Cases: each fused op's forward + backward (``zo``, ``score``, ``nft``, ``awm``; the backends'
``*_unchecked`` entry points, with the arguments ``rsm_fast.ops`` passes them, captured from the
plain-torch backend on ``bench/loss_cases.py``'s inputs), the sampler step, and the rollout's noise.

``--check``: per case, the first call goes through Triton and the second through the direct path;
both must record the same launches (grid, stream, function, packed metadata; the inputs by
identity, fresh outputs by dtype and size, the rest by value), and the second must have taken the
direct path. Then the argument-signature key of :mod:`rsm_fast.kernels._direct` against Triton's
own cache key on random arguments (misaligned tensors, ints of each specialisation class, dtypes):
equal keys must give equal Triton keys. Then a registered launch hook must send every launch
through Triton again. Prints (and writes) a JSON summary; exit status 1 if a check fails.

Timing (default): host µs per call of each case, Triton's launch path (``DirectKernel`` bypassed)
against the direct path, median of ``--repeats`` repeats of ``--calls`` back-to-back calls, one
thread, GC off; the launcher call is a no-op Python function on both sides.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import statistics
import sys
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes"):
    sys.exit("bench_triton_launch.py runs Triton outside its interpreter: unset TRITON_INTERPRET")
os.environ.pop("TRITON_INTERPRET", None)
os.environ["RSM_FAST_OPS_BACKEND"] = "decomposed"     # where the wrappers' arguments are captured

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import loss_cases as LC  # noqa: E402
from host_timing import capture, per_call_us  # noqa: E402
from rsm_fast.kernels import _direct as D, _launch as L  # noqa: E402
from rsm_fast.kernels import fp_loss, philox_noise, sampler_step, score_loss, zo_loss  # noqa: E402
from rsm_fast.kernels._nodriver import recording_driver  # noqa: E402
from rsm_fast.ops import backends  # noqa: E402

BE_FWD = {"zo": ("zo_fwd", "zo_bwd", zo_loss), "score": ("score_fwd", "score_bwd", score_loss),
          "nft": ("fp_fwd", "fp_bwd", fp_loss), "awm": ("fp_fwd", "fp_bwd", fp_loss)}
MODULES = (zo_loss, score_loss, fp_loss, sampler_step, philox_noise)


def cases(rows: int = 4, latent=(4, 8, 8), dtype: str = "bf16") -> dict:
    """``{name: (fn, args)}``: ``fn(*args)`` runs one case's Triton wrappers once."""
    out = {}
    dec = backends.for_device(torch.device("cpu"))
    for op, (fname, bname, mod) in BE_FWD.items():
        case = LC.Case(op, rows, tuple(latent), dtype)
        inp = LC.make_inputs(case, torch.device("cpu"))
        fused = LC.loss_fns(case, ("fused",))["fused"]
        fs, bs = [], []
        with capture(dec, fname + "_unchecked", fs), capture(dec, bname + "_unchecked", bs):
            loss = fused(inp)
            torch.autograd.grad(loss, inp["x"], inp["grad_out"] if loss.dim() else None)
        (fa, fk, _), (ba, bk, _) = fs[0], bs[0]
        fa = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in fa)
        ba = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in ba)
        fwd, bwd = getattr(mod, fname + "_unchecked"), getattr(mod, bname + "_unchecked")
        out[op] = (lambda fwd=fwd, bwd=bwd, fa=fa, fk=fk, ba=ba, bk=bk: (fwd(*fa, **fk), bwd(*ba, **bk)), fa + ba)
    g = torch.Generator().manual_seed(1)
    B, dt = rows, LC.DTYPES[dtype]
    x, f, z = (torch.randn(B, *latent, generator=g).to(dt) for _ in range(3))
    row = lambda: torch.rand(B, generator=g) + 0.1  # noqa: E731
    st = torch.ones(B, dtype=torch.bool)
    sargs = (x, f, z, row(), row(), row(), st, True)
    out["step"] = (lambda a=sargs: sampler_step.step_fwd(*a), sargs)
    keys = torch.arange(B, dtype=torch.int64) * 7919 + 11
    nargs = (keys, None, 3, 1234, 0, int(torch.tensor(latent).prod()), dt)
    out["noise"] = (lambda a=nargs: philox_noise.noise(*a), nargs)
    return out


@contextlib.contextmanager
def _cpu_as_device():
    """The checked wrappers (sampler step, noise) accept CPU tensors as if they were on the device."""
    saved = L.runs_on, L.INTERPRET
    L.runs_on = lambda device: True
    L.INTERPRET = True      # philox's CUDA-only guard; kernels are already wrapped (direct at import)
    try:
        yield
    finally:
        L.runs_on, L.INTERPRET = saved


@contextlib.contextmanager
def _triton_path():
    """Every DirectKernel's launch through Triton (``kernel.fn[grid]``): the path being replaced."""
    saved = D.DirectKernel.launch
    D.DirectKernel.launch = lambda self, grid, *args, **meta: self.fn[grid](*args, **meta)
    try:
        yield
    finally:
        D.DirectKernel.launch = saved


def _same_launch(a: tuple, b: tuple, inputs: tuple) -> str:
    """'' when launch records ``a`` (Triton's) and ``b`` (direct) agree, else what differs."""
    if len(a) != len(b):
        return f"{len(a)} vs {len(b)} launcher arguments"
    if a[:6] != b[:6]:
        return f"grid/stream/function/metadata differ: {a[:6]} vs {b[:6]}"
    if b[6:9] != (None, None, None):
        return "the direct launch passed launch metadata or hooks"
    ids = {id(t) for t in inputs if isinstance(t, torch.Tensor)}
    for i, (x, y) in enumerate(zip(a[9:], b[9:])):
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return f"argument {i}: tensor vs not"
        if isinstance(x, torch.Tensor):
            if id(x) in ids or id(y) in ids:
                if x is not y:
                    return f"argument {i}: a different input tensor"
            elif (x.dtype, x.untyped_storage().nbytes()) != (y.dtype, y.untyped_storage().nbytes()):
                return f"argument {i}: outputs of different dtype or size"
        elif x != y or type(x) is not type(y):
            return f"argument {i}: {x!r} vs {y!r}"
    return ""


def check_launches(drv) -> dict:
    res = {}
    for name, (fn, inputs) in cases().items():
        drv.launches.clear()
        with _triton_path():
            fn()
        first = list(drv.launches)
        drv.launches.clear()
        fn()                        # entries made (Triton's path, recorded) ...
        drv.launches.clear()
        fn()                        # ... then direct
        second = list(drv.launches)
        why = "" if len(first) == len(second) else f"{len(first)} vs {len(second)} launches"
        for a, b in zip(first, second):
            why = why or _same_launch(a, b, inputs)
        res[name] = {"launches": len(first), "ok": not why, "why": why}
    return res


def _triton_key(fn, args, meta):
    from triton.runtime.jit import compute_cache_key

    kernel_cache, key_cache, target, backend, binder = fn.device_caches[0]
    _, specialization, options = binder(*args, **meta)
    return compute_cache_key(key_cache, specialization, options)


def check_keys(trials: int = 400, seed: int = 0) -> dict:
    """Equal DirectKernel keys => equal Triton cache keys, on random arguments. Each argument
    keeps a base value with probability 3/4, else takes another specialisation class; every
    class has two members (two aligned offsets, two misaligned ones, two ints of each class), so
    many draws share a key while their values differ. The same check of a deliberately coarse
    key (alignment left out) must fail: the check can see an unsound key."""
    import triton.language as tl

    rng = random.Random(seed)
    buf = {dt: torch.zeros(4096, dtype=dt) for dt in (torch.float32, torch.bfloat16)}
    # tensor classes: (dtype, offsets in elements); 16-byte aligned or not
    t_classes = [(torch.float32, (0, 16)), (torch.float32, (1, 3)), (torch.bfloat16, (0, 8)), (torch.bfloat16, (1, 5))]
    i_classes = [(32, 48), (17, 33), (1,), (2, 3), (2**31 + 16, 2**32), (2**31 + 1, 2**33 + 3), (2**63 + 16, 2**64 - 16)]

    def pick(classes, base: int):
        c = classes[base] if rng.random() < 0.75 else rng.choice(classes)
        return c

    def tensor():
        dt, offs = pick(t_classes, 0)
        off = rng.choice(offs)
        return buf[dt][off:off + 64]

    def integer():
        return rng.choice(pick(i_classes, 0))

    kernels = {
        "_zo_partials": (zo_loss._zo_partials, lambda: ((tensor(), tensor(), tensor(), tensor(), tensor(),
                                                          integer(), integer(), integer()),
                                                         dict(HAS_REF=rng.random() < .5, ACC=tl.float32,
                                                              BLOCK=64, num_warps=1))),
        "_noise_kernel": (philox_noise._noise_kernel,        # do_not_specialize: step, k0, k1, block0
                          lambda: ((tensor(), tensor(), tensor(), integer(), integer(), integer(), integer(),
                                    integer(), integer()),
                                   dict(HAS_STEPS=False, MODE=0, OUT_BF16=False, PRECISE=False, BLOCK=16,
                                        num_warps=1))),
    }

    def coarse(k, args, meta):     # alignment left out: must be caught
        return k.key(tuple(buf[a.dtype][:64] if isinstance(a, torch.Tensor) else a for a in args), meta)

    out = {}
    for name, (k, draw) in kernels.items():
        seen: dict = {}
        seen_coarse: dict = {}
        for _ in range(trials):
            args, meta = draw()
            tk = _triton_key(k.fn, args, meta)
            seen.setdefault(k.key(args, meta), set()).add(tk)
            seen_coarse.setdefault(coarse(k, args, meta), set()).add(tk)
        out[name] = {"draws": trials, "our_keys": len(seen), "triton_keys": len(set().union(*seen.values())),
                     "shared": trials - len(seen), "ok": all(len(v) == 1 for v in seen.values()),
                     "coarse_key_caught": any(len(v) > 1 for v in seen_coarse.values())}
        out[name]["ok"] = out[name]["ok"] and out[name]["coarse_key_caught"]
    return out


def check_hook(drv) -> dict:
    """A registered launch hook sends launches through Triton (with metadata), and it is called."""
    from triton import knobs

    fn, _ = cases()["zo"]
    fn(), fn()
    called = []
    hook = lambda metadata: called.append(metadata)  # noqa: E731
    chain = knobs.runtime.launch_enter_hook
    old = None
    if hasattr(chain, "add"):
        chain.add(hook)
    else:
        old, knobs.runtime.launch_enter_hook = chain, hook
    drv.launches.clear()
    try:
        fn()
    finally:
        if hasattr(chain, "remove"):
            chain.remove(hook)
        else:
            knobs.runtime.launch_enter_hook = old
    meta = [rec[6] is not None for rec in drv.launches]
    return {"launches": len(drv.launches), "with_metadata": sum(meta),
            "ok": bool(meta) and all(meta)}


def run_checks() -> dict:
    with recording_driver() as drv, _cpu_as_device():
        res = {"launches": check_launches(drv), "keys": check_keys(), "hook": check_hook(drv)}
    res["ok"] = (all(v["ok"] for v in res["launches"].values()) and all(v["ok"] for v in res["keys"].values())
                 and res["hook"]["ok"])
    return res


def run_timing(args) -> str:
    torch.set_num_threads(1)
    rows = []
    with recording_driver() as drv, _cpu_as_device():
        cs = cases(args.rows, tuple(args.latent), args.dtype)
        for name, (fn, _) in cs.items():
            drv.record = True
            drv.launches.clear()
            fn()                       # compiles, makes the direct entries; counts the launches
            n = len(drv.launches)
            drv.record = False         # the launcher is then a no-op call on both sides
            t = []
            for direct in (False, True, False, True):     # interleaved: both see the same load
                with contextlib.nullcontext() if direct else _triton_path():
                    t.append(per_call_us(fn, args.calls, args.repeats))
            rows.append((name, n, statistics.median(t[0::2]), statistics.median(t[1::2])))
    import triton
    head = (f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
            f"{os.getloadavg()[0]:.2f}; torch {torch.__version__}, Triton {triton.__version__}, "
            f"CPython {platform.python_version()}; one intra-op thread\n"
            f"- command: `python bench/bench_triton_launch.py --calls {args.calls} --repeats {args.repeats}`\n"
            f"- shape: {args.rows} x {'x'.join(map(str, args.latent))} {args.dtype}\n\n")
    lines = ["| case | launches | Triton's launch path, µs | direct, µs | saved per launch, µs |",
             "|---|---|---|---|---|"]
    for name, n, a, b in rows:
        lines.append(f"| {name} | {n} | {a:.1f} | {b:.1f} | {(a - b) / max(n, 1):.1f} |")
    return head + "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="the launch checks (JSON), not the timing")
    p.add_argument("--json", type=Path, default=None, help="write the checks' JSON here too")
    p.add_argument("--rows", type=int, default=12)
    p.add_argument("--latent", type=int, nargs=3, default=(16, 64, 64))
    p.add_argument("--dtype", default="bf16", choices=sorted(LC.DTYPES))
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--repeats", type=int, default=9)
    args = p.parse_args(argv)
    if args.check:
        res = run_checks()
        text = json.dumps(res, indent=1)
        print(text)
        if args.json:
            args.json.write_text(text)
        sys.exit(0 if res["ok"] else 1)
    print(run_timing(args))


if __name__ == "__main__":
    main()
