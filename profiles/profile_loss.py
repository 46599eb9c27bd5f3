"""Run the fused loss ops (and the eager / compiled reference for comparison) for a few iterations
under NVTX ranges, for Nsight Systems and Nsight Compute. Commands: profiles/README.md.

    python profiles/profile_loss.py [--ops zo,score] [--rows 12] [--latent 16x64x64] [--dtype bf16]
                                    [--impls fused,eager,compiled] [--passes fwd,fwd+bwd]
                                    [--iters 5] [--warmup 3]

Ranges (default NVTX domain, pushed here): one per iteration, named ``<impl>.<op>.<pass>``, e.g.
``fused.zo.fwd_bwd`` ('+' is an Nsight Compute filter quantifier, so passes are spelled fwd /
fwd_bwd). Inside them the fused ops push their own ``rsm_fast/<op>`` ranges
(``rsm_fast/zo_loss``, ``rsm_fast/zo_loss_backward``, ``rsm_fast/score_loss``, ...; domain
``rsm_fast`` when the ``nvtx`` package is installed, else the default domain). Warm-up (compile,
Triton JIT, autotuning) runs before ``cudaProfilerStart``, so ``nsys --capture-range=cudaProfilerApi``
and ``ncu --profile-from-start off`` see only the measured iterations. ``--device cpu`` is a dry run
without NVTX (checks the script; nothing to profile).
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import loss_cases as LC  # noqa: E402

try:
    import nvtx as _nvtx_pkg  # noqa: F401  (only to report which domain the ops' ranges use)
    OPS_DOMAIN = "rsm_fast"
except ImportError:
    OPS_DOMAIN = None


def nvtx_range(name: str, on: bool):
    return torch.cuda.nvtx.range(name) if on else contextlib.nullcontext()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--ops", default="zo,score")
    p.add_argument("--rows", type=int, default=LC.HEADLINE[0])
    p.add_argument("--latent", default="x".join(map(str, LC.HEADLINE[1])))
    p.add_argument("--dtype", default="bf16", choices=tuple(LC.DTYPES))
    p.add_argument("--impls", default=",".join(LC.IMPLS))
    p.add_argument("--passes", default=",".join(LC.PASSES))
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3)
    a = p.parse_args(argv)

    device = torch.device(a.device)
    cuda = device.type == "cuda"
    if not cuda:
        print("no CUDA device: dry run without NVTX ranges or profiler capture")
    impls, passes = a.impls.split(","), a.passes.split(",")
    work = []  # (range name, step)
    for op in a.ops.split(","):
        case = LC.Case(op, a.rows, LC.parse_latent(a.latent), a.dtype)
        inp = LC.make_inputs(case, device)
        fns = LC.loss_fns(case, [i for i in impls if i != "compiled"], device=device)
        for impl in impls:
            if impl == "compiled":  # no Dynamo reset: the other op's compiled graphs must survive
                fns["compiled"] = LC.loss_fns(case, ("compiled",), device=device, reset=False)["compiled"]
            for pass_ in passes:
                step = LC.make_step(fns[impl], inp, pass_)
                t0 = time.perf_counter()
                for _ in range(a.warmup):  # compile / JIT / autotune outside the capture range
                    step()
                LC.sync(device)
                name = f"{impl}.{op}.{pass_.replace('+', '_')}"
                work.append((name, step))
                print(f"warmed {name} ({case}) in {time.perf_counter() - t0:.1f} s", flush=True)

    if cuda:
        torch.cuda.cudart().cudaProfilerStart()
    for name, step in work:
        for _ in range(a.iters):
            with nvtx_range(name, cuda):
                step()
                LC.sync(device)
    if cuda:
        torch.cuda.cudart().cudaProfilerStop()

    dom = f"{OPS_DOMAIN}@" if OPS_DOMAIN else ""
    print(f"profiled {len(work)} ranges x {a.iters} iterations; fused backend: {LC.backend_name(device)}")
    print(f"ops' own ranges: domain {OPS_DOMAIN or '<default>'}; Nsight Compute filter for the fused kernels:")
    print(f'  --nvtx --nvtx-include "regex:{dom}rsm_fast.(zo|score)_loss.*/"')
    print('per-iteration filter, e.g.: --nvtx --nvtx-include "fused.zo.fwd_bwd/"')
    return 0


if __name__ == "__main__":
    sys.exit(main())
