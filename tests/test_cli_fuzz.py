"""CLI fuzz (issue 17, item 5): bad input never reaches the weights and always ends in one line.

``python -m rsm_fast.train`` (``rsm_fast.train.main``, called in-process; a few cases also as real
subprocesses) on a tiny 2-D run with one to three config fields set to adversarial values (NaN,
+-inf, huge, negative, zero, empty, wrong type, unicode, paths, YAML specials), given by ``--set``
or in a ``--config`` file. Every run must end with exit 0, 1 or 2; when not 0 with exactly one
``error:`` line on stderr, never a traceback and never an "internal error" (bad input is never a
bug report); and no checkpoint it leaves may hold a non-finite trained parameter.

The default profile is bounded (derandomized, ~120 examples, about a minute of CPU after the
fused ops are built); a randomized profile with 1500 examples is marked ``slow`` (about two
minutes; deselect with ``-m "not slow"``).

Memory safety: every config validated in this module also passes :func:`rsm_fast.preflight.check`
(a fixture wraps ``rsm_fast.config.validate``), so a huge drawn size is refused before it is
allocated whatever ``rsm_fast/train.py`` does; ``test_train_calls_preflight`` checks that the CLI
runs the preflight itself, without that net.
"""
from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import rsm_fast.train as T  # noqa: E402
from rsm_fast import preflight  # noqa: E402
from rsm_fast.config import _CHOICES, describe_fields  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KEYS = [k for k, _, _ in describe_fields()]
TINY = ["train.epochs=2", "train.batch_size=16", "task.eval_samples=16", "task.num_steps=10", "policy.hidden=16",
        "train.threads=1"]
PRESETS = ["rsm-soft-zo", "grpo", "rsm-fo-terminal", "tempflow-evr"]   # sde zo / fo, branch + allocator

# YAML text as a user would type it after ``key=`` (or in a file). Valid values among them are cheap
# on the tiny base run (no count here is both valid and large: 2147483648 is over every int32 bound).
ADVERSARIAL = [
    ".nan", ".NaN", ".inf", "-.inf", "nan", "inf", "-inf", "1e309", "-1e309", "1e300", "-1e300", "1e-300",
    "1.0e+300", "3.4e38", "-3.4e38", "1e12", "1e-7", "100.5", "0", "-0.0", "-1", "1", "2", "3", "0.5", "1.5", "-2E5", "1e-3", "1e1", "1_6", "0x10", "0o17",
    "2147483648", "9223372036854775807", "9223372036854775808", "18446744073709551616", "-9223372036854775809",
    "1208925819614629174706176", "2**80", "1e999999999", "", " ", "~", "null", "true", "false", "off", "on",
    "yes", "[]", "[1, 2]", "[-1]", "[.nan]", "[1e300]", "{a: 1}", "{}", "abc", "'quoted'", '"dq"', "\u00fcn\u00efc\u00f6d\u00e9",
    "\u65e5\u672c", "\u202e", "caf\udce9", "a\x00b", "line\nbreak", "/etc/passwd", "/dev/zero", "../../x",
    "/nonexistent/dir/p.txt", ".", "-", "--", "=", "a=b", "!!binary aGVsbG8=", "!!python/object/apply:os.system ['true']",
    "2001-12-14", "&a [*a]", "[", "]", "{", ": x", "- a", "|", "#", "x" * 3000, "cpu", "cuda", "cuda:7", "meta",
    "const:4", "every:2:3", "at:0,3:2", "base2", "linear", "jpeg", "os:getcwd",
]
BAD_KEYS = ["train.nope", "train", "nope.lr", "", ".", "train.lr.x", "TRAIN.LR", "task.name.x", "train..lr",
            "preset", "description", "\u00fcber.x"]


DEFAULTS = {k: d for k, _, d in describe_fields()}
PLAUSIBLE_INT = ["0", "1", "2", "3", "4", "8", "16"]
PLAUSIBLE_FLOAT = ["0", "0.5", "1", "2", "1e-3", "1e3", "1e30", "1e300", "-1", "0.999"]


def _plausible(key: str):
    """Values of the field's own kind, mostly valid: where combinations of legal values meet."""
    d = DEFAULTS.get(key)
    if key in _CHOICES:
        return st.sampled_from([str(c) if c else "''" for c in _CHOICES[key]])
    if isinstance(d, bool):
        return st.sampled_from(["true", "false"])
    if isinstance(d, int):
        return st.sampled_from(PLAUSIBLE_INT)
    if isinstance(d, float):
        return st.one_of(st.sampled_from(PLAUSIBLE_FLOAT), st.floats(-10, 10).map(repr))
    if isinstance(d, list) or key == "rollout.k":
        return st.lists(st.integers(0, 4), min_size=9, max_size=10).map(lambda v: "[" + ", ".join(map(str, v)) + "]")
    return st.sampled_from(["''", "abc", "const:2", "linear", "cpu", "to_q", "x" * 40])


def _value_for(key: str):
    adversarial = st.one_of(
        st.sampled_from(ADVERSARIAL),
        st.floats(allow_nan=True, allow_infinity=True).map(lambda v: repr(v).replace("nan", ".nan").replace("inf", ".inf")),
        st.integers(min_value=-2**70, max_value=2**70).filter(lambda v: not 1 < v < 2**31).map(str),
        st.text(max_size=12))
    return st.one_of(adversarial, _plausible(key), _plausible(key))


@st.composite
def _cases(draw):
    n = draw(st.integers(1, 3))
    pairs = []
    for _ in range(n):
        key = draw(st.sampled_from(BAD_KEYS)) if draw(st.integers(0, 19)) == 0 else draw(st.sampled_from(KEYS))
        pairs.append((key, draw(_value_for(key)), draw(st.sampled_from(["set", "file"]))))
    return draw(st.sampled_from(PRESETS)), pairs


# ----------------------------------------------------------------------------------------------
import rsm_fast.config as C  # noqa: E402

_REAL_VALIDATE = C.validate


@pytest.fixture(scope="module", autouse=True)
def preflight_after_validate():
    """Memory safety whatever train.py does: every config validated in this module also passes
    preflight.check (cheap; twice once the CLI calls it too), so a huge drawn size is refused
    before anything is allocated. ``test_train_calls_preflight`` checks the CLI without this."""
    def validate_then_check(cfg):
        _REAL_VALIDATE(cfg)
        preflight.check(cfg)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(C, "validate", validate_then_check)
        yield


def _argv(preset: str, pairs, out: Path, workdir: Path) -> list[str]:
    argv = ["--preset", preset, "--quiet", "--out", str(out)]
    for s in TINY:
        argv += ["--set", s]
    lines: dict[str, list[str]] = {}
    for key, value, how in pairs:
        if how == "set" or "." not in key:
            argv += ["--set", f"{key}={value}"]
        else:
            sec, name = key.split(".", 1)
            lines.setdefault(sec, []).append(f"  {name}: {value}")
    if lines:
        f = workdir / "fuzz.yaml"
        f.write_text("".join(f"{sec}:\n" + "\n".join(v) + "\n" for sec, v in lines.items()), encoding="utf-8",
                     errors="surrogateescape")
        argv += ["--config", str(f)]
    return argv


def _run_in_process(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    threads = torch.get_num_threads()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                rc = T.main(argv)
            except SystemExit as e:          # argparse
                rc = e.code if isinstance(e.code, int) else 2
    finally:
        torch.set_num_threads(threads)
    return rc, err.getvalue()


def _check_outcome(rc, err: str, out: Path, what) -> None:
    assert rc in (0, 1, 2), (what, rc, err[-2000:])
    assert "Traceback" not in err, (what, err[-3000:])
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    if rc != 0:
        assert len(errors) == 1, (what, rc, err[-2000:])
        assert not errors[0].startswith("error: internal error"), (what, errors[0])
    else:
        assert not errors, (what, err[-2000:])
        assert (out / "checkpoint.pt").is_file(), (what, sorted(p.name for p in out.iterdir()))
    _check_checkpoints(out, what)


def _check_checkpoints(out: Path, what) -> None:
    try:
        if not out.is_dir():
            return
    except OSError:             # a name the file system refuses (too long)
        return
    for f in out.rglob("*.pt"):
        state = torch.load(f, map_location="cpu", weights_only=False)
        policy = state.get("policy", {}) if isinstance(state, dict) else {}
        for name, t in policy.items():
            assert torch.isfinite(t).all(), (what, f, name)


def _fuzz_one(preset, pairs):
    with tempfile.TemporaryDirectory(prefix="rsm-fuzz-") as d:
        out = Path(d) / "run"
        argv = _argv(preset, pairs, out, Path(d))
        rc, err = _run_in_process(argv)
        _check_outcome(rc, err, out, (preset, pairs))


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(_cases())
def test_cli_fuzz(case):
    _fuzz_one(*case)


@pytest.mark.slow
@settings(max_examples=1500, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(_cases())
def test_cli_fuzz_long(case):
    _fuzz_one(*case)


@pytest.mark.parametrize("key", KEYS)
def test_every_field_survives_nan_and_garbage(key, tmp_path):
    """Each field once with a value of the wrong kind for most fields (a sweep the random draw may miss)."""
    for value in (".nan", "[1, 2]", "caf\udce9"):
        out = tmp_path / f"run{abs(hash(value))}"
        rc, err = _run_in_process(_argv("grpo", [(key, value, "set")], out, tmp_path))
        _check_outcome(rc, err, out, (key, value))


# ----------------------------------------------------------------------------------------------
# the reported cases: exit 2 (or 1), one error line naming the field, nothing written for config errors
# ----------------------------------------------------------------------------------------------
def _nonutf8(tmp: Path) -> list[str]:
    f = tmp / "latin1.yaml"
    f.write_bytes(b"train:\n  lr: 0.01 # caf\xe9\n")
    return ["--config", str(f)]


def _prompt_typo(tmp: Path) -> list[str]:
    return ["--set", "task.name=diffusers", "--set", "task.model=sd15-tiny", "--set", f"task.prompts={tmp / 'typo.txt'}"]


CASES = [
    # (id, extra argv (or a function of tmp_path), exit code, what the error line names)
    ("lr-inf", ["--set", "train.lr=.inf"], 2, "train.lr"),
    ("wd-inf", ["--set", "train.weight_decay=.inf"], 2, "train.weight_decay"),
    ("lr-final-frac-inf", ["--set", "train.lr_final_frac=.inf"], 2, "train.lr_final_frac"),
    ("max-grad-norm-nan", ["--set", "train.max_grad_norm=.nan"], 2, "train.max_grad_norm"),
    ("adv-clip-nan", ["--set", "method.adv_clip=.nan"], 2, "method.adv_clip"),
    ("seed-2**80-int", ["--set", "train.seed=1208925819614629174706176"], 2, "train.seed"),
    ("seed-2**80-text", ["--set", "train.seed=2**80"], 2, "train.seed"),
    ("device-bogus", ["--set", "train.device=bogus"], 2, "train.device"),
    ("config-not-utf8", _nonutf8, 2, "latin1.yaml"),
    ("clip-eps-nan-grpo", ["--preset", "grpo", "--set", "method.clip_eps=.nan"], 2, "method.clip_eps"),
    ("threads-100000", ["--set", "train.threads=100000"], 2, "train.threads"),
    ("threads-4096", ["--set", "train.threads=4096"], 2, "train.threads"),
    ("eta-0", ["--set", "task.eta=0"], 2, "task.eta"),
    ("prompt-typo", _prompt_typo, 2, "task.prompts"),
    ("batch-1e9", ["--set", "train.batch_size=1000000000"], 2, "train.batch_size"),
    ("eval-samples-1e9", ["--set", "task.eval_samples=1000000000"], 2, "task.eval_samples"),
    ("tree-too-deep", ["--set", "rollout.plan=tree", "--set", "rollout.k=[8,8,8,8,8,8,8,8,8,8]"], 2, "train.batch_size"),
    ("lr-1e300", ["--set", "train.lr=1.0e+300"], 1, "train.lr"),
]
if not torch.cuda.is_available():
    CASES.append(("device-cuda-on-cpu-torch", ["--set", "train.device=cuda"], 2, "train.device"))
NEEDS_PREFLIGHT = {"prompt-typo", "batch-1e9", "eval-samples-1e9", "tree-too-deep"}


@pytest.mark.parametrize("extra, code, field", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_reported_cases(extra, code, field, tmp_path, capsys):
    out = tmp_path / "run"
    extra = extra(tmp_path) if callable(extra) else extra
    preset = [] if "--preset" in extra else ["--preset", "rsm-soft-zo"]
    argv = preset + ["--quiet", "--out", str(out)] + [a for s in TINY for a in ("--set", s)] + extra
    rc = T.main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == code, err
    assert len(lines) == 1 and lines[0].startswith("error:") and field in lines[0], lines
    assert "internal error" not in lines[0] and "Traceback" not in err
    if code == 2:                                  # refused before the run directory was touched
        assert not out.exists(), sorted(p.name for p in out.iterdir())
    _check_checkpoints(out, extra)


# Cases whose handling lives in files other than the config / preflight / train-step ones: the run
# directory (rsm_fast/train.py, rundir.py), the rewards, the trainer. One error line, exit 2 or 1.
def _out_under_a_file(tmp: Path) -> Path:
    (tmp / "plain").write_text("x")
    return tmp / "plain" / "run"


OTHER_CASES = [
    pytest.param(_out_under_a_file, [], 2, "--out", id="out-under-a-file"),
    pytest.param(lambda tmp: Path("/proc/rsm_fast_fuzz/run"), [], 2, "--out", id="out-unwritable"),
    pytest.param(lambda tmp: tmp / ("x" * 300), [], 2, "--out", id="out-name-too-long"),
    pytest.param(None, ["--set", "task.reward=no_such_reward"], 2, "no_such_reward", id="reward-unknown"),
    pytest.param(None, ["--set", "task.reward=no_such_module_xyz:fn"], 2, "no_such_module_xyz", id="reward-module-missing"),
    pytest.param(None, ["--set", "task.reward=builtins:print"], 2, "builtins:print", id="reward-wrong-result"),
    pytest.param(None, ["--preset", "grpo", "--set", "train.lr=1e6"], 1, "train.lr", id="lr-1e6-finite-but-huge"),
]


@pytest.mark.parametrize("out_fn, extra, code, needle", OTHER_CASES)
def test_other_layers_one_line(out_fn, extra, code, needle, tmp_path, capsys):
    out = out_fn(tmp_path) if out_fn else tmp_path / "run"
    preset = [] if "--preset" in extra else ["--preset", "rsm-soft-zo"]
    rc = T.main(preset + ["--quiet", "--out", str(out)] + [a for s in TINY for a in ("--set", s)] + extra)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == code and len(lines) == 1 and needle in lines[0], err[-2000:]
    assert "Traceback" not in err and "internal error" not in lines[0]
    _check_checkpoints(out, extra)


def test_lr_as_yaml_1_1_string_trains(tmp_path, capsys):
    out = tmp_path / "run"
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 1e-3\n")
    rc = T.main(["--preset", "grpo", "--config", str(f), "--quiet", "--out", str(out), "--set", "train.weight_decay=1e-4"]
                + [a for s in TINY for a in ("--set", s)])
    assert rc == 0, capsys.readouterr().err
    state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert state["config"]["train"]["lr"] == 1e-3 and state["config"]["train"]["weight_decay"] == 1e-4


def test_train_calls_preflight(tmp_path, monkeypatch, capsys):
    """Without this module's safety net: does the CLI itself run the preflight checks before the
    run directory? (a sentinel check_memory answers; the run is the tiny one otherwise)"""
    monkeypatch.setattr(C, "validate", _REAL_VALIDATE)

    def sentinel(*a, **k):
        raise C.ConfigError("config field 'preflight-sentinel'")

    monkeypatch.setattr(preflight, "check_memory", sentinel)
    for name in ("check_memory", "check"):
        if hasattr(T, name):
            monkeypatch.setattr(T, name, lambda cfg, *a, **k: sentinel())
    out = tmp_path / "run"
    rc = T.main(["--preset", "grpo", "--quiet", "--out", str(out)] + [a for s in TINY for a in ("--set", s)])
    err = capsys.readouterr().err
    assert rc == 2 and "preflight-sentinel" in err and not out.exists(), err[-500:]


# ----------------------------------------------------------------------------------------------
# a handful as real processes (the module entry point, stderr as the user sees it)
# ----------------------------------------------------------------------------------------------
SUBPROCESS = [
    ([b"--set", b"train.lr=.inf"], 2, b"train.lr"),
    ([b"--set", b"train.seed=1208925819614629174706176"], 2, b"train.seed"),
    ([b"--set", b"train.threads=100000"], 2, b"train.threads"),
    ([b"--set", b"task.prompts=caf\xe9"], 2, b"task.prompts"),        # a non-UTF-8 byte in argv
    ([b"--set", b"train.lr=1e300"], 1, b"train.lr"),
    ([b"--set", b"train.lr=1e-3"], 0, b""),
]


@pytest.mark.parametrize("extra, code, field", SUBPROCESS, ids=[c[0][1].decode("latin-1") for c in SUBPROCESS])
def test_as_a_process(extra, code, field, tmp_path):
    out = tmp_path / "run"
    argv = [sys.executable.encode(), b"-m", b"rsm_fast.train", b"--preset", b"grpo", b"--quiet", b"--out",
            str(out).encode()] + [a.encode() for s in TINY for a in ("--set", s)] + extra
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, timeout=900)
    assert p.returncode == code, p.stderr.decode(errors="replace")[-3000:]
    assert b"Traceback" not in p.stderr
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith(b"error:")]
    if code:
        assert len(errors) == 1 and field in errors[0], p.stderr
    else:
        assert not errors and (out / "checkpoint.pt").is_file()
    _check_checkpoints(out, extra)
