"""The digits task (rsm_fast.tasks.digits): data, shipped checkpoints, samplers vs diffusers,
classifier accuracy, generated-sample class agreement through the rollout engine, rewards."""
import hashlib
import json

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("sklearn")
pytest.importorskip("safetensors")

from rsm_fast import schedules as S  # noqa: E402
from rsm_fast.engine.plan import PlanSpec, compile_plan  # noqa: E402
from rsm_fast.engine.rollout import RolloutEngine  # noqa: E402
from rsm_fast.tasks import digits as D  # noqa: E402
from rsm_fast.tasks.digits_reward import (DigitLabelLogProb, DigitLogProb, DigitScore, labels_from,  # noqa: E402
                                          make_reward)

SUMMARY = json.loads((D.ASSETS / "digits.json").read_text())
FAMILIES = {"ddim": "ddpm", "flow": "flow"}   # task family -> checkpoint name


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The models are tiny: on a shared 2-core CPU one thread is several times faster than two."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data():
    return D.load_digits_split()


@pytest.fixture(scope="module")
def classifier():
    return D.load_classifier()


@pytest.fixture(scope="module")
def unets():
    return {fam: D.Digits(fam).build_model() for fam in FAMILIES}


# -- data -------------------------------------------------------------------------------------------
def test_data_shapes_ranges_and_split(data):
    x, y = D.load_digits_images()
    assert x.shape == (1797, 1, 16, 16) and x.dtype == torch.float32 and y.shape == (1797,)
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0
    assert sorted(y.unique().tolist()) == list(range(10))
    tr, ho = D.split_indices(y)
    tr2, ho2 = D.split_indices(y)
    assert torch.equal(tr, tr2) and torch.equal(ho, ho2)
    assert torch.equal(torch.cat([tr, ho]).sort().values, torch.arange(1797))       # disjoint, complete
    # the split the shipped classifier was trained on
    assert D.split_checksum(ho) == SUMMARY["data"]["heldout_checksum"]
    assert ho.numel() == SUMMARY["data"]["heldout"] and tr.numel() == SUMMARY["data"]["train"]
    counts, per_class = torch.bincount(y[ho], minlength=10), torch.bincount(y, minlength=10)
    assert ((counts - 0.2 * per_class).abs() <= 1).all()                              # stratified
    assert torch.equal(data["heldout_x"], x[ho]) and torch.equal(data["train_y"], y[tr])
    assert not torch.equal(D.split_indices(y, seed=1)[1], ho)


# -- shipped checkpoints -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["ddpm", "flow", "classifier"])
def test_checkpoint_files_match_summary(name):
    path = D.ASSETS / f"{name}.safetensors"
    assert path.stat().st_size <= 2 * 1024 * 1024
    assert hashlib.sha256(path.read_bytes()).hexdigest() == SUMMARY[name]["sha256"]
    state, meta = D.read_checkpoint(path)
    assert sum(v.numel() for v in state.values()) == SUMMARY[name]["params"]
    assert meta["config"] == SUMMARY[name]["config"]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_models_build_and_give_finite_outputs(family, unets):
    task = D.Digits(family)
    unet = unets[family]
    assert 1e5 <= sum(p.numel() for p in unet.parameters()) <= 5e5
    names = {n.rsplit(".", 1)[-1] if not n.endswith("to_out.0") else "to_out.0" for n, _ in unet.named_modules()}
    assert set(task.lora_targets) <= names
    x = torch.randn(4, *task.latent_shape, generator=torch.Generator().manual_seed(0))
    t = task.transition.table("t")[[0, 5, 10, 19]].to(torch.float32)
    f = task.model_fn(unet)
    with torch.no_grad():
        out, out_null = f(x, t, torch.tensor([0, 3, 7, 9])), f(x, t, None)
        direct = unet(x, D.unet_timestep(family, t), class_labels=torch.full((4,), 10)).sample
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert not torch.allclose(out, out_null)                  # the label matters
    torch.testing.assert_close(out_null, direct)              # None = the null class; t converted


# -- samplers vs diffusers ------------------------------------------------------------------------
def _guided(f, x, t, labels, w):
    both = f(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, torch.full_like(labels, 10)]))
    return both[4:] + w * (both[:4] - both[4:])


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_matches_diffusers_ddim_scheduler(eta, unets):
    from diffusers import DDIMScheduler

    task = D.Digits("ddim", eta=eta)
    f = task.model_fn(unets["ddim"])
    sch = DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                        clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing")
    sch.set_timesteps(20)
    assert sch.timesteps.tolist() == task.transition.table("t").long().tolist()
    g = torch.Generator().manual_seed(3)
    labels = torch.tensor([1, 4, 6, 8])
    x = xs = torch.randn(4, 1, 16, 16, generator=g)
    with torch.no_grad():
        for i, ts in enumerate(sch.timesteps):
            z = torch.randn(x.shape, generator=g)
            c = task.transition.coeffs_at(i, 4)
            x = c.step(x, _guided(f, x, c.t, labels, 3.0), z)
            e = _guided(f, xs, ts.to(torch.float32).expand(4), labels, 3.0)
            xs = sch.step(e, ts, xs, eta=eta, variance_noise=z).prev_sample
    torch.testing.assert_close(x, xs, atol=2e-4, rtol=1e-4)
    assert float(x.std()) > 0.3                                  # a real image, not a collapsed one


def test_flow_ode_matches_diffusers_flow_match_euler(unets):
    from diffusers import FlowMatchEulerDiscreteScheduler

    task = D.Digits("flow", noise_level=0.0)
    f = task.model_fn(unets["flow"])
    sch = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    sch.set_timesteps(20)
    torch.testing.assert_close(sch.sigmas.to(torch.float64), S.rf_sigmas(20, shift=1.0), atol=1e-6, rtol=0)
    g = torch.Generator().manual_seed(4)
    labels = torch.tensor([0, 2, 5, 9])
    x = xs = torch.randn(4, 1, 16, 16, generator=g)
    with torch.no_grad():
        for i, ts in enumerate(sch.timesteps):
            c = task.transition.coeffs_at(i, 4)
            x = c.step(x, _guided(f, x, c.t, labels, 3.0), torch.zeros_like(x))
            # the scheduler hands the model timestep = 1000 sigma; the adapter takes sigma
            xs = sch.step(_guided(f, xs, (ts / 1000).expand(4), labels, 3.0), ts, xs).prev_sample
    torch.testing.assert_close(x, xs, atol=2e-4, rtol=1e-4)


# -- quality ----------------------------------------------------------------------------------------
def test_classifier_heldout_accuracy(data, classifier):
    acc = D.class_agreement(classifier, D.decode(data["heldout_x"]), data["heldout_y"])
    assert acc >= 0.95
    assert acc == pytest.approx(SUMMARY["classifier"]["metrics"]["heldout_accuracy"], abs=0.01)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_engine_samples_have_the_requested_digit(family, unets, classifier):
    """20-step SDE rollouts through the rollout engine with CFG 3: 10 digits x 4 seeds."""
    task = D.Digits(family)
    plan = compile_plan(PlanSpec(kind="sde", num_steps=task.num_steps, groups=10, trunks=4))
    eng = RolloutEngine(task.model_fn(unets[family]), task.transition, plan, seed=7, cfg_scale=task.cfg_scale)
    labels = torch.arange(10)
    rec = eng.run(cond=labels, uncond=task.uncond, latent_shape=task.latent_shape)
    assert rec.x0.shape == (40, *task.latent_shape) and torch.isfinite(rec.x0).all()
    assert rec.log_prob.shape[0] == rec.x.shape[0] > 0 and torch.isfinite(rec.log_prob).all()
    images = task.decode(rec.x0)
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    assert D.class_agreement(classifier, images, labels[rec.x0_group]) >= 0.85
    # without guidance towards a label (all null) far fewer samples match an arbitrary request
    rec_u = eng.run(cond=torch.full((10,), 10), uncond=task.uncond, latent_shape=task.latent_shape)
    assert D.class_agreement(classifier, task.decode(rec_u.x0), labels[rec_u.x0_group]) < 0.5


# -- task API -----------------------------------------------------------------------------------------
def test_task_api():
    vp, rf = D.Digits("ddim"), D.Digits("flow")
    assert (vp.name, vp.native, rf.name, rf.native) == ("digits_ddim", "eps", "digits_flow", "v")
    assert vp.transition.table("t").tolist() == [999.0 - 50 * i for i in range(20)]
    assert rf.transition.table("t")[0] == 1.0 and rf.transition.num_steps == 20
    assert vp.transition.sde_mask[:-1].all() and not vp.ode_transition.sde_mask.any()
    assert rf.transition.sde_mask.all() and "flow_grpo_sde(a=0.7)" == rf.transition.name
    assert torch.equal(vp.uncond, torch.tensor([10]))
    c1 = vp.conditions(8, torch.Generator().manual_seed(0))
    assert torch.equal(c1, vp.conditions(8, torch.Generator().manual_seed(0)))
    assert c1.dtype == torch.long and ((c1 >= 0) & (c1 < 10)).all()
    assert vp.prompts(torch.tensor([3, 0])) == ["digit 3", "digit 0"]
    assert vp.metadata(torch.tensor([3])) == [{"label": 3}]
    img = vp.decode(torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0]))
    assert img.tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]
    with pytest.raises(ValueError, match="family"):
        D.Digits("ve")


# -- rewards -----------------------------------------------------------------------------------------
def test_rewards_values_shapes_and_grad(data, classifier):
    imgs = D.decode(data["heldout_x"][:12])
    lab = data["heldout_y"][:12]
    lp3 = DigitLogProb(3, classifier)
    r = lp3(imgs)
    assert r.shape == (12,) and r.dtype == torch.float32 and (r <= 0).all()
    assert float(r[lab == 3].min()) > float(r[lab != 3].max())     # digit 3s score highest
    x = imgs.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(lp3(x).sum(), x)
    assert g.abs().sum() > 0 and lp3.differentiable
    s = DigitScore(3, classifier)
    out = s(x)
    assert not s.differentiable and not out.requires_grad and out.grad_fn is None
    torch.testing.assert_close(out, r)
    agree = DigitLabelLogProb(classifier)
    ra = agree(imgs, metadata=[{"label": int(v)} for v in lab])
    torch.testing.assert_close(ra, torch.log_softmax(classifier(imgs), 1)[torch.arange(12), lab])
    torch.testing.assert_close(agree(imgs, prompts=[f"digit {int(v)}" for v in lab]), ra)
    assert float(ra.mean()) > -0.1                                 # held-out digits: confident and right
    assert torch.equal(labels_from(2, None, {"label": torch.tensor([4, 5])}), torch.tensor([4, 5]))
    assert make_reward("digit_score:7", classifier).name == "digit_score_7"
    with pytest.raises(ValueError):
        agree(imgs)                                                # no labels given
    with pytest.raises(ValueError):
        lp3(imgs[:, :, :8])                                        # wrong size


def test_digit_logprob_gradcheck_float64(classifier):
    r = DigitLogProb(5, classifier)
    x = torch.rand(2, 1, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    assert r(x).dtype == torch.float64
    assert torch.autograd.gradcheck(r, (x,), eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)
