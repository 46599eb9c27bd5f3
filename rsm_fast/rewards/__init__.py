"""Rewards: one protocol, spec strings, validation and a fault policy.

Protocol
--------
A reward is any object with ``name: str``, ``differentiable: bool`` and::

    __call__(images, prompts=None, metadata=None) -> Tensor [B]

``images`` is ``[B, C, H, W]`` float in ``[0, 1]`` (C = 1 or 3), ``prompts`` ``B`` strings,
``metadata`` ``B`` dicts. The result is float32 (the analytic image rewards keep float64 for
float64 images, for gradient checks), one value per image; a differentiable reward keeps the
autograd graph to ``images``. Plain callables ``fn(x) -> [B]`` (the toy task's latents) or
``fn(images, prompts, metadata)`` are adapted by :func:`as_reward`.

Spec strings (:func:`make_reward`, :func:`resolve`)
---------------------------------------------------
``linear`` (toy task), ``jpeg`` / ``jpeg-compressibility`` (-KB at JPEG quality 95, DDPO),
``jpeg-incompressibility`` (+KB), ``brightness``, ``color:R,G,B``, ``aesthetic:/dir``,
``pickscore:/dir``, ``hps:/dir`` (local weights only), ``http://host:port/path`` (reward server),
``package.module:function``, and weighted sums ``0.7*aesthetic:/dir+0.3*jpeg``. A registered name
wins over ``module:function``; an unknown name is a one-line error listing the known names.
:func:`register` adds names.

Fault policy (:func:`evaluate_rewards`)
---------------------------------------
``evaluate_rewards(reward, images, prompts, metadata, policy="error"|"skip") -> RewardResult``.
Faults: the reward raises (a server timeout, refused connection, HTTP error, non-JSON body, wrong
number or non-finite scores all raise inside the HTTP client), returns a non-tensor, the wrong
shape, or NaN/inf. ``"error"`` (default): a one-line :class:`RewardError` naming the reward.
``"skip"``: ``RewardResult(ok=False, scores=None, reason=...)`` -- the caller drops the batch
(``result.unwrap()`` raises :class:`RewardSkipped`); it never gets a half-valid tensor. On success
``result.scores`` is ``[B]`` float32 and ``result.components`` holds a weighted sum's parts.

Overlap: :class:`AsyncReward` scores batches on a worker thread (``submit(...) -> Future`` of a
:class:`RewardResult`, in order; errors re-raise at ``.result()``). :func:`compile_tensorrt` is an
optional hook for a frozen reward model (needs torch_tensorrt).
"""
from .base import (POLICIES, FunctionReward, Reward, RewardError, RewardResult, RewardSkipped, as_reward,
                   checked, evaluate_rewards, reward_grad, validate_scores)
from .clip import (CLIP_MEAN, CLIP_STD, AestheticHead, AestheticReward, ClipScoreReward, clip_preprocess,
                   compile_tensorrt, hps, pickscore)
from .combine import AsyncReward, WeightedSum
from .registry import REGISTRY, known_names, make_reward, parse_spec, register, resolve
from .remote import HttpReward
from .simple import BrightnessReward, ColorReward, JpegReward, jpeg_kilobytes

__all__ = ["POLICIES", "FunctionReward", "Reward", "RewardError", "RewardResult", "RewardSkipped", "as_reward",
           "checked", "evaluate_rewards", "reward_grad", "validate_scores", "AsyncReward", "WeightedSum",
           "REGISTRY", "known_names", "make_reward", "parse_spec", "register", "resolve", "HttpReward",
           "BrightnessReward", "ColorReward", "JpegReward", "jpeg_kilobytes", "AestheticReward", "AestheticHead",
           "ClipScoreReward", "clip_preprocess", "compile_tensorrt", "pickscore", "hps", "CLIP_MEAN", "CLIP_STD"]
