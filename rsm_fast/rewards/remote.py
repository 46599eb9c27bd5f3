"""Client for a reward living in another process (a GenEval / LLaVA-style reward server).

Wire format (JSON, UTF-8), one POST per batch::

    request : {"images": ["<base64 PNG>", ...], "prompts": [...] | null, "metadata": [...] | null}
    response: {"scores": [float, ...]}            # exactly one finite number per image

Standard library only (``urllib``). Transient faults -- timeout, connection refused/reset, HTTP
5xx and 429 -- are retried ``retries`` times with exponential backoff (``backoff * 2**k`` s);
everything else fails at once. Every failure is a one-line :class:`RewardError` naming the URL.
"""
from __future__ import annotations

import base64
import http.client
import io
import json
import math
import socket
import time
import urllib.error
import urllib.request

import torch
from torch import Tensor

from .base import RewardError, check_images, one_line, to_pil


def encode_png(images: Tensor) -> list[str]:
    """Base64 PNG of each image (lossless; uint8 rounding as :func:`~.base.to_uint8_hwc`)."""
    out = []
    for im in to_pil(images):
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        out.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    return out


class _Transient(Exception):
    """A fault worth retrying (carries its one-line description)."""


class HttpReward:
    """``POST`` the batch to ``url`` and read ``{"scores": [...]}``. Not differentiable."""

    differentiable = False

    def __init__(self, url: str, *, timeout: float = 60.0, retries: int = 2, backoff: float = 0.5,
                 name: str | None = None):
        if not url.startswith(("http://", "https://")):
            raise RewardError(f"reward server URL must start with http:// or https://, got '{url}'")
        if timeout <= 0 or retries < 0 or backoff < 0:
            raise ValueError("timeout must be > 0, retries and backoff >= 0")
        self.url, self.timeout, self.retries, self.backoff = url, float(timeout), int(retries), float(backoff)
        self.name = name or url
        self.attempts = 0          # attempts made by the last call (for logs and tests)

    def payload(self, images: Tensor, prompts, metadata) -> bytes:
        body = {"images": encode_png(images), "prompts": None if prompts is None else list(prompts),
                "metadata": None if metadata is None else list(metadata)}
        try:
            return json.dumps(body, allow_nan=False).encode("utf-8")
        except (TypeError, ValueError) as e:
            raise RewardError(one_line(f"reward server {self.url}: prompts/metadata are not JSON-serialisable ({e})")) from None

    def __call__(self, images: Tensor, prompts=None, metadata=None) -> Tensor:
        check_images(images, self.name)
        data = self.payload(images, prompts, metadata)
        last = ""
        for k in range(self.retries + 1):
            self.attempts = k + 1
            if k:
                time.sleep(self.backoff * 2 ** (k - 1))
            try:
                body = self._post(data)
            except _Transient as e:
                last = str(e)
                continue
            return self._parse(body, images.shape[0]).to(images.device)
        raise RewardError(f"reward server {self.url}: {last} (after {self.retries + 1} attempts)")

    def _post(self, data: bytes) -> bytes:
        req = urllib.request.Request(self.url, data=data, method="POST",
                                     headers={"Content-Type": "application/json", "Accept": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return resp.read()
        except urllib.error.HTTPError as e:
            detail = one_line(e.read()[:120].decode("utf-8", "replace"), 120) if e.fp else ""
            msg = f"HTTP {e.code} {e.reason}" + (f": {detail}" if detail else "")
            if e.code >= 500 or e.code == 429:
                raise _Transient(msg) from None
            raise RewardError(f"reward server {self.url}: {msg}") from None
        except urllib.error.URLError as e:
            raise _Transient(self._describe(e.reason)) from None
        except (OSError, http.client.HTTPException) as e:   # raised while reading (timeout, reset, truncated)
            raise _Transient(self._describe(e)) from None

    def _describe(self, err) -> str:
        if isinstance(err, (TimeoutError, socket.timeout)):
            return f"timed out after {self.timeout:g} s"
        if isinstance(err, ConnectionRefusedError):
            return "connection refused (is the reward server running?)"
        return one_line(f"connection failed: {type(err).__name__}: {err}", 160)

    def _parse(self, body: bytes, batch: int) -> Tensor:
        try:
            obj = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            head = one_line(body[:60].decode("utf-8", "replace"), 60)
            raise RewardError(f"reward server {self.url}: response is not JSON (starts with {head!r})") from None
        scores = obj.get("scores") if isinstance(obj, dict) else None
        if not isinstance(scores, list):
            raise RewardError(f"reward server {self.url}: response has no 'scores' list")
        if len(scores) != batch:
            raise RewardError(f"reward server {self.url}: returned {len(scores)} scores for {batch} images")
        if not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores):
            raise RewardError(f"reward server {self.url}: 'scores' holds non-numbers")
        n_bad = sum(not math.isfinite(s) for s in scores)
        if n_bad:
            raise RewardError(f"reward server {self.url}: returned NaN/inf for {n_bad} of {batch} images")
        return torch.tensor(scores, dtype=torch.float32)
