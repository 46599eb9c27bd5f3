"""SD3 adapter (issue 5, items 1-2): a tiny random-weight SD3-style pipeline (MMDiT with a dual
attention layer, 2 CLIPs + T5) built from config on CPU.

Checks: the adapter equals the raw transformer at ``timestep = t * 1000`` on the unpacked
conditioning; the packed conditioning equals ``StableDiffusion3Pipeline.encode_prompt`` (with T5,
and with T5 dropped -> zeros); the scheduler's sigmas are spec §2.3's; the engine with a K = 1
``sde`` plan on the flow ODE (noise level 0) and LoRA scale 0 reproduces the pipeline's latents
with and without CFG; decode equals the pipeline's images; folders round-trip."""
from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("diffusers")

from rsm_fast import schedules as S  # noqa: E402
from rsm_fast.engine.plan import PlanSpec, compile_plan  # noqa: E402
from rsm_fast.engine.rollout import RolloutEngine  # noqa: E402
from rsm_fast.models import build_model, get_config, load_model  # noqa: E402

PROMPTS = ["a red cat", "two blue dogs"]
N = 4


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest: tiny models, one intra-op thread


@pytest.fixture(autouse=True)
def _plain_torch_ops(monkeypatch):
    monkeypatch.setenv("RSM_FAST_OPS_BACKEND", "decomposed")   # the models are under test, not the ops


@pytest.fixture(scope="module")
def m():
    return build_model("sd3-tiny", seed=0)


def _latents(m, n=2, seed=0):
    return torch.randn(n, *m.latent_shape(16, 16), generator=torch.Generator().manual_seed(seed))


def _pipe_embeds(m, pipe, prompts):
    return pipe.encode_prompt(prompts, None, None, device="cpu", do_classifier_free_guidance=True,
                              max_sequence_length=m.max_sequence_length)


def test_adapter_matches_raw_transformer(m):
    x, cond = _latents(m), m.encode_prompts(PROMPTS)
    t = torch.tensor([1.0, 0.37])
    pe, pooled = m.unpack(cond)
    raw = m.denoiser(hidden_states=x, timestep=t * 1000, encoder_hidden_states=pe, pooled_projections=pooled).sample
    out = m.policy(x, t, cond)
    assert out.dtype == torch.float32 and out.abs().max() > 0.01
    assert torch.equal(out, raw)
    assert not torch.equal(out, m.policy(x, torch.tensor([0.5, 0.37]), cond))   # the time reaches the model


@pytest.mark.parametrize("t5", [True, False])
def test_packed_conditioning_matches_pipeline(m, t5):
    m = m if t5 else build_model("sd3-tiny", seed=0, t5=False)
    cond, unc = m.encode_prompts(PROMPTS), m.uncond()
    L = m.clip_length + m.max_sequence_length
    assert cond.shape == (2, L + 1, 80) and unc.shape == (1, L + 1, 80)   # pooled 64 <= D = 80: one row
    pe, ne, pp, npool = _pipe_embeds(m, m.pipeline(), PROMPTS)
    got_pe, got_pp = m.unpack(cond)
    assert torch.equal(got_pe, pe) and torch.equal(got_pp, pp)
    u_pe, u_pp = m.unpack(unc)   # the pipeline encodes "" in a batch of 2: GEMM rounding may differ
    torch.testing.assert_close(u_pe, ne[:1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(u_pp, npool[:1], rtol=1e-6, atol=1e-6)
    t5_rows = got_pe[:, m.clip_length:]
    assert (t5_rows.abs().sum() > 0) == t5                                 # dropped T5 -> zero rows


def test_pooled_wider_than_tokens_packs_into_several_rows():
    from rsm_fast.models.sd3 import build_sd3

    _, cfg = get_config("sd3-tiny")
    cfg["transformer"]["pooled_projection_dim"] = 100                      # > joint_attention_dim 80
    cfg["text_encoder"]["projection_dim"] = cfg["text_encoder_2"]["projection_dim"] = 50
    m = build_sd3(cfg, t5=False)
    assert m.pooled_rows == 2
    cond = m.encode_prompts(PROMPTS)
    pe, pooled = m.unpack(cond)
    assert cond.shape[1] == pe.shape[1] + 2 and pooled.shape == (2, 100)
    assert torch.equal(m.unpack(m.pack(pe, pooled))[1], pooled)
    x, t = _latents(m), torch.tensor([0.9, 0.2])
    raw = m.denoiser(hidden_states=x, timestep=t * 1000, encoder_hidden_states=pe, pooled_projections=pooled).sample
    assert torch.equal(m.policy(x, t, cond), raw)


def test_sigmas_are_the_sd35m_schedule():
    """FlowMatchEulerDiscreteScheduler(shift=3) sigmas = spec §2.3's table (schedules.rf_sigmas)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from rsm_fast.models.configs import SD35M_FULL

    s = FlowMatchEulerDiscreteScheduler(**SD35M_FULL["scheduler"])
    s.set_timesteps(10)
    torch.testing.assert_close(s.sigmas.double(), S.rf_sigmas(10, 3.0), rtol=0, atol=1e-6)
    assert abs(float(s.sigmas[-2]) - 0.0089) < 1e-4


@pytest.mark.parametrize("cfg_scale", [None, 3.0])
def test_engine_reproduces_pipeline_samples(m, cfg_scale):
    """Tolerance: rtol = atol = 1e-6. The ODE step is ``x + c_f v`` with ``c_f = -(sigma_i -
    sigma_{i+1})`` rounded once from float64 on float32 sigmas, the same correctly-rounded value
    as the scheduler's float32 ``sigma_next - sigma``; observed difference 0."""
    m = copy.deepcopy(m)
    base = copy.deepcopy(m.denoiser)
    params = m.add_lora(rank=4, target_modules=("to_q", "to_k", "to_v", "to_out.0", "add_q_proj"))
    with torch.no_grad():
        for p in params:
            p.add_(0.3 * torch.randn_like(p))
    m.set_lora_scale(0.0)
    cond, unc = m.encode_prompts(PROMPTS), m.uncond()
    x_T = _latents(m)
    tr = m.transition(N, kind="sde", noise_level=0.0)        # the Flow-GRPO SDE at a = 0 is the ODE
    assert float(tr.table("sigma").abs().max()) == 0.0
    eng = RolloutEngine(m.policy, tr, compile_plan(PlanSpec("sde", N, groups=2, trunks=1)), cfg_scale=cfg_scale)
    rec = eng.run(x_T, cond, unc)
    pe, pp = m.unpack(cond)
    upe, upp = m.unpack(unc)
    ref = m.pipeline(transformer=base)(
        prompt_embeds=pe, pooled_prompt_embeds=pp, negative_prompt_embeds=upe.expand(2, -1, -1),
        negative_pooled_prompt_embeds=upp.expand(2, -1), latents=x_T.clone(), num_inference_steps=N,
        guidance_scale=1.0 if cfg_scale is None else cfg_scale, max_sequence_length=m.max_sequence_length,
        output_type="latent").images
    torch.testing.assert_close(rec.x0, ref, rtol=1e-6, atol=1e-6)
    m.set_lora_scale(1.0)
    assert not torch.allclose(eng.run(x_T, cond, unc).x0, ref, atol=1e-3)


def test_decode_matches_pipeline_images(m):
    pe, pp = m.unpack(m.encode_prompts(PROMPTS))
    pipe = m.pipeline()
    kw = dict(prompt_embeds=pe, pooled_prompt_embeds=pp, num_inference_steps=2, guidance_scale=1.0,
              max_sequence_length=m.max_sequence_length)
    lat = pipe(latents=_latents(m), output_type="latent", **kw).images
    img = pipe(latents=_latents(m), output_type="pt", **kw).images      # decodes with shift_factor
    ours = m.decode(lat)
    assert ours.shape == (2, 3, 16, 16) and 0.0 <= float(ours.min()) and float(ours.max()) <= 1.0
    torch.testing.assert_close(ours, img)


def test_folder_round_trip_with_and_without_t5(m, tmp_path):
    m.save_pretrained(tmp_path / "sd3")
    x, t = _latents(m), torch.tensor([0.8, 0.1])
    m2 = load_model(tmp_path / "sd3")
    assert m2.family == "sd3" and m2.t5 and m2.max_sequence_length == m.max_sequence_length
    assert torch.equal(m2.policy(x, t, m2.encode_prompts(PROMPTS)), m.policy(x, t, m.encode_prompts(PROMPTS)))
    m3 = load_model(tmp_path / "sd3", t5=False, max_sequence_length=m.max_sequence_length)
    assert not m3.t5 and m3.unpack(m3.encode_prompts(PROMPTS))[0][:, m3.clip_length:].abs().max() == 0
    for f in (tmp_path / "sd3" / "text_encoder_3").iterdir():
        f.unlink()
    with pytest.raises(FileNotFoundError, match="missing text_encoder_3/config.json"):
        load_model(tmp_path / "sd3", t5=True)
    assert not load_model(tmp_path / "sd3").t5                             # T5 optional when absent
