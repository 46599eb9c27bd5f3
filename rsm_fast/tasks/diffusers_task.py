"""A text-to-image task on a diffusers model (SD1.5 or SD3.5-M family) with LoRA or full fine-tuning.

``task.model`` is a local diffusers folder (``model_index.json`` says the family) or a named config
of :mod:`rsm_fast.models.configs` (``sd15-tiny``/``sd3-tiny`` for tests, ``sd15-full``/``sd35m-full``
random-weight architectures for timing). Prompts come from ``task.prompts`` (``.txt`` one per
line, or ``.jsonl`` with ``prompt`` + metadata); without a file a small built-in list is used so
the tiny models run out of the box. Each epoch draws ``groups`` prompts with the trainer's
generator; their embeddings are cached by the adapter. Sampler: SD1.5 DDIM-eta (``task.eta``,
default 1 = DDPM posterior noise, DDPO's setting), SD3 the Flow-GRPO SDE (``task.noise_level``,
Flow-GRPO's default 0.7). The trained LoRA is exported next to the checkpoint in diffusers'
``load_lora_weights`` format.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from .base import Conditioning, PolicyHandle, lora_targets

# Used when no prompt file is given (tiny-model smoke runs, timing).
DEFAULT_PROMPTS = ("a photo of a cat", "a red car on a street", "a bowl of fruit", "a mountain lake at dawn")
DEFAULT_CFG = {"sd15": 7.5, "sd3": 4.5}   # the pipelines' default guidance scales (diffusers)


class TaskInputError(ValueError):
    """A bad ``task.*`` value (model folder, prompt file, resolution); one-line message."""


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

    def __init__(self, cfg, device="cpu"):
        from .. import models as M

        # the prompt file first: a typo in it must not cost a model load
        if cfg.prompts:
            recs = _read_prompt_file(cfg.prompts)
            self.prompts = [r.prompt for r in recs]
            self.metadata = [dict(r.metadata) for r in recs]
        else:
            self.prompts, self.metadata = list(DEFAULT_PROMPTS), [{} for _ in DEFAULT_PROMPTS]
        spec = cfg.model
        try:
            if Path(spec).exists():
                self.adapter = M.load_model(spec, device=device)
            elif spec in M.CONFIGS:
                self.adapter = M.build_model(spec, device=device)
            else:
                raise TaskInputError(f"config field 'task.model': {spec!r} is neither a local diffusers folder nor "
                                     f"a named config ({', '.join(sorted(M.CONFIGS))})")
        except (FileNotFoundError, ValueError) as e:
            if isinstance(e, TaskInputError):
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
        else:
            a.enable_full_finetune()
        return PolicyHandle(module=a.denoiser, model=a.policy, reference=a.reference)

    def conditions(self, groups: int, gen: torch.Generator) -> Conditioning:
        idx = torch.randint(len(self.prompts), (groups,), generator=gen).tolist()
        prompts = [self.prompts[i] for i in idx]
        return Conditioning(cond=self.adapter.encode_prompts(prompts), uncond=self.adapter.uncond(),
                            prompts=prompts, metadata=[self.metadata[i] for i in idx])

    def initial_latents(self, n: int, gen: torch.Generator) -> None:
        return None                          # the engine's counter-based N(0, I)

    def decode(self, x0: Tensor) -> Tensor:
        return self.adapter.decode(x0)

    def export(self, directory: Path) -> Path | None:
        """The trained LoRA in diffusers' format (``pipe.load_lora_weights(directory)``)."""
        if self.adapter.gate is None:
            return None
        return self.adapter.export_lora(directory)
