"""The digits task behind the trainer's task contract (``tasks/base.py``).

``task.name=digits-ddim`` (DDPM epsilon model, DDIM-eta rollouts) or ``digits-flow`` (rectified
flow, Flow-GRPO SDE rollouts), both on the shipped pretrained class-conditional UNets of
``rsm_fast/assets/digits`` (see :mod:`rsm_fast.tasks.digits`). Each prompt group is one requested
digit label; CFG uses the null label. The policy is the pretrained UNet with LoRA on its
attention projections (``policy.lora_rank``; 0 = full fine-tuning against a frozen copy); the
reference is the same UNet with the LoRA gated off (a buffer write, safe under compile / graphs).

Precision and memory: ``policy.dtype`` (the UNet's weights; a LoRA's own stay fp32, the output is
float32), ``policy.autocast`` (every UNet forward under ``torch.autocast``),
``policy.gradient_checkpointing`` and ``policy.attention`` (:mod:`rsm_fast.models.runtime`) apply
as for the diffusers task. The ``task.*`` memory keys (text cache, T5, VAE, offload) have nothing to
act on here: ``config_checks`` refuses non-default values for this task.

``task.condition=none`` samples unconditionally (the null label, no CFG): the setting in which a
fixed-target reward such as ``digit_logprob:3`` has room to move (about one sample in ten starts
as each digit), as in DDPO-style experiments.

Rewards registered here (usable as ``task.reward``): ``digit_label_logprob`` (default: the
classifier's log-probability of each sample's requested label, differentiable),
``digit_logprob:N`` (log-probability of digit N, differentiable) and ``digit_score:N`` (the same
number as a black box).
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor

from .. import rewards as R
from ..models import lora as L
from . import digits as D
from . import digits_reward as DR
from .base import Conditioning, PolicyHandle, lora_targets

DEFAULT_CFG = 3.0          # the shipped models' measured class agreement uses CFG 3 (assets/digits/README.md)


def default_reward(condition: str) -> str:
    """The reward spec a digits run scores with when ``task.reward`` is empty: the requested label's
    log-probability, or, unconditional (``task.condition=none``), digit 3's. Read without building
    the task (the memory estimate's reward footprint)."""
    return "digit_logprob:3" if condition == "none" else "digit_label_logprob"


class DigitsTask:
    default_eval_samples = 1024   # 8192 took ~8 min of CPU (163,840 UNet evaluations at 10 steps)

    def __init__(self, cfg, device="cpu", policy=None):
        family = "ddim" if cfg.name == "digits-ddim" else "flow"
        self.device = torch.device(device)
        self.unconditional = cfg.condition == "none"
        scale = DEFAULT_CFG if cfg.cfg_scale < 0 else (cfg.cfg_scale or None)
        if self.unconditional:
            scale = None                   # every row is the null label: guidance would be a no-op
        self.digits = D.Digits(family, cfg.num_steps, eta=cfg.eta, noise_level=cfg.noise_level, cfg_scale=scale)
        self.name = f"digits-{family}"
        self.latent_shape = D.Digits.latent_shape
        self.transition = self.digits.transition
        self.cfg_scale = scale
        self.classifier = self.digits.build_classifier(self.device)
        self.default_reward = default_reward(cfg.condition)

    def make_policy(self, pc) -> PolicyHandle:
        from ..config import ConfigError
        from ..models import runtime as RT

        unet = self.digits.build_model(self.device, RT.resolve_dtype(pc.dtype))
        try:
            RT.set_attention_backend(unet, pc.attention)
        except (ImportError, ValueError) as e:
            raise ConfigError(f"config field 'policy.attention': {e}") from None
        RT.set_gradient_checkpointing(unet, bool(pc.gradient_checkpointing))
        autocast = RT.resolve_autocast(pc.autocast)
        fn = self.digits.model_fn(unet, autocast)
        if pc.lora_rank > 0:
            targets = lora_targets(pc)
            gate = L.add_lora(unet, pc.lora_rank, pc.lora_alpha or None, targets)

            @torch.no_grad()
            def reference(x, t, cond=None):
                with L.gated(gate, 0.0):
                    return fn(x, t, cond)
        else:
            frozen = copy.deepcopy(unet).requires_grad_(False)
            ref_fn = self.digits.model_fn(frozen, autocast)

            @torch.no_grad()
            def reference(x, t, cond=None):
                return ref_fn(x, t, cond)
        return PolicyHandle(module=unet, model=fn, reference=reference, frozen=None if pc.lora_rank > 0 else frozen)

    def conditions(self, groups: int, gen: torch.Generator) -> Conditioning:
        labels = self.digits.conditions(groups, gen)
        if self.unconditional:
            labels = torch.full_like(labels, D.NULL_LABEL)
        return Conditioning(cond=labels, uncond=self.digits.uncond, prompts=D.Digits.prompts(labels),
                            metadata=D.Digits.metadata(labels))

    def initial_latents(self, n: int, gen: torch.Generator) -> None:
        return None                        # the engine's counter-based N(0, I)

    def decode(self, x0: Tensor) -> Tensor:
        return self.digits.decode(x0)


def make_digits_task(cfg, device="cpu", policy=None) -> DigitsTask:
    return DigitsTask(cfg, device, policy)


def _classifier_of(task):
    return getattr(task, "classifier", None)


R.register("digit_label_logprob", lambda arg, task: DR.DigitLabelLogProb(_classifier_of(task)),
           help="digits: classifier log-probability of each sample's requested label")
R.register("digit_logprob", lambda arg, task: DR.make_reward(f"digit_logprob:{arg}", _classifier_of(task)),
           arg="required", help="digits: classifier log-probability of digit N (differentiable)")
R.register("digit_score", lambda arg, task: DR.make_reward(f"digit_score:{arg}", _classifier_of(task)),
           arg="required", help="digits: the same as digit_logprob:N as a black box")
