"""The memory estimate counts the first-order estimators' reward backward (issue 21): the reward
differentiated through the decode keeps every layer of the decode and of the reward model for
each row of a call, ``method.fo_grad_chunk`` rows a call.

* The with-grad bytes are measured right: the meta device's live bytes at the end of a with-grad
  forward equal, to the byte, what autograd saves in a real CPU run (``saved_tensors_hooks``) for
  sd15-tiny's VAE decode and the digits classifier; the CLIP formula's per-layer term and its
  autocast weight copies equal a real tiny CLIP's saved bytes, and the whole formula bounds the
  meta measurement of the published ViT-L/14 and ViT-H/14 image towers within 2 %.
* The estimate of an fo_terminal run has a "reward backward" part that grows with the rows per
  call (the chunk rule of the trainer) and joins the training peak as a max; fo_value=path adds
  the policy graphs of its tail and sweep; a real digits run's saved bytes stay under it.
* Zeroth-order runs are unchanged: byte for byte the estimate of the code before this change.
* A run that only does not fit because of the reward backward is refused naming
  ``method.fo_grad_chunk``, and following the advice makes it fit; one row a call that still does
  not fit names ``method.estimator``.
"""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from rsm_fast import preflight as P  # noqa: E402
from rsm_fast import memory_estimate as ME  # noqa: E402
from rsm_fast.config import ConfigError, build_config  # noqa: E402
from rsm_fast.cost import CLIP_ARCH  # noqa: E402
from rsm_fast.memory_profile import LiveBytes, _decode_grad, fused_attention, grad_cost, image_geometry  # noqa: E402
from rsm_fast.rewards import clip as C  # noqa: E402
from rsm_fast.rewards import footprint as FP  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

DIFF = ["task.name=diffusers", "task.model=sd15-tiny", "train.batch_size=8", "method.group_size=4",
        "task.eval_samples=4"]
TOY = ["train.threads=1", "policy.hidden=16", "task.num_steps=10", "train.batch_size=32", "task.eval_samples=16"]
DIGITS = ["task.name=digits-ddim", "task.num_steps=4", "train.batch_size=4", "method.group_size=2",
          "task.eval_samples=4"]


def _saved_bytes(fn, params):
    """``(bytes autograd saved while running fn, fn's output)``: every saved storage once,
    the frozen parameters left out (they are the weights, not activations)."""
    own = {p.untyped_storage().data_ptr() for p in params}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in own:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def _meta_saved(call, shape, n):
    """Live bytes at the end of a with-grad meta forward of ``n`` rows (the input made outside)."""
    x = torch.zeros(n, *shape, device="meta").requires_grad_(True)
    with torch.enable_grad(), fused_attention(), LiveBytes() as lb:
        out = call(x)
        live = lb.live
    del out
    return live


def _per_row(f):
    return f(2) - f(1)


# -- (a) the measurement equals a real run's saved tensors ------------------------------------------
def _tiny_vae(device):
    from diffusers import AutoencoderKL

    from rsm_fast.memory_profile import _clean, _configs

    torch.manual_seed(0)
    with torch.device(device):
        vae = AutoencoderKL.from_config(_clean(_configs("sd15-tiny")[1]["vae"]))
    return vae.eval().requires_grad_(False)


def _decode(vae):
    def call(z):      # models/sd15.py decode: unscale, decode, to [0, 1]
        img = vae.decode(z / vae.config.scaling_factor).sample
        return (img.float() / 2 + 0.5).clamp(0, 1).sum()
    return call


def test_meta_decode_with_grad_saves_what_a_real_cpu_run_saves():
    real, meta = _tiny_vae("cpu"), _tiny_vae("meta")
    shape = (real.config.latent_channels, 8, 8)
    saved = _per_row(lambda n: _saved_bytes(lambda: _decode(real)(torch.randn(n, *shape).requires_grad_(True)),
                                            real.parameters())[0])
    # the meta forward's live bytes: the saved tensors, plus the 4-byte sum that is the output
    assert _per_row(lambda n: _meta_saved(_decode(meta), shape, n)) == saved == 288_896
    cost = _decode_grad("sd15-tiny", 16, False, False)     # the preflight's measurement at 8 x 8 latents (VAE factor 2)
    assert saved <= cost.per_row <= 1.05 * saved             # + the backward's working set


def test_meta_classifier_with_grad_saves_what_a_real_cpu_run_saves():
    from rsm_fast.tasks import digits as D

    real = D.load_classifier().eval().requires_grad_(False)
    with torch.device("meta"):
        meta = D.DigitClassifier(**real.config).eval().requires_grad_(False)
    call = lambda clf: lambda x: torch.log_softmax(clf(x), 1)[:, 3].sum()  # noqa: E731
    saved = _per_row(lambda n: _saved_bytes(lambda: call(real)(torch.rand(n, 1, 16, 16).requires_grad_(True)),
                                            real.parameters())[0])
    assert _per_row(lambda n: _meta_saved(call(meta), (1, 16, 16), n)) == saved > 0
    grad = FP.digits_classifier_grad(real.config["width"])
    assert saved <= grad.per_row <= 1.2 * saved
    fp = FP.reward_footprint("digit_logprob:3+0.5*digit_label_logprob", "digits-ddim", "cpu")
    assert fp.models[0].grad_row == 2 * grad.per_row            # one module, a graph per term


def _clip(device, L, dims=(32, 128), heads=2, image=32, patch=8):
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=54, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16),
        vision_config=dict(hidden_size=dims[0], intermediate_size=dims[1], num_hidden_layers=L,
                           num_attention_heads=heads, image_size=image, patch_size=patch), projection_dim=8)
    torch.manual_seed(0)
    with torch.device(device):
        return transformers.CLIPModel(cfg).eval().requires_grad_(False)


def _clip_dims(model) -> dict:
    v = model.config.vision_config
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size")
    t = model.config.text_config
    return {"vision": {**FP.VISION_DEFAULTS, **{k: int(getattr(v, k)) for k in keys}},
            "text": {**FP.TEXT_DEFAULTS, "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
                     "max_position_embeddings": t.max_position_embeddings}, "projection_dim": 8}


def _clip_score(model):
    bb = C.HFClip(model)      # the rewards' image path: preprocess, image tower, normalised features
    return lambda images: torch.nn.functional.normalize(bb.encode_image(bb.preprocess(images)).float(), dim=-1).sum()


@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_clip_formula_is_a_real_cpu_runs_saved_bytes(autocast):
    """Per layer and image, and under autocast the cast weight copies, exactly as the formula says."""
    def saved(L, n):
        m = _clip("cpu", L)
        ctx = torch.autocast("cpu", dtype=autocast) if autocast else torch.autocast("cpu", enabled=False)
        with ctx:
            return _saved_bytes(lambda: _clip_score(m)(torch.rand(n, 3, 24, 24).requires_grad_(True)),
                                m.parameters())[0]

    a = 2 if autocast else 4
    s = {(L, n): saved(L, n) for L in (2, 3) for n in (1, 2)}
    layer_row = (s[3, 2] - s[2, 2]) - (s[3, 1] - s[2, 1])
    d2, d3 = _clip_dims(_clip("meta", 2)), _clip_dims(_clip("meta", 3))
    assert layer_row == FP.clip_grad_saved_row(d3, 4, a) - FP.clip_grad_saved_row(d2, 4, a)
    assert (s[3, 1] - s[2, 1]) - layer_row == (FP.clip_grad_fixed(d3, a, bool(autocast))
                                              - FP.clip_grad_fixed(d2, a, bool(autocast)))
    # the whole image path (embeddings, pixels, projection) stays under the with-grad bytes per image
    whole = s[3, 2] - s[3, 1]
    assert whole <= FP.clip_grad_saved_row(d3, 4, a) + FP.clip_activation_row(d3, 4, a, text=False)


@pytest.mark.parametrize("tower", ["ViT-L/14", "ViT-H/14"])
def test_clip_formula_bounds_the_published_towers_measured_with_grad(tower):
    """The published towers on the meta device, a 224 px image through preprocessing, the image
    tower and the backward: the formula (saved layers + the no-grad term) is within 2 % above."""
    arch = CLIP_ARCH[tower]
    with torch.device("meta"):
        model = transformers.CLIPModel(transformers.CLIPConfig(text_config=arch["text"], vision_config=arch["vision"],
                                                               projection_dim=arch["projection_dim"]))
    model.eval().requires_grad_(False)
    measured = grad_cost(_clip_score(model), 3, 224, 224).per_row
    name = "aesthetic" if tower == "ViT-L/14" else "pickscore"
    dims, _ = FP.clip_dims(name, None)
    formula = FP.clip_grad_saved_row(dims, 4, 4) + FP.clip_activation_row(dims, 4, 4, text=False)
    assert measured <= formula <= 1.02 * measured
    # what the estimate counts per image (PickScore's no-grad term is its larger image tower's too)
    assert FP.reward_footprint(f"{name}:/absent", "diffusers", "cpu").models[0].grad_row == formula


def test_hps_on_cuda_keeps_its_autocast_weight_copies():
    fp = FP.reward_footprint("hps:/absent", "diffusers", "cuda").models[0]
    v = CLIP_ARCH["ViT-H/14"]["vision"]
    d, i, L = v["hidden_size"], v["intermediate_size"], v["num_hidden_layers"]
    assert fp.grad_fixed == L * (4 * d * d + 2 * d * i) * 2 == 1_258_291_200     # float16 copies, 1.26 GB
    assert FP.reward_footprint("hps:/absent", "diffusers", "cpu").models[0].grad_fixed == 0


# -- (b) the estimate -----------------------------------------------------------------------------
def _check(preset, sets, device="cuda", available=2**60):
    return P.check_memory(build_config(preset, None, sets), device, available=available, host=2**60)


def test_fo_terminal_estimate_has_the_reward_backward_scaling_with_rows_per_call():
    spec = "task.reward=pickscore:/absent"
    fp = FP.reward_footprint("pickscore:/absent", "diffusers", "cuda")
    parts = {}
    for k in (1, 2, 3, 8):
        cfg = build_config("rsm-fo-terminal", None, DIFF + [spec, f"method.fo_grad_chunk={k}"])
        geo = image_geometry(cfg, P.task_geometry(cfg), "cuda")
        assert geo.decode_grad_row > 0
        est = P.estimate_memory(cfg, geo, device="cuda")
        parts[k] = est.train["reward backward"]
        assert parts[k] == k * (geo.decode_grad_row + fp.models[0].grad_row) + geo.decode_grad_fixed
    assert parts[2] - parts[1] == parts[3] - parts[2] == (parts[8] - parts[2]) // 6 > 0
    # 0 = rollout.chunk_size, 0 there = every final sample (8), more than the samples = all of them
    same = lambda *s: _check("rsm-fo-terminal", DIFF + [spec, *s]).train["reward backward"]  # noqa: E731
    assert same("method.fo_grad_chunk=0", "rollout.chunk_size=3") == parts[3]
    assert same("method.fo_grad_chunk=0", "rollout.chunk_size=0") == parts[8]
    assert same("method.fo_grad_chunk=50") == parts[8]
    # it is one more transient part: the peak holds the largest of them, not their sum
    est = _check("rsm-fo-terminal", DIFF + [spec, "method.fo_grad_chunk=8"])
    t = est.train
    fixed = t["plan"] + t["records"] + t["record copies"]
    assert est.phase_total(t) == fixed + max(t["model calls"], t["training activations"], t["decode"],
                                             t["reward scoring"], t["reward backward"]) == fixed + parts[8]


def test_rows_per_call_follow_the_trainer():
    """fo_terminal and fo_value=path: final samples; fo_current / fo_lookahead: records."""
    def rows(preset, *s):
        cfg = build_config(preset, None, TOY + list(s))
        tp = P.plan_counts(cfg, P.task_geometry(cfg).sde_mask)
        return ME.fo_grad_rows(cfg, tp.rows[-1], tp.records), tp
    k, tp = rows("sqdf")
    assert k == tp.records > tp.rows[-1]
    assert rows("vgg-flow", "method.fo_grad_chunk=5")[0] == 5
    k, tp = rows("rsm-soft-fo")
    assert k == tp.rows[-1] == 32
    assert rows("rsm-fo-terminal", "rollout.chunk_size=7")[0] == 7
    assert rows("grpo")[0] == 0


@pytest.mark.parametrize("sets", [DIGITS, TOY])
def test_path_value_adds_the_tail_graph_and_the_sweep(sets):
    """fo_value=path: the reward backward of k final samples runs at the end of the deterministic
    tail, whose policy graph it holds (digits-ddim and the 2-D task: 1 tail step), then the adjoint
    sweep calls the policy with grad on k rows. The 2-D task's built-in reward adds no decode."""
    cfg = build_config("rsm-soft-fo", None, sets)
    geo = image_geometry(cfg, P.task_geometry(cfg))
    est = P.estimate_memory(cfg, geo)
    k, g = P.plan_counts(cfg, geo.sde_mask).rows[-1], 2 if geo.cfg_guidance else 1
    assert geo.sde_mask[-1] is False and all(geo.sde_mask[:-1])
    fp = FP.reward_footprint(ME._reward_spec(cfg.task), cfg.task.name, "cpu")
    call = 0 if sets is TOY else k * geo.decode_grad_row + geo.decode_grad_fixed + fp.backward(k)
    graph = g * k * geo.act_grad + geo.act_fixed
    assert est.train["reward backward"] == max(call + graph, graph) == call + graph
    assert (sets is TOY) == (call == 0)


def test_digits_fo_terminal_estimate_covers_a_real_runs_saved_bytes():
    """The digits task: decode (scale, clamp) and classifier with grad. A real CPU reward backward of
    the trainer over every final sample saves at most the estimated part (measured: 0.85 of it)."""
    from rsm_fast.trainer import Trainer

    # task.reward_timeout=0: the reward called inline (a deadline runs it on a worker thread, and the
    # saved-tensor hooks are per thread)
    cfg = build_config("rsm-fo-terminal", None, DIGITS + ["train.threads=1", "task.reward_timeout=0"])
    est = P.check_memory(cfg, available=2**60)
    part = est.train["reward backward"]
    tr = Trainer(cfg)
    tr.conds = tr.task.conditions(tr.plan.spec.groups, tr.gen)
    rec, f_ref, _ = tr._rollout(tr.engines, tr.plan, tr.conds, tr.gen, 0)
    c, _ = tr._record_kl(rec, f_ref)
    saved, g = _saved_bytes(lambda: tr._fo_grads(rec, c), list(tr.policy.parameters())
                            + list(tr.task.classifier.parameters()))
    assert g.shape == rec.x0.shape and rec.x0.shape[0] == 4
    assert 0.7 * part <= saved <= part


# -- (c) zeroth order is unchanged ------------------------------------------------------------------
# totals of the estimate before the reward backward was counted (commit b5acf26), on cuda and cpu
BEFORE = [
    ("grpo", TOY, 232_616),
    ("grpo", DIGITS, 32_727_484),
    ("grpo", DIGITS + ["rollout.waves=2"], 32_727_484),
    ("grpo", DIFF, 9_830_068),
    ("grpo", DIFF + ["task.reward=pickscore:/absent"], 4_158_071_024),
    ("grpo", DIFF + ["task.reward=aesthetic:/absent", "task.vae_slicing=true"], 1_875_243_124),
]


@pytest.mark.parametrize("preset, sets, total", BEFORE)
def test_zeroth_order_estimates_are_unchanged(preset, sets, total):
    for device in ("cuda", "cpu"):
        est = _check(preset, sets, device)
        assert est.total == total
        assert "reward backward" not in est.train


# -- (d) the setting to change ----------------------------------------------------------------------
def test_only_the_reward_backward_does_not_fit_names_fo_grad_chunk():
    sets = DIFF + ["task.reward=pickscore:/absent", "method.fo_grad_chunk=8", "task.resolution=64"]
    est = _check("rsm-fo-terminal", sets)
    t = est.train
    other = max(t["model calls"], t["training activations"], t["decode"], t["reward scoring"])
    assert t["reward backward"] > 2 * other
    avail = est.total - (t["reward backward"] - other) // 2        # fits but for the reward backward
    with pytest.raises(ConfigError) as e:
        _check("rsm-fo-terminal", sets, available=avail)
    msg = str(e.value)
    assert msg.startswith("config field 'method.fo_grad_chunk'") and "\n" not in msg, msg
    assert "training reward backward" in msg
    fixed = _check("rsm-fo-terminal", sets[:-2] + ["method.fo_grad_chunk=2", "task.resolution=64"], available=avail)
    assert fixed.total <= avail < est.total


def test_one_row_that_does_not_fit_names_the_estimator():
    """A weight-free differentiable reward at 256 px, every other part at its smallest (one row a
    model call, checkpointed training forward, sliced decode): the decode with grad of one image
    (76.6 MB for sd15-tiny's VAE; its sliced no-grad decode 15 MB) is what does not fit, and
    chunking cannot lower it."""
    sets = DIFF + ["task.reward=brightness", "method.fo_grad_chunk=1", "task.resolution=256", "task.num_steps=2",
                   "rollout.chunk_size=1", "policy.gradient_checkpointing=true", "task.vae_slicing=true"]
    est = _check("rsm-fo-terminal", sets)
    t = est.train
    other = max(t["model calls"], t["training activations"], t["decode"])
    assert "reward scoring" not in t and est.reward_weights == 0 and t["reward backward"] > other
    with pytest.raises(ConfigError, match="^config field 'method.estimator'"):
        _check("rsm-fo-terminal", sets, available=est.total - (t["reward backward"] - other) // 2)
