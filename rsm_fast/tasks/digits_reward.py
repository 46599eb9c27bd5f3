"""Rewards of the digits task: the shipped digit classifier's log-probabilities.

Protocol (duck-typed): ``name: str``, ``differentiable: bool`` and
``__call__(images [B, C, 16, 16] in [0, 1], prompts=None, metadata=None) -> Tensor [B]``.
The output is float32 (float64 when the images are float64: that is what gradcheck needs);
``C`` may be 1 or 3 (3 channels are averaged to grey).

* :class:`DigitLogProb` ``(target)``: ``log p(target | image)``, differentiable in the images.
* :class:`DigitScore` ``(target)``: the same number as a black box (no autograd graph).
* :class:`DigitLabelLogProb`: ``log p(requested label | image)`` per sample, the label read from
  ``metadata[i]["label"]`` (or, without metadata, from prompts ``"digit 3"``).

Device and precision: by default the classifier runs where the images are (the task builds it on
``train.device``), in float32. ``reward.place(device, dtype)`` pins it to ``device`` with weights
in ``dtype`` (e.g. bfloat16 on a GPU); float64 images always get a float64 copy (gradcheck), and
the log-softmax is taken in float32 (float64) whatever the weights' dtype.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .digits import NUM_CLASSES, SIZE, DigitClassifier, load_classifier


class _ClassifierReward:
    """Holds the frozen classifier and one cached copy per (device, dtype)."""

    differentiable = True

    def __init__(self, classifier: DigitClassifier | None = None):
        self._base = classifier if classifier is not None else load_classifier()
        self._base.requires_grad_(False).eval()
        self._copies: dict[tuple[str, torch.dtype], DigitClassifier] = {}
        self.device: torch.device | None = None      # None: wherever the images are
        self.dtype: torch.dtype | None = None        # None: float32

    def place(self, device=None, dtype: torch.dtype | None = None):
        """Run the classifier on ``device`` (None: cpu) with weights in ``dtype`` (None: float32).
        Scores still come back on the images' device, float32 (float64 for float64 images)."""
        from ..rewards.device import check_device

        dev = check_device(device, getattr(self, "name", "digits"))
        self._copies.clear()          # copies are made from the base weights, which stay where they are
        self.device, self.dtype = dev, dtype     # (the task shares that module: it is never moved here)
        return self

    def _classifier(self, like: Tensor) -> DigitClassifier:
        dtype = torch.float64 if like.dtype == torch.float64 else (self.dtype or torch.float32)
        device = self.device if self.device is not None else like.device
        key = (str(device), dtype)
        clf = self._copies.get(key)
        if clf is None:
            p = next(self._base.parameters())
            clf = self._base if (p.device == device and p.dtype == dtype) else \
                DigitClassifier(**self._base.config).to(device, dtype)
            if clf is not self._base:
                clf.load_state_dict(self._base.state_dict())
                clf.requires_grad_(False).eval()
            self._copies[key] = clf
        return clf

    def log_probs(self, images: Tensor) -> Tensor:
        """``[B, 10]`` log-probabilities (float32, float64 for float64 images)."""
        if images.dim() != 4 or images.shape[-2:] != (SIZE, SIZE) or images.shape[1] not in (1, 3):
            raise ValueError(f"digit rewards take images [B, 1 or 3, {SIZE}, {SIZE}] in [0, 1], got {tuple(images.shape)}")
        x = images if images.dtype in (torch.float32, torch.float64) else images.to(torch.float32)
        if x.shape[1] == 3:
            x = x.mean(1, keepdim=True)
        clf = self._classifier(x)
        p = next(clf.parameters())
        logits = clf(x.to(device=p.device, dtype=p.dtype))
        return torch.log_softmax(logits.to(x.dtype), dim=1).to(images.device)


class DigitLogProb(_ClassifierReward):
    """Differentiable ``log p_classifier(target | image)``."""

    def __init__(self, target: int, classifier: DigitClassifier | None = None):
        if not 0 <= int(target) < NUM_CLASSES:
            raise ValueError(f"digit reward target must be in 0..{NUM_CLASSES - 1}, got {target}")
        super().__init__(classifier)
        self.target = int(target)
        self.name = f"digit_logprob_{self.target}"

    def __call__(self, images: Tensor, prompts=None, metadata=None) -> Tensor:
        return self.log_probs(images)[:, self.target]


class DigitScore(DigitLogProb):
    """The same value as :class:`DigitLogProb`, as a black box: no gradient flows."""

    differentiable = False

    def __init__(self, target: int, classifier: DigitClassifier | None = None):
        super().__init__(target, classifier)
        self.name = f"digit_score_{self.target}"

    def __call__(self, images: Tensor, prompts=None, metadata=None) -> Tensor:
        with torch.no_grad():
            return super().__call__(images.detach()).detach()


def labels_from(n: int, prompts: Sequence[str] | None, metadata) -> Tensor:
    """Requested labels ``[n]`` from ``metadata`` (a list of ``{"label": int}``, a ``{"label": [n]}``
    dict or a label tensor) or else from prompts ``"digit 3"``."""
    if metadata is not None:
        if isinstance(metadata, Tensor):
            lab = metadata
        elif isinstance(metadata, dict):
            lab = torch.as_tensor(metadata["label"])
        else:
            lab = torch.tensor([int(m["label"]) for m in metadata])
    elif prompts is not None:
        try:
            lab = torch.tensor([int(p.strip().split()[-1]) for p in prompts])
        except (ValueError, IndexError):
            raise ValueError(f"digit label reward: cannot read a label from prompts like {prompts[:1]!r} "
                             "(expected 'digit 3')") from None
    else:
        raise ValueError("digit label reward needs metadata labels (or prompts 'digit N')")
    lab = lab.reshape(-1).to(torch.long)
    if lab.shape[0] != n:
        raise ValueError(f"digit label reward: {lab.shape[0]} labels for {n} images")
    if bool(((lab < 0) | (lab >= NUM_CLASSES)).any()):
        raise ValueError(f"digit label reward: labels must be in 0..{NUM_CLASSES - 1}")
    return lab


class DigitLabelLogProb(_ClassifierReward):
    """Per-sample label agreement: ``log p_classifier(label_i | image_i)``, differentiable."""

    name = "digit_label_logprob"

    def __call__(self, images: Tensor, prompts=None, metadata=None) -> Tensor:
        lab = labels_from(images.shape[0], prompts, metadata).to(images.device)
        return self.log_probs(images).gather(1, lab[:, None]).squeeze(1)


def make_reward(spec: str, classifier: DigitClassifier | None = None):
    """``"digit_logprob:3"``, ``"digit_score:3"`` or ``"digit_label_logprob"``."""
    kind, _, arg = spec.partition(":")
    if kind == "digit_label_logprob" and not arg:
        return DigitLabelLogProb(classifier)
    if kind in ("digit_logprob", "digit_score") and arg.strip().isdigit():
        cls = DigitLogProb if kind == "digit_logprob" else DigitScore
        return cls(int(arg), classifier)
    raise ValueError(f"digit reward spec must be 'digit_logprob:N', 'digit_score:N' or 'digit_label_logprob', got {spec!r}")
