"""Precision, memory and kernel options shared by the model adapters.

* :func:`resolve_dtype` — ``"fp32" | "bf16" | "fp16"`` (or a torch dtype) for the model weights.
  Whatever it is, the adapters return the native output cast to float32, so the engine's sampler
  and every loss stay in float32 (the cast is the last op of ``DiffusionAdapter.policy``).
* :func:`peak_memory` — CUDA ``max_memory_allocated`` on a CUDA device, else the process's peak
  resident set size (``ru_maxrss``), in bytes; :func:`reset_peak_memory` for per-epoch peaks
  (a no-op on CPU: the OS keeps only the lifetime peak).
* :func:`make_optimizer` — ``"adamw"`` (torch) or ``"adamw8bit"`` (bitsandbytes' ``AdamW8bit``,
  the 8-bit optimiser ddpo-pytorch and flow_grpo offer); a missing bitsandbytes is one clear error.
* :func:`set_attention_backend` — ``"sdpa"`` (diffusers' default processors, which call
  ``F.scaled_dot_product_attention``) or ``"xformers"`` (``enable_xformers_memory_efficient_attention``;
  a missing xformers is one clear error). diffusers' newer ``set_attention_backend`` dispatcher is
  not used: some of its backends fetch kernels from the hub.
* :func:`set_gradient_checkpointing` — diffusers' per-block activation checkpointing toggle (active
  under grad only: the rollout and the reference run without it).
* :func:`autocast` — ``torch.autocast(device_type, dtype)`` around a denoiser forward (``None``:
  a no-op context). CPU autocast takes bf16 and fp16 (torch >= 2.1 lists both for CPU).
* :func:`visiting` — a frozen module kept in CPU memory visits a device for the duration of a block
  (``task.offload=cpu``): its parameters and buffers are copied to the device on entry and the
  CPU tensors put back on exit (no copy back: the module is frozen). On a CPU device both moves
  are no-ops, but the same code runs; :data:`VISITS` counts the visits (tests, logs).
"""
from __future__ import annotations

import contextlib
import importlib.util
import resource
import sys
from collections import Counter

import torch
from torch import nn

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
ATTENTION_BACKENDS = ("sdpa", "xformers")
OPTIMIZERS = ("adamw", "adamw8bit")


def resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"model dtype must be float32, bfloat16 or float16, got {dtype}")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"model dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def resolve_autocast(name) -> torch.dtype | None:
    """``policy.autocast`` (``""``/None: off, ``"bf16"``, ``"fp16"``, or a torch dtype) as a dtype or None."""
    if name in ("", None):
        return None
    if isinstance(name, torch.dtype):
        if name not in AUTOCAST_DTYPES.values():
            raise ValueError(f"autocast dtype must be bfloat16 or float16, got {name}")
        return name
    if name not in AUTOCAST_DTYPES:
        raise ValueError(f"autocast must be one of {['', *AUTOCAST_DTYPES]}, got {name!r}")
    return AUTOCAST_DTYPES[name]


def autocast(device, dtype: torch.dtype | None):
    """``torch.autocast`` on ``device``'s type in ``dtype``; a null context when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


VISITS: Counter = Counter()     # class name of a visiting module -> visits (task.offload=cpu)


@contextlib.contextmanager
def visiting(module: nn.Module | None, device, enabled: bool = True):
    """Run a block with the frozen ``module`` on ``device``, its CPU tensors restored after (module
    docstring). ``enabled=False`` or ``module=None``: a null context."""
    if module is None or not enabled:
        yield module
        return
    dev = torch.device(device)
    home = []
    with torch.no_grad():
        for t in (*module.parameters(), *module.buffers()):
            home.append((t, t.data))
            t.data = t.data.to(dev, non_blocking=dev.type == "cuda")
    VISITS[type(module).__name__] += 1
    try:
        yield module
    finally:
        for t, data in home:
            t.data = data


def peak_memory(device=None) -> int:
    """Peak memory in bytes: CUDA allocator peak on a CUDA device, else this process's max RSS."""
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda":
        return int(torch.cuda.max_memory_allocated(dev))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)   # bytes on macOS, KiB on Linux


def reset_peak_memory(device=None) -> None:
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)


def make_optimizer(params, kind: str = "adamw", lr: float = 1e-4, betas=(0.9, 0.999), weight_decay: float = 1e-4,
                   eps: float = 1e-8) -> torch.optim.Optimizer:
    """AdamW over ``params``; ``kind="adamw8bit"`` uses bitsandbytes (CUDA only)."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("make_optimizer: no parameter requires grad")
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps)
    if kind == "adamw8bit":
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ImportError("optimizer 'adamw8bit' needs bitsandbytes, which is not installed "
                              "(pip install bitsandbytes, CUDA only), or use optimizer 'adamw'")
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {kind!r}")


def set_attention_backend(model: nn.Module, name: str) -> None:
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend must be one of {ATTENTION_BACKENDS}, got {name!r}")
    if name == "xformers":
        if importlib.util.find_spec("xformers") is None:
            raise ImportError("attention backend 'xformers' needs the xformers package, which is not installed; "
                              "use attention backend 'sdpa'")
        model.enable_xformers_memory_efficient_attention()
        model._rsm_attention = "xformers"
    else:
        if getattr(model, "_rsm_attention", "sdpa") == "xformers":
            model.disable_xformers_memory_efficient_attention()
        model._rsm_attention = "sdpa"


def set_gradient_checkpointing(model: nn.Module, enabled: bool) -> None:
    if enabled:
        model.enable_gradient_checkpointing()
    else:
        model.disable_gradient_checkpointing()
