"""CLIP reward adapters (aesthetic, PickScore, HPS) on tiny random CLIP models saved to disk."""
from __future__ import annotations

import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import save_file  # noqa: E402
from tinyclip import save_tiny_clip  # noqa: E402

from rsm_fast import rewards as R  # noqa: E402
from rsm_fast.rewards import RewardError  # noqa: E402

# openai/CLIP clip/clip.py _transform Normalize constants, written out independently of the module
MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
SIZE = 32


def _hand_head():
    """4-4-4-4-2-1 head whose output is e0 + 2 e1 + 0.5 for a normalised embedding e."""
    eye = torch.eye(4)
    sd = {}
    for i in (0, 2, 4):
        sd[f"layers.{i}.weight"], sd[f"layers.{i}.bias"] = eye.clone(), torch.zeros(4)
    sd["layers.6.weight"], sd["layers.6.bias"] = eye[:2].clone(), torch.zeros(2)
    sd["layers.7.weight"], sd["layers.7.bias"] = torch.tensor([[1.0, 2.0]]), torch.tensor([0.5])
    return sd


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    torch.manual_seed(0)
    d = save_tiny_clip(tmp_path_factory.mktemp("clip"), text=(16, 32, 1), vision=(16, 32, 1), image_size=SIZE,
                       projection=4)
    save_file(_hand_head(), str(d / "aesthetic_head.safetensors"))
    return d


@pytest.fixture(scope="module")
def clip_model(clip_dir):
    return transformers.CLIPModel.from_pretrained(str(clip_dir), local_files_only=True).eval()


def _images(b=3, c=3, h=40, w=56, seed=1):
    return torch.rand(b, c, h, w, generator=torch.Generator().manual_seed(seed))


def _features(out):
    return out if isinstance(out, torch.Tensor) else out.pooler_output


# ---------------------------------------------------------------- preprocessing

def test_preprocess_matches_the_clip_image_processor():
    """Torch resize/crop/normalise against transformers' PIL-based CLIPImageProcessor on a smooth
    image (on pixel noise PIL's 8-bit intermediate rounding between its two passes differs by a few
    levels; the torch path is meant to match on natural images and stay differentiable)."""
    g = torch.Generator().manual_seed(1)
    x = torch.nn.functional.interpolate(torch.rand(2, 3, 5, 7, generator=g), size=(40, 56), mode="bilinear")
    x = (x * 255).round() / 255                           # the processor sees uint8 pixels
    cls = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)
    proc = cls(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})
    pil = [transformers.image_transforms.to_pil_image((a * 255).round().to(torch.uint8).numpy()) for a in x]
    want = proc(images=pil, return_tensors="pt")["pixel_values"]
    got = R.clip_preprocess(x, SIZE)
    assert got.shape == want.shape == (2, 3, SIZE, SIZE)
    # normalised units: 0.03 is about 2 grey levels of 255
    assert (got - want).abs().mean() < 0.01 and (got - want).abs().max() < 0.03


def test_preprocess_constants_grey_and_gradient():
    c = torch.full((1, 1, 64, 48), 0.3, requires_grad=True)       # one channel, portrait
    out = R.clip_preprocess(c, SIZE)
    assert out.shape == (1, 3, SIZE, SIZE)
    assert torch.allclose(out, ((0.3 - MEAN) / STD).expand(1, 3, SIZE, SIZE), atol=1e-5)
    out.sum().backward()
    assert torch.isfinite(c.grad).all() and c.grad.abs().sum() > 0
    x = torch.rand(2, 3, SIZE, SIZE)                               # already at size: no resampling
    assert torch.equal(R.clip_preprocess(x, SIZE), (x - MEAN) / STD)


# ---------------------------------------------------------------- aesthetic

def test_aesthetic_head_hand_computed():
    head = R.AestheticHead.from_state_dict(_hand_head())
    emb = torch.tensor([[3.0, 4.0, 0.0, 0.0], [0.0, 0.0, 5.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    # [3,4,0,0] / 5 = [.6, .8, 0, 0] -> .6 + 2 * .8 + .5 = 2.7; [0,0,1,0] -> .5; zero vector -> .5
    assert torch.allclose(head(emb), torch.tensor([2.7, 0.5, 0.5]))
    assert [m.in_features for m in head.layers if isinstance(m, torch.nn.Linear)] == [4, 4, 4, 4, 2]
    assert R.AestheticHead().layers[0].in_features == 768               # the published 768-1024-128-64-16-1
    assert [m.out_features for m in R.AestheticHead().layers if isinstance(m, torch.nn.Linear)] == [1024, 128, 64, 16, 1]


def test_aesthetic_reward_end_to_end(clip_dir, clip_model):
    rw = R.make_reward(f"aesthetic:{clip_dir}")
    assert isinstance(rw, R.Reward) and rw.differentiable and rw.name == "aesthetic"
    x = _images()
    s = rw(x)
    assert s.shape == (3,) and s.dtype == torch.float32 and torch.isfinite(s).all()
    assert torch.equal(rw(x), s)                                          # deterministic (dropout off)
    with torch.no_grad():
        pix = (torch.nn.functional.interpolate(x, size=(32, 44), mode="bicubic", antialias=True)[..., 6:38] - MEAN) / STD
        e = _features(clip_model.get_image_features(pixel_values=pix))
    e = e / e.norm(dim=-1, keepdim=True)
    assert torch.allclose(s, e[:, 0] + 2 * e[:, 1] + 0.5, atol=1e-5)
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(rw(xg).sum(), xg)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    gray = rw(x[:, :1])                                                   # one channel works too
    assert gray.shape == (3,) and torch.isfinite(gray).all()


def test_aesthetic_published_pth_layout(clip_dir, tmp_path, clip_model):
    d = tmp_path / "aes"
    shutil.copytree(clip_dir, d / "clip")
    (d / "clip" / "aesthetic_head.safetensors").unlink()
    torch.save(_hand_head(), d / "sac+logos+ava1-l14-linearMSE.pth")
    x = _images(2)
    assert torch.allclose(R.AestheticReward(d)(x), R.AestheticReward(clip_dir)(x))


def test_missing_files_name_the_file(clip_dir, tmp_path):
    def err(spec):
        with pytest.raises(RewardError) as ei:
            R.make_reward(spec)
        assert "\n" not in str(ei.value)
        return str(ei.value)

    (tmp_path / "empty").mkdir()
    assert "aesthetic_head.safetensors" in err(f"aesthetic:{tmp_path / 'empty'}")
    assert "HPS_v2.1_compressed.pt" in err(f"hps:{tmp_path / 'empty'}")
    d = tmp_path / "noweights"
    d.mkdir()
    shutil.copy(clip_dir / "aesthetic_head.safetensors", d)
    assert f"missing file '{d / 'config.json'}'" in err(f"aesthetic:{d}")
    shutil.copy(clip_dir / "config.json", d)
    assert f"missing file '{d / 'model.safetensors'}'" in err(f"aesthetic:{d}")
    shutil.copy(clip_dir / "model.safetensors", d)
    assert f"missing file '{d / 'tokenizer.json'}'" in err(f"pickscore:{d}")
    oc = tmp_path / "openclip"
    oc.mkdir()
    (oc / "HPS_v2.1_compressed.pt").write_bytes(b"")
    try:
        import open_clip  # noqa: F401
    except ImportError:
        assert "open_clip_torch" in err(f"hps:{oc}")


def test_bad_head_shapes_are_reported():
    sd = _hand_head()
    sd["layers.7.weight"] = torch.ones(1, 3)
    with pytest.raises(RewardError, match="do not chain"):
        R.AestheticHead.from_state_dict(sd)
    del sd["layers.4.bias"]
    with pytest.raises(RewardError, match="layers.4.bias"):
        R.AestheticHead.from_state_dict(sd)


# ---------------------------------------------------------------- PickScore and HPS

PROMPTS = ["a red cat", "a dog", "a red cat"]


def test_pickscore_value_gradient_and_batch_invariance(clip_dir, clip_model):
    rw = R.make_reward(f"pickscore:{clip_dir}")
    assert rw.differentiable and rw.name == "pickscore"
    x = _images()
    s = rw(x, PROMPTS)
    assert s.shape == (3,) and torch.isfinite(s).all() and torch.equal(rw(x, PROMPTS), s)
    assert len(rw._text_cache) == 2                                       # unique prompts encoded once
    tok = transformers.AutoTokenizer.from_pretrained(str(clip_dir), local_files_only=True)
    with torch.no_grad():
        t = tok(PROMPTS, padding=True, return_tensors="pt")
        te = _features(clip_model.get_text_features(**t))
        pix = (torch.nn.functional.interpolate(x, size=(32, 44), mode="bicubic", antialias=True)[..., 6:38] - MEAN) / STD
        ie = _features(clip_model.get_image_features(pixel_values=pix))
    cos = torch.nn.functional.cosine_similarity(ie, te, dim=-1)
    assert torch.allclose(s, clip_model.logit_scale.exp() * cos, atol=1e-4)
    assert torch.allclose(rw(x[1:2], PROMPTS[1:2]), s[1:2], atol=1e-5)   # no cross-batch leakage
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(rw(xg, PROMPTS).sum(), xg)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    with pytest.raises(RewardError, match="needs one prompt per image"):
        rw(x)
    res = R.evaluate_rewards(rw, x, policy="skip")                          # no prompts: a skipped batch
    assert not res.ok and "needs one prompt" in res.reason


def test_hps_is_unscaled_cosine(clip_dir):
    x = _images()
    pick, hps = R.make_reward(f"pickscore:{clip_dir}"), R.make_reward(f"hps:{clip_dir}")
    h = hps(x, PROMPTS)
    assert h.shape == (3,) and (h.abs() <= 1 + 1e-6).all() and hps.differentiable
    scale = pick.backbone.logit_scale()
    assert torch.allclose(pick(x, PROMPTS), scale * h, atol=1e-5)


def test_weighted_model_rewards_keep_the_graph(clip_dir):
    rw = R.make_reward(f"0.5*aesthetic:{clip_dir}+2*hps:{clip_dir}+brightness")
    assert rw.differentiable
    x = _images().requires_grad_(True)
    res = R.evaluate_rewards(rw, x, PROMPTS)
    assert set(res.components) == {"aesthetic", "hps", "brightness"}
    want = 0.5 * res.components["aesthetic"] + 2 * res.components["hps"] + res.components["brightness"]
    assert torch.allclose(res.scores.detach(), want, atol=1e-6)
    (g,) = torch.autograd.grad(res.scores.sum(), x)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
