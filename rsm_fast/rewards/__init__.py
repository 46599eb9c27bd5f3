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
``evaluate_rewards(reward, images, prompts, metadata, policy="error"|"skip", timeout=None) ->
RewardResult``. Faults: the reward raises anything but
:class:`~rsm_fast.interrupts.RunInterrupted` (``SystemExit`` and ``KeyboardInterrupt`` included;
a server timeout, refused connection, refused redirect, oversized body, HTTP error, non-JSON body,
wrong number or non-finite scores all raise inside the HTTP client), runs past ``timeout``
(:mod:`.deadline`: a daemon worker thread; a reward still stuck in an abandoned call faults at
once), returns a non-tensor, the wrong shape, or NaN/inf. ``"error"`` (default): a one-line :class:`RewardError` naming the reward.
``"skip"``: ``RewardResult(ok=False, scores=None, reason=...)`` -- the caller drops the batch
(``result.unwrap()`` raises :class:`RewardSkipped`); it never gets a half-valid tensor. On success
``result.scores`` is ``[B]`` float32 and ``result.components`` holds a weighted sum's parts.

Overlap: :class:`AsyncReward` scores batches on a worker thread (``submit(...) -> Future`` of a
:class:`RewardResult`, in order; errors re-raise at ``.result()``); CUDA images are scored on a
stream of their own (:class:`~.streams.SideStream`), so the reward's kernels overlap the
sampler's. :func:`compile_tensorrt` is an optional hook for a frozen reward model (needs
torch_tensorrt); ``task.reward_backend=tensorrt`` applies it to the model rewards' image encoders
(:mod:`.backend`).

Device and precision (:mod:`.device`): the model rewards (``aesthetic``, ``pickscore``, ``hps``)
are built on ``task.device`` in their release's precision there (float32 on the CPU; on CUDA
float32, float32, and float32 weights under float16 autocast for HPS), and move with
``reward.place(device, dtype, autocast)``; a device this machine lacks is one :class:`RewardError`
line.

Options and secrets
-------------------
:class:`RewardOptions` (``from_task_config(cfg.task)``: ``task.reward_timeout``, ``reward_retries``,
``reward_max_mb``, ``reward_auth`` / ``reward_auth_env``) reach every HTTP term through
``resolve(spec, task, options)``. :func:`redact_spec` / :func:`redact_config` hide URL credentials
and the Authorization value in what is written to disk; :func:`preflight` checks a spec (names,
imports, servers reachable) before any model is loaded.
"""
from .base import (POLICIES, FunctionReward, Reward, RewardError, RewardResult, RewardSkipped, as_reward,
                   checked, evaluate_rewards, reward_grad, validate_scores)
from .backend import BACKENDS, apply_backend
from .clip import (CLIP_MEAN, CLIP_STD, AestheticHead, AestheticReward, ClipScoreReward, ModelReward, clip_preprocess,
                   compile_tensorrt, hps, pickscore)
from .device import RELEASE, Precision, check_device, release_precision
from .combine import AsyncReward, WeightedSum
from .options import RewardOptions
from .preflight import check_reachable, preflight
from .registry import REGISTRY, known_names, make_reward, parse_spec, register, resolve
from .remote import HttpReward
from .secrets import redact_config, redact_spec, redact_url
from .simple import BrightnessReward, ColorReward, JpegReward, jpeg_kilobytes
from .streams import SideStream

__all__ = ["POLICIES", "FunctionReward", "Reward", "RewardError", "RewardResult", "RewardSkipped", "as_reward",
           "checked", "evaluate_rewards", "reward_grad", "validate_scores", "AsyncReward", "WeightedSum",
           "REGISTRY", "known_names", "make_reward", "parse_spec", "register", "resolve", "HttpReward",
           "BrightnessReward", "ColorReward", "JpegReward", "jpeg_kilobytes", "AestheticReward", "AestheticHead",
           "ClipScoreReward", "clip_preprocess", "compile_tensorrt", "pickscore", "hps", "CLIP_MEAN", "CLIP_STD",
           "RewardOptions", "preflight", "check_reachable", "redact_config", "redact_spec", "redact_url",
           "ModelReward", "Precision", "RELEASE", "check_device", "release_precision", "SideStream", "BACKENDS",
           "apply_backend"]
