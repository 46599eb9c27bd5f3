"""FLOP prices of a run's denoiser forward, decode and reward model, and forward-equivalents
(issue 20, item 4: "forward-equivalents including reward-model evaluations and decodes, priced from
each reward model's FLOPs, stated").

``Trainer.nfe`` counts denoiser forwards (one row; a CFG pair is two). A method that scores many
more final samples (branching presets score every branch, forward-process presets every sample)
also pays a decode and a reward-model forward per sample, which on an image task cost as much as
several denoiser forwards (the SD VAE decode at 512² is 2.5 TFLOP, more than an SD3.5-M forward:
shared/docs/performance.md §0). So::

    forward-equivalents = NFE + (S (F_dec + F_rew) + S_grad (F_dec,fb + F_rew,fb)) / F_fwd

with ``S`` the samples decoded and scored (``Trainer.scored["reward"]``), ``S_grad`` the samples
(or Tweedie estimates) whose decode + reward were differentiated by a first-order estimator
(``Trainer.scored["reward_grad"]``), ``F_fwd`` one denoiser forward of one row, ``F_dec`` /
``F_rew`` one decode / reward forward of one sample and ``F_*,fb`` their forward + backward with
respect to the input (frozen weights). The gradient factor F_fb / F is counted, not assumed
(2.0x for the digit classifier and the CLIP towers: the input gradient of every matmul costs
what its forward does). Training NFE are forwards as ``Trainer.nfe`` counts them; the backward of
the training loss is in neither column.

**Method.** FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` on one row of the
model the task builds, on the ``meta`` device (no weights, no arithmetic): matmul, convolution and
attention products only, as shared/docs/performance.md §3 counts them (elementwise work, norms,
softmax, resizing and embedding lookups are not FLOPs here). On the meta device
``scaled_dot_product_attention`` runs its math decomposition, whose ``bmm``s are counted; the CPU
kernel (``aten._scaled_dot_product_flash_attention_for_cpu``) is not in the counter's registry
(torch 2.13), so a CPU count would silently drop attention (tests/test_cost.py checks the digits
UNet against a count by layer sizes, attention included).

Prices by task (the denoiser and decode) and by reward (:func:`price`):

* ``toy2d``: the residual MLP (``policy.hidden/layers/emb_dim``); its exact reference epsilon is
  elementwise (0 counted); decode is the identity; the ``linear`` reward ``w.x + c`` is
  2 multiply-adds per sample (``aten.mv``, outside the counted ops): 0.
* ``digits-flow`` / ``digits-ddim``: the shipped UNet2DModel (config from the checkpoint's metadata,
  ``rsm_fast/assets/digits``); decode ``(x/2 + 1/2).clamp`` is elementwise: 0; the digit rewards
  are the shipped DigitClassifier (config from ``classifier.safetensors``), counted.
* ``diffusers``: the denoiser and VAE decoder of ``task.model`` (a named config of
  :mod:`rsm_fast.models.configs` or a local folder's JSON files) at ``task.resolution``; text tokens
  as the adapters feed them (SD1.5: 77 CLIP; SD3: 77 CLIP + 256 T5 rows, zeros without T5).
* Rewards: ``aesthetic`` = CLIP ViT-L/14 image tower + the 768-1024-128-64-16-1 head; ``pickscore``
  and ``hps`` = CLIP ViT-H/14 image tower (the text tower runs once per new prompt, cached by
  :class:`~rsm_fast.rewards.clip.ClipScoreReward`, so it is stated apart, not charged per sample).
  A directory argument holding a ``config.json`` is read for the architecture; otherwise the
  published architectures below (:data:`CLIP_ARCH`). ``jpeg*`` encodes with PIL on the host
  (no device FLOPs; its time is the reward phase's); ``brightness`` / ``color`` are elementwise
  means (0 counted). A reward server or a ``module:function`` has no price: forward-equivalents
  are then unknown (NaN), and the tables say so.

``python -m rsm_fast.cost`` prints the price table of the reward zoo; ``--task`` / ``--reward`` /
``--resolution`` price one combination.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

# Published CLIP image/text tower architectures (counted on meta when no config.json is given):
# * ViT-L/14 -- openai/clip-vit-large-patch14 config.json (vision: hidden 1024, intermediate 4096,
#   24 layers, 16 heads, patch 14, image 224; text: 768 / 3072 / 12 layers / 12 heads; projection
#   768); the LAION aesthetic predictor embeds with it (improved-aesthetic-predictor
#   simple_inference.py: clip.load("ViT-L/14")).
# * ViT-H/14 -- laion/CLIP-ViT-H-14-laion2B-s32B-b79K config.json, the same as open_clip's
#   model_configs/ViT-H-14.json (vision: width 1280, 32 layers, head_width 80 -> 16 heads, mlp 4x ->
#   5120, patch 14, image 224; text: width 1024, 24 layers, 16 heads, 77 tokens; embed_dim 1024).
#   PickScore_v1 is a fine-tune of it (yuvalkirstain/PickScore_v1 model card), HPSv2.1 loads
#   open_clip 'ViT-H-14' (tgxs002/HPSv2 score.py).
CLIP_ARCH = {
    "ViT-L/14": dict(vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                                 image_size=224, patch_size=14),
                     text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                               max_position_embeddings=77), projection_dim=768),
    "ViT-H/14": dict(vision=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                                 image_size=224, patch_size=14),
                     text=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                               max_position_embeddings=77), projection_dim=1024),
}
REWARD_TOWER = {"aesthetic": "ViT-L/14", "pickscore": "ViT-H/14", "hps": "ViT-H/14"}
SD3_CLIP_TOKENS, SD3_T5_TOKENS = 77, 256   # models/sd3.py: clip_length 77; the pipeline's max_sequence_length 256
METHOD = "FlopCounterMode on meta, one row (matmul/conv/attention FLOPs; performance.md §3)"


@dataclass(frozen=True)
class Prices:
    """FLOPs of one denoiser forward (one row), and per scored sample: decode and reward forward,
    and their forward + backward w.r.t. the input (first-order estimators). NaN: unknown."""

    task: str
    reward: str
    fwd_flops: float
    decode_flops: float
    reward_flops: float
    decode_grad_flops: float
    reward_grad_flops: float
    source: str

    @property
    def scored_flops(self) -> float:
        return self.decode_flops + self.reward_flops

    @property
    def grad_flops(self) -> float:
        return self.decode_grad_flops + self.reward_grad_flops

    @property
    def known(self) -> bool:
        """Whether a scored sample has a price (a reward gradient may still be n/a: not differentiable)."""
        return not math.isnan(self.scored_flops)

    def as_dict(self) -> dict:
        return {f.name: (None if isinstance(v, float) and math.isnan(v) else v)
                for f, v in ((f, getattr(self, f.name)) for f in fields(self))}

    @classmethod
    def from_dict(cls, d: dict) -> "Prices":
        return cls(**{f.name: (str(d.get(f.name) or "") if f.name in ("task", "reward", "source")
                               else math.nan if d.get(f.name) is None else float(d[f.name])) for f in fields(cls)})


def forward_equivalents(nfe: float, scored: float, prices: Prices, scored_grad: float = 0) -> float:
    """``nfe + (scored (F_dec + F_rew) + scored_grad (F_dec,fb + F_rew,fb)) / F_fwd``; a count of 0
    adds nothing even when its price is unknown; otherwise an unknown price gives NaN."""
    for name, v in (("nfe", nfe), ("scored", scored), ("scored_grad", scored_grad)):
        if not v >= 0:
            raise ValueError(f"forward_equivalents: '{name}' must be a count >= 0, got {v!r}")
    if not prices.fwd_flops > 0:
        raise ValueError(f"forward_equivalents: 'fwd_flops' must be > 0, got {prices.fwd_flops!r}")
    extra = sum(n * f for n, f in ((scored, prices.scored_flops), (scored_grad, prices.grad_flops)) if n)
    return nfe + extra / prices.fwd_flops


# ------------------------------------------------------------------------------------------------
# counting
# ------------------------------------------------------------------------------------------------
def count_flops(fn) -> int:
    """Total FLOPs ``FlopCounterMode`` counts while ``fn()`` runs."""
    with FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


def _meta(*shape, dtype=torch.float32):
    return torch.zeros(*shape, device="meta", dtype=dtype)


def fwd_and_grad(f, x) -> tuple[int, int]:
    """FLOPs of ``f(x)`` (no grad) and of ``f(x)`` + backward w.r.t. ``x`` (weights frozen by the caller)."""
    with torch.no_grad():
        fwd = count_flops(lambda: f(x))

    def both():
        xg = x.detach().requires_grad_(True)
        out = f(xg)
        if out.requires_grad:
            out.float().sum().backward()
    with torch.enable_grad():
        return fwd, count_flops(both)


def _frozen(m: torch.nn.Module) -> torch.nn.Module:
    return m.eval().requires_grad_(False)


@functools.lru_cache(maxsize=8)
def toy_forward(hidden: int = 128, layers: int = 2, emb_dim: int = 32) -> int:
    """One row of the 2-D task's policy (residual MLP + the exact, elementwise reference)."""
    from .tasks.toy2d import Toy2D

    task = Toy2D()
    with torch.device("meta"):
        net = _frozen(task.build_policy(hidden=hidden, layers=layers, emb_dim=emb_dim))
    with torch.no_grad():
        return count_flops(lambda: net(_meta(1, 2), _meta(1, dtype=torch.long)))


def _digits_config(name: str) -> dict:
    from safetensors import safe_open

    from .tasks import digits as D

    with safe_open(str(D.ASSETS / name), framework="pt") as f:
        return json.loads((f.metadata() or {})["config"])


@functools.lru_cache(maxsize=4)
def digits_forward(family: str = "flow") -> int:
    """One row of the shipped digits UNet (``family`` picks the checkpoint whose config is read)."""
    from .tasks import digits as D

    cfg = D._config_from_meta(_digits_config("ddpm.safetensors" if family == "ddim" else "flow.safetensors"))
    with torch.device("meta"):
        unet = _frozen(D.make_unet(cfg))
    with torch.no_grad():
        return count_flops(lambda: unet(_meta(1, 1, D.SIZE, D.SIZE), _meta(1), class_labels=_meta(1, dtype=torch.long)))


@functools.lru_cache(maxsize=2)
def digit_classifier() -> tuple[int, int, int]:
    """``(forward, forward + input backward, width)`` of the shipped digit classifier."""
    from .tasks import digits as D

    width = int(_digits_config("classifier.safetensors").get("width", 16))
    with torch.device("meta"):
        clf = _frozen(D.DigitClassifier(width))
    return (*fwd_and_grad(clf, _meta(1, 1, D.SIZE, D.SIZE)), width)


@functools.lru_cache(maxsize=8)
def diffusers_parts(model: str, resolution: int = 0) -> dict:
    """Denoiser forward, VAE decode (and its input backward) of a diffusers model at ``resolution``
    (0: the model's default), one row. SD3's T5 rows are fed with or without ``task.t5`` (zeros)."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel, UNet2DConditionModel

    from .memory_profile import _clean, _configs

    try:
        family, c = _configs(model)
    except (OSError, ValueError) as e:
        raise ValueError(f"config field 'task.model': {str(e).splitlines()[0]}") from None
    den_key = "unet" if family == "sd15" else "transformer"
    if not c.get(den_key) or not c.get("vae"):
        raise ValueError(f"config field 'task.model': {model!r} has no {den_key}/vae config.json to count")
    with torch.device("meta"):
        den = _frozen((UNet2DConditionModel if family == "sd15" else SD3Transformer2DModel).from_config(_clean(c[den_key])))
        vae = _frozen(AutoencoderKL.from_config(_clean(c["vae"])))
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    res = resolution or int(den.config.sample_size) * f
    if res % f:
        raise ValueError(f"config field 'task.resolution': {res} is not a multiple of the VAE factor {f}")
    h, dc, tk = res // f, den.config, c.get("tokenizer") or {}
    if family == "sd15":
        L = int(tk.get("max_length", 77))
        call = lambda: den(_meta(1, dc.in_channels, h, h), _meta(1), encoder_hidden_states=_meta(1, L, dc.cross_attention_dim))  # noqa: E731
    else:
        L = int(tk.get("max_length", SD3_CLIP_TOKENS)) + int(tk.get("t5_max_length", SD3_T5_TOKENS))
        call = lambda: den(hidden_states=_meta(1, dc.in_channels, h, h), timestep=_meta(1),  # noqa: E731
                           encoder_hidden_states=_meta(1, L, dc.joint_attention_dim),
                           pooled_projections=_meta(1, dc.pooled_projection_dim))
    with torch.no_grad():
        fwd = count_flops(call)
    dec, dec_fb = fwd_and_grad(lambda z: vae.decode(z).sample, _meta(1, vae.config.latent_channels, h, h))
    return {"family": family, "resolution": res, "tokens": L, "fwd": fwd, "decode": dec, "decode_fb": dec_fb}


def _clip_arch(tower: str, directory: str | None) -> tuple[dict, str]:
    """The image/text tower configs: a reward directory's ``config.json`` when there is one, else :data:`CLIP_ARCH`."""
    if directory:
        d = Path(directory).expanduser()
        d = d / "clip" if (d / "clip" / "config.json").is_file() else d
        if (d / "config.json").is_file():
            c = json.loads((d / "config.json").read_text(encoding="utf-8"))
            keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
            vis = {k: c["vision_config"][k] for k in (*keys, "image_size", "patch_size") if k in c.get("vision_config", {})}
            txt = {k: c["text_config"][k] for k in (*keys, "max_position_embeddings") if k in c.get("text_config", {})}
            return {"vision": vis, "text": txt, "projection_dim": c.get("projection_dim", 512)}, f"{d / 'config.json'}"
    return CLIP_ARCH[tower], f"published CLIP {tower} architecture (rsm_fast/cost.py CLIP_ARCH)"


@functools.lru_cache(maxsize=8)
def clip_tower(tower: str, directory: str | None = None, head: bool = False) -> tuple[int, int, int, str]:
    """``(image forward, image forward + input backward, text forward per prompt, source)`` of a CLIP
    model; ``head``: the aesthetic MLP on the image embedding too."""
    from transformers import (CLIPTextConfig, CLIPTextModelWithProjection, CLIPVisionConfig,
                              CLIPVisionModelWithProjection)

    from .rewards.clip import AestheticHead

    arch, src = _clip_arch(tower, directory)
    p = arch["projection_dim"]
    with torch.device("meta"):
        vis = _frozen(CLIPVisionModelWithProjection(CLIPVisionConfig(**arch["vision"], projection_dim=p)))
        txt = _frozen(CLIPTextModelWithProjection(CLIPTextConfig(**arch["text"], projection_dim=p)))
        mlp = _frozen(AestheticHead((p, 1024, 128, 64, 16, 1))) if head else None

    def image(x):
        e = vis(pixel_values=x).image_embeds
        return mlp(e) if mlp is not None else e
    size = int(arch["vision"].get("image_size", 224))
    fwd, fb = fwd_and_grad(image, _meta(1, 3, size, size))
    L = int(arch["text"].get("max_position_embeddings", 77))
    with torch.no_grad():
        text = count_flops(lambda: txt(input_ids=_meta(1, L, dtype=torch.long)))
    return fwd, fb, text, src


# ------------------------------------------------------------------------------------------------
# pricing
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Part:
    fwd: float
    fb: float
    note: str


def _g(v: float) -> str:
    return "unknown" if math.isnan(v) else "0" if v == 0 else f"{v:.4g}"


def _reward_part(atom: str) -> _Part:
    from . import rewards as R

    kind, entry, arg = R.registry.lookup(atom)
    if kind != "registered":
        what = "a reward server" if kind == "url" else f"the function {atom!r}"
        return _Part(math.nan, math.nan, f"{what}: no FLOP price (unknown)")
    name = atom.split(":", 1)[0]
    if name == "linear":
        return _Part(0.0, 0.0, "linear w.x + c: 2 multiply-adds per sample (aten.mv, not a counted op): 0")
    if name.startswith("jpeg"):
        return _Part(0.0, math.nan, "PIL JPEG encode on the host: no device FLOPs (its time is the reward phase's)")
    if name in ("brightness", "color"):
        return _Part(0.0, 0.0, f"{name}: an elementwise mean over the pixels (C·H·W-scale adds, not counted): 0")
    if name in ("digit_label_logprob", "digit_logprob", "digit_score"):
        fwd, fb, w = digit_classifier()
        return _Part(fwd, fb, f"{name}: DigitClassifier(width {w}) {fwd:,} FLOPs, fwd+bwd {fb:,} ({fb / fwd:.2f}x)")
    if name in REWARD_TOWER:
        tower = REWARD_TOWER[name]
        fwd, fb, text, src = clip_tower(tower, arg if arg and Path(arg).expanduser().is_dir() else None, name == "aesthetic")
        extra = ("; + the aesthetic head 768-1024-128-64-16-1" if name == "aesthetic" else
                 f"; text tower {text / 1e9:.3g} GFLOP once per new prompt (cached), not charged per sample")
        return _Part(fwd, fb, f"{name}: CLIP {tower} image tower at 224 px from {src}: {fwd / 1e9:.4g} GFLOP, "
                              f"fwd+bwd {fb / fwd:.2f}x{extra}; the resize to 224 px is not counted")
    return _Part(math.nan, math.nan, f"reward {name!r} has no FLOP price in rsm_fast/cost.py (unknown)")


def reward_part(spec: str, task_kind: str = "") -> _Part:
    """Price of one scored sample under ``spec`` (a weighted sum costs the sum of its terms)."""
    from . import rewards as R

    if task_kind.startswith("digits"):
        from .tasks import digits_task  # noqa: F401 - registers the digit rewards
    parts = [_reward_part(atom) for _, atom in R.parse_spec(spec)]
    return _Part(sum(p.fwd for p in parts), sum(p.fb for p in parts), "; ".join(p.note for p in parts))


def _task_config(task):
    """A TaskConfig from itself, a name (``toy2d``, ``digits-flow``, ``digits-ddim``, ``diffusers:<model>``)
    or anything with the TaskConfig fields."""
    from .config import TaskConfig
    from .tasks import TASKS

    if isinstance(task, str):
        name, _, model = task.partition(":")
        task = TaskConfig(name=name, **({"model": model} if model else {}))
    if getattr(task, "name", None) not in TASKS:
        raise ValueError(f"config field 'task.name' must be one of {list(TASKS)}, got {getattr(task, 'name', task)!r}")
    return task


def default_reward(tc) -> str:
    """The reward a task scores with when ``task.reward`` is empty (the tasks' ``default_reward``)."""
    if tc.name == "toy2d":
        from .tasks.toy2d import Toy2D
        return Toy2D.default_reward
    if tc.name.startswith("digits"):
        from .tasks.digits_task import default_reward as digits_default
        return digits_default(tc.condition)
    from .tasks.diffusers_task import DiffusersTask
    return DiffusersTask.default_reward


def price(task, reward: str | None = None, policy=None) -> Prices:
    """The :class:`Prices` of a task (a TaskConfig or a name, see :func:`_task_config`) scored by
    ``reward`` (default: ``task.reward``, else the task's default). ``policy``: the PolicyConfig
    (the 2-D task's MLP size; LoRA's low-rank matmuls are not counted)."""
    from .config import PolicyConfig
    from .rewards.secrets import redact_spec

    tc = _task_config(task)
    pc = policy or PolicyConfig()
    spec = reward or getattr(tc, "reward", "") or default_reward(tc)
    if tc.name == "toy2d":
        fwd = toy_forward(pc.hidden, pc.layers, pc.emb_dim)
        den = (f"toy2d residual MLP (hidden {pc.hidden}, {pc.layers} layers, emb {pc.emb_dim}): {fwd:,} FLOPs "
               "(the exact reference is elementwise); decode: identity, 0")
        dec = dec_fb = 0.0
    elif tc.name.startswith("digits"):
        fwd = digits_forward(tc.name.split("-")[1])
        den = f"{tc.name} UNet2DModel (shipped config, 1x16x16): {fwd:,} FLOPs; decode: (x/2+1/2).clamp, elementwise, 0"
        dec = dec_fb = 0.0
    else:
        p = diffusers_parts(tc.model, int(tc.resolution))
        fwd, dec, dec_fb = p["fwd"], p["decode"], p["decode_fb"]
        den = (f"{tc.model} {'UNet' if p['family'] == 'sd15' else 'MMDiT'} at {p['resolution']}² ({p['tokens']} text "
               f"tokens): {fwd / 1e12:.4g} TFLOP; VAE decode {dec / 1e12:.4g} TFLOP, fwd+bwd {dec_fb / dec:.2f}x")
    rw = reward_part(spec, tc.name)
    src = f"{METHOD}. Denoiser: {den}. Reward: {rw.note}"
    name = tc.name if tc.name != "diffusers" else f"diffusers:{tc.model}"
    return Prices(name, redact_spec(spec), float(fwd), float(dec), float(rw.fwd), float(dec_fb), float(rw.fb), src)


# ------------------------------------------------------------------------------------------------
# the price table (python -m rsm_fast.cost)
# ------------------------------------------------------------------------------------------------
ZOO = (("toy2d", "linear", 0), ("digits-flow", "digit_label_logprob", 0), ("digits-ddim", "digit_logprob:3", 0),
       ("diffusers:sd15-full", "jpeg", 512), ("diffusers:sd15-full", "aesthetic:<dir>", 512),
       ("diffusers:sd15-full", "pickscore:<dir>", 512), ("diffusers:sd35m-full", "hps:<dir>", 512),
       ("diffusers:sd35m-full", "pickscore:<dir>", 1024))


def table(rows) -> list[str]:
    """Markdown rows: FLOPs of a forward, decode and reward, their ratio to a forward, and the sources."""
    out = ["| task | reward | denoiser fwd FLOPs | decode FLOPs | reward FLOPs | (decode+reward)/fwd "
           "| gradient (decode+reward fwd+bwd)/fwd |", "|---|---|---|---|---|---|---|"]
    notes = []
    for p in rows:
        grad = "n/a" if p.known and math.isnan(p.grad_flops) else _g(p.grad_flops / p.fwd_flops)
        out.append(f"| {p.task} | {p.reward} | {_g(p.fwd_flops)} | {_g(p.decode_flops)} | {_g(p.reward_flops)} "
                   f"| {_g(p.scored_flops / p.fwd_flops)} | {grad} |")
        notes.append(f"- {p.task} / {p.reward}: {p.source}")
    return out + [""] + notes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rsm_fast.cost", description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default=None, help="toy2d, digits-flow, digits-ddim or diffusers:<model> (default: the zoo table)")
    ap.add_argument("--reward", default=None, help="reward spec (default: the task's)")
    ap.add_argument("--resolution", type=int, default=0, help="diffusers: image size (0 = the model's default)")
    a = ap.parse_args(argv)
    from .config import TaskConfig
    try:
        if a.task is None:
            todo = [(TaskConfig(name=t.split(":")[0], **({"model": t.split(":")[1]} if ":" in t else {}), resolution=r), w)
                    for t, w, r in ZOO]
        else:
            tc = _task_config(a.task)
            todo = [(TaskConfig(**{**asdict(tc), "resolution": a.resolution}), a.reward)]
        print("\n".join(table([price(tc, w) for tc, w in todo])))
    except (ValueError, ImportError, OSError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
