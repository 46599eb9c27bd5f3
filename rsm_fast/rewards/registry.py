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
"""
from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import Callable

from .base import FunctionReward, Reward, RewardError

_WEIGHT = re.compile(r"^\s*([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*\*\s*(.*?)\s*$")
_MODULE_FN = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*$")


@dataclass(frozen=True)
class Entry:
    factory: Callable[[str | None, object], Reward]   # (arg, task) -> reward
    arg: str            # "none" | "required" | "optional"
    help: str


REGISTRY: dict[str, Entry] = {}


def register(name: str, factory: Callable[[str | None, object], Reward], *, arg: str = "none", help: str = "") -> None:
    """Add (or replace) a named reward. ``factory(arg, task)`` builds it; ``arg`` is the text after
    ``name:`` (``"none"``: no argument allowed, ``"required"``, ``"optional"``)."""
    if not re.fullmatch(r"[A-Za-z][\w-]*", name):
        raise ValueError(f"reward name must be an identifier (dashes allowed), got {name!r}")
    if arg not in ("none", "required", "optional"):
        raise ValueError(f"arg must be 'none', 'required' or 'optional', got {arg!r}")
    REGISTRY[name] = Entry(factory, arg, help)


def known_names() -> list[str]:
    return sorted(REGISTRY)


def _linear(arg, task):
    if task is None or not hasattr(task, "reward"):
        raise RewardError("reward 'linear' is the task's built-in reward and needs a task")
    return FunctionReward(task.reward, "linear", differentiable=True)


def _register_builtins() -> None:
    from . import clip, simple

    register("linear", _linear, help="the toy task's analytic reward (r = -x1/2 + 3)")
    register("jpeg", lambda a, t: simple.JpegReward(False), help="-KB of the PIL JPEG at quality 95 (DDPO)")
    register("jpeg-compressibility", lambda a, t: simple.JpegReward(False), help="same as jpeg")
    register("jpeg-incompressibility", lambda a, t: simple.JpegReward(True), help="+KB of the PIL JPEG at quality 95")
    register("brightness", lambda a, t: simple.BrightnessReward(), help="mean pixel value (differentiable)")
    register("color", lambda a, t: simple.parse_color(a), arg="required",
             help="color:R,G,B: -mean squared distance to a colour (differentiable)")
    register("aesthetic", lambda a, t: clip.AestheticReward(a), arg="required", help="aesthetic:/dir LAION aesthetic")
    register("pickscore", lambda a, t: clip.pickscore(a), arg="required", help="pickscore:/dir PickScore_v1")
    register("hps", lambda a, t: clip.hps(a), arg="required", help="hps:/dir HPSv2.1")


def _is_url(s: str) -> bool:
    return s.startswith(("http://", "https://"))


def _starts_term(piece: str) -> bool:
    m = _WEIGHT.match(piece)
    atom = (m.group(2) if m else piece).strip()
    if _is_url(atom) or _MODULE_FN.match(atom):
        return True
    return atom.split(":", 1)[0] in REGISTRY


def parse_spec(spec: str) -> list[tuple[float | None, str]]:
    """``spec`` -> ``[(weight or None, atom), ...]`` (see the module docstring)."""
    if not isinstance(spec, str) or not spec.strip():
        raise RewardError(f"reward spec must be a non-empty string, got {spec!r}")
    pieces: list[str] = []
    for p in spec.split("+"):
        if pieces and not _starts_term(p):
            pieces[-1] += "+" + p          # a '+' inside an argument (a path), not a new term
        else:
            pieces.append(p)
    terms = []
    for p in pieces:
        m = _WEIGHT.match(p)
        w, atom = (float(m.group(1)), m.group(2)) if m else (None, p.strip())
        if not atom:
            raise RewardError(f"reward spec '{spec}': empty term")
        terms.append((w, atom))
    return terms


def _atom(atom: str, task) -> Reward:
    if _is_url(atom):
        from .remote import HttpReward
        return HttpReward(atom)
    name, arg = atom.split(":", 1) if ":" in atom else (atom, None)
    entry = REGISTRY.get(name)
    if entry is not None:
        if entry.arg == "required" and not arg:
            raise RewardError(f"reward '{name}' needs an argument: '{name}:...' ({entry.help})")
        if entry.arg == "none" and arg is not None:
            raise RewardError(f"reward '{name}' takes no argument, got '{atom}'")
        return entry.factory(arg, task)
    if arg is None:
        raise RewardError(f"unknown reward '{atom}'; known: {', '.join(known_names())}, "
                          "http(s)://host:port/path, or 'module:function'")
    return FunctionReward(_import_fn(atom), atom)


def _import_fn(spec: str) -> Callable:
    mod_name, fn_name = spec.split(":", 1)
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise RewardError(f"reward '{spec}': cannot import module '{mod_name}' ({e})") from None
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise RewardError(f"reward '{spec}': '{fn_name}' is not a callable in module '{mod_name}'")
    return fn


def make_reward(spec: str, task=None) -> Reward:
    """A :class:`Reward` for ``spec``: one reward, or a :class:`~.combine.WeightedSum`."""
    terms = parse_spec(spec)
    if len(terms) == 1 and terms[0][0] is None:
        return _atom(terms[0][1], task)
    from .combine import WeightedSum
    return WeightedSum([(1.0 if w is None else w, _atom(a, task)) for w, a in terms])


def resolve(spec: str, task) -> tuple[Callable, bool]:
    """The trainer's entry point: ``(reward_fn, is_builtin)``. ``'linear'`` gives the task's own
    reward (``is_builtin=True``: the task also has its analytic gradient); every other spec gives
    :func:`make_reward` (``is_builtin=False``)."""
    if isinstance(spec, str) and spec.strip() == "linear":
        return task.reward, True
    return make_reward(spec, task), False


_register_builtins()
