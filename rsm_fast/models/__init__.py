"""Real generators behind the rollout engine's model convention (issue 5).

Public API::

    from rsm_fast.models import build_model, load_model
    m = build_model("sd15-tiny")                 # named config, random weights (configs.CONFIGS)
    m = load_model("/path/to/diffusers/folder")  # local folder; family from model_index.json
    cond, uncond = m.encode_prompts(prompts), m.uncond()   # [P, L, D], [1, L, D]
    tr = m.transition(num_steps, ...)            # GaussianTransition from the scheduler's tables
    engine = RolloutEngine(m.policy, tr, plan, cfg_scale=w)   # m.policy(x, t, cond) -> float32
    f_ref, _ = engine.evaluate_records(m.reference, records, cond, uncond)
    params = m.add_lora(rank=8)                  # or m.enable_full_finetune()
    images = m.decode(records.x0)                # [B, 3, H, W] in [0, 1]
    m.export_lora(out_dir)                       # pipe.load_lora_weights(out_dir) loads it
    m.export_full(out_dir)                       # full fine-tune: out_dir/<unet|transformer> (save_pretrained)

Precision and memory (``dtype``, ``autocast``, ``offload``, lazily loaded text encoders with
``text_encoders=False`` + ``cache_dir``) are keyword arguments of both constructors (:mod:`.adapter`).

Heavy imports (diffusers, transformers, peft) happen on first use, not on ``import rsm_fast.models``.
"""
from __future__ import annotations

import json
from pathlib import Path

from .adapter import DiffusionAdapter
from .configs import CONFIGS, get_config
from .runtime import make_optimizer, peak_memory, reset_peak_memory
from .text import EmbeddingCache, PromptRecord, read_prompts

__all__ = ["build_model", "load_model", "folder_family", "DiffusionAdapter", "CONFIGS", "get_config", "peak_memory",
           "reset_peak_memory", "make_optimizer", "EmbeddingCache", "PromptRecord", "read_prompts"]

_PIPELINES = {"StableDiffusionPipeline": "sd15", "StableDiffusion3Pipeline": "sd3"}


def build_model(name: str, *, seed: int = 0, t5: bool | None = None, **kwargs) -> DiffusionAdapter:
    """Random-weight adapter from a named config. ``kwargs``: ``dtype``, ``vae_dtype``, ``autocast``,
    ``device``, ``cache_dir``, ``offload``, ``text_encoders``; SD3 also ``t5`` (False: drop T5; SD1.5
    has no T5 and ignores it) and ``max_sequence_length``."""
    family, cfg = get_config(name)
    if family == "sd15":
        from .sd15 import build_sd15

        return build_sd15(cfg, seed=seed, **kwargs)
    if t5 is not None:
        kwargs["t5"] = t5
    from .sd3 import build_sd3

    return build_sd3(cfg, seed=seed, **kwargs)


def folder_family(path) -> str:
    """``"sd15"`` / ``"sd3"`` from a diffusers folder's ``model_index.json`` pipeline class."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"model folder not found: {p}")
    idx = p / "model_index.json"
    if not idx.is_file():
        raise FileNotFoundError(f"{p}: missing model_index.json (pass family='sd15' or 'sd3')")
    cls = json.loads(idx.read_text()).get("_class_name", "")
    if cls not in _PIPELINES:
        raise ValueError(f"{p}: pipeline class {cls!r} is not supported; known: {sorted(_PIPELINES)}")
    return _PIPELINES[cls]


def load_model(path, family: str | None = None, t5: bool | None = None, **kwargs) -> DiffusionAdapter:
    """Adapter from a local diffusers folder (``from_pretrained(..., local_files_only=True)``, each
    part in its dtype). ``family`` (``"sd15"``/``"sd3"``) defaults to the folder's
    ``model_index.json`` pipeline class; ``t5`` (SD3 only) as :func:`.sd3.load_sd3`."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"model folder not found: {p}")
    if family is None:
        family = folder_family(p)
    if family == "sd15":
        from .sd15 import load_sd15

        return load_sd15(p, **kwargs)
    if family == "sd3":
        from .sd3 import load_sd3

        return load_sd3(p, t5=t5, **kwargs)
    raise ValueError(f"model family must be 'sd15' or 'sd3', got {family!r}")
