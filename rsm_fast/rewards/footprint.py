"""Device bytes of the reward models a spec builds, from their architecture alone (the memory preflight).

:func:`reward_footprint` reads a reward spec (:func:`~.registry.parse_spec`) the way
:func:`~.registry.make_reward` builds it, without loading a weight or importing transformers:

* ``aesthetic``, ``pickscore``, ``hps`` (:mod:`.clip`): a whole transformers ``CLIPModel``
  (image and text towers) on ``task.device`` in its release precision there (:mod:`.device`:
  float32 weights for all three, HPSv2.1 under float16 autocast on CUDA; float32 everywhere on
  CPU), plus the aesthetic MLP head (float32). The architecture is the reward directory's
  ``config.json`` (the one ``CLIPModel.from_pretrained`` reads: ``/dir``, or ``/dir/clip`` for the
  aesthetic predictor), transformers' config defaults for the keys it leaves out; without one
  (the directory is not there yet, or HPS's open_clip checkpoint) the published architecture
  :data:`rsm_fast.cost.CLIP_ARCH` (ViT-L/14 for aesthetic, ViT-H/14 for PickScore and HPS; the
  sources are cited there). Parameters by :func:`clip_params` (exact: the test builds the model).
  Every model term counts: ``aesthetic:/a+0.5*pickscore:/p`` holds both, and a name repeated in a
  spec is built twice. A ClipScore reward also keeps its text-feature cache (at most
  ``clip.TEXT_CACHE_MAX`` prompts, ``projection_dim`` float32 each).
* the digits task's classifier (``digit_*``): its parameters, float32, once (the task's module is
  shared by every digit term).
* everything else -- ``linear``, ``jpeg*``, ``brightness``, ``color``, ``http(s)://`` servers,
  ``module:function`` callables, and a spec that does not parse (the reward preflight reports it):
  no device weights.

Scoring activations, per scored image (:func:`clip_activation_row`): one transformer layer is in
flight in a no-grad forward (fused attention: no ``T x T`` score matrix), so the peak is
``T * (5 D * w + max(5 D, 3 I) * a)`` bytes for ``T`` tokens of width ``D`` and MLP width ``I``
(the residual stream, its layer norm and the attention's q/k/v/output in ``w`` = the weights'
bytes; the MLP's ``fc1`` output and quick-GELU's two temporaries in ``a`` = the autocast dtype's
bytes, else ``w``), with ``T = (S / P)^2 + 1`` for the image tower (``S`` image size, ``P``
patch) and ``T = max_position_embeddings`` (77) for the text tower, whichever is larger, plus three
float32 copies of the ``3 x S x S`` preprocessed pixels (resize, then normalisation). Measured on
the meta device (:class:`rsm_fast.memory_profile.LiveBytes`, float32, no grad): 17.4 MB per image
for ViT-L/14 and 21.7 MB for ViT-H/14; the tower term gives 17.9 and 22.4 MB, 19.7 and 24.2 MB
with the pixels (tests/test_memory_estimate_rewards.py checks the bound).
A weighted sum scores its terms one after another: the largest term's bytes.

With grad (the first-order estimators' reward backward, :meth:`RewardFootprint.backward`), autograd
keeps every layer of the image tower until the backward (:func:`clip_grad_saved_row`): per layer
and token the two layer norms' inputs (the residual stream, ``w`` bytes), q, k, v and the
attention output (``a``), the MLP's ``fc1`` output and quick-GELU's sigmoid (``a``), the fused
attention's log-sum-exp (float32 per head) and the norms' mean and rstd (float32): ``L T (2 D w
+ 4 D a + 2 I a + 4 H + 16)`` bytes per image for ``L`` layers and ``H`` heads -- 354 MB for
ViT-L/14, 590 MB for ViT-H/14 in float32 -- plus the no-grad term above for the backward's working
set (and the text tower's no-grad forward, which runs while the image graph is kept); under
autocast each linear's cast weight copy is kept too (:func:`clip_grad_fixed`: autocast caches
only weights that require grad), ``L (4 D^2 + 2 D I) a`` bytes per call whatever the rows. The
per-layer term and the autocast copies equal, to the byte, what
``torch.autograd.graph.saved_tensors_hooks`` sees a real CPU run save (float32 and bfloat16
autocast, tiny CLIPs); the whole bounds the meta measurement of the with-grad forward + backward
within 1.2 % for ViT-L/14 (373.9 MB formula, 369.5 MB measured per image) and ViT-H/14 (614.3 /
609.2 MB) (tests/test_memory_estimate_fo.py). The digits classifier's with-grad bytes are measured
on the meta device (:func:`digits_classifier_grad`). With grad the terms of a weighted sum each
keep their graph until the one backward: they add. Not counted: a TensorRT engine's own copy of
the image tower (``task.reward_backend=tensorrt``; a compiled engine has no gradient, so no
first-order run uses one).
"""
from __future__ import annotations

import functools
import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .base import RewardError
from .device import release_precision

CLIP_REWARDS = ("aesthetic", "pickscore", "hps")
DIGIT_REWARDS = ("digit_label_logprob", "digit_logprob", "digit_score")
# transformers' CLIPTextConfig / CLIPVisionConfig / CLIPConfig defaults (models/clip/configuration_clip.py),
# what CLIPModel.from_pretrained uses for a key config.json leaves out
TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                     num_attention_heads=8, max_position_embeddings=77)
VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       num_channels=3, image_size=224, patch_size=32)
PROJECTION_DEFAULT = 512
AESTHETIC_HIDDEN = (1024, 128, 64, 16, 1)     # clip.AestheticHead's published sizes after the input
F32 = 4


@dataclass(frozen=True)
class ModelFootprint:
    """One model a spec builds on the device."""

    name: str
    weights: int          # parameter bytes, resident for the whole run
    cache: int = 0        # the text-feature cache at its cap
    act_row: int = 0      # peak activation bytes of one scored image (no grad)
    source: str = ""      # where the architecture was read
    grad_row: int = 0     # bytes per image of a with-grad call through its backward, every term using the model
    grad_fixed: int = 0   # ... whatever the rows (autocast's kept weight copies)


@dataclass(frozen=True)
class RewardFootprint:
    models: tuple[ModelFootprint, ...] = field(default_factory=tuple)

    @property
    def weights(self) -> int:
        """Bytes resident on the device for the whole run: every model's weights and cache."""
        return sum(m.weights + m.cache for m in self.models)

    @property
    def act_row(self) -> int:
        """Peak bytes per scored image: the largest term's (the terms score one after another)."""
        return max((m.act_row for m in self.models), default=0)

    def scoring(self, rows: int, image_bytes: int) -> int:
        """One scoring call of ``rows`` images (held as input, ``image_bytes`` each) at its peak;
        0 without a model that has activations."""
        return rows * (image_bytes + self.act_row) if self.act_row and rows > 0 else 0

    def backward(self, rows: int) -> int:
        """One with-grad scoring call of ``rows`` images through its backward (the first-order
        estimators' reward gradient), beyond the images: every term keeps its graph until the one
        backward, so the terms add (an upper bound: each brings its own working set)."""
        if rows <= 0:
            return 0
        return rows * sum(m.grad_row for m in self.models) + sum(m.grad_fixed for m in self.models)


# ----------------------------------------------------------------------------------------------
# CLIP models
# ----------------------------------------------------------------------------------------------
def _layer_params(d: int, i: int) -> int:
    """One CLIP encoder layer: q, k, v, out projections (d x d + bias), two layer norms (2 d
    each), fc1 (d x i + i), fc2 (i x d + d)."""
    return 4 * (d * d + d) + 4 * d + (d * i + i) + (i * d + d)


def clip_params(dims: dict) -> int:
    """Parameters of a transformers ``CLIPModel`` (the open_clip model HPS may load has the same
    tensors): text tower (token + position embeddings, layers, final layer norm), image tower
    (class embedding, bias-free patch convolution, position embeddings, pre/post layer norms,
    layers), the two bias-free projections and the logit scale."""
    t, v, e = dims["text"], dims["vision"], dims["projection_dim"]
    dt, dv = t["hidden_size"], v["hidden_size"]
    text = ((t["vocab_size"] + t["max_position_embeddings"]) * dt
            + t["num_hidden_layers"] * _layer_params(dt, t["intermediate_size"]) + 2 * dt)
    tokens = (v["image_size"] // v["patch_size"]) ** 2 + 1
    vision = (dv + v["num_channels"] * v["patch_size"] ** 2 * dv + tokens * dv + 4 * dv
              + v["num_hidden_layers"] * _layer_params(dv, v["intermediate_size"]))
    return text + vision + (dv + dt) * e + 1


def head_params(sizes) -> int:
    """The aesthetic MLP's parameters (``sizes``: input, then each linear layer's outputs)."""
    return sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))


def clip_activation_row(dims: dict, w: int, a: int, text: bool = True) -> int:
    """Peak bytes of one image through a no-grad CLIP forward (module docstring): one layer in
    flight, ``T * (5 D w + max(5 D, 3 I) a)`` for the image tower (and the text tower when
    ``text``, whichever is larger), plus three float32 copies of the preprocessed pixels."""
    def tower(c, tokens):
        d, i = c["hidden_size"], c["intermediate_size"]
        return tokens * (5 * d * w + max(5 * d, 3 * i) * a)

    v = dims["vision"]
    img = tower(v, (v["image_size"] // v["patch_size"]) ** 2 + 1)
    txt = tower(dims["text"], dims["text"]["max_position_embeddings"]) if text else 0
    return max(img, txt) + 3 * 3 * v["image_size"] ** 2 * F32


def clip_grad_saved_row(dims: dict, w: int, a: int) -> int:
    """Bytes autograd keeps per image through the image tower with grad to the pixels and frozen
    weights (module docstring): ``L T (2 D w + 4 D a + 2 I a + 4 H + 16)``."""
    v = dims["vision"]
    d, i, heads = v["hidden_size"], v["intermediate_size"], v["num_attention_heads"]
    tokens = (v["image_size"] // v["patch_size"]) ** 2 + 1
    return v["num_hidden_layers"] * tokens * (2 * d * w + 4 * d * a + 2 * i * a + heads * F32 + 4 * F32)


def clip_grad_fixed(dims: dict, a: int, cast: bool) -> int:
    """The image tower's linear weights in the autocast dtype (``a`` bytes), which a with-grad call
    under autocast keeps for the backward (``cast``: autocast to a dtype other than the weights')."""
    v = dims["vision"]
    d, i = v["hidden_size"], v["intermediate_size"]
    return v["num_hidden_layers"] * (4 * d * d + 2 * d * i) * a if cast else 0


def _clip_dir(name: str, arg: str | None) -> Path | None:
    """The folder whose ``config.json`` :mod:`.clip` loads the CLIPModel from (None: none there)."""
    if not arg:
        return None
    try:
        d = Path(arg).expanduser()
        if name == "aesthetic" and (d / "clip" / "config.json").is_file():
            d = d / "clip"
        return d if (d / "config.json").is_file() else None
    except (OSError, ValueError, RuntimeError):
        return None


def clip_dims(name: str, arg: str | None) -> tuple[dict, str]:
    """``(dims, source)``: the CLIP architecture the reward ``name:arg`` builds (module docstring)."""
    d = _clip_dir(name, arg)
    if d is not None:
        try:
            c = json.loads((d / "config.json").read_text(encoding="utf-8"))
            tc, vc = c.get("text_config") or {}, c.get("vision_config") or {}
            return ({"text": {k: int(tc.get(k, dv)) for k, dv in TEXT_DEFAULTS.items()},
                     "vision": {k: int(vc.get(k, dv)) for k, dv in VISION_DEFAULTS.items()},
                     "projection_dim": int(c.get("projection_dim", PROJECTION_DEFAULT))}, str(d / "config.json"))
        except (OSError, ValueError, TypeError, AttributeError):
            pass
    from ..cost import CLIP_ARCH, REWARD_TOWER

    tower = REWARD_TOWER[name]
    arch = CLIP_ARCH[tower]
    return ({"text": {**TEXT_DEFAULTS, **arch["text"]}, "vision": {**VISION_DEFAULTS, **arch["vision"]},
             "projection_dim": int(arch["projection_dim"])}, f"published CLIP {tower} (rsm_fast/cost.py CLIP_ARCH)")


def aesthetic_head_sizes(arg: str | None, projection: int) -> tuple[int, ...]:
    """The head's layer sizes: read from ``aesthetic_head.safetensors``' header when there is one
    (no tensor loads), else the published 768-1024-128-64-16-1 with the CLIP projection as input."""
    from .clip import AESTHETIC_HEADS, AestheticHead

    try:
        p = Path(arg).expanduser() / AESTHETIC_HEADS[0] if arg else None
        if p is not None and p.is_file():
            from safetensors import safe_open

            with safe_open(str(p), framework="pt") as f:
                shapes = [f.get_slice(f"layers.{i}.weight").get_shape() for i in AestheticHead.LINEAR_IDX]
            return (int(shapes[0][1]), *(int(s[0]) for s in shapes))
    except Exception:  # noqa: BLE001 - an unreadable head is the reward's own load error; estimate the published one
        pass
    return (projection, *AESTHETIC_HIDDEN)


def _bytes(dtype: torch.dtype | None) -> int:
    return torch.empty((), dtype=dtype).element_size()


def clip_footprint(name: str, arg: str | None, device="cpu") -> ModelFootprint:
    """The device bytes of the CLIP reward ``name:arg`` placed on ``device`` (module docstring)."""
    from .clip import TEXT_CACHE_MAX

    dims, src = clip_dims(name, arg)
    prec = release_precision(name, device)
    w = _bytes(prec.dtype)
    a = _bytes(prec.autocast) if prec.autocast is not None else w
    weights = clip_params(dims) * w
    cache = 0
    if name == "aesthetic":
        weights += head_params(aesthetic_head_sizes(arg, dims["projection_dim"])) * F32
    else:
        cache = TEXT_CACHE_MAX * dims["projection_dim"] * F32
    act = clip_activation_row(dims, w, a, text=name != "aesthetic")
    cast = prec.autocast is not None and prec.autocast != prec.dtype
    return ModelFootprint(name, weights, cache, act, src, grad_row=clip_grad_saved_row(dims, w, a) + act,
                          grad_fixed=clip_grad_fixed(dims, a, cast))


# ----------------------------------------------------------------------------------------------
# the digits classifier
# ----------------------------------------------------------------------------------------------
def _classifier_width() -> int:
    """The shipped classifier's width (its checkpoint metadata; 16, the default, without one)."""
    from ..tasks import digits as D

    try:
        from safetensors import safe_open

        with safe_open(str(D.ASSETS / "classifier.safetensors"), framework="pt") as f:
            return int(json.loads((f.metadata() or {}).get("config", "{}")).get("width", 16))
    except Exception:  # noqa: BLE001 - the task's own load reports a missing checkpoint
        return 16


@functools.lru_cache(maxsize=4)
def digits_classifier_grad(width: int):
    """``(fixed, per image)`` bytes of the digit rewards' with-grad call (``digits_reward``:
    classifier, log-softmax) through its backward, measured on the meta device
    (:func:`rsm_fast.memory_profile.grad_cost`; at width 16: 68,648 bytes per image, 60,456 of
    them saved for the backward)."""
    from ..memory_profile import grad_cost
    from ..tasks import digits as D

    with torch.device("meta"):
        clf = D.DigitClassifier(width=width).eval().requires_grad_(False)
    return grad_cost(lambda x: torch.log_softmax(clf(x), dim=1), 1, D.SIZE, D.SIZE)


def digits_classifier_footprint(terms: int = 1) -> ModelFootprint:
    """The shipped digit classifier (``tasks.digits.DigitClassifier`` at the checkpoint metadata's
    width, built on the meta device to count its parameters), float32, and its with-grad bytes
    for ``terms`` digit terms (one module, one graph each)."""
    from ..tasks import digits as D

    w = _classifier_width()
    with torch.device("meta"):
        n = sum(p.numel() for p in D.DigitClassifier(width=w).parameters())
    grad = digits_classifier_grad(w)
    return ModelFootprint("digits classifier", n * F32, source="tasks/digits.py DigitClassifier",
                          grad_row=terms * grad.per_row, grad_fixed=terms * grad.fixed)


# ----------------------------------------------------------------------------------------------
# a spec
# ----------------------------------------------------------------------------------------------
def reward_footprint(spec: str, task_name: str = "", device="cpu") -> RewardFootprint:
    """The models ``spec`` builds on ``device`` (the run's ``task.device``), for task ``task_name``
    (the digits task registers its rewards)."""
    from .registry import lookup, parse_spec

    if not isinstance(spec, str) or not spec.strip() or spec.strip() == "linear":
        return RewardFootprint()
    if task_name.startswith("digits"):
        importlib.import_module("rsm_fast.tasks.digits_task")     # registers the digit rewards
    try:
        terms = parse_spec(spec)
        kinds = [lookup(atom) for _, atom in terms]
    except RewardError:
        return RewardFootprint()
    models, digits = [], 0
    for (_, atom), (kind, _, arg) in zip(terms, kinds):
        name = atom.split(":", 1)[0]
        if kind != "registered":
            continue
        if name in CLIP_REWARDS:
            models.append(clip_footprint(name, arg, device))
        elif name in DIGIT_REWARDS:
            digits += 1
    if digits:
        models.append(digits_classifier_footprint(digits))
    return RewardFootprint(tuple(models))
