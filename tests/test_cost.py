"""FLOP prices and forward-equivalents (rsm_fast/cost.py), the trainer's counter of scored samples
and the forward-equivalent columns of the GPU-hours benchmark (issue 20, item 4)."""
from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from bench import gpu_hours as G
from bench import gpu_hours_cost as GC
from bench import gpu_hours_report as R
from rsm_fast import cost as C
from rsm_fast.config import build_config
from rsm_fast.trainer import Trainer

TOY = ["train.batch_size=8", "method.group_size=4", "policy.hidden=16", "train.threads=1", "task.num_steps=10"]


# ------------------------------------------------------------------------------------------------
# FLOP counts against hand counts
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hidden,layers,emb", [(128, 2, 32), (16, 3, 8)])
def test_toy_denoiser_flops_equal_the_hand_count(hidden, layers, emb):
    # Linear(2 + emb -> h), (layers - 1) x Linear(h -> h), head Linear(h -> 2): 2 FLOPs per multiply-add;
    # the exact reference epsilon and the time embedding are elementwise (not counted)
    hand = 2 * ((2 + emb) * hidden + (layers - 1) * hidden * hidden + hidden * 2)
    assert C.toy_forward(hidden, layers, emb) == hand
    assert C.toy_forward(128, 2, 32) == 41_984


def _count_by_layer_sizes(model: torch.nn.Module, run) -> int:
    """An independent count from the layers' sizes (forward hooks on a real CPU forward): conv
    ``2 Cin/groups kh kw Cout Hout Wout``, linear ``2 in out rows``, attention ``QK^T + AV = 4 L^2 C``
    per diffusers Attention block (L = H W tokens, C = heads x head dim)."""
    from diffusers.models.attention_processor import Attention

    total = [0]

    def conv(m, inp, out):
        total[0] += 2 * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1] * out.numel()

    def linear(m, inp, out):
        total[0] += 2 * m.in_features * out.numel()

    def attn(m, inp, out):
        x = inp[0]
        L = x.shape[-2] * x.shape[-1] if x.dim() == 4 else x.shape[1]
        total[0] += x.shape[0] * 4 * L * L * m.to_q.out_features

    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(conv)
        elif isinstance(m, torch.nn.Linear):
            m.register_forward_hook(linear)
        elif isinstance(m, Attention):
            m.register_forward_hook(attn)
    with torch.no_grad():
        run()
    return total[0]


def test_digits_unet_flops_equal_a_count_by_layer_sizes():
    """The meta-device count includes attention (a CPU count would drop it: the CPU sdpa kernel is not
    in FlopCounterMode's registry), so it equals the count from the layers' sizes."""
    from rsm_fast.tasks import digits as D

    unet = D.make_unet().eval()
    hand = _count_by_layer_sizes(unet, lambda: unet(torch.zeros(1, 1, 16, 16), torch.tensor([10.0]),
                                                     class_labels=torch.tensor([3])))
    assert hand > 30_000_000
    assert C.digits_forward("flow") == C.digits_forward("ddim") == hand


def test_digit_classifier_and_clip_towers_equal_hand_counts():
    fwd, fb, w = C.digit_classifier()
    # conv 1->w (16x16), w->w stride 2 (8x8), w->2w (8x8), 2w->2w stride 2 (4x4), linear 2w*16 -> 10
    hand = 2 * (1 * w * 9 * 256 + w * w * 9 * 64 + w * 2 * w * 9 * 64 + 2 * w * 2 * w * 9 * 16 + 2 * w * 16 * 10)
    assert (w, fwd) == (16, hand) and fwd == 1_263_616
    assert fb == 2 * fwd                      # the input gradient of every conv / linear costs its forward
    # CLIP ViT-L/14 at 224 px: 257 tokens (256 patches + class), per layer qkv+o 8 T d^2, MLP 16 T d^2,
    # attention 4 T^2 d; the patch conv; the projection of the pooled token
    v, fbv, text, src = C.clip_tower("ViT-L/14")
    d, L, T = 1024, 24, 257
    assert v == L * (24 * T * d * d + 4 * T * T * d) + 2 * 3 * 14 * 14 * d * 256 + 2 * d * 768
    assert 2.0 < fbv / v < 2.1 and "published" in src
    dt = 768                                   # text tower: 12 layers, 77 tokens, projection 768
    assert text == 12 * (24 * 77 * dt * dt + 4 * 77 * 77 * dt) + 2 * dt * 768
    a = C.price("diffusers:sd15-tiny", "aesthetic:/nonexistent")
    head = 2 * (768 * 1024 + 1024 * 128 + 128 * 64 + 64 * 16 + 16 * 1)
    assert a.reward_flops == v + head and a.known


def test_image_model_prices_match_performance_md():
    """shared/docs/performance.md §0/§3 (diffusers 0.42.1, FlopCounterMode on meta): SD1.5 UNet 0.80 TFLOP,
    SD3.5-M 2.44 TFLOP at 512² with 333 text tokens, VAE decode 2.5 TFLOP."""
    sd15 = C.diffusers_parts("sd15-full", 512)
    sd3 = C.diffusers_parts("sd35m-full", 512)
    assert sd15["fwd"] / 1e12 == pytest.approx(0.80, abs=0.01) and sd3["fwd"] / 1e12 == pytest.approx(2.44, abs=0.01)
    assert sd3["tokens"] == 333 and sd15["tokens"] == 77
    assert sd15["decode"] / 1e12 == pytest.approx(2.5, abs=0.05) and sd3["decode"] / 1e12 == pytest.approx(2.5, abs=0.05)
    p = C.price("diffusers:sd15-full", "jpeg")
    assert p.reward_flops == 0 and p.decode_flops == sd15["decode"] and p.scored_flops / p.fwd_flops > 3


# ------------------------------------------------------------------------------------------------
# prices and forward-equivalents
# ------------------------------------------------------------------------------------------------
def _prices(fwd=100.0, dec=250.0, rew=50.0, dec_g=500.0, rew_g=100.0):
    return C.Prices("t", "r", fwd, dec, rew, dec_g, rew_g, "test")


def test_forward_equivalents_arithmetic():
    p = _prices()
    assert C.forward_equivalents(1000, 10, p) == 1000 + 10 * 300 / 100
    assert C.forward_equivalents(1000, 10, p, scored_grad=2) == 1000 + (10 * 300 + 2 * 600) / 100
    unknown = _prices(rew=math.nan, rew_g=math.nan)
    assert not unknown.known and C.forward_equivalents(1000, 0, unknown) == 1000     # nothing scored: no price needed
    assert math.isnan(C.forward_equivalents(1000, 5, unknown))
    for args, field in (((-1, 0), "nfe"), ((0, -2), "scored")):
        with pytest.raises(ValueError, match=f"'{field}'"):
            C.forward_equivalents(*args, p)
    with pytest.raises(ValueError, match="fwd_flops"):
        C.forward_equivalents(1, 1, _prices(fwd=0.0))
    d = unknown.as_dict()
    assert d["reward_flops"] is None and json.loads(json.dumps(d)) == d
    back = C.Prices.from_dict(d)
    assert math.isnan(back.reward_flops) and back.fwd_flops == 100.0 and back.source == "test"


def test_price_by_task_and_reward_spec():
    toy = C.price("toy2d")
    assert (toy.task, toy.reward, toy.fwd_flops, toy.scored_flops) == ("toy2d", "linear", 41_984, 0)
    dg = C.price("digits-flow")
    clf = C.digit_classifier()[0]
    assert dg.reward == "digit_label_logprob" and dg.reward_flops == clf and dg.decode_flops == 0
    both = C.price("digits-ddim", "0.5*digit_logprob:3+0.5*digit_score:4")
    assert both.reward_flops == 2 * clf and both.fwd_flops == dg.fwd_flops
    srv = C.price("toy2d", "http://user:secret@127.0.0.1:9/score")
    assert not srv.known and "secret" not in srv.reward and "unknown" in srv.source
    assert not C.price("toy2d", "tests.bad_rewards:quadratic_reward").known
    jpeg = C.price("diffusers:sd15-tiny", "jpeg")
    assert jpeg.known and jpeg.reward_flops == 0 and math.isnan(jpeg.reward_grad_flops) and jpeg.decode_flops > 0
    with pytest.raises(ValueError, match="task.name"):
        C.price("nope")
    with pytest.raises(ValueError, match="nope"):
        C.price("toy2d", "nope")
    assert C.main(["--task", "digits-flow"]) == 0


# ------------------------------------------------------------------------------------------------
# the trainer's counter of scored samples
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["grpo", "tempflow-grpo"])
def test_scored_samples_equal_the_plans_final_rows(preset):
    tr = Trainer(build_config(preset, None, TOY))
    final = tr.plan.rows[-1]
    if preset == "tempflow-grpo":
        assert final > tr.plan.rows[0]           # a branching plan: many more final samples than trunks
    epochs = [tr.epoch() for _ in range(2)]
    assert [e["scored_epoch"] for e in epochs] == [{"reward": final, "reward_grad": 0, "eval": 0}] * 2
    assert tr.scored == {"reward": 2 * final, "reward_grad": 0, "eval": 0}
    assert set(tr.nfe) == {"rollout", "reference", "train", "eval"}        # the NFE keys are unchanged
    nfe = dict(tr.nfe)
    tr.evaluate(16)
    assert tr.scored == {"reward": 2 * final, "reward_grad": 0, "eval": 16} and tr.nfe["rollout"] == nfe["rollout"]
    assert tr.summary({}, 1.0)["scored"] == tr.scored
    st = tr.state_dict()
    assert st["scored"] == tr.scored
    snap = tr.snapshot()
    tr.epoch()
    tr.restore(snap)
    assert tr.scored["reward"] == 2 * final
    tr.close()


def test_scored_counts_of_first_order_forward_and_wave_runs():
    tr = Trainer(build_config("rsm-fo-terminal", None, TOY))     # terminal gradient: one per final sample
    e = tr.epoch()
    assert e["scored_epoch"] == {"reward": tr.plan.rows[-1], "reward_grad": tr.plan.rows[-1], "eval": 0}
    tr = Trainer(build_config("vgg-flow", None, TOY))            # current state: one Tweedie gradient per record
    e = tr.epoch()
    assert e["scored_epoch"] == {"reward": tr.plan.rows[-1], "reward_grad": tr.plan.num_records, "eval": 0}
    tr = Trainer(build_config("diffusion-nft", None, TOY))       # forward process: every sample scored once
    assert tr.epoch()["scored_epoch"]["reward"] == 8
    # waves scored on the reward worker thread (a non-built-in reward)
    tr = Trainer(build_config("grpo", None, TOY + ["rollout.waves=2", "task.reward=tests.bad_rewards:thread_logging_linear",
                                                    "task.reward_timeout=0"]))
    assert tr.async_reward is not None
    assert [tr.epoch()["scored_epoch"]["reward"] for _ in range(2)] == [tr.plan.rows[-1]] * 2
    tr.close()


# ------------------------------------------------------------------------------------------------
# the GPU-hours benchmark's columns
# ------------------------------------------------------------------------------------------------
def _curve(preset, rewards, nfe, scored, fe_per_scored):
    return [{"preset": preset, "seed": 0, "epoch": e, "nfe": e * nfe, "cpu_s": float(e), "wall_s": float(e),
             "eval_reward": r, "eval_kl": 0.0, "eval_s": 0.0, "eval_nfe": 0, "scored": e * scored,
             "fe": e * (nfe + scored * fe_per_scored)} for e, r in enumerate(rewards)]


def test_summary_pairs_forward_equivalents_like_nfe():
    """A preset that needs 4x fewer NFE but scores 20x more samples, each worth 2 forwards, is slower in
    forward-equivalents: the speedup columns disagree, which is what the new column is for."""
    rows = _curve("base", [1.0, 2.0, 3.0, 4.0], 100, 10, 2.0) + _curve("branchy", [1.0, 3.0, 5.0, 6.0], 50, 200, 2.0)
    runs = {r["preset"]: r for r in R.summarize(rows, 3.5, "base")}
    b, f = runs["base"], runs["branchy"]
    assert b["fe_to_target"] == pytest.approx(2.5 * 120) and f["fe_to_target"] == pytest.approx(1.25 * 450)
    assert f["speedup_nfe"] == pytest.approx(4.0) and f["speedup_fe"] == pytest.approx(300 / 562.5)
    assert f["speedup_fe_kind"] == "" and f["fe_per_epoch"] == 450 and f["scored_per_epoch"] == 200
    for r in rows:                                    # an older CSV: no fe column -> unknown, not a crash
        del r["fe"]
    runs = {r["preset"]: r for r in R.summarize(rows, 3.5, "base")}
    assert runs["branchy"]["speedup_fe_kind"] == "unknown" and not runs["base"]["fe_known"]
    assert runs["branchy"]["speedup_nfe"] == pytest.approx(4.0)


ARGS = ["--task", "toy2d", "--seeds", "0", "--eval-samples", "32", "--set", "train.batch_size=8", "--set",
        "method.group_size=4", "--set", "policy.hidden=16", "--presets", "grpo,tempflow-grpo", "--baseline", "grpo",
        "--epochs", "2", "--eval-every", "1", "--target", "3.02"]


def test_gpu_hours_writes_forward_equivalents_and_reanalyzes_an_old_csv(tmp_path, monkeypatch):
    # the 2-D task's reward is free: price each scored sample at one denoiser forward to see it counted
    monkeypatch.setattr(G, "run_prices", lambda cfg, reward=None: _prices(fwd=100.0, dec=60.0, rew=40.0))
    out = tmp_path / "fe"
    assert G.main(ARGS + ["--out", str(out)]) == 0
    rows = R.read_epochs(tmp_path / "fe.csv")
    assert all(set(GC.COLUMNS) <= set(r) for r in rows)
    for r in rows:
        assert r["fe"] == pytest.approx(r["nfe"] + r["scored"]) and r["scored_grad"] == 0
    tf = [r for r in rows if r["preset"] == "tempflow-grpo"]
    assert tf[1]["scored"] == 432 and tf[2]["scored"] == 2 * 432      # every branch's final sample
    runs = {x["preset"]: x for x in R.summarize(rows, 3.02, "grpo")}
    for run in runs.values():
        ev = [(r["eval_reward"], r["fe"]) for r in rows if r["preset"] == run["preset"]]
        want = R.crossing(ev, 3.02)
        assert run["fe_to_target"] == (None if want is None else pytest.approx(want[0]))
        assert run["fe_known"] and run["scored_per_epoch"] == run["scored"] / run["epochs"]
    t, g = runs["tempflow-grpo"], runs["grpo"]
    if t["reached"] and g["reached"] and t["fe_to_target"]:
        assert t["speedup_fe"] == pytest.approx(g["fe_to_target"] / t["fe_to_target"])
    md = (tmp_path / "fe.md").read_text()
    for s in ("fwd-equiv to target", "speedup fwd-equiv", "| preset | seed | NFE | fwd-equiv |", "scored samples",
              "Forward-equivalents (fwd-equiv) = training NFE", "denoiser forward 100 FLOPs, decode 60, reward 40"):
        assert s in md, s
    assert json.loads((tmp_path / "fe.json").read_text())["prices"]["grpo"]["fwd_flops"] == 100.0

    # an old CSV (no scored / fe columns) and JSON (no prices): the tables say 'unknown', nothing crashes
    old = tmp_path / "old"
    cols = [c for c in R.EPOCH_FIELDS if c not in GC.COLUMNS]
    R.write_csv(tmp_path / "old.csv", [{c: r[c] for c in cols} for r in rows], cols)
    meta = json.loads((tmp_path / "fe.json").read_text())
    del meta["prices"]
    (tmp_path / "old.json").write_text(json.dumps(meta))
    assert G.main(["--reanalyze", str(old), "--target", "3.02", "--out", str(tmp_path / "re")]) == 0
    md = (tmp_path / "re.md").read_text()
    assert "Forward-equivalents: **unknown**" in md and "speedup fwd-equiv" in md
    head = next(line for line in md.splitlines() if line.startswith("| preset | reached"))
    fe_col = head.split(" | ").index("fwd-equiv to target")
    row = next(line for line in md.splitlines() if line.startswith("| tempflow-grpo | "))
    assert row.split(" | ")[fe_col] == "unknown"
    summ = list(csv.DictReader(open(tmp_path / "re_summary.csv")))
    assert all(s["fe_known"] == "False" for s in summ)
    assert {s["speedup_fe_kind"] for s in summ if s["preset"] != "grpo"} == {"unknown"}


def test_an_unpriced_reward_gives_unknown_forward_equivalents(tmp_path, monkeypatch):
    monkeypatch.setattr(G, "run_prices", lambda cfg, reward=None: C.price(cfg.task, "http://127.0.0.1:9/r", cfg.policy))
    assert G.main(ARGS + ["--epochs", "1", "--out", str(tmp_path / "u")]) == 0
    rows = R.read_epochs(tmp_path / "u.csv")
    assert all(math.isnan(r["fe"]) == (r["scored"] > 0) for r in rows)
    md = (tmp_path / "u.md").read_text()
    assert "reward `http://127.0.0.1:9/r`" in md and "reward unknown per scored sample" in md
