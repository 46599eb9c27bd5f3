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
  encoders can be unloaded once a prompt set is encoded. The identity of loaded encoders
  (:func:`encoder_identity`) hashes the encoders' classes, configs, parameter shapes and a strided
  sample of every parameter tensor, the tokenizers' vocabularies and the encoding options; it
  tells apart different checkpoints and random inits, not a fine-tune that only moved weights
  outside the sampled positions (the encoders are frozen here, so that case does not arise).
  Encoders that are not loaded yet get a *source* identity (:func:`source_identity`): the files
  they would load from (:func:`folder_fingerprint`: names, sizes, small files whole and a strided
  sample of large ones) or the recipe of a random build (config, seed, device, torch version), so
  a later run can find its prompts in the cache without loading an encoder at all.

Sharing one cache folder between processes (several torchrun ranks on one machine): a file is
written under a temporary name, flushed to disk (``fsync``) and renamed over its final name
(``os.replace``, atomic on POSIX), so a reader sees a whole file or none; a file that still fails
to read (a crash of the machine mid-write) is a miss and is written again. Filling the cache takes
an exclusive ``flock`` on ``<identity dir>/.lock`` (:meth:`EmbeddingCache.locked`), so one process
encodes while the others wait and then find every prompt cached (a dead holder's lock is released
by the kernel). ``flock`` is advisory and local: on a network file system shared by several
machines it may not exclude, and the atomic rename alone keeps the files whole.
"""
from __future__ import annotations

import contextlib
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


def source_identity(source: str, options: dict | None = None) -> str:
    """sha256 hex digest of where unloaded encoders come from (a :func:`folder_fingerprint` or a
    random build's recipe) and the encoding options (lengths, T5 on/off, dtype ...)."""
    h = hashlib.sha256(b"source\0" + source.encode("utf-8"))
    h.update(json.dumps(options or {}, sort_keys=True, default=str).encode())
    return h.hexdigest()


SMALL_FILE = 1 << 20          # files up to 1 MiB (configs, tokenizers) are hashed whole
SAMPLE_CHUNKS, SAMPLE_BYTES = 16, 1 << 16    # a larger file: 16 strided 64 KiB chunks


def folder_fingerprint(folders) -> str:
    """A cheap content fingerprint of the files under ``folders`` (relative name, size, small files
    whole, large ones by a strided byte sample); reads at most ~1 MiB per weight file."""
    h = hashlib.sha256()
    for folder in folders:
        root = Path(folder)
        h.update(f"[{root.name}]".encode())
        if not root.is_dir():
            continue
        for f in sorted(p for p in root.rglob("*") if p.is_file()):
            size = f.stat().st_size
            h.update(f"{f.relative_to(root)}:{size}\0".encode())
            with open(f, "rb") as fh:
                if size <= SMALL_FILE:
                    h.update(fh.read())
                    continue
                step = (size - SAMPLE_BYTES) // (SAMPLE_CHUNKS - 1)
                for i in range(SAMPLE_CHUNKS):
                    fh.seek(i * step)
                    h.update(fh.read(SAMPLE_BYTES))
    return h.hexdigest()


class CacheMiss(KeyError):
    """A prompt is not in the embedding cache and no encoder is available to compute it."""


class EmbeddingCache:
    """Text conditioning rows on disk: ``root/<identity[:16]>/<sha256(prompt)[:2]>/<sha256>.safetensors``.

    Each file holds one prompt's conditioning tensor ``[L, D]`` and, as metadata, the prompt and
    the full identity (checked on load). Writes are atomic and a fill is locked (module docstring),
    so processes sharing the folder never read a partial file.
    """

    def __init__(self, root, identity: str):
        self.root, self.identity = Path(root), identity
        self.dir = self.root / identity[:16]

    def path(self, prompt: str) -> Path:
        k = hashlib.sha256(prompt.encode("utf-8")).hexdigest()
        return self.dir / k[:2] / f"{k}.safetensors"

    def load(self, prompt: str) -> Tensor | None:
        """The cached rows of ``prompt``, or None (absent, another identity's, or unreadable)."""
        from safetensors import safe_open

        p = self.path(prompt)
        if not p.is_file():
            return None
        try:
            with safe_open(str(p), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("prompt") != prompt or meta.get("identity") != self.identity:
                    return None
                return f.get_tensor("cond")
        except Exception:       # a truncated / corrupt file (safetensors raises its own error types): a miss
            return None

    def missing(self, prompts: Sequence[str]) -> list[str]:
        """The distinct prompts of ``prompts`` that are not cached, in first-seen order."""
        return [p for p in dict.fromkeys(prompts) if self.load(p) is None]

    def store(self, prompt: str, cond: Tensor) -> None:
        from safetensors.torch import save

        p = self.path(prompt)
        p.parent.mkdir(parents=True, exist_ok=True)
        data = save({"cond": cond.detach().contiguous().cpu()}, metadata={"prompt": prompt, "identity": self.identity})
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=".", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, p)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    @contextlib.contextmanager
    def locked(self):
        """An exclusive ``flock`` on this identity's folder while the block runs (module docstring)."""
        import fcntl

        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / ".lock", "a+b") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield self
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def get_or_encode(self, prompts: Sequence[str], encode: Callable[[list[str]], Tensor] | None,
                      batch: int | None = None) -> Tensor:
        """``[P, L, D]`` for ``prompts``: cached rows are loaded, the rest encoded by ``encode``
        (``batch`` prompts a call; None: all in one call; ``encode=None``: the encoders are
        unloaded and a miss raises :class:`CacheMiss`)."""
        rows: list[Tensor | None] = [self.load(p) for p in prompts]
        missing = sorted({p for p, r in zip(prompts, rows) if r is None})
        if missing:
            if encode is None:
                raise CacheMiss(f"{len(missing)} prompt(s) not in the text-embedding cache {self.dir} and the "
                                f"text encoders are unloaded, e.g. {missing[0]!r}")
            by_prompt = {}
            step = batch or len(missing)
            for i in range(0, len(missing), step):
                part = missing[i:i + step]
                new = encode(part)
                for j, p in enumerate(part):
                    self.store(p, new[j])
                    by_prompt[p] = new[j]
            rows = [by_prompt[p] if r is None else r for p, r in zip(prompts, rows)]
        return torch.stack([r.cpu() for r in rows])
