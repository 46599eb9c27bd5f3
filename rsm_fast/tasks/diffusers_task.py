"""A text-to-image task on a diffusers model (SD1.5 or SD3.5-M family) with LoRA or full fine-tuning.

``task.model`` is a local diffusers folder (``model_index.json`` says the family) or a named config
of :mod:`rsm_fast.models.configs` (``sd15-tiny``/``sd3-tiny`` for tests, ``sd15-full``/``sd35m-full``
random-weight architectures for timing). Prompts come from ``task.prompts`` (``.txt`` one per
line, or ``.jsonl`` with ``prompt`` + metadata); without a file a small built-in list is used so
the tiny models run out of the box. Each epoch draws ``groups`` prompts with the trainer's
generator; their embeddings are cached by the adapter. Sampler: SD1.5 DDIM-eta (``task.eta``,
default 1 = DDPM posterior noise, DDPO's setting), SD3 the Flow-GRPO SDE (``task.noise_level``,
Flow-GRPO's default 0.7). The trained LoRA is exported next to the checkpoint in diffusers'
``load_lora_weights`` format; a full fine-tune (``policy.lora_rank=0``) exports the whole denoiser
with ``save_pretrained`` (``<dir>/unet`` or ``<dir>/transformer``).

Precision and memory (``policy.*`` and ``task.*`` keys, read once at construction):

* ``policy.dtype`` — the denoiser and text encoders load in it (a folder through
  ``from_pretrained(torch_dtype=...)``; a named config is drawn in fp32 and cast, so every dtype
  shares one set of random weights); the VAE stays fp32, a LoRA's own weights fp32, the model
  output float32. fp16 runs on CPU too (torch 2.13's CPU kernels take it; slow, and without loss
  scaling: prefer bf16). ``policy.autocast`` wraps every denoiser forward in ``torch.autocast``.
* ``policy.gradient_checkpointing`` / ``policy.attention`` — :mod:`rsm_fast.models.runtime`.
* ``task.text_cache`` (default on: ``$RSM_FAST_CACHE/text`` or ``~/.cache/rsm_fast/text``; ``off``:
  encoders loaded and used every epoch) — the text encoders are not loaded with the model; at
  construction every prompt of the list and the empty prompt go through the cache once (encoders
  loaded only if one misses, then freed), so epochs read rows from disk and never encode.
* ``task.t5=false`` (SD3) — no T5 at all (zero rows, as diffusers without ``text_encoder_3``).
* ``task.vae_slicing`` / ``task.vae_tiling`` — diffusers' VAE ``enable_slicing`` / ``enable_tiling``.
* ``task.offload=cpu`` — VAE, text encoders and a full fine-tune's reference copy live in CPU memory
  and visit ``train.device`` while they run.
* ``policy.train_text_encoder`` — a LoRA on the CLIP text encoders too (:mod:`rsm_fast.models.text_lora`):
  conditioning rows become prompt indices into the task's prompt list, encoded inside every model
  call; the policy handle's module is a :class:`~.base.TrainedModules` of the denoiser and the
  trained encoders, and the export writes their LoRAs together.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

from .base import Conditioning, PolicyHandle, TrainedModules, lora_targets

# Used when no prompt file is given (tiny-model smoke runs, timing).
DEFAULT_PROMPTS = ("a photo of a cat", "a red car on a street", "a bowl of fruit", "a mountain lake at dawn")
DEFAULT_CFG = {"sd15": 7.5, "sd3": 4.5}   # the pipelines' default guidance scales (diffusers)


class TaskInputError(ValueError):
    """A bad ``task.*`` value (model folder, prompt file, resolution); one-line message."""


def text_cache_dir(setting: str) -> Path | None:
    """``task.text_cache``: ``'off'`` -> None; ``''`` -> ``$RSM_FAST_CACHE/text``, else
    ``~/.cache/rsm_fast/text``; anything else is the folder itself."""
    if setting == "off":
        return None
    if setting:
        return Path(setting).expanduser()
    root = os.environ.get("RSM_FAST_CACHE", "").strip()
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "rsm_fast") / "text"


def apply_policy_runtime(adapter, pc) -> None:
    """``policy.attention`` and ``policy.gradient_checkpointing`` on the adapter's denoiser (and its
    reference copy); a missing xformers is one line naming the field."""
    from ..config import ConfigError

    try:
        adapter.set_attention_backend(pc.attention)
    except (ImportError, ValueError) as e:
        raise ConfigError(f"config field 'policy.attention': {e}") from None
    adapter.set_gradient_checkpointing(bool(pc.gradient_checkpointing))


def _read_prompt_file(path: str):
    """``task.prompts`` through :func:`rsm_fast.preflight.read_prompt_file` (one line per failure:
    missing, not a regular file, unreadable, not UTF-8, malformed, empty)."""
    from ..config import ConfigError
    from ..preflight import read_prompt_file

    try:
        return read_prompt_file(path)
    except ConfigError as e:
        raise TaskInputError(str(e)) from None


class DiffusersTask:
    default_reward = "jpeg"                  # DDPO's weight-free black-box reward
    default_eval_samples = 16

    def __init__(self, cfg, device="cpu", policy=None):
        from .. import models as M
        from ..config import ConfigError, PolicyConfig

        pc = policy if policy is not None else PolicyConfig()
        # the prompt file first: a typo in it must not cost a model load
        if cfg.prompts:
            recs = _read_prompt_file(cfg.prompts)
            self.prompts = [r.prompt for r in recs]
            self.metadata = [dict(r.metadata) for r in recs]
        else:
            self.prompts, self.metadata = list(DEFAULT_PROMPTS), [{} for _ in DEFAULT_PROMPTS]
        self.cache_dir = text_cache_dir(cfg.text_cache)
        opts = dict(device=device, dtype=pc.dtype, autocast=pc.autocast or None, offload=cfg.offload == "cpu",
                    cache_dir=self.cache_dir, text_encoders=self.cache_dir is None, t5=cfg.t5)
        spec = cfg.model
        try:
            if Path(spec).exists():
                if M.folder_family(spec) == "sd3" and cfg.t5 and not (Path(spec) / "text_encoder_3").is_dir():
                    raise TaskInputError(f"config field 'task.t5': {spec} has no text_encoder_3 (T5); "
                                         f"set task.t5=false to run CLIP only")
                self.adapter = M.load_model(spec, **opts)
            elif spec in M.CONFIGS:
                self.adapter = M.build_model(spec, **opts)
            else:
                raise TaskInputError(f"config field 'task.model': {spec!r} is neither a local diffusers folder nor "
                                     f"a named config ({', '.join(sorted(M.CONFIGS))})")
        except (FileNotFoundError, ValueError) as e:
            if isinstance(e, (TaskInputError, ConfigError)):
                raise
            raise TaskInputError(f"config field 'task.model': {e}") from None
        a = self.adapter
        self.name = f"{a.family}:{Path(spec).name if Path(spec).exists() else spec}"
        res = cfg.resolution or self._default_resolution()
        try:
            self.latent_shape = a.latent_shape(res, res)
        except ValueError as e:
            raise TaskInputError(f"config field 'task.resolution': {e}") from None
        if a.family == "sd15":
            self.transition = a.transition(cfg.num_steps, eta=cfg.eta)
        else:
            self.transition = a.transition(cfg.num_steps, kind="sde", noise_level=cfg.noise_level)
        self.cfg_scale = DEFAULT_CFG[a.family] if cfg.cfg_scale < 0 else (cfg.cfg_scale or None)
        apply_policy_runtime(a, pc)
        a.set_vae_memory(slicing=cfg.vae_slicing, tiling=cfg.vae_tiling)
        # every prompt (and "") through the cache once, then the encoders are freed
        try:
            self.encoded_at_start = a.fill_cache(self.prompts) if self.cache_dir is not None else None
        except OSError as e:
            raise TaskInputError(f"config field 'task.text_cache': cannot use {str(self.cache_dir)!r} "
                                 f"({e.strerror or e}); set another folder or 'off'") from None

    @property
    def device(self) -> torch.device:
        """``train.device`` (the rank's device): where the reward models of ``task.reward`` are
        built (:func:`rsm_fast.rewards.device.task_device`)."""
        return self.adapter.device

    def _default_resolution(self) -> int:
        a = self.adapter
        f = 2 ** (len(a.vae.config.block_out_channels) - 1)
        return int(a.denoiser.config.sample_size) * f

    # -- the trainer's task contract (tasks/base.py) ----------------------------------------------
    def make_policy(self, pc) -> PolicyHandle:
        a = self.adapter
        if pc.lora_rank > 0:
            targets = lora_targets(pc)
            a.add_lora(rank=pc.lora_rank, alpha=pc.lora_alpha or None, target_modules=targets)
            if getattr(pc, "train_text_encoder", False):
                a.add_text_lora(self.prompts, rank=pc.lora_rank, alpha=pc.lora_alpha or None,
                                target_modules=lora_targets(pc, "text_lora_targets"))
        else:
            a.enable_full_finetune()
        apply_policy_runtime(a, pc)           # (again: the reference copy of a full fine-tune too)
        module = TrainedModules(a.trained_modules()) if a.text_lora else a.denoiser
        return PolicyHandle(module=module, model=a.policy, reference=a.reference, frozen=a._ref_denoiser)

    def conditions(self, groups: int, gen: torch.Generator) -> Conditioning:
        idx = torch.randint(len(self.prompts), (groups,), generator=gen).tolist()
        prompts = [self.prompts[i] for i in idx]
        return Conditioning(cond=self.adapter.encode_prompts(prompts), uncond=self.adapter.uncond(),
                            prompts=prompts, metadata=[self.metadata[i] for i in idx])

    def initial_latents(self, n: int, gen: torch.Generator) -> None:
        return None                          # the engine's counter-based N(0, I)

    def decode(self, x0: Tensor) -> Tensor:
        return self.adapter.decode(x0)

    def export(self, directory: Path, state_dict: dict | None = None) -> Path | None:
        """The trained weights in diffusers' format: a LoRA as ``directory/pytorch_lora_weights.safetensors``
        (``pipe.load_lora_weights(directory)``; returns ``directory``), a full fine-tune as
        ``directory/<unet|transformer>`` (``from_pretrained``; returns that folder). ``state_dict``:
        the denoiser's full state dict gathered by the caller (sharded ranks), written instead of
        the module's own. None before :meth:`make_policy`."""
        a = self.adapter
        if a.gate is not None:
            return a.export_lora(directory, state_dict=state_dict)
        if a._ref_denoiser is not None:
            return a.export_full(directory, state_dict=state_dict)
        return None
