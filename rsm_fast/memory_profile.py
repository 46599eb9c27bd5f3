"""Model sizes and activation bytes for the memory preflight, measured on the meta device.

:func:`rsm_fast.preflight.check_memory` needs, before any weight is loaded, how many parameters
the image models have and how many bytes one row of a model call holds at its peak. Both come from
the model itself, built on the ``meta`` device (shapes only: no memory, no weights, no compute):

* parameter counts of the denoiser, the VAE and the text encoders the run would load (T5 left out
  with ``task.t5=false``), and of the LoRA that ``policy.lora_rank`` / ``lora_targets`` inject
  (peft's own injection, on the meta model);
* activation bytes by :class:`LiveBytes`, a ``TorchDispatchMode`` that adds every new tensor
  storage an op creates and subtracts it when the storage is freed (a weakref finalizer), keeping
  the peak: the live activation bytes of a no-grad forward (rollout, reference, evaluation), of a
  training forward + backward (what autograd saves, the backward's temporaries; gradients of the
  parameters are preallocated, so they are not counted here but with the parameters), of the
  VAE decode, and -- for the first-order estimators only, whose reward backward differentiates
  through the decode -- of the decode with grad through the latents, forward + backward (what the
  frozen decoder saves for the backward, every layer of it per image: 6.10 GB per 512 px image
  for sd15-full's VAE, 24.4 GB per 1024 px image for sd35m-full's, 300 KB per 16 px image for
  sd15-tiny's, where the no-grad decode peaks at 805 MB / 3.22 GB / 51 KB). Each is measured at 1
  and 2 rows and returned as ``fixed + rows * per_row``
  (``fixed``: e.g. autocast's cast copies of the weights). ``policy.dtype``, ``policy.autocast``,
  ``policy.gradient_checkpointing`` (diffusers' own non-reentrant checkpointing runs, recompute
  included) and ``task.vae_slicing`` / ``vae_tiling`` act in the measurement exactly as in the run.

Attention: on meta tensors ``F.scaled_dot_product_attention`` would take its math path and keep
the ``S x S`` score matrix; a run on CPU or CUDA uses a fused kernel (flash / memory-efficient)
that keeps the output and the log-sum-exp only. During a measurement the call is routed to
``aten._scaled_dot_product_flash_attention_for_cpu`` (meta kernel: output + logsumexp), the same
bytes the fused kernels keep. Measured against the real CPU run of the digits UNet the count is
exact (1,145,232 bytes per training row, 213,584 per no-grad row; ``tests/test_precision_cli.py``
checks the estimate of a whole run against its measured peak RSS). The live bytes at the end of a
with-grad meta forward are the bytes autograd saves in the real CPU run, to the byte, for
sd15-tiny's VAE decode (288,896 per 16 px image) and the digits classifier
(``tests/test_memory_estimate_fo.py``, by ``torch.autograd.graph.saved_tensors_hooks``).

Cost: building the models on meta and running them costs about 0.5 s for the tiny configs, 2-5 s
for sd15-full and sd35m-full on an idle 2-core CPU (Python meta kernels; 10-16 s under load), plus
0.2-0.6 s for a first-order run's decode with grad, plus the first import of diffusers /
transformers; results are cached per setting in the process. Not called by config validation (``task_geometry``
stays arithmetic), only by :func:`rsm_fast.preflight.check_memory`.
"""
from __future__ import annotations

import contextlib
import functools
import json
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


class LiveBytes(contextlib.AbstractContextManager):
    """Live and peak bytes of the tensor storages created while active (module docstring)."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                if not (func.is_view or func._schema.is_mutable):
                    tracker._add(out)
                return out

        self.live = self.peak = 0
        self._seen: set[int] = set()
        self._mode = _Mode()

    def _add(self, out) -> None:
        from torch.utils._pytree import tree_flatten

        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            key = st._cdata
            if key in self._seen:
                continue
            self._seen.add(key)
            n = st.nbytes()
            self.live += n
            self.peak = max(self.peak, self.live)
            weakref.finalize(st, self._free, key, n)

    def _free(self, key: int, n: int) -> None:
        self.live -= n
        self._seen.discard(key)

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)


@contextlib.contextmanager
def fused_attention():
    """Route ``F.scaled_dot_product_attention`` on meta tensors to the flash kernel's meta function
    (module docstring); other calls and masked attention are unchanged."""
    import torch.nn.functional as F

    real = F.scaled_dot_product_attention

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        if q.is_meta and attn_mask is None and not kw:
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout_p, is_causal,
                                                                               scale=scale)[0]
        return real(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kw)

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = real


def linear_cost(run, rows=(1, 2)) -> tuple[int, int]:
    """``(fixed, per_row)`` of the peak live bytes of ``run(n)`` measured at two row counts (one row
    count: all of it per row)."""
    peaks = []
    for n in rows:
        with fused_attention(), LiveBytes() as lb:
            run(n)
        peaks.append(lb.peak)
    if len(rows) == 1:
        return 0, -(-peaks[0] // rows[0])
    per_row = max(0, (peaks[1] - peaks[0]) // (rows[1] - rows[0]))
    return max(0, peaks[0] - per_row * rows[0]), per_row


def count(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


@dataclass(frozen=True)
class Cost:
    fixed: int = 0
    per_row: int = 0

    def at(self, rows: int) -> int:
        return self.fixed + rows * self.per_row if rows > 0 else 0


@dataclass(frozen=True)
class ModelProfile:
    """What the memory estimate needs of an image model (module docstring)."""

    denoiser_params: int
    lora_params: int              # 0 under full fine-tuning
    vae_params: int = 0
    text_params: int = 0          # the text encoders this run would load
    cond_bytes: int = 0           # one row's conditioning (model dtype)
    nograd: Cost = Cost()         # a no-grad denoiser call
    grad: Cost = Cost()           # a training forward + backward
    decode: Cost = Cost()         # the VAE decode (no grad)
    clip_params: int = 0          # policy.train_text_encoder: the CLIP encoders that stay on the device
    text_lora_params: int = 0     # ... and their LoRA (float32, trained)
    decode_grad: Cost = Cost()    # the VAE decode with grad through the latents + backward (first-order only)


# ------------------------------------------------------------------------------------------------
def _meta_train(model: nn.Module, call, rows: int) -> None:
    """One training forward + backward of ``rows`` rows on the meta model."""
    model.train()
    with torch.enable_grad():
        out = call(rows)
    out.float().sum().backward()


def _trainable(model: nn.Module, pc, targets) -> int:
    """Freeze / inject LoRA as the run does; returns the LoRA parameter count (0: full)."""
    from .models import lora as L
    from .models.runtime import resolve_dtype

    nn.Module.to(model, dtype=resolve_dtype(pc.dtype))
    if pc.lora_rank > 0:
        with torch.device("meta"):
            L.add_lora(model, pc.lora_rank, pc.lora_alpha or None, targets)
        return sum(p.numel() for p in L.lora_parameters(model))
    model.requires_grad_(True)
    return 0


def _costs(model: nn.Module, pc, call) -> tuple[Cost, Cost]:
    """(no-grad, training) costs of ``call(rows)`` on ``model`` under the policy's settings. The
    parameters' gradients are allocated before the measurement (they are counted with the
    parameters). Autocast does not act on meta tensors: activations are measured in the weights'
    dtype (an upper bound when that is fp32), and a full fine-tune's autocast weight cache (one cast
    copy of every trained weight, kept for the forward) is added to the training cost."""
    def nograd(n):
        model.eval()
        with torch.no_grad():
            call(n)

    if pc.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    trained = [p for p in model.parameters() if p.requires_grad]
    for p in trained:
        p.grad = torch.zeros_like(p)
    grad = Cost(*linear_cost(lambda n: _meta_train(model, call, n)))
    if pc.autocast and pc.lora_rank == 0:
        grad = Cost(grad.fixed + sum(p.numel() for p in trained) * BYTES[pc.autocast], grad.per_row)
    for p in trained:
        p.grad = None
    return Cost(*linear_cost(nograd, rows=(1,))), grad     # (a no-grad call keeps nothing across rows)


def _meta(n, *shape, dtype=torch.float32):
    return torch.zeros(n, *shape, device="meta", dtype=dtype)


def grad_cost(call, *shape) -> Cost:
    """The cost of ``call(x)`` with grad through ``x`` (``[rows, *shape]``) and the backward of the
    sum of its output: what the first-order estimators' reward backward does to a frozen module
    (``Trainer._reward_grad``). ``x`` exists before the call (the run's final samples do), its
    gradient is made by the backward (the run's returned gradient)."""
    inputs = {n: _meta(n, *shape).requires_grad_(True) for n in (1, 2)}

    def run(n):
        with torch.enable_grad():
            out = call(inputs[n])
        out.float().sum().backward()
        inputs[n].grad = None

    return Cost(*linear_cost(run))


@functools.lru_cache(maxsize=4)
def digits_decode_grad() -> Cost:
    """``tasks.digits.decode`` (scale, shift, clamp) with grad: the clamp keeps its input."""
    from .tasks import digits as D

    return grad_cost(D.decode, 1, D.SIZE, D.SIZE)


# ------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=16)
def _digits(family_cfg: str, pc_key: tuple) -> tuple[int, int, Cost, Cost]:
    from .tasks import digits as D

    pc = _PC(*pc_key)
    with torch.device("meta"):
        unet = D.make_unet(json.loads(family_cfg) if family_cfg else None)
    n_params = count(unet)
    lora = _trainable(unet, pc, tuple(s.strip() for s in pc.lora_targets.split(",") if s.strip()))
    dt = next(unet.parameters()).dtype

    def call(n):
        return unet(_meta(n, 1, D.SIZE, D.SIZE, dtype=dt), _meta(n), class_labels=torch.zeros(
            n, dtype=torch.long, device="meta")).sample

    nograd, grad = _costs(unet, pc, call)
    return n_params, lora, nograd, grad


@dataclass(frozen=True)
class _PC:
    """The policy settings a measurement depends on (hashable, for the cache)."""

    dtype: str = "fp32"
    autocast: str = ""
    gradient_checkpointing: bool = False
    lora_rank: int = 8
    lora_alpha: float = 0.0
    lora_targets: str = "to_q,to_k,to_v,to_out.0"
    train_text_encoder: bool = False
    text_lora_targets: str = "q_proj,k_proj,v_proj,out_proj"


def _pc_key(pc) -> tuple:
    return (pc.dtype, pc.autocast, bool(pc.gradient_checkpointing), int(pc.lora_rank), float(pc.lora_alpha),
            pc.lora_targets, bool(getattr(pc, "train_text_encoder", False)),
            getattr(pc, "text_lora_targets", _PC.text_lora_targets))


def digits_profile(cfg) -> ModelProfile:
    """The digits UNet (``tasks.digits.UNET_CONFIG``) under ``cfg.policy``."""
    n, lora, nograd, grad = _digits("", _pc_key(cfg.policy))
    return ModelProfile(n, lora, nograd=nograd, grad=grad)


# ------------------------------------------------------------------------------------------------
def _configs(spec: str):
    """``(family, {component: config dict or None})`` of a named config or a folder's JSON files."""
    from .models.configs import CONFIGS, get_config

    if spec in CONFIGS and not Path(spec).exists():
        family, c = get_config(spec)
        return family, c
    p = Path(spec)
    from .models import folder_family

    family = folder_family(p)
    read = lambda sub, name="config.json": (json.loads((p / sub / name).read_text(encoding="utf-8"))  # noqa: E731
                                            if (p / sub / name).is_file() else None)
    out = {"unet" if family == "sd15" else "transformer": read("unet" if family == "sd15" else "transformer"),
           "vae": read("vae"), "text_encoder": read("text_encoder")}
    if family == "sd3":
        out.update(text_encoder_2=read("text_encoder_2"), text_encoder_3=read("text_encoder_3"))
    return family, out


def _clean(d: dict | None) -> dict:
    return {k: v for k, v in (d or {}).items() if not k.startswith("_")}


def _layered_count(make, cfg: dict, key: str) -> int:
    """Parameters of a text encoder with ``cfg[key]`` identical layers, from meta builds with one and
    two layers (``count(L) = a + b L``; building T5-XXL's 24 layers on meta takes seconds)."""
    L = int(cfg[key])
    with torch.device("meta"):
        one, two = (count(make({**cfg, key: n})) for n in (1, 2))
    return one + (two - one) * (L - 1)


def _clip_lora(family: str, c: dict, pc) -> tuple[int, int]:
    """``(parameters, LoRA parameters)`` of the CLIP encoders a text-encoder LoRA trains."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from .models import lora as L

    cls = CLIPTextModel if family == "sd15" else CLIPTextModelWithProjection
    targets = tuple(s.strip() for s in pc.text_lora_targets.split(",") if s.strip())

    def lora_count(d):
        m = cls(CLIPTextConfig(**d))
        L.add_lora(m, pc.lora_rank, pc.lora_alpha or None, targets, field="policy.text_lora_targets")
        return sum(p.numel() for p in L.lora_parameters(m))

    n = n_lora = 0
    for k in ("text_encoder",) if family == "sd15" else ("text_encoder", "text_encoder_2"):
        d = _clean(c[k])
        n += _layered_count(lambda d: cls(CLIPTextConfig(**d)), d, "num_hidden_layers")
        with torch.device("meta"):
            one, two = (lora_count({**d, "num_hidden_layers": m}) for m in (1, 2))
        n_lora += one + (two - one) * (int(d["num_hidden_layers"]) - 1)
    return n, n_lora


def _text_params(family: str, c: dict, t5: bool) -> int:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    if family == "sd15":
        return _layered_count(lambda d: CLIPTextModel(CLIPTextConfig(**d)), _clean(c["text_encoder"]),
                              "num_hidden_layers")
    n = sum(_layered_count(lambda d: CLIPTextModelWithProjection(CLIPTextConfig(**d)), _clean(c[k]),
                           "num_hidden_layers") for k in ("text_encoder", "text_encoder_2"))
    if t5 and c.get("text_encoder_3"):
        t5c = _clean(c["text_encoder_3"])
        t5c.pop("num_decoder_layers", None)
        n += _layered_count(lambda d: T5EncoderModel(T5Config(**d)), t5c, "num_layers")
    return n


@functools.lru_cache(maxsize=16)
def _diffusers(spec: str, res: int, t5: bool, slicing: bool, tiling: bool, pc_key: tuple) -> ModelProfile:
    from diffusers import AutoencoderKL, SD3Transformer2DModel, UNet2DConditionModel

    from .models.runtime import resolve_dtype

    pc = _PC(*pc_key)
    family, c = _configs(spec)
    den_cfg = _clean(c.get("unet") or c.get("transformer"))
    with torch.device("meta"):
        den = (UNet2DConditionModel if family == "sd15" else SD3Transformer2DModel).from_config(den_cfg)
        vae = AutoencoderKL.from_config(_clean(c["vae"]))
    n_den, n_vae = count(den), count(vae)
    targets = tuple(s.strip() for s in pc.lora_targets.split(",") if s.strip())
    lora = _trainable(den, pc, targets)
    dt = resolve_dtype(pc.dtype)
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    h = res // f
    cfgd = den.config
    if family == "sd15":
        L, D = int(c.get("tokenizer", {}).get("max_length", 77)), int(cfgd.cross_attention_dim)

        def call(n):
            return den(_meta(n, cfgd.in_channels, h, h, dtype=dt), _meta(n),
                       encoder_hidden_states=_meta(n, L, D, dtype=dt)).sample
    else:
        tk = c.get("tokenizer", {})
        L = int(tk.get("max_length", 77)) + int(tk.get("t5_max_length", 256))
        D, P = int(cfgd.joint_attention_dim), int(cfgd.pooled_projection_dim)

        def call(n):
            return den(hidden_states=_meta(n, cfgd.in_channels, h, h, dtype=dt), timestep=_meta(n),
                       encoder_hidden_states=_meta(n, L, D, dtype=dt), pooled_projections=_meta(n, P, dtype=dt)).sample
        L += -(-P // D)                        # the packed pooled rows (models/sd3.py)
    nograd, grad = _costs(den, pc, call)
    if slicing:
        vae.enable_slicing()
    if tiling:
        vae.enable_tiling()

    def decode(n):
        with torch.no_grad():
            vae.decode(_meta(n, vae.config.latent_channels, h, h))

    # with slicing the decode's peak is one image's: measured at 1 and 2 images it is all fixed
    clip, text_lora = _clip_lora(family, c, pc) if pc.train_text_encoder and pc.lora_rank > 0 else (0, 0)
    # (the first-order decode with grad is measured apart, by _decode_grad: zeroth-order runs skip it)
    return ModelProfile(n_den, lora, n_vae, _text_params(family, c, t5), L * D * BYTES.get(pc.dtype, 4),
                        nograd, grad, Cost(*linear_cost(decode)), clip, text_lora)


@functools.lru_cache(maxsize=16)
def _decode_grad(spec: str, res: int, slicing: bool, tiling: bool) -> Cost:
    """The VAE decode of the adapters (``models/sd15.py`` / ``sd3.py`` ``decode``: unscale, decode,
    to [0, 1]) with grad through the latents and the backward, the VAE frozen in float32 as the
    run keeps it. Slicing decodes one image at a time but autograd keeps every image's layers
    until the backward, so it barely lowers this cost (sd15-full at 512 px: 5.97 GB per image
    sliced, 6.10 GB not): the lever is ``method.fo_grad_chunk``."""
    from diffusers import AutoencoderKL

    _, c = _configs(spec)
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(_clean(c["vae"]))
    vae.requires_grad_(False).eval()
    if slicing:
        vae.enable_slicing()
    if tiling:
        vae.enable_tiling()
    vc = vae.config
    h = res // 2 ** (len(vc.block_out_channels) - 1)

    shift = getattr(vc, "shift_factor", None)      # SD3's VAE only

    def decode(latents):
        z = latents / vc.scaling_factor
        img = vae.decode(z + shift if shift else z).sample
        return (img.float() / 2 + 0.5).clamp(0, 1)

    return grad_cost(decode, vc.latent_channels, h, h)


def diffusers_profile(cfg) -> ModelProfile | None:
    """The diffusers task's model under ``cfg`` (None when its configs cannot be read); with a
    first-order estimator, the decode with grad too."""
    from dataclasses import replace

    from .memory_estimate import FIRST_ORDER, task_geometry

    geo = task_geometry(cfg)
    if geo is None:
        return None
    t = cfg.task
    res = geo.latent_shape[-1] * _vae_factor(t.model)
    try:
        prof = _diffusers(t.model, res, bool(t.t5), bool(t.vae_slicing), bool(t.vae_tiling), _pc_key(cfg.policy))
        if cfg.method.estimator in FIRST_ORDER:
            prof = replace(prof, decode_grad=_decode_grad(t.model, res, bool(t.vae_slicing), bool(t.vae_tiling)))
        return prof
    except (OSError, ValueError, TypeError, KeyError):
        return None


def _vae_factor(spec: str) -> int:
    _, c = _configs(spec)
    return 2 ** (len((c.get("vae") or {}).get("block_out_channels", (0,))) - 1)


# ------------------------------------------------------------------------------------------------
def image_geometry(cfg, geo, device=None):
    """``geo`` (:class:`rsm_fast.memory_estimate.TaskGeometry`) with the image model's measured sizes:
    trained parameters in their dtype, frozen weights, text encoders, reference copy, activations
    and decode (digits, diffusers); unchanged for the 2-D task or a model whose configs cannot be
    read. ``device`` (default ``train.device``): ``task.offload=cpu`` moves bytes off a CUDA
    device only (on a CPU device every part is in the same memory)."""
    from dataclasses import replace

    from .memory_estimate import DIGITS_ACT_GRAD, DIGITS_ACT_NOGRAD, FIRST_ORDER

    t, pc = cfg.task, cfg.policy
    b = BYTES[pc.dtype]
    if t.name in ("digits-ddim", "digits-flow"):
        prof = digits_profile(cfg)
        base = _digits("", _pc_key(_PC()))      # the setting the measured constants were taken at
        ratio = lambda new, old: new / old if old else 1.0  # noqa: E731
        lora = pc.lora_rank > 0
        den = prof.denoiser_params * b
        dec = digits_decode_grad() if cfg.method.estimator in FIRST_ORDER else Cost()
        return replace(geo, param_bytes=prof.lora_params * 4 if lora else den, param_elem=4 if lora else b,
                       full_copy_bytes=0 if lora else den, frozen_bytes=den if lora else 0,
                       act_grad=round(DIGITS_ACT_GRAD * ratio(prof.grad.per_row, base[3].per_row)),
                       act_nograd=round(DIGITS_ACT_NOGRAD * ratio(prof.nograd.per_row, base[2].per_row)),
                       act_fixed=prof.grad.fixed, decode_grad_fixed=dec.fixed, decode_grad_row=dec.per_row)
    if t.name != "diffusers":
        return geo
    prof = diffusers_profile(cfg)
    if prof is None:
        return geo
    lora = pc.lora_rank > 0
    den, vae, text = prof.denoiser_params * b, prof.vae_params * 4, prof.text_params * b
    trained_text = prof.clip_params * b                 # text-encoder LoRA: the CLIPs stay, T5 is freed
    kept_text = trained_text if trained_text else text if t.text_cache == "off" else 0
    ref = 0 if lora else den
    frozen, visit, host = (den if lora else 0) + vae + kept_text, 0, 0
    dev = torch.device(device if device is not None else cfg.train.device)
    if t.offload == "cpu" and dev.type != "cpu":
        movable = kept_text - trained_text              # trained encoders never leave the device
        host = vae + movable + ref + (text - kept_text)
        visit = max(vae, movable, ref)
        frozen -= vae + movable
        ref = 0
    trained = (prof.lora_params + prof.text_lora_params) * 4
    return replace(geo, param_bytes=trained if lora else den, param_elem=4 if lora else b,
                   full_copy_bytes=ref, frozen_bytes=frozen, visit_bytes=visit, offload_bytes=host,
                   text_bytes=text if t.text_cache != "off" else 0,
                   act_grad=prof.grad.per_row + prof.cond_bytes, act_fixed=prof.grad.fixed,
                   act_nograd=prof.nograd.per_row + prof.cond_bytes,
                   decode_fixed=prof.decode.fixed, decode_row=prof.decode.per_row,
                   decode_grad_fixed=prof.decode_grad.fixed, decode_grad_row=prof.decode_grad.per_row)
