"""NVTX ranges around the fused ops, for Nsight Systems / Nsight Compute (see profiles/README.md).

Uses the ``nvtx`` package when it is installed, else ``torch.cuda.nvtx`` when CUDA is available,
else nothing: on a CPU-only machine a range costs one Python ``with``. The ranges live inside the
custom ops' device kernels, which ``torch.compile`` treats as opaque, so they never break a graph.
"""
from __future__ import annotations

import contextlib

import torch

try:  # pragma: no cover - depends on the environment
    import nvtx as _nvtx
except ImportError:  # the nvtx package is optional
    _nvtx = None


class _TorchRange:
    """``torch.cuda.nvtx`` push/pop as a plain context manager (no generator per call)."""

    __slots__ = ("label",)

    def __init__(self, label: str):
        self.label = label

    def __enter__(self):
        torch.cuda.nvtx.range_push(self.label)

    def __exit__(self, *exc):
        torch.cuda.nvtx.range_pop()
        return False


def _torch_range(name: str):
    return _TorchRange(name)


_NULL = contextlib.nullcontext()   # stateless: one instance serves every call
_LABELS: dict = {}


def annotate(name: str, device: torch.device | None = None):
    """Context manager: an NVTX range named ``rsm_fast/<name>`` (no-op off CUDA without nvtx)."""
    label = _LABELS.get(name)
    if label is None:
        label = _LABELS[name] = f"rsm_fast/{name}"
    if _nvtx is not None:
        return _nvtx.annotate(label, domain="rsm_fast")
    if device is not None and device.type == "cuda":
        return _TorchRange(label)
    return _NULL
