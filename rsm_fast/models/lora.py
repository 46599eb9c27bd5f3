"""LoRA on the denoiser through peft, with a reference path that is a tensor value, not a branch.

Injection: peft's ``inject_adapter_in_model`` (the same call as diffusers'
``ModelMixin.add_adapter``) with a ``LoraConfig`` (rank, alpha, target modules; defaults
``to_q, to_k, to_v, to_out.0`` and alpha = rank, as diffusers' LoRA training scripts). Only the
LoRA matrices require grad.

The frozen reference (design choice). peft's ``disable_adapter()`` flips a Python flag read by
every LoRA layer's ``forward`` (``if self.disable_adapters: ...``): under ``torch.compile`` that
is a guarded constant (a switch means a recompile or a second graph), and a captured CUDA graph
replays whichever branch was recorded, so the flag is silently ignored on replay. Here every
LoRA ``B`` projection is a :class:`GatedLinear` whose output is multiplied by one shared 0-d
buffer (:class:`LoraGate`): ``y = W x + (B A x) * scaling * gate``. The policy runs with
``gate = 1``; the reference is the same modules with ``gate = 0``, set by an in-place
``fill_`` on a buffer at a fixed address. A compiled graph takes the buffer as an input (values
are not guarded: no recompile) and a CUDA graph reads it from memory on every replay, so both the
policy and the reference can be compiled / captured and switched at run time. With ``gate = 0``
the LoRA term is an exact zero (finite activations), so the reference equals the base model bit
for bit. The price is the LoRA matmuls still running on reference calls (rank-r, a few percent
of an attention projection) — a second frozen copy of the base weights would cost a full model's
memory instead. Full fine-tuning has no such trick: there the adapter keeps a frozen deep copy.

The gate module is shared by all ``GatedLinear`` modules (a shared child module), so
``module.to(device/dtype)`` moves it once for everyone; its buffer is non-persistent (never in a
state dict), so the LoRA state dict and its export are peft's own.

Export: ``get_peft_model_state_dict`` + diffusers' ``save_lora_weights`` conventions (SD1.5:
``StableDiffusionPipeline.save_lora_weights(unet_lora_layers=convert_state_dict_to_diffusers(...))``
as in diffusers' ``train_dreambooth_lora.py``; SD3: ``StableDiffusion3Pipeline.save_lora_weights
(transformer_lora_layers=...)`` as in ``train_dreambooth_lora_sd3.py``), with the LoraConfig as
adapter metadata so ``pipe.load_lora_weights(dir)`` restores alpha as well as rank.

Full fine-tuning export: :func:`save_module` writes the whole denoiser with its own diffusers
``save_pretrained`` (config + safetensors shards), from a given state dict when the caller gathered
one (sharded ranks): the module's ``state_dict`` is swapped for that one during the call, so
diffusers' own writer (sharding, index file) is used unchanged.

Precision: the LoRA matrices are float32 whatever the base dtype (peft casts the layer input to
the LoRA weights' dtype and the sum back to the base output dtype), so the optimiser updates
float32 master weights.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ADAPTER = "default"
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


class LoraGate(nn.Module):
    """One 0-d buffer ``value`` (1: policy, 0: reference) shared by every gated LoRA layer."""

    def __init__(self):
        super().__init__()
        self.register_buffer("value", torch.ones(()), persistent=False)


class GatedLinear(nn.Linear):
    """A LoRA ``B`` projection whose output is multiplied by the shared gate.

    Under grad the product uses a copy of the gate: autograd saves the multiplier for the
    backward, and the buffer itself is rewritten in place by every reference call, which would
    invalidate a pending policy backward ("modified by an inplace operation")."""

    def forward(self, x):
        g = self.gate.value
        if torch.is_grad_enabled():
            g = g.clone()
        return F.linear(x, self.weight, self.bias) * g


def add_lora(module: nn.Module, rank: int = 8, alpha: float | None = None, target_modules=DEFAULT_TARGETS,
             dropout: float = 0.0, gate: LoraGate | None = None, field: str = "policy.lora_targets") -> LoraGate:
    """Inject peft LoRA into ``module`` (in place), freeze everything else, gate every ``B``.

    Returns the shared :class:`LoraGate` (``gate``: one that other modules' LoRAs already share, so
    one ``fill_`` turns all of them off, e.g. a denoiser's and its text encoders'). ``alpha``
    defaults to ``rank`` (scaling 1)."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be an integer >= 1, got {rank!r}")
    if getattr(module, "peft_config", None):
        raise RuntimeError("the model already has a LoRA adapter")
    targets = list(target_modules)
    check_targets(module, targets, field)
    cfg = LoraConfig(r=rank, lora_alpha=float(rank if alpha is None else alpha), target_modules=targets,
                     lora_dropout=dropout, init_lora_weights=True)
    module.requires_grad_(False)
    # a diffusers model records peft_config itself; transformers' add_adapter (text encoders) would
    # demand a newer peft than its PyPI release (transformers 5.25: >= 0.22), so peft injects directly
    if hasattr(module, "add_adapter") and type(module).__module__.startswith("diffusers"):
        module.add_adapter(cfg, adapter_name=ADAPTER)
    else:
        inject_adapter_in_model(cfg, module, ADAPTER)
        module.peft_config = {ADAPTER: cfg}
    if gate is None:
        gate = LoraGate().to(next(module.parameters()).device)
    n = 0
    for layer in module.modules():
        if not isinstance(layer, LoraLayer) or ADAPTER not in layer.lora_B:
            continue
        old = layer.lora_B[ADAPTER]
        if type(old) is not nn.Linear:
            raise NotImplementedError(f"LoRA gate supports Linear targets only, got {type(old).__name__}")
        new = GatedLinear(old.in_features, old.out_features, bias=old.bias is not None, device="meta")
        new.weight = old.weight
        if old.bias is not None:
            new.bias = old.bias
        new.gate = gate
        layer.lora_B[ADAPTER] = new
        n += 1
    if n == 0:
        raise ValueError(f"no module matched the LoRA target_modules {targets}")
    for name, p in module.named_parameters():
        if "lora_" in name:
            p.data = p.data.to(torch.float32)   # fp32 master weights even on a bf16/fp16 base
        p.requires_grad_("lora_" in name)
    return gate


def _suffix(name: str) -> str:
    """The short name a target would use: the last component, or the last two when the last is
    an index (``to_out.0``)."""
    parts = name.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]


def linear_targets(module: nn.Module) -> list[str]:
    """Short names of the ``nn.Linear`` layers of ``module`` (what ``policy.lora_targets`` may
    name), most frequent first."""
    counts: dict[str, int] = {}
    for name, m in module.named_modules():
        if name and isinstance(m, nn.Linear):
            counts[_suffix(name)] = counts.get(_suffix(name), 0) + 1
    return sorted(counts, key=lambda k: (-counts[k], k))


def check_targets(module: nn.Module, targets, field: str = "policy.lora_targets") -> None:
    """Every target must name at least one ``nn.Linear`` layer, as peft matches them (the full
    module name, or its ending after a dot); else a one-line :class:`~rsm_fast.config.ConfigError`
    naming ``field`` and a few names that would match."""
    from ..config import ConfigError

    targets = [t for t in targets]
    names = {name: m for name, m in module.named_modules() if name}
    choices = linear_targets(module)
    few = ", ".join(choices[:8]) + (f" (and {len(choices) - 8} more)" if len(choices) > 8 else "")
    if not targets:
        raise ConfigError(f"config field '{field}' is empty; Linear layers of this model: {few}")
    for t in targets:
        if not isinstance(t, str) or not t:
            raise ConfigError(f"config field '{field}' holds an empty or non-string name: {t!r}")
        hit = [n for n in names if n == t or n.endswith("." + t)]
        if not hit:
            raise ConfigError(f"config field '{field}': {t!r} matches no module of this model; "
                              f"Linear layers that would match: {few}")
        other = sorted({type(names[n]).__name__ for n in hit if not isinstance(names[n], nn.Linear)})
        if other:
            raise ConfigError(f"config field '{field}': {t!r} matches {', '.join(other)} layers; the "
                              f"gated LoRA takes Linear layers only, e.g. {few}")


def lora_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in module.named_parameters() if "lora_" in n]


@contextlib.contextmanager
def gated(gate: LoraGate, value: float):
    """Run a block with the LoRA gate at ``value`` (0: reference), restoring it after."""
    old = gate.value.clone()
    gate.value.fill_(value)
    try:
        yield
    finally:
        gate.value.copy_(old)


def lora_state_dict(module: nn.Module) -> dict:
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(module, adapter_name=ADAPTER)


def _peft_values(module: nn.Module, state_dict: dict | None) -> dict:
    from peft.utils import get_peft_model_state_dict

    raw = (lora_state_dict(module) if state_dict is None
           else get_peft_model_state_dict(module, state_dict=dict(state_dict), adapter_name=ADAPTER))
    sd = {k: v.detach().float().cpu().contiguous() for k, v in raw.items()}
    if not sd:
        raise RuntimeError("the model has no LoRA weights to export")
    return sd


def export_lora(module: nn.Module, family: str, directory, state_dict: dict | None = None,
                text: dict | None = None) -> Path:
    """Write ``directory/pytorch_lora_weights.safetensors`` loadable by ``pipe.load_lora_weights``;
    ``state_dict`` (the module's parameter names, e.g. gathered from other ranks) replaces the
    module's own LoRA values. ``text``: ``{"text_encoder" | "text_encoder_2": (module, state_dict or
    None)}``, text-encoder LoRAs written beside the denoiser's, as diffusers' dreambooth LoRA
    scripts do with ``--train_text_encoder`` (SD1.5 in diffusers' key convention, SD3 in peft's)."""
    sd = _peft_values(module, state_dict)
    meta = module.peft_config[ADAPTER].to_dict()
    kw = {}
    for name, (m, values) in (text or {}).items():
        kw[f"{name}_lora_layers"] = _peft_values(m, values)
        kw[f"{name}_lora_adapter_metadata"] = m.peft_config[ADAPTER].to_dict()
    out = Path(directory)
    if family == "sd15":
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers

        if "text_encoder_lora_layers" in kw:      # (train_dreambooth_lora.py converts both)
            kw["text_encoder_lora_layers"] = convert_state_dict_to_diffusers(kw["text_encoder_lora_layers"])
        StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=convert_state_dict_to_diffusers(sd),
                                                  unet_lora_adapter_metadata=meta, **kw)
    elif family == "sd3":
        from diffusers import StableDiffusion3Pipeline

        StableDiffusion3Pipeline.save_lora_weights(out, transformer_lora_layers=sd,
                                                   transformer_lora_adapter_metadata=meta, **kw)
    else:
        raise ValueError(f"unknown model family {family!r}")
    return out


def frozen_copy(module: nn.Module, device=None) -> nn.Module:
    """A detached copy for the full-fine-tuning reference (eval mode, no grads). ``device``: build the
    copy there (a diffusers model: on the meta device, then its tensors copied straight to
    ``device``, so a model on a GPU gets a CPU copy without a second GPU copy); None: a deep copy."""
    import copy

    ref = None
    if device is not None and hasattr(type(module), "from_config") and hasattr(module, "config"):
        dev = torch.device(device)
        with torch.device("meta"):
            ref = type(module).from_config(module.config)
        ref.load_state_dict({k: v.detach().to(dev, copy=True) for k, v in module.state_dict().items()}, assign=True)
        for name, buf in module.named_buffers():      # non-persistent buffers are not in the state dict
            owner, _, leaf = name.rpartition(".")
            sub = ref.get_submodule(owner)
            if sub._buffers.get(leaf) is not None and sub._buffers[leaf].is_meta:
                sub._buffers[leaf] = buf.detach().to(dev, copy=True)
        if any(t.is_meta for t in (*ref.parameters(), *ref.buffers())):
            ref = None                                 # something the state dict does not hold: copy instead
    if ref is None:
        ref = copy.deepcopy(module)
        if device is not None:
            ref.to(device)
    ref.requires_grad_(False)
    ref.eval()
    return ref


def save_module(module: nn.Module, directory, state_dict: dict | None = None) -> Path:
    """``module.save_pretrained(directory)`` (a diffusers model), writing ``state_dict`` instead of
    the module's own when given (its keys must be the module's). Returns ``directory``."""
    out = Path(directory)
    if state_dict is None:
        module.save_pretrained(str(out))
        return out
    own = set(module.state_dict().keys())
    given = set(state_dict)
    if own != given:
        extra, lack = sorted(given - own), sorted(own - given)
        raise ValueError(f"export state_dict does not match the denoiser: {len(lack)} key(s) missing "
                         f"{lack[:2]}, {len(extra)} unexpected {extra[:2]}")
    sd = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    module.state_dict = lambda *a, **k: sd        # the instance attribute shadows the method for this call
    try:
        module.save_pretrained(str(out))
    finally:
        del module.state_dict
    return out
