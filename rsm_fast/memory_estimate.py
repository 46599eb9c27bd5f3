"""The preflight's memory estimate, from the config alone (split from :mod:`rsm_fast.preflight`,
which compares it with the memory available): the epoch's plan (:func:`plan_counts`, the same
arithmetic as ``engine.plan.compile_plan``), the task's shapes (:func:`task_geometry`; image
models measured on the meta device by :mod:`rsm_fast.memory_profile`) and the bytes a training
epoch and the final evaluation hold at their peaks (:func:`estimate_memory`), with the reward
models a model-backed ``task.reward`` builds on the run's device (:mod:`rsm_fast.rewards.footprint`).
What each term counts is listed in :mod:`rsm_fast.preflight`'s docstring.

The first-order estimators' reward backward (:func:`reward_backward`) differentiates the reward
through the decode: autograd keeps every layer of the decode (measured on the meta device with
grad, :func:`rsm_fast.memory_profile.grad_cost`) and of the reward model (footprint's with-grad
bytes) for each row of a call, ``method.fo_grad_chunk`` rows a call (:func:`fo_grad_rows`).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from .config import GROUPED, RunConfig

EVAL_CHUNK = 1024            # trainer.EVAL_CHUNK: evaluation rows per model call when chunk_size is 0
F32 = 4
PLAN_BYTES_PER_ROW = 34      # src, key, record (int64), noisy, trained (bool), group (int64) per row and step
RECORD_EXTRA = 12            # log_prob (float32) + step (int64) per record
PLAN_RECORD_BYTES = 40       # record_step / group / parent / set (int64) + set sizes per record
DIGITS_ACT_GRAD = 1_320_000  # bytes per row the digits UNet's training forward saves (measured: 1.29 MB)
DIGITS_ACT_NOGRAD = 200_000  # bytes per row of a no-grad digits UNet call (largest block output 48 KB, x4)
FIRST_ORDER = ("fo_terminal", "fo_current", "fo_lookahead")   # the estimators with a reward backward


# ----------------------------------------------------------------------------------------------
# the task's shapes, from the config alone
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskGeometry:
    """What the memory estimate needs to know about the task, read without loading a model."""

    latent_shape: tuple[int, ...]
    sde_mask: tuple[bool, ...] | None     # noisy steps of the sampler (None: unknown, taken as all)
    sampler: str                          # 'ddim' (noise from task.eta) or 'flow' (task.noise_level)
    cfg_guidance: bool                    # model calls take two rows per row
    default_eval: int                     # evaluation samples when task.eval_samples is 0
    image_bytes: int                      # one decoded sample, float32
    param_bytes: int = 0                  # trained parameters (0: not known before the model loads)
    act_nograd: int = 0                   # bytes per row of a no-grad model call, beyond in/out
    act_grad: int = 0                     # bytes per row the training forward keeps for backward
    full_copy_bytes: int = 0              # a frozen reference copy (full fine-tuning)
    metric_bytes: int = 0                 # per evaluation sample, the task's own metrics
    param_elem: int = F32                 # bytes per trained parameter (its dtype)
    act_fixed: int = 0                    # the training forward's bytes independent of the rows
    frozen_bytes: int = 0                 # frozen weights resident on the device (LoRA base, VAE, text)
    text_bytes: int = 0                   # text encoders loaded at start to fill the cache, then freed
    offload_bytes: int = 0                # frozen parts kept on the host (task.offload=cpu)
    visit_bytes: int = 0                  # the largest of them, on the device while it runs
    decode_fixed: int = 0                 # the VAE decode of the final samples: fixed + per image
    decode_row: int = 0
    decode_grad_fixed: int = 0            # the decode with grad + backward (first-order reward backward)
    decode_grad_row: int = 0

    @property
    def latent_bytes(self) -> int:
        return math.prod(self.latent_shape) * F32


def _diffusers_family(spec: str) -> tuple[str, dict, dict, dict] | None:
    """``(family, denoiser config, vae config, scheduler config)`` of a named config or a local
    folder's JSON files; None when they cannot be read (the task's own load reports it)."""
    from .models.configs import CONFIGS, get_config

    try:
        if spec in CONFIGS and not Path(spec).exists():
            family, c = get_config(spec)
            return family, c.get("unet") or c.get("transformer") or {}, c.get("vae", {}), c.get("scheduler", {})
        p = Path(spec)
        cls = json.loads((p / "model_index.json").read_text(encoding="utf-8")).get("_class_name", "")
        family = {"StableDiffusionPipeline": "sd15", "StableDiffusion3Pipeline": "sd3"}.get(cls)
        if family is None:
            return None
        den = p / ("unet" if family == "sd15" else "transformer") / "config.json"
        read = lambda f: json.loads(f.read_text(encoding="utf-8")) if f.is_file() else {}  # noqa: E731
        return family, read(den), read(p / "vae" / "config.json"), read(p / "scheduler" / "scheduler_config.json")
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def task_geometry(cfg: RunConfig) -> TaskGeometry | None:
    """The task's latent shape, noisy steps, guidance and default evaluation size from the config
    alone (the 2-D task and digits build their sampler tables, which is arithmetic on ``N``
    numbers; a diffusers model's are read from its named config or its folder's JSON). None when
    the task cannot be described without loading it."""
    t, N = cfg.task, cfg.task.num_steps
    if t.name == "toy2d":
        from .tasks.toy2d import Toy2D, Toy2DConfig

        tr = Toy2D(Toy2DConfig(alpha=max(t.alpha, 1e-30), num_steps=N, eta=t.eta)).transition
        pc = cfg.policy
        h, layers, e = pc.hidden, pc.layers, pc.emb_dim
        params = (2 + e) * h + h + (layers - 1) * (h * h + h) + 2 * h + 2
        return TaskGeometry((2,), tuple(bool(v) for v in tr.sde_mask), "ddim", False, 8192, 2 * F32,
                            param_bytes=params * F32, act_nograd=F32 * (2 + e + 2 * h + 48),
                            act_grad=F32 * (2 + e + 2 * h * layers + 48),
                            metric_bytes=4 * 256 * 8)   # sliced Wasserstein: [n, 256] float64 projections, sorted
    if t.name in ("digits-ddim", "digits-flow"):
        from .tasks import digits as D

        family = "ddim" if t.name == "digits-ddim" else "flow"
        tr = D.make_transition(family, N, eta=t.eta, noise_level=t.noise_level)
        guided = t.condition == "label" and t.cfg_scale != 0
        full = 177_553 * F32 if cfg.policy.lora_rank == 0 else 0
        return TaskGeometry(tuple(D.Digits.latent_shape), tuple(bool(v) for v in tr.sde_mask),
                            "ddim" if family == "ddim" else "flow", guided, 1024, D.SIZE * D.SIZE * F32,
                            param_bytes=full, act_nograd=DIGITS_ACT_NOGRAD, act_grad=DIGITS_ACT_GRAD,
                            full_copy_bytes=full)
    if t.name == "diffusers":
        info = _diffusers_family(t.model)
        if info is None:
            return None
        family, den, vae, _ = info
        try:
            f = 2 ** (len(vae.get("block_out_channels", (0,))) - 1)
            res = t.resolution or int(den["sample_size"]) * f
            shape = (int(den["in_channels"]), res // f, res // f)
        except (KeyError, TypeError, ValueError):
            return None
        noisy = (t.eta > 0) if family == "sd15" else (t.noise_level > 0)
        return TaskGeometry(shape, (noisy,) * N, "ddim" if family == "sd15" else "flow", t.cfg_scale != 0, 16,
                            3 * res * res * F32)
    return None


# ----------------------------------------------------------------------------------------------
# the plan's size, from the config alone
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlanCounts:
    rows: tuple[int, ...]        # R_0 .. R_N: rows entering each step, then the final samples
    records: int                 # training records M

    @property
    def row_steps(self) -> int:
        return sum(self.rows[1:])


def _branching(cfg: RunConfig, N: int) -> list[int]:
    from .engine.profiles import resolve_profile

    ro = cfg.rollout
    k = list(resolve_profile(ro.profile, N)) if ro.profile else list(ro.k)
    return k + [0] * (N - len(k))


def plan_counts(cfg: RunConfig, sde_mask: tuple[bool, ...] | None = None, *, budgeted: bool = True) -> PlanCounts:
    """Rows per step and records of the training plan ``training_plan.plan_spec(cfg, ...)`` compiles,
    computed with Python ints (no tensor; any size). ``sde_mask`` defaults to every step noisy.
    With ``rollout.allocator=online`` in branch units and a budget, the profile is scaled to spend
    the budget (what later epochs run); ``budgeted=False`` gives the starting profile."""
    tc, mc, ro, N = cfg.train, cfg.method, cfg.rollout, cfg.task.num_steps
    noisy = list(sde_mask) if sde_mask is not None else [True] * N
    G = mc.group_size if mc.estimator in GROUPED and mc.group_size else tc.batch_size
    T = (tc.batch_size // G) * G
    if mc.estimator == "forward":     # final samples only, then S forward-process rows per sample
        S = int(N * mc.fp_fraction) if mc.fp_loss == "nft" else mc.fp_timesteps
        return PlanCounts((T,) * (N + 1), T * S)
    if ro.plan == "sde":
        stoch = [i for i, v in enumerate(noisy) if v]
        n = min(len(stoch), max(1, int(tc.timestep_fraction * len(stoch)))) if stoch else 0
        if ro.window:
            n = min(ro.window, n)
        return PlanCounts((T,) * (N + 1), T * n)
    k = _branching(cfg, N)
    if ro.plan == "tree":
        rows, records = [T], 0
        for i in range(N):
            rows.append(rows[-1] * max(k[i], 1))
            records += rows[-1] if noisy[i] else 0
        return PlanCounts(tuple(rows), records)
    if budgeted and ro.allocator and ro.alloc_units == "branches" and ro.alloc_budget > sum(k) > 0:
        scale = ro.alloc_budget / sum(k)
        k = [math.ceil(v * scale) for v in k]
    last = max((i for i, v in enumerate(k) if v > 0), default=-1)
    rows, trunks, records = [T], T, 0
    for i in range(N):
        cont = int(i < last)
        rows.append(trunks * (cont + k[i]) + rows[-1] - trunks)
        records += trunks * k[i]
        trunks *= cont
    return PlanCounts(tuple(rows), records)


def eval_counts(n: int, sde_mask: tuple[bool, ...]) -> PlanCounts:
    """The final evaluation's plan: ``n`` SDE trajectories, every noisy step a record."""
    return PlanCounts((n,) * (len(sde_mask) + 1), n * sum(bool(v) for v in sde_mask))


# ----------------------------------------------------------------------------------------------
# the estimate
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryEstimate:
    train: dict            # part -> bytes of one training epoch at its peak
    eval: dict             # part -> bytes of the final evaluation at its peak
    params: int            # trained parameters and what the optimizer keeps of them
    host_plan: int         # host bytes while the larger plan is compiled (on CUDA too)
    param_field: str = "policy.hidden"   # the setting that sizes the trained parameters
    weights: int = 0       # frozen weights resident on the device (image models)
    start: int = 0         # the text encoders at start (filling the cache), before training
    host_extra: int = 0    # parts kept in host memory (task.offload=cpu)
    model_field: str = ""  # the setting to change when the model alone does not fit ('' = param_field)
    start_field: str = "task.t5"   # ... when the start's text encoders do not fit
    decode_field: str = "task.vae_slicing"   # ... when decoding the final samples does not fit
    reward_weights: int = 0        # reward models resident on the device for the whole run
    reward_field: str = "task.reward"   # ... when the reward models do not fit beside the run
    backward_field: str = "method.fo_grad_chunk"   # ... when the first-order reward backward does not fit

    @staticmethod
    def phase_total(part: dict) -> int:
        """Plan + records + record copies, plus the largest of the model calls (rollout, reference;
        with a reward scored on a worker thread while the next wave samples, that scoring too),
        the training forward's activations, the VAE decode, the reward's scoring call and the
        first-order reward backward (they do not overlap: the backward runs after the rollout's
        calls and the no-grad scoring have freed their activations, before the training forward)."""
        return (part["plan"] + part["records"] + part["record copies"] + part.get("task metrics", 0)
                + part.get("rollout graphs", 0) + max(part["model calls"] + part.get("reward scoring during rollout", 0),
                      part.get("training activations", 0), part.get("decode", 0), part.get("reward scoring", 0),
                      part.get("reward backward", 0)))

    @property
    def total(self) -> int:
        return (self.params + self.weights + self.reward_weights
                + max(self.phase_total(self.train), self.phase_total(self.eval), self.start))

    def setting(self, available: int | None = None) -> str:
        """The config field to change: the reward's (``task.reward``) when its models alone do
        not fit, or when the run fits without them and they outweigh what the batch holds; the
        model's (trained parameters, optimizer state, frozen weights) when they alone do not fit;
        the text encoders' when only the start does not fit; the size itself
        (``train.batch_size`` / ``task.eval_samples``) when the records do not fit or neither of
        the terms below alone is the problem (the reward scores all final samples at once);
        else the rows per training forward (``train.grad_accum``), per model call
        (``rollout.chunk_size``), per decode (``task.vae_slicing``) or per first-order reward
        backward (``method.fo_grad_chunk``: its rows bound both the decode's and the reward
        model's kept layers, which VAE slicing does not lower, since autograd keeps every slice's;
        ``method.estimator`` when one row a call already does not fit)."""
        tr, ev = self.phase_total(self.train), self.phase_total(self.eval)
        model, rw = self.params + self.weights, self.reward_weights
        if available is not None and rw > available and rw >= model:
            return self.reward_field
        if available is not None and (model > available or (model > available // 2 and model > max(tr, ev))):
            return self.model_field or self.param_field
        if available is not None and rw and self.total - rw <= available and rw >= max(tr, ev):
            return self.reward_field
        model += rw
        if available is not None and model + max(tr, ev) <= available < model + self.start:
            return self.start_field
        part = self.eval if ev > tr else self.train
        size = "task.eval_samples" if ev > tr else "train.batch_size"
        base = model + part["plan"] + part["records"] + part["record copies"] + part.get("task metrics", 0)
        graphs = part.get("rollout graphs", 0)
        base += graphs
        calls = part["model calls"] + part.get("reward scoring during rollout", 0)
        act, dec, rew = part.get("training activations", 0), part.get("decode", 0), part.get("reward scoring", 0)
        bwd = part.get("reward backward", 0)
        if available is not None and graphs and base > available >= base - graphs:
            return "train.fused_epoch"
        if available is None or base > available:
            return size
        if base + max(calls, dec, rew, bwd) <= available < base + act:
            return "train.grad_accum"
        if base + max(act, dec, rew, bwd) <= available < base + calls:
            return "rollout.chunk_size"
        if base + max(act, calls, rew, bwd) <= available < base + dec:
            return self.decode_field
        if base + max(act, calls, dec, rew) <= available < base + bwd:
            return self.backward_field
        return size


def _phase(rows: tuple[int, ...], records: int, chunk: int, g: int, geo: TaskGeometry, *,
           train_rows: int = 0, decoded: int = 0) -> dict:
    """One phase's parts (training epoch or evaluation); ``decoded``: bytes per decoded sample."""
    L = geo.latent_bytes
    N = len(rows) - 1
    plan = sum(rows[1:]) * PLAN_BYTES_PER_ROW + 2 * N * rows[-1] * 8 + records * PLAN_RECORD_BYTES
    per_call = 2 * L + geo.act_nograd
    calls = 0
    for i in range(N):     # sampler state of step i, then one model call of `chunk` rows (x g)
        c = min(chunk or rows[i], rows[i])
        calls = max(calls, (2 * rows[i] + 4 * rows[i + 1]) * L + g * c * per_call)
    if records:            # the reference pass over the records, `chunk` rows a call
        calls = max(calls, g * min(chunk or records, records) * per_call)
    out = {"plan": plan, "records": records * (4 * L + RECORD_EXTRA), "record copies": 3 * records * L,
           "model calls": max(calls, decoded * rows[-1])}
    if geo.decode_row or geo.decode_fixed:      # the VAE decode of every final sample at once
        out["decode"] = decoded * rows[-1] + geo.decode_fixed + rows[-1] * geo.decode_row
    if train_rows:
        out["training activations"] = g * train_rows * geo.act_grad + geo.act_fixed
    return out


def _per_rank(cfg: RunConfig, world_size: int, default_eval: int) -> RunConfig:
    """The share of one rank of ``world_size``: whole groups of the batch, evaluation samples split."""
    if world_size <= 1:
        return cfg
    import copy

    c = copy.deepcopy(cfg)
    mc, tc = cfg.method, cfg.train
    G = mc.group_size if mc.estimator in GROUPED and mc.group_size else tc.batch_size
    c.train.batch_size = math.ceil(tc.batch_size // G / world_size) * G
    c.task.eval_samples = math.ceil((cfg.task.eval_samples or default_eval) / world_size)
    return c


def fo_grad_rows(cfg: RunConfig, samples: int, records: int) -> int:
    """Rows per decode + reward backward of a first-order run (0 for the other estimators and for
    fo_value=exact, which differentiates no reward): ``method.fo_grad_chunk``, else
    ``rollout.chunk_size``, else all of them -- the final samples (fo_terminal:
    ``Trainer._reward_grad``; fo_value=path: ``_fo_path_tail``) or the records (fo_current,
    fo_lookahead: ``estimators.tweedie_reward_grad``)."""
    mc = cfg.method
    if mc.estimator not in FIRST_ORDER or mc.fo_value == "exact":
        return 0
    n = samples if mc.estimator == "fo_terminal" or mc.fo_value == "path" else records
    c = mc.fo_grad_chunk or cfg.rollout.chunk_size
    return min(c, n) if c > 0 else n


def reward_backward(cfg: RunConfig, geo: TaskGeometry, fp, k: int, g: int) -> int:
    """The first-order reward backward at its peak, ``k`` rows a call (:func:`fo_grad_rows`): the
    decode with grad (``geo.decode_grad_*``) and the reward models' with-grad bytes
    (``fp.backward``); the built-in analytic reward (``linear``: ``task.reward_grad``) decodes
    and keeps nothing. With fo_value=path the call runs at the end of the path's tail, whose
    deterministic last steps keep the policy's graph of the ``k`` rows (``_fo_path_tail``), and
    the adjoint sweep after it calls the policy with grad on ``k`` rows at a time
    (``_fo_sweep_step``; under train.fused_epoch it reuses the rollout's graphs, counted there)."""
    if k <= 0:
        return 0
    call = 0 if _reward_spec(cfg.task).strip() == "linear" else (
        k * geo.decode_grad_row + geo.decode_grad_fixed + fp.backward(k))
    if cfg.method.fo_value != "path":
        return call
    mask = geo.sde_mask if geo.sde_mask is not None else (True,) * cfg.task.num_steps
    tail = len(mask) - 1 - max((i for i, v in enumerate(mask) if v), default=-1)
    graph = g * k * geo.act_grad                       # one with-grad policy call of k rows
    sweep = 0 if cfg.train.fused_epoch else graph + geo.act_fixed
    return max(call + (tail * graph + geo.act_fixed if tail else 0), sweep)


def _reward_spec(t) -> str:
    """The reward the trainer scores with: ``task.reward``, else the task's default
    (:func:`rsm_fast.cost.default_reward`)."""
    from .cost import default_reward

    return t.reward or default_reward(t)


def _reward_parts(cfg: RunConfig, geo: TaskGeometry, train: dict, ev: dict, rows: int, n: int, device,
                  fo_rows: int = 0) -> int:
    """Adds the reward's scoring call to the training (``rows`` final samples) and evaluation
    (``n``) parts; returns the bytes its models keep on ``device`` (:mod:`rsm_fast.rewards.footprint`).
    The trainer scores every final sample of the epoch (of the rank) in one call; a zeroth-order
    run with a reward model and ``rollout.waves`` > 1 scores each wave on a worker thread while
    the next one samples (``trainer.async_reward``): a wave's rows, on top of the model calls.
    A first-order run's reward backward, ``fo_rows`` rows a call (:func:`reward_backward`), is a
    training part of its own."""
    from .rewards.footprint import reward_footprint

    t = cfg.task
    spec = _reward_spec(t)
    fp = reward_footprint(spec, t.name, cfg.train.device if device is None else device)
    backward = reward_backward(cfg, geo, fp, fo_rows, 2 if geo.cfg_guidance else 1)
    if backward:
        train["reward backward"] = backward
    waves = cfg.rollout.waves if cfg.method.estimator == "zo" and spec.strip() != "linear" else 1
    if waves > 1 and fp.act_row:
        train["reward scoring during rollout"] = fp.scoring(math.ceil(rows / waves), geo.image_bytes)
    elif fp.act_row:
        train["reward scoring"] = fp.scoring(rows, geo.image_bytes)
    if fp.act_row:
        ev["reward scoring"] = fp.scoring(n, geo.image_bytes)
    return fp.weights


def estimate_memory(cfg: RunConfig, geo: TaskGeometry, *, world_size: int = 1,
                    sharded: bool | None = None, device=None) -> MemoryEstimate:
    """The bytes one rank holds at its peak (module docstring), by phase and part. ``world_size``:
    ranks sharing the run (whole groups per rank); ``sharded`` (default: ``train.parallel=fsdp``
    on several ranks) divides the denoiser's weights, trained state and reference copy by it.
    ``device`` (default ``train.device``): where the run, and so its reward models
    (``rewards.device``: ``task.device``), live; it sets their precision."""
    N = max(1, int(world_size))
    sharded = (cfg.train.parallel == "fsdp" and N > 1) if sharded is None else bool(sharded)
    cfg = _per_rank(cfg, N, geo.default_eval)
    g = 2 if geo.cfg_guidance else 1
    mask = geo.sde_mask if geo.sde_mask is not None else (True,) * cfg.task.num_steps
    tp = plan_counts(cfg, mask)
    fused = cfg.train.fused_epoch      # (refused with method.estimator=forward by the config check)
    train = _phase(tp.rows, tp.records, cfg.rollout.chunk_size, g, geo,
                   train_rows=0 if fused else math.ceil(tp.records / max(1, cfg.train.grad_accum)),
                   decoded=2 * geo.image_bytes)
    if fused:   # rsm_fast/fused_path.py: every record's policy and reference graph, rollout to first backward
        train["rollout graphs"] = 2 * g * tp.records * geo.act_grad + geo.act_fixed
    n = cfg.task.eval_samples or geo.default_eval
    ep = eval_counts(n, mask)
    ev = _phase(ep.rows, ep.records, cfg.rollout.chunk_size or min(n, EVAL_CHUNK), g, geo, decoded=2 * geo.image_bytes)
    if geo.metric_bytes:
        ev["task metrics"] = n * geo.metric_bytes
    fo_rows = fo_grad_rows(cfg, tp.rows[-1], tp.records)
    reward = _reward_parts(cfg, geo, train, ev, tp.rows[-1], ep.rows[-1], device, fo_rows)
    tc = cfg.train
    elems = geo.param_bytes // max(1, geo.param_elem)
    optim = 2 * elems if tc.optimizer == "adamw8bit" else 2 * geo.param_bytes   # two 8-bit states / two moments
    ema = elems * F32 if tc.ema_decay > 0 else 0                                 # train_step.EMA: fp32 shadows
    ema += 2 * geo.param_bytes if cfg.method.estimator == "forward" else 0       # old / EMA shadow + its swap copy
    trained = 3 * geo.param_bytes + optim + ema        # parameter, gradient, guard snapshot
    if N > 1 and not sharded:
        trained += geo.param_bytes                     # DDP's gradient buckets
    share = N if sharded else 1
    params = math.ceil(trained / share) + math.ceil(geo.full_copy_bytes / share)
    host = max(train["plan"], ev["plan"]) + 2 * max(tp.rows[-1], ep.rows[-1]) * len(mask) * 8
    return MemoryEstimate(train, ev, params, host, "policy.hidden" if cfg.task.name == "toy2d" else "policy.lora_rank",
                          weights=geo.frozen_bytes + geo.visit_bytes, start=geo.text_bytes,
                          host_extra=geo.offload_bytes, reward_weights=reward,
                          backward_field="method.fo_grad_chunk" if fo_rows > 1 else "method.estimator", **_fields(cfg))


def _fields(cfg: RunConfig) -> dict:
    """The settings the one-line advice names for an image model (``setting``)."""
    pc, t = cfg.policy, cfg.task
    if cfg.task.name == "toy2d":
        return {}
    if pc.dtype == "fp32":
        model = "policy.dtype"
    elif pc.lora_rank == 0:
        model = "policy.lora_rank"
    elif t.name == "diffusers" and not t.offload:
        model = "task.offload"
    else:
        model = "policy.lora_rank"
    start = "task.t5" if t.t5 and _family(t) == "sd3" else "policy.dtype" if pc.dtype == "fp32" else "task.text_cache"
    return {"model_field": model, "start_field": start,
            "decode_field": "task.vae_tiling" if t.vae_slicing else "task.vae_slicing"}


def _family(t) -> str | None:
    info = _diffusers_family(t.model) if t.name == "diffusers" else None
    return None if info is None else info[0]


