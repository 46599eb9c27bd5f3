"""The optimizer side of an epoch (issue 6 item 4): compiled model regions, inner updates,
gradient accumulation, max-grad-norm, the non-finite guard and an EMA of the trained weights.

Compilation (``train.compile``), active only inside the training step (the rollout, the frozen
reference and the evaluation run the same modules eagerly, so the rollout engine's own paths, the
LoRA gate and CUDA-graph capture never meet a Dynamo frame, and only grad-mode graphs are built):

* ``regional`` compiles every block of the policy that sits in an ``nn.ModuleList`` and whose class
  is model code (diffusers ``down_blocks`` / ``up_blocks`` / ``transformer_blocks``, ...): one
  ``torch.compile`` per block *class* (its ``forward``, the module passed as an argument), one
  static graph per block *shape* (parameter shapes and the non-row dims of its inputs), so every
  repetition of a block with the same structure and shapes reuses one graph. Blocks of
  ``torch.nn`` classes (containers, plain layers: no reuse worth a graph) are skipped, so a
  policy without model-code blocks (the 2-D task's residual MLP) falls back to its whole forward.
* ``full`` compiles the policy module's whole forward.

[DECISION] dynamic row dims, not bucketed padding: dim 0 of every tensor argument of a compiled
region (tensors nested in tuples / lists / dicts included: diffusers' ``res_hidden_states_tuple``)
is marked dynamic (``torch._dynamo.maybe_mark_dynamic``) before each call, so the row count
(which the online budget allocator changes every epoch, and which micro-batching splits unevenly)
is a symbol in the graph and a new count is no new graph; padding would need masked rows in every
loss and diagnostic. All other dims (channels, spatial, tokens) and the parameter shapes stay
static: ``dynamic=True`` (every dim symbolic) made the digits UNet's compile 4x slower (aot_eager,
``full``: 68 s against 17 s). Dynamo specialises a size of exactly 1, so a micro-batch of one
row compiles once more.

[DECISION] static block shapes: ``torch.compile(..., dynamic=False)``, which turns off Dynamo's
automatic dynamic shapes for the compiled frames but still honours the marked row dim (issue 21
item 7). With ``dynamic=None`` a class met at a second width or resolution (SD1.5's three
``CrossAttnDownBlock2D``) was recompiled with symbolic channels and spatial sizes (``(s0, 16, s1,
s2)``, even ``24 - s3`` channels in an up block): slower kernels for every block of that class.
Now each block shape is its own static graph in the class's code cache (all compiled during the
warm-up epoch; on SD1.5's block layout at tiny widths the same 10 graphs as before, none symbolic
but in the rows). Not chosen: ``mark_static`` on every non-row dim (the same for tensor arguments, but Python ints
such as ``upsample_size`` could still turn symbolic) or one compiled function per shape (Dynamo's
cache is per code object, shared by every ``torch.compile`` of one function). One cache entry per
shape means a model with more shapes of one class than Dynamo's recompile limit (8) would run the
rest eagerly, silently: inside the step the limit is raised to ``2 * regions + 8`` (plus entries
already on the code) and hitting it is an error naming the class (:class:`CompiledRegions`).

[DECISION] The fused loss op stays outside the compiled graph (eager ``autograd.Function`` path of
``rsm_fast.ops``): it is one C++/Triton kernel per row block already. ``rsm_fast::zo_loss`` does
compile as one opaque node (tests/test_ops_api.py), but compiling it in one graph with the model
(bench/bench_compile.py ``full+loss``) made the digits step slower (0.73x eager against 1.23x for
``full``, and a 325 s compile) and the 2-D task's no faster (bench/results/compile_cpu_2026-11-23.md);
it would also tie the graph to the trainer's loss code. Backward through a compiled region is
compiled by AOTAutograd. On CPU ``regional`` / ``full`` are 1.06-1.2x (2-D task) and 1.16x / 1.23x
(digits UNet) faster than eager after a 60-90 s UNet compile, so ``off`` stays the default.

Recompiles are counted from Dynamo's graph counter: ``recompiles`` in the epoch stats is the number
of graphs compiled during this epoch's training step (the warm-up epoch's first compiles included);
after the first epoch it must be 0, also when the row count changes (tests/test_train_step.py,
tests/test_compile_static.py). ``compiled_shapes`` is the number of distinct block shapes the
regions have run so far (one graph each; ``recompiles`` of the warm-up epoch can be larger by graph
breaks and one-row micro-batches). Both are in every epoch record of ``log.jsonl``.
``RSM_FAST_COMPILE_BACKEND`` (default ``inductor``) picks the Dynamo backend; tests of the image
models use ``aot_eager`` (same capture and autograd, no kernel code generation) to stay fast.

Gradient accumulation (``train.grad_accum = k``): the rows are split into k contiguous
micro-batches; micro-batch j's mean loss is scaled by its share ``n_j / M``, so the accumulated
gradient is the full batch's (the loss is a mean over rows; row weights stay per row).

EMA (``train.ema_decay`` d, ``train.ema_every`` E): RSM-code SD3.5's ``EMAModuleWrapper``
(``sd35_zeroth_order/flow_grpo/ema.py``, jaylee2000/rsm @e8be3df; decay 0.9 every 8 steps, spec
§11): after optimizer step n (1-based) with ``(n + 1) % E == 0``,
``ema += (1 - d_n) (theta - ema)``, ``d_n = min(d, (1 + n) / (10 + n))`` (a warm-up that lets
the average follow the first steps). Evaluation, the checkpoint's ``ema`` entry and the exported
LoRA use it; the trained ``policy`` weights (and resumed training) stay the raw ones.

Non-finite guard (:class:`StepGuard`). A non-finite loss or gradient norm stops the run before the
optimizer step. A finite gradient can still make non-finite weights (``train.lr=1e300``, a huge
``train.weight_decay``); no such parameter survives the step that made it:

* before the step, the scalars an Adam-family step computes (the step size ``lr / (1 - beta1^t)``
  and the decay factor ``1 - lr wd``) must fit the parameters' dtype; if not, the run stops with
  nothing changed (torch would raise a bare ``RuntimeError`` halfway through the step);
* after the step, one fused reduction (``torch._foreach_norm(params, inf)``, a max-abs per tensor,
  left on the device and read with the next update's values, or once after the last update) says
  whether every trained tensor is finite; if not, the parameters are copied
  back from a snapshot taken before the step, the optimizer state is put back (Adam/AdamW: the
  step count exactly, the two moments by undoing their update with the step's own gradient,
  equal to the old moments up to float rounding; any other optimizer, or AMSGrad, from an exact
  copy of its state), the gradients are cleared and ``nonfinite`` is raised naming the learning
  rate and weight decay. The EMA is updated only after the check, so it never sees the bad step.

Host syncs (issue 21 item 5): none per micro-batch. The losses, their finite flag, the fused ops' input
checks (``ops.deferred_finite_check``; a bad input is then named, before the step), the gradient
norm, the previous step's parameter check and the logged statistics of an update stay on the device
and are read together, once per update (``tests/test_train_step_syncs.py`` counts them: updates + 1
per epoch), so a micro-batch's backward is queued right behind its forward. A non-finite loss is
therefore found after the update's backward passes, still before its optimizer step.

Cost: the snapshot is one copy of the trained parameters, written in place every optimizer step
(a device memcpy of their size): 85 KB for the 2-D task's default MLP, a few hundred KB for a
rank-8 LoRA of the digits UNet, ~13 MB for a rank-8 LoRA on SD1.5 full, and the model's own size
under full fine-tuning. The check is one reduction over the same bytes. Optimizers other than
Adam / AdamW (none in this project) or AMSGrad also copy their state every step.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from . import ops
from .ops.nvtx import annotate

COMPILE_MODES = ("off", "regional", "full")


def graphs_compiled() -> int:
    """Graphs Dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def compile_backend() -> str:
    return os.environ.get("RSM_FAST_COMPILE_BACKEND", "").strip() or "inductor"


def find_regions(policy: nn.Module, mode: str) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the modules ``mode`` compiles (see the module docstring)."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {COMPILE_MODES}, got {mode!r}")
    if mode == "off":
        return []
    out: list[tuple[str, nn.Module]] = []
    if mode == "regional":
        done: list[str] = []
        for name, mod in policy.named_modules():
            if not isinstance(mod, nn.ModuleList) or any(name.startswith(d + ".") for d in done):
                continue
            blocks = [(f"{name}.{i}", b) for i, b in enumerate(mod) if not type(b).__module__.startswith("torch.")]
            if blocks:
                out += blocks
                done.append(name)
    if out:
        return out
    if hasattr(policy, "called_modules"):      # a container (rsm_fast/tasks/base.py): what the adapter calls
        return [(name, m) for name, m in policy.named_children()]
    return [("<policy>", policy)]


def _mark_batch(a):
    """Dim 0 (rows) of a tensor argument is dynamic: a new row count is no new graph."""
    if isinstance(a, Tensor) and a.dim() > 0:
        torch._dynamo.maybe_mark_dynamic(a, 0)
    return a


def _mark_rows(args: tuple, kwargs: dict) -> tuple:
    """Mark dim 0 of every tensor in ``args`` / ``kwargs``, nested ones included (diffusers' up blocks
    take their skips as ``res_hidden_states_tuple``), dynamic; return their other dims (the input
    part of the block shape)."""
    from torch.utils._pytree import tree_leaves

    sig = []
    for a in tree_leaves((args, kwargs)):
        if isinstance(a, Tensor):
            _mark_batch(a)
            sig.append(tuple(a.shape[1:]))
    return tuple(sig)


def _rows_dynamic(fn, module: nn.Module, seen: set | None = None):
    """``module.forward`` replacement: the compiled class forward, rows dim of every tensor argument
    dynamic; ``seen`` collects the block shapes (class, parameter shapes, non-row input dims) it ran."""
    cls = type(module)
    params = tuple(tuple(p.shape) for p in module.parameters())

    def forward(*args, **kwargs):
        sig = _mark_rows(args, kwargs)
        if seen is not None:
            seen.add((cls, params, sig))
        try:
            return fn(module, *args, **kwargs)
        except torch._dynamo.exc.FailOnRecompileLimitHit as e:
            raise RuntimeError(
                f"torch.compile of {cls.__qualname__}.forward hit Dynamo's recompile limit "
                f"({torch._dynamo.config.recompile_limit} graphs for this class in this process): rather "
                f"than run the rest of its block shapes eagerly the step stops (train.compile='off' avoids "
                f"it; TORCH_LOGS=recompiles names the guards that failed)") from e
    return forward


class CompiledRegions:
    """The compiled forwards of :func:`find_regions`, installed only inside :meth:`active`.

    One ``torch.compile`` per module class; inside ``active()`` each region's ``forward`` is an
    instance attribute calling the compiled class forward with the module as first argument
    (``nn.Module.__call__`` and its hooks stay eager). Parameter names and state dicts never change.

    Static shapes (issue 21 item 7): ``dynamic=False`` turns off Dynamo's automatic dynamic shapes
    for these frames (a class seen at a second width or resolution would otherwise recompile with
    symbolic channels / spatial dims), while the row dim marked by ``maybe_mark_dynamic`` stays a
    symbol: each distinct block shape is one static graph in the class's code cache. That cache
    holds one entry per shape, so ``active()`` raises Dynamo's recompile limit (8) to
    :attr:`recompile_limit` and makes hitting it an error (Dynamo would otherwise run the rest of
    the shapes eagerly, silently)."""

    def __init__(self, policy: nn.Module, mode: str, backend: str | None = None):
        self.mode, self.backend = mode, backend or compile_backend()
        regions = find_regions(policy, mode)
        self.names = [n for n, _ in regions]
        self._modules = [m for _, m in regions]
        self._fns: dict[type, object] = {}
        for m in self._modules:
            if type(m) not in self._fns:
                self._fns[type(m)] = torch.compile(type(m).forward, dynamic=False, backend=self.backend)
        self.shapes: set = set()        # block shapes the regions have run (one graph each)
        # each region has one shape per step, two with a one-row micro-batch (Dynamo specialises a
        # size of 1); entries other instances left on the class's code (same process) count too
        self.recompile_limit = max(int(torch._dynamo.config.recompile_limit),
                                   _cache_entries(self._fns) + 2 * len(self._modules) + 8)

    def __bool__(self) -> bool:
        return bool(self._modules)

    @contextmanager
    def active(self):
        for m in self._modules:
            m.forward = _rows_dynamic(self._fns[type(m)], m, self.shapes)
        try:
            with torch._dynamo.config.patch(recompile_limit=self.recompile_limit, fail_on_recompile_limit_hit=True):
                yield
        finally:
            for m in self._modules:
                m.__dict__.pop("forward", None)


def _cache_entries(fns: dict) -> int:
    """The most Dynamo cache entries on one of the classes' forward code objects (0 if unknown)."""
    try:
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list

        return max((len(_debug_get_cache_entry_list(c.forward.__code__)) for c in fns), default=0)
    except Exception:       # a private helper: no count, no extra headroom
        return 0


def compile_policy(policy: nn.Module, mode: str, backend: str | None = None) -> CompiledRegions:
    """The compiled regions of ``policy`` for ``mode`` (use ``with regions.active(): ...``)."""
    return CompiledRegions(policy, mode, backend)


@contextmanager
def weights_applied(params: list[Tensor], values: list[Tensor]):
    """Write ``values`` into ``params`` in place for the duration of the block, then the saved
    weights back (in-place copies: a compiled region or a captured graph reads them like any
    update). Used by the EMA's evaluation swap and the forward family's old / EMA weights."""
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, v in zip(params, values):
            p.copy_(v.to(p.dtype))
    try:
        yield
    finally:
        with torch.no_grad():
            for p, v in zip(params, saved):
                p.copy_(v)


class EMA:
    """RSM-code's EMA of a list of parameters (fp32 shadow copies; see the module docstring)."""

    def __init__(self, params: list[Tensor], decay: float, every: int = 1):
        if not 0.0 <= decay < 1.0 or every < 1:
            raise ValueError(f"EMA needs 0 <= decay < 1 and every >= 1, got decay={decay}, every={every}")
        self.params, self.decay, self.every = params, float(decay), int(every)
        self.shadow = [p.detach().to(torch.float32).clone() for p in params]
        self.steps = 0          # optimizer steps seen

    def decay_at(self, n: int) -> float:
        """``d_n = min(decay, (1 + n) / (10 + n))`` after optimizer step ``n`` (1-based)."""
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def update(self) -> None:
        """Call once after every optimizer step."""
        self.steps += 1
        n = self.steps
        if (n + 1) % self.every:
            return
        w = 1.0 - self.decay_at(n)
        for s, p in zip(self.shadow, self.params):
            s.add_(p.detach().to(torch.float32) - s, alpha=w)

    def applied(self):
        """Swap the EMA weights in for the duration of the block (evaluation, export)."""
        return weights_applied(self.params, self.shadow)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "every": self.every, "steps": self.steps,
                "shadow": [s.clone() for s in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        shadow = state["shadow"]
        if len(shadow) != len(self.shadow) or any(a.shape != b.shape for a, b in zip(shadow, self.shadow)):
            raise ValueError(f"checkpoint 'ema' holds {len(state['shadow'])} tensors that do not match the "
                             f"{len(self.shadow)} trained parameters of this policy")
        self.shadow = [s.to(t.device, torch.float32).clone() for s, t in zip(state["shadow"], self.shadow)]
        self.steps = int(state["steps"])


class StepGuard:
    """Keeps a non-finite parameter from surviving the optimizer step that made it (module
    docstring): :meth:`precheck` before ``opt.step()``, :meth:`save` just before it, then
    :meth:`count_nonfinite` and, when that is non-zero, :meth:`restore`."""

    def __init__(self, params: list[Tensor], opt: torch.optim.Optimizer):
        self.params, self.opt = params, opt
        self.local = lambda ts: [t.detach() for t in ts]    # FSDP2: the DTensors' local shards
        self._snap: list[Tensor] | None = None
        self._state: dict | None = None
        self.invertible = isinstance(opt, torch.optim.Adam) and all(
            not g.get("amsgrad", False) and not isinstance(g["betas"][0], Tensor)
            and 0 < g["betas"][0] < 1 and 0 < g["betas"][1] < 1 for g in opt.param_groups)

    def precheck(self) -> str | None:
        """Why the coming step cannot be computed in the parameters' dtype (None: it can)."""
        if not isinstance(self.opt, torch.optim.Adam) or not self.params:
            return None
        top = torch.finfo(self.params[0].dtype).max
        for g in self.opt.param_groups:
            lr, wd, b1 = float(g["lr"]), float(g["weight_decay"]), float(g["betas"][0])
            steps = [float(self.opt.state[p]["step"]) for p in g["params"] if self.opt.state.get(p)]
            t = (max(steps) if steps else 0.0) + 1.0
            size = lr / (1.0 - b1 ** t) if b1 < 1 else math.inf
            if not abs(size) <= top:
                return f"the step size lr / (1 - beta1^t) = {size:.3g} overflows {self.params[0].dtype}"
            if wd and g.get("decoupled_weight_decay", isinstance(self.opt, torch.optim.AdamW)):
                if not abs(1.0 - lr * wd) <= top:
                    return f"the decay factor 1 - lr * weight_decay = {1.0 - lr * wd:.3g} overflows {self.params[0].dtype}"
        return None

    @torch.no_grad()
    def save(self) -> None:
        """Snapshot the parameters (and, unless the state can be undone, the optimizer state)."""
        ps = self.local(self.params)
        if self._snap is None:
            self._snap = [p.clone() for p in ps]
        else:
            torch._foreach_copy_(self._snap, ps)
        if not self.invertible:
            self._state = copy.deepcopy(self.opt.state_dict())

    @torch.no_grad()
    def nonfinite(self) -> Tensor:
        """Trained tensors holding a NaN or inf, as a device scalar (one fused max-abs reduction; no
        host read: :class:`TrainStep` reads it with the next update's values)."""
        if not self.params:
            return torch.zeros(())
        norms = torch._foreach_norm([p.detach() for p in self.params], float("inf"))
        return (~torch.isfinite(torch.stack([n.float() for n in norms]))).sum()

    def count_nonfinite(self) -> int:
        """:meth:`nonfinite` read on the host (one sync)."""
        return int(self.nonfinite())

    @torch.no_grad()
    def restore(self) -> None:
        """Put the parameters and the optimizer state back to what they were before the step."""
        if self._state is not None:
            self.opt.load_state_dict(self._state)
        else:
            self._undo_adam()
        torch._foreach_copy_(self.local(self.params), self._snap)

    def _undo_adam(self) -> None:
        old = {id(p): s for p, s in zip(self.params, self._snap)}
        for g in self.opt.param_groups:
            b1, b2 = (float(b) for b in g["betas"])
            wd, coupled = float(g["weight_decay"]), not g.get("decoupled_weight_decay", isinstance(self.opt, torch.optim.AdamW))
            for p in g["params"]:
                st = self.opt.state.get(p)
                if not st or p.grad is None or id(p) not in old:
                    continue
                if float(st["step"]) <= 1:          # this step created the state
                    del self.opt.state[p]
                    continue
                grad, m1, m2 = self.local([p.grad, st["exp_avg"], st["exp_avg_sq"]])   # FSDP2: local shards
                grad = -grad if g.get("maximize", False) else grad
                if wd and coupled:                  # Adam's L2 term entered the moments
                    grad = grad + wd * old[id(p)]
                m1.sub_(grad, alpha=1 - b1).div_(b1)
                m2.addcmul_(grad, grad, value=-(1 - b2)).div_(b2).clamp_(min=0)
                if isinstance(st["step"], Tensor):
                    st["step"].sub_(1)
                else:
                    st["step"] -= 1

    def describe(self) -> str:
        g = self.opt.param_groups[0]
        return f"train.lr={float(g['lr']):g}, train.weight_decay={float(g.get('weight_decay', 0.0)):g}"


def micro_batches(M: int, k: int) -> list[slice]:
    """``k`` contiguous slices covering ``range(M)`` (sizes differ by at most one; none empty)."""
    k = max(1, min(k, M))
    base, extra = divmod(M, k)
    out, a = [], 0
    for j in range(k):
        b = a + base + (1 if j < extra else 0)
        out.append(slice(a, b))
        a = b
    return out


class TrainStep:
    """Inner updates over one epoch's rows (see the module docstring).

    :meth:`run` takes ``loss_fn(sl) -> (mean loss over rows sl, out | None)``, where ``out`` (zeroth
    order) has the rows' ``clipped`` mask and ``log_ratio``; the model forward happens inside
    ``loss_fn`` and so inside the compiled regions."""

    def __init__(self, policy: nn.Module, params: list[Tensor], opt: torch.optim.Optimizer, *, compile: str = "off",
                 grad_accum: int = 1, max_grad_norm: float = 1.0, ema_decay: float = 0.0, ema_every: int = 1,
                 backend: str | None = None, world=None, sharded: bool = False):
        if grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
        self.params, self.opt, self.policy = params, opt, policy
        self.world, self.sharded = world, sharded
        self.grad_accum, self.max_grad_norm = int(grad_accum), float(max_grad_norm)
        self.regions = compile_policy(policy, compile, backend)
        self.compiled = self.regions.names          # names of the compiled modules ([] = eager)
        self.ema = EMA(params, ema_decay, ema_every) if ema_decay > 0 else None
        self.guard = StepGuard(params, opt)
        # the tensors the backward differentiates (None: every leaf; the fused epoch names the trained
        # weights, so its backward skips the rollout states' branch of the graph)
        self.backward_inputs: list[Tensor] | None = None
        if sharded:     # FSDP2: snapshots of the local shards; the non-finite count spans every rank
            from . import parallel as PAR

            self.guard.local = PAR.local_tensors
            self.guard.count_nonfinite = lambda: PAR.count_nonfinite(self.params)

    def run(self, M: int, inner_updates: int, loss_fn, on_forward, nonfinite, epoch: int,
            total_rows: int | None = None) -> tuple[dict, Tensor | None]:
        """``inner_updates`` optimizer steps over ``M`` rows. Returns the epoch's stats and the last
        update's clip mask over all ``M`` rows (``None`` for first-order losses). A non-finite loss
        (any micro-batch) or gradient norm raises ``nonfinite(message)`` before the optimizer step,
        with the gradients cleared: the weights (and the EMA) are left untouched. An optimizer step
        that cannot be computed, or that leaves a non-finite parameter, raises ``nonfinite`` too,
        with the weights and optimizer state as they were before it (:class:`StepGuard`).

        Several ranks (``total_rows``: every rank's rows): micro-batch j's mean loss is scaled by
        ``size n_j / total_rows``, so DDP's / FSDP's gradient average is the one-process gradient of
        the same global batch; gradients are synchronised on the last micro-batch only; a
        non-finite loss on any rank stops every rank (one flag reduction per update)."""
        stats: dict = {}
        last_clipped = None
        parts = micro_batches(M, self.grad_accum)
        world = self.world if self.world is not None and self.world.active else None
        denom = M if world is None else (total_rows or M) / world.size
        g0 = graphs_compiled() if self.regions else 0
        pending = None      # the last optimizer step whose parameter check is not read yet
        dev = self.params[0].device if self.params else None     # NVTX sub-phase ranges
        with self.regions.active():
            for u in range(inner_updates):
                self.opt.zero_grad(set_to_none=True)
                total, ok, clipped, absmax = None, None, [], []
                with ops.deferred_finite_check() as fc:    # the fused ops' input checks stay on the device
                    for j, sl in enumerate(parts):
                        # several ranks: DDP / FSDP synchronise only the last micro-batch (its forward and backward)
                        with self._sync(world is not None and j < len(parts) - 1):
                            with annotate("train/forward", dev):
                                loss, out = loss_fn(sl)
                            on_forward(sl.stop - sl.start)
                            share = (sl.stop - sl.start) / denom
                            with annotate("train/backward", dev):
                                (loss * share if (len(parts) > 1 or world is not None) else loss).backward(
                                    inputs=self.backward_inputs)
                        ld = loss.detach().double()     # on the device: no host read per micro-batch
                        total = ld * share if total is None else total + ld * share
                        ok = torch.isfinite(ld) if ok is None else ok & torch.isfinite(ld)
                        if out is not None:
                            clipped.append(out.clipped)
                            if u == 0:
                                absmax.append(out.log_ratio.detach().abs().max())
                if self.sharded:
                    from . import parallel as PAR

                    gn = PAR.clip_grad_norm(self.params, self.max_grad_norm)
                else:
                    gn = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm if self.max_grad_norm > 0
                                                        else float("inf"))
                mask = torch.cat(clipped) if clipped else None
                # the update's one host read: loss finite, loss, gradient norm, the previous step's
                # parameter check and (single process) the logged statistics
                vals = {"ok": ok.double(), "loss": total, "grad_norm": gn.detach().double().reshape(()),
                        "previous_check": (pending[1].double().reshape(()).to(total.device) if pending
                                           else total.new_zeros(())),
                        "inputs_finite": fc.ok.double().reshape(()) if fc.ok is not None else total.new_ones(())}
                if world is None and mask is not None:
                    vals["clip_frac"] = mask.double().mean()
                    if u == 0:
                        vals["absmax"] = torch.stack(absmax).max().double()
                host = dict(zip(vals, torch.stack([v.to(total.device) for v in vals.values()]).tolist()))
                ok_h, total_h, gn_h = host["ok"] > 0, host["loss"], host["grad_norm"]
                if pending:
                    self._settle(pending, host["previous_check"], epoch, nonfinite)
                    pending = None
                if host["inputs_finite"] <= 0:     # a fused op's per-row input was NaN / inf: name it
                    self.opt.zero_grad(set_to_none=True)
                    fc.raise_if_bad()
                if world is not None:
                    ok_h = not world.any(not ok_h, "loss check")     # one flag reduction per update
                if not ok_h:
                    self.opt.zero_grad(set_to_none=True)
                    raise nonfinite(f"loss became {total_h} at epoch {epoch} (update {u}); weights left unchanged")
                if not math.isfinite(gn_h):
                    self.opt.zero_grad(set_to_none=True)
                    raise nonfinite(f"gradient norm became {gn_h} at epoch {epoch} (update {u}); "
                                    "weights left unchanged")
                why = self.guard.precheck()
                if why is not None:
                    self.opt.zero_grad(set_to_none=True)
                    raise nonfinite(f"the optimizer step at epoch {epoch} (update {u}) cannot be computed with "
                                    f"{self.guard.describe()}: {why}; the last finite weights were kept")
                with annotate("train/optimizer", dev):
                    self.guard.save()
                    self.opt.step()
                # read with the next update's values (or below, after the last update)
                pending = (u, torch.as_tensor(self.guard.count_nonfinite()) if self.sharded else self.guard.nonfinite(),
                           gn_h)
                if u == 0:
                    stats["loss"] = total_h if world is None else self._sum(world, total_h / world.size)
                    stats["grad_norm"] = gn_h
                    if mask is not None:
                        stats["clip_frac"] = host["clip_frac"] if world is None else self._frac(world, mask, total_rows)
                        # on the first update the policy IS the rollout policy: 0 (eager), ~1e-7 compiled
                        if world is None:
                            stats["onpolicy_logratio_absmax"] = host["absmax"]
                        else:
                            stats["onpolicy_logratio_absmax"] = float(world.max(torch.stack(absmax).max(), "stats"))
                elif mask is not None:
                    stats["clip_frac_last"] = host["clip_frac"] if world is None else self._frac(world, mask, total_rows)
                last_clipped = mask
            if pending:     # the last step's check: one read per epoch
                self._settle(pending, float(pending[1]), epoch, nonfinite)
        if self.regions:
            stats["recompiles"] = graphs_compiled() - g0
            stats["compiled_shapes"] = len(self.regions.shapes)
        return stats, last_clipped

    def _settle(self, pending: tuple, bad: float, epoch: int, nonfinite) -> None:
        """The parameter check of the step ``pending = (update, count, grad norm)``, read: a step
        that left a non-finite parameter is undone (weights and optimizer state as before it) and
        the run stops; a good one feeds the EMA (its weights are still the current ones: nothing
        has stepped since)."""
        u, _, gn = pending
        if bad:
            self.guard.restore()
            self.opt.zero_grad(set_to_none=True)
            raise nonfinite(f"the optimizer step at epoch {epoch} (update {u}) made {int(bad)} of "
                            f"{len(self.params)} trained parameter tensors non-finite with "
                            f"{self.guard.describe()} (gradient norm {gn:.3g}); the last finite "
                            "weights and optimizer state were kept")
        if self.ema is not None:
            self.ema.update()

    def _sync(self, skip: bool):
        """No gradient synchronisation inside (an accumulating micro-batch under several ranks)."""
        if not skip:
            return contextlib.nullcontext()
        from . import parallel as PAR

        return PAR.gradient_sync(self.policy, False)

    @staticmethod
    def _sum(world, value: float) -> float:
        return float(world.sum(torch.tensor([value], dtype=torch.float64), "stats"))

    def _frac(self, world, mask: Tensor, total_rows: int | None) -> float:
        """Fraction of rows clipped, over every rank's rows."""
        if world is None:
            return float(mask.float().mean())
        return self._sum(world, float(mask.float().sum())) / float(total_rows)
