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


def test_per_task_preset_sections(tmp_path):
    """A preset's ``tasks.<name>`` section applies when the run has that task, named by the preset,
    a config file or --set; a file or --set still overrides it; other tasks never see it."""
    toy = build_config("grpo")
    assert (toy.train.batch_size, toy.task.num_steps, toy.method.clip_eps) == (512, 50, 0.01)
    dig = build_config("grpo", None, ["task.name=digits-ddim"])
    assert (dig.train.batch_size, dig.method.group_size, dig.task.num_steps, dig.train.lr) == (32, 8, 10, 0.003)
    assert build_config("grpo", None, ["task.name=digits-flow", "train.batch_size=16"]).train.batch_size == 16
    f = tmp_path / "c.yaml"
    f.write_text("task:\n  name: digits-flow\ntrain:\n  lr: 0.01\n")
    byfile = build_config("grpo", str(f))
    assert (byfile.train.batch_size, byfile.train.lr) == (32, 0.01)       # section, then the file over it
    img = build_config("grpo", None, ["task.name=diffusers", "task.model=sd15-tiny"])
    assert (img.method.clip_eps, img.train.lr, img.train.grad_accum, img.method.adv_norm) == (1e-4, 3e-4, 48, "global")
    # back to the 2-D task by --set: the digits section is not applied
    assert build_config("grpo", None, ["task.name=digits-ddim", "task.name=toy2d"]).train.batch_size == 512


def test_every_presets_task_sections_validate():
    from rsm_fast.config import split_preset

    for name in preset_names():
        _, per_task = split_preset(name, preset_data(name))
        for task in per_task:
            extra = ["task.model=sd15-tiny"] if task == "diffusers" else []
            assert build_config(name, None, [f"task.name={task}", *extra]).task.name == task


@pytest.mark.parametrize("tasks, match", [
    ({"mnist": {"train": {"lr": 1.0}}}, "tasks.mnist"),
    ({"digits-ddim": {"train": {"lrr": 1.0}}}, "train.lrr"),
    ({"digits-ddim": 3}, "tasks.digits-ddim"),
    (["digits-ddim"], "'tasks'"),
])
def test_bad_per_task_section_names_it(monkeypatch, tasks, match):
    import rsm_fast.config as C

    real = C.preset_data
    monkeypatch.setattr(C, "preset_data", lambda name: {**real(name), "tasks": tasks})
    with pytest.raises(ConfigError, match=match) as e:
        C.build_config("grpo", None, ["task.name=digits-ddim"])
    assert "grpo" in _one_line(e)


def test_grpo_on_digits_fits_this_machine():
    """The preset's own sizes on digits: 512 x 50 records in one training forward estimated ~62 GB;
    its digits section needs well under 2 GB."""
    from rsm_fast import preflight as P

    cfg = build_config("grpo", None, ["task.name=digits-ddim"])
    assert P.estimate_memory(cfg, P.task_geometry(cfg)).total < 2 * 2**30


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


# -- issue 17, item 5: every value in range, numeric strings, machine bounds, one-line errors ------
import math  # noqa: E402
import os  # noqa: E402

import torch  # noqa: E402

from rsm_fast.config import RunConfig, describe_fields, load_yaml, validate  # noqa: E402
from rsm_fast.config_checks import RANGES, SEED_MAX  # noqa: E402

FIELDS = {k: d for k, _, d in describe_fields()}
FLOATS = [k for k, d in FIELDS.items() if isinstance(d, float)]
INTS = [k for k, d in FIELDS.items() if isinstance(d, int) and not isinstance(d, bool)]


def _fails(sets, field, preset="grpo", config=None):
    with pytest.raises(ConfigError) as e:
        build_config(preset, config, list(sets))
    msg = _one_line(e)
    assert field in msg, msg
    return msg


def test_every_number_has_a_range():
    assert FLOATS and INTS
    assert set(FLOATS + INTS) <= set(RANGES), set(FLOATS + INTS) - set(RANGES)


@pytest.mark.parametrize("field", FLOATS)
@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "1e999"])
def test_float_fields_refuse_nan_and_inf(field, value):
    msg = _fails([f"{field}={value}"], field)
    assert "finite" in msg


def test_float_fields_refuse_nan_in_a_file_naming_the_file(tmp_path):
    f = tmp_path / "nan.yaml"
    f.write_text("train:\n  max_grad_norm: .nan\nmethod:\n  adv_clip: .nan\n")
    msg = _fails([], "train.max_grad_norm", config=str(f))
    assert "nan.yaml" in msg


@pytest.mark.parametrize("expr, field, want", [
    ("train.lr=1e-3", "train", 1e-3), ("method.fo_reward_scale=-2E5", "method", -2e5),
    ("train.weight_decay=+5e-1", "train", 0.5), ("task.alpha=2", "task", 2.0),
])
def test_numeric_strings_are_numbers(expr, field, want):
    cfg = build_config("grpo", None, [expr])
    key = expr.split("=")[0].split(".")[1]
    got = getattr(getattr(cfg, field), key)
    assert isinstance(got, float) and got == want


def test_numeric_strings_in_a_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 1e-3\n  epochs: 1e2\n")
    cfg = build_config("grpo", str(f))
    assert cfg.train.lr == 1e-3 and cfg.train.epochs == 100 and isinstance(cfg.train.epochs, int)


@pytest.mark.parametrize("expr, want", [("train.epochs=1e3", 1000), ("train.epochs=2.0", 2),
                                        ("train.epochs=7", 7), ("train.epochs=1.0e+2", 100)])
def test_int_fields_take_exact_integers_only(expr, want):
    assert build_config("grpo", None, [expr]).train.epochs == want


@pytest.mark.parametrize("expr", ["train.epochs=1.5", "train.epochs=1e-3", "train.epochs=.nan",
                                  "train.epochs=1e999999999", "train.epochs=[1]", "train.epochs=''"])
def test_int_fields_refuse_the_rest(expr):
    _fails([expr], "train.epochs")


@pytest.mark.parametrize("value, ok", [(0, True), (SEED_MAX, True), (2**63, False), (-1, False),
                                       (1208925819614629174706176, False)])
def test_seed_is_bounded_by_what_torch_takes(value, ok):
    if ok:
        cfg = build_config("grpo", None, [f"train.seed={value}"])
        torch.Generator().manual_seed(cfg.train.seed + 1_000_003)     # the evaluation's seed fits too
    else:
        _fails([f"train.seed={value}"], "train.seed")


def test_threads_at_most_the_cpu_count():
    n = os.cpu_count() or 1
    assert build_config("grpo", None, [f"train.threads={n}"]).train.threads == n
    msg = _fails([f"train.threads={n + 1}"], "train.threads")
    assert "cpu_count" in msg
    _fails(["train.threads=100000"], "train.threads")
    assert "os.cpu_count()" in dict((k, h) for k, h, _ in describe_fields())["train.threads"]


@pytest.mark.parametrize("device", ["bogus", "CPU", "xla", "meta", "cpu:1", "cpu:x", "cuda:-1"])
def test_bad_devices_name_the_field(device):
    _fails([f"train.device={device}"], "train.device")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_without_cuda_is_one_line(device):
    msg = _fails([f"train.device={device}"], "train.device")
    assert "cpu" in msg


def test_cpu_device_and_defaults_validate():
    assert build_config("grpo", None, ["train.device=cpu"]).train.device == "cpu"
    validate(RunConfig())


@pytest.mark.parametrize("content", [b"train:\n  lr: 0.1\n  \xff\xfe\n", b"\x80abc"])
def test_non_utf8_config_file_names_the_file(tmp_path, content):
    f = tmp_path / "latin.yaml"
    f.write_bytes(content)
    with pytest.raises(ConfigError) as e:
        build_config("grpo", str(f))
    assert "latin.yaml" in _one_line(e) and "UTF-8" in str(e.value)


def test_config_file_must_be_a_regular_file(tmp_path):
    fifo = tmp_path / "pipe.yaml"
    os.mkfifo(fifo)                                  # reading it would block forever
    with pytest.raises(ConfigError) as e:
        load_yaml(fifo)
    assert "pipe.yaml" in _one_line(e) and "regular file" in str(e.value)
    with pytest.raises(ConfigError, match="regular file"):
        load_yaml("/dev/null")


def test_deeply_nested_yaml_is_one_line(tmp_path):
    f = tmp_path / "deep.yaml"
    f.write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError) as e:
        load_yaml(f)
    assert "deep.yaml" in _one_line(e)
    key, value = parse_set("train.lr=" + "[" * 5000)
    assert key == "train.lr" and isinstance(value, str)


@pytest.mark.parametrize("sets, field", [
    (["task.eta=0"], "task.eta"),
    (["task.eta=0", "rollout.plan=branch", "rollout.profile=const:2", "task.num_steps=10"], "task.eta"),
    (["task.name=digits-ddim", "task.eta=0"], "task.eta"),
    (["task.name=digits-flow", "task.noise_level=0"], "task.noise_level"),
    (["task.num_steps=1"], "task.num_steps"),
])
def test_a_plan_with_nothing_to_train_names_its_cause(sets, field):
    msg = _fails(sets, field)
    assert "rollout.waves" not in msg


def test_too_large_tree_is_refused_before_anything_is_built():
    msg = _fails(["rollout.plan=tree", "task.num_steps=40", "rollout.k=[" + ",".join(["64"] * 40) + "]"], "rollout.k")
    assert "rows" in msg


@pytest.mark.parametrize("expr, field", [
    ("task.reward_auth_env=1BAD", "task.reward_auth_env"), ("task.reward_auth_env=A-B", "task.reward_auth_env"),
    ("task.reward_timeout=1e12", "task.reward_timeout"), ("task.reward_max_mb=0", "task.reward_max_mb"),
    ("task.reward_retries=1000", "task.reward_retries"), ("train.checkpoint_every=-1", "train.checkpoint_every"),
    ("train.keep_checkpoints=0", "train.keep_checkpoints"), ("train.eval_every=1e10", "train.eval_every"),
    ("train.batch_size=2147483648", "train.batch_size"), ("policy.hidden=1000000", "policy.hidden"),
    ("policy.emb_dim=1", "policy.emb_dim"), ("task.num_steps=1001", "task.num_steps"),
    ("rollout.k=[-1]", "rollout.k"), ("train.lr_final_frac=2", "train.lr_final_frac"),
])
def test_new_and_bounded_fields(expr, field):
    _fails([expr], field)


def test_reward_auth_is_any_string_and_env_may_be_empty():
    cfg = build_config("grpo", None, ["task.reward_auth=Bearer \u00e9\u00e0 x", "task.reward_auth_env="])
    assert cfg.task.reward_auth == "Bearer \u00e9\u00e0 x" and cfg.task.reward_auth_env == ""


@pytest.mark.parametrize("value", ["a\x00b", "caf\udce9"])
def test_strings_refuse_nul_and_undecodable_bytes(value):
    _fails([f"task.prompts={value}"], "task.prompts")


def test_error_with_a_newline_in_the_key_stays_one_line():
    with pytest.raises(ConfigError) as e:
        build_config("grpo", None, ["train.no\nsuch=1"])
    assert "\n" not in str(e.value) and "no\\nsuch" in str(e.value)


def test_lora_targets_must_name_something_for_image_models():
    _fails(["task.name=digits-ddim", "policy.lora_targets=, ,"], "policy.lora_targets")
    assert build_config("grpo", None, ["task.name=digits-ddim", "policy.lora_targets=to_q,,to_k"])
    assert build_config("grpo", None, ["policy.lora_targets="])     # the 2-D task has no LoRA


def test_validate_catches_values_set_in_code():
    cfg = RunConfig()
    cfg.train.lr = math.inf
    with pytest.raises(ConfigError, match="train.lr"):
        validate(cfg)
    cfg = RunConfig()
    cfg.train.epochs = "3"
    with pytest.raises(ConfigError, match="train.epochs"):
        validate(cfg)
