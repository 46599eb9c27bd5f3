"""Prompts and text conditioning: prompt files, offline tokenizers, an on-disk embedding cache.

* :func:`read_prompts` — ``.txt`` (one prompt per non-blank line) or ``.jsonl`` (one object per
  line with a ``"prompt"`` string; every other key is kept as metadata, e.g. GenEval's
  ``tag``/``include``).
* :func:`tiny_clip_tokenizer`, :func:`tiny_t5_tokenizer` — real ``transformers`` tokenizer classes
  (``CLIPTokenizer``, ``T5TokenizerFast``) built offline from a character vocabulary
  (lower-case letters, digits, punctuation; CLIP marks word ends with ``</w>``, T5 word starts
  with ``▁``), so the diffusers pipelines accept them unchanged and ``save_pretrained`` /
  ``from_pretrained`` round-trip. Used by the ``tiny`` configs and by the random-weight ``full``
  configs (the real vocabularies are not shipped). Unknown characters map to nothing (CLIP) or
  ``<unk>`` (T5); text is lower-cased by CLIP's normaliser.
* :class:`EmbeddingCache` — one safetensors file per (prompt, encoder identity), so the text
  encoders can be unloaded once a prompt set is encoded. The identity
  (:func:`encoder_identity`) hashes the encoders' classes, configs, parameter shapes and a strided
  sample of every parameter tensor, the tokenizers' vocabularies and the encoding options; it
  tells apart different checkpoints and random inits, not a fine-tune that only moved weights
  outside the sampled positions (the encoders are frozen here, so that case does not arise).
"""
from __future__ import annotations

import hashlib
import json
import os
import string
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor

_CHARS = string.ascii_lowercase + string.digits + ".,!?'-"


# -- prompt files ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class PromptRecord:
    prompt: str
    metadata: dict = field(default_factory=dict)


def read_prompts(path) -> list[PromptRecord]:
    """Prompts of a ``.txt`` or ``.jsonl`` file (see module docstring); errors name ``path:line``."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"prompt file not found: {p}")
    out: list[PromptRecord] = []
    lines = p.read_text(encoding="utf-8").splitlines()
    if p.suffix == ".jsonl":
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                raise ValueError(f"{p}:{n}: each JSONL line must be an object with a string 'prompt'")
            meta = {k: v for k, v in obj.items() if k != "prompt"}
            out.append(PromptRecord(obj["prompt"], meta))
    elif p.suffix in (".txt", ""):
        out = [PromptRecord(line.strip()) for line in lines if line.strip()]
    else:
        raise ValueError(f"{p}: prompt files must be .txt (one prompt per line) or .jsonl, got {p.suffix!r}")
    if not out:
        raise ValueError(f"{p}: no prompts")
    return out


# -- offline tokenizers ---------------------------------------------------------------------------
def tiny_clip_tokenizer(max_length: int = 77):
    """A ``CLIPTokenizer`` over single characters (ids 0..85: chars, chars+``</w>``, bos, eos)."""
    from transformers import CLIPTokenizer

    vocab = {c: i for i, c in enumerate(_CHARS)}
    vocab.update({c + "</w>": len(_CHARS) + i for i, c in enumerate(_CHARS)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "vocab.json").write_text(json.dumps(vocab))
        (Path(d) / "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer(str(Path(d) / "vocab.json"), str(Path(d) / "merges.txt"), model_max_length=max_length)


def tiny_t5_tokenizer(max_length: int = 256):
    """A ``T5TokenizerFast`` (unigram) over single characters; ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2."""
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    vocab += [(c, -2.0) for c in _CHARS] + [("\u2581" + c, -1.5) for c in _CHARS]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=max_length)


def clip_special_ids(tokenizer) -> dict:
    """bos/eos/pad ids to write into a CLIP text config so pooling finds the tokenizer's eos."""
    return dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)


# -- encoder identity and the cache ---------------------------------------------------------------
def _module_digest(h, name: str, module) -> None:
    h.update(f"[{name}:{type(module).__name__}]".encode())
    if module is None:
        return
    cfg = getattr(module, "config", None)
    if cfg is not None:
        d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
        for k in ("_name_or_path", "transformers_version", "_diffusers_version", "torch_dtype", "dtype",
                  "_commit_hash", "_attn_implementation_autoset"):
            d.pop(k, None)
        h.update(json.dumps(d, sort_keys=True, default=str).encode())
    if hasattr(module, "get_vocab"):  # a tokenizer
        h.update(json.dumps(sorted(module.get_vocab().items())).encode())
        h.update(str(getattr(module, "model_max_length", "")).encode())
        return
    if isinstance(module, torch.nn.Module):
        with torch.no_grad():
            for pname, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
                flat = p.detach().reshape(-1)
                step = max(1, flat.numel() // 256)
                sample = flat[::step][:256].to(torch.float32).cpu()
                h.update(f"{pname}{tuple(p.shape)}{p.dtype}".encode())
                h.update(sample.numpy().tobytes())


def encoder_identity(components: dict, options: dict | None = None) -> str:
    """sha256 hex digest of text encoders/tokenizers (``{name: module or tokenizer or None}``) and
    the encoding options (max lengths, clip skip, T5 on/off ...)."""
    h = hashlib.sha256()
    for name in sorted(components):
        _module_digest(h, name, components[name])
    h.update(json.dumps(options or {}, sort_keys=True, default=str).encode())
    return h.hexdigest()


class CacheMiss(KeyError):
    """A prompt is not in the embedding cache and no encoder is available to compute it."""


class EmbeddingCache:
    """Text conditioning rows on disk: ``root/<identity[:16]>/<sha256(prompt)[:2]>/<sha256>.safetensors``.

    Each file holds one prompt's conditioning tensor ``[L, D]`` and, as metadata, the prompt and
    the full identity (checked on load). Writes go through a temporary file and ``os.replace``,
    so concurrent writers of the same prompt are safe.
    """

    def __init__(self, root, identity: str):
        self.root, self.identity = Path(root), identity
        self.dir = self.root / identity[:16]

    def path(self, prompt: str) -> Path:
        k = hashlib.sha256(prompt.encode("utf-8")).hexdigest()
        return self.dir / k[:2] / f"{k}.safetensors"

    def load(self, prompt: str) -> Tensor | None:
        from safetensors import safe_open

        p = self.path(prompt)
        if not p.is_file():
            return None
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("prompt") != prompt or meta.get("identity") != self.identity:
                return None
            return f.get_tensor("cond")

    def store(self, prompt: str, cond: Tensor) -> None:
        from safetensors.torch import save_file

        p = self.path(prompt)
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=p.parent, suffix=".tmp")
        os.close(fd)
        try:
            save_file({"cond": cond.detach().contiguous().cpu()}, tmp,
                      metadata={"prompt": prompt, "identity": self.identity})
            os.replace(tmp, p)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def get_or_encode(self, prompts: Sequence[str], encode: Callable[[list[str]], Tensor] | None) -> Tensor:
        """``[P, L, D]`` for ``prompts``: cached rows are loaded, the rest encoded in one call of
        ``encode`` (``None``: the encoders are unloaded, a miss raises :class:`CacheMiss`)."""
        rows: list[Tensor | None] = [self.load(p) for p in prompts]
        missing = sorted({p for p, r in zip(prompts, rows) if r is None})
        if missing:
            if encode is None:
                raise CacheMiss(f"{len(missing)} prompt(s) not in the text-embedding cache {self.dir} and the "
                                f"text encoders are unloaded, e.g. {missing[0]!r}")
            new = encode(missing)
            by_prompt = {p: new[i] for i, p in enumerate(missing)}
            for p, c in by_prompt.items():
                self.store(p, c)
            rows = [by_prompt[p] if r is None else r for p, r in zip(prompts, rows)]
        return torch.stack([r.cpu() for r in rows])
