"""Redaction helpers (config.yaml / checkpoints), RewardOptions, and preflight of a reward spec."""
from __future__ import annotations

import dataclasses
import socket
import sys
import threading
import types
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from rsm_fast import rewards as R
from rsm_fast.config import RunConfig
from rsm_fast.rewards import RewardError

TOKEN = "tok_SECRET_123"


# ---------------------------------------------------------------- redaction


@pytest.mark.parametrize("url, want", [
    (f"https://h.example/score?token={TOKEN}&model=a", "https://h.example/score?token=***&model=a"),
    (f"http://bob:{TOKEN}@h:8080/x", "http://bob:***@h:8080/x"),
    (f"http://{TOKEN}@h/x", "http://***@h/x"),                     # a bare userinfo is often a token
    (f"http://h/x?API_KEY={TOKEN}&Signature=s1&X-Amz-Signature=s2&accessToken=a&page=2",
     "http://h/x?API_KEY=***&Signature=***&X-Amz-Signature=***&accessToken=***&page=2"),
    ("http://h/x?apikey=1&Password=2&passwd=3&secret=4&auth=5&sig=6&key=7&design=8",
     "http://h/x?apikey=***&Password=***&passwd=***&secret=***&auth=***&sig=***&key=***&design=8"),
    ("http://127.0.0.1:9/plain", "http://127.0.0.1:9/plain"),
])
def test_redact_url(url, want):
    assert R.redact_url(url) == want


def test_redact_spec_keeps_weights_and_non_url_terms():
    spec = f"0.7*aesthetic:/m/a+b + 2 * https://u:{TOKEN}@h:1/s?token={TOKEN}+x&n=1+tests.bad_rewards:nan_reward"
    out = R.redact_spec(spec)
    assert TOKEN not in out
    assert out == "0.7*aesthetic:/m/a+b + 2 * https://u:***@h:1/s?token=***&n=1+tests.bad_rewards:nan_reward"
    assert R.parse_spec(out)[1] == (2.0, "https://u:***@h:1/s?token=***&n=1")   # still parses
    assert R.redact_spec("jpeg") == "jpeg" and R.redact_spec("0.5*brightness+linear") == "0.5*brightness+linear"


def test_redact_config_copies_and_hides_the_reward_secrets():
    cfg = RunConfig()
    cfg.task.reward = f"0.5*jpeg+http://h:1/s?key={TOKEN}"
    cfg.task.reward_auth = "Bearer " + TOKEN
    d = dataclasses.asdict(cfg)
    out = R.redact_config(d)
    assert TOKEN not in repr(out)
    assert out["task"]["reward"] == "0.5*jpeg+http://h:1/s?key=***" and out["task"]["reward_auth"] == "***"
    assert d["task"]["reward_auth"] == "Bearer " + TOKEN                    # the input is untouched
    assert {k: v for k, v in out.items() if k != "task"} == {k: v for k, v in d.items() if k != "task"}
    assert R.redact_config(dataclasses.asdict(RunConfig()))["task"]["reward_auth"] == ""   # empty stays empty


def test_reward_options_validate_and_hide_auth():
    o = R.RewardOptions(auth="Bearer " + TOKEN)
    assert TOKEN not in repr(o) and TOKEN not in str(o) and "auth='***'" in repr(o)
    with pytest.raises(ValueError, match="task.reward_timeout"):
        R.RewardOptions(timeout=-1)
    with pytest.raises(ValueError, match="task.reward_retries"):
        R.RewardOptions(retries=-1)
    with pytest.raises(ValueError, match="task.reward_max_mb"):
        R.RewardOptions(max_bytes=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.timeout = 1


# ---------------------------------------------------------------- preflight


class _Ok(BaseHTTPRequestHandler):
    def do_POST(self):      # preflight sends no request; a request would show up as a failure
        raise AssertionError("preflight must not send a request")

    def log_message(self, *a):
        pass


@pytest.fixture(scope="module")
def live_url():
    srv = HTTPServer(("127.0.0.1", 0), _Ok)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/score?token={TOKEN}"
    srv.shutdown()
    srv.server_close()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_preflight_accepts_good_specs_without_building_models(live_url, tmp_path, monkeypatch):
    built = []
    monkeypatch.setitem(R.REGISTRY, "heavy", R.registry.Entry(lambda a, t: built.append(a), "required", "", None))
    R.preflight("linear")                               # needs the task to build: still passes
    R.preflight("0.5*jpeg+color:1,0,0+brightness+tests.bad_rewards:quadratic_reward", R.RewardOptions())
    R.preflight(f"heavy:/x+aesthetic:{tmp_path}")       # an empty folder: the model is not loaded
    R.preflight(live_url, R.RewardOptions(timeout=3))
    assert built == []
    with pytest.raises(RewardError, match="missing file"):       # whereas building would load it
        R.make_reward(f"aesthetic:{tmp_path}")


@pytest.mark.parametrize("spec, needle", [
    ("aesthetik", "unknown reward 'aesthetik'"),
    ("2*", "empty term"),
    ("aesthetic", "needs an argument"),
    ("jpeg:5", "takes no argument"),
    ("color:1,2", "expected 1 or 3 values"),
    ("aesthetic:/no/such/dir", "directory '/no/such/dir' does not exist"),
    ("no_such_module_xyz:fn", "cannot import module 'no_such_module_xyz'"),
    ("tests.bad_rewards:no_such_fn", "'no_such_fn' is not a callable"),
    ("tests.bad_rewards:THREADS", "'THREADS' is not a callable"),
    ("http://no-such-host.invalid:8000/x", "cannot resolve host 'no-such-host.invalid'"),
])
def test_preflight_reports_bad_specs_in_one_line(spec, needle):
    with pytest.raises(RewardError) as ei:
        R.preflight(spec, R.RewardOptions(timeout=3))
    assert needle in str(ei.value) and "\n" not in str(ei.value)


def test_preflight_reports_an_unreachable_server_with_its_url_redacted():
    url = f"http://u:{TOKEN}@127.0.0.1:{_free_port()}/score?token={TOKEN}"
    with pytest.raises(RewardError) as ei:
        R.preflight("0.5*jpeg+" + url, R.RewardOptions(timeout=3))
    msg = str(ei.value)
    assert "is unreachable" in msg and "refused" in msg and TOKEN not in msg
    assert "http://u:***@127.0.0.1:" in msg and "token=***" in msg


def test_preflight_reports_a_module_that_fails_on_import(monkeypatch, tmp_path):
    (tmp_path / "broken_reward_mod.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RewardError, match="cannot import module 'broken_reward_mod' \\(RuntimeError: boom at import\\)"):
        R.preflight("broken_reward_mod:fn")
    monkeypatch.setitem(sys.modules, "fake_mod_ok", types.SimpleNamespace(fn=lambda x: x))
    R.preflight("fake_mod_ok:fn")
