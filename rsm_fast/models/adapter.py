"""The model adapter: one object per loaded generator, speaking the rollout engine's convention.

Engine interface (``rsm_fast.engine.rollout``): ``adapter.policy(x [C, ...], t [C], cond [C, L, D])``
returns the model's native output as float32 (SD1.5: epsilon; SD3: velocity), where ``t`` is the
transition's ``t`` table value (VP: the train-timestep index; RF: t in [0, 1], converted inside
the adapter to the model's timestep). ``adapter.reference`` is the frozen model with the same
signature (LoRA gate 0, or the frozen copy under full fine-tuning; see :mod:`.lora`).
``adapter.transition(num_steps, ...)`` is the matching :class:`~rsm_fast.transitions.GaussianTransition`
built from the diffusers scheduler's own tables.

Conditioning is one plain tensor per prompt, ``[L, D]`` (``encode_prompts(prompts) -> [P, L, D]``,
``uncond() -> [1, L, D]``), so the engine's ``index_select`` / slicing / ``cat`` / ``expand`` apply
unchanged; a family that needs more than token rows packs it into extra rows (SD3: the pooled
projection, see :mod:`.sd3`). Conditioning lives on the adapter's device in the model dtype.

Precision: weights in ``dtype`` (fp32/bf16/fp16), the VAE in ``vae_dtype`` (fp32 by default, as
flow_grpo keeps it); inputs are cast to the model dtype on entry and the output to float32 on
exit, so the sampler and the losses never see bf16.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from . import lora as L
from . import runtime as R
from .text import EmbeddingCache, encoder_identity


class DiffusionAdapter:
    """Base class; subclasses implement ``_denoise``, ``_encode``, ``transition``, ``decode``."""

    family = ""
    native = ""
    TEXT_COMPONENTS: tuple[str, ...] = ()

    def __init__(self, denoiser: nn.Module, vae: nn.Module, scheduler, text: dict, *, dtype="fp32",
                 vae_dtype="fp32", device="cpu", cache_dir=None):
        self.dtype, self.vae_dtype = R.resolve_dtype(dtype), R.resolve_dtype(vae_dtype)
        self.device = torch.device(device)
        self.denoiser = _place(denoiser, self.device, self.dtype)
        self.vae = _place(vae, self.device, self.vae_dtype)
        self.scheduler = scheduler
        self.text = dict(text)
        for v in self.text.values():
            if isinstance(v, nn.Module):
                _place(v, self.device, self.dtype)
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.gate: L.LoraGate | None = None
        self._ref_denoiser: nn.Module | None = None
        self._identity: str | None = None
        self._uncond: Tensor | None = None

    # -- engine interface ----------------------------------------------------------------------
    def policy(self, x: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        """Native output (float32) of the trainable model."""
        return self._denoise(self.denoiser, x, t, cond).float()

    __call__ = policy

    @torch.no_grad()
    def reference(self, x: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        """Native output (float32) of the frozen base model."""
        if self._ref_denoiser is not None:
            return self._denoise(self._ref_denoiser, x, t, cond).float()
        if self.gate is None:
            return self._denoise(self.denoiser, x, t, cond).float()
        with L.gated(self.gate, 0.0):
            return self._denoise(self.denoiser, x, t, cond).float()

    def _denoise(self, module: nn.Module, x: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        raise NotImplementedError

    def transition(self, num_steps: int, **kwargs):
        raise NotImplementedError

    def decode(self, latents: Tensor) -> Tensor:
        raise NotImplementedError

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        f = 2 ** (len(self.vae.config.block_out_channels) - 1)
        if height % f or width % f:
            raise ValueError(f"image size {height}x{width} must be a multiple of the VAE factor {f}")
        return (int(self.denoiser.config.in_channels), height // f, width // f)

    # -- text ----------------------------------------------------------------------------------
    @property
    def text_loaded(self) -> bool:
        return any(v is not None for v in self.text.values())

    def _encode(self, prompts: list[str]) -> Tensor:
        raise NotImplementedError

    def _text_options(self) -> dict:
        return {}

    def text_identity(self) -> str:
        """Hash of the text encoders, tokenizers and encoding options (the cache key's model half)."""
        if self._identity is None:
            if not self.text_loaded:
                raise RuntimeError("text encoders are unloaded and no identity was recorded")
            self._identity = encoder_identity({k: self.text.get(k) for k in self.TEXT_COMPONENTS},
                                              {"family": self.family, **self._text_options()})
        return self._identity

    def encode_prompts(self, prompts: Sequence[str]) -> Tensor:
        """Conditioning rows ``[P, L, D]`` (device, model dtype), through the cache when set."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError("encode_prompts takes a list of strings")
        prompts = list(prompts)
        if self.cache_dir is not None:
            cache = EmbeddingCache(self.cache_dir, self.text_identity())
            enc = self._encode_no_grad if self.text_loaded else None
            out = cache.get_or_encode(prompts, enc)
        else:
            if not self.text_loaded:
                raise RuntimeError("text encoders are unloaded and no embedding cache is set (cache_dir)")
            out = self._encode_no_grad(prompts)
        return out.to(self.device, self.dtype)

    @torch.no_grad()
    def _encode_no_grad(self, prompts: list[str]) -> Tensor:
        return self._encode(prompts)

    def uncond(self) -> Tensor:
        """The empty-prompt conditioning ``[1, L, D]`` used for CFG (the pipelines' negative prompt "")."""
        if self._uncond is None:
            self._uncond = self.encode_prompts([""])
        return self._uncond

    def unload_text_encoders(self) -> None:
        """Drop the text encoders (after recording their identity and the uncond rows); later
        prompts must come from the cache."""
        if self.text_loaded:
            self.text_identity()
            self.uncond()
        self.text = {k: None for k in self.text}

    # -- training ------------------------------------------------------------------------------
    def add_lora(self, rank: int = 8, alpha: float | None = None, target_modules=L.DEFAULT_TARGETS,
                 dropout: float = 0.0) -> list[nn.Parameter]:
        """peft LoRA on the denoiser's attention projections; returns the trainable parameters."""
        if self._ref_denoiser is not None:
            raise RuntimeError("full fine-tuning is on; LoRA and full fine-tuning are exclusive")
        self.gate = L.add_lora(self.denoiser, rank, alpha, target_modules, dropout)
        return self.trainable_parameters()

    def enable_full_finetune(self) -> list[nn.Parameter]:
        """Train every denoiser weight; the reference becomes a frozen deep copy (2x the weights)."""
        if self.gate is not None:
            raise RuntimeError("a LoRA adapter is attached; LoRA and full fine-tuning are exclusive")
        self._ref_denoiser = L.frozen_copy(self.denoiser)
        self.denoiser.requires_grad_(True)
        return self.trainable_parameters()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.denoiser.parameters() if p.requires_grad]

    def set_lora_scale(self, value: float) -> None:
        """Multiply the LoRA update by ``value`` (1: trained policy, 0: base); an in-place buffer write."""
        if self.gate is None:
            raise RuntimeError("no LoRA adapter attached (add_lora)")
        self.gate.value.fill_(float(value))

    def export_lora(self, directory) -> Path:
        """``directory/pytorch_lora_weights.safetensors``, loadable by the diffusers pipeline's
        ``load_lora_weights(directory)``."""
        if self.gate is None:
            raise RuntimeError("no LoRA adapter attached (add_lora)")
        return L.export_lora(self.denoiser, self.family, directory)

    def make_optimizer(self, kind: str = "adamw", **kwargs) -> torch.optim.Optimizer:
        return R.make_optimizer(self.trainable_parameters(), kind, **kwargs)

    def train(self, mode: bool = True) -> "DiffusionAdapter":
        """Train/eval mode of the trainable denoiser (gradient checkpointing acts in train mode)."""
        self.denoiser.train(mode)
        return self

    # -- runtime -------------------------------------------------------------------------------
    def to(self, device) -> "DiffusionAdapter":
        self.device = torch.device(device)
        for m in (self.denoiser, self.vae, self._ref_denoiser, *self.text.values()):
            if isinstance(m, nn.Module):
                m.to(self.device)
        if self._uncond is not None:
            self._uncond = self._uncond.to(self.device)
        return self

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        R.set_gradient_checkpointing(self.denoiser, enabled)

    def set_attention_backend(self, name: str) -> None:
        for m in (self.denoiser, self._ref_denoiser):
            if m is not None:
                R.set_attention_backend(m, name)

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.denoiser.parameters() if p.requires_grad or not trainable_only)


def _place(module: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Move to ``device``, cast floating weights to ``dtype`` only when they differ, freeze, eval."""
    module.to(device)
    if any(p.is_floating_point() and p.dtype != dtype for p in module.parameters()):
        module.to(dtype=dtype)
    return module.eval().requires_grad_(False)


def check_folder(path, required: dict[str, tuple[str, ...]]) -> Path:
    """One-line ``FileNotFoundError`` naming the path when a diffusers folder or file is missing.
    ``required``: ``{subfolder: (file, ...)}``; any one of the files suffices."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"model folder not found: {p}")
    for sub, files in required.items():
        if not any((p / sub / f).is_file() for f in files):
            raise FileNotFoundError(f"{p}: missing {sub}/{files[0]} (not a complete diffusers model folder)")
    return p


def load_component(cls, path: Path, sub: str, **kwargs):
    """``cls.from_pretrained(path/sub, local_files_only=True)`` with a one-line error naming the path."""
    try:
        return cls.from_pretrained(str(path / sub), local_files_only=True, **kwargs)
    except (OSError, ValueError, EnvironmentError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FileNotFoundError(f"{path / sub}: cannot load {cls.__name__} ({first})") from None


@contextlib.contextmanager
def seeded(seed: int, device="cpu"):
    """Build random-weight models reproducibly, directly on ``device``, leaving the global RNG
    state as it was."""
    dev = torch.device(device)
    forked = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=forked), dev:
        torch.manual_seed(seed)
        yield
