"""SD1.5 adapter (issue 5, items 1-2): a tiny random-weight SD1.5 pipeline built from config on CPU.

The adapter's output equals the raw UNet's, its prompt encoding equals the pipeline's, its DDIM
transition equals ``DDIMScheduler.step``, and the rollout engine with a deterministic (eta = 0)
K = 1 ``sde`` plan and LoRA scale 0 reproduces ``StableDiffusionPipeline(output_type="latent")``
with and without CFG. Folder loading round-trips and fails with one line naming the path."""
from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("diffusers")

from rsm_fast import schedules as S  # noqa: E402
from rsm_fast.engine.plan import PlanSpec, compile_plan  # noqa: E402
from rsm_fast.engine.rollout import RolloutEngine  # noqa: E402
from rsm_fast.models import build_model, load_model  # noqa: E402

PROMPTS = ["a red cat", "two blue dogs"]
N = 4


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest: tiny models, one intra-op thread


@pytest.fixture(autouse=True)
def _plain_torch_ops(monkeypatch):
    """The sampler step in plain torch: these tests check the models, not the ops backends (the
    C++ backend's first use is a JIT build)."""
    monkeypatch.setenv("RSM_FAST_OPS_BACKEND", "decomposed")


@pytest.fixture(scope="module")
def m():
    return build_model("sd15-tiny", seed=0)


def _latents(m, n=2, seed=0):
    return torch.randn(n, *m.latent_shape(16, 16), generator=torch.Generator().manual_seed(seed))


def test_adapter_matches_raw_unet(m):
    x, cond = _latents(m), m.encode_prompts(PROMPTS)
    t = torch.tensor([981.0, 421.0])
    raw = m.denoiser(x, t.long(), encoder_hidden_states=cond).sample
    out = m.policy(x, t, cond)
    assert out.dtype == torch.float32 and out.abs().max() > 0.01
    assert torch.equal(out, raw)


def test_prompt_encoding_matches_pipeline(m):
    pe, ne = m.pipeline().encode_prompt(PROMPTS, "cpu", 1, True, negative_prompt=None)
    cond, unc = m.encode_prompts(PROMPTS), m.uncond()
    assert cond.shape == (2, 16, 32) and unc.shape == (1, 16, 32)
    assert torch.equal(cond, pe)
    torch.testing.assert_close(unc, ne[:1], rtol=1e-6, atol=1e-6)   # "" is encoded in a batch of 2 there
    assert not torch.equal(cond[0], cond[1])


def test_ddim_transition_is_the_scheduler_step():
    """On SD1.5's real scheduler config (50 steps), every transition row equals DDIMScheduler.step
    with eta = 1 and the same variance noise, including the last step to alphas_cumprod[0]."""
    from diffusers import DDIMScheduler

    from rsm_fast.models.configs import SD15_FULL
    from rsm_fast.models.sd15 import ddim_transition

    sch = DDIMScheduler(**SD15_FULL["scheduler"])
    tr = ddim_transition(sch, 50, eta=1.0)
    assert torch.equal(tr.table("t").long(), S.ddim_timesteps(1000, 50, offset=1))
    sch.set_timesteps(50)
    g = torch.Generator().manual_seed(0)
    for i in (0, 17, 48, 49):
        x, f, z = (torch.randn(2, 4, 3, 3, generator=g) for _ in range(3))
        ref = sch.step(f, int(sch.timesteps[i]), x, eta=1.0, variance_noise=z).prev_sample
        ours = tr.coeffs_at(i, 2).step(x, f, z)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert tr.table("sigma")[-1] > 0   # the last step is still stochastic (to alpha_bar_0 < 1)


@pytest.mark.parametrize("cfg_scale", [None, 3.0])
def test_engine_reproduces_pipeline_samples(m, cfg_scale):
    """Tolerance: rtol = atol = 1e-5. The engine evaluates DDIM's coefficients in float64 and rounds
    once, diffusers composes them in float32; the difference is a few float32 ulps per step
    (observed max 4e-6 on latents of magnitude ~20 after 4 steps)."""
    m = copy.deepcopy(m)
    base = copy.deepcopy(m.denoiser)
    params = m.add_lora(rank=4)
    with torch.no_grad():
        for p in params:
            p.add_(0.3 * torch.randn_like(p))
    m.set_lora_scale(0.0)
    cond, unc = m.encode_prompts(PROMPTS), m.uncond()
    x_T = _latents(m)
    eng = RolloutEngine(m.policy, m.transition(N, eta=0.0), compile_plan(PlanSpec("sde", N, groups=2, trunks=1)),
                        cfg_scale=cfg_scale)
    rec = eng.run(x_T, cond, unc)
    pipe = m.pipeline(unet=base)
    ref = pipe(prompt_embeds=cond, negative_prompt_embeds=unc.expand(2, -1, -1), latents=x_T.clone(),
               num_inference_steps=N, guidance_scale=1.0 if cfg_scale is None else cfg_scale, eta=0.0,
               output_type="latent").images
    torch.testing.assert_close(rec.x0, ref, rtol=1e-5, atol=1e-5)
    m.set_lora_scale(1.0)   # the trained LoRA does change the samples
    assert not torch.allclose(eng.run(x_T, cond, unc).x0, ref, atol=1e-3)


def test_decode_matches_pipeline(m):
    z = _latents(m)
    img = m.decode(z)
    pipe = m.pipeline()
    ref = pipe.image_processor.postprocess(pipe.vae.decode(z / pipe.vae.config.scaling_factor).sample,
                                           output_type="pt")
    assert img.shape == (2, 3, 16, 16) and img.dtype == torch.float32
    assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0
    torch.testing.assert_close(img, ref)


def test_folder_round_trip_and_errors(m, tmp_path):
    m.save_pretrained(tmp_path / "sd")
    m2 = load_model(tmp_path / "sd")
    assert m2.family == "sd15"
    x, t = _latents(m), torch.tensor([901.0, 1.0])
    assert torch.equal(m2.policy(x, t, m2.encode_prompts(PROMPTS)), m.policy(x, t, m.encode_prompts(PROMPTS)))
    with pytest.raises(FileNotFoundError, match="model folder not found: .*nowhere") as e:
        load_model(tmp_path / "nowhere")
    assert "\n" not in str(e.value)
    for f in (tmp_path / "sd" / "unet").glob("diffusion_pytorch_model*"):
        f.unlink()
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "sd" / "unet")) as e:
        load_model(tmp_path / "sd")
    assert "\n" not in str(e.value)
    (tmp_path / "sd" / "vae" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="missing vae/config.json"):
        load_model(tmp_path / "sd")


def test_spacing_that_ddim_step_cannot_follow_is_rejected(m):
    from diffusers import DDIMScheduler

    m2 = copy.copy(m)
    m2.scheduler = DDIMScheduler.from_config(m.scheduler.config, timestep_spacing="trailing")
    with pytest.raises(ValueError, match="trailing"):
        m2.transition(30)
    assert m2.transition(10).num_steps == 10   # 1000 / 10 divides: trailing steps are T//N apart
