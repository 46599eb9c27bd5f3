"""``extends:`` in preset YAMLs (rsm_fast/preset_files.py): a preset is its parent's resolved mapping
with its own keys deep-merged over it. Merge semantics, the one-line errors, and the shipped
children: each differs from its parent in exactly the keys its own file states, so a change to
the parent reaches every child that does not state that key."""
from __future__ import annotations

from dataclasses import asdict

import pytest
import yaml

from rsm_fast import preset_files as PF
from rsm_fast.config import ConfigError, build_config, preset_data, preset_names

# child -> parent, as the shipped files state it
CHILDREN = {
    "tempflow-grpo-rsm": "tempflow-grpo",
    "tempflow-grpo-k1": "tempflow-grpo",
    "tempflow-evr": "tempflow-grpo-rsm",
    "tempflow-evr-cost": "tempflow-evr",
    "tempflow-evr-k1": "tempflow-grpo-k1",
    "rsm-evr": "tempflow-evr",
    "rsm-evr-cost": "rsm-evr",
    "pcpo-reweight": "pcpo",
    "pcpo-reweight-flow": "pcpo-reweight",
    "rsm-soft-fo-trap": "rsm-soft-fo",
}
# keys a child restates at its parent's value on purpose: {child: leaf-path prefixes}
RESTATED = {"pcpo-reweight-flow": [("tasks", "diffusers")]}   # its own SD3 release, stated whole


def _leaves(m: dict, prefix: tuple = ()) -> dict:
    out = {}
    for k, v in m.items():
        if isinstance(v, dict) and v:
            out.update(_leaves(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


# ---------------------------------------------------------------------------------- merge semantics
def test_merge_is_deep_child_wins_lists_and_scalars_replace():
    base = {"a": 1, "m": {"x": 1, "y": [1, 2], "n": {"p": 1, "q": 2}}, "keep": "k"}
    over = {"a": 2, "m": {"y": [3], "n": {"q": 9}, "z": 0}, "new": {"s": 1}}
    out = PF.merge(base, over)
    assert out == {"a": 2, "m": {"x": 1, "y": [3], "n": {"p": 1, "q": 9}, "z": 0}, "keep": "k", "new": {"s": 1}}
    assert base == {"a": 1, "m": {"x": 1, "y": [1, 2], "n": {"p": 1, "q": 2}}, "keep": "k"}   # inputs untouched
    out["new"]["s"] = 5
    assert over["new"] == {"s": 1}                                                          # no shared objects
    assert PF.merge({"m": {"x": 1}}, {"m": 3}) == {"m": 3}          # a scalar over a mapping replaces it
    assert PF.merge({"m": 3}, {"m": {"x": 1}}) == {"m": {"x": 1}}


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """A temporary presets folder in place of rsm_fast/presets; write(name, mapping or text)."""
    monkeypatch.setattr(PF, "_folder", lambda: tmp_path)

    def write(name, data):
        (tmp_path / f"{name}.yaml").write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return write


def test_chain_and_tasks_merge_per_task_deeply(folder):
    folder("c", {"description": "c", "task": {"num_steps": 10}, "rollout": {"plan": "branch", "profile": "const:6"},
                 "method": {"group_size": 4, "clip_eps": 0.01},
                 "tasks": {"digits-ddim": {"method": {"group_size": 8}, "train": {"batch_size": 32, "lr": 0.003}},
                           "diffusers": {"train": {"lr": 3e-4}}}})
    folder("b", {"extends": "c", "description": "b", "method": {"clip_eps": 0.02},
                 "tasks": {"digits-ddim": {"train": {"lr": 0.004}}, "digits-flow": {"train": {"batch_size": 8}}}})
    folder("a", {"extends": "b", "description": "a", "rollout": {"profile": "const:1"},
                 "tasks": {"digits-ddim": {"method": {"group_size": 2}}}})
    assert PF.names() == ["a", "b", "c"] and preset_names() == ["a", "b", "c"]
    a = preset_data("a")
    assert "extends" not in a and "extends" not in preset_data("b")
    assert a == {"description": "a", "task": {"num_steps": 10}, "rollout": {"plan": "branch", "profile": "const:1"},
                 "method": {"group_size": 4, "clip_eps": 0.02},
                 "tasks": {"digits-ddim": {"method": {"group_size": 2}, "train": {"batch_size": 32, "lr": 0.004}},
                           "diffusers": {"train": {"lr": 3e-4}},
                           "digits-flow": {"train": {"batch_size": 8}}}}
    cfg = build_config("a", overrides=["task.name=digits-ddim"])
    assert (cfg.method.group_size, cfg.train.batch_size, cfg.train.lr, cfg.method.clip_eps) == (2, 32, 0.004, 0.02)
    assert cfg.rollout.profile == "const:1" and cfg.preset == "a" and cfg.description == "a"


def test_a_list_replaces_the_parents(folder):
    folder("p", {"description": "p", "rollout": {"profile": [4, 4, 0]}})
    folder("q", {"extends": "p", "description": "q", "rollout": {"profile": [2]}})
    assert preset_data("q")["rollout"] == {"profile": [2]}


# ---------------------------------------------------------------------------------- errors
def _err(name) -> str:
    with pytest.raises(ConfigError) as e:
        preset_data(name)
    msg = str(e.value)
    assert "\n" not in msg and f"preset {name}" in msg and "'extends'" in msg, msg
    return msg


def test_unknown_parent_names_it_and_lists_the_presets(folder):
    folder("base", {"description": "b"})
    folder("kid", {"extends": "nope", "description": "k"})
    msg = _err("kid")
    assert "'nope'" in msg and "available: base, kid" in msg
    folder("grandkid", {"extends": "kid", "description": "g"})
    with pytest.raises(ConfigError) as e:        # the file at fault is named, and the chain that reached it
        preset_data("grandkid")
    msg = str(e.value)
    assert msg.startswith("preset kid: 'extends' names unknown preset 'nope' (extended by grandkid)"), msg
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        build_config("kid")


def test_a_cycle_shows_the_chain(folder):
    folder("x", {"extends": "y", "description": "x"})
    folder("y", {"extends": "z", "description": "y"})
    folder("z", {"extends": "x", "description": "z"})
    folder("me", {"extends": "me", "description": "m"})
    assert "x -> y -> z -> x" in _err("x")
    assert "z -> x -> y -> z" in _err("z")
    assert "me -> me" in _err("me")


@pytest.mark.parametrize("value", ["[a, b]", "3", "{name: a}", "null", "true"])
def test_extends_must_be_a_string(folder, value):
    folder("a", {"description": "a"})
    folder("kid", f"extends: {value}\ndescription: k\n")
    assert "must be a preset name" in _err("kid")


def test_a_child_states_its_own_description(folder):
    folder("a", {"description": "a"})
    folder("kid", {"extends": "a", "method": {"kl_coef": 0.5}})
    with pytest.raises(ConfigError) as e:
        preset_data("kid")
    assert "preset kid" in str(e.value) and "'description'" in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------------------------- the shipped children
def test_the_shipped_children_are_the_ones_listed():
    own = {n: PF.read(n) for n in preset_names()}
    assert {n: d["extends"] for n, d in own.items() if "extends" in d} == CHILDREN
    assert "extends" not in own["rsm-soft-zo"] and "extends" not in own["rsm-soft-fo"]


@pytest.mark.parametrize("child", sorted(CHILDREN))
def test_a_child_differs_from_its_parent_in_its_own_keys_only(child):
    parent = CHILDREN[child]
    own = {k: v for k, v in PF.read(child).items() if k != "extends"}
    stated = _leaves(own)
    got, base = _leaves(preset_data(child)), _leaves(preset_data(parent))
    assert set(base) <= set(got), "a child cannot drop a key of its parent"
    for path, value in got.items():
        if path in stated:
            assert value == stated[path], path
        else:
            assert value == base[path], (child, path)     # not stated: the parent's value
    assert own["description"] and own["description"] != preset_data(parent)["description"]
    # its own keys are differences, not copies (except where a restated section is documented)
    same = [p for p, v in stated.items() if p in base and base[p] == v and p != ("description",)
            and not any(p[:len(pre)] == pre for pre in RESTATED.get(child, []))]
    assert not same, f"{child} restates its parent's values: {same}"


def test_a_parent_change_reaches_every_descendant(monkeypatch):
    real = PF.read
    roots = {p for p in CHILDREN.values() if p not in CHILDREN}

    def read(name):
        d = real(name)
        if name in roots:
            d = PF.merge(d, {"train": {"epochs": 7}, "method": {"adv_clip": 3.0},
                             "tasks": {"digits-flow": {"train": {"lr": 0.005}}}})
        return d

    monkeypatch.setattr(PF, "read", read)
    assert roots == {"tempflow-grpo", "pcpo", "rsm-soft-fo"}
    for name in sorted(CHILDREN) + sorted(roots):
        root = name
        while root in CHILDREN:
            root = CHILDREN[root]
        assert root in roots
        cfg = build_config(name, overrides=["task.name=digits-flow"])
        assert (cfg.train.epochs, cfg.method.adv_clip, cfg.train.lr) == (7, 3.0, 0.005), name


def test_children_resolve_to_their_parents_configs_plus_their_changes():
    """A flat check on the built configs: tempflow-grpo-rsm is tempflow-grpo with the KL x dt, on every task."""
    for task in ("toy2d", "digits-ddim", "digits-flow", "diffusers"):
        sets = [f"task.name={task}"]
        a, b = asdict(build_config("tempflow-grpo", None, sets)), asdict(build_config("tempflow-grpo-rsm", None, sets))
        diff = {(s, k) for s in a if isinstance(a[s], dict) for k in a[s] if a[s][k] != b[s][k]}
        assert diff == {("method", "kl_dt_weight")}, (task, diff)
