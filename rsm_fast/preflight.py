"""Cheap checks that run before a model is loaded or a tensor is allocated (issue 17, item 5).

The CLI calls :func:`check` (= :func:`check_inputs` + :func:`check_memory`) right after the
config has validated and before the run directory is opened, so a typo in a prompt file or a
batch that cannot fit ends in one ``error:`` line with nothing written and no model loaded.

* :func:`check_inputs` — the files the task will read: the diffusers task's ``task.model`` (a
  named config, or a folder holding ``model_index.json``) and ``task.prompts`` (a regular,
  readable, UTF-8, non-empty file that parses, with the task's own parser
  :func:`rsm_fast.models.text.read_prompts`), and ``task.resolution`` against the VAE factor.
* :func:`check_memory` — an estimate, from the config alone, of the bytes the run holds at its
  peak, compared with the memory available on the training device. The estimate counts what the
  rollout engine and the trainer really allocate (``engine/rollout.py``, ``trainer.py``):

  - the epoch's plan (:func:`plan_counts`, the same arithmetic as ``engine.plan.compile_plan``:
    ``R_i`` rows per step, ``M`` training records) and its index tensors (~34 bytes per row and
    step, plus the ``[N, R_N]`` ancestry twice while it is built);
  - per record: ``x``, ``z``, ``f_old`` (rollout) and ``f_ref`` (the reference pass), one float32
    latent each, plus 12 bytes of step / log-prob; and three more latents per record held for a
    while: the rollout's per-step lists while they are concatenated, then the training step's
    policy output, its gradient and the loss' temporaries (the forward family's records are its
    ``S`` noised rows per final sample, six latents each: counted the same way, within one);
  - model calls: per step ``2 R_i + 4 R_{i+1}`` latents of sampler state, plus per row of a call
    (``rollout.chunk_size`` rows, all of a step's rows when it is 0; doubled by classifier-free
    guidance) its input, output and activations; the training forward keeps the activations of
    ``M / train.grad_accum`` rows (the 2-D task's MLP and the digits UNet: measured per row; a
    diffusers model's own activations are not counted, so for it the estimate is a lower bound);
  - the final evaluation: ``task.eval_samples`` full SDE trajectories, every noisy step a record,
    the same per-record and per-call terms, model calls of ``rollout.chunk_size`` rows (else 1024);
  - the trained parameters (in their dtype: ``policy.dtype`` under full fine-tuning, fp32 for a
    LoRA) with their gradient, the non-finite guard's snapshot, the EMA (fp32) and the optimizer
    state (``train.optimizer``: AdamW two moments in the parameters' dtype, 8 B per fp32
    parameter; ``adamw8bit`` ~2 B per parameter, bitsandbytes' two 8-bit states), one more
    gradient copy under DDP (its buckets), and a full fine-tune's frozen reference copy;
  - image models (:mod:`rsm_fast.memory_profile`, measured on the meta device): the frozen
    weights (a LoRA's base model, the VAE in fp32, the text encoders while they stay loaded:
    ``task.text_cache=off``), the text encoders while they fill the cache at start (a peak of
    its own, before training), per-row activation bytes of no-grad calls and of the training
    forward + backward (``policy.dtype``, ``policy.gradient_checkpointing``), the conditioning
    rows, and the VAE decode of the final samples (``task.vae_slicing`` / ``vae_tiling``);
    ``task.offload=cpu`` moves the VAE, text encoders and reference copy to the host, the device
    holding the largest of them while it visits;
  - reward models (:mod:`rsm_fast.rewards.footprint`): ``aesthetic``, ``pickscore`` and ``hps``
    (every model term of a weighted sum) are built on the run's device (``task.device``: each rank
    its own) in their release precision there, and stay for the whole run: their weights from
    their CLIP architecture (the reward folder's ``config.json``, else the published one:
    PickScore / HPS ViT-H/14 3.9 GB, aesthetic ViT-L/14 1.7 GB in float32) and the text-feature
    cache; the scoring call of every final sample at once (training: the rank's batch, or one
    wave's rows on top of the model calls when ``rollout.waves`` scores on a worker thread;
    evaluation: its samples) holds the images and one no-grad transformer layer's activations
    per image; the digits classifier's weights; nothing for weight-free, remote or Python rewards;
  - the first-order estimators' reward backward (``fo_terminal``, ``fo_current``,
    ``fo_lookahead``): the reward differentiated through the decode keeps every layer of the
    decode (the VAE, measured on the meta device with grad) and of the reward model (the CLIP
    image tower's saved tensors, the digits classifier's measured bytes) for each row of a call,
    ``method.fo_grad_chunk`` rows a call (else ``rollout.chunk_size``, else all final samples /
    records); it runs after the rollout and the no-grad scoring, before the training forward, so
    it counts as one more of the parts of which the largest is held (sd15-full at 512 px with
    PickScore: 6.1 GB + 614 MB per row); with ``fo_value=path`` the policy's graph over the
    path's deterministic tail steps and the adjoint sweep's with-grad policy calls of those rows;
  - several ranks (``world_size``): each holds its share of the groups (whole groups per rank)
    and of the evaluation samples; ``sharded`` (FSDP) divides the denoiser's weights, the trained
    state and the reference copy by the number of ranks.

  Training and evaluation do not overlap, so the peak is the larger of the two (or of the start's
  text encoders) plus the parameters and weights (the reward models' included). The rollout's
  tensors are float32 whatever the model's dtype. The estimate counts live tensor bytes: a small
  diffusers run (sd15-tiny, 64 px, estimate 267 MB) peaked 1.14x that above its starting resident
  memory with glibc's mmap threshold fixed (``MALLOC_MMAP_THRESHOLD_``) and 1.9x with glibc's
  defaults, whose dynamic threshold keeps freed heap resident (``tests/test_precision_cli.py``):
  a refusal is certain.

Available memory: on CPU the smaller of ``/proc/meminfo`` MemAvailable (else ``os.sysconf``) and
the cgroup's limit minus its usage; on CUDA ``torch.cuda.mem_get_info`` (free bytes; the host
must also hold the plan while it is compiled). A config whose estimate exceeds it raises a one-line
:class:`~rsm_fast.config.ConfigError` naming the estimate, what is available and the setting to
lower (``train.batch_size``, ``rollout.chunk_size``, ``train.grad_accum``, ``task.eval_samples``,
``task.reward`` when its models do not fit, ``method.fo_grad_chunk`` when a first-order reward
backward does not (``method.estimator`` when one row a call already does not), and for image models ``policy.dtype``,
``task.offload``, ``task.t5``, ``task.vae_slicing`` / ``vae_tiling``, ``policy.lora_rank``,
``train.optimizer``).
"""
from __future__ import annotations

import os
from pathlib import Path

from .config import ConfigError, RunConfig

from .memory_estimate import (DIGITS_ACT_GRAD, DIGITS_ACT_NOGRAD, EVAL_CHUNK, MemoryEstimate,
                              PlanCounts, TaskGeometry, _diffusers_family, eval_counts, estimate_memory,
                              plan_counts, task_geometry)

# the estimate's names stay importable from here (callers and tests use rsm_fast.preflight)
__all__ = ["DIGITS_ACT_GRAD", "DIGITS_ACT_NOGRAD", "EVAL_CHUNK", "MemoryEstimate", "PlanCounts", "TaskGeometry",
           "eval_counts", "estimate_memory", "plan_counts", "task_geometry", "check", "check_inputs",
           "check_memory", "available_memory", "host_available", "fmt_bytes", "read_prompt_file"]


# ----------------------------------------------------------------------------------------------
# available memory
# ----------------------------------------------------------------------------------------------
def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def host_available() -> int | None:
    """Bytes this process may still allocate on the host: MemAvailable (else free pages), capped
    by a cgroup memory limit minus its usage. None when nothing can be read."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, AttributeError):
            pass
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        lim, use = _read_int(limit), _read_int(usage)
        if lim is not None and use is not None and lim < 2**60:
            left = max(0, lim - use)
            avail = left if avail is None else min(avail, left)
            break
    return avail


def available_memory(device) -> int | None:
    """Free bytes on ``device`` (CUDA: ``torch.cuda.mem_get_info``; else the host's)."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return int(free)
    return host_available()


def fmt_bytes(n: float) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{int(n)} B"


# ----------------------------------------------------------------------------------------------
# the checks
# ----------------------------------------------------------------------------------------------
def check_memory(cfg: RunConfig, device=None, *, available: int | None = None, host: int | None = None,
                 world_size: int = 1, sharded: bool | None = None, local_ranks: int = 1) -> MemoryEstimate | None:
    """Raise a one-line :class:`ConfigError` when the run's estimated peak memory (module
    docstring) exceeds what ``device`` has available (``available`` / ``host`` override the
    measured bytes, for tests; ``world_size`` / ``sharded`` as :func:`estimate_memory`). Returns the
    estimate (None when the task cannot be described without loading it). Allocates no tensor on
    a device (image models are measured on the meta device)."""
    import torch

    from .memory_profile import image_geometry

    geo = task_geometry(cfg)
    if geo is None:
        return None
    dev = torch.device(device if device is not None else cfg.train.device)
    geo = image_geometry(cfg, geo, dev)
    est = estimate_memory(cfg, geo, world_size=world_size, sharded=sharded, device=dev)
    on_cuda = dev.type == "cuda"
    avail = available if available is not None else available_memory(dev)
    host_avail = host if host is not None else (host_available() if on_cuda else avail)
    where = f"{dev} memory" if on_cuda else "memory"
    if local_ranks > 1 and not on_cuda and avail is not None:     # the ranks of one machine share its memory
        avail //= local_ranks
        where = f"memory per rank ({local_ranks} ranks share this machine's)"
    if avail is not None and est.total > avail:
        setting = est.setting(avail)
        hint = {"train.batch_size": "lower train.batch_size" + (" or the branching (rollout.k / rollout.profile / "
                                                                "rollout.alloc_budget)" if cfg.rollout.plan != "sde" else ""),
                "rollout.chunk_size": "set rollout.chunk_size to fewer rows per model call (0 = a whole step at once)",
                "train.grad_accum": "raise train.grad_accum (fewer rows per training forward) or lower train.batch_size",
                "task.eval_samples": "lower task.eval_samples",
                "policy.hidden": "lower policy.hidden / policy.layers",
                "policy.lora_rank": ("train a LoRA (policy.lora_rank > 0) or shard it (train.parallel=fsdp under "
                                     "torchrun)" if cfg.policy.lora_rank == 0 else "lower policy.lora_rank"),
                "policy.dtype": "load the weights in bf16 (policy.dtype=bf16; a LoRA stays fp32)",
                "task.offload": "keep the frozen parts in CPU memory (task.offload=cpu)",
                "task.t5": "drop T5 (task.t5=false: CLIP only) or load in bf16 (policy.dtype=bf16)",
                "task.text_cache": "fill the text cache in a run with more memory, or lower policy.dtype",
                "task.vae_slicing": "decode one image at a time (task.vae_slicing=true)",
                "task.vae_tiling": "decode in tiles (task.vae_tiling=true) or lower train.batch_size",
                "method.fo_grad_chunk": "set method.fo_grad_chunk to fewer rows per reward backward",
                "method.estimator": ("one row's reward backward does not fit: use method.estimator=zo, a lower "
                                     "task.resolution or a smaller reward model"),
                "task.reward": (f"its reward models need {fmt_bytes(est.reward_weights)}: use a smaller one or a "
                                f"reward server (task.reward=http://...)")}[setting]
        if setting == "train.grad_accum" and cfg.task.name != "toy2d" and not cfg.policy.gradient_checkpointing:
            hint += " or set policy.gradient_checkpointing=true"
        # what to do first, then the three largest parts (the CLI prints one line of at most 300 characters)
        parts = ([(k if k.startswith("training") else f"training {k}", v) for k, v in est.train.items()]
                 + [(f"evaluation {k}", v) for k, v in est.eval.items()])
        parts += [("parameters", est.params), ("weights", est.weights), ("text encoders at start", est.start),
                  ("reward models", est.reward_weights)]
        top = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in sorted(parts, key=lambda kv: -kv[1])[:3] if v)
        raise ConfigError(f"config field '{setting}': the run needs about {fmt_bytes(est.total)} of {where} but "
                          f"{fmt_bytes(avail)} is available; {hint} (largest: {top})")
    if on_cuda and host_avail is not None and est.host_plan + est.host_extra > host_avail:
        if est.host_extra > est.host_plan:
            raise ConfigError(f"config field 'task.offload': the parts kept in host memory need about "
                              f"{fmt_bytes(est.host_extra + est.host_plan)} but {fmt_bytes(host_avail)} is available; "
                              f"set task.offload='' (keep them on {dev}) or lower policy.dtype")
        raise ConfigError(f"config field 'train.batch_size': compiling the rollout plan needs about "
                          f"{fmt_bytes(est.host_plan)} of host memory but {fmt_bytes(host_avail)} is available; "
                          f"lower train.batch_size")
    return est


def check_inputs(cfg: RunConfig) -> None:
    """The files the task will read, before anything loads (module docstring); one-line
    :class:`ConfigError` naming the field."""
    if cfg.task.name != "diffusers":
        return
    t = cfg.task
    _check_model(t.model)
    if t.prompts:
        read_prompt_file(t.prompts)
    _check_cache_dir(t.text_cache)
    geo = task_geometry(cfg)
    info = _diffusers_family(t.model)
    if geo is not None and info is not None and t.resolution:
        f = 2 ** (len(info[2].get("block_out_channels", (0,))) - 1)
        if t.resolution % f:
            raise ConfigError(f"config field 'task.resolution': {t.resolution} must be a multiple of the VAE "
                              f"factor {f}")


def _check_cache_dir(setting: str) -> None:
    """``task.text_cache`` must be (or be creatable as) a writable folder; nothing is created here."""
    from .tasks.diffusers_task import text_cache_dir

    try:
        p = text_cache_dir(setting)
        if p is None:
            return
        q = p
        while not q.exists() and q != q.parent:
            q = q.parent
        ok = q.is_dir() and os.access(q, os.W_OK | os.X_OK)
    except (OSError, ValueError, RuntimeError):     # (RuntimeError: no home directory to expand)
        ok, q = False, setting
    if not ok:
        raise ConfigError(f"config field 'task.text_cache': {str(q)!r} is not a writable folder (the text-embedding "
                          f"cache is written there; 'off' disables it)")


def _check_model(spec: str) -> None:
    from .models.configs import CONFIGS

    try:
        p = Path(spec)
        exists = bool(spec) and p.exists()
    except (OSError, ValueError):
        exists = False
    if exists:
        if not p.is_dir():
            raise ConfigError(f"config field 'task.model': '{p}' is not a folder (a diffusers model folder "
                              f"holds model_index.json)")
        if not (p / "model_index.json").is_file():
            raise ConfigError(f"config field 'task.model': '{p}' has no model_index.json (not a diffusers folder)")
        if not os.access(p / "model_index.json", os.R_OK):
            raise ConfigError(f"config field 'task.model': '{p / 'model_index.json'}' is not readable")
        return
    if spec not in CONFIGS:
        raise ConfigError(f"config field 'task.model': {spec!r} is neither a local diffusers folder nor a named "
                          f"config ({', '.join(sorted(CONFIGS))})")


def read_prompt_file(path: str) -> list:
    """The prompts of ``task.prompts`` through the task's parser, every failure one line."""
    from .models.text import read_prompts

    try:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config field 'task.prompts': prompt file not found: {p}")
        if not p.is_file():
            raise ConfigError(f"config field 'task.prompts': '{p}' is not a regular file")
        recs = read_prompts(p)
    except ConfigError:
        raise
    except UnicodeDecodeError as e:
        raise ConfigError(f"config field 'task.prompts': '{path}' is not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise ConfigError(f"config field 'task.prompts': cannot read '{path}': {e.strerror or e}") from None
    except ValueError as e:
        raise ConfigError(f"config field 'task.prompts': {str(e).splitlines()[0] if str(e) else 'unreadable'}") from None
    if not recs:
        raise ConfigError(f"config field 'task.prompts': {path} holds no prompt")
    return recs


def check(cfg: RunConfig, device=None, *, world_size: int = 1, sharded: bool | None = None,
          local_ranks: int = 1) -> MemoryEstimate | None:
    """:func:`check_inputs` then :func:`check_memory` (what the CLI calls before the run directory;
    under torchrun with the world size, so the estimate is one rank's, and the CPU ranks of one
    machine, ``local_ranks``, share its memory)."""
    check_inputs(cfg)
    return check_memory(cfg, device, world_size=world_size, sharded=sharded, local_ranks=local_ranks)
