"""The memory estimate counts the reward models (rsm_fast/rewards/footprint.py): their weights equal
the parameters of the models rsm_fast/rewards/clip.py really builds, a model reward makes the
estimate larger by at least its weights, a reward that does not fit names ``task.reward``, and a
weighted spec counts every model it builds."""
from __future__ import annotations


import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import save_file  # noqa: E402
from tinyclip import save_tiny_clip  # noqa: E402

from rsm_fast import preflight as P  # noqa: E402
from rsm_fast.config import ConfigError, build_config  # noqa: E402
from rsm_fast.cost import CLIP_ARCH  # noqa: E402
from rsm_fast.rewards import clip as C  # noqa: E402
from rsm_fast.rewards import footprint as FP  # noqa: E402
from rsm_fast.rewards.device import release_precision  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

DIFF = ["task.name=diffusers", "task.model=sd15-tiny", "train.batch_size=8", "method.group_size=4",
        "task.eval_samples=4"]
TOY = ["train.threads=1", "policy.hidden=16", "task.num_steps=10", "train.batch_size=32", "task.eval_samples=16"]


def _param_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random CLIPModel saved as a reward folder, with a tokenizer and an aesthetic head
    (sizes 8-6-5-4-3-1, not the published ones, so the head is read from the file)."""
    torch.manual_seed(0)
    d = save_tiny_clip(tmp_path_factory.mktemp("clip"), text=(16, 24, 2), vision=(12, 20, 3), image_size=32,
                       projection=8)
    sizes = (8, 6, 5, 4, 3, 1)
    sd = {}
    for i, (a, b) in zip(C.AestheticHead.LINEAR_IDX, zip(sizes[:-1], sizes[1:])):
        sd[f"layers.{i}.weight"], sd[f"layers.{i}.bias"] = torch.randn(b, a), torch.randn(b)
    save_file(sd, str(d / "aesthetic_head.safetensors"))
    return d


# -- (a) weights = the parameters of the model clip.py builds -------------------------------------
@pytest.mark.parametrize("name", ["aesthetic", "pickscore", "hps"])
def test_weights_equal_the_built_reward_model(tiny_dir, name):
    """The reward built by clip.py from the folder (on CPU: float32) holds exactly the bytes the
    footprint computes from the folder's config.json (and the head file's header)."""
    reward = {"aesthetic": C.AestheticReward, "pickscore": C.pickscore, "hps": C.hps}[name](str(tiny_dir), device="cpu")
    fp = FP.reward_footprint(f"{name}:{tiny_dir}", "diffusers", "cpu")
    assert [m.name for m in fp.models] == [name]
    assert fp.models[0].weights == _param_bytes(reward)
    assert fp.models[0].source.endswith("config.json")


def _published(tower: str):
    a = CLIP_ARCH[tower]
    with torch.device("meta"):
        return transformers.CLIPModel(transformers.CLIPConfig(text_config=a["text"], vision_config=a["vision"],
                                                              projection_dim=a["projection_dim"]))


@pytest.mark.parametrize("name, device", [("pickscore", "cpu"), ("pickscore", "cuda"), ("hps", "cuda"),
                                          ("hps", "cpu")])
def test_published_clip_h_weights(tmp_path, name, device):
    """Without a config.json (folder not there yet, or HPS's open_clip checkpoint): the published
    ViT-H/14, built here on the meta device through clip.py's ClipScoreReward, in the release's
    precision on ``device`` (float32 weights for both; HPS's fp16 is autocast, not the weights)."""
    backbone = C.HFClip(_published("ViT-H/14"))
    reward = C.ClipScoreReward(name, backbone, scale_by_logit=name == "pickscore", device="meta",
                               dtype=release_precision(name, device).dtype)
    fp = FP.reward_footprint(f"{name}:{tmp_path / 'absent'}", "diffusers", device)
    assert fp.models[0].weights == _param_bytes(reward) == 986_109_441 * 4      # ~3.9 GB
    assert fp.weights == fp.models[0].weights + C.TEXT_CACHE_MAX * 1024 * 4    # + the text-feature cache


def test_published_aesthetic_weights(tmp_path):
    """ViT-L/14 CLIPModel (both towers: clip.py loads the whole model) + the 768-1024-128-64-16-1 head."""
    head = C.AestheticHead()
    want = _param_bytes(_published("ViT-L/14")) + _param_bytes(head)
    fp = FP.reward_footprint(f"aesthetic:{tmp_path}", "diffusers", "cuda")
    assert fp.weights == want == (427_616_513 + 927_969) * 4                    # ~1.7 GB


def test_digits_classifier_weights():
    from rsm_fast.tasks.digits import load_classifier

    fp = FP.reward_footprint("digit_logprob:3+0.5*digit_label_logprob", "digits-flow", "cpu")
    assert [m.name for m in fp.models] == ["digits classifier"]     # the task's one module, shared
    assert fp.weights == _param_bytes(load_classifier())


@pytest.mark.parametrize("spec", ["linear", "jpeg", "brightness", "http://127.0.0.1:9/score", "os.path:join",
                                  "no-such-reward"])
def test_weight_free_rewards_cost_nothing(spec):
    assert FP.reward_footprint(spec, "diffusers", "cuda").weights == 0


def test_activation_formula_bounds_the_measured_forward():
    """One image through the ViT-H/14 image tower, no grad, measured on the meta device with
    memory_profile's LiveBytes (fused attention, as the run): the formula is an upper bound
    within 25 % (it adds the preprocessing's float32 pixel copies)."""
    from rsm_fast.memory_profile import linear_cost

    model = _published("ViT-H/14").eval()

    def run(n):
        with torch.no_grad():
            model.get_image_features(pixel_values=torch.empty(n, 3, 224, 224, device="meta"))

    _, measured = linear_cost(run)
    dims, _ = FP.clip_dims("pickscore", None)
    formula = FP.clip_activation_row(dims, 4, 4, text=False)
    assert measured <= formula <= 1.25 * measured


# -- (b) a model reward adds at least its weights -------------------------------------------------
def _estimate(reward: str, sets=DIFF, device="cuda", preset="grpo"):
    cfg = build_config(preset, None, sets + [f"task.reward={reward}"])
    return P.estimate_memory(cfg, P.task_geometry(cfg), device=device)


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_pickscore_estimate_exceeds_a_weight_free_reward(tmp_path, device):
    base = _estimate("jpeg", device=device)
    est = _estimate(f"pickscore:{tmp_path}", device=device)
    fp = FP.reward_footprint(f"pickscore:{tmp_path}", "diffusers", device)
    assert base.reward_weights == 0 and "reward scoring" not in base.train
    assert est.reward_weights == fp.weights > 3.9e9
    assert est.total - base.total >= fp.models[0].weights
    # the scoring call: every final sample of the batch at once (8 images), and the evaluation's 4
    img = P.task_geometry(build_config("grpo", None, DIFF)).image_bytes          # one decoded image, float32
    assert est.train["reward scoring"] == 8 * (img + fp.act_row)
    assert est.eval["reward scoring"] == 4 * (img + fp.act_row)


def test_reward_scored_during_the_rollout_adds_to_the_model_calls(tmp_path):
    """rollout.waves: a wave's images are scored on a worker thread while the next wave samples."""
    est = _estimate(f"pickscore:{tmp_path}", DIFF + ["rollout.waves=2"])
    part = est.train
    assert "reward scoring" not in part and part["reward scoring during rollout"] > 0
    assert est.phase_total(part) >= part["plan"] + part["model calls"] + part["reward scoring during rollout"]


# -- (c) the reward that does not fit is named ----------------------------------------------------
def test_reward_weights_push_the_run_over(tmp_path):
    cfg = build_config("grpo", None, DIFF + [f"task.reward=pickscore:{tmp_path}"])
    est = P.check_memory(cfg, "cuda", available=10**15, host=10**15)
    avail = est.total - est.reward_weights // 2          # fits without the reward, not with it
    assert est.setting(avail) == "task.reward"
    assert est.setting(est.reward_weights - 1) == "task.reward"      # the reward alone does not fit
    with pytest.raises(ConfigError) as e:
        P.check_memory(cfg, "cuda", available=avail, host=10**15)
    msg = str(e.value)
    assert msg.startswith("config field 'task.reward'") and "\n" not in msg and "reward models" in msg
    jpeg = build_config("grpo", None, DIFF + ["task.reward=jpeg"])
    assert P.check_memory(jpeg, "cuda", available=avail, host=10**15) is not None


def test_batch_still_named_when_it_is_the_larger_part(tmp_path):
    """A batch whose scoring activations outweigh the reward's weights: lower the batch."""
    est = _estimate(f"pickscore:{tmp_path}", DIFF[:2] + ["train.batch_size=512", "method.group_size=4",
                                                          "task.eval_samples=4"])
    assert est.train["reward scoring"] > est.reward_weights
    assert est.setting(est.total - 1) == "train.batch_size"


# -- (d) a weighted sum counts every model --------------------------------------------------------
def test_weighted_spec_counts_both_models(tmp_path):
    a, p = tmp_path / "a", tmp_path / "p"
    aes = FP.reward_footprint(f"aesthetic:{a}", "diffusers", "cuda")
    pick = FP.reward_footprint(f"pickscore:{p}", "diffusers", "cuda")
    est = _estimate(f"aesthetic:{a}+0.5*pickscore:{p}")
    assert est.reward_weights == aes.weights + pick.weights
    assert est.total - _estimate("jpeg").total >= aes.models[0].weights + pick.models[0].weights
    # the terms score one after another: the larger term's activations
    assert est.train["reward scoring"] == _estimate(f"pickscore:{p}").train["reward scoring"]
    twice = FP.reward_footprint(f"pickscore:{p}+pickscore:{p}", "diffusers", "cuda")
    assert twice.weights == 2 * pick.weights                      # each term builds its own model


def test_toy_task_with_its_builtin_reward_is_unchanged():
    est = _estimate("linear", TOY, "cpu")
    assert est.reward_weights == 0 and "reward scoring" not in est.train and "reward scoring" not in est.eval
