"""The run loop (rsm_fast/run_loop.py): held-out evaluation during training that changes nothing
else, checkpoints that hold the whole training state (an in-process resume from any of them
continues bit for bit), and the LoRA exported with every checkpoint of an image run."""
from __future__ import annotations

import json

import pytest
import torch

from rsm_fast import checkpoint as C
from rsm_fast.config import build_config
from rsm_fast.rundir import RunDir
from rsm_fast.trainer import Trainer

TOY = ["train.batch_size=32", "task.eval_samples=128", "train.epochs=5", "train.checkpoint_every=1",
       "train.keep_checkpoints=10"]
MEASURED = ("seconds", "seconds_epoch", "peak_memory_mb")


def _log(run) -> list[dict]:
    out = []
    for line in (run / "log.jsonl").read_text().splitlines():
        r = json.loads(line)
        for k in MEASURED:
            r.pop(k, None)
        out.append(r)
    return out


def test_eval_every_logs_evaluations_and_changes_nothing_else(tmp_path):
    a = Trainer(build_config("rsm-soft-zo", None, TOY)).run(RunDir(tmp_path / "a"), progress=False)
    b = Trainer(build_config("rsm-soft-zo", None, TOY + ["train.eval_every=2"])).run(RunDir(tmp_path / "b"),
                                                                                   progress=False)
    la, lb = _log(tmp_path / "a"), _log(tmp_path / "b")
    assert [r["epoch"] for r in lb if "eval" in r] == [1, 3]     # after epochs 2 and 4; the final one is the summary's
    for r in lb:
        if "eval" in r:
            ev = r.pop("eval")
            assert set(ev) >= {"reward_mean", "kl_to_reference", "mode_weights"}
    assert la == lb
    assert a["reward_mean"] == b["reward_mean"] and a["nfe"] == b["nfe"]
    assert b["nfe_by_kind"]["eval"] == 3 * a["nfe_by_kind"]["eval"]


@pytest.mark.parametrize("preset, extra", [("rsm-soft-zo", []), ("rsm-evr", ["train.ema_decay=0.9"]),
                                           ("mix-grpo", ["rollout.window_every=2", "train.lr_schedule=cosine"])])
def test_every_checkpoint_continues_bit_for_bit(tmp_path, preset, extra):
    cfg = build_config(preset, None, TOY + extra)
    ref = Trainer(cfg)
    s_ref = ref.run(RunDir(tmp_path / "ref"), progress=False)
    log_ref = _log(tmp_path / "ref")
    final = torch.load(tmp_path / "ref" / "checkpoint.pt", weights_only=True)
    for ck in C.checkpoint_dirs(tmp_path / "ref")[:-1]:
        state = C.load_state(ck)
        tr = Trainer(build_config(preset, None, TOY + extra))
        tr.load_state_dict(state)
        recs = []
        while tr.epochs_done < cfg.train.epochs:
            st = tr.epoch()
            recs.append({"epoch": tr.epochs_done - 1, **st, "nfe": tr.nfe_total()})
        for r in recs:
            for k in MEASURED:
                r.pop(k, None)
        assert json.loads(json.dumps(recs)) == log_ref[state["epochs_done"]:], ck.name
        sd = tr.state_dict()
        for k, v in final["policy"].items():
            assert torch.equal(sd["policy"][k], v)
        assert sd["nfe"]["rollout"] == final["nfe"]["rollout"] and sd["allocator"] == final["allocator"]
        assert sd["optimizer"]["state"].keys() == final["optimizer"]["state"].keys()
    assert s_ref["epochs"] == cfg.train.epochs


def test_image_checkpoints_carry_a_loadable_lora(tmp_path):
    """A killed image run still leaves an adapter: every checkpoint folder holds the LoRA
    (the EMA one) that a diffusers pipeline's load_lora_weights reads."""
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from rsm_fast.models import build_model

    (tmp_path / "prompts.txt").write_text("a red cat\ntwo blue dogs\n")
    sets = ["task.name=diffusers", "task.model=sd15-tiny", "task.num_steps=4", "train.batch_size=4",
            "method.group_size=2", "task.eval_samples=2", "train.threads=1", "train.epochs=2", "train.lr=0.01",
            "policy.lora_rank=4", "task.reward=jpeg", f"task.prompts={tmp_path / 'prompts.txt'}",
            "train.checkpoint_every=1", "train.ema_decay=0.5"]
    tr = Trainer(build_config("grpo", None, sets))
    tr.run(RunDir(tmp_path / "run"), progress=False)
    ck = tmp_path / "run" / "checkpoints" / "epoch-000001"
    assert (ck / "lora").is_dir()
    # the trainer resumed from that checkpoint, EMA applied, is what the pipeline computes
    again = Trainer(build_config("grpo", None, sets))
    again.load_state_dict(C.load_state(ck))
    fresh = build_model("sd15-tiny", seed=0)
    pipe = fresh.pipeline()
    pipe.load_lora_weights(str(ck / "lora"))
    a = again.task.adapter
    x = torch.randn(2, *again.task.latent_shape, generator=torch.Generator().manual_seed(0))
    t = again.engine._t[:2].clone()
    cond = a.encode_prompts(["a red cat", "two blue dogs"])
    with torch.no_grad(), again._ema_applied():
        ours = a.policy(x, t, cond)
        base = a.reference(x, t, cond)
    with torch.no_grad():
        theirs = a._denoise(pipe.unet, x, t, cond).float()
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    assert (ours - base).abs().max() > 1e-6
