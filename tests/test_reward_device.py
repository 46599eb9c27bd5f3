"""Reward models on the run's device, in their own precision, on their own CUDA stream (issue 21, item 9).

CPU stand-ins for what a GPU run does: bfloat16 / float16 weights and bfloat16 autocast on the CPU
against the float32 CPU reference; placement checked on the ``meta`` device; the stream protocol
checked against a mocked ``torch.cuda`` that logs the calls. The ``gpu``-marked tests repeat the
score comparison, the stream use and the overlap on a real CUDA device.

Tolerances (``TOL``): relative to the largest reference score of the batch, ~10 unit roundoffs
of the reduced format -- bfloat16 (u = 2^-8): 4e-2; float16 and bfloat16 autocast, which keeps
the reductions, softmax and layer norms in float32 (u = 2^-11 for float16): 1e-2 and 5e-3 for
float16 weights. Measured on these models (2-layer CLIPs, the shipped digits classifier): bfloat16
weights 1.3-1.6 %, bfloat16 autocast 0.7 %, float16 weights 0.1-0.2 % -- about 2.5x under each
bound. A GPU's float32 is TF32 in matmuls when ``train.tf32`` is on (10-bit mantissa, float16's
roundoff), so the GPU float32 comparison uses the float16 bound.
"""
from __future__ import annotations

import contextlib
import itertools
import threading
from types import SimpleNamespace

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import save_file  # noqa: E402
from tinyclip import save_tiny_clip  # noqa: E402

from rsm_fast import rewards as R  # noqa: E402
from rsm_fast.rewards import clip as C  # noqa: E402
from rsm_fast.rewards import device as DV  # noqa: E402
from rsm_fast.rewards import streams as S  # noqa: E402
from rsm_fast.rewards.base import RewardError  # noqa: E402
from rsm_fast.tasks import digits_reward as DR  # noqa: E402

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
pytestmark = pytest.mark.usefixtures("one_thread")

TOL = {"bf16": 4e-2, "bf16-autocast": 1e-2, "fp16": 5e-3, "tf32": 5e-3}
PROMPTS = ["a red cat", "a dog", "a blue car", "sun"] * 3
MODEL_REWARDS = ("aesthetic", "pickscore", "hps", "digits")


# ---------------------------------------------------------------- tiny models on disk

@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A 2-layer random CLIP (32-wide towers, 8-d projection), a CLIP tokenizer over a-z and a
    random 8-16-8-8-4-1 aesthetic head: every CLIP reward loads from it without a download."""
    torch.manual_seed(0)
    d = save_tiny_clip(tmp_path_factory.mktemp("clip"), text=(32, 64, 2), vision=(32, 64, 2), image_size=32,
                       projection=8)
    g = torch.Generator().manual_seed(0)
    sizes, head = [8, 16, 8, 8, 4, 1], {}
    for k, i in enumerate(R.AestheticHead.LINEAR_IDX):
        head[f"layers.{i}.weight"] = torch.randn(sizes[k + 1], sizes[k], generator=g) / sizes[k] ** 0.5
        head[f"layers.{i}.bias"] = 0.1 * torch.randn(sizes[k + 1], generator=g)
    save_file(head, str(d / "aesthetic_head.safetensors"))
    return d


def build(name, clip_dir, device=None, dtype=None, autocast=None):
    if name == "aesthetic":
        return R.AestheticReward(clip_dir, device=device, dtype=dtype, autocast=autocast)
    if name == "pickscore":
        return R.pickscore(clip_dir, device=device, dtype=dtype, autocast=autocast)
    if name == "hps":
        return R.hps(clip_dir, device=device, dtype=dtype, autocast=autocast)
    assert autocast is None
    return DR.DigitLabelLogProb().place(device, dtype)


def inputs(name, device="cpu", n=12):
    g = torch.Generator().manual_seed(1)
    if name == "digits":
        x = torch.rand(n, 1, 16, 16, generator=g)
        return x.to(device), [f"digit {i % 10}" for i in range(n)]
    return torch.rand(n, 3, 40, 56, generator=g).to(device), PROMPTS[:n]


def assert_close_rel(got, ref, tol, what=""):
    """``|got - ref| <= tol * max|ref|`` elementwise (scores compared on the batch's own scale)."""
    scale = ref.abs().max().clamp_min(1e-6)
    err = (got.detach().float().cpu() - ref.detach().float().cpu()).abs().max()
    assert err <= tol * scale, f"{what}: max |diff| {float(err):.3g} > {tol} x {float(scale):.3g}"


def floating_state(module: torch.nn.Module):
    return [(n, t) for n, t in itertools.chain(module.named_parameters(), module.named_buffers()) if t.is_floating_point()]


# ---------------------------------------------------------------- precision: CPU stand-ins for the GPU's

@pytest.mark.parametrize("name", MODEL_REWARDS)
@pytest.mark.parametrize("prec", ["bf16", "fp16", "bf16-autocast"])
def test_reduced_precision_scores_match_the_cpu_fp32_reference(name, prec, clip_dir):
    if name == "digits" and prec == "bf16-autocast":
        pytest.skip("the digits reward takes a weight dtype only (its classifier is 30 k parameters)")
    kw = {"bf16": dict(dtype=torch.bfloat16), "fp16": dict(dtype=torch.float16),
          "bf16-autocast": dict(autocast=torch.bfloat16)}[prec]
    x, prompts = inputs(name)
    ref_reward = build(name, clip_dir)
    ref = ref_reward(x, prompts)
    assert ref.dtype == torch.float32 and ref.shape == (x.shape[0],)
    built = build(name, clip_dir, **kw)                  # built in the precision
    got = built(x, prompts)
    assert got.dtype == torch.float32 and got.device == x.device
    assert_close_rel(got, ref, TOL[prec], f"{name} built {prec}")
    assert not torch.equal(got, ref)                     # the reduced precision really ran
    ref_reward.place("cpu", **kw)                        # moved to it after scoring in float32
    assert_close_rel(ref_reward(x, prompts), got, 1e-6, f"{name} moved to {prec} vs built in it")
    # what RL uses of the scores: their spread in the batch (advantages) -- the ranking barely moves
    rc, gc = ref - ref.mean(), got - got.mean()
    assert float((rc * gc).sum() / (rc.norm() * gc.norm())) > 0.99


def test_gradients_survive_reduced_precision(clip_dir):
    """A first-order estimator differentiates the reward: the graph reaches float32 images through
    the float32 preprocessing and the bfloat16 encoder."""
    x, prompts = inputs("pickscore", n=4)
    for r in (build("pickscore", clip_dir, dtype=torch.bfloat16), build("aesthetic", clip_dir, autocast=torch.bfloat16)):
        xg = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(r(xg, prompts).sum(), xg)
        assert g.dtype == torch.float32 and torch.isfinite(g).all() and g.abs().sum() > 0


# ---------------------------------------------------------------- placement

@pytest.mark.parametrize("name", ["aesthetic", "pickscore", "hps"])
def test_place_moves_every_parameter_and_buffer(name, clip_dir):
    r = build(name, clip_dir)
    if name != "aesthetic":
        r(*inputs(name, n=2))
        assert r._text_cache                                     # filled on the CPU ...
    assert r.place("meta", torch.bfloat16) is r
    if name != "aesthetic":
        assert not r._text_cache                                 # ... and dropped by the move
    assert r.device.type == "meta" and r.precision == DV.Precision(torch.bfloat16)
    everything = list(itertools.chain(r.parameters(), r.buffers()))
    assert everything and all(t.device.type == "meta" for t in everything)
    for n, t in floating_state(r.backbone):
        want = torch.float32 if n in C.ClipBackbone.FP32_BUFFERS else torch.bfloat16
        assert t.dtype == want, (n, t.dtype)
    if name == "aesthetic":
        assert all(t.dtype == torch.float32 for _, t in floating_state(r.head))    # the MLP head stays float32
    assert not any(p.requires_grad for p in r.parameters())


def test_preprocessing_constants_stay_float32_through_any_move(clip_dir):
    r = build("pickscore", clip_dir)
    exact = r.backbone.logit_scale_fp32.clone()
    r.to(torch.bfloat16)                          # nn.Module.to casts everything it is given ...
    b = r.backbone
    assert b.pixel_mean.dtype == b.pixel_std.dtype == b.logit_scale_fp32.dtype == torch.float32
    assert torch.equal(b.logit_scale_fp32, exact)  # ... but the constants keep their float32 values
    assert torch.equal(b.pixel_mean.flatten(), torch.tensor(C.CLIP_MEAN))
    assert b.model.logit_scale.dtype == torch.bfloat16


@pytest.mark.filterwarnings("ignore:.*copying from a non-meta parameter:UserWarning")   # meta copies hold no values
def test_digits_reward_placement():
    shared = DR.load_classifier()                     # the task's own classifier (its evaluation uses it)
    r = DR.DigitLogProb(3, shared).place("meta", torch.bfloat16)
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 for _, t in floating_state(shared))
    clf = r._classifier(torch.empty(1, 1, 16, 16))
    assert all(t.device.type == "meta" and t.dtype == torch.bfloat16 for _, t in floating_state(clf))
    c64 = r._classifier(torch.empty(1, 1, 16, 16, dtype=torch.float64))      # gradcheck keeps float64
    assert all(t.device.type == "meta" and t.dtype == torch.float64 for _, t in floating_state(c64))
    # unplaced: follows the images, float32 (the behaviour the digits task has always had)
    r = DR.DigitLogProb(3)
    x = torch.rand(2, 1, 16, 16)
    assert r.device is None and r(x).dtype == torch.float32


def test_release_precisions():
    for who in ("aesthetic", "pickscore", "hps", "anything"):
        assert DV.release_precision(who, "cpu") == DV.FP32
        assert DV.release_precision(who, "meta") == DV.FP32
    assert DV.release_precision("aesthetic", "cuda") == DV.FP32          # ddpo-pytorch / flow_grpo: float32
    assert DV.release_precision("pickscore", "cuda:1") == DV.FP32        # flow_grpo: float32
    assert DV.release_precision("hps", "cuda") == DV.Precision(torch.float32, torch.float16)   # HPSv2 score.py: amp
    assert DV.resolve_precision("hps", "cuda", dtype=torch.bfloat16) == DV.Precision(torch.bfloat16)
    assert str(DV.RELEASE["hps"]) == "float32 weights, float16 autocast"


def test_registry_builds_model_rewards_on_the_task_device(clip_dir):
    from rsm_fast.tasks.diffusers_task import DiffusersTask

    task = object.__new__(DiffusersTask)                     # no model load: only its device matters here
    task.adapter = SimpleNamespace(device=torch.device("meta"))
    assert DV.task_device(task) == torch.device("meta") and DV.task_device(None) == torch.device("cpu")
    rw = R.make_reward(f"0.5*aesthetic:{clip_dir}+hps:{clip_dir}", task)
    for _, part in rw.terms:
        assert part.device.type == "meta" and part.precision == DV.FP32   # the release's precision there
    assert R.make_reward(f"pickscore:{clip_dir}").device == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_a_cuda_reward_on_a_machine_without_cuda_is_one_line(clip_dir):
    from rsm_fast.config import ConfigError, build_config

    # a run is refused by the config checks before any model or reward is built ...
    with pytest.raises(ConfigError, match="train.device") as e:
        build_config(None, None, ["train.device=cuda", f"task.reward=aesthetic:{clip_dir}"])
    assert "\n" not in str(e.value)
    # ... and a reward built directly for CUDA fails before loading its weights, in one line
    task = SimpleNamespace(device=torch.device("cuda"))
    for spec in (f"aesthetic:{clip_dir}", f"pickscore:{clip_dir}", f"hps:{clip_dir}"):
        with pytest.raises(RewardError, match="CUDA is not available here") as e:
            R.make_reward(spec, task)
        assert "\n" not in str(e.value) and spec.split(":")[0] in str(e.value)
    with pytest.raises(RewardError, match="CUDA is not available"):
        DR.DigitLogProb(3).place("cuda")
    with pytest.raises(RewardError, match="not a torch device"):
        DV.check_device("gpu0", "aesthetic")


def test_image_path_makes_no_host_read(clip_dir, no_host_sync):
    """Images already on the model's device are scored without a read back to the host (the text
    of a prompt seen before comes from the cache). The digits reward is the fixed-target one: the
    label reward checks the labels it parses from the prompts, a tensor built on the host."""
    for name in MODEL_REWARDS:
        r = build(name, clip_dir) if name != "digits" else DR.DigitLogProb(3)
        x, prompts = inputs(name, n=4)
        want = r(x, prompts)
        with no_host_sync():
            got = r(x, prompts)
        assert torch.equal(got, want)


# ---------------------------------------------------------------- the side stream (mocked torch.cuda)

@pytest.fixture
def fake_cuda(monkeypatch):
    """A logging stand-in for torch.cuda's streams and events, the current stream per thread."""
    log = []
    names = {}
    local = threading.local()
    count = itertools.count()

    class Stream:
        def __init__(self, device=None, name="side"):
            self.name = name

        def wait_stream(self, other):
            log.append(("wait_stream", self.name, other.name))

        def wait_event(self, event):
            log.append(("wait_event", self.name, event.name))

    default = Stream(name="default")

    class Event:
        def __init__(self, *a, **k):
            self.name = f"event{next(count)}"

        def record(self, stream=None):
            log.append(("record", self.name, stream.name, threading.current_thread().name))

        def synchronize(self):
            log.append(("synchronize", self.name))

    def current_stream(device=None):
        return getattr(local, "stream", default)

    @contextlib.contextmanager
    def stream(s):
        prev = current_stream()
        local.stream = s
        log.append(("enter", s.name))
        try:
            yield
        finally:
            local.stream = prev
            log.append(("exit", s.name))

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", current_stream)
    monkeypatch.setattr(torch.cuda, "stream", stream)
    monkeypatch.setattr(S, "record_stream",
                        lambda t, s: log.append(("record_stream", names.get(t.data_ptr(), "?"), s.name)))
    return SimpleNamespace(log=log, names=names, current_stream=current_stream)


def test_side_stream_is_a_no_op_off_cuda(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("torch.cuda touched off CUDA")

    for attr in ("Stream", "Event", "current_stream", "stream"):
        monkeypatch.setattr(torch.cuda, attr, boom)
    monkeypatch.setattr(S, "record_stream", boom)
    for dev in (None, "cpu", torch.device("meta")):
        side = S.SideStream(dev)
        assert not side.active and side.mark() is None
        x = torch.ones(3)
        assert side.run(lambda a, k=0: a + k, x, k=1, inputs=(x,), block=True).tolist() == [2.0, 2.0, 2.0]


def test_side_stream_orders_producer_call_event_consumer(fake_cuda):
    side = S.SideStream("cuda")
    assert side.active
    x = torch.rand(4)
    fake_cuda.names[x.data_ptr()] = "images"

    def score(images):
        fake_cuda.log.append(("call", fake_cuda.current_stream().name))
        out = images * 2
        fake_cuda.names[out.data_ptr()] = "scores"
        return out

    out = side.run(score, x, inputs=(x,))
    assert torch.equal(out, x * 2)
    assert fake_cuda.log == [
        ("wait_stream", "side", "default"),         # 1. after everything the producer queued
        ("record_stream", "images", "side"),        # 2. the inputs' memory is in use on the side stream
        ("enter", "side"), ("call", "side"), ("exit", "side"),
        ("record", "event0", "side", threading.current_thread().name),
        ("wait_event", "default", "event0"),        # 3. the consumer's stream waits on the GPU
        ("record_stream", "scores", "default"),     # the result's memory is in use on the consumer's stream
    ]


def test_side_stream_with_a_mark_and_a_blocking_consumer(fake_cuda):
    side = S.SideStream("cuda")
    mark = side.mark()                              # on the producer's thread
    x = torch.rand(2)
    out = side.run(lambda t: {"scores": t + 1}, x, inputs=[x], after=mark, block=True)
    assert torch.equal(out["scores"], x + 1)
    kinds = [e[0] for e in fake_cuda.log]
    assert fake_cuda.log[0][:3] == ("record", "event0", "default")
    assert fake_cuda.log[1] == ("wait_event", "side", "event0")         # the mark only, no wait_stream
    assert "wait_stream" not in kinds and ("synchronize", "event1") in fake_cuda.log
    assert not any(e[0] == "wait_event" and e[1] == "default" for e in fake_cuda.log)
    assert fake_cuda.log[-1][0] == "record_stream" and fake_cuda.log[-1][2] == "default"


def test_side_stream_orders_the_consumer_after_a_failing_call(fake_cuda):
    side = S.SideStream("cuda")
    with pytest.raises(ZeroDivisionError):
        side.run(lambda: 1 / 0)
    assert fake_cuda.log[-2:] == [("record", "event0", "side", threading.current_thread().name),
                                  ("wait_event", "default", "event0")]


def test_async_reward_marks_on_the_sampling_thread_and_scores_on_the_side_stream(fake_cuda):
    seen = {}

    def reward(images):
        seen["stream"], seen["thread"] = fake_cuda.current_stream().name, threading.current_thread().name
        return images.mean((1, 2, 3))

    x = torch.rand(3, 1, 4, 4)
    with R.AsyncReward(reward, name="r") as ar:
        ar._sides[x.device] = S.SideStream("cuda")          # these CPU images stand in for CUDA ones
        res = ar.submit(x).result(timeout=10)
    assert torch.allclose(res.scores, x.mean((1, 2, 3)))
    assert seen["stream"] == "side" and seen["thread"].startswith("rsm-reward")
    worker = seen["thread"]
    assert fake_cuda.log == [
        ("record", "event0", "default", threading.current_thread().name),   # the mark: in submit, after the copy
        ("wait_event", "side", "event0"),                                   # the worker waits for it only
        ("record_stream", "?", "side"),                                     # the copy is read on the side stream
        ("enter", "side"), ("exit", "side"),
        ("record", "event1", "side", worker),
        ("synchronize", "event1"),                                          # complete before the future resolves
        ("record_stream", "?", "default"),                                  # the scores, used on the sampling stream
    ]


# ---------------------------------------------------------------- task.reward_backend (issue 21, item 10)

def _fake_trt(calls, fail=None):
    """A stand-in torch_tensorrt: ``compile`` records its arguments and returns the module itself
    wrapped to count its calls (or raises ``fail``)."""
    import types

    trt = types.ModuleType("torch_tensorrt")
    trt.Input = lambda **kw: SimpleNamespace(**kw)

    class Engine(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, pixels):
            calls.append(("run", tuple(pixels.shape)))
            with torch.no_grad():
                return self.module(pixels)

    def compile(module, ir, inputs, **kw):
        calls.append(("compile", ir, inputs, kw))
        if fail is not None:
            raise fail
        return Engine(module)

    trt.compile = compile
    return trt


def test_backend_eager_and_model_free_terms_are_untouched(clip_dir):
    lines = []
    jpeg = R.JpegReward()
    assert R.apply_backend(jpeg, "tensorrt", emit=lines.append) is jpeg and not lines
    r = build("aesthetic", clip_dir)
    assert R.apply_backend(r, "eager", emit=lines.append) is r and not lines and r.differentiable
    with pytest.raises(ValueError, match="reward_backend"):
        R.apply_backend(r, "onnx")


def test_backend_tensorrt_falls_back_in_one_line_off_cuda_and_without_the_package(clip_dir, monkeypatch):
    import sys

    lines = []
    r = build("pickscore", clip_dir)
    assert R.apply_backend(r, "tensorrt", emit=lines.append) is r
    assert len(lines) == 1 and "needs a CUDA device" in lines[0] and "eager" in lines[0]
    assert r.backend == "eager" and r.differentiable
    monkeypatch.setattr(C.ModelReward, "device", property(lambda self: torch.device("cuda")))
    monkeypatch.setitem(sys.modules, "torch_tensorrt", None)                 # import fails
    R.apply_backend(r, "tensorrt", emit=lines.append)
    assert len(lines) == 2 and "'torch_tensorrt' package is not installed" in lines[1]
    calls = []
    monkeypatch.setitem(sys.modules, "torch_tensorrt", _fake_trt(calls, fail=RuntimeError("no engine\nfor you")))
    R.apply_backend(r, "tensorrt", emit=lines.append)
    assert len(lines) == 3 and "could not compile" in lines[2] and "\n" not in lines[2]
    assert r.backend == "eager" and r.differentiable


def test_backend_tensorrt_scores_through_the_compiled_encoder(clip_dir, monkeypatch, capsys):
    import sys

    calls = []
    monkeypatch.setitem(sys.modules, "torch_tensorrt", _fake_trt(calls))
    x, prompts = inputs("hps")
    want = build("hps", clip_dir)(x, prompts)
    # through the registry, as the trainer builds it (RewardOptions.from_task_config(cfg.task))
    monkeypatch.setattr(C.ModelReward, "device", property(lambda self: torch.device("cuda")))
    opts = R.RewardOptions.from_task_config(SimpleNamespace(reward_backend="tensorrt"))
    assert opts.backend == "tensorrt"
    r = R.make_reward(f"hps:{clip_dir}", None, opts)
    monkeypatch.undo()                                          # back on the CPU for the scoring
    assert "rsm_fast:" not in capsys.readouterr().err          # compiled: nothing to say
    (_, ir, (spec,), kw), = calls
    assert ir == "dynamo" and spec.min_shape == (1, 3, 32, 32) and spec.max_shape == (128, 3, 32, 32)
    assert spec.dtype == torch.float32 and kw["enabled_precisions"] == {torch.float32}
    assert r.backend == "tensorrt" and not r.differentiable
    calls.clear()
    r.set_compiled(r._compiled[0], 5, "tensorrt")               # engines of at most 5 images
    got = r(x, prompts)
    assert [c[1][0] for c in calls] == [5, 5, 2]                # 12 images in three slices
    assert_close_rel(got, want, 1e-6, "through the (fake) engine vs eager")
    r.to("cpu")                                                 # a move drops the engine
    assert r.backend == "eager" and r.differentiable and r._compiled is None


def test_backend_fallback_through_the_registry_is_one_stderr_line(clip_dir, capsys):
    r = R.make_reward(f"0.5*aesthetic:{clip_dir}+jpeg", None, R.RewardOptions(backend="tensorrt"))
    ours = [line for line in capsys.readouterr().err.splitlines() if line.startswith("rsm_fast:")]
    assert ours == ["rsm_fast: reward 'aesthetic': task.reward_backend=tensorrt needs a CUDA device, the model is on "
                    "cpu; running it in eager torch"]
    assert r.differentiable is False and r.terms[0][1].differentiable        # jpeg is the black box, not aesthetic


def test_backend_is_a_config_choice():
    from rsm_fast.config import ConfigError, build_config

    assert build_config(None, None, []).task.reward_backend == "eager"
    assert build_config(None, None, ["task.reward_backend=tensorrt"]).task.reward_backend == "tensorrt"
    with pytest.raises(ConfigError, match="task.reward_backend"):
        build_config(None, None, ["task.reward_backend=trt"])
    with pytest.raises(ValueError, match="task.reward_backend"):
        R.RewardOptions(backend="trt")


# ---------------------------------------------------------------- on a GPU

def _cuda_pairs():
    return [(n, p) for n in MODEL_REWARDS for p in ("release", "bf16")]


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("name,prec", _cuda_pairs())
def test_cuda_scores_match_cpu_fp32(name, prec, clip_dir):
    x, prompts = inputs(name)
    ref = build(name, clip_dir)(x, prompts)
    dtype = torch.bfloat16 if prec == "bf16" else None
    r = build(name, clip_dir, device="cuda", dtype=dtype)
    mods = [r] if name != "digits" else [r._classifier(x.cuda())]
    assert all(t.is_cuda for m in mods for t in itertools.chain(m.parameters(), m.buffers()))
    got = r(x.cuda(), prompts)
    assert got.is_cuda and got.dtype == torch.float32
    tol = TOL["bf16"] if prec == "bf16" else TOL["fp16"] if name == "hps" else TOL["tf32"]
    assert_close_rel(got, ref, tol, f"{name} cuda {prec}")


@pytest.mark.gpu
@cuda
def test_cuda_image_path_makes_no_host_read(clip_dir, no_host_sync):
    for name in MODEL_REWARDS:
        r = build(name, clip_dir, device="cuda") if name != "digits" else DR.DigitLogProb(3).place("cuda")
        x, prompts = inputs(name, "cuda", n=4)
        want = r(x, prompts)
        with no_host_sync():
            got = r(x, prompts)
        assert torch.equal(got, want)


@pytest.mark.gpu
@cuda
def test_async_reward_on_cuda_overlaps_work_queued_on_the_sampling_stream(clip_dir):
    """The next wave's sampling is stood in for by ``torch.cuda._sleep`` queued on the default
    stream after the submission. The reward's kernels run on the side stream, so its scores come
    back while the default stream is still busy; on the default stream they would queue behind it."""
    r = build("pickscore", clip_dir, device="cuda")
    x, prompts = inputs("pickscore", "cuda")
    want = r(x, prompts)
    go, seen = threading.Event(), {}

    def reward(images, prompts, metadata):
        go.wait(10)
        seen["stream"] = torch.cuda.current_stream()
        return r(images, prompts)

    reward.name, reward.differentiable = "pickscore", True
    with R.AsyncReward(R.as_reward(reward, "pickscore")) as ar:
        go.set()
        ar.submit(x, prompts).result(timeout=60)      # warm-up: the side stream's memory pool, cuBLAS handle
        go.clear()
        torch.cuda.synchronize()
        fut = ar.submit(x, prompts)
        torch.cuda._sleep(int(2e9))                   # ~1 s of GPU time queued behind the submission
        go.set()
        res = fut.result(timeout=60)
        busy = not torch.cuda.current_stream().query()
        torch.cuda.synchronize()
    assert seen["stream"] != torch.cuda.default_stream()
    assert busy, "the reward waited for work queued on the sampling stream after its submission"
    assert_close_rel(res.scores, want, 1e-6, "async vs inline")


@pytest.mark.gpu
@cuda
def test_tensorrt_image_encoder_matches_eager_on_cuda(clip_dir):
    pytest.importorskip("torch_tensorrt")
    x, prompts = inputs("aesthetic", "cuda")
    for name in ("aesthetic", "hps"):
        want = build(name, clip_dir)(x.cpu(), prompts)
        lines = []
        r = R.apply_backend(build(name, clip_dir, device="cuda"), "tensorrt", emit=lines.append)
        assert not lines and r.backend == "tensorrt" and not r.differentiable
        # TensorRT may also run normalisations in the reduced type: the bf16-autocast bound
        assert_close_rel(r(x, prompts), want, TOL["bf16-autocast"], f"{name} tensorrt")
