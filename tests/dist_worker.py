"""Worker for tests/test_distributed.py, run by ``torchrun`` (several ranks) or plain ``python``
(one process): trains ``EPOCHS`` epochs through the Trainer API and, on rank 0, saves what the
tests compare: every epoch's final samples with their global row keys (gathered from all ranks),
the trained parameters, the allocator's K profile after every epoch and the epoch logs.

    python tests/dist_worker.py OUT.pt PRESET EPOCHS [key=value ...]
"""
from __future__ import annotations

import os
import sys

import torch

from rsm_fast import distributed as D
from rsm_fast.config import build_config
from rsm_fast.trainer import Trainer


def main() -> None:
    out, preset, epochs, *sets = sys.argv[1:]
    cfg = build_config(preset or None, None, sets)
    world, device = D.init_from_env(cfg.train.device, cfg.train.dist_backend, cfg.train.dist_timeout)
    tr = Trainer(cfg, world=world, device=device)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    rollout = tr._rollout

    def spy(*args, **kwargs):
        rec, f_ref, n = rollout(*args, **kwargs)
        plan = args[1]
        seen.append((rec.x0.detach().clone(), plan.key[plan.num_steps - 1].clone()))
        return rec, f_ref, n

    tr._rollout = spy
    if hasattr(tr.family, "rollout"):        # method.estimator=forward: its solver rollout keeps final samples only
        solve = tr.family.rollout.run

        def spy_final(*args, **kwargs):
            fs = solve(*args, **kwargs)
            seen.append((fs.x0.detach().clone(), fs.key.clone()))
            return fs

        tr.family.rollout.run = spy_final
    logs, profiles = [], []
    for _ in range(int(epochs)):
        logs.append(tr.epoch())
        profiles.append(list(tr._spec.k))
    samples = []
    for x0, key in seen:
        x0, key = world.gather(x0), world.gather(key)
        order = torch.argsort(key)
        samples.append((x0[order], key[order]))
    params = {n: p.detach().clone() for n, p in tr.policy.named_parameters() if p.requires_grad}
    if tr.sharded:
        from rsm_fast import parallel as PAR

        params = {n: v for n, v in (PAR.full_state_dict(tr.policy) or {}).items() if n in params}
    if world.main:
        for log in logs:
            log.pop("seconds_epoch", None)
            log.pop("peak_memory_mb", None)
        torch.save({"samples": samples, "params": params, "profiles": profiles, "logs": logs,
                    "nfe": dict(tr.nfe), "world": world.size}, out)
    # the CLI's ending (rsm_fast.train._finish): meet, destroy the group, skip the C++ destructors
    D.leave(world, ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
