"""Keep reward-server credentials out of errors, reprs, logs, config.yaml and checkpoints.

A reward spec may name a server as ``https://user:pass@host/score?token=...``, and
``task.reward_auth`` may hold an ``Authorization`` header value. Everything this package shows a
person goes through these helpers:

* :func:`redact_url` -- the URL with the userinfo password (or a bare userinfo, often a token)
  and the values of query parameters with secret-like names shown as ``***``;
* :func:`redact_spec` -- a whole reward spec with each URL term redacted, other terms unchanged;
* :func:`redact_config` -- a copy of ``dataclasses.asdict(RunConfig)`` safe to write to disk;
* :func:`scrub` -- any text with given secret strings replaced (for server replies and
  library error texts that might echo a credential).
"""
from __future__ import annotations

import copy
import re
from urllib.parse import unquote_plus, urlsplit, urlunsplit

MASK = "***"

# Query parameter names whose values are credentials, case-insensitive: a name whose parts
# (split at '_', '-', '.') include one of _SECRET_PARTS, or whose letters contain one of
# _SECRET_STEMS ('accessToken', 'X-Amz-Signature', 'client_secret', 'apiKey' all count).
# Over-redacting a harmless name ('author') costs nothing.
_SECRET_PARTS = frozenset(("token", "key", "apikey", "secret", "password", "passwd", "pwd", "pass", "auth",
                           "sig", "signature", "credential", "credentials", "session", "sid", "cookie", "jwt",
                           "bearer", "code", "hmac"))
_SECRET_STEMS = ("token", "secret", "passw", "apikey", "signature", "credential", "auth", "session")
_MIN_SCRUB = 3          # shorter "secrets" would mask ordinary characters all over a message


def is_secret_name(name: str) -> bool:
    """True for a query parameter name that carries a credential (``token``, ``API-Key``, ...)."""
    n = unquote_plus(name).strip().lower()
    parts = [q for q in re.split(r"[^a-z0-9]+", n) if q]
    squashed = "".join(parts)
    return any(q in _SECRET_PARTS for q in parts) or any(w in squashed for w in _SECRET_STEMS)


def _redact_query(query: str) -> str:
    parts = []
    for item in query.split("&"):
        name, eq, value = item.partition("=")
        parts.append(f"{name}={MASK}" if eq and value and is_secret_name(name) else item)
    return "&".join(parts)


def _redact_netloc(netloc: str) -> str:
    userinfo, at, hostport = netloc.rpartition("@")
    if not at:
        return netloc
    user, colon, _password = userinfo.partition(":")
    # user:password -> user:***; a bare userinfo is often a token (https://TOKEN@host) -> ***
    return (f"{user}:{MASK}@" if colon else f"{MASK}@") + hostport


def redact_url(url: str) -> str:
    """``url`` with its credentials shown as ``***`` (userinfo password, secret query values)."""
    if not isinstance(url, str):
        return MASK
    try:
        p = urlsplit(url)
    except ValueError:                                   # unparsable: keep only what cannot leak
        head = url.split("?", 1)[0]
        head = re.sub(r"//[^/@]*@", f"//{MASK}@", head)
        return head + (f"?{MASK}" if "?" in url else "")
    return urlunsplit((p.scheme, _redact_netloc(p.netloc), p.path, _redact_query(p.query), p.fragment))


def url_secrets(url: str) -> list[str]:
    """The credential strings inside ``url`` (raw and percent-decoded), for :func:`scrub`."""
    out: list[str] = []
    try:
        p = urlsplit(url)
    except ValueError:
        return out
    userinfo, at, _ = p.netloc.rpartition("@")
    if at:
        user, colon, password = userinfo.partition(":")
        out += [password] if colon else [user]
    for item in p.query.split("&"):
        name, eq, value = item.partition("=")
        if eq and value and is_secret_name(name):
            out.append(value)
    return sorted({v for s in out for v in (s, unquote_plus(s)) if s}, key=len, reverse=True)


def auth_secrets(auth: str | None) -> list[str]:
    """The header value and its credential part (``Bearer abc`` -> ``Bearer abc``, ``abc``)."""
    if not auth:
        return []
    out = {auth.strip()}
    scheme, _, cred = auth.strip().partition(" ")
    if cred.strip():
        out.add(cred.strip())
    return sorted(out, key=len, reverse=True)


def scrub(text: str, secrets) -> str:
    """``text`` with every secret (longest first) replaced by ``***``."""
    for s in sorted({s for s in secrets if s and len(s) >= _MIN_SCRUB}, key=len, reverse=True):
        text = text.replace(s, MASK)
    return text


def _redact_atom(atom: str) -> str:
    return redact_url(atom) if "://" in atom or "@" in atom else atom


def redact_spec(spec: str) -> str:
    """A reward spec with each URL term's credentials shown as ``***``; other terms unchanged.

    The spec is split into terms as :func:`~.registry.parse_spec` does (a ``+`` inside a URL's
    query stays in that URL), and weights and spacing are kept, so the result still parses.
    """
    if not isinstance(spec, str):
        return MASK
    from .registry import split_terms

    return "+".join(_redact_piece(p) for p in split_terms(spec))


def _redact_piece(piece: str) -> str:
    from .registry import _WEIGHT

    m = _WEIGHT.match(piece)
    if m is None:
        return _redact_atom(piece)
    start = m.start(2)
    return piece[:start] + _redact_atom(piece[start:])


def redact_config(d: dict) -> dict:
    """A deep copy of ``dataclasses.asdict(RunConfig)`` with ``task.reward`` redacted and a
    non-empty ``task.reward_auth`` replaced by ``***`` (what config.yaml and checkpoints store)."""
    out = copy.deepcopy(d)
    task = out.get("task") if isinstance(out, dict) else None
    if isinstance(task, dict):
        if isinstance(task.get("reward"), str):
            task["reward"] = redact_spec(task["reward"])
        if task.get("reward_auth"):
            task["reward_auth"] = MASK
    return out
