"""CFG-free rollouts everywhere (issue 19 item 6): every preset trains a tiny SD3 with
``task.cfg_scale=0``, and its rollout and reference evaluations cost exactly half the NFE of the
same epoch with CFG (one model row per sample and step instead of two), and so does the training
forward (with CFG the trained output is the guided one, as Flow-GRPO trains). The forward-process
recipes sample this way (guidance 1.0)."""
from __future__ import annotations

import pytest

pytest.importorskip("diffusers")

from rsm_fast.config import build_config, preset_names  # noqa: E402
from rsm_fast.trainer import Trainer  # noqa: E402

TINY = ["task.name=diffusers", "task.model=sd3-tiny", "train.batch_size=4",
        "method.group_size=2", "task.eval_samples=2", "train.threads=1", "policy.lora_rank=2", "task.reward=brightness"]

# SD3.5-M's released profiles (lowsnr2, base2) are 10-step ones; branch-grpo's names a late step
STEPS = {"branch-grpo": 12}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("preset", preset_names())
def test_every_preset_rolls_out_without_cfg_at_half_the_nfe(preset):
    epochs = {}
    steps = STEPS.get(preset, 10)
    for scale in ("0", "4.5"):
        tr = Trainer(build_config(preset, None, TINY + [f"task.num_steps={steps}", f"task.cfg_scale={scale}"]))
        assert (tr.task.cfg_scale is None) == (scale == "0")
        out = tr.epoch()
        assert "skipped" not in out
        epochs[scale] = out["nfe_epoch"]
        fused = tr.cfg.train.fused_epoch and tr.cfg.train.inner_updates == 1
    free, guided = epochs["0"], epochs["4.5"]
    assert free["rollout"] > 0 and guided["rollout"] == 2 * free["rollout"]
    assert guided["reference"] == 2 * free["reference"]
    # a fused epoch's only update reuses the rollout's forwards: no training forward is run
    assert guided["train"] == 2 * free["train"] and (free["train"] == 0) == fused
