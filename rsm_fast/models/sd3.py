"""Stable Diffusion 3 / 3.5: ``SD3Transformer2DModel`` (velocity, rectified flow) + flow SDE/ODE tables.

* Time: the engine's ``t`` is the flow time in [0, 1] (the transition's ``t`` table holds the
  scheduler's ``sigmas``); the transformer gets ``timestep = t * num_train_timesteps`` (= 1000), as
  ``StableDiffusion3Pipeline`` passes ``scheduler.timesteps = sigmas * num_train_timesteps``.
* Conditioning, packed in one tensor ``[L + k, D]`` per prompt (D = ``joint_attention_dim``):
  rows ``0..L-1`` are the pipeline's ``prompt_embeds`` (CLIP-L and CLIP-G penultimate hidden states
  concatenated on features, zero-padded to D, then the T5 tokens), and the last
  ``k = ceil(pooled_projection_dim / D)`` rows hold the pooled projection (CLIP-L and CLIP-G
  ``text_embeds`` concatenated), zero-padded to ``k * D`` (SD3.5-M: 2048 <= 4096, k = 1). The
  adapter splits it back before calling the transformer. A plain tensor keeps the engine's
  ``index_select`` / slicing / ``cat`` / ``expand`` unchanged, at the cost of one extra token row.
  Prompts are encoded as ``StableDiffusion3Pipeline.encode_prompt`` does (no clip skip).
* T5 is optional: without ``text_encoder_3`` its rows are zeros of length ``max_sequence_length``,
  exactly what the diffusers pipeline feeds when ``text_encoder_3=None`` (SD3's documented
  "drop T5" mode); the T5 rows stay in the layout so the shapes do not depend on the choice.
* Transition: diffusers ``FlowMatchEulerDiscreteScheduler.set_timesteps`` sigmas (static shift;
  SD3.5-M's config: shift 3.0, no dynamic shifting) into the Flow-GRPO SDE (spec §2.3,
  ``noise_level`` a = 0.7 for SD3.5-M), the DanceGRPO SDE, or the Euler ODE
  (``x' = x + (sigma_{i+1} - sigma_i) v``, the scheduler's ``step``).
* Decode: ``vae.decode(z / scaling_factor + shift_factor)``, then ``(x / 2 + 0.5).clamp(0, 1)``.
* Loading: ``text_encoders=False`` builds or loads no text encoder now (see :mod:`.sd15`); ``t5``
  decides whether the loader brings T5, and is part of the cache identity.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import transitions as T
from .adapter import DiffusionAdapter, build_recipe, check_folder, load_component, seeded
from .text import clip_special_ids, folder_fingerprint, tiny_clip_tokenizer, tiny_t5_tokenizer

KINDS = ("sde", "ode", "dance")


class SD3Adapter(DiffusionAdapter):
    family = "sd3"
    native = "v"
    denoiser_folder = "transformer"
    TEXT_COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")
    TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")

    def __init__(self, transformer, vae, text_encoder, text_encoder_2, text_encoder_3, tokenizer, tokenizer_2,
                 tokenizer_3, scheduler, *, max_sequence_length: int | None = None, t5: bool | None = None,
                 **kwargs):
        from diffusers import FlowMatchEulerDiscreteScheduler

        c = scheduler.config
        for flag in ("use_dynamic_shifting", "invert_sigmas", "use_karras_sigmas", "use_exponential_sigmas",
                     "use_beta_sigmas", "shift_terminal"):
            if c.get(flag):
                raise ValueError(f"scheduler config sets {flag}; the SD3 adapter supports the static-shift schedule")
        t5 = text_encoder_3 is not None if t5 is None else bool(t5)   # (False with an encoder given: dropped)
        if t5 and tokenizer_3 is None:
            raise ValueError("text_encoder_3 (T5) needs tokenizer_3")
        if not t5:
            text_encoder_3 = None
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(c)
        text = dict(text_encoder=text_encoder, text_encoder_2=text_encoder_2, text_encoder_3=text_encoder_3,
                    tokenizer=tokenizer, tokenizer_2=tokenizer_2, tokenizer_3=tokenizer_3)
        super().__init__(transformer, vae, scheduler, text, **kwargs)
        tc = transformer.config
        self.joint_dim, self.pooled_dim = int(tc.joint_attention_dim), int(tc.pooled_projection_dim)
        self.pooled_rows = math.ceil(self.pooled_dim / self.joint_dim)
        if max_sequence_length is None:   # the pipeline's default 256, capped by the T5 tokenizer
            max_sequence_length = min(256, int(tokenizer_3.model_max_length)) if tokenizer_3 is not None else 256
        self.max_sequence_length = int(max_sequence_length)
        self.clip_length = int(tokenizer.model_max_length)
        self.t5 = t5
        self.time_scale = float(scheduler.config.num_train_timesteps)

    # -- conditioning layout -------------------------------------------------------------------
    def pack(self, prompt_embeds: Tensor, pooled: Tensor) -> Tensor:
        """``[P, L, D]`` token rows + ``[P, pooled_dim]`` -> ``[P, L + k, D]``."""
        P, D, k = prompt_embeds.shape[0], self.joint_dim, self.pooled_rows
        rows = F.pad(pooled.to(prompt_embeds.dtype), (0, k * D - self.pooled_dim)).reshape(P, k, D)
        return torch.cat([prompt_embeds, rows], dim=1)

    def unpack(self, cond: Tensor) -> tuple[Tensor, Tensor]:
        k = self.pooled_rows
        pooled = cond[:, -k:].reshape(cond.shape[0], k * self.joint_dim)[:, :self.pooled_dim]
        return cond[:, :-k], pooled

    # -- model ---------------------------------------------------------------------------------
    def _denoise(self, module: nn.Module, x: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        if cond is None:
            raise ValueError("SD3 needs conditioning rows (prompt + pooled); use uncond() for none")
        pe, pooled = self.unpack(cond.to(self.dtype))
        return module(hidden_states=x.to(self.dtype), timestep=t * self.time_scale, encoder_hidden_states=pe,
                      pooled_projections=pooled, return_dict=False)[0]

    def _clip_ids(self, which: str, prompts: list[str]) -> Tensor:
        tok = self.text["tokenizer" + which]
        return tok(prompts, padding="max_length", max_length=self.clip_length, truncation=True,
                   return_tensors="pt").input_ids

    def _clip(self, which: str, ids: Tensor) -> tuple[Tensor, Tensor]:
        """Penultimate hidden states and the projected pooled embedding of one CLIP encoder."""
        out = self.text["text_encoder" + which](ids.to(self.device), output_hidden_states=True)
        return out.hidden_states[-2].to(self.dtype), out[0]

    def _assemble(self, clip_pairs, t5: Tensor) -> Tensor:
        """``[(hidden, pooled)]`` of CLIP-L and CLIP-G + T5 rows -> the packed ``[P, L + k, D]``."""
        (h1, p1), (h2, p2) = clip_pairs
        clip = F.pad(torch.cat([h1, h2], dim=-1), (0, t5.shape[-1] - h1.shape[-1] - h2.shape[-1]))
        return self.pack(torch.cat([clip, t5.to(clip.dtype)], dim=-2), torch.cat([p1, p2], dim=-1))

    def _encode(self, prompts: list[str]) -> Tensor:
        pairs = [self._clip(w, self._clip_ids(w, prompts)) for w in ("", "_2")]
        if self.t5:
            tok = self.text["tokenizer_3"]
            ids = tok(prompts, padding="max_length", max_length=self.max_sequence_length, truncation=True,
                      add_special_tokens=True, return_tensors="pt").input_ids
            t5 = self.text["text_encoder_3"](ids.to(self.device))[0]
        else:
            t5 = torch.zeros(len(prompts), self.max_sequence_length, self.joint_dim, device=self.device,
                             dtype=self.dtype)
        return self._assemble(pairs, t5)

    # text-encoder LoRA (adapter.add_text_lora): CLIP-L and CLIP-G train, T5 is frozen rows
    TRAINED_TEXT = ("text_encoder", "text_encoder_2")

    def _token_ids(self, prompts: list[str]) -> Tensor:
        return torch.cat([self._clip_ids("", prompts), self._clip_ids("_2", prompts)], dim=1)

    def _frozen_rows(self, base: Tensor) -> Tensor:
        pe, _ = self.unpack(base)
        return pe[:, self.clip_length:]           # the T5 rows (zeros without T5)

    def _text_rows(self, ids: Tensor, frozen: Tensor | None) -> Tensor:
        n = self.clip_length
        pairs = [self._clip("", ids[:, :n]), self._clip("_2", ids[:, n:])]
        return self._assemble(pairs, frozen.to(self.device, self.dtype))

    def _text_options(self) -> dict:
        return {"clip_length": self.clip_length, "max_sequence_length": self.max_sequence_length, "t5": self.t5,
                "pooled_rows": self.pooled_rows}

    # -- sampler -------------------------------------------------------------------------------
    def _scheduler_copy(self):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config)

    def sigmas(self, num_steps: int) -> Tensor:
        """The scheduler's ``N + 1`` sigmas (1 ... 0), float64 copies of its float32 values."""
        s = self._scheduler_copy()
        s.set_timesteps(num_steps)
        return s.sigmas.to(torch.float64)

    def transition(self, num_steps: int, kind: str = "sde", noise_level: float = 0.7, eta: float = 0.3):
        """``kind``: ``"sde"`` Flow-GRPO (noise level a), ``"ode"`` Euler, ``"dance"`` DanceGRPO (eta)."""
        sg = self.sigmas(num_steps)
        if kind == "sde":
            return T.flow_grpo_sde(sg, noise_level)
        if kind == "ode":
            return T.flow_ode(sg)
        if kind == "dance":
            return T.dance_sde(sg, eta)
        raise ValueError(f"SD3 transition kind must be one of {KINDS}, got {kind!r}")

    # -- images --------------------------------------------------------------------------------
    def decode(self, latents: Tensor) -> Tensor:
        c = self.vae.config
        z = latents.to(self.device, self.vae_dtype) / c.scaling_factor + (c.shift_factor or 0.0)
        img = self._decode_vae(z)
        return (img.float() / 2 + 0.5).clamp(0, 1)

    # -- diffusers interop ---------------------------------------------------------------------
    def pipeline(self, transformer: nn.Module | None = None):
        """A ``StableDiffusion3Pipeline`` on these components (``transformer`` overrides the denoiser)."""
        from diffusers import StableDiffusion3Pipeline

        if not self.text_loaded and self._text_loader is not None:
            self.load_text_encoders()
        if self.text["text_encoder"] is None:
            raise RuntimeError("pipeline() needs the text encoders")
        tx = self.text
        return StableDiffusion3Pipeline(transformer=transformer or self.denoiser, scheduler=self._scheduler_copy(),
                                        vae=self.vae, text_encoder=tx["text_encoder"], tokenizer=tx["tokenizer"],
                                        text_encoder_2=tx["text_encoder_2"], tokenizer_2=tx["tokenizer_2"],
                                        text_encoder_3=tx["text_encoder_3"], tokenizer_3=tx["tokenizer_3"])

    def save_pretrained(self, directory) -> Path:
        if self.gate is not None:
            raise RuntimeError("save_pretrained writes base weights; export the LoRA with export_lora")
        self.pipeline().save_pretrained(str(directory))
        return Path(directory)


def build_sd3(cfg: dict, *, seed: int = 0, t5: bool = True, text_encoders: bool = True, **kwargs) -> SD3Adapter:
    """Random-weight SD3-style model from a :mod:`.configs` dict (``t5=False``: drop T5;
    ``text_encoders=False``: the encoders are built when first needed, with an eager build's weights)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    tk = cfg["tokenizer"]
    tok, tok2 = tiny_clip_tokenizer(tk["max_length"]), tiny_clip_tokenizer(tk["max_length"])
    tok3 = tiny_t5_tokenizer(tk["t5_max_length"]) if t5 else None
    device = kwargs.get("device", "cpu")

    def text(state=None, keys=None):      # T5 is drawn last: leaving it out changes neither CLIP
        with seeded(seed, device, state):
            te = CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder"], **clip_special_ids(tok)))
            te2 = CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder_2"], **clip_special_ids(tok2)))
            te3 = (T5EncoderModel(T5Config(**cfg["text_encoder_3"], pad_token_id=0, eos_token_id=1,
                                           decoder_start_token_id=0))
                   if t5 and (keys is None or "text_encoder_3" in keys) else None)
        return {"text_encoder": te, "text_encoder_2": te2, "text_encoder_3": te3}

    with seeded(seed, device) as rng:
        tr = SD3Transformer2DModel(**cfg["transformer"])
        vae = AutoencoderKL(**cfg["vae"])
        state = rng()
    enc = text(state) if text_encoders else {"text_encoder": None, "text_encoder_2": None, "text_encoder_3": None}
    if not text_encoders:
        kwargs.update(text_loader=lambda keys=None: text(state, keys),
                      text_source=build_recipe("sd3", cfg, seed, device))
    kwargs.setdefault("max_sequence_length", tk["t5_max_length"])
    return SD3Adapter(tr, vae, enc["text_encoder"], enc["text_encoder_2"], enc["text_encoder_3"], tok, tok2, tok3,
                      FlowMatchEulerDiscreteScheduler(**cfg["scheduler"]), t5=t5, **kwargs)


def load_sd3(path, *, t5: bool | None = None, text_encoders: bool = True, **kwargs) -> SD3Adapter:
    """SD3/3.5 from a local diffusers folder, each part in its dtype straight from the files. ``t5``:
    None = load T5 when the folder has it, True = require it, False = drop it (zeros);
    ``text_encoders=False``: the encoders load when first needed."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    tok_files = ("tokenizer_config.json", "vocab.json", "tokenizer.json")
    req = {"transformer": ("config.json",), "vae": ("config.json",), "text_encoder": ("config.json",),
           "text_encoder_2": ("config.json",), "tokenizer": tok_files, "tokenizer_2": tok_files,
           "scheduler": ("scheduler_config.json",)}
    p = Path(path)
    has_t5 = (p / "text_encoder_3" / "config.json").is_file()
    use_t5 = has_t5 if t5 is None else bool(t5)
    if use_t5:
        req.update(text_encoder_3=("config.json",), tokenizer_3=("tokenizer_config.json", "spiece.model",
                                                                  "tokenizer.json"))
    p = check_folder(p, req)
    dtype, vae_dtype = kwargs.get("dtype", "fp32"), kwargs.get("vae_dtype", "fp32")

    def text(keys=None):                  # keys: load only these (None: all)
        parts = {"text_encoder": CLIPTextModelWithProjection, "text_encoder_2": CLIPTextModelWithProjection,
                 "text_encoder_3": T5EncoderModel if use_t5 else None}
        return {k: load_component(cls, p, k, dtype=dtype) if cls is not None and (keys is None or k in keys) else None
                for k, cls in parts.items()}

    enc = text() if text_encoders else {"text_encoder": None, "text_encoder_2": None, "text_encoder_3": None}
    if not text_encoders:
        parts = ["text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"]
        parts += ["text_encoder_3", "tokenizer_3"] if use_t5 else []
        kwargs.update(text_loader=text, text_source=folder_fingerprint([p / q for q in parts]))
    tok3 = load_component(T5TokenizerFast, p, "tokenizer_3") if use_t5 else None
    return SD3Adapter(load_component(SD3Transformer2DModel, p, "transformer", dtype=dtype),
                      load_component(AutoencoderKL, p, "vae", dtype=vae_dtype),
                      enc["text_encoder"], enc["text_encoder_2"], enc["text_encoder_3"],
                      load_component(CLIPTokenizer, p, "tokenizer"), load_component(CLIPTokenizer, p, "tokenizer_2"),
                      tok3, load_component(FlowMatchEulerDiscreteScheduler, p, "scheduler"), t5=use_t5, **kwargs)
