"""Data-parallel and sharded training on PyTorch's own engine (issue 18): composable DDP for LoRA and
small policies, FSDP2 for full fine-tuning, ``torch.distributed.checkpoint`` (DCP) for sharded state.

Everything here is a thin layer over public (or, for composable DDP, documented-composable) PyTorch
APIs; nothing re-implements a collective algorithm. The process group is the caller's
(``torch.distributed.init_process_group``, e.g. under ``torchrun``); every function works in a plain
single process too (no process group: the wrappers are no-ops and DCP runs with ``no_dist``).

* :func:`replicate_policy` — ``torch.distributed._composable.replicate.replicate``: DDP's reducer
  driven by forward hooks installed on the module itself. Parameter names, attribute access and
  ``state_dict`` keys are unchanged (the module's class becomes a subclass ``DDP<Class>``), and the
  module is called directly. Gradients of parameters that require grad are AVERAGED over ranks in
  the backward of every grad-enabled forward (DDP's bucketed all-reduce, divided by the world
  size). Forwards under ``torch.no_grad()`` (rollouts, a LoRA-gated reference) take part in no
  collective and may happen any number of times, also between a training forward and its
  backward. The rule is DDP's: one grad-enabled forward per backward. DDP is initialised eagerly
  here (rank 0's parameters are broadcast once, now), and the module can no longer be deep-copied:
  make any frozen copy before.
* :func:`shard_policy` — FSDP2 ``fully_shard`` per block, then the root; parameters become
  ``DTensor`` shards (``Shard(0)`` over a 1-D mesh), so build the optimizer (and any EMA shadow)
  AFTER sharding. Gradients are averaged over ranks (reduce-scatter). Every FSDP module, the root
  included, reshards after its forward, so after a no-grad forward the module again holds only
  DTensor shards. A frozen reference copy is sharded the same way: no rank holds a second full model.
* :func:`gradient_sync` — gradient accumulation: wrap the forward AND backward of every micro-batch
  but the last in ``gradient_sync(module, False)``.
* :func:`clip_grad_norm` / :func:`count_nonfinite` — one collective each on sharded tensors; same
  answer on every rank. :func:`local_tensors` gives the local shards for ``torch._foreach_*`` ops
  that have no DTensor rule (``_foreach_copy_``; ``_foreach_norm(inf)`` fails on an empty shard).
* :func:`full_state_dict`, :func:`save_sharded`, :func:`load_sharded` — export and checkpoints.
"""
from __future__ import annotations

import contextlib
import math
import os
import warnings
from typing import Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn

EXTRA_PREFIX = "extra/"          # DCP keys of save_sharded's extra tensors


# ------------------------------------------------------------------------------------------------
# Process-group facts
# ------------------------------------------------------------------------------------------------
def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _initialized() else 0


def _world() -> int:
    return dist.get_world_size() if _initialized() else 1


def _dtensor_type():
    from torch.distributed.tensor import DTensor

    return DTensor


def _is_dtensor(t) -> bool:
    return _initialized() and isinstance(t, _dtensor_type())


def is_replicated(module: nn.Module) -> bool:
    """Whether :func:`replicate_policy` (composable DDP) manages ``module``."""
    from torch.distributed._composable import _get_registry

    reg = _get_registry(module)
    return reg is not None and "replicate" in reg


def is_sharded(module: nn.Module) -> bool:
    """Whether ``module`` is an FSDP2 (``fully_shard``) module."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def local_tensors(tensors: Iterable[Tensor]) -> list[Tensor]:
    """The local shard of every DTensor (an alias of its storage: in-place writes reach the
    DTensor), plain tensors as they are. For ``torch._foreach_copy_`` and friends, which have no
    DTensor sharding rule in torch 2.13."""
    out = []
    for t in tensors:
        t = t.detach()
        out.append(t.to_local() if _is_dtensor(t) else t)
    return out


# ------------------------------------------------------------------------------------------------
# Data parallel (composable DDP)
# ------------------------------------------------------------------------------------------------
def replicate_policy(module: nn.Module, **ddp_kwargs) -> nn.Module:
    """Data-parallel gradients for ``module`` in place (returned for chaining); a no-op without a
    process group or when already replicated. ``ddp_kwargs`` go to ``DistributedDataParallel``
    (e.g. ``bucket_cap_mb``; ``device_id`` for a GPU). Trainable parameters must be the same set,
    shapes and order on every rank; rank 0's values are broadcast to all ranks here."""
    if not _initialized() or is_replicated(module):
        return module
    if hasattr(module, "called_modules"):       # a container of trained parts: one DDP each
        for part in module.called_modules():
            replicate_policy(part, **ddp_kwargs)
        return module
    if is_sharded(module):
        raise RuntimeError("replicate_policy: the module is already sharded by fully_shard (FSDP2)")
    from torch.distributed._composable.replicate import replicate

    replicate(module, **ddp_kwargs)
    # DDP is built lazily on the first forward by default; build it now (a collective: the
    # parameter broadcast from rank 0 and the cross-rank shape check) at a point every rank
    # reaches, so that an EMA or snapshot taken before the first forward already sees synced weights.
    replicate.state(module).lazy_init()
    return module


# ------------------------------------------------------------------------------------------------
# FSDP2
# ------------------------------------------------------------------------------------------------
def _model_code(m: nn.Module) -> bool:
    """Whether ``m``'s class is model code, not torch's (seen through FSDP2's / replicate's
    dynamic subclasses ``FSDP<Class>`` / ``DDP<Class>``)."""
    cls = next((c for c in type(m).__mro__ if not (c.__module__ or "").startswith("torch.distributed")), nn.Module)
    mod = cls.__module__ or ""
    return not (mod == "torch.nn" or mod.startswith("torch.nn.") or mod.startswith("torch."))


def shard_blocks(module: nn.Module) -> list[nn.Module]:
    """The modules :func:`shard_policy` shards before the root: every element of the outermost
    ``nn.ModuleList`` s whose class is model code (diffusers ``down_blocks`` / ``up_blocks`` /
    ``transformer_blocks`` elements), plus the root's direct model-code children whose name ends
    in ``block`` (a UNet's ``mid_block``). Parameter-less blocks are skipped."""
    blocks: list[nn.Module] = []

    def visit(m: nn.Module, root: bool) -> None:
        for name, child in m.named_children():
            if isinstance(child, nn.ModuleList):
                items = [c for c in child if _model_code(c)]
                if items:
                    blocks.extend(items)
                    continue
            if root and name.endswith("block") and _model_code(child):
                blocks.append(child)
                continue
            visit(child, False)

    visit(module, True)
    seen: set[int] = set()
    out = []
    for b in blocks:
        if id(b) not in seen and next(b.parameters(), None) is not None:
            seen.add(id(b))
            out.append(b)
    return out


def default_mesh(module: nn.Module | None = None):
    """A 1-D device mesh over the whole world, on the device type of ``module``'s parameters."""
    from torch.distributed.device_mesh import init_device_mesh

    dev = "cpu"
    if module is not None:
        p = next(iter(module.parameters()), None)
        if p is not None:
            dev = p.device.type
    return init_device_mesh(dev, (_world(),))


def shard_policy(module: nn.Module, *, reference: nn.Module | None = None, mesh=None,
                 blocks: list[nn.Module] | None = None) -> nn.Module:
    """FSDP2 for full fine-tuning: ``fully_shard`` on each of :func:`shard_blocks` (or ``blocks``),
    then on the root, in place (returned). The parameters become new ``DTensor`` objects: collect
    the trainable list, build the optimizer and any EMA AFTER this call. ``reference``, a frozen copy of the same architecture, is
    set to ``requires_grad_(False)`` and sharded the same way with ``reshard_after_forward=True``
    everywhere, so a no-grad reference forward gathers one block at a time and keeps nothing
    gathered afterwards. Needs a process group (with world size 1 it still shards: the checkpoint
    format and the DTensor code paths stay the same)."""
    if not _initialized():
        raise RuntimeError("shard_policy needs torch.distributed to be initialised (torchrun)")
    if hasattr(module, "called_modules"):
        raise RuntimeError("shard_policy takes one module; a container of trained LoRA parts is replicated (DDP)")
    from torch.distributed.fsdp import fully_shard

    mesh = mesh if mesh is not None else default_mesh(module)
    for blk in (blocks if blocks is not None else shard_blocks(module)):
        fully_shard(blk, mesh=mesh)
    # The root reshards after forward too (FSDP2's default keeps it gathered for the backward): a
    # no-grad forward (rollout, evaluation) would otherwise leave the root's parameters registered
    # as plain unsharded tensors until the next backward, and get_state_dict then fails to map the
    # optimizer's DTensor parameters to names (KeyError in torch 2.13).
    fully_shard(module, mesh=mesh, reshard_after_forward=True)
    if reference is not None:
        reference.requires_grad_(False)
        reference.eval()
        for blk in shard_blocks(reference):
            fully_shard(blk, mesh=mesh, reshard_after_forward=True)
        fully_shard(reference, mesh=mesh, reshard_after_forward=True)
    return module


# ------------------------------------------------------------------------------------------------
# Gradient accumulation
# ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def gradient_sync(module: nn.Module, enabled: bool = True):
    """Run a micro-batch's forward and backward with gradient synchronisation on or off.

    ``enabled=False``: gradients accumulate locally (DDP: ``no_sync``; FSDP2: unsharded, not
    reduce-scattered); the next synced backward reduces the accumulated sum. Both the forward
    and the backward must run inside the block (DDP decides at forward time, FSDP2 at backward
    time). The previous setting is restored on exit. A no-op for a plain module."""
    if hasattr(module, "called_modules"):       # a container of trained parts
        with contextlib.ExitStack() as stack:
            for part in module.called_modules():
                stack.enter_context(gradient_sync(part, enabled))
            yield
    elif is_replicated(module):
        from torch.distributed._composable.replicate import replicate

        st = replicate.state(module)
        old = not st._no_sync
        module.set_requires_gradient_sync(enabled)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(old)
    elif is_sharded(module):
        module.set_requires_gradient_sync(enabled, recurse=True)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True, recurse=True)
    elif isinstance(module, nn.parallel.DistributedDataParallel) and not enabled:
        with module.no_sync():
            yield
    else:
        yield


# ------------------------------------------------------------------------------------------------
# Norms and non-finite checks (one collective per mesh layout)
# ------------------------------------------------------------------------------------------------
def _layout_key(t: Tensor):
    """``(mesh, mesh dims the tensor is sharded over)`` of a DTensor."""
    from torch.distributed.tensor import Replicate, Shard

    dims = []
    for d, pl in enumerate(t.placements):
        if isinstance(pl, Shard):
            dims.append(d)
        elif not isinstance(pl, Replicate):
            raise NotImplementedError(f"parallel: a DTensor placed as {t.placements} (only Shard / Replicate)")
    return t.device_mesh, tuple(dims)


def _split(params: list[Tensor], values: list[Tensor | None]) -> tuple[list[Tensor], dict]:
    """Plain values, and ``{(mesh, shard dims): [local shards]}`` of DTensor values, grouped by the
    layout of ``params`` (a group exists for every layout of the params even where a value is
    ``None``, so every rank enters the same collectives)."""
    plain: list[Tensor] = []
    groups: dict = {}
    for q, v in zip(params, values):
        if _is_dtensor(q):
            loc = groups.setdefault(_layout_key(q), [])
            if v is not None:
                loc.append(v.detach().to_local() if _is_dtensor(v) else v.detach())
        elif v is not None:
            plain.append(v.detach())
    return plain, groups


def _reduce(v: Tensor, mesh, dims: tuple[int, ...], op) -> Tensor:
    for d in dims:
        dist.all_reduce(v, op=op, group=mesh.get_group(d))
    return v


def _local_stat(ts: list[Tensor], p: float, device) -> Tensor:
    """``[sum |t|^p (max |t| for p = inf), number of non-finite norms]`` over non-empty tensors, float64."""
    ts = [t for t in ts if t.numel() > 0]
    if not ts:
        return torch.zeros(2, dtype=torch.float64, device=device)
    norms = torch.stack([n.to(torch.float64) for n in torch._foreach_norm(ts, p)])
    bad = (~torch.isfinite(norms)).sum().to(torch.float64)
    stat = norms.max() if math.isinf(p) else (norms ** p).sum()
    return torch.stack([torch.nan_to_num(stat, nan=0.0, posinf=0.0), bad])


@torch.no_grad()
def grad_norm(params: Iterable[Tensor], norm_type: float = 2.0) -> Tensor:
    """The global ``norm_type`` norm of the gradients of ``params`` (a plain 0-d float32 tensor, the
    same on every rank): sharded gradients are reduced over their mesh (one all-reduce per layout),
    plain ones taken as they are (synced by DDP: identical on every rank). NaN when any gradient
    holds a NaN or inf."""
    params = list(params)
    p = float(norm_type)
    if not p > 0:
        raise ValueError(f"norm_type must be positive, got {norm_type}")
    device = params[0].device if params else torch.device("cpu")
    plain, groups = _split(params, [q.grad for q in params])
    op = dist.ReduceOp.MAX if math.isinf(p) else dist.ReduceOp.SUM
    stats = [_local_stat(plain, p, device)]
    for (mesh, dims), loc in groups.items():
        stats.append(_reduce(_local_stat(loc, p, device), mesh, dims, op))
    st = torch.stack(stats)
    total = st[:, 0].max() if math.isinf(p) else st[:, 0].sum() ** (1.0 / p)
    total = torch.where(st[:, 1].sum() > 0, torch.full_like(total, float("nan")), total)
    return total.to(torch.float32)


@torch.no_grad()
def clip_grad_norm(params: Iterable[Tensor], max_norm: float, norm_type: float = 2.0) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for plain (DDP) and DTensor (FSDP2) gradients alike: returns
    the global norm before clipping (:func:`grad_norm`, a plain 0-d tensor identical on every rank)
    and scales the gradients by ``min(1, max_norm / (norm + 1e-6))``. ``max_norm <= 0`` or ``inf``:
    only measure. A non-finite norm leaves the gradients untouched (the caller discards them)."""
    params = list(params)
    total = grad_norm(params, norm_type)
    if max_norm is None or not (0 < float(max_norm) < math.inf):
        return total
    grads = [g for g in local_tensors(q.grad for q in params if q.grad is not None) if g.numel() > 0]
    if grads and bool(torch.isfinite(total)):
        coef = torch.clamp(float(max_norm) / (total.to(torch.float64) + 1e-6), max=1.0)
        for dtype in {g.dtype for g in grads}:
            same = [g for g in grads if g.dtype == dtype]
            torch._foreach_mul_(same, coef.to(device=same[0].device, dtype=dtype))
    return total


@torch.no_grad()
def count_nonfinite(params: Iterable[Tensor]) -> int:
    """How many of ``params`` hold a NaN or inf anywhere (over all shards), the same on every rank:
    one max-reduction over each DTensor layout's mesh, and (with a process group of more than one
    rank) one over the world for plain tensors, which under DDP are identical anyway."""
    params = list(params)
    plain, groups = _split(params, params)

    def flags(ts: list[Tensor]) -> Tensor:
        out = torch.zeros(len(ts), dtype=torch.int64)
        idx = [i for i, t in enumerate(ts) if t.numel() > 0]
        if idx:
            norms = torch._foreach_norm([ts[i] for i in idx], float("inf"))
            bad = ~torch.isfinite(torch.stack([n.float() for n in norms]))
            out[torch.tensor(idx)] = bad.to(torch.int64).cpu()
        return out

    total = 0
    if plain:
        f = flags(plain)
        if _world() > 1:
            f = f.to(plain[0].device)
            dist.all_reduce(f, op=dist.ReduceOp.MAX)
        total += int((f > 0).sum())
    for (mesh, dims), loc in groups.items():
        dev = loc[0].device
        f = _reduce(flags(loc).to(dev), mesh, dims, dist.ReduceOp.MAX)
        total += int((f > 0).sum())
    return total


# ------------------------------------------------------------------------------------------------
# State: export and DCP checkpoints
# ------------------------------------------------------------------------------------------------
def reshard(module: nn.Module) -> None:
    """Put every FSDP2 module under ``module`` back to its sharded parameters (no communication;
    frees gathered ones). The state functions below call it first."""
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def _has_dtensor(module: nn.Module) -> bool:
    return any(_is_dtensor(t) for t in module.state_dict().values())


def full_state_dict(module: nn.Module) -> dict[str, Tensor] | None:
    """The full, unsharded state dict (CPU tensors, the module's own key names) on rank 0, ``None``
    on other ranks; for ``save_pretrained(state_dict=...)``. Collective for a sharded module (every
    rank must call it); a replicated or plain module needs no communication (its CPU tensors may
    alias the module's storage)."""
    reshard(module)
    if _has_dtensor(module):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return sd if _rank() == 0 else None
    if _rank() != 0:
        return None
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def _options(include_frozen: bool):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=not include_frozen, strict=include_frozen)


def _optims(optimizer) -> list:
    return [] if optimizer is None else [optimizer]


def save_sharded(path: str | os.PathLike, module: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 extra: dict[str, Tensor] | None = None, *, include_frozen: bool = True) -> None:
    """Write ``module``'s and ``optimizer``'s state, plus ``extra`` tensors (e.g. EMA shadows shaped
    like the parameters: DTensors are saved sharded), to the directory ``path`` with DCP. Every
    rank must call it; ``path`` must be on a filesystem all ranks share. Replicated tensors are
    written once. ``include_frozen=False`` leaves out parameters that do not require grad (a LoRA
    checkpoint without its base model). Keys are the module's parameter names, so a checkpoint
    of a plain, replicated or sharded module loads into any of the three."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    reshard(module)
    msd, osd = get_state_dict(module, _optims(optimizer), options=_options(include_frozen))
    state: dict = {"model": msd, "optim": osd}
    for k, v in (extra or {}).items():
        if not isinstance(v, Tensor):
            raise TypeError(f"save_sharded: extra[{k!r}] is a {type(v).__name__}, not a tensor")
        state[EXTRA_PREFIX + k] = v
    with _single_process_quiet():
        dcp.save(state, checkpoint_id=os.fspath(path), no_dist=not _initialized())


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns on every single-process save / load even when asked for one (``no_dist=True``)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is (disabled, )?unavailable or uninitialized")
        yield


def _extra_template(path) -> dict[str, Tensor]:
    """Plain full tensors shaped like the checkpoint's extras (when the caller gives no template)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = FileSystemReader(os.fspath(path)).read_metadata().state_dict_metadata
    out = {}
    for k, m in meta.items():
        if k.startswith(EXTRA_PREFIX) and isinstance(m, TensorStorageMetadata):
            out[k[len(EXTRA_PREFIX):]] = torch.empty(m.size, dtype=m.properties.dtype)
    return out


def load_sharded(path: str | os.PathLike, module: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 extra: dict[str, Tensor] | None = None, *, include_frozen: bool = True) -> dict[str, Tensor]:
    """Load a :func:`save_sharded` checkpoint into ``module`` and ``optimizer`` (in place; the module
    already replicated / sharded as it will train, the optimizer built on its parameters) and
    return the extra tensors. ``extra``: templates to load into in place (e.g. DTensor EMA shadows
    of a sharded module); without it every extra comes back as a full plain CPU tensor. Every rank
    must call it; without a process group it runs in this process alone. The optimizer's gradients
    are cleared (DCP's optimizer-state template needs an optimizer without gradients)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = os.fspath(path)
    reshard(module)
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    msd, osd = get_state_dict(module, _optims(optimizer), options=_options(include_frozen))
    template = dict(extra) if extra is not None else _extra_template(path)
    state: dict = {"model": msd, "optim": osd}
    state.update({EXTRA_PREFIX + k: v for k, v in template.items()})
    with _single_process_quiet():
        dcp.load(state, checkpoint_id=path, no_dist=not _initialized())
    set_state_dict(module, _optims(optimizer), model_state_dict=state["model"],
                   optim_state_dict=state["optim"], options=_options(include_frozen))
    return {k: state[EXTRA_PREFIX + k] for k in template}
