"""Reward spec strings: a registry of names, the spec parser and ``resolve``.

Grammar (whitespace around ``+`` and ``*`` is ignored)::

    spec  := term ('+' term)*
    term  := [weight '*'] atom                  weight: a decimal number, e.g. 0.7, -1, 2.5e-1
    atom  := NAME [':' ARG]                     a registered name (jpeg, aesthetic:/dir, ...)
           | 'http://...' | 'https://...'       a reward server (see remote.py)
           | package.module ':' function        any importable callable

A registered name wins over the ``module:function`` reading (``aesthetic:/x`` is the aesthetic
model, never ``import aesthetic``). A ``+`` that does not start a new term (e.g. inside a path)
stays part of the argument. One term without a weight is returned as that reward itself.

Model-backed rewards (``aesthetic``, ``pickscore``, ``hps``) are built on ``task.device`` (cpu
without a task) in their release's precision there (:mod:`.device`); ``options.backend``
(``task.reward_backend``) may then compile their image encoder (:mod:`.backend`).

:class:`~.options.RewardOptions` (timeout, retries, body cap, Authorization header) reach every
:class:`~.remote.HttpReward` of a spec through ``make_reward(spec, task, options)`` / ``resolve``.
Error messages show a spec through :func:`~.secrets.redact_spec`: a URL's credentials never print.
"""
from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import Callable

from .base import FunctionReward, Reward, RewardError, one_line
from .device import task_device
from .secrets import redact_spec

_WEIGHT = re.compile(r"^\s*([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*\*\s*(.*?)\s*$")
_MODULE_FN = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*$")


@dataclass(frozen=True)
class Entry:
    factory: Callable[[str | None, object], Reward]   # (arg, task) -> reward
    arg: str            # "none" | "required" | "optional"
    help: str
    check: Callable[[str | None], None] | None = None  # cheap argument check for preflight (no model load)


REGISTRY: dict[str, Entry] = {}


def register(name: str, factory: Callable[[str | None, object], Reward], *, arg: str = "none", help: str = "",
             check: Callable[[str | None], None] | None = None) -> None:
    """Add (or replace) a named reward. ``factory(arg, task)`` builds it; ``arg`` is the text after
    ``name:`` (``"none"``: no argument allowed, ``"required"``, ``"optional"``). ``check(arg)``,
    optional, validates the argument cheaply (raising :class:`RewardError`) for :func:`preflight`."""
    if not re.fullmatch(r"[A-Za-z][\w-]*", name):
        raise ValueError(f"reward name must be an identifier (dashes allowed), got {name!r}")
    if arg not in ("none", "required", "optional"):
        raise ValueError(f"arg must be 'none', 'required' or 'optional', got {arg!r}")
    REGISTRY[name] = Entry(factory, arg, help, check)


def known_names() -> list[str]:
    return sorted(REGISTRY)


def _linear(arg, task):
    if task is None or not hasattr(task, "reward"):
        raise RewardError("reward 'linear' is the task's built-in reward and needs a task")
    return FunctionReward(task.reward, "linear", differentiable=True)


def _register_builtins() -> None:
    from . import clip, simple

    def need_dir(who):
        return lambda a: clip._dir(a, who) and None

    register("linear", _linear, help="the toy task's analytic reward (r = -x1/2 + 3)")
    register("jpeg", lambda a, t: simple.JpegReward(False), help="-KB of the PIL JPEG at quality 95 (DDPO)")
    register("jpeg-compressibility", lambda a, t: simple.JpegReward(False), help="same as jpeg")
    register("jpeg-incompressibility", lambda a, t: simple.JpegReward(True), help="+KB of the PIL JPEG at quality 95")
    register("brightness", lambda a, t: simple.BrightnessReward(), help="mean pixel value (differentiable)")
    register("color", lambda a, t: simple.parse_color(a), arg="required",
             help="color:R,G,B: -mean squared distance to a colour (differentiable)", check=simple.parse_color)
    # model rewards on the task's device (train.device / the rank's), in their release's precision there
    register("aesthetic", lambda a, t: clip.AestheticReward(a, device=task_device(t)), arg="required",
             help="aesthetic:/dir LAION aesthetic", check=need_dir("aesthetic"))
    register("pickscore", lambda a, t: clip.pickscore(a, device=task_device(t)), arg="required",
             help="pickscore:/dir PickScore_v1", check=need_dir("pickscore"))
    register("hps", lambda a, t: clip.hps(a, device=task_device(t)), arg="required", help="hps:/dir HPSv2.1",
             check=need_dir("hps"))


def _is_url(s: str) -> bool:
    return s.startswith(("http://", "https://"))


def _starts_term(piece: str) -> bool:
    m = _WEIGHT.match(piece)
    atom = (m.group(2) if m else piece).strip()
    if _is_url(atom) or _MODULE_FN.match(atom):
        return True
    return atom.split(":", 1)[0] in REGISTRY


def split_terms(spec: str) -> list[str]:
    """``spec`` cut at each ``+`` that starts a new term (raw pieces, weights and spacing kept)."""
    pieces: list[str] = []
    for p in spec.split("+"):
        if pieces and not _starts_term(p):
            pieces[-1] += "+" + p          # a '+' inside an argument (a path), not a new term
        else:
            pieces.append(p)
    return pieces


def parse_spec(spec: str) -> list[tuple[float | None, str]]:
    """``spec`` -> ``[(weight or None, atom), ...]`` (see the module docstring)."""
    if not isinstance(spec, str) or not spec.strip():
        raise RewardError(f"reward spec must be a non-empty string, got {redact_spec(spec)!r}")
    terms = []
    for p in split_terms(spec):
        m = _WEIGHT.match(p)
        w, atom = (float(m.group(1)), m.group(2)) if m else (None, p.strip())
        if not atom:
            raise RewardError(f"reward spec '{redact_spec(spec)}': empty term")
        terms.append((w, atom))
    return terms


def lookup(atom: str) -> tuple[str, Entry | None, str | None]:
    """``(kind, entry, arg)`` for one atom: kind ``"url"``, ``"registered"`` (argument rules
    checked) or ``"function"`` (a ``module:function`` not yet imported). Unknown names raise."""
    if _is_url(atom):
        return "url", None, None
    name, arg = atom.split(":", 1) if ":" in atom else (atom, None)
    entry = REGISTRY.get(name)
    if entry is not None:
        if entry.arg == "required" and not arg:
            raise RewardError(f"reward '{name}' needs an argument: '{name}:...' ({entry.help})")
        if entry.arg == "none" and arg is not None:
            raise RewardError(f"reward '{name}' takes no argument, got '{redact_spec(atom)}'")
        return "registered", entry, arg
    if arg is None or not _MODULE_FN.match(atom):
        raise RewardError(f"unknown reward '{redact_spec(atom)}'; known: {', '.join(known_names())}, "
                          "http(s)://host:port/path, or 'module:function'")
    return "function", None, arg


def _atom(atom: str, task, options=None) -> Reward:
    kind, entry, arg = lookup(atom)
    if kind == "url":
        from .remote import HttpReward
        return HttpReward(atom, **(options.http_kwargs() if options is not None else {}))
    if kind == "registered":
        reward = entry.factory(arg, task)
        if options is not None and options.backend != "eager":
            from .backend import apply_backend
            reward = apply_backend(reward, options.backend)
        return reward
    return FunctionReward(import_fn(atom), atom)


def import_fn(spec: str) -> Callable:
    """The callable named by ``package.module:function`` (one-line :class:`RewardError` if not)."""
    mod_name, fn_name = spec.split(":", 1)
    try:
        mod = importlib.import_module(mod_name)
    except Exception as e:  # noqa: BLE001 - an import that fails in any way is a bad spec
        raise RewardError(one_line(f"reward '{spec}': cannot import module '{mod_name}' "
                                   f"({type(e).__name__}: {e})")) from None
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise RewardError(f"reward '{spec}': '{fn_name}' is not a callable in module '{mod_name}'")
    return fn


def make_reward(spec: str, task=None, options=None) -> Reward:
    """A :class:`Reward` for ``spec``: one reward, or a :class:`~.combine.WeightedSum`.
    ``options`` (:class:`~.options.RewardOptions`) configure every HTTP term."""
    terms = parse_spec(spec)
    if len(terms) == 1 and terms[0][0] is None:
        return _atom(terms[0][1], task, options)
    from .combine import WeightedSum
    return WeightedSum([(1.0 if w is None else w, _atom(a, task, options)) for w, a in terms])


def resolve(spec: str, task, options=None) -> tuple[Callable, bool]:
    """The trainer's entry point: ``(reward_fn, is_builtin)``. ``'linear'`` gives the task's own
    reward (``is_builtin=True``: the task also has its analytic gradient); every other spec gives
    :func:`make_reward` (``is_builtin=False``) with ``options`` for its HTTP terms."""
    if isinstance(spec, str) and spec.strip() == "linear":
        return task.reward, True
    return make_reward(spec, task, options), False


_register_builtins()
