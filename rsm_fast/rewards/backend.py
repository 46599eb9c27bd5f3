"""How reward models run: eager torch, or their image encoder compiled with torch-tensorrt.

``task.reward_backend=tensorrt`` (``RewardOptions.backend``): every model-backed term of the spec
(:class:`~.clip.ModelReward`: aesthetic, pickscore, hps) gets its image encoder -- the part that
sees every sample -- compiled by torch-tensorrt's dynamo frontend for batches of 1 to
:data:`TRT_MAX_BATCH` preprocessed images (larger batches are split), in the reward's precision
(its weights' dtype, plus its autocast dtype as an enabled precision). Preprocessing, the text
encoder (cached per prompt) and the aesthetic head stay eager. An engine keeps no autograd graph:
the reward becomes non-differentiable, so first-order estimators refuse it (the trainer's
``task.reward`` check). Moving the reward afterwards drops the engine (back to eager).

Where it cannot apply, the reward runs eagerly and one line says why on stderr: the reward is
not on a CUDA device, ``torch_tensorrt`` is not installed, or the compilation failed. Terms with
no model (jpeg, http, ``module:function``) are left as they are.
"""
from __future__ import annotations

import sys
from typing import Callable

import torch
from torch import nn

from .base import one_line

BACKENDS = ("eager", "tensorrt")
TRT_MAX_BATCH = 128         # the largest batch an engine is built for; larger batches run in slices
TRT_OPT_BATCH = 16          # the batch size TensorRT tunes its kernels for


def say(msg: str) -> None:
    """One line on stderr (the default ``emit`` of :func:`apply_backend`)."""
    print(f"rsm_fast: {one_line(msg)}", file=sys.stderr, flush=True)


class ImageEncoder(nn.Module):
    """``pixels -> backbone.encode_image(pixels)`` as a module of its own (what is compiled)."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.backbone.encode_image(pixels)


def apply_backend(reward, backend: str, *, emit: Callable[[str], None] = say):
    """``reward`` set up to run on ``backend`` (see the module docstring); returns ``reward``."""
    if backend not in BACKENDS:
        raise ValueError(f"reward backend must be one of {BACKENDS} (task.reward_backend), got {backend!r}")
    from .clip import ModelReward

    if backend == "eager" or not isinstance(reward, ModelReward):
        return reward
    fallback = "; running it in eager torch"
    emit = (lambda msg, _emit=emit: _emit(one_line(msg)))
    if reward.device.type != "cuda":
        emit(f"reward '{reward.name}': task.reward_backend=tensorrt needs a CUDA device, the model is on "
             f"{reward.device}{fallback}")
        return reward
    try:
        import torch_tensorrt
    except ImportError:
        emit(f"reward '{reward.name}': task.reward_backend=tensorrt but the 'torch_tensorrt' package is not "
             f"installed (pip install torch-tensorrt){fallback}")
        return reward
    try:
        compile_image_encoder(reward, torch_tensorrt)
    except Exception as e:  # noqa: BLE001 - any compiler failure falls back, in one line
        emit(f"reward '{reward.name}': TensorRT could not compile the image encoder ({type(e).__name__}: {e})"
             f"{fallback}")
    return reward


def compile_image_encoder(reward, trt, max_batch: int = TRT_MAX_BATCH, opt_batch: int = TRT_OPT_BATCH) -> None:
    """Compile ``reward``'s image encoder with the torch-tensorrt module ``trt`` for batches
    ``1..max_batch`` of ``[3, S, S]`` pixels in the weights' dtype, and score through it."""
    size = reward.backbone.image_size
    prec = reward.precision
    shape = lambda b: (b, 3, size, size)  # noqa: E731
    spec = trt.Input(min_shape=shape(1), opt_shape=shape(min(opt_batch, max_batch)), max_shape=shape(max_batch),
                     dtype=prec.dtype)
    precisions = {prec.dtype} | ({prec.autocast} if prec.autocast is not None else set())
    module = trt.compile(ImageEncoder(reward.backbone).eval(), ir="dynamo", inputs=[spec],
                         enabled_precisions=precisions)
    reward.set_compiled(module, max_batch, "tensorrt")
