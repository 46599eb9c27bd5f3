"""A tiny random CLIP reward folder for the reward tests: a ``CLIPModel`` saved from config and a
CLIP tokenizer over a-z, so every CLIP reward loads from it without a download. The caller seeds
torch before the call (the model's weights are drawn here) and writes its own aesthetic head."""
from __future__ import annotations

import json

import transformers


def save_clip_tokenizer(d) -> None:
    """A CLIP tokenizer over the 26 letters (ids 0-51) with start / end tokens 52 / 53."""
    vocab = {c: i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz")}
    vocab.update({c + "</w>": 26 + i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz")})
    vocab.update({"<|startoftext|>": 52, "<|endoftext|>": 53})
    d.mkdir(parents=True, exist_ok=True)
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n")
    transformers.CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt")).save_pretrained(str(d))


def save_tiny_clip(d, *, text: tuple[int, int, int], vision: tuple[int, int, int], image_size: int,
                   projection: int):
    """Save a random CLIP with ``text`` / ``vision`` = (hidden size, MLP size, layers), 2 heads per
    tower, patch 8 and a 16-token text context into ``d``, with :func:`save_clip_tokenizer`'s tokenizer."""
    (th, ti, tl), (vh, vi, vl) = text, vision
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=54, hidden_size=th, intermediate_size=ti, num_hidden_layers=tl,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=52, eos_token_id=53,
                         pad_token_id=53),
        vision_config=dict(hidden_size=vh, intermediate_size=vi, num_hidden_layers=vl, num_attention_heads=2,
                           image_size=image_size, patch_size=8),
        projection_dim=projection)
    transformers.CLIPModel(cfg).save_pretrained(str(d))
    save_clip_tokenizer(d)
    return d
