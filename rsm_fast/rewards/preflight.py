"""Check a reward spec before any model is loaded (:func:`preflight`).

A run that loads a multi-GB diffusion model and only then finds ``aesthetik`` misspelled, a
``module:function`` that does not import, or a reward server that is down, wastes minutes. The
checks here build no reward model and need no task:

* the spec parses; every name is registered (argument rules and the entry's cheap ``check``,
  e.g. a colour's values or a model folder's existence), a ``module:function`` imports and is
  callable, or the term is an ``http(s)://`` URL;
* each reward server accepts a TCP connection within ``min(5 s, timeout)`` (no request is sent).

Registered names whose factory needs the task (``linear``, the digits rewards) pass: only their
argument rules are checked. Errors are one-line :class:`~.base.RewardError`s with URLs redacted.
"""
from __future__ import annotations

import socket

from .base import RewardError
from .registry import import_fn, lookup, parse_spec
from .secrets import redact_url

CONNECT_S = 5.0


def preflight(spec: str, options=None) -> None:
    """Raise a one-line :class:`RewardError` for a spec that cannot work; return None otherwise.

    ``options``: :class:`~.options.RewardOptions` (its ``timeout`` bounds the connect check;
    None: the defaults).
    """
    timeout = getattr(options, "timeout", 0) or CONNECT_S
    for _weight, atom in parse_spec(spec):
        kind, entry, arg = lookup(atom)
        if kind == "url":
            from .remote import HttpReward

            HttpReward(atom)                                  # scheme, host and port are well formed
            check_reachable(atom, min(CONNECT_S, float(timeout)))
        elif kind == "registered":
            if entry.check is not None:
                entry.check(arg)
        else:
            import_fn(atom)


def check_reachable(url: str, timeout: float = CONNECT_S) -> None:
    """A TCP connection to ``url``'s host and port opens within ``timeout`` s, or RewardError."""
    from .remote import _Origin

    o = _Origin(url)
    shown = redact_url(url)
    try:
        with socket.create_connection((o.host, o.port), timeout=timeout):
            return
    except socket.gaierror:
        why = f"cannot resolve host '{o.host}'"
    except ConnectionRefusedError:
        why = f"connection to {o.host}:{o.port} refused (is the reward server running?)"
    except (socket.timeout, TimeoutError):
        why = f"no answer from {o.host}:{o.port} within {timeout:g} s"
    except OSError as e:
        why = f"cannot connect to {o.host}:{o.port} ({type(e).__name__}: {e.strerror or e})"
    raise RewardError(f"reward server {shown} is unreachable: {why}")
