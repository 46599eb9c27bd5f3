"""One training epoch of a real-architecture task under Nsight Systems (issue 21, item 10).

    python profiles/profile_epoch.py [--preset tempflow-grpo] [--model sd3-tiny] [--warmup 2]
                                     [--set KEY=VALUE ...] [--device cuda]

Builds the run exactly as ``python -m rsm_fast.train --task diffusers --model M --preset P`` does
(``rsm_fast.config.build_config``; random weights for the named configs, so no download), runs
``--warmup`` epochs (CUDA context, cuDNN / Triton autotuning, compiles, the allocator's first
re-plan), then brackets one epoch with ``cudaProfilerStart`` / ``cudaProfilerStop`` so that
``nsys profile --capture-range=cudaProfilerApi`` records that epoch only. Commands and what to
look for: profiles/README.md ("One training epoch").

NVTX ranges inside the epoch (rsm_fast/ops/nvtx.py; domain ``rsm_fast`` when the ``nvtx`` package
is installed, else the default domain): ``rsm_fast/phase/<rollout|reward|train|alloc>`` from the
trainer's phase clock (which synchronises the device at every phase edge, so each range covers
its own GPU work), ``rsm_fast/rollout/<trunk|branch> step i`` per sampling step,
``rsm_fast/reference``, the training step's ``rsm_fast/train/<forward|backward|optimizer>``, and the
fused ops' ``rsm_fast/sampler_step``, ``rsm_fast/zo_loss`` (+ ``_backward``). Printed at the end: the epoch's phase seconds, NFE and
the NVTX domain, so a report can be checked against the run that made it. ``--device cpu`` is a
dry run (no profiler calls, no NVTX): it checks the script and prints the same summary.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rsm_fast.config import ConfigError, build_config  # noqa: E402
from rsm_fast.ops import nvtx as NV  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tempflow-grpo")
    p.add_argument("--model", default="sd3-tiny", help="task.model: a named config (random weights) or a local folder")
    p.add_argument("--warmup", type=int, default=2, help="epochs before the profiled one")
    p.add_argument("--device", default=None, help="train.device (default: cuda when available, else a cpu dry run)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    a = p.parse_args(argv)
    if a.warmup < 0:
        p.error("--warmup must be >= 0")
    a.device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return a


def build(args):
    from rsm_fast.trainer import Trainer

    sets = ["task.name=diffusers", f"task.model={args.model}", f"train.device={args.device}",
            f"train.epochs={args.warmup + 1}", *args.overrides]
    return Trainer(build_config(args.preset, None, sets))


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        tr = build(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cuda = tr.device.type == "cuda"
    for _ in range(args.warmup):
        tr.epoch()
    if cuda:
        torch.cuda.synchronize(tr.device)
        torch.cuda.cudart().cudaProfilerStart()
    t0 = time.perf_counter()
    stats = tr.epoch()
    if cuda:
        torch.cuda.synchronize(tr.device)
        torch.cuda.cudart().cudaProfilerStop()
    wall = time.perf_counter() - t0
    summary = {"preset": args.preset, "model": args.model, "device": str(tr.device), "profiled": cuda,
               "epoch_wall_s": round(wall, 4), "seconds_epoch": stats.get("seconds_epoch"),
               "nfe_epoch": stats.get("nfe_epoch"), "phase_syncs": tr.clock.syncs,
               "nvtx_domain": "rsm_fast" if NV._nvtx is not None else ("default" if cuda else "none (cpu dry run)")}
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
