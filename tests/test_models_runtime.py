"""Precision and memory options of the model adapters (issue 5, item 4), and the full configs'
architectures (built on the meta device: no memory, no weights)."""
from __future__ import annotations

import importlib.util

import pytest
import torch

pytest.importorskip("diffusers")

from rsm_fast.models import build_model, get_config, make_optimizer, peak_memory  # noqa: E402
from rsm_fast.models.runtime import resolve_dtype  # noqa: E402

PROMPTS = ["a red cat", "two blue dogs"]


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest: tiny models, one intra-op thread


def _inputs(m, seed=0):
    x = torch.randn(2, *m.latent_shape(16, 16), generator=torch.Generator().manual_seed(seed))
    t = torch.tensor([901.0, 301.0]) if m.family == "sd15" else torch.tensor([0.9, 0.3])
    return x, t, m.encode_prompts(PROMPTS)


@pytest.mark.parametrize("name", ["sd15-tiny", "sd3-tiny"])
def test_bf16_model_returns_float32_close_to_fp32(name):
    m32, m16 = build_model(name, seed=0), build_model(name, seed=0, dtype="bf16")
    assert next(m16.denoiser.parameters()).dtype == torch.bfloat16 and m16.vae.dtype == torch.float32
    x, t, cond = _inputs(m32)
    f32 = m32.policy(x, t, cond)
    f16 = m16.policy(x, t, m16.encode_prompts(PROMPTS))
    assert f16.dtype == torch.float32 and m16.encode_prompts(PROMPTS).dtype == torch.bfloat16
    rel = (f16 - f32).norm() / f32.norm()
    assert 0 < rel < 0.1                              # bf16 rounding, not a different model
    params = m16.add_lora(rank=2)
    assert all(p.dtype == torch.float32 for p in params)   # fp32 LoRA master weights on a bf16 base
    assert m16.policy(x, t, m16.encode_prompts(PROMPTS)).dtype == torch.float32


def test_gradient_checkpointing_toggle_same_grads(monkeypatch):
    import torch.utils.checkpoint as ckpt

    calls = []
    real = ckpt.checkpoint
    monkeypatch.setattr(ckpt, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    grads = []
    for on in (False, True):
        m = build_model("sd3-tiny", seed=0)
        torch.manual_seed(0)                          # peft draws lora_A from the global RNG
        params = m.add_lora(rank=2)
        with torch.no_grad():
            for p in params:
                p.add_(0.1)
        m.set_gradient_checkpointing(on)
        m.train()
        x, t, cond = _inputs(m)
        m.policy(x, t, cond).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in params]))
        assert bool(calls) == on                      # the checkpoint function runs only when on
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed")
def test_adamw8bit_without_bitsandbytes_is_one_clear_error():
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ImportError, match="needs bitsandbytes, which is not installed") as e:
        make_optimizer([p], "adamw8bit")
    assert "\n" not in str(e.value)
    assert isinstance(make_optimizer([p], "adamw"), torch.optim.AdamW)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        make_optimizer([p], "sgd")


def test_attention_backend_choice():
    m = build_model("sd15-tiny", seed=0)
    x, t, cond = _inputs(m)
    before = m.policy(x, t, cond)
    m.set_attention_backend("sdpa")
    assert torch.equal(m.policy(x, t, cond), before)
    if importlib.util.find_spec("xformers") is None:
        with pytest.raises(ImportError, match="needs the xformers package, which is not installed") as e:
            m.set_attention_backend("xformers")
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="attention backend must be one of"):
        m.set_attention_backend("flash9")


def test_peak_memory_and_dtype_names():
    peak = peak_memory()
    with open("/proc/self/status") as f:
        rss_kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    assert peak >= rss_kib * 1024 > 0                 # the peak is at least the current resident set
    assert peak_memory("cpu") == peak_memory() or peak_memory("cpu") >= peak
    assert resolve_dtype("bf16") is torch.bfloat16 and resolve_dtype(torch.float16) is torch.float16
    with pytest.raises(ValueError, match="model dtype"):
        resolve_dtype("fp8")


def test_full_configs_have_the_public_architectures():
    """Parameter counts of the ``full`` configs, built on the meta device. SD1.5: UNet 859,520,964
    and VAE 83,653,863 (the released checkpoint's tensors), CLIP ViT-L/14 text 123,060,480.
    SD3.5-M: "2.5B" (Stability's model card) = 2.243B parameters + the 384^2 x 1536 fixed
    positional-embedding table that the checkpoint also stores."""
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    count = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
    _, sd15 = get_config("sd15-full")
    _, sd35 = get_config("sd35m-full")
    with torch.device("meta"):
        assert count(UNet2DConditionModel(**sd15["unet"])) == 859_520_964
        assert count(AutoencoderKL(**sd15["vae"])) == 83_653_863
        assert count(CLIPTextModel(CLIPTextConfig(**sd15["text_encoder"]))) == 123_060_480
        tr = SD3Transformer2DModel(**sd35["transformer"])
    n_pos = tr.pos_embed.pos_embed.numel()
    assert n_pos == 384 * 384 * 1536
    assert 2.4e9 < count(tr) + n_pos < 2.55e9
    assert sum(b.use_dual_attention for b in tr.transformer_blocks) == 13
    with pytest.raises(ValueError, match="unknown model config"):
        get_config("sdxl-full")
