"""The trainer on diffusers models (issue 5, must-show): tiny SD1.5- and SD3-style pipelines train
two epochs with LoRA for a zeroth-order and a first-order preset; only LoRA parameters change; the
exported LoRA loads into a diffusers pipeline and reproduces the trained model's outputs; bad
model / prompt inputs are one-line config errors."""
from __future__ import annotations

import copy
import json

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from rsm_fast.config import ConfigError, build_config  # noqa: E402
from rsm_fast.runlog import RunDir  # noqa: E402
from rsm_fast.trainer import Trainer  # noqa: E402

TINY = ["task.name=diffusers", "task.num_steps=4", "train.batch_size=4", "method.group_size=2",
        "task.eval_samples=2", "train.threads=1", "train.epochs=2", "train.lr=0.01", "policy.lora_rank=4"]


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest: tiny models, one intra-op thread


@pytest.mark.parametrize("model", ["sd15-tiny", "sd3-tiny"])
@pytest.mark.parametrize("preset, reward", [("grpo", "jpeg"), ("rsm-fo-terminal", "brightness")])
def test_lora_trains_only_lora_and_exports_for_diffusers(tmp_path, model, preset, reward):
    (tmp_path / "prompts.txt").write_text("a red cat\ntwo blue dogs\na green tree\n")
    cfg = build_config(preset, None, TINY + [f"task.model={model}", f"task.reward={reward}",
                                             f"task.prompts={tmp_path / 'prompts.txt'}"])
    tr = Trainer(cfg)
    den = tr.task.adapter.denoiser
    before = {k: v.detach().clone() for k, v in den.state_dict().items()}
    s = tr.run(RunDir(tmp_path / "run"), progress=False)
    after = den.state_dict()
    lora = {k for k in before if "lora_" in k}
    assert lora and all(torch.equal(before[k], after[k]) for k in before if k not in lora)   # base frozen
    assert any(not torch.equal(before[k], after[k]) for k in lora)                            # LoRA moved
    assert s["epochs"] == 2 and s["skipped_epochs"] == 0 and "kl_to_reference" in s
    logs = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(logs) == 2 and all(x["peak_memory_mb"] > 0 for x in logs)
    if preset == "grpo":
        assert all(x["onpolicy_logratio_absmax"] < 1e-4 for x in logs)
    # the exported LoRA in a fresh diffusers pipeline reproduces the trained model
    from rsm_fast.models import build_model

    fresh = build_model(model, seed=0)
    pipe = fresh.pipeline()
    pipe.load_lora_weights(s["lora"])
    loaded = pipe.unet if fresh.family == "sd15" else pipe.transformer
    a = tr.task.adapter
    x = torch.randn(2, *tr.task.latent_shape, generator=torch.Generator().manual_seed(0))
    t = tr.engine._t[:2].clone()
    cond = a.encode_prompts(["a red cat", "a green tree"])
    with torch.no_grad():
        ours = a.policy(x, t, cond)
        theirs = a._denoise(loaded, x, t, cond).float()
        base = a.reference(x, t, cond)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    assert (ours - base).abs().max() > 1e-6


@pytest.mark.parametrize("sets, needle", [
    (["task.model=/no/such/folder_or_name"], "task.model"),
    (["task.prompts=/no/such/prompts.txt"], "task.prompts"),
    (["task.resolution=21"], "task.resolution"),
    (["task.reward=jpeg", "method.estimator=fo_terminal"], "not differentiable"),
])
def test_bad_model_inputs_are_config_errors(sets, needle):
    cfg = build_config("grpo", None, TINY + ["task.model=sd15-tiny"] + sets)
    with pytest.raises(ConfigError, match=needle):
        Trainer(cfg)
