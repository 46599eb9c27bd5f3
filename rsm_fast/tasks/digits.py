"""A digits task we can really train (issue 5, item 6): class-conditional 16x16 digit generators.

Data: scikit-learn's bundled 8x8 digits (``load_digits``, 1797 images, pixel values 0..16),
upsampled to 16x16 (bilinear), scaled to [-1, 1], 1 channel; a fixed stratified split of 20 %
held out (:func:`load_digits_split`).

Generators (``diffusers.UNet2DModel``, ``num_class_embeds=11``: digits 0-9 plus the null class 10
used for classifier-free guidance; trained with 10 % label dropout to the null class):

* ``family="ddim"``: DDPM epsilon prediction on a VP schedule with 1000 train steps and Ho et
  al.'s linear betas 1e-4 .. 0.02 (the pixel-space DDPM schedule; ``schedules.ddpm_linear_alphas_cumprod``.
  Its terminal alpha_bar is 4e-5, so starting the sampler from N(0, I) is accurate; SD's
  scaled-linear schedule is tuned for 64x64 latents, cosine would need a new helper).
  Sampled by DDIM on the "trailing" timesteps 999, 949, ..., 49 and then to alpha_bar = 1 (the
  toy's convention; diffusers ``timestep_spacing="trailing"``, ``set_alpha_to_one=True``).
* ``family="flow"``: rectified flow ``x_t = (1 - t) x0 + t eps`` with velocity ``v = eps - x0``
  (``schedules`` kind ``"v"``; the Euler step of ``transitions`` is ``x' = x - v (t - t')``, the
  same as diffusers' ``FlowMatchEulerDiscreteScheduler``), times ``rf_sigmas(N, shift=1)``:
  resolution shift 1 because 16x16 is far below the resolutions shift > 1 is meant for.

Model adapter (rollout-engine convention): ``task.model_fn(unet)(x [C,1,16,16], t [C], cond [C])``
where ``cond`` is a ``[C]`` long tensor of class labels (10 = null, also used when ``cond`` is
None) and ``t`` the transition's ``t`` value: VP train index, fed to the UNet as is; RF ``t`` in
[0, 1], fed as ``1000 t`` (diffusers' ``timestep = sigma * num_train_timesteps``). ``x`` is cast to
the UNet's weight dtype on entry (``build_model(dtype=...)``: bf16 / fp16 weights) and the output
back to ``x``'s dtype (float32 in the engine); ``autocast`` wraps the forward in ``torch.autocast``.

Rewards (``digits_reward``) use the small CNN :class:`DigitClassifier` trained on the train split.
Checkpoints: ``rsm_fast/assets/digits/{ddpm,flow,classifier}.safetensors`` (configs in each
file's metadata; provenance and metrics in ``digits.json`` and its README), reproduced by
``python -m rsm_fast.tasks.digits_pretrain``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import schedules as S
from ..transitions import GaussianTransition, ddim, flow_grpo_sde, flow_ode

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "digits"
NUM_CLASSES = 10
NULL_LABEL = 10                 # the classifier-free-guidance "no label" class
SIZE = 16
NUM_TRAIN_TIMESTEPS = 1000
HELDOUT_FRACTION = 0.2
SPLIT_SEED = 0
FAMILIES = ("ddim", "flow")

# The generators' architecture (both families): ~0.2 M parameters, attention at 8x8 (down block 1,
# mid block, up block 0) whose projections are named to_q / to_k / to_v / to_out.0 (peft LoRA targets).
UNET_CONFIG = dict(
    sample_size=SIZE, in_channels=1, out_channels=1, layers_per_block=1,
    block_out_channels=(16, 32), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=16,
    num_class_embeds=NUM_CLASSES + 1,
)
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------
def load_digits_images() -> tuple[Tensor, Tensor]:
    """All 1797 digits as ``[N, 1, 16, 16]`` float32 in [-1, 1] and their labels ``[N]`` long."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.as_tensor(d.images, dtype=torch.float32)[:, None] / 16.0          # [N, 1, 8, 8] in [0, 1]
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)  # convex: stays in [0, 1]
    return (x * 2.0 - 1.0).clamp(-1.0, 1.0), torch.as_tensor(d.target, dtype=torch.long)


def split_indices(labels: Tensor, fraction: float = HELDOUT_FRACTION, seed: int = SPLIT_SEED) -> tuple[Tensor, Tensor]:
    """Stratified split: per class, a seeded permutation; its first ``round(fraction n_c)`` held out.
    Returns sorted ``(train_idx, heldout_idx)``."""
    g = torch.Generator().manual_seed(seed)
    train, held = [], []
    for c in range(int(labels.max()) + 1):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        k = int(round(fraction * idx.numel()))
        held.append(idx[:k])
        train.append(idx[k:])
    return torch.cat(train).sort().values, torch.cat(held).sort().values


def load_digits_split() -> dict[str, Tensor]:
    """``{"train_x", "train_y", "heldout_x", "heldout_y"}`` (images in [-1, 1])."""
    x, y = load_digits_images()
    tr, ho = split_indices(y)
    return {"train_x": x[tr], "train_y": y[tr], "heldout_x": x[ho], "heldout_y": y[ho]}


def split_checksum(idx: Tensor) -> int:
    """An order-sensitive checksum of an index set (recorded in digits.json; the test compares it)."""
    v = idx.to(torch.int64)
    return int(((v + 1) * (torch.arange(v.numel()) % 9973 + 1)).sum())


# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------
def make_unet(config: dict | None = None):
    from diffusers import UNet2DModel

    return UNet2DModel(**(config or UNET_CONFIG))


class DigitClassifier(nn.Module):
    """A small CNN on 16x16 images **in [0, 1]** (the reward space) -> 10 logits.

    Smooth everywhere (SiLU, strided convolutions, no max-pooling), so its log-probabilities are
    differentiable rewards and gradcheck cleanly in float64."""

    def __init__(self, width: int = 16):
        super().__init__()
        w = width
        self.net = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.SiLU(),
            nn.Conv2d(w, w, 3, padding=1, stride=2), nn.SiLU(),            # 8x8
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.SiLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1, stride=2), nn.SiLU(),    # 4x4
            nn.Flatten(), nn.Dropout(0.2), nn.Linear(2 * w * 16, NUM_CLASSES),
        )
        self.config = {"width": width}

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images * 2.0 - 1.0)


def save_checkpoint(module: nn.Module, path: Path | str, config: dict, extra: dict | None = None) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().to(torch.float32).contiguous().cpu() for k, v in module.state_dict().items()}
    meta = {"config": json.dumps(config, sort_keys=True)}
    if extra:
        meta.update({k: json.dumps(v, sort_keys=True) for k, v in extra.items()})
    save_file(state, str(path), metadata=meta)


def read_checkpoint(path: Path | str) -> tuple[dict[str, Tensor], dict]:
    """State dict and the JSON-decoded metadata of a shipped checkpoint."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
    return load_file(str(path)), meta


def _config_from_meta(cfg: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}


def load_unet(path: Path | str, device="cpu", dtype=torch.float32):
    """The shipped UNet in ``dtype`` (built on the meta device and given the checkpoint's tensors, cast
    once: no float32 module is built first)."""
    state, meta = read_checkpoint(path)
    with torch.device("meta"):
        unet = make_unet(_config_from_meta(meta["config"]))
    unet.load_state_dict({k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
                          for k, v in state.items()}, assign=True)
    if any(t.is_meta for t in (*unet.parameters(), *unet.buffers())):   # (nothing outside the state dict today)
        raise RuntimeError(f"{path}: the checkpoint does not hold every tensor of the UNet")
    return unet.eval()


def load_classifier(path: Path | str | None = None, device="cpu") -> DigitClassifier:
    """The shipped classifier, in eval mode, parameters frozen."""
    state, meta = read_checkpoint(path or ASSETS / "classifier.safetensors")
    clf = DigitClassifier(**meta["config"])
    clf.load_state_dict(state)
    clf.requires_grad_(False)
    return clf.to(device).eval()


# ------------------------------------------------------------------------------------------------
# Samplers (schedules / transitions of each family)
# ------------------------------------------------------------------------------------------------
def vp_alphas_cumprod() -> Tensor:
    return S.ddpm_linear_alphas_cumprod(NUM_TRAIN_TIMESTEPS)


def vp_timesteps(num_steps: int) -> Tensor:
    """Trailing DDIM indices ``999, 949, ..., 49`` for 20 steps (``ddim_timesteps`` with offset ratio - 1)."""
    ratio = NUM_TRAIN_TIMESTEPS // num_steps
    return S.ddim_timesteps(NUM_TRAIN_TIMESTEPS, num_steps, offset=ratio - 1)


def make_transition(family: str, num_steps: int, eta: float = 1.0, noise_level: float = 0.7,
                    shift: float = 1.0) -> GaussianTransition:
    """``ddim``: DDIM(eta) over :func:`vp_timesteps`, ending at alpha_bar = 1; ``flow``: Flow-GRPO SDE
    with ``noise_level`` over ``rf_sigmas(num_steps, shift)`` (``noise_level=0``: the Euler ODE)."""
    if family == "ddim":
        return ddim(vp_alphas_cumprod(), vp_timesteps(num_steps), eta=eta, final_alpha_cumprod=1.0)
    if family == "flow":
        sig = S.rf_sigmas(num_steps, shift=shift, num_train_timesteps=NUM_TRAIN_TIMESTEPS)
        return flow_ode(sig) if noise_level == 0 else flow_grpo_sde(sig, noise_level)
    raise ValueError(f"digits family must be one of {FAMILIES}, got {family!r}")


def unet_timestep(family: str, t: Tensor) -> Tensor:
    """The UNet's timestep input for the transition's ``t`` value (VP: as is; RF: ``1000 t``)."""
    return t if family == "ddim" else t * NUM_TRAIN_TIMESTEPS


def make_model_fn(unet, family: str, autocast: torch.dtype | None = None):
    """``(x [C,1,16,16], t [C], cond [C] long | None) -> native output [C,1,16,16]`` in ``x``'s dtype
    (the UNet runs in its weight dtype, under ``torch.autocast(autocast)`` when given)."""
    from ..models.runtime import autocast as autocast_ctx

    if family not in FAMILIES:
        raise ValueError(f"digits family must be one of {FAMILIES}, got {family!r}")
    weight = unet.conv_in.weight              # a base weight: its dtype is the model's (LoRA adds fp32 ones)

    def model(x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        labels = (torch.full((x.shape[0],), NULL_LABEL, dtype=torch.long, device=x.device) if cond is None
                  else cond.reshape(x.shape[0]).to(device=x.device, dtype=torch.long))
        ts = unet_timestep(family, t.to(x.device)).to(torch.float32)
        with autocast_ctx(x.device, autocast):
            out = unet(x.to(weight.dtype), ts, class_labels=labels).sample
        return out.to(x.dtype)

    return model


@torch.no_grad()
def sample(model_fn, transition: GaussianTransition, labels: Tensor, x_init: Tensor, gen: torch.Generator | None = None,
           cfg_scale: float | None = None, stochastic: bool = True) -> Tensor:
    """A plain reference loop over ``transition`` (the engine's math, CFG ``f_u + w (f_c - f_u)``).

    ``stochastic=False`` takes every step with the ODE coefficients; noise ``z`` comes from ``gen``."""
    x = x_init
    B = x.shape[0]
    null = torch.full_like(labels, NULL_LABEL)
    for i in range(transition.num_steps):
        c = transition.coeffs_at(i, B, device=x.device, stochastic=stochastic)
        t = c.t.to(x.dtype)
        if cfg_scale is None:
            f = model_fn(x, t, labels)
        else:
            both = model_fn(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null]))
            f_c, f_u = both[:B], both[B:]
            f = f_u + cfg_scale * (f_c - f_u)
        z = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype) if stochastic else torch.zeros_like(x)
        x = c.step(x, f, z).to(x.dtype)
    return x


def decode(x0: Tensor) -> Tensor:
    """Latents in [-1, 1] -> images in [0, 1] ``[B, 1, 16, 16]`` (clamped, as diffusers' pipelines)."""
    return (x0 * 0.5 + 0.5).clamp(0.0, 1.0)


@torch.no_grad()
def class_agreement(classifier: DigitClassifier, images: Tensor, labels: Tensor) -> float:
    """Fraction of images (in [0, 1]) the classifier assigns to their requested label."""
    pred = classifier(images.to(torch.float32)).argmax(1)
    return float((pred == labels.to(pred.device)).to(torch.float32).mean())


# ------------------------------------------------------------------------------------------------
# The task
# ------------------------------------------------------------------------------------------------
class Digits:
    """Class-conditional 16x16 digits with a shipped pretrained generator (see the module docstring).

    Defaults: 20 steps; ``ddim`` rolls out with DDIM eta = 1 (DDPO / PCPO / RSM SD1.5: spec §2.2,
    §11), ``flow`` with the Flow-GRPO SDE at noise level 0.7 (SD3.5-M's, spec §2.3, §11); both
    with CFG scale 3 (class agreement measured in assets/digits/README.md).
    """

    latent_shape = (1, SIZE, SIZE)
    num_classes = NUM_CLASSES
    null_label = NULL_LABEL
    lora_targets = LORA_TARGETS

    def __init__(self, family: str = "ddim", num_steps: int = 20, *, eta: float = 1.0, noise_level: float = 0.7,
                 shift: float = 1.0, cfg_scale: float | None = 3.0, assets: Path | str | None = None):
        if family not in FAMILIES:
            raise ValueError(f"digits family must be one of {FAMILIES}, got {family!r}")
        if num_steps <= 0 or num_steps > NUM_TRAIN_TIMESTEPS:
            raise ValueError(f"digits num_steps must be in [1, {NUM_TRAIN_TIMESTEPS}], got {num_steps}")
        self.family, self.num_steps, self.cfg_scale = family, int(num_steps), cfg_scale
        self.eta, self.noise_level, self.shift = float(eta), float(noise_level), float(shift)
        self.name = f"digits_{family}"
        self.native = "eps" if family == "ddim" else "v"
        self.assets = Path(assets) if assets is not None else ASSETS
        self.checkpoint = self.assets / ("ddpm.safetensors" if family == "ddim" else "flow.safetensors")
        self.transition = make_transition(family, num_steps, eta=eta, noise_level=noise_level, shift=shift)
        # the deterministic sampler on the same grid (evaluation, the equivalence tests)
        self.ode_transition = make_transition(family, num_steps, eta=0.0, noise_level=0.0, shift=shift)

    # -- models -----------------------------------------------------------------------------------
    def build_model(self, device="cpu", dtype=torch.float32):
        """The pretrained ``UNet2DModel`` (in ``dtype``, default float32; eval mode, parameters trainable)."""
        return load_unet(self.checkpoint, device, dtype)

    def model_fn(self, unet, autocast: torch.dtype | None = None):
        return make_model_fn(unet, self.family, autocast)

    def build_classifier(self, device="cpu") -> DigitClassifier:
        return load_classifier(self.assets / "classifier.safetensors", device)

    @property
    def uncond(self) -> Tensor:
        """The null-class label ``[1]`` (the engine's ``uncond`` for CFG)."""
        return torch.tensor([NULL_LABEL], dtype=torch.long)

    # -- conditions -------------------------------------------------------------------------------
    def conditions(self, n: int, gen: torch.Generator | None = None) -> Tensor:
        """``n`` prompt groups: uniformly drawn digit labels ``[n]`` long."""
        return torch.randint(0, NUM_CLASSES, (n,), generator=gen, dtype=torch.long)

    @staticmethod
    def prompts(labels: Tensor) -> list[str]:
        return [f"digit {int(v)}" for v in labels.reshape(-1).tolist()]

    @staticmethod
    def metadata(labels: Tensor) -> list[dict]:
        return [{"label": int(v)} for v in labels.reshape(-1).tolist()]

    # -- sampling -----------------------------------------------------------------------------------
    def sample_initial(self, n: int, gen: torch.Generator | None = None, dtype=torch.float32) -> Tensor:
        return torch.randn((n, *self.latent_shape), generator=gen, dtype=dtype)

    def decode(self, x0: Tensor) -> Tensor:
        return decode(x0)

    def sample(self, unet, labels: Tensor, gen: torch.Generator | None = None, cfg_scale: float | str | None = "task",
               stochastic: bool = True) -> Tensor:
        """Images in [0, 1] for ``labels`` by the plain loop (``cfg_scale="task"``: the task's)."""
        w = self.cfg_scale if cfg_scale == "task" else cfg_scale
        tr = self.transition if stochastic else self.ode_transition
        x = self.sample_initial(labels.shape[0], gen)
        return decode(sample(self.model_fn(unet), tr, labels, x, gen, w, stochastic))

    # -- evaluation ---------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, images: Tensor, labels: Tensor) -> dict:
        """Against the requested ``labels``: ``class_agreement`` (classifier argmax == label) and
        ``label_logprob`` (mean classifier log-probability of the label) of images in [0, 1]."""
        if getattr(self, "_classifier", None) is None:
            self._classifier = self.build_classifier()
        lp = torch.log_softmax(self._classifier(images.to(torch.float32).cpu()), dim=1)
        lab = labels.reshape(-1).cpu()
        return {"class_agreement": float((lp.argmax(1) == lab).to(torch.float32).mean()),
                "label_logprob": float(lp.gather(1, lab[:, None]).mean())}
