"""Client for a reward living in another process (a GenEval / LLaVA-style reward server).

Wire format (JSON, UTF-8), one POST per batch::

    request : {"images": ["<base64 PNG>", ...], "prompts": [...] | null, "metadata": [...] | null}
    response: {"scores": [float, ...]}            # exactly one finite number per image

Standard library only (``http.client``, ``ssl``). Limits, all one-line :class:`RewardError`s:

* **one total deadline** ``timeout`` (s) over connect, TLS handshake, send, every read, every
  retry and the backoff sleeps: before each socket operation the socket's timeout is set to the
  time left, so a server trickling a byte a second still hits it (None: no total deadline, each
  operation waits at most :data:`IO_TIMEOUT`);
* ``retries``: transient faults -- timeout, connection refused/reset, HTTP 5xx and 429 -- are
  retried with exponential backoff (``backoff * 2**k`` s) while time is left; others fail at once;
* redirects: a same-origin (scheme, host, port) 301/302/303/307/308 is followed at most
  ``max_redirects`` times, re-POSTing the batch; one to another origin is refused and its reply
  never read (so neither the batch, the Authorization header nor the other host's scores move);
* ``max_bytes``: a larger ``Content-Length`` is refused before reading; otherwise the body is read
  in chunks and counted, never more than ``max_bytes + 1`` bytes;
* HTTPS verifies the certificate and host name against the system trust store, or against
  ``cafile`` (a PEM bundle, for a server with its own CA);
* ``auth``: an ``Authorization`` header value. Neither it nor the URL's credentials (userinfo,
  secret-named query parameters) appear in any error, ``name`` or ``repr`` (see :mod:`.secrets`).
"""
from __future__ import annotations

import base64
import http.client
import io
import json
import math
import socket
import ssl
import time
from urllib.parse import urljoin, urlsplit

import torch
from torch import Tensor

from .base import RewardError, check_images, one_line, to_pil
from .secrets import auth_secrets, redact_url, scrub, url_secrets

IO_TIMEOUT = 60.0           # per socket operation when there is no total deadline
CHUNK = 1 << 16
REDIRECTS = (301, 302, 303, 307, 308)


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


class _Expired(Exception):
    """The total deadline passed."""


class _Clock:
    """The call's total deadline; ``left()`` is what each socket operation may wait."""

    def __init__(self, total: float | None):
        self.total = total
        self.end = None if total is None else time.monotonic() + total

    def left(self) -> float:
        if self.end is None:
            return IO_TIMEOUT
        rest = self.end - time.monotonic()
        if rest <= 0:
            raise _Expired()
        return rest


# Sockets whose every read and send first sets the socket timeout to the time left. http.client
# reads through ``sock.makefile()``, which calls ``recv_into`` of the socket object, so both the
# header lines and the body go through these overrides.
class _TimedIO:
    """The overrides shared by the plain and the TLS socket classes below."""

    clock = _Clock(None)

    def recv_into(self, *args, **kwargs):
        self.settimeout(_left_or_timeout(self.clock))
        return super().recv_into(*args, **kwargs)

    def recv(self, *args, **kwargs):
        self.settimeout(_left_or_timeout(self.clock))
        return super().recv(*args, **kwargs)

    def sendall(self, data, *args):
        view = memoryview(data).cast("B")
        while view:
            self.settimeout(_left_or_timeout(self.clock))
            n = self.send(view[:CHUNK], *args)
            view = view[n:]


class _TimedSocket(_TimedIO, socket.socket):
    pass


class _TimedSSLSocket(_TimedIO, ssl.SSLSocket):
    pass


def _left_or_timeout(clock: _Clock) -> float:
    try:
        return clock.left()
    except _Expired:
        raise socket.timeout("total deadline passed") from None


_CONTEXTS: dict[str | None, ssl.SSLContext] = {}


def _ssl_context(cafile: str | None = None) -> ssl.SSLContext:
    """A verifying client context (system trust store, or ``cafile``), built once per CA file."""
    ctx = _CONTEXTS.get(cafile)
    if ctx is None:
        ctx = ssl.create_default_context(cafile=cafile)
        ctx.sslsocket_class = _TimedSSLSocket
        _CONTEXTS[cafile] = ctx
    return ctx


class _Origin:
    """Scheme, host and port of a URL (the unit a redirect may not leave)."""

    def __init__(self, url: str):
        p = urlsplit(url)
        self.scheme = p.scheme.lower()
        self.host = (p.hostname or "").lower()
        port = p.port                      # ValueError for a malformed port
        self.port = port if port is not None else (443 if self.scheme == "https" else 80)
        self.target = (p.path or "/") + (f"?{p.query}" if p.query else "")
        self.userinfo = p.username is not None

    def key(self):
        return self.scheme, self.host, self.port

    def show(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"


class HttpReward:
    """``POST`` the batch to ``url`` and read ``{"scores": [...]}``. Not differentiable.

    ``timeout`` is the total deadline of one call (None/0: none); ``deadline_s`` exposes it so that
    :func:`~.base.evaluate_rewards` need not add a thread of its own.
    """

    differentiable = False

    def __init__(self, url: str, *, timeout: float | None = 60.0, retries: int = 2, backoff: float = 0.5,
                 max_bytes: int = 64 << 20, auth: str | None = None, max_redirects: int = 3,
                 cafile: str | None = None, name: str | None = None):
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise RewardError(f"reward server URL must start with http:// or https://, got '{redact_url(url)}'")
        self._url = url
        self.url = redact_url(url)          # what messages show
        try:
            origin = _Origin(url)
        except ValueError:
            raise RewardError(f"reward server URL '{self.url}' has a malformed host or port") from None
        if not origin.host:
            raise RewardError(f"reward server URL '{self.url}' has no host")
        if (timeout is not None and timeout < 0) or retries < 0 or backoff < 0 or max_bytes < 1 or max_redirects < 0:
            raise ValueError("timeout must be >= 0 or None, retries/backoff/max_redirects >= 0, max_bytes >= 1")
        if auth is not None and any(ord(c) < 32 or ord(c) == 127 for c in auth):
            raise RewardError("reward server Authorization header (task.reward_auth) holds control characters")
        self.timeout = float(timeout) if timeout else None
        self.retries, self.backoff = int(retries), float(backoff)
        self.max_bytes, self.max_redirects = int(max_bytes), int(max_redirects)
        self._auth = auth or None
        self.cafile = cafile
        self._secrets = url_secrets(url) + auth_secrets(auth)
        self.name = name or self.url
        self.attempts = 0          # attempts made by the last call (for logs and tests)

    @property
    def deadline_s(self) -> float | None:
        return self.timeout

    def __repr__(self) -> str:
        auth = ", auth=***" if self._auth else ""
        return (f"HttpReward({self.url!r}, timeout={self.timeout!r}, retries={self.retries}, "
                f"max_bytes={self.max_bytes}{auth})")

    def _error(self, msg: str) -> RewardError:
        return RewardError(one_line(scrub(f"reward server {self.url}: {msg}", self._secrets)))

    def payload(self, images: Tensor, prompts, metadata) -> bytes:
        body = {"images": encode_png(images), "prompts": None if prompts is None else list(prompts),
                "metadata": None if metadata is None else list(metadata)}
        try:
            return json.dumps(body, allow_nan=False).encode("utf-8")
        except (TypeError, ValueError) as e:
            raise self._error(f"prompts/metadata are not JSON-serialisable ({e})") from None

    def __call__(self, images: Tensor, prompts=None, metadata=None) -> Tensor:
        check_images(images, self.name)
        data = self.payload(images, prompts, metadata)
        clock = _Clock(self.timeout)        # starts once the batch is encoded: network time only
        last, self.attempts = "", 0
        for k in range(self.retries + 1):
            try:
                if k:
                    pause = self.backoff * 2 ** (k - 1)
                    if clock.end is not None and time.monotonic() + pause >= clock.end:
                        break               # the backoff alone would pass the deadline
                    time.sleep(pause)
                self.attempts = k + 1
                body = self._post(data, clock)
            except _Transient as e:
                last = str(e)
                continue
            except _Expired:
                last = self._deadline_text()
                break
            return self._parse(body, images.shape[0]).to(images.device)
        n = self.attempts
        raise self._error(f"{last or self._deadline_text()} (after {n} attempt{'s' if n != 1 else ''})")

    def _deadline_text(self) -> str:
        return f"timed out: no reply within the total deadline of {self.timeout:g} s (task.reward_timeout)"

    # ------------------------------------------------------------------ one attempt

    def _post(self, data: bytes, clock: _Clock) -> bytes:
        """One attempt, following same-origin redirects; the response body or an exception."""
        url = self._url
        home = _Origin(url)
        for _hop in range(self.max_redirects + 1):
            status, reason, headers, conn, resp = self._exchange(_Origin(url), data, clock)
            try:
                if status in REDIRECTS:
                    url = self._redirect_target(url, home, status, headers.get("Location"))
                    continue
                if status >= 400:
                    detail = one_line(self._read(resp, 512).decode("utf-8", "replace"), 120)
                    msg = f"HTTP {status} {reason}" + (f": {detail}" if detail else "")
                    if status >= 500 or status == 429:
                        raise _Transient(scrub(msg, self._secrets))
                    raise self._error(msg)
                if not 200 <= status < 300:
                    raise self._error(f"unexpected HTTP {status} {reason}")
                length = headers.get("Content-Length")
                if length is not None and length.strip().isdigit() and int(length) > self.max_bytes:
                    raise self._too_big(f"announced {int(length)} bytes")
                body = self._read(resp, self.max_bytes + 1)
                if len(body) > self.max_bytes:
                    raise self._too_big(f"more than {self.max_bytes} bytes")
                return body
            except (socket.timeout, TimeoutError):
                raise self._timed_out(clock) from None
            except ssl.SSLCertVerificationError as e:   # not transient: a retry cannot fix it
                raise self._error(f"TLS failed: {e.reason or type(e).__name__}") from None
            except (OSError, http.client.HTTPException) as e:   # reset or truncated while reading the body
                raise _Transient(self._describe(e)) from None
            finally:
                conn.close()
        raise self._error(f"more than {self.max_redirects} redirects")

    @staticmethod
    def _timed_out(clock: _Clock) -> Exception:
        return _Expired() if clock.end is not None else _Transient(f"timed out: no data for {IO_TIMEOUT:g} s")

    def _too_big(self, what: str) -> RewardError:
        return self._error(f"response body {what}, over the cap of {self.max_bytes} bytes (task.reward_max_mb)")

    def _redirect_target(self, url: str, home: _Origin, status: int, location: str | None) -> str:
        if not location:
            raise self._error(f"HTTP {status} redirect without a Location header")
        target = urljoin(url, location.strip())
        try:
            there = _Origin(target)
        except ValueError:
            raise self._error(f"refused HTTP {status} redirect to a malformed URL") from None
        if there.key() != home.key() or there.userinfo:
            raise self._error(f"refused HTTP {status} redirect to another origin ({there.show()}); "
                              "only same scheme, host and port are followed")
        return target

    def _exchange(self, origin: _Origin, data: bytes, clock: _Clock):
        """Connect, send the POST and read the status line and headers."""
        if clock.end is not None:
            clock.left()                                    # raises _Expired when nothing is left
        if origin.scheme == "https":
            conn = _HTTPS(origin.host, origin.port, clock, self.cafile)
        else:
            conn = _HTTP(origin.host, origin.port, clock)
        headers = {"Content-Type": "application/json", "Accept": "application/json", "Connection": "close"}
        if self._auth:
            headers["Authorization"] = self._auth
        try:
            conn.request("POST", origin.target, body=data, headers=headers)
            resp = conn.getresponse()
        except _Expired:
            conn.close()
            raise
        except (socket.timeout, TimeoutError):
            conn.close()
            raise self._timed_out(clock) from None
        except ssl.SSLCertVerificationError as e:   # not transient: a retry cannot fix it
            conn.close()
            raise self._error(f"TLS failed: {e.reason or type(e).__name__}") from None
        except (ValueError, http.client.InvalidURL) as e:   # http.client's checks of the request line
            conn.close()
            raise self._error(f"invalid request: the URL path holds characters HTTP forbids ({type(e).__name__})") from None
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise _Transient(self._describe(e)) from None
        return resp.status, resp.reason, resp.headers, conn, resp

    @staticmethod
    def _read(resp, limit: int) -> bytearray:
        """At most ``limit`` bytes of the body, read in chunks (each read under the deadline)."""
        buf = bytearray()
        while len(buf) < limit:
            chunk = resp.read(min(CHUNK, limit - len(buf)))
            if not chunk:
                break
            buf += chunk
        return buf

    def _describe(self, err) -> str:
        if isinstance(err, ConnectionRefusedError):
            return "connection refused (is the reward server running?)"
        if isinstance(err, socket.gaierror):
            return "cannot resolve the host name"
        return scrub(one_line(f"connection failed: {type(err).__name__}: {err}", 160), self._secrets)

    def _parse(self, body: bytes, batch: int) -> Tensor:
        try:
            obj = json.loads(body)
        except (UnicodeDecodeError, ValueError):
            head = one_line(bytes(body[:60]).decode("utf-8", "replace"), 60)
            raise self._error(f"response is not JSON (starts with {head!r})") from None
        scores = obj.get("scores") if isinstance(obj, dict) else None
        if not isinstance(scores, list):
            raise self._error("response has no 'scores' list")
        if len(scores) != batch:
            raise self._error(f"returned {len(scores)} scores for {batch} images")
        if not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores):
            raise self._error("'scores' holds non-numbers")
        n_bad = sum(not math.isfinite(s) for s in scores)
        if n_bad:
            raise self._error(f"returned NaN/inf for {n_bad} of {batch} images")
        return torch.tensor(scores, dtype=torch.float32)


class _HTTP(http.client.HTTPConnection):
    """An HTTP connection whose socket enforces the call's total deadline on every operation."""

    def __init__(self, host: str, port: int, clock: _Clock):
        super().__init__(host, port, timeout=clock.left())
        self.clock = clock

    def connect(self):
        raw = socket.create_connection((self.host, self.port), self.clock.left())
        try:
            sock = _TimedSocket(raw.family, raw.type, raw.proto, fileno=raw.detach())
        finally:
            raw.close()
        sock.clock = self.clock
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock


class _HTTPS(_HTTP):
    """HTTPS with certificate and host-name checks (the system's default trust store)."""

    default_port = 443

    def __init__(self, host: str, port: int, clock: _Clock, cafile: str | None = None):
        super().__init__(host, port, clock)
        self.cafile = cafile

    def connect(self):
        super().connect()
        self.sock.settimeout(self.clock.left())              # the handshake's timeout is total
        tls = _ssl_context(self.cafile).wrap_socket(self.sock, server_hostname=self.host)
        tls.clock = self.clock
        self.sock = tls
