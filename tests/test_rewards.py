"""Reward protocol, weight-free rewards, fault policy, weighted sums, async evaluation, spec strings."""
from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

import bad_rewards
from rsm_fast import rewards as R
from rsm_fast.rewards import RewardError, RewardSkipped


def _images(b=3, c=3, h=16, w=16, seed=0, dtype=torch.float32):
    return torch.rand(b, c, h, w, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _pil_kb(img_hwc_uint8: np.ndarray) -> float:
    """Independent encoder: PIL JPEG quality 95, size / 1000 (ddpo-pytorch's convention)."""
    a = img_hwc_uint8[..., 0] if img_hwc_uint8.shape[-1] == 1 else img_hwc_uint8
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=95)
    return len(buf.getvalue()) / 1000


# ---------------------------------------------------------------- weight-free rewards

@pytest.mark.parametrize("channels", [1, 3])
def test_jpeg_matches_pil_at_quality_95(channels):
    x = _images(c=channels)
    u8 = (x * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    want = torch.tensor([_pil_kb(a) for a in u8])
    inc, comp = R.make_reward("jpeg-incompressibility"), R.make_reward("jpeg")
    assert isinstance(inc, R.Reward) and not inc.differentiable and comp.name == "jpeg"
    got = inc(x)
    assert got.dtype == torch.float32 and got.shape == (3,)
    assert torch.equal(got, want.float()) and torch.equal(comp(x), -got)
    assert (got > 0.1).all()        # noise at 16x16 costs well over 100 bytes


def test_flat_image_is_more_compressible_than_noise():
    x = torch.cat([torch.full((1, 3, 32, 32), 0.5), _images(1, 3, 32, 32)])
    r = R.JpegReward()(x)
    assert r[0] > r[1] + 0.5


def test_jpeg_rejects_two_channels():
    with pytest.raises(RewardError, match="channels"):
        R.JpegReward()(torch.rand(1, 2, 8, 8))


def test_brightness_and_colour_values():
    x = torch.stack([torch.full((3, 4, 4), 0.25), torch.zeros(3, 4, 4)])
    x[0, 0] = 1.0                                                   # red channel of image 0 at 1
    assert torch.allclose(R.make_reward("brightness")(x), torch.tensor([0.5, 0.0]))
    red = R.make_reward("color:1,0,0")
    assert red.differentiable and red.name == "color:1,0,0"
    # image 0: (0, .25, .25) away from red -> -(0.0625 * 2); image 1: black -> -1
    assert torch.allclose(red(x), torch.tensor([-0.125, -1.0]))
    assert torch.allclose(R.make_reward("color:0.5")(torch.full((2, 1, 3, 3), 0.5)), torch.zeros(2))


@pytest.mark.parametrize("spec", ["brightness", "color:0.9,0.2,0.1"])
def test_simple_reward_gradients_match_finite_differences(spec):
    r = R.make_reward(spec)
    x = _images(2, 3, 5, 4, dtype=torch.float64).requires_grad_(True)
    assert r(x).dtype == torch.float64
    assert torch.autograd.gradcheck(lambda t: r(t), (x,), eps=1e-6, atol=1e-8)


def test_brightness_gradient_through_reward_grad():
    x = _images(2, 3, 4, 5)
    g = R.reward_grad(R.make_reward("brightness"), "brightness", x)
    assert torch.allclose(g, torch.full_like(x, 1 / 60))
    with pytest.raises(RewardError, match="'jpeg' is not differentiable"):
        R.reward_grad(R.make_reward("jpeg"), "jpeg", x)


# ---------------------------------------------------------------- fault policy

FAULTS = [
    (bad_rewards.nan_reward, "NaN/inf for"),
    (bad_rewards.inf_reward, "NaN/inf for 1 of"),
    (bad_rewards.wrong_shape_reward, "shape"),
    (bad_rewards.not_a_tensor_reward, "returned list"),
    (bad_rewards.raising_reward, "raised RuntimeError: reward backend crashed second line"),
    (lambda x: torch.ones(x.shape[0], dtype=torch.complex64), "dtype"),
]


@pytest.mark.parametrize("fn, needle", FAULTS)
def test_fault_policy_error_raises_one_line(fn, needle):
    x = torch.randn(14, 2)
    with pytest.raises(RewardError) as ei:
        R.evaluate_rewards(fn, x, name="my-reward")
    msg = str(ei.value)
    assert "\n" not in msg and "my-reward" in msg and needle in msg


@pytest.mark.parametrize("fn, needle", FAULTS)
def test_fault_policy_skip_returns_no_scores(fn, needle):
    res = R.evaluate_rewards(fn, torch.randn(14, 2), policy="skip", name="my-reward")
    assert res.ok is False and res.scores is None and res.components == {}
    assert needle in res.reason and "\n" not in res.reason
    with pytest.raises(RewardSkipped, match="my-reward"):
        res.unwrap()


def test_good_batch_under_both_policies_and_bad_arguments():
    x = _images(2)
    for policy in R.POLICIES:
        res = R.evaluate_rewards(R.BrightnessReward(), x, policy=policy)
        assert res.ok and torch.allclose(res.unwrap(), x.mean((1, 2, 3)))
    with pytest.raises(ValueError, match="policy"):
        R.evaluate_rewards(R.BrightnessReward(), x, policy="ignore")
    with pytest.raises(ValueError, match="prompts has 1 entries for a batch of 2"):
        R.evaluate_rewards(R.BrightnessReward(), x, ["a"], policy="skip")


def test_checked_keeps_the_trainer_contract():
    x = torch.randn(14, 2)
    with pytest.raises(RewardError, match="returned NaN/inf for 2 of 14 samples"):
        R.checked(bad_rewards.nan_reward, "tests.bad_rewards:nan_reward", x)
    r = R.checked(bad_rewards.quadratic_reward, "q", x.double())
    assert r.dtype == torch.float32 and torch.allclose(r, (-(x ** 2).sum(1) * 0.1).float())


def test_prompts_and_metadata_reach_a_three_argument_reward():
    rw = R.make_reward("tests.bad_rewards:prompt_length_reward")
    res = R.evaluate_rewards(rw, _images(2), ["ab", "abcd"], [{"bonus": 0.5}, {}])
    assert torch.equal(res.scores, torch.tensor([2.5, 4.0]))


# ---------------------------------------------------------------- weighted sums

def test_weighted_sum_value_components_and_flags():
    x = _images(2)
    mixed = R.make_reward("0.5*brightness + 2*jpeg")
    assert isinstance(mixed, R.WeightedSum) and not mixed.differentiable
    res = R.evaluate_rewards(mixed, x)
    b, j = x.mean((1, 2, 3)), R.JpegReward()(x)
    assert torch.allclose(res.scores, 0.5 * b + 2 * j)
    assert set(res.components) == {"brightness", "jpeg"}
    assert torch.allclose(res.components["brightness"], b) and torch.equal(res.components["jpeg"], j)

    smooth = R.make_reward("-1*brightness+color:1,0,0+color:1,0,0")
    assert smooth.differentiable and smooth.keys == ["brightness", "color:1,0,0", "color:1,0,0#2"]
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(smooth(xg).sum(), xg)
    c = torch.tensor([1.0, 0, 0]).view(1, 3, 1, 1)
    assert torch.allclose(g, -1 / 768 + 2 * (-2 * (x - c) / 256), atol=1e-6)


def test_weighted_sum_names_the_failing_part():
    bad = R.WeightedSum([(1.0, R.BrightnessReward()), (0.5, R.as_reward(bad_rewards.raising_reward, "crashy"))])
    with pytest.raises(RewardError, match="crashy"):
        R.evaluate_rewards(bad, _images(2))
    assert R.evaluate_rewards(bad, _images(2), policy="skip").scores is None


# ---------------------------------------------------------------- async evaluation

class _SlowFirst:
    name, differentiable = "slow-first", False

    def __init__(self):
        self.calls = []

    def __call__(self, images, prompts=None, metadata=None):
        self.calls.append(float(images[0, 0, 0, 0]))
        if len(self.calls) == 1:
            time.sleep(0.3)
        return images.mean((1, 2, 3))


def test_async_batches_return_in_order_and_copy_inputs():
    rw = _SlowFirst()
    a, b = torch.full((2, 1, 4, 4), 0.1), torch.full((3, 1, 4, 4), 0.7)
    with R.AsyncReward(rw) as ar:
        f1, f2 = ar.submit(a), ar.submit(b)
        a.fill_(0.9)                                   # the caller reuses its buffer at once
        r2 = f2.result(timeout=10)
        assert f1.done()                               # one worker: batch 1 finished before batch 2
        r1 = f1.result()
    assert torch.allclose(r1.scores, torch.full((2,), 0.1)) and torch.allclose(r2.scores, torch.full((3,), 0.7))
    assert rw.calls == pytest.approx([0.1, 0.7])
    with pytest.raises(RuntimeError, match="closed"):
        ar.submit(a)


def test_async_errors_surface_at_result():
    with R.AsyncReward(bad_rewards.raising_reward, name="crashy") as ar:
        f = ar.submit(torch.rand(2, 3, 4, 4))
        ok = ar.submit(torch.rand(2, 3, 4, 4))          # the worker survives a failing batch
        with pytest.raises(RewardError, match="crashy' raised RuntimeError"):
            f.result(timeout=10)
        with pytest.raises(RewardError):
            ok.result(timeout=10)
    with R.AsyncReward(bad_rewards.nan_reward, policy="skip") as ar:
        res = ar.submit(torch.rand(8, 2)).result(timeout=10)
    assert not res.ok and res.scores is None and "NaN/inf" in res.reason


def test_async_runs_off_the_calling_thread():
    seen = []
    rw = R.as_reward(lambda x: (seen.append(threading.current_thread().name), x.mean((1, 2, 3)))[1], "t")
    with R.AsyncReward(rw) as ar:
        ar.submit(torch.rand(1, 3, 2, 2)).result(timeout=10)
    assert seen and seen[0].startswith("rsm-reward")


# ---------------------------------------------------------------- spec strings and the registry

def test_parse_spec_weights_and_plus_inside_paths():
    assert R.parse_spec("0.7*aesthetic:/m/a+b+0.3 * jpeg") == [(0.7, "aesthetic:/m/a+b"), (0.3, "jpeg")]
    assert R.parse_spec("jpeg+http://127.0.0.1:9/x") == [(None, "jpeg"), (None, "http://127.0.0.1:9/x")]
    assert R.parse_spec("-1e-1*tests.bad_rewards:nan_reward") == [(-0.1, "tests.bad_rewards:nan_reward")]
    with pytest.raises(RewardError, match="empty term"):
        R.parse_spec("2*")


def test_unknown_and_malformed_names_give_one_line_errors():
    with pytest.raises(RewardError) as ei:
        R.make_reward("aesthetik")
    msg = str(ei.value)
    assert "\n" not in msg and "unknown reward 'aesthetik'" in msg
    assert all(n in msg for n in ("jpeg", "aesthetic", "pickscore", "hps", "brightness", "linear"))
    with pytest.raises(RewardError, match="needs an argument"):
        R.make_reward("aesthetic")
    with pytest.raises(RewardError, match="takes no argument"):
        R.make_reward("jpeg:5")
    with pytest.raises(RewardError, match="cannot import module 'no_such_module'"):
        R.make_reward("no_such_module:fn")
    with pytest.raises(RewardError, match="expected 1 or 3 values"):
        R.make_reward("color:1,0")


def test_registered_name_wins_over_module_function(monkeypatch):
    # 'aesthetic:/x' is the model adapter, never `import aesthetic`
    with pytest.raises(RewardError, match="reward 'aesthetic': directory '/nonexistent/dir' does not exist"):
        R.make_reward("aesthetic:/nonexistent/dir")
    # tests/ is on sys.path, so 'bad_rewards:nan_reward' would import; a registered name shadows it
    assert isinstance(R.make_reward("bad_rewards:nan_reward"), R.FunctionReward)
    monkeypatch.setitem(R.REGISTRY, "bad_rewards", R.registry.Entry(lambda a, t: R.BrightnessReward(), "optional", ""))
    assert isinstance(R.make_reward("bad_rewards:nan_reward"), R.BrightnessReward)


def test_resolve_keeps_the_linear_and_module_forms():
    class Task:
        @staticmethod
        def reward(x):
            return -0.5 * x[:, 0] + 3

    fn, builtin = R.resolve("linear", Task())
    assert builtin and fn is Task.reward
    fn, builtin = R.resolve("tests.bad_rewards:quadratic_reward", Task())
    assert not builtin and fn.name == "tests.bad_rewards:quadratic_reward" and fn.differentiable
    x = torch.randn(5, 2)
    assert torch.allclose(R.checked(fn, fn.name, x), -(x ** 2).sum(1) * 0.1)
    lin = R.make_reward("2*linear", Task())
    assert torch.allclose(lin(x), 2 * (-0.5 * x[:, 0] + 3))
    with pytest.raises(RewardError, match="needs a task"):
        R.make_reward("linear")


def test_tensorrt_hook_says_what_is_missing():
    try:
        import torch_tensorrt  # noqa: F401
        pytest.skip("torch_tensorrt is installed here")
    except ImportError:
        pass
    with pytest.raises(RewardError) as ei:
        R.compile_tensorrt(torch.nn.Linear(2, 1), [torch.zeros(1, 2)])
    assert "torch_tensorrt" in str(ei.value) and "\n" not in str(ei.value)
