"""Config: presets, precedence, and one-line errors naming the offending field or file."""
from __future__ import annotations

import pytest

from rsm_fast.config import ConfigError, build_config, parse_set, preset_data, preset_names

REQUIRED_PRESETS = {"reinforce", "grpo", "rsm-fo-terminal", "rsm-soft-zo"}


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg, msg
    return msg


def test_required_presets_exist_and_validate():
    assert REQUIRED_PRESETS <= set(preset_names())
    for name in preset_names():
        cfg = build_config(name)
        assert cfg.preset == name
        assert preset_data(name).get("description"), f"preset {name} lacks a description"


def test_precedence_preset_then_file_then_set(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  epochs: 7\n  lr: 0.01\n")
    cfg = build_config("grpo", str(f), ["train.lr=0.5"])
    assert cfg.method.surrogate == "ratio"          # from the preset
    assert cfg.train.epochs == 7                    # file over preset
    assert cfg.train.lr == 0.5                      # --set over file


def test_unknown_preset_names_the_preset():
    with pytest.raises(ConfigError) as e:
        build_config("no-such-method")
    assert "no-such-method" in _one_line(e) and "grpo" in str(e.value)


@pytest.mark.parametrize("expr, field", [
    ("task.num_steps=-3", "task.num_steps"),
    ("train.epochs=0", "train.epochs"),
    ("train.epochs=abc", "train.epochs"),
    ("train.lr=true", "train.lr"),
    ("method.surrogate=ppo2", "method.surrogate"),
    ("method.kl_coef=-1", "method.kl_coef"),
    ("method.nonexistent=1", "method.nonexistent"),
    ("train.timestep_fraction=1.5", "train.timestep_fraction"),
    ("task.num_steps=600", "task.num_steps"),
])
def test_bad_values_name_the_field(expr, field):
    with pytest.raises(ConfigError) as e:
        build_config("grpo", None, [expr])
    assert field in _one_line(e)


def test_unknown_key_in_file_names_key_and_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("method:\n  clip_epsilon: 0.1\n")
    with pytest.raises(ConfigError) as e:
        build_config(None, str(f))
    msg = _one_line(e)
    assert "method.clip_epsilon" in msg and "bad.yaml" in msg


@pytest.mark.parametrize("content", [None, "method: [1, 2\n", "- a\n- b\n", "method: 3\n"])
def test_unreadable_or_malformed_config_file(tmp_path, content):
    f = tmp_path / "c.yaml"
    if content is not None:
        f.write_text(content)
    with pytest.raises(ConfigError) as e:
        build_config(None, str(f))
    assert "c.yaml" in _one_line(e) or "method" in str(e.value)


def test_directory_as_config_file(tmp_path):
    with pytest.raises(ConfigError) as e:
        build_config(None, str(tmp_path))
    assert str(tmp_path) in _one_line(e)


def test_parse_set_uses_yaml_scalars():
    assert parse_set("a.b=3") == ("a.b", 3)
    assert parse_set("a.b=3.5") == ("a.b", 3.5)
    assert parse_set("a.b=true") == ("a.b", True)
    assert parse_set("a.b=grpo") == ("a.b", "grpo")
    with pytest.raises(ConfigError):
        parse_set("novalue")


def test_batch_must_divide_into_groups():
    with pytest.raises(ConfigError) as e:
        build_config("grpo", None, ["train.batch_size=100", "method.group_size=16"])
    assert "train.batch_size" in _one_line(e)
