"""Validation of a :class:`~rsm_fast.config.RunConfig`: each field's range, then the checks across
fields. Every failure is a one-line :class:`~rsm_fast.config.ConfigError` naming the field.

Ranges (:data:`RANGES`). Every number has one. Floats are finite (the coercion refuses NaN and
+-inf before they get here; this module checks again for configs built in code) and within
float32, the dtype they meet tensors in (``train.lr`` and ``train.weight_decay`` excepted: a huge
one is reported by the optimizer-step guard, ``train_step.StepGuard``); the noise scales
``task.eta`` / ``task.noise_level`` are 0 or in [1e-6, 100] (a tiny positive one overflows the
sampler's weights) and the loss coefficients (``method.kl_coef``, ``fo_c1_scale``,
``fo_reward_scale``, ``trust_c2``, ``trust_eps``) at most 1e12 in size. Integers are
bounded where the machine bounds them: ``train.seed`` in [0, 2**63 - 1] (``torch.manual_seed``
takes [-2**63, 2**64 - 1] and the evaluation seeds ``seed + 1_000_003``), ``train.threads`` at most
``os.cpu_count()`` (100000 threads crash OpenMP; more threads than cores only spin), sizes and
counts at most 2**31 - 1 (``int32``), network widths at most 65536 and ``task.num_steps`` at most
the 1000 training timesteps of the digits and diffusers schedules (500 for the 2-D task). A
training plan of more than 2**40 rows (a deep ``tree``) is refused here: its index tensors could
not be built on any machine; the realistic range is left to :func:`rsm_fast.preflight.check_memory`.

Precision and memory keys (issue 18): ``policy.dtype`` / ``autocast`` / ``gradient_checkpointing`` /
``attention`` act on the image models (digits, diffusers); the 2-D task's MLP refuses values other
than their defaults. ``task.text_cache`` / ``t5`` / ``vae_slicing`` / ``vae_tiling`` / ``offload``
act on the diffusers task only and are refused elsewhere. ``policy.attention=xformers`` needs the
xformers package and ``train.optimizer=adamw8bit`` bitsandbytes and a CUDA device; both are
checked here, before a model loads. A full fine-tune in fp16 is refused: it trains the fp16 weights
themselves, with no loss scaling or fp32 master copy, and AdamW's eps underflows in float16.

Strings hold no NUL character and no unpaired surrogate (a non-UTF-8 byte in ``argv``), which no
file name, device or YAML writer takes; ``task.reward_auth`` may be any string. ``train.device``
is parsed by ``torch.device`` and must be usable here (cpu, cuda when CUDA is available, mps when
MPS is), so a wrong device fails before anything is written.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Any

from .config import _CHOICES, GROUPED, ConfigError, RunConfig, _coerce, _field_types

INT32_MAX = 2**31 - 1
SEED_MAX = 2**63 - 1
WIDTH_MAX = 65536
MAX_STEPS = 1000
MAX_PLAN_ROWS = 2**40
TIMEOUT_MAX = 1e9            # seconds (~31 years); threading's TIMEOUT_MAX is ~9.2e9
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Every other float stays inside float32 (the rollout's and the losses' dtype): a larger value can
# only overflow when it meets a tensor (``value cannot be converted to type float``). train.lr and
# train.weight_decay are exempt: the optimizer-step guard (train_step.StepGuard) reports them.
FLOAT32_MAX = 3.4028234663852886e38
UNBOUNDED_FLOATS = ("train.lr", "train.weight_decay")
# noise scales: 0 is "deterministic" (refused when nothing is left to train); a tiny positive one
# makes the sampler's native weight omega = (c1 - c2) / sigma overflow float32
NOISE_MIN, NOISE_MAX = 1e-6, 100.0
# loss coefficients multiply per-row weights that are themselves large at low noise: past 1e12 their
# product leaves float32 before the loss is formed (the fused ops refuse non-finite row weights)
COEF_MAX = 1e12


@dataclass(frozen=True)
class Range:
    lo: float | None = None          # None: no bound
    hi: float | None = None
    lo_open: bool = False            # lo itself excluded
    hi_open: bool = False

    def ok(self, v: float) -> bool:
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return not (self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi))

    def text(self) -> str:
        if self.hi is None:
            return "positive" if (self.lo == 0 and self.lo_open) else f">= {_num(self.lo)}"
        return f"in {'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}{')' if self.hi_open else ']'}"


def _num(v) -> str:
    return f"{v:,}" if isinstance(v, int) and abs(v) >= 100_000 else f"{v:g}" if isinstance(v, float) else str(v)


POS = Range(0, None, lo_open=True)
NONNEG = Range(0, None)
UNIT = Range(0.0, 1.0)


def _count(lo: int, hi: int = INT32_MAX) -> Range:
    return Range(lo, hi)


RANGES: dict[str, Range] = {
    # task
    "task.resolution": _count(0, 16384), "task.cfg_scale": NONNEG, "task.noise_level": Range(0.0, NOISE_MAX),
    "task.alpha": POS, "task.num_steps": _count(1, MAX_STEPS), "task.eta": Range(0.0, NOISE_MAX),
    "task.eval_samples": _count(0),
    "task.reward_timeout": Range(0.0, TIMEOUT_MAX), "task.reward_retries": _count(0, 100),
    "task.reward_max_mb": Range(0.0, float(2**20), lo_open=True),
    # policy
    "policy.hidden": _count(1, WIDTH_MAX), "policy.layers": _count(1, 1024), "policy.emb_dim": _count(2, WIDTH_MAX),
    "policy.lora_rank": _count(0, WIDTH_MAX), "policy.lora_alpha": NONNEG,
    # method
    "method.adv_clip": NONNEG, "method.group_size": _count(0), "method.clip_eps": NONNEG,
    "method.kl_coef": Range(0.0, COEF_MAX), "method.fo_c1_scale": Range(0.0, COEF_MAX, lo_open=True),
    "method.fo_discount": POS, "method.fo_reward_scale": Range(-COEF_MAX, COEF_MAX),
    "method.fo_grad_chunk": _count(0), "method.trust_c2": Range(0.0, COEF_MAX), "method.trust_eps": Range(0.0, COEF_MAX),
    "method.fp_beta": Range(0.0, COEF_MAX, lo_open=True), "method.fp_kl": Range(0.0, COEF_MAX),
    "method.fp_ema_kl": Range(0.0, COEF_MAX), "method.fp_power": Range(0.0, 16.0, lo_open=True),
    "method.fp_clip": Range(0.0, COEF_MAX, lo_open=True), "method.fp_timesteps": _count(1, MAX_STEPS),
    "method.fp_fraction": Range(0.0, 1.0, lo_open=True),
    # rollout
    "rollout.window": _count(0, MAX_STEPS), "rollout.window_every": _count(1), "rollout.window_stride": _count(1),
    "rollout.chunk_size": _count(0), "rollout.truncate": _count(-1, MAX_STEPS), "rollout.waves": _count(1), "rollout.alloc_budget": NONNEG,
    "rollout.alloc_k_min": _count(1, WIDTH_MAX), "rollout.alloc_k_max": _count(0, WIDTH_MAX),
    "rollout.alloc_every": _count(1), "rollout.alloc_max_step": _count(0), "rollout.alloc_patience": _count(0),
    "rollout.alloc_clip_tau": UNIT, "rollout.alloc_snr_min": NONNEG, "rollout.alloc_ema": Range(0.0, 1.0, hi_open=True),
    # train
    "train.epochs": _count(1), "train.batch_size": _count(1), "train.inner_updates": _count(1), "train.lr": POS,
    "train.lr_final_frac": UNIT, "train.weight_decay": NONNEG, "train.max_grad_norm": NONNEG,
    "train.timestep_fraction": Range(0.0, 1.0, lo_open=True), "train.seed": _count(0, SEED_MAX),
    "train.threads": _count(0),    # hi: os.cpu_count(), at check time
    "train.grad_accum": _count(1), "train.ema_decay": Range(0.0, 1.0, hi_open=True), "train.ema_every": _count(1),
    "train.checkpoint_every": _count(0), "train.keep_checkpoints": _count(1), "train.eval_every": _count(0),
    "train.dist_timeout": Range(1.0, TIMEOUT_MAX),
}
K_RANGE = _count(0, WIDTH_MAX)          # each entry of rollout.k
ANY_STRING = ("task.reward_auth",)


def _range(path: str) -> Range | None:
    if path == "train.threads":
        return _count(0, os.cpu_count() or 1)
    return RANGES.get(path)


def check_field(path: str, value: Any) -> None:
    """One field's own range (no other field involved); ``value`` already has the field's type."""
    if isinstance(value, str):
        _check_text(path, value)
        return
    if isinstance(value, list):
        for v in value:
            if not K_RANGE.ok(v):
                raise ConfigError(f"config field '{path}' entries must be {K_RANGE.text()}, got {v!r}")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"config field '{path}' must be a finite number, got {value!r}")
    if path == "task.cfg_scale" and value == -1:
        return                          # the task's default
    if isinstance(value, float) and path not in UNBOUNDED_FLOATS and abs(value) > FLOAT32_MAX:
        raise ConfigError(f"config field '{path}' must be within float32 range (|x| <= 3.4e+38), got {value:g}")
    if path in ("task.eta", "task.noise_level") and 0 < value < NOISE_MIN:
        raise ConfigError(f"config field '{path}' must be 0 or >= {NOISE_MIN:g} (a smaller noise scale overflows "
                          f"the sampler's weights in float32), got {value:g}")
    r = _range(path)
    if r is not None and not r.ok(value):
        pre = "-1 (the task's default), 0 (off) or " if path == "task.cfg_scale" else ""
        post = (f" (0 = torch's default; at most os.cpu_count() = {os.cpu_count() or 1} on this machine)"
                if path == "train.threads" else "")
        raise ConfigError(f"config field '{path}' must be {pre}{r.text()}{post}, got {_num(value)}")


def _check_text(path: str, value: str) -> None:
    if path in ANY_STRING:
        return
    if "\x00" in value:
        raise ConfigError(f"config field '{path}' must not contain a NUL character, got {value!r}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(f"config field '{path}' is not valid text (a byte that is not UTF-8?), got {value!r}") from None


def _leaves(cfg: RunConfig):
    """``(dotted path, type, value)`` of every leaf field."""
    for sec, typ in _field_types(RunConfig).items():
        obj = getattr(cfg, sec)
        if hasattr(typ, "__dataclass_fields__"):
            for name, t in _field_types(typ).items():
                yield f"{sec}.{name}", t, getattr(obj, name)
        else:
            yield sec, typ, obj


def _get(cfg: RunConfig, path: str) -> Any:
    obj: Any = cfg
    for p in path.split("."):
        obj = getattr(obj, p)
    return obj


# ----------------------------------------------------------------------------------------------
def validate_config(cfg: RunConfig) -> None:
    """Every field's type and range, its choices, then the checks across fields."""
    for path, typ, value in _leaves(cfg):
        if _coerce(path, value, typ) != value:      # (raises for NaN / inf / a wrong type itself)
            raise ConfigError(f"config field '{path}' has the wrong type, got {value!r}")
        check_field(path, value)
    for path, choices in _CHOICES.items():
        v = _get(cfg, path)
        if v not in choices:
            raise ConfigError(f"config field '{path}' must be one of {list(choices)}, got {v!r}")
    _check_task(cfg)
    _check_method(cfg)
    _check_rollout(cfg)
    _check_fused(cfg)
    _check_device(cfg.train.device)
    _check_precision(cfg)
    _check_trains_something(cfg)


def _check_task(cfg: RunConfig) -> None:
    t = cfg.task
    if t.name == "toy2d" and t.num_steps > 500:
        raise ConfigError(f"config field 'task.num_steps' must be <= 500 (the toy's train steps), got {t.num_steps}")
    if t.reward_auth_env and not ENV_NAME.fullmatch(t.reward_auth_env):
        raise ConfigError(f"config field 'task.reward_auth_env' must be an environment variable name "
                          f"([A-Za-z_][A-Za-z0-9_]*) or empty, got {t.reward_auth_env!r}")
    if t.name != "toy2d" and cfg.policy.lora_rank > 0:
        names = [s.strip() for s in cfg.policy.lora_targets.split(",") if s.strip()]
        if not names or any(any(c.isspace() for c in n) for n in names):
            raise ConfigError(f"config field 'policy.lora_targets' must list module names separated by commas "
                              f"(e.g. to_q,to_k,to_v,to_out.0), got {cfg.policy.lora_targets!r}")


def _check_method(cfg: RunConfig) -> None:
    m, tc = cfg.method, cfg.train
    if m.estimator == "forward":
        _check_forward(cfg)
    if m.estimator == "zo" and m.surrogate in ("ratio", "hinge") and m.clip_eps <= 0:
        raise ConfigError("config field 'method.clip_eps' must be positive for the ratio/hinge surrogates")
    if m.estimator == "zo" and m.baseline == "loo" and m.group_size == 1:
        raise ConfigError("config field 'method.group_size' must be >= 2 for the leave-one-out baseline")
    if m.estimator in GROUPED and m.group_size and tc.batch_size % m.group_size:
        raise ConfigError(f"config field 'train.batch_size' ({tc.batch_size}) must be a multiple of "
                          f"'method.group_size' ({m.group_size})")
    if m.estimator == "zo" and m.returns == "soft" and tc.batch_size < 2:
        raise ConfigError("config field 'train.batch_size' must be >= 2 for the soft return baseline")
    if m.estimator == "zo" and m.returns == "soft" and tc.timestep_fraction < 1:
        raise ConfigError("config field 'train.timestep_fraction' must be 1 with method.returns=soft (the soft "
                          "return counts the KL of every noisy step, and only trained steps are recorded)")
    if m.fo_value != "tweedie" and m.estimator != "fo_lookahead":
        raise ConfigError(f"config field 'method.fo_value': {m.fo_value!r} is the value of method.estimator="
                          f"fo_lookahead, got estimator {m.estimator!r}")
    if m.fo_path_rule != "next" and m.fo_value != "path":
        raise ConfigError(f"config field 'method.fo_path_rule': {m.fo_path_rule!r} reads the pathwise gradient of "
                          f"method.fo_value=path, got fo_value {m.fo_value!r}")
    if m.fo_value == "exact" and cfg.task.name != "toy2d":
        raise ConfigError(f"config field 'method.fo_value': 'exact' is the 2-D task's closed-form Psi*, got "
                          f"task.name={cfg.task.name!r}")
    if m.fo_value == "path":                  # fo_lookahead, by the check above
        ro = cfg.rollout
        if ro.plan != "sde" or ro.window or tc.timestep_fraction < 1:
            raise ConfigError("config field 'method.fo_value': 'path' follows each sample's recorded path back from "
                              "its end, so it needs rollout.plan=sde without rollout.window and "
                              f"train.timestep_fraction=1 (got plan={ro.plan}, window={ro.window}, "
                              f"timestep_fraction={tc.timestep_fraction:g})")


def _check_fused(cfg: RunConfig) -> None:
    """train.fused_epoch: the plan must make each trained step's rows its records (rsm_fast/fused_path.py)."""
    ro, tc = cfg.rollout, cfg.train
    if not tc.fused_epoch:
        return
    why = ("method.estimator=forward trains on its own rows, not the rollout's" if cfg.method.estimator == "forward"
           else f"rollout.plan={ro.plan} branches (needs sde)" if ro.plan != "sde"
           else "rollout.window moves the trained steps" if ro.window
           else "rollout.graphs replays the model without autograd" if ro.graphs
           else f"rollout.waves={ro.waves} splits the rollout" if ro.waves > 1
           else f"train.grad_accum={tc.grad_accum} would backpropagate one step's graph twice" if tc.grad_accum > 1
           else "policy.gradient_checkpointing drops the activations it keeps" if cfg.policy.gradient_checkpointing
           else None)
    if why:
        raise ConfigError(f"config field 'train.fused_epoch': {why}")


def _check_rollout(cfg: RunConfig) -> None:
    ro, m, N = cfg.rollout, cfg.method, cfg.task.num_steps
    if ro.plan == "sde" and (ro.k or ro.profile):
        raise ConfigError(f"config field 'rollout.{'k' if ro.k else 'profile'}' is only used by the 'branch' and 'tree' plans")
    if ro.truncate >= 0 and ro.plan != "branch":
        raise ConfigError(f"config field 'rollout.truncate' finishes the children of a 'branch' plan early, got rollout.plan={ro.plan}")
    if ro.allocator and ro.plan != "branch":
        raise ConfigError(f"config field 'rollout.allocator': 'online' re-allocates a 'branch' plan, got rollout.plan={ro.plan}")
    if ro.allocator and m.estimator != "zo":
        raise ConfigError(f"config field 'rollout.allocator': 'online' measures the zeroth-order estimator's sibling "
                          f"variance; method.estimator is {m.estimator!r}")
    if ro.alloc_k_max and ro.alloc_k_max < ro.alloc_k_min:
        raise ConfigError(f"config field 'rollout.alloc_k_max' must be 0 or >= alloc_k_min ({ro.alloc_k_min}), got {ro.alloc_k_max}")
    if ro.window and (ro.plan != "sde" or ro.window > N):
        raise ConfigError(f"config field 'rollout.window' must be <= task.num_steps ({N}) on an sde plan, "
                          f"got {ro.window} with rollout.plan={ro.plan}")
    if ro.profile:
        from .engine.plan import PlanError
        from .engine.profiles import resolve_profile
        if ro.k:
            raise ConfigError("config fields 'rollout.k' and 'rollout.profile' both set: give one")
        try:
            k = resolve_profile(ro.profile, N)
        except PlanError as e:
            raise ConfigError(f"config field {e}") from None
        if any(not K_RANGE.ok(v) for v in k):
            raise ConfigError(f"config field 'rollout.profile' gives K outside {K_RANGE.text()}: {ro.profile!r}")
    elif ro.plan != "sde":
        if len(ro.k) not in (N, N - 1):
            raise ConfigError(f"config field 'rollout.k' must list one K per step ({N} entries) "
                              f"for rollout.plan={ro.plan}, got {len(ro.k)}")
        if any(v < 0 for v in ro.k) or not any(ro.k):
            raise ConfigError(f"config field 'rollout.k' must be >= 0 with at least one branching step, got {ro.k}")
    if ro.plan != "sde" and cfg.train.timestep_fraction < 1:
        raise ConfigError(f"config field 'train.timestep_fraction' ({cfg.train.timestep_fraction:g}) applies to "
                          "rollout.plan=sde only; a branching plan trains its branching steps (set it to 1; a "
                          "preset's per-task section may have set it)")


PRECISION_DEFAULTS = {"policy.dtype": "fp32", "policy.autocast": "", "policy.gradient_checkpointing": False,
                      "policy.attention": "sdpa"}
DIFFUSERS_ONLY = {"task.text_cache": "", "task.t5": True, "task.vae_slicing": False, "task.vae_tiling": False,
                  "task.offload": "", "policy.train_text_encoder": False}


def _check_precision(cfg: RunConfig) -> None:
    """The precision and memory keys against the task, the installed packages and the device."""
    import importlib.util

    import torch

    name = cfg.task.name
    if name == "toy2d":
        for path, default in PRECISION_DEFAULTS.items():
            if _get(cfg, path) != default:
                raise ConfigError(f"config field '{path}' applies to the image models (task.name digits-ddim, "
                                  f"digits-flow, diffusers); the 2-D task's MLP runs in float32 with its defaults, "
                                  f"got {_get(cfg, path)!r}")
    if name != "diffusers":
        for path, default in DIFFUSERS_ONLY.items():
            if _get(cfg, path) != default:
                raise ConfigError(f"config field '{path}' applies to task.name=diffusers only (task.name is "
                                  f"{name!r}), got {_get(cfg, path)!r}")
    if cfg.policy.dtype == "fp16" and cfg.policy.lora_rank == 0 and name != "toy2d":
        raise ConfigError("config field 'policy.dtype' is 'fp16' with policy.lora_rank=0: a full fine-tune trains the "
                          "weights in their dtype, and AdamW's eps (1e-8) underflows in float16 (the first step makes "
                          "them non-finite); use policy.dtype=bf16, or a LoRA (fp32) on the fp16 model")
    if cfg.policy.train_text_encoder:
        _check_text_lora(cfg)
    if cfg.policy.attention == "xformers" and importlib.util.find_spec("xformers") is None:
        raise ConfigError("config field 'policy.attention' is 'xformers' but the xformers package is not installed; "
                          "use policy.attention=sdpa (torch's scaled_dot_product_attention)")
    if cfg.train.optimizer == "adamw8bit":
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError("config field 'train.optimizer' is 'adamw8bit' but bitsandbytes is not installed "
                              "(pip install bitsandbytes, CUDA only); use train.optimizer=adamw")
        if torch.device(cfg.train.device).type != "cuda":
            raise ConfigError(f"config field 'train.optimizer' is 'adamw8bit' (bitsandbytes AdamW8bit, CUDA only) "
                              f"but train.device is {cfg.train.device!r}; use train.optimizer=adamw")


def _check_forward(cfg: RunConfig) -> None:
    """method.estimator=forward (DiffusionNFT / AWM): deterministic solver rollouts of K = 1 samples."""
    m, r = cfg.method, cfg.rollout
    if r.plan != "sde" or r.window or r.allocator:
        raise ConfigError("config field 'method.estimator' is 'forward': its rollouts are deterministic solver runs "
                          "that keep only the final samples; rollout.plan must be 'sde' (K = 1 rows), with no "
                          "rollout.window and no rollout.allocator")
    if m.returns == "soft":
        raise ConfigError("config field 'method.returns' must be 'hard' with method.estimator=forward (no trajectory KL)")
    if m.group_size < 2 and m.group_size != 0:
        raise ConfigError("config field 'method.group_size' must be >= 2 (or 0) with method.estimator=forward: "
                          "advantages are centred per prompt group")
    if m.fp_loss == "nft" and int(m.fp_fraction * cfg.task.num_steps) < 1:
        raise ConfigError(f"config field 'method.fp_fraction' ({m.fp_fraction}) trains floor(fraction * "
                          f"task.num_steps) = 0 timesteps; raise it or task.num_steps")
    if m.fp_loss == "awm" and int(m.fp_fraction * cfg.task.num_steps) < 2:
        raise ConfigError(f"config field 'method.fp_fraction' ({m.fp_fraction}) leaves AWM no stratum after the "
                          f"first step (floor(fraction * task.num_steps) must be >= 2)")
    if cfg.train.parallel == "fsdp":
        raise ConfigError("config field 'train.parallel' must be 'ddp' with method.estimator=forward (its shadow "
                          "weights are not sharded yet)")
    if r.waves > 1:
        raise ConfigError("config field 'rollout.waves' must be 1 with method.estimator=forward (its rollout is "
                          "scored after sampling; wave overlap is not built for it yet)")


def _check_text_lora(cfg: RunConfig) -> None:
    """``policy.train_text_encoder``: a LoRA run, replicated (DDP) not sharded, eager rollouts."""
    pc = cfg.policy
    if pc.lora_rank == 0:
        raise ConfigError("config field 'policy.train_text_encoder' needs a LoRA (policy.lora_rank > 0): the text "
                          "encoders' LoRA shares the denoiser's gate, which is how the reference turns every LoRA off")
    if cfg.train.parallel == "fsdp":
        raise ConfigError("config field 'policy.train_text_encoder' trains LoRAs, which train.parallel=ddp replicates; "
                          "FSDP2 (train.parallel=fsdp) is for full fine-tuning")
    if cfg.rollout.graphs:
        raise ConfigError("config field 'rollout.graphs' must be false with policy.train_text_encoder: the prompts "
                          "are encoded by the trained text encoders inside every model call (host-side lookups a "
                          "CUDA graph cannot replay)")
    names = [s.strip() for s in pc.text_lora_targets.split(",") if s.strip()]
    if not names or any(any(c.isspace() for c in n) for n in names):
        raise ConfigError(f"config field 'policy.text_lora_targets' must list module names separated by commas "
                          f"(e.g. q_proj,k_proj,v_proj,out_proj), got {pc.text_lora_targets!r}")


def _check_device(text: str) -> None:
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(f"config field 'train.device': {text!r} is not a torch device (use cpu, cuda or cuda:N)") from None
    if dev.type == "cpu":
        if dev.index not in (None, 0):
            raise ConfigError(f"config field 'train.device': {text!r}: the CPU device has no index (use cpu)")
    elif dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            raise ConfigError(f"config field 'train.device' is {text!r} but {why} (torch {torch.__version__}); "
                              f"use train.device=cpu")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise ConfigError(f"config field 'train.device' is {text!r} but this machine has {n} CUDA device(s) "
                              f"(cuda:0..cuda:{n - 1})")
    elif dev.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ConfigError(f"config field 'train.device' is {text!r} but MPS is not available here; use cpu")
    else:
        raise ConfigError(f"config field 'train.device': device type {dev.type!r} is not supported (use cpu or cuda)")


def _check_trains_something(cfg: RunConfig) -> None:
    """A plan that trains no transition, blamed on its cause: a deterministic sampler
    (``task.eta`` / ``task.noise_level`` = 0), or one DDIM step, which ends on the clean sample
    without noise; and a plan too large for any machine (a deep tree)."""
    from .memory_estimate import plan_counts, task_geometry

    geo = task_geometry(cfg)
    mask = geo.sde_mask if geo is not None else None
    counts = plan_counts(cfg, mask, budgeted=False)
    t, ro = cfg.task, cfg.rollout
    if counts.row_steps > MAX_PLAN_ROWS:
        field = "rollout.k" if ro.k else "rollout.profile" if ro.profile else "train.batch_size"
        raise ConfigError(f"config field '{field}': the rollout plan would hold {counts.row_steps:.3g} rows over its "
                          f"{t.num_steps} steps (more than {MAX_PLAN_ROWS:.3g}); lower the branching or train.batch_size")
    if mask is None or any(mask):     # (a branch plan too: its children and the evaluation need noise)
        return
    if geo.sampler == "ddim" and t.eta == 0:
        raise ConfigError("config field 'task.eta' is 0: DDIM with eta = 0 samples without noise, so the rollout "
                          "has no stochastic transition to train (use eta > 0; 1 = DDPM noise)")
    if geo.sampler == "flow" and t.noise_level == 0:
        raise ConfigError("config field 'task.noise_level' is 0: the flow sampler is then the deterministic ODE, so "
                          "the rollout has no stochastic transition to train (use a noise level > 0, e.g. 0.7)")
    raise ConfigError(f"config field 'task.num_steps' is {t.num_steps}: the last DDIM step ends on the clean sample "
                      f"without noise, so {t.num_steps} step(s) leave nothing to train (use >= 2)")
