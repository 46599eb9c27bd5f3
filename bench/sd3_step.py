"""The fused loss's share of one SD3.5-M training micro-step (CUDA + diffusers only).

A random-init ``SD3Transformer2DModel`` with SD3.5-Medium's sizes (2.2 B params), bf16, frozen
weights and the input latents requiring grad (the activation backward a LoRA step pays), 12 rows of
16x64² latents (512² images), 205 text tokens, no CFG. Timed: model forward + fused ZO loss +
backward to the latents; and the fused loss alone on the same shape. Nothing is downloaded.
"""
from __future__ import annotations

import torch

import loss_cases as LC

SD35M_CONFIG = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                    pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
                    dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
TEXT_TOKENS = 205   # 77 CLIP + 128 T5 tokens (Flow-GRPO's max_sequence_length=128)
NOT_MEASURED = "not measured (needs a GPU and diffusers)"


def sd3_share(device: torch.device, repeats: int = 5) -> dict:
    """``{"status": "measured", "step_ms", "loss_us", "share", ...}`` or ``{"status": <why not>}``."""
    if device.type != "cuda":
        return {"status": NOT_MEASURED}
    try:
        from diffusers import SD3Transformer2DModel
    except ImportError:
        return {"status": NOT_MEASURED}
    model = None
    try:
        with torch.device(device):
            model = SD3Transformer2DModel(**SD35M_CONFIG)
        model = model.to(torch.bfloat16).requires_grad_(False)
        B, (C, H, W) = LC.HEADLINE
        case = LC.Case("zo", B, (C, H, W), "bf16")
        inp = LC.make_inputs(case, device)
        fused = LC.loss_fns(case, ("fused",))["fused"]
        bf = dict(device=device, dtype=torch.bfloat16)
        x = torch.randn(B, C, H, W, **bf, requires_grad=True)
        enc, pooled = torch.randn(B, TEXT_TOKENS, 4096, **bf), torch.randn(B, 2048, **bf)
        t = torch.rand(B, device=device) * 1000

        def step():
            f = model(hidden_states=x, encoder_hidden_states=enc, pooled_projections=pooled, timestep=t,
                      return_dict=False)[0]
            loss = fused(dict(inp, f_theta=f.contiguous()))
            return torch.autograd.grad(loss, x, inp["grad_out"])[0]

        torch.cuda.reset_peak_memory_stats(device)
        step_us, _ = LC.Timer(device, flush=False)(step, warmup=2, repeats=repeats)
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        loss_us, _ = LC.Timer(device, flush=True)(LC.make_step(fused, inp, "fwd+bwd"), warmup=5, repeats=50)
        return {"status": "measured", "params": sum(p.numel() for p in model.parameters()), "rows": B,
                "text_tokens": TEXT_TOKENS, "step_ms": step_us / 1e3, "loss_us": loss_us,
                "share": loss_us / step_us, "peak_gib": peak}
    except Exception as e:  # noqa: BLE001 - e.g. out of memory or a diffusers API change: report it
        return {"status": f"failed: {type(e).__name__}: {str(e)[:200]}"}
    finally:
        del model
        torch.cuda.empty_cache()
