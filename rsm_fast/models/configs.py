"""Named model configurations: ``tiny`` (tests, random weights, CPU) and ``full`` (GPU benchmarks,
random weights with the public architectures).

Each config is plain data: one dict of constructor kwargs per component (diffusers / transformers
classes named in ``family``'s builder), plus the tokenizers' ``max_length``. Nothing here downloads
or instantiates anything; :func:`get_config` returns a deep copy.

Sources of the ``full`` values (the public diffusers-format model folders on the Hugging Face hub):

* SD1.5 — ``stable-diffusion-v1-5/stable-diffusion-v1-5`` (formerly ``runwayml/...``):
  ``unet/config.json`` (block_out_channels 320/640/1280/1280, cross_attention_dim 768,
  attention_head_dim 8, layers_per_block 2), ``vae/config.json`` (128/256/512/512, latent 4,
  scaling_factor 0.18215 = AutoencoderKL default), ``text_encoder/config.json`` (CLIP ViT-L/14 text
  tower: 768 wide, 12 layers, 12 heads, quick_gelu, 77 positions, vocab 49408) and
  ``scheduler/scheduler_config.json`` (PNDMScheduler: scaled_linear betas 0.00085..0.012, 1000
  train steps, steps_offset 1, set_alpha_to_one false, clip_sample false; the same values are
  in ``rsm_fast.schedules.sd15_alphas_cumprod``). The sampler built from it is diffusers'
  ``DDIMScheduler`` with ``timestep_spacing="leading"`` (its default), as ddpo-pytorch does
  (``DDIMScheduler.from_config(pipeline.scheduler.config)``).
* SD3.5-Medium — ``stabilityai/stable-diffusion-3.5-medium``: ``transformer/config.json``
  (MMDiT-X: 24 layers, 24 heads x 64, caption_projection_dim 1536, joint_attention_dim 4096,
  pooled_projection_dim 2048, pos_embed_max_size 384, qk_norm rms_norm, dual attention in layers
  0-12; also the defaults noted in diffusers' ``SD3Transformer2DModel`` source),
  ``vae/config.json`` (16 latent channels, scaling_factor 1.5305, shift_factor 0.0609, no
  quant convs), ``scheduler/scheduler_config.json`` (FlowMatchEulerDiscreteScheduler, 1000 train
  steps, shift 3.0), text encoders CLIP-L/14 (768, projection 768), OpenCLIP bigG/14 (1280 wide,
  32 layers, 20 heads, projection 1280) and T5-v1.1-XXL (d_model 4096, d_ff 10240, 24 layers,
  64 heads, gated-gelu, vocab 32128).

The full configs' tokenizers are the offline character tokenizers of :mod:`.text` (the real CLIP
and T5 vocabularies are not shipped): random-weight benchmarks need the shapes, not the words.
"""
from __future__ import annotations

import copy

FAMILIES = ("sd15", "sd3")

# -- SD1.5 ----------------------------------------------------------------------------------------
_SD15_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                       steps_offset=1, set_alpha_to_one=False, clip_sample=False, prediction_type="epsilon",
                       timestep_spacing="leading")

SD15_FULL = dict(
    unet=dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
              block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8, cross_attention_dim=768,
              down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
              norm_num_groups=32, norm_eps=1e-5, act_fn="silu", flip_sin_to_cos=True, freq_shift=0),
    vae=dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
             block_out_channels=(128, 256, 512, 512), norm_num_groups=32, sample_size=512,
             down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
    text_encoder=dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                      num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                      projection_dim=768, layer_norm_eps=1e-5),
    tokenizer=dict(max_length=77),
    scheduler=_SD15_SCHEDULER,
)

SD15_TINY = dict(
    unet=dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
              attention_head_dim=4, cross_attention_dim=32,
              down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=4),
    vae=dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, block_out_channels=(8, 16),
             norm_num_groups=8, sample_size=16,
             down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2),
    text_encoder=dict(vocab_size=128, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=16, hidden_act="quick_gelu",
                      projection_dim=32, layer_norm_eps=1e-5),
    tokenizer=dict(max_length=16),
    scheduler=_SD15_SCHEDULER,
)

# -- SD3 / SD3.5-Medium ---------------------------------------------------------------------------
_SD35M_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)

SD35M_FULL = dict(
    transformer=dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                     attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                     caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                     dual_attention_layers=tuple(range(13)), qk_norm="rms_norm"),
    vae=dict(in_channels=3, out_channels=3, latent_channels=16, layers_per_block=2,
             block_out_channels=(128, 256, 512, 512), norm_num_groups=32, sample_size=1024,
             scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False,
             down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
    text_encoder=dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                      num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                      projection_dim=768, layer_norm_eps=1e-5),
    text_encoder_2=dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                        num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu",
                        projection_dim=1280, layer_norm_eps=1e-5),
    text_encoder_3=dict(vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_layers=24, num_heads=64,
                        feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                        layer_norm_epsilon=1e-6),
    tokenizer=dict(max_length=77, t5_max_length=256),
    scheduler=_SD35M_SCHEDULER,
)

SD3_TINY = dict(
    transformer=dict(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                     attention_head_dim=8, num_attention_heads=2, joint_attention_dim=80,
                     caption_projection_dim=16, pooled_projection_dim=64, pos_embed_max_size=16,
                     dual_attention_layers=(0,), qk_norm="rms_norm"),
    vae=dict(in_channels=3, out_channels=3, latent_channels=16, layers_per_block=1, block_out_channels=(8, 16),
             norm_num_groups=8, sample_size=16, scaling_factor=1.5305, shift_factor=0.0609,
             use_quant_conv=False, use_post_quant_conv=False,
             down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2),
    text_encoder=dict(vocab_size=128, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=16, hidden_act="quick_gelu",
                      projection_dim=32, layer_norm_eps=1e-5),
    text_encoder_2=dict(vocab_size=128, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=16, hidden_act="gelu",
                        projection_dim=32, layer_norm_eps=1e-5),
    text_encoder_3=dict(vocab_size=128, d_model=80, d_ff=37, d_kv=8, num_layers=1, num_heads=2,
                        feed_forward_proj="gated-gelu", relative_attention_num_buckets=8, layer_norm_epsilon=1e-6),
    tokenizer=dict(max_length=16, t5_max_length=12),
    scheduler=_SD35M_SCHEDULER,
)

CONFIGS = {
    "sd15-tiny": ("sd15", SD15_TINY),
    "sd15-full": ("sd15", SD15_FULL),
    "sd3-tiny": ("sd3", SD3_TINY),
    "sd35m-full": ("sd3", SD35M_FULL),
}


def get_config(name: str) -> tuple[str, dict]:
    """``(family, config)`` for a named config (a deep copy the caller may edit)."""
    if name not in CONFIGS:
        raise ValueError(f"unknown model config {name!r}; known: {sorted(CONFIGS)}")
    family, cfg = CONFIGS[name]
    return family, copy.deepcopy(cfg)
