"""Several processes, one run: ``torchrun --nproc_per_node N -m rsm_fast.train ...``.

PyTorch's own engine does the work: ``torch.distributed`` process groups (gloo on CPU, NCCL on
CUDA), DDP / FSDP2 for gradients (:mod:`rsm_fast.parallel`) and ``torch.distributed.checkpoint``
for sharded state. This module holds what the trainer needs around them:

* :func:`init_from_env` — joins the process group torchrun describes (``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``; multi-node through torchrun's rendezvous flags) with
  ``train.dist_timeout`` as every collective's deadline; a plain ``python -m rsm_fast.train``
  gets the one-process :class:`World` and never touches ``torch.distributed``.
* :class:`World` — rank, size and the few collectives the trainer uses, each named in its error:
  sums and maxima of statistics, an ordered gather of per-row tensors (rank-major, which is the
  one-process row order because ranks hold contiguous blocks of whole groups), an object
  broadcast and a barrier. A failed or timed-out collective raises :class:`DistributedError`,
  one line naming this rank, the peer count, the phase (:func:`phase`) and the operation.

**Same samples as one process.** The epoch's ``P`` groups are cut into contiguous blocks, one per
rank (:func:`rank_groups`, the waves' ``split_groups``), and each rank compiles its block with
``PlanSpec.group_offset``: rows keep their *global* trajectory keys and group ids, and the
counter-based noise is a function of ``(seed, key, step)`` alone, so N ranks draw exactly the
noise one process draws for the same rows. Conditioning and a task's initial latents are drawn
for all ``P`` groups on every rank with the same generator (a few integers or one ``randn``) and
each rank keeps its block, so every generator stays in step across ranks and across world sizes.

**Statistics across ranks.** Whatever spans groups is reduced: rewards and path KLs are gathered
(in one-process order) for the logs and the global advantage std; the allocator's and the
diagnostics' per-step sums are summed, so every rank computes the same K profile; the loss is
normalised by the global row count (an N-rank update equals the one-process update); evaluation
samples are split like training groups and their rewards / task metrics computed on the gathered
samples. Rank 0 alone writes the run directory.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
from torch import Tensor

_PHASE = ["setup"]


class DistributedError(RuntimeError):
    """A collective failed or timed out (a peer died, stalled or disagreed); one line."""


@contextlib.contextmanager
def phase(name: str):
    """Name the phase the process is in, for the one-line failure message."""
    old = _PHASE[0]
    _PHASE[0] = name
    try:
        yield
    finally:
        _PHASE[0] = old


def set_phase(name: str) -> None:
    _PHASE[0] = name


def current_phase() -> str:
    return _PHASE[0]


def launched() -> bool:
    """True in a process started by torchrun (or any launcher that sets its variables)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


@dataclass
class World:
    """This process's place in the run: ``rank`` of ``size`` (``size == 1``, ``active`` False: one
    process without ``torch.distributed``)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    active: bool = False
    timeout: float = 0.0              # seconds the current collectives wait
    train_timeout: float = 0.0        # train.dist_timeout, in force after start_training()

    @property
    def main(self) -> bool:
        return self.rank == 0

    def describe(self, op: str, err: BaseException | None = None) -> str:
        why = "" if err is None else f": {_first_line(err)}"
        return (f"rank {self.rank} of {self.size}: {op} in phase '{current_phase()}' failed or timed out "
                f"(train.dist_timeout={self.timeout:g} s; a peer rank died, stalled or left){why}")

    def _run(self, op: str, fn):
        try:
            return fn()
        except DistributedError:
            raise
        except Exception as e:  # noqa: BLE001 - gloo / NCCL raise RuntimeError subclasses of several kinds
            raise DistributedError(self.describe(op, e)) from None

    # -- collectives (identity in one process) -------------------------------------------------------
    def _all_reduce(self, t: Tensor, reduce_op, op: str) -> Tensor:
        """``reduce_op`` over ranks, elementwise, on the backend's device; a new tensor on ``t``'s."""
        if not self.active:
            return t
        out = t.detach().to(self._comm_device(), copy=True)
        self._run(op, lambda: torch.distributed.all_reduce(out, reduce_op))
        return out.to(t.device)

    def sum(self, t: Tensor, op: str = "sum") -> Tensor:
        """Elementwise sum over ranks (a new tensor)."""
        return self._all_reduce(t, torch.distributed.ReduceOp.SUM, op)

    def max(self, t: Tensor, op: str = "max") -> Tensor:
        return self._all_reduce(t, torch.distributed.ReduceOp.MAX, op)

    def any(self, flag: bool, op: str = "flag") -> bool:
        """True on every rank when ``flag`` is true on any."""
        if not self.active:
            return bool(flag)
        return bool(self.max(torch.tensor([1 if flag else 0], dtype=torch.int64), op)[0])

    def gather(self, t: Tensor, counts: list[int] | None = None, op: str = "gather") -> Tensor:
        """Every rank's rows of ``t`` concatenated in rank order (``counts[r]`` rows from rank ``r``;
        measured with one extra collective when None). Uneven counts are padded for the transfer."""
        if not self.active:
            return t
        if counts is None:
            counts = [int(v) for v in self.all_counts(t.shape[0], op).tolist()]
        if counts[self.rank] != t.shape[0]:
            raise ValueError(f"gather: this rank has {t.shape[0]} rows, counts say {counts[self.rank]}")
        n = max(counts)
        src = t.detach().to(self._comm_device()).contiguous()
        if src.shape[0] < n:
            src = torch.cat([src, src.new_zeros((n - src.shape[0], *src.shape[1:]))])
        parts = [torch.empty_like(src) for _ in range(self.size)]
        self._run(op, lambda: torch.distributed.all_gather(parts, src))
        return torch.cat([p[:c] for p, c in zip(parts, counts)]).to(t.device)

    def all_counts(self, n: int, op: str = "count") -> Tensor:
        """``[size]`` int64: every rank's ``n``."""
        v = torch.zeros(self.size, dtype=torch.int64)
        v[self.rank] = int(n)
        return self.sum(v, op)

    def broadcast_object(self, obj, src: int = 0, op: str = "broadcast"):
        if not self.active:
            return obj
        box = [obj]
        self._run(op, lambda: torch.distributed.broadcast_object_list(box, src=src))
        return box[0]

    def barrier(self, op: str = "barrier") -> None:
        if self.active:
            self._run(op, lambda: torch.distributed.barrier())

    def _comm_device(self) -> torch.device:
        if self.active and torch.distributed.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def start_training(self) -> None:
        """Every rank has its model: from here on a collective waits ``train.dist_timeout``."""
        if not self.active:
            return
        with phase("model load"):
            self.barrier("models loaded")
        from torch.distributed.distributed_c10d import _set_pg_timeout

        _set_pg_timeout(datetime.timedelta(seconds=self.train_timeout))
        self.timeout = self.train_timeout

    def close(self) -> None:
        if self.active and torch.distributed.is_initialized():
            with contextlib.suppress(Exception):
                torch.distributed.destroy_process_group()
        self.active = False


# Joining and loading the model wait at least this long (seconds): ranks start, import and load
# their model copies at different speeds; every collective after that waits train.dist_timeout.
JOIN_TIMEOUT = 600.0

ONE = World()
_CURRENT = [ONE]


def current() -> World:
    """The world :func:`init_from_env` joined in this process (the one-process world before)."""
    return _CURRENT[0]


def leave(world: World, ok: bool) -> None:
    """The end of a rank's run: a finished one meets its peers (so none is still using the group),
    then the group is destroyed. The caller exits with ``os._exit`` (see ``rsm_fast.train``)."""
    if not world.active:
        return
    if ok:
        with contextlib.suppress(Exception):
            world.barrier("finish")
        world.close()


def is_collective_failure(e: BaseException) -> bool:
    """An exception a backend raised for a lost or stalled peer (inside DDP / FSDP hooks, where
    :class:`World` cannot wrap the call)."""
    if isinstance(e, DistributedError) or type(e).__name__ == "DistBackendError":
        return True
    text = str(e)
    return any(k in text for k in ("gloo", "Gloo", "NCCL", "Connection closed by peer", "Connection reset by peer",
                                   "Timed out waiting"))


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def init_from_env(device: str, backend: str = "", timeout: float = 600.0) -> tuple[World, str]:
    """Join torchrun's process group; returns the world and this rank's device (``cuda`` becomes
    ``cuda:LOCAL_RANK``). Outside torchrun: the one-process world and ``device`` unchanged."""
    if not launched():
        return World(), device
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(device)
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    join = max(float(timeout), JOIN_TIMEOUT)
    world = World(rank, size, local, True, join)
    if not torch.distributed.is_initialized():
        with phase("init"):
            world._run("init_process_group", lambda: _init_group(backend, rank, size, join))
    world.train_timeout = float(timeout)
    _CURRENT[0] = world
    return world, str(dev)


def _init_group(backend: str, rank: int, size: int, timeout: float) -> None:
    """``init_process_group`` on torchrun's store, under a prefix per restart attempt: a restarted
    worker must not read the addresses the previous attempt's ranks left in the store (torchrun
    keeps one store across ``--max-restarts``; gloo then dials a dead rank)."""
    td = datetime.timedelta(seconds=timeout)
    store, r, n = next(torch.distributed.rendezvous("env://", timeout=td))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or "0"
    store = torch.distributed.PrefixStore(f"rsm_fast/attempt-{attempt}", store)
    torch.distributed.init_process_group(backend, store=store, rank=r, world_size=n, timeout=td)


def rank_groups(groups: int, world: World) -> tuple[int, int]:
    """``(first group, groups)`` of this rank's contiguous block (near-equal; the first
    ``groups % size`` ranks get one more)."""
    from .engine.waves import split_groups

    if world.size == 1:
        return 0, groups
    if groups < world.size:
        raise ValueError(f"the epoch has {groups} group(s) for {world.size} ranks: every rank needs whole groups "
                         f"(raise train.batch_size or lower method.group_size)")
    return split_groups(groups, world.size)[world.rank]
