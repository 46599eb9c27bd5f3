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

Precision: weights in ``dtype`` (fp32/bf16/fp16; a folder loads straight in it through
``from_pretrained(torch_dtype=...)``), the VAE in ``vae_dtype`` (fp32 by default, as flow_grpo
keeps it); inputs are cast to the model dtype on entry and the output to float32 on exit, so the
sampler and the losses never see bf16. ``autocast`` (bf16/fp16) runs every denoiser forward (policy
and reference) under ``torch.autocast``.

Text encoders. Eager (the default of the builders): loaded with the adapter and kept. Lazy
(``text_loader``, with a source identity ``text_source``): not loaded until a prompt misses the
cache; :meth:`fill_cache` encodes a prompt list once (under the cache's lock), then frees them, so a
run whose prompts are all cached never loads an encoder (:mod:`.text`).

Memory. ``offload=True``: the frozen parts (VAE, text encoders, a full fine-tune's reference copy
``_ref_denoiser``) live in CPU memory and visit ``device`` only while they run
(:func:`.runtime.visiting`); the trained denoiser stays on ``device``. :meth:`set_vae_memory` turns
on diffusers' VAE slicing (decode one image at a time) and tiling (decode in overlapping tiles).

Export: :meth:`export_lora` (diffusers' ``load_lora_weights`` format) and :meth:`export_full` (the
whole denoiser through its ``save_pretrained``, e.g. ``directory/transformer``, loadable by
``SD3Transformer2DModel.from_pretrained``); both take an optional ``state_dict`` gathered by the
caller (sharded ranks) to write instead of the module's own.
"""
from __future__ import annotations

import contextlib
import gc
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from . import lora as L
from . import runtime as R
from .text import EmbeddingCache, encoder_identity, source_identity
from .text_lora import PromptTable, TextLoraMixin

PROMPT_BATCH = 16     # prompts per text-encoder call while a prompt list fills the cache


class DiffusionAdapter(TextLoraMixin):
    """Base class; subclasses implement ``_denoise``, ``_encode``, ``transition``, ``decode``."""

    family = ""
    native = ""
    denoiser_folder = ""                      # the pipeline's subfolder of the denoiser (export_full)
    TEXT_COMPONENTS: tuple[str, ...] = ()
    TEXT_ENCODERS: tuple[str, ...] = ()       # the modules among TEXT_COMPONENTS (the rest: tokenizers)

    def __init__(self, denoiser: nn.Module, vae: nn.Module, scheduler, text: dict, *, dtype="fp32",
                 vae_dtype="fp32", device="cpu", cache_dir=None, autocast=None, offload: bool = False,
                 text_loader: Callable[[], dict] | None = None, text_source: str | None = None):
        self.dtype, self.vae_dtype = R.resolve_dtype(dtype), R.resolve_dtype(vae_dtype)
        self.autocast = R.resolve_autocast(autocast)
        self.device = torch.device(device)
        self.offload = bool(offload)
        self._home = torch.device("cpu") if self.offload else self.device    # where frozen parts live
        self.denoiser = _place(denoiser, self.device, self.dtype)
        self.vae = _place(vae, self._home, self.vae_dtype)
        self.scheduler = scheduler
        self.text = dict(text)
        for v in self.text.values():
            if isinstance(v, nn.Module):
                _place(v, self._home, self.dtype)
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self._text_loader = text_loader
        self._text_source = text_source
        self.text_loads = 0                   # times the lazy loader ran (tests, logs)
        self.gate: L.LoraGate | None = None
        self._ref_denoiser: nn.Module | None = None
        self._identity: str | None = None
        self._uncond: Tensor | None = None
        self._table: PromptTable | None = None     # text-encoder LoRA (add_text_lora)
        self._memo: dict = {}
        self._memo_version: tuple = ()

    # -- engine interface ----------------------------------------------------------------------
    def policy(self, x: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        """Native output (float32) of the trainable model."""
        with R.autocast(self.device, self.autocast):
            out = self._denoise(self.denoiser, x, t, self._conditioning(cond))
        return out.float()

    __call__ = policy

    @torch.no_grad()
    def reference(self, x: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        """Native output (float32) of the frozen base model."""
        with R.autocast(self.device, self.autocast):
            if self._ref_denoiser is not None:
                with R.visiting(self._ref_denoiser, self.device, self.offload):
                    out = self._denoise(self._ref_denoiser, x, t, cond)
            elif self.gate is None:
                out = self._denoise(self.denoiser, x, t, cond)
            else:                 # every LoRA off, the text encoders' too
                with L.gated(self.gate, 0.0):
                    out = self._denoise(self.denoiser, x, t, self._conditioning(cond))
        return out.float()

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
        """Whether any text encoder is in memory (tokenizers do not count)."""
        return any(self.text.get(k) is not None for k in self.TEXT_ENCODERS)

    def _encode(self, prompts: list[str]) -> Tensor:
        raise NotImplementedError

    def _text_options(self) -> dict:
        return {}

    def text_identity(self) -> str:
        """The cache key's model half: the source identity of lazily loaded encoders (their files or
        build recipe, the options and the dtype), else a hash of the loaded encoders, tokenizers and
        encoding options."""
        if self._identity is None:
            if self._text_source is not None:
                self._identity = source_identity(self._text_source, {"family": self.family, "dtype": str(self.dtype),
                                                                     **self._text_options()})
            elif not self.text_loaded:
                raise RuntimeError("text encoders are unloaded and no identity was recorded")
            else:
                self._identity = encoder_identity({k: self.text.get(k) for k in self.TEXT_COMPONENTS},
                                                  {"family": self.family, **self._text_options()})
        return self._identity

    def load_text_encoders(self, keys: Sequence[str] | None = None) -> None:
        """Load the text encoders through the lazy loader (in the model dtype, on ``device``, or in
        CPU memory under ``offload``); a no-op when they are loaded. ``keys``: only these (and only
        when one of them is missing)."""
        if self.text_loaded if keys is None else all(self.text.get(k) is not None for k in keys):
            return
        if self._text_loader is None:
            raise RuntimeError("text encoders are unloaded and this adapter has no loader for them")
        for k, v in self._text_loader(None if keys is None else tuple(keys)).items():
            if self.text.get(k) is None:
                self.text[k] = _place(v, self._home, self.dtype) if isinstance(v, nn.Module) else v
        self.text_loads += 1

    def encode_prompts(self, prompts: Sequence[str]) -> Tensor:
        """Conditioning rows ``[P, L, D]`` (device, model dtype), through the cache when set. A miss
        with unloaded encoders loads them through the lazy loader, encodes and frees them again."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError("encode_prompts takes a list of strings")
        prompts = list(prompts)
        if self._table is not None:              # text-encoder LoRA: rows are prompt indices
            return self._table.index(prompts).to(self.device)
        if self.cache_dir is not None:
            cache = EmbeddingCache(self.cache_dir, self.text_identity())
            enc = self._encode_no_grad if self.text_loaded else self._encode_lazily if self._text_loader else None
            out = cache.get_or_encode(prompts, enc, batch=PROMPT_BATCH)
        else:
            if not self.text_loaded:
                if self._text_loader is None:
                    raise RuntimeError("text encoders are unloaded and no embedding cache is set (cache_dir)")
                self.load_text_encoders()        # no cache: the encoders stay loaded
            out = self._encode_no_grad(prompts)
        return out.to(self.device, self.dtype)

    def _encode_lazily(self, prompts: list[str]) -> Tensor:
        self.load_text_encoders()
        try:
            return self._encode_no_grad(prompts)
        finally:
            self._free_text()

    @torch.no_grad()
    def _encode_no_grad(self, prompts: list[str]) -> Tensor:
        with contextlib.ExitStack() as stack:
            for k in self.TEXT_ENCODERS:
                stack.enter_context(R.visiting(self.text.get(k), self.device, self.offload))
            return self._encode(prompts)

    def fill_cache(self, prompts: Sequence[str]) -> int:
        """Encode every prompt of ``prompts`` and the empty prompt into the cache once (under the
        cache's lock, :data:`PROMPT_BATCH` prompts a call), then free the text encoders. Returns the
        number of prompts encoded (0: all were cached, no encoder was loaded)."""
        if self.cache_dir is None:
            raise RuntimeError("fill_cache needs an embedding cache (cache_dir)")
        cache = EmbeddingCache(self.cache_dir, self.text_identity())
        with cache.locked():
            missing = cache.missing([*prompts, ""])
            if missing:
                self.load_text_encoders()          # (a no-op when they are loaded)
                cache.get_or_encode(missing, self._encode_no_grad, batch=PROMPT_BATCH)
        self.unload_text_encoders()
        return len(missing)

    def uncond(self) -> Tensor:
        """The empty-prompt conditioning ``[1, L, D]`` used for CFG (the pipelines' negative prompt "")."""
        if self._uncond is None:
            self._uncond = self.encode_prompts([""])
        return self._uncond

    def unload_text_encoders(self) -> None:
        """Drop the text encoders (after recording their identity and the uncond rows); later
        prompts come from the cache (or the lazy loader)."""
        if self.text_loaded or self._text_loader is not None:
            self.text_identity()
            self.uncond()
        self._free_text()

    def _free_text(self) -> None:
        if not self.text_loaded:
            return
        for k in self.TEXT_ENCODERS:
            if self._table is None or k not in self.TRAINED_TEXT:    # trained encoders stay
                self.text[k] = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- training ------------------------------------------------------------------------------
    def add_lora(self, rank: int = 8, alpha: float | None = None, target_modules=L.DEFAULT_TARGETS,
                 dropout: float = 0.0) -> list[nn.Parameter]:
        """peft LoRA on the denoiser's attention projections; returns the trainable parameters."""
        if self._ref_denoiser is not None:
            raise RuntimeError("full fine-tuning is on; LoRA and full fine-tuning are exclusive")
        self.gate = L.add_lora(self.denoiser, rank, alpha, target_modules, dropout)
        return self.trainable_parameters()

    def enable_full_finetune(self) -> list[nn.Parameter]:
        """Train every denoiser weight; the reference becomes a frozen copy (2x the weights; in CPU
        memory under ``offload``, built there without a second copy on the device)."""
        if self.gate is not None:
            raise RuntimeError("a LoRA adapter is attached; LoRA and full fine-tuning are exclusive")
        self._ref_denoiser = L.frozen_copy(self.denoiser, device=self._home if self.offload else None)
        self.denoiser.requires_grad_(True)
        return self.trainable_parameters()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for m in self.trained_modules().values() for p in m.parameters() if p.requires_grad]

    def trained_modules(self) -> dict[str, nn.Module]:
        """``{"denoiser": ..., <text encoder name>: ...}``: the modules holding trained parameters."""
        out = {"denoiser": self.denoiser}
        if self._table is not None:
            out.update({k: self.text[k] for k in self.TRAINED_TEXT})
        return out

    def set_lora_scale(self, value: float) -> None:
        """Multiply the LoRA update by ``value`` (1: trained policy, 0: base); an in-place buffer write."""
        if self.gate is None:
            raise RuntimeError("no LoRA adapter attached (add_lora)")
        self.gate.value.fill_(float(value))

    def export_lora(self, directory, state_dict: dict | None = None) -> Path:
        """``directory/pytorch_lora_weights.safetensors``, loadable by the diffusers pipeline's
        ``load_lora_weights(directory)``; ``state_dict``: the denoiser's (LoRA) values to write
        instead of the module's own."""
        if self.gate is None:
            raise RuntimeError("no LoRA adapter attached (add_lora)")
        if self._table is None:
            return L.export_lora(self.denoiser, self.family, directory, state_dict=state_dict)
        parts = self.trained_modules()          # state_dict keys: "<part>.<parameter name>"
        split = None if state_dict is None else {
            k: {n[len(k) + 1:]: v for n, v in state_dict.items() if n.startswith(k + ".")} for k in parts}
        text = {k: (m, None if split is None else split[k]) for k, m in parts.items() if k != "denoiser"}
        return L.export_lora(self.denoiser, self.family, directory, state_dict=None if split is None else split["denoiser"],
                             text=text)

    def export_full(self, directory, state_dict: dict | None = None) -> Path:
        """The whole denoiser in diffusers format, ``directory/<unet|transformer>`` (config and
        safetensors shards, ``from_pretrained``-loadable); ``state_dict``: a full state dict
        gathered by the caller (e.g. from sharded ranks) written instead of the module's own."""
        if self.gate is not None:
            raise RuntimeError("a LoRA adapter is attached; export it with export_lora")
        return L.save_module(self.denoiser, Path(directory) / self.denoiser_folder, state_dict)

    def make_optimizer(self, kind: str = "adamw", **kwargs) -> torch.optim.Optimizer:
        return R.make_optimizer(self.trainable_parameters(), kind, **kwargs)

    def train(self, mode: bool = True) -> "DiffusionAdapter":
        """Train/eval mode of the trainable denoiser (gradient checkpointing acts in train mode)."""
        self.denoiser.train(mode)
        return self

    # -- runtime -------------------------------------------------------------------------------
    def to(self, device) -> "DiffusionAdapter":
        """Move to ``device`` (under ``offload`` the frozen parts stay in CPU memory)."""
        self.device = torch.device(device)
        self._home = torch.device("cpu") if self.offload else self.device
        self.denoiser.to(self.device)
        trained = self.trained_modules()
        for k, m in self.text.items():
            if isinstance(m, nn.Module):
                m.to(self.device if k in trained else self._home)
        for m in (self.vae, self._ref_denoiser):
            if m is not None:
                m.to(self._home)
        if self._uncond is not None:
            self._uncond = self._uncond.to(self.device)
        return self

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        R.set_gradient_checkpointing(self.denoiser, enabled)

    def set_vae_memory(self, slicing: bool = False, tiling: bool = False) -> None:
        """diffusers' VAE slicing (decode the batch one image at a time: same images) and tiling
        (overlapping tiles, blended: images differ slightly at the seams; only above the VAE's
        ``sample_size``)."""
        self.vae.enable_slicing() if slicing else self.vae.disable_slicing()
        self.vae.enable_tiling() if tiling else self.vae.disable_tiling()

    def _decode_vae(self, z: Tensor) -> Tensor:
        with R.visiting(self.vae, self.device, self.offload):
            return self.vae.decode(z, return_dict=False)[0]

    def set_attention_backend(self, name: str) -> None:
        for m in (self.denoiser, self._ref_denoiser):
            if m is not None:
                R.set_attention_backend(m, name)

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.denoiser.parameters() if p.requires_grad or not trainable_only)


def _place(module: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Move to ``device``, cast floating weights to ``dtype`` unless they are in it already (a folder
    loads in ``dtype``; transformers keeps a few in float32 on purpose, ``_keep_in_fp32_modules``,
    e.g. T5's ``wo``), freeze, eval."""
    module.to(device)
    dts = {p.dtype for p in module.parameters() if p.is_floating_point()}
    keep = bool(getattr(module, "_keep_in_fp32_modules", None))
    if not (dts <= {dtype} or (keep and dtype in dts and dts <= {dtype, torch.float32})):
        nn.Module.to(module, dtype=dtype)    # (not ModelMixin.to: it warns about fp32 modules these have none of)
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


def load_component(cls, path: Path, sub: str, dtype=None, **kwargs):
    """``cls.from_pretrained(path/sub, local_files_only=True)`` with a one-line error naming the path;
    ``dtype``: load the weights straight in it (diffusers ``torch_dtype=``, transformers ``dtype=``)."""
    if dtype is not None:
        kwargs["torch_dtype" if cls.__module__.startswith("diffusers") else "dtype"] = R.resolve_dtype(dtype)
    try:
        return cls.from_pretrained(str(path / sub), local_files_only=True, **kwargs)
    except (OSError, ValueError, EnvironmentError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FileNotFoundError(f"{path / sub}: cannot load {cls.__name__} ({first})") from None


def build_recipe(family: str, cfg: dict, seed: int, device) -> str:
    """What a random build's text encoders depend on (their source identity): the whole config (the
    encoders are drawn after the denoiser and the VAE from one seeded stream), the seed, the
    device type (CPU and CUDA generators differ) and the torch version (its RNG algorithms)."""
    import json

    return json.dumps({"build": family, "config": cfg, "seed": int(seed), "device": torch.device(device).type,
                       "torch": torch.__version__}, sort_keys=True, default=str)


@contextlib.contextmanager
def seeded(seed: int, device="cpu", state=None):
    """Build random-weight models reproducibly, directly on ``device``, leaving the global RNG
    state as it was. Yields a function returning the RNG state at that point; ``state`` (such a
    value) continues from it instead of seeding (a lazily built text encoder gets the weights an
    eager build gives it)."""
    dev = torch.device(device)
    forked = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=forked), dev:
        if state is None:
            torch.manual_seed(seed)
        else:
            torch.set_rng_state(state[0])
            if forked:
                torch.cuda.set_rng_state(state[1], forked[0])
        yield lambda: (torch.get_rng_state(), torch.cuda.get_rng_state(forked[0]) if forked else None)
