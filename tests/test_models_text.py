"""Text side of the model adapters (issue 5, item 2): prompt files, the offline tokenizers, the
on-disk embedding cache and unloading the encoders."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from rsm_fast.models import build_model, read_prompts  # noqa: E402
from rsm_fast.models.text import (CacheMiss, EmbeddingCache, encoder_identity, tiny_clip_tokenizer,  # noqa: E402
                                  tiny_t5_tokenizer)


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest: tiny models, one intra-op thread


def test_prompt_files(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("a red cat\n\n  two dogs  \n")
    assert [r.prompt for r in read_prompts(txt)] == ["a red cat", "two dogs"]
    jl = tmp_path / "p.jsonl"
    jl.write_text(json.dumps({"prompt": "a cat", "tag": "single_object", "include": [{"class": "cat"}]}) + "\n\n"
                  + json.dumps({"prompt": "a dog"}) + "\n")
    recs = read_prompts(jl)
    assert [r.prompt for r in recs] == ["a cat", "a dog"]
    assert recs[0].metadata == {"tag": "single_object", "include": [{"class": "cat"}]} and recs[1].metadata == {}
    jl.write_text('{"prompt": "ok"}\n{"text": "no prompt key"}\n')
    with pytest.raises(ValueError, match=r"p\.jsonl:2: .*'prompt'"):
        read_prompts(jl)
    jl.write_text('{"prompt": "ok"}\n{not json\n')
    with pytest.raises(ValueError, match=r"p\.jsonl:2: not valid JSON"):
        read_prompts(jl)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_prompts(tmp_path / "missing.txt")


def test_offline_tokenizers_round_trip(tmp_path):
    clip, t5 = tiny_clip_tokenizer(16), tiny_t5_tokenizer(12)
    ids = clip(["A red cat", "hello world!"], padding="max_length", max_length=16, truncation=True,
               return_tensors="pt").input_ids
    assert ids.shape == (2, 16) and int(ids.max()) < 128
    assert ids[0, 0] == clip.bos_token_id and clip.eos_token_id in ids[0].tolist()
    assert clip.convert_ids_to_tokens(ids[0, 1:3].tolist()) == ["a</w>", "r"]   # lower-cased, word end marked
    clip.save_pretrained(tmp_path / "c")
    assert torch.equal(type(clip).from_pretrained(tmp_path / "c")(["a red cat"], return_tensors="pt").input_ids,
                       clip(["a red cat"], return_tensors="pt").input_ids)
    t5_ids = t5(["a red cat"], padding="max_length", max_length=12, truncation=True, return_tensors="pt").input_ids
    assert t5_ids.shape == (1, 12) and t5.eos_token_id in t5_ids[0].tolist() and t5_ids[0, -1] == t5.pad_token_id


def test_cache_encodes_each_prompt_once_and_survives_unloading(tmp_path):
    m = build_model("sd15-tiny", seed=0, cache_dir=tmp_path / "cache")
    calls = []
    enc = m._encode

    def counting(prompts):
        calls.append(list(prompts))
        return enc(prompts)

    m._encode = counting
    direct = m._encode_no_grad(["a red cat", "two dogs"])
    calls.clear()
    first = m.encode_prompts(["a red cat", "two dogs", "a red cat"])
    assert calls == [["a red cat", "two dogs"]]                   # misses encoded once, in one call
    assert torch.equal(first[0], direct[0]) and torch.equal(first[2], direct[0])
    second = m.encode_prompts(["two dogs", "a red cat"])
    assert len(calls) == 1 and torch.equal(second, direct.flip(0))   # all hits: no encoder call
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 2
    m.unload_text_encoders()
    assert not m.text_loaded
    assert torch.equal(m.encode_prompts(["a red cat"]), first[:1])
    assert m.uncond().shape == (1, 16, 32)                        # recorded before unloading
    with pytest.raises(CacheMiss, match="not in the text-embedding cache"):
        m.encode_prompts(["an uncached prompt"])


def test_encoder_identity_tells_models_apart(tmp_path):
    rng = torch.random.get_rng_state()
    a, b, a2 = (build_model("sd15-tiny", seed=s) for s in (0, 1, 0))
    assert torch.equal(torch.random.get_rng_state(), rng)        # seeded builds leave the global RNG alone
    assert a.text_identity() == a2.text_identity() != b.text_identity()
    with torch.no_grad():
        next(a2.text["text_encoder"].parameters()).add_(1.0)
    a2._identity = None
    assert a2.text_identity() != a.text_identity()
    cache_a, cache_b = EmbeddingCache(tmp_path, a.text_identity()), EmbeddingCache(tmp_path, b.text_identity())
    cache_a.store("p", torch.ones(3, 4))
    assert torch.equal(cache_a.load("p"), torch.ones(3, 4)) and cache_b.load("p") is None
    assert encoder_identity({"x": None}, {"max_length": 77}) != encoder_identity({"x": None}, {"max_length": 16})
