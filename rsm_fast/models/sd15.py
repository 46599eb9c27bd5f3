"""Stable Diffusion 1.5: ``UNet2DConditionModel`` (epsilon prediction, VP) + DDIM-eta tables.

* Time: the engine's ``t`` is the DDIM timestep index (the transition's ``t`` table holds the
  scheduler's ``timesteps``); it goes to the UNet unchanged (the UNet embeds the value as a float,
  so an integer or float tensor of the same value gives the same output).
* Conditioning: ``encoder_hidden_states`` ``[L = 77, 768]`` per prompt, the CLIP text model's last
  hidden state of the ``max_length``-padded prompt, exactly as ``StableDiffusionPipeline.encode_prompt``
  (no clip skip); the unconditional row is the empty prompt.
* Transition: diffusers ``DDIMScheduler`` built from the model's scheduler config (SD1.5 ships a
  PNDM config: steps_offset 1, set_alpha_to_one false, "leading" spacing), its ``set_timesteps``
  timesteps and ``alphas_cumprod``; the last step goes to ``alphas_cumprod[t_last - T//N]`` if that
  index exists, else to ``final_alpha_cumprod`` (= ``alphas_cumprod[0]`` for SD1.5), as
  ``DDIMScheduler.step`` does. Only schedules whose consecutive timesteps differ by ``T // N``
  (what ``step`` assumes) are accepted; ``clip_sample``/``thresholding`` must be off (the
  transition has no clipping), as in SD1.5's config.
* Decode: ``vae.decode(z / scaling_factor)``, then ``(x / 2 + 0.5).clamp(0, 1)`` (the pipeline's
  postprocess), float32 ``[B, 3, H, W]``.
* Loading: ``text_encoders=False`` builds or loads no text encoder now; the adapter gets a loader
  for it and a source identity (the folder's ``text_encoder``/``tokenizer`` files, or the random
  build's recipe), see :mod:`.adapter`.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from .. import transitions as T
from .adapter import DiffusionAdapter, build_recipe, check_folder, load_component, seeded
from .text import clip_special_ids, folder_fingerprint, tiny_clip_tokenizer


class SD15Adapter(DiffusionAdapter):
    family = "sd15"
    native = "eps"
    denoiser_folder = "unet"
    TEXT_COMPONENTS = ("text_encoder", "tokenizer")
    TEXT_ENCODERS = ("text_encoder",)

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler, **kwargs):
        from diffusers import DDIMScheduler

        pred = scheduler.config.get("prediction_type", "epsilon")
        if pred != "epsilon":
            raise ValueError(f"SD1.5 adapter supports epsilon prediction only, got {pred!r}")
        scheduler = DDIMScheduler.from_config(scheduler.config)
        if scheduler.config.clip_sample or scheduler.config.thresholding:
            raise ValueError("scheduler config has clip_sample/thresholding on; the DDIM transition has no clipping")
        super().__init__(unet, vae, scheduler, {"text_encoder": text_encoder, "tokenizer": tokenizer}, **kwargs)
        self.max_length = int(tokenizer.model_max_length)

    # -- model ---------------------------------------------------------------------------------
    def _denoise(self, module: nn.Module, x: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        if cond is None:
            raise ValueError("SD1.5 needs conditioning rows (encoder_hidden_states); use uncond() for none")
        return module(x.to(self.dtype), t, encoder_hidden_states=cond.to(self.dtype), return_dict=False)[0]

    def _encode(self, prompts: list[str]) -> Tensor:
        tok, enc = self.text["tokenizer"], self.text["text_encoder"]
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt")
        mask = ids.attention_mask.to(self.device) if getattr(enc.config, "use_attention_mask", False) else None
        return enc(ids.input_ids.to(self.device), attention_mask=mask)[0]

    def _text_options(self) -> dict:
        return {"max_length": self.max_length}

    # text-encoder LoRA (adapter.add_text_lora): the CLIP text model trains, nothing is frozen
    TRAINED_TEXT = ("text_encoder",)

    def _token_ids(self, prompts: list[str]) -> Tensor:
        tok = self.text["tokenizer"]
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt")
        return torch.cat([ids.input_ids, ids.attention_mask], dim=1)

    def _frozen_rows(self, base: Tensor) -> None:
        return None

    def _text_rows(self, ids: Tensor, frozen: Tensor | None) -> Tensor:
        enc = self.text["text_encoder"]
        n = ids.shape[1] // 2
        mask = ids[:, n:].to(self.device) if getattr(enc.config, "use_attention_mask", False) else None
        return enc(ids[:, :n].to(self.device), attention_mask=mask)[0].to(self.dtype)

    # -- sampler -------------------------------------------------------------------------------
    def _scheduler_copy(self):
        from diffusers import DDIMScheduler

        return DDIMScheduler.from_config(self.scheduler.config)

    def transition(self, num_steps: int, eta: float = 1.0, variance: str = "ddpm", uw_weight: float = 4.5):
        """DDIM-eta (eta = 0: the deterministic DDIM sampler) on the scheduler's own tables."""
        return ddim_transition(self.scheduler, num_steps, eta=eta, variance=variance, uw_weight=uw_weight)

    # -- images --------------------------------------------------------------------------------
    def decode(self, latents: Tensor) -> Tensor:
        z = latents.to(self.device, self.vae_dtype) / self.vae.config.scaling_factor
        img = self._decode_vae(z)
        return (img.float() / 2 + 0.5).clamp(0, 1)

    # -- diffusers interop ---------------------------------------------------------------------
    def pipeline(self, unet: nn.Module | None = None):
        """A ``StableDiffusionPipeline`` on these components (``unet`` overrides the denoiser)."""
        from diffusers import StableDiffusionPipeline

        if not self.text_loaded and self._text_loader is not None:
            self.load_text_encoders()
        if not self.text_loaded:
            raise RuntimeError("pipeline() needs the text encoders")
        return StableDiffusionPipeline(vae=self.vae, text_encoder=self.text["text_encoder"],
                                       tokenizer=self.text["tokenizer"], unet=unet or self.denoiser,
                                       scheduler=self._scheduler_copy(), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)

    def save_pretrained(self, directory) -> Path:
        """Write a diffusers folder (base weights; refuse once a LoRA is attached)."""
        if self.gate is not None:
            raise RuntimeError("save_pretrained writes base weights; export the LoRA with export_lora")
        self.pipeline().save_pretrained(str(directory))
        return Path(directory)


def ddim_transition(scheduler, num_steps: int, eta: float = 1.0, variance: str = "ddpm", uw_weight: float = 4.5):
    """:func:`rsm_fast.transitions.ddim` on a diffusers scheduler's config (see the module docstring)."""
    from diffusers import DDIMScheduler

    s = DDIMScheduler.from_config(scheduler.config)
    s.set_timesteps(num_steps)
    ts = s.timesteps.to(torch.long)
    ratio = s.config.num_train_timesteps // num_steps
    if ts.numel() > 1 and not bool(((ts[:-1] - ts[1:]) == ratio).all()):
        raise ValueError(f"timestep_spacing={s.config.timestep_spacing!r} gives steps that are not T//N = "
                         f"{ratio} apart; use 'leading' (SD1.5's) or a step count dividing T")
    ac = s.alphas_cumprod.to(torch.float64)
    last_prev = int(ts[-1]) - ratio
    final = float(ac[last_prev]) if last_prev >= 0 else float(s.final_alpha_cumprod)
    return T.ddim(ac, ts, eta=eta, final_alpha_cumprod=final, variance=variance, uw_weight=uw_weight)


def build_sd15(cfg: dict, *, seed: int = 0, text_encoders: bool = True, **kwargs) -> SD15Adapter:
    """Random-weight SD1.5-style model from a :mod:`.configs` dict (``text_encoders=False``: the text
    encoder is built when first needed, with the weights an eager build gives it)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tok = tiny_clip_tokenizer(cfg["tokenizer"]["max_length"])
    device = kwargs.get("device", "cpu")

    def text(state=None):
        with seeded(seed, device, state):
            return CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"], **clip_special_ids(tok)))

    with seeded(seed, device) as rng:
        unet = UNet2DConditionModel(**cfg["unet"])
        vae = AutoencoderKL(**cfg["vae"])
        state = rng()
    te = text(state) if text_encoders else None
    if not text_encoders:
        kwargs.update(text_loader=lambda keys=None: {"text_encoder": text(state)},
                      text_source=build_recipe("sd15", cfg, seed, device))
    return SD15Adapter(unet, vae, te, tok, DDIMScheduler(**cfg["scheduler"]), **kwargs)


def load_sd15(path, *, text_encoders: bool = True, **kwargs) -> SD15Adapter:
    """SD1.5 from a local diffusers folder (``unet``, ``vae``, ``text_encoder``, ``tokenizer``,
    ``scheduler``), each in its dtype straight from the files; ``text_encoders=False``: the text
    encoder loads when first needed."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    p = check_folder(path, {"unet": ("config.json",), "vae": ("config.json",), "text_encoder": ("config.json",),
                            "tokenizer": ("tokenizer_config.json", "vocab.json", "tokenizer.json"),
                            "scheduler": ("scheduler_config.json",)})
    dtype, vae_dtype = kwargs.get("dtype", "fp32"), kwargs.get("vae_dtype", "fp32")

    def text():
        return load_component(CLIPTextModel, p, "text_encoder", dtype=dtype)

    if not text_encoders:
        kwargs.update(text_loader=lambda keys=None: {"text_encoder": text()},
                      text_source=folder_fingerprint([p / "text_encoder", p / "tokenizer"]))
    return SD15Adapter(load_component(UNet2DConditionModel, p, "unet", dtype=dtype),
                       load_component(AutoencoderKL, p, "vae", dtype=vae_dtype),
                       text() if text_encoders else None, load_component(CLIPTokenizer, p, "tokenizer"),
                       load_component(DDIMScheduler, p, "scheduler"), **kwargs)
