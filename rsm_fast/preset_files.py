"""Preset YAML files (``rsm_fast/presets/*.yaml``) and their ``extends:`` key.

A preset whose top level holds ``extends: <preset name>`` is that parent's resolved mapping with the
child's own keys deep-merged over it: the child wins; mappings (``method:``, ``tasks:``, each task's
section and the sections within it) merge key by key; lists and scalars replace. Chains resolve
(a extends b extends c). A child states its own ``description``. The resolved mapping has no
``extends`` key, so :func:`rsm_fast.config.preset_data` callers see one flat preset.
"""
from __future__ import annotations

import copy
from importlib import resources

import yaml

from .config import ConfigError

PACKAGE = "rsm_fast.presets"


def _folder():
    """The presets folder (a Traversable; tests point it at a temporary directory)."""
    return resources.files(PACKAGE)


def names() -> list[str]:
    return sorted(f.name[:-5] for f in _folder().iterdir() if f.name.endswith(".yaml"))


def merge(base: dict, over: dict) -> dict:
    """``over`` deep-merged onto a copy of ``base``: mappings merge key by key, anything else
    (lists, scalars, a mapping meeting a non-mapping) is replaced by ``over``'s value."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def read(name: str) -> dict:
    """One preset file's own mapping, ``extends`` unresolved."""
    data = yaml.safe_load(_folder().joinpath(f"{name}.yaml").read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"preset {name}: the file must hold a mapping at top level, got {type(data).__name__}")
    return data


def resolve(name: str, chain: tuple[str, ...] = ()) -> dict:
    """Preset ``name``'s mapping with its ``extends`` chain merged in (no ``extends`` key left)."""
    chain = chain + (name,)
    data = read(name)
    if "extends" not in data:
        return data
    parent = data.pop("extends")
    via = f" (extended by {' <- '.join(reversed(chain[:-1]))})" if len(chain) > 1 else ""
    if not isinstance(parent, str):
        raise ConfigError(f"preset {name}: 'extends' must be a preset name (a string), got {parent!r}{via}")
    if parent in chain:
        raise ConfigError(f"preset {chain[0]}: 'extends' makes a cycle: {' -> '.join(chain + (parent,))}")
    available = names()
    if parent not in available:
        raise ConfigError(f"preset {name}: 'extends' names unknown preset '{parent}'{via}; "
                          f"available: {', '.join(available)}")
    if not isinstance(data.get("description"), str) or not data["description"]:
        raise ConfigError(f"preset {name}: 'description' missing; a preset that extends '{parent}' states its own{via}")
    return merge(resolve(parent, chain), data)
