"""The trainer's state: what a checkpoint holds and what a stop puts back (rsm_fast/checkpoint.py,
rsm_fast/run_loop.py). A mixin of :class:`~rsm_fast.trainer.Trainer`.

Under several ranks every rank holds the same generator, RNG, EMA, allocator and (global) NFE
counters, so one state describes the run: with DDP rank 0 writes it whole (the trained
parameters and optimizer are replicated), and it resumes on any number of ranks; with FSDP2
the parameters and optimizer state are sharded and go through ``torch.distributed.checkpoint``
(:mod:`rsm_fast.parallel`), the rest is rank 0's ``state.pt``.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from .checkpoint import FORMAT as CKPT_FORMAT, SHARDS, code_files, code_version
from .config import to_dict
from .rewards.secrets import redact_config


class TrainerState:
    def state_dict(self) -> dict:
        """Everything the next epoch depends on (rsm_fast/checkpoint.py): the trained parameters
        (the LoRA of an image model, all of the 2-D task's MLP), optimizer, scheduler, every RNG,
        EMA, allocator state and profile, NFE and scored-sample counters, phase clock and skipped
        count, with the (redacted) config and the code version that wrote it. Plain data and tensors only."""
        sharded = getattr(self, "sharded", False)
        trained = None if sharded else {n: p.detach().clone() for n, p in self.policy.named_parameters()
                                        if p.requires_grad}
        ema = None if self.step.ema is None else self.step.ema.state_dict()
        if sharded and ema is not None:
            ema["shadow"] = []             # in the shards (save_shards)
        return {"format": CKPT_FORMAT, "code_version": code_version(), "code_files": dict(code_files()),
                "config": redact_config(to_dict(self.cfg)), "sharded": "dcp" if sharded else None,
                "world_size": self.world.size,
                "policy": trained, "optimizer": None if sharded else self.opt.state_dict(),
                "scheduler": self.sched.state_dict() if self.sched is not None else None,
                "epochs_done": self.epochs_done, "generator": self.gen.get_state(),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None,
                "allocator": None if self.budget is None else {**self.budget.state_dict(), "k": list(self._spec.k)},
                "ema": ema,
                "forward": self.family.state_dict(),      # the estimator family's (None: nothing)
                "nfe": dict(self.nfe), "scored": dict(self.scored), "clock": dict(self.clock.seconds),
                "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict`: the next :meth:`epoch` computes what it would have
        computed in the process that wrote ``state`` (the window of a MixGRPO plan follows from
        the epoch count; the allocator's profile is restored with its statistics)."""
        if bool(state.get("sharded")) != bool(getattr(self, "sharded", False)):
            raise ValueError("checkpoint 'sharded' does not match train.parallel of this run (an FSDP2 checkpoint "
                             "resumes under torchrun with train.parallel=fsdp, a replicated one without it)")
        if state.get("sharded"):
            self._load_shards(Path(state["_dir"]) / SHARDS, state)
        else:
            self._load_replicated(state)
        if self.sched is not None and state.get("scheduler") is not None:
            self.sched.load_state_dict(state["scheduler"])
        self.epochs_done = int(state["epochs_done"])
        self.gen.set_state(state["generator"])
        if state.get("torch_rng") is not None:
            torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        if (state.get("ema") is None) != (self.step.ema is None):
            raise ValueError("checkpoint 'ema' does not match train.ema_decay of this config")
        if self.step.ema is not None and not state.get("sharded"):
            self.step.ema.load_state_dict(state["ema"])
        if (state.get("forward") is None) != (self.family.state_dict() is None):
            raise ValueError("checkpoint 'forward' does not match method.estimator of this config")
        if state.get("forward") is not None:
            self.family.load_state_dict(state["forward"])
        alloc = state.get("allocator")
        if (alloc is None) != (self.budget is None):
            raise ValueError("checkpoint 'allocator' does not match rollout.allocator of this config")
        if alloc is not None:
            self.budget.load_state_dict(alloc)
            if tuple(alloc["k"]) != tuple(self._spec.k):
                self._build_plan(replace(self._spec, k=tuple(alloc["k"])))
        if "nfe" in state:
            self.nfe = {k: int(v) for k, v in state["nfe"].items()}
            # (a checkpoint older than the counter of scored samples restarts it at 0)
            self.scored = {**dict.fromkeys(self.scored, 0), **{k: int(v) for k, v in state.get("scored", {}).items()}}
            self.clock.seconds = {k: float(v) for k, v in state["clock"].items()}
            self.skipped = int(state["skipped"])

    def snapshot(self) -> dict:
        """What an epoch's rollout and reward phases move (RNG states and counters; no weights):
        :meth:`restore` puts it back when a stop abandons the epoch (rsm_fast/run_loop.py)."""
        return {"gen": self.gen.get_state(), "torch_rng": torch.get_rng_state(), "nfe": dict(self.nfe),
                "scored": dict(self.scored), "clock": dict(self.clock.seconds), "epochs_done": self.epochs_done,
                "skipped": self.skipped}

    def restore(self, snap: dict) -> None:
        self.gen.set_state(snap["gen"])
        torch.set_rng_state(snap["torch_rng"])
        self.nfe, self.clock.seconds = dict(snap["nfe"]), dict(snap["clock"])
        self.scored = dict(snap["scored"])
        self.epochs_done, self.skipped = snap["epochs_done"], snap["skipped"]

    def _counters(self) -> dict:
        """The NFE counters and the scored-sample counters (keys ``("scored", kind)``) as one flat dict:
        the snapshot an epoch's increments are measured from (``Trainer._sum_nfe``)."""
        return {**self.nfe, **{("scored", k): v for k, v in self.scored.items()}}

    def _set_counters(self, c: dict) -> None:
        self.nfe = {k: int(v) for k, v in c.items() if isinstance(k, str)}
        self.scored = {k[1]: int(v) for k, v in c.items() if isinstance(k, tuple)}

    def _load_replicated(self, state: dict) -> None:
        params = dict(self.policy.named_parameters())
        for n, v in state["policy"].items():
            if n not in params or params[n].shape != v.shape:
                raise ValueError(f"checkpoint parameter {n!r} does not match this policy")
            with torch.no_grad():
                params[n].copy_(v)
        self.opt.load_state_dict(state["optimizer"])

    # -- FSDP2: parameters, optimizer and EMA shadows as torch.distributed.checkpoint shards ----------
    def _ema_extra(self) -> dict:
        ema = self.step.ema
        return {} if ema is None else {f"ema/{i}": t for i, t in enumerate(ema.shadow)}

    def save_shards(self, path: Path) -> None:
        """Every rank writes its shards of the policy, optimizer and EMA into ``path`` (collective)."""
        from . import parallel as PAR

        PAR.save_sharded(path, self.policy, self.opt, extra=self._ema_extra(), include_frozen=False)

    def _load_shards(self, path: Path, state: dict) -> None:
        from . import parallel as PAR

        if not (path / ".metadata").is_file():
            raise ValueError(f"checkpoint shards missing: {path}")
        PAR.load_sharded(path, self.policy, self.opt, extra=self._ema_extra(), include_frozen=False)
        if self.step.ema is not None:
            self.step.ema.steps = int(state["ema"]["steps"])
