"""Reward-model adapters over CLIP backbones, loaded from local directories only.

* ``aesthetic:/dir`` -- LAION improved aesthetic predictor: CLIP ViT-L/14 image embedding,
  L2-normalised, through a linear MLP head 768-1024-128-64-16-1
  (christophschuhmann/improved-aesthetic-predictor ``simple_inference.py``: ``MLP(768)`` with the
  ReLUs commented out, ``normalized()`` = L2; the same in kvablack/ddpo-pytorch
  ``ddpo_pytorch/aesthetic_scorer.py``). ``/dir`` holds the transformers CLIPModel (``config.json``
  + weights, in ``/dir`` or ``/dir/clip``) and the head as ``aesthetic_head.safetensors`` or the
  published ``sac+logos+ava1-l14-linearMSE.pth`` (keys ``layers.{0,2,4,6,7}.{weight,bias}``).
* ``pickscore:/dir`` -- PickScore_v1 (a CLIP-H): ``logit_scale.exp() * cos(image_emb, text_emb)``
  (model card of yuvalkirstain/PickScore_v1). ``/dir``: the CLIPModel plus a CLIP tokenizer in
  ``/dir`` or ``/dir/tokenizer`` (PickScore ships its processor separately, from
  laion/CLIP-ViT-H-14-laion2B-s32B-b79K).
* ``hps:/dir`` -- HPSv2.1: ``cos(image_emb, text_emb)`` without the logit scale (tgxs002/HPSv2
  ``score.py``: diagonal of ``image_features @ text_features.T`` on normalised features). ``/dir``
  either is a transformers CLIPModel directory (the open_clip ViT-H-14 checkpoint converted to
  the transformers layout) or holds ``HPS_v2.1_compressed.pt``, which needs ``open_clip_torch``.

The image preprocessing is done in torch, so gradients reach the images: shortest side resized to
the model's input size (224) with antialiased bicubic, centre crop, CLIP mean/std.

Device and precision (:mod:`.device`): every reward here is built on a device in a precision
(``device=``, ``dtype=``, ``autocast=``; the registry passes ``task.device`` and the release's
precision there) and can be moved with :meth:`ModelReward.place`. The CLIP mean/std and the
logit scale are float32 buffers that follow the module's device but never its dtype; the
preprocessing runs in float32 on the model's device, and only its output is cast to the weights'
dtype. The aesthetic head stays float32 (a 0.9 M-parameter MLP). Images already on the model's
device are never copied through the host; scores come back float32 on the images' device.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import RewardError, check_images, one_line
from .device import FP32, Precision, autocast_context, check_device, resolve_precision

# openai/CLIP clip/clip.py ``_transform``: Normalize((0.48145466, 0.4578275, 0.40821073),
# (0.26862954, 0.26130258, 0.27577711)); identical to open_clip's OPENAI_DATASET_MEAN / _STD,
# which HPSv2's ViT-H-14 and the laion CLIP-H processor (used by PickScore) also use.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_SIZE = 224            # ViT-L/14 and ViT-H-14 input resolution (vision_config.image_size)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
AESTHETIC_HEADS = ("aesthetic_head.safetensors", "sac+logos+ava1-l14-linearMSE.pth")
HPS_CHECKPOINT = "HPS_v2.1_compressed.pt"
TEXT_CACHE_MAX = 4096


def clip_preprocess(images: Tensor, size: int = CLIP_SIZE, mean=CLIP_MEAN, std=CLIP_STD) -> Tensor:
    """``[B, 1|3, H, W]`` in [0, 1] -> CLIP pixel values ``[B, 3, size, size]``, differentiable.

    Shortest side to ``size`` (long side ``int(size * long / short)``, as torchvision's
    ``Resize(int)``), antialiased bicubic, centre crop, per-channel mean/std (``mean`` / ``std``:
    three numbers, or tensors already on the images' device, e.g. a backbone's buffers).
    """
    x = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
    h, w = x.shape[-2:]
    if min(h, w) != size:
        nh, nw = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
        h, w = nh, nw
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    x = x[..., top:top + size, left:left + size]
    m, s = (_const(v, x) for v in (mean, std))
    return (x - m) / s


def _const(v, like: Tensor) -> Tensor:
    if isinstance(v, Tensor):
        return v.to(device=like.device, dtype=like.dtype).view(1, 3, 1, 1)
    return torch.tensor(v, dtype=like.dtype, device=like.device).view(1, 3, 1, 1)


def _need(path: Path, who: str, also: str = "") -> Path:
    if not path.exists():
        raise RewardError(f"reward '{who}': missing file '{path}'{also}")
    return path


def _dir(d, who: str) -> Path:
    d = Path(d).expanduser()
    if not d.is_dir():
        raise RewardError(f"reward '{who}': directory '{d}' does not exist")
    return d


def _transformers(who: str):
    try:
        import transformers
    except ImportError:
        raise RewardError(f"reward '{who}' needs the 'transformers' package (pip install 'rsm_fast[models]')") from None
    return transformers


def load_clip_model(d: Path, who: str):
    """A frozen transformers ``CLIPModel`` from a local directory (never the hub)."""
    _need(d / "config.json", who)
    if not any((d / n).exists() for n in WEIGHT_FILES):
        _need(d / WEIGHT_FILES[0], who, " (or pytorch_model.bin)")
    tf = _transformers(who)
    try:
        model = tf.CLIPModel.from_pretrained(str(d), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any load failure becomes one line naming the directory
        raise RewardError(one_line(f"reward '{who}': cannot load a CLIPModel from '{d}': {type(e).__name__}: {e}")) from None
    return model.eval().requires_grad_(False)


def load_tokenizer(d: Path, who: str):
    for c in (d / "tokenizer", d):
        if (c / "tokenizer.json").exists() or (c / "vocab.json").exists():
            break
    else:
        raise RewardError(f"reward '{who}': missing file '{d / 'tokenizer.json'}' (a CLIP tokenizer, in '{d}' or '{d / 'tokenizer'}')")
    try:
        return _transformers(who).AutoTokenizer.from_pretrained(str(c), local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise RewardError(one_line(f"reward '{who}': cannot load the tokenizer from '{c}': {type(e).__name__}: {e}")) from None


def _pooled(out) -> Tensor:
    # transformers >= 5 returns a model output whose pooler_output holds the projected features
    return out if isinstance(out, Tensor) else out.pooler_output


class ClipBackbone(nn.Module):
    """A CLIP model with its preprocessing constants: ``pixel_mean`` / ``pixel_std`` and the
    model's ``logit_scale``, kept as float32 buffers that follow the module's device but never its
    dtype (cast to bfloat16, a logit scale of ln 100 = 4.6052 becomes 4.59375: exp 98.9, not 100)."""

    FP32_BUFFERS = ("pixel_mean", "pixel_std", "logit_scale_fp32")

    def __init__(self, model, tokenizer, image_size: int):
        super().__init__()
        self.model, self.tokenizer, self.image_size = model, tokenizer, int(image_size)
        self.register_buffer("pixel_mean", torch.tensor(CLIP_MEAN, dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("pixel_std", torch.tensor(CLIP_STD, dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("logit_scale_fp32", model.logit_scale.detach().to(torch.float32).clone().reshape(()),
                             persistent=False)

    def _apply(self, fn, recurse=True):
        keep = {n: getattr(self, n) for n in self.FP32_BUFFERS}
        super()._apply(fn, recurse)
        for n, old in keep.items():          # the float32 values, on wherever ``fn`` moved the buffer
            setattr(self, n, old.to(device=getattr(self, n).device))
        return self

    def weights(self) -> Tensor:
        """A parameter of the model (its device and dtype are the backbone's)."""
        return next(self.model.parameters())

    def preprocess(self, images: Tensor) -> Tensor:
        """Images -> pixel values on the model's device, in its dtype (resize / crop / normalise in float32)."""
        p = self.weights()
        x = clip_preprocess(images.to(device=p.device, dtype=torch.float32), self.image_size,
                            self.pixel_mean, self.pixel_std)
        return x.to(p.dtype)

    def logit_scale(self) -> Tensor:
        return self.logit_scale_fp32.exp()


class HFClip(ClipBackbone):
    """Image/text encoders of a transformers ``CLIPModel`` (unnormalised projected features)."""

    def __init__(self, model, tokenizer=None):
        super().__init__(model, tokenizer, model.config.vision_config.image_size)
        self.max_text = int(model.config.text_config.max_position_embeddings)

    def encode_image(self, pixels: Tensor) -> Tensor:
        return _pooled(self.model.get_image_features(pixel_values=pixels))

    def encode_text(self, prompts: list[str]) -> Tensor:
        dev = self.weights().device
        tok = self.tokenizer(prompts, padding=True, truncation=True, max_length=self.max_text, return_tensors="pt")
        return _pooled(self.model.get_text_features(input_ids=tok["input_ids"].to(dev),
                                                    attention_mask=tok["attention_mask"].to(dev)))


class OpenClip(ClipBackbone):
    """The same interface over an ``open_clip`` model (used for the HPSv2.1 checkpoint)."""

    def __init__(self, model, tokenizer):
        size = getattr(model.visual, "image_size", CLIP_SIZE)
        super().__init__(model, tokenizer, size[0] if isinstance(size, (tuple, list)) else size)

    def encode_image(self, pixels: Tensor) -> Tensor:
        return self.model.encode_image(pixels)

    def encode_text(self, prompts: list[str]) -> Tensor:
        return self.model.encode_text(self.tokenizer(prompts).to(self.weights().device))


class ModelReward(nn.Module):
    """A frozen reward model with a device and a :class:`~.device.Precision`.

    :meth:`place` moves it (``nn.Module.to`` works too, but casts everything it is given).
    Subclasses run their encoders under :meth:`autocast` and say in :meth:`_place` what is cast.
    """

    name = "model"
    precision: Precision = FP32
    backend = "eager"
    _compiled = None            # (module, max batch): a compiled image encoder (rewards/backend.py)

    def place(self, device=None, dtype: torch.dtype | None = None, autocast: torch.dtype | None = None):
        """On ``device`` (None: cpu) in ``dtype`` / under ``autocast`` (both None: the release's
        precision on that device, :func:`~.device.release_precision`). Returns ``self``."""
        dev = check_device(device, self.name)
        prec = resolve_precision(self.name, dev, dtype, autocast)
        self._place(dev, prec)
        self.precision = prec
        return self

    def _place(self, device: torch.device, prec: Precision) -> None:
        self.to(device=device, dtype=prec.dtype)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def autocast(self):
        return autocast_context(self.device, self.precision.autocast)

    def encode_image(self, pixels: Tensor) -> Tensor:
        """The backbone's image features of preprocessed ``pixels``: through the compiled encoder
        when there is one (in batches of at most its largest compiled batch), else eager torch
        under :meth:`autocast`."""
        if self._compiled is not None:
            module, max_batch = self._compiled
            return torch.cat([module(p) for p in pixels.split(max_batch)])
        with self.autocast():
            return self.backbone.encode_image(pixels)

    def set_compiled(self, module, max_batch: int, backend: str) -> None:
        """Score images through ``module`` (``pixels [<= max_batch, 3, S, S] -> features``); a
        compiled engine keeps no autograd graph, so the reward is no longer differentiable."""
        self._compiled, self.backend, self.differentiable = (module, int(max_batch)), backend, False

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.clear_cache()                   # cached features live on the old device / dtype
        if self._compiled is not None:       # an engine built for the old placement: back to eager
            self._compiled, self.backend = None, "eager"
            self.differentiable = type(self).differentiable
        return self

    def clear_cache(self) -> None:
        pass


class ClipScoreReward(ModelReward):
    """``[logit_scale *] cos(image_emb, text_emb)`` per (image, prompt) pair; differentiable in the images.

    Text embeddings are cached per prompt (the encoder is frozen; GRPO groups repeat prompts), on
    the model's device in float32; moving the model clears the cache.
    """

    differentiable = True

    def __init__(self, name: str, backbone: ClipBackbone, scale_by_logit: bool, device=None,
                 dtype: torch.dtype | None = None, autocast: torch.dtype | None = None):
        super().__init__()
        self._text_cache: dict[str, Tensor] = {}
        self.name, self.backbone, self.scale_by_logit = name, backbone, scale_by_logit
        self.place(device, dtype, autocast)

    def clear_cache(self) -> None:
        if hasattr(self, "_text_cache"):
            self._text_cache.clear()

    def text_features(self, prompts: list[str]) -> Tensor:
        todo = list(dict.fromkeys(p for p in prompts if p not in self._text_cache))
        if todo:
            if len(self._text_cache) + len(todo) > TEXT_CACHE_MAX:
                self._text_cache.clear()
            with torch.no_grad(), self.autocast():
                feats = F.normalize(self.backbone.encode_text(todo).float(), dim=-1)
            self._text_cache.update(zip(todo, feats))
        return torch.stack([self._text_cache[p] for p in prompts])

    def image_features(self, images: Tensor) -> Tensor:
        return F.normalize(self.encode_image(self.backbone.preprocess(images)).float(), dim=-1)

    def forward(self, images: Tensor, prompts: list[str] | None = None, metadata=None) -> Tensor:
        check_images(images, self.name)
        if prompts is None or len(prompts) != images.shape[0]:
            got = "none" if prompts is None else len(prompts)
            raise RewardError(f"reward '{self.name}' needs one prompt per image ({images.shape[0]}), got {got}")
        cos = (self.image_features(images) * self.text_features(list(prompts))).sum(-1)   # on the model's device
        if self.scale_by_logit:
            cos = self.backbone.logit_scale() * cos
        return cos.to(device=images.device, dtype=torch.float32)


class AestheticHead(nn.Module):
    """The improved-aesthetic-predictor MLP: Linear, Dropout(0.2), Linear, Dropout(0.2), Linear,
    Dropout(0.1), Linear, Linear -- no activations (their ReLUs are commented out). The layer
    indices match the published state dict (``layers.0/2/4/6/7``); sizes 768-1024-128-64-16-1
    there, read from the weights here so tiny test heads load too. Input: L2-normalised embedding."""

    LINEAR_IDX = (0, 2, 4, 6, 7)

    def __init__(self, sizes=(768, 1024, 128, 64, 16, 1)):
        super().__init__()
        s = sizes
        self.layers = nn.Sequential(nn.Linear(s[0], s[1]), nn.Dropout(0.2), nn.Linear(s[1], s[2]), nn.Dropout(0.2),
                                    nn.Linear(s[2], s[3]), nn.Dropout(0.1), nn.Linear(s[3], s[4]), nn.Linear(s[4], s[5]))

    @classmethod
    def from_state_dict(cls, sd: dict, who: str = "aesthetic") -> "AestheticHead":
        want = {f"layers.{i}.{k}" for i in cls.LINEAR_IDX for k in ("weight", "bias")}
        missing = sorted(want - set(sd))
        if missing:
            raise RewardError(f"reward '{who}': head weights lack {missing[:3]} (expected layers.0/2/4/6/7 weight+bias)")
        ws = [sd[f"layers.{i}.weight"] for i in cls.LINEAR_IDX]
        sizes = [ws[0].shape[1]] + [w.shape[0] for w in ws]
        if any(ws[k].shape[1] != ws[k - 1].shape[0] for k in range(1, 5)) or sizes[-1] != 1:
            raise RewardError(f"reward '{who}': head layer shapes do not chain to one output: {[tuple(w.shape) for w in ws]}")
        head = cls(sizes)
        head.load_state_dict({k: sd[k].float() for k in want})
        return head.eval().requires_grad_(False)

    def forward(self, emb: Tensor) -> Tensor:
        # improved-aesthetic-predictor ``normalized()``: divide by the L2 norm (a zero norm stays 0)
        e = emb / torch.linalg.vector_norm(emb, dim=-1, keepdim=True).clamp_min(1e-12)
        return self.layers(e).squeeze(-1)


def load_head(d: Path, who: str = "aesthetic") -> AestheticHead:
    path = next((d / n for n in AESTHETIC_HEADS if (d / n).exists()), None)
    if path is None:
        raise RewardError(f"reward '{who}': missing file '{d / AESTHETIC_HEADS[0]}' (or {AESTHETIC_HEADS[1]})")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            sd = load_file(str(path))
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise RewardError(one_line(f"reward '{who}': cannot read '{path}': {type(e).__name__}: {e}")) from None
    return AestheticHead.from_state_dict(sd, who)


class AestheticReward(ModelReward):
    """LAION aesthetic score of each image (prompts ignored); differentiable in the images.
    The CLIP backbone takes the placement's dtype, the MLP head stays float32."""

    name = "aesthetic"
    differentiable = True

    def __init__(self, directory, device=None, dtype: torch.dtype | None = None, autocast: torch.dtype | None = None):
        super().__init__()
        check_device(device, self.name)      # before any weights load
        d = _dir(directory, self.name)
        clip_dir = d / "clip" if (d / "clip" / "config.json").exists() else d
        self.head = load_head(d)
        self.backbone = HFClip(load_clip_model(clip_dir, self.name))
        dim = self.backbone.model.config.projection_dim
        if self.head.layers[0].in_features != dim:
            raise RewardError(f"reward 'aesthetic': head input {self.head.layers[0].in_features} != CLIP projection {dim}")
        self.place(device, dtype, autocast)

    def _place(self, device: torch.device, prec: Precision) -> None:
        self.to(device=device)
        self.backbone.to(dtype=prec.dtype)
        self.head.to(dtype=torch.float32)

    def forward(self, images: Tensor, prompts=None, metadata=None) -> Tensor:
        check_images(images, self.name)
        e = self.encode_image(self.backbone.preprocess(images))
        return self.head(e.float()).to(device=images.device, dtype=torch.float32)


def pickscore(directory, device=None, dtype: torch.dtype | None = None,
              autocast: torch.dtype | None = None) -> ClipScoreReward:
    """PickScore_v1 on ``device`` (see :meth:`ModelReward.place` for ``dtype`` / ``autocast``)."""
    check_device(device, "pickscore")
    d = _dir(directory, "pickscore")
    backbone = HFClip(load_clip_model(d, "pickscore"), load_tokenizer(d, "pickscore"))
    return ClipScoreReward("pickscore", backbone, scale_by_logit=True, device=device, dtype=dtype, autocast=autocast)


def hps(directory, device=None, dtype: torch.dtype | None = None, autocast: torch.dtype | None = None) -> ClipScoreReward:
    """HPSv2.1 on ``device`` (see :meth:`ModelReward.place` for ``dtype`` / ``autocast``)."""
    check_device(device, "hps")
    d = _dir(directory, "hps")
    if (d / "config.json").exists():
        backbone = HFClip(load_clip_model(d, "hps"), load_tokenizer(d, "hps"))
    elif (d / HPS_CHECKPOINT).exists():
        backbone = _open_clip_hps(d / HPS_CHECKPOINT)
    else:
        raise RewardError(f"reward 'hps': missing file '{d / 'config.json'}' (a transformers CLIPModel) or '{d / HPS_CHECKPOINT}'")
    return ClipScoreReward("hps", backbone, scale_by_logit=False, device=device, dtype=dtype, autocast=autocast)


def _open_clip_hps(ckpt: Path) -> OpenClip:
    """HPSv2.1 through open_clip (HPSv2 score.py: ``create_model_and_transforms('ViT-H-14', ...)``,
    then ``load_state_dict(checkpoint['state_dict'])``). Not exercised here: open_clip is absent."""
    try:
        import open_clip
    except ImportError:
        raise RewardError(f"reward 'hps': '{ckpt.name}' is an open_clip checkpoint and needs the 'open_clip_torch' "
                          f"package (pip install open_clip_torch), or a transformers CLIPModel directory") from None
    try:
        model = open_clip.create_model("ViT-H-14", pretrained=None)
        state = torch.load(str(ckpt), map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("state_dict", state))
        tokenizer = open_clip.get_tokenizer("ViT-H-14")
    except Exception as e:  # noqa: BLE001
        raise RewardError(one_line(f"reward 'hps': cannot load '{ckpt}': {type(e).__name__}: {e}")) from None
    return OpenClip(model.eval().requires_grad_(False), tokenizer)


def compile_tensorrt(module: nn.Module, example_inputs, **kwargs):
    """Compile a frozen reward model with torch-tensorrt (CUDA only; the result has no gradients,
    so use it for zeroth-order rewards). One-line :class:`RewardError` without ``torch_tensorrt``."""
    try:
        import torch_tensorrt
    except ImportError:
        raise RewardError("compile_tensorrt needs the 'torch_tensorrt' package (pip install torch-tensorrt; "
                          "CUDA only), which is not installed") from None
    module = module.eval().requires_grad_(False)
    return torch_tensorrt.compile(module, ir="dynamo", inputs=list(example_inputs), **kwargs)
