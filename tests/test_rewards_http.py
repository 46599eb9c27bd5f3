"""The HTTP reward-server client against a real local ``http.server`` on a thread."""
from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from PIL import Image

from rsm_fast import rewards as R
from rsm_fast.rewards import RewardError

FAST = dict(timeout=5.0, retries=1, backoff=0.01)      # total deadline: ample for loopback, short for /slow
SLOW = dict(FAST, timeout=0.25)                        # below /slow's 0.6 s


class _Handler(BaseHTTPRequestHandler):
    hits: Counter = Counter()
    requests: list = []

    def log_message(self, *args):          # keep the test output clean
        pass

    def _send(self, code, body: bytes, ctype="application/json"):
        try:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):    # the client already timed out
            pass

    def do_POST(self):
        n = self.hits[self.path] = self.hits[self.path] + 1
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Handler.requests.append(req)
        imgs = [np.asarray(Image.open(io.BytesIO(base64.b64decode(s)))) for s in req["images"]]
        means = [float(a.mean()) / 255 for a in imgs]
        if self.path == "/good":
            bonus = [len(p) for p in req["prompts"]] if req["prompts"] else [0] * len(means)
            return self._send(200, json.dumps({"scores": [m + b for m, b in zip(means, bonus)]}).encode())
        if self.path == "/slow":
            time.sleep(0.6)
            return self._send(200, json.dumps({"scores": means}).encode())
        if self.path == "/garbage":
            return self._send(200, b"<html>Internal proxy page</html>", "text/html")
        if self.path == "/short":
            return self._send(200, json.dumps({"scores": means[:-1]}).encode())
        if self.path == "/nan":
            return self._send(200, b'{"scores": [NaN' + b", 1.0" * (len(means) - 1) + b"]}")
        if self.path == "/strings":
            return self._send(200, json.dumps({"scores": ["high"] * len(means)}).encode())
        if self.path == "/flaky" and n == 1:
            return self._send(503, b"warming up")
        if self.path == "/flaky":
            return self._send(200, json.dumps({"scores": means}).encode())
        if self.path == "/down":
            return self._send(500, b"model crashed")
        return self._send(404, b"no such endpoint")


@pytest.fixture(scope="module")
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def _images(b=3, c=3, seed=0):
    return torch.rand(b, c, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("channels", [1, 3])
def test_good_server_round_trips_images_prompts_and_metadata(server, channels):
    x = _images(c=channels)
    rw = R.make_reward(server + "/good")
    assert isinstance(rw, R.HttpReward) and not rw.differentiable and rw.name == server + "/good"
    s = rw(x, ["a", "abc", ""], [{"id": 1}, {"id": 2}, {"id": 3}])
    assert s.dtype == torch.float32 and s.shape == (3,)
    # PNG is lossless: the server sees the uint8-rounded pixels, so its means agree to rounding
    assert torch.allclose(s - torch.tensor([1.0, 3.0, 0.0]), x.mean((1, 2, 3)), atol=1 / 255)
    last = _Handler.requests[-1]
    assert last["prompts"] == ["a", "abc", ""] and last["metadata"] == [{"id": 1}, {"id": 2}, {"id": 3}]
    assert torch.allclose(rw(x), x.mean((1, 2, 3)), atol=1 / 255)       # prompts omitted -> null


def test_slow_server_hits_the_total_deadline(server):
    # one deadline over all attempts: the first attempt uses it up, so no retry is started
    rw = R.HttpReward(server + "/slow", **SLOW)
    before = _Handler.hits["/slow"]
    t0 = time.perf_counter()
    with pytest.raises(RewardError, match=r"timed out: no reply within the total deadline of 0.25 s "
                                          r"\(task.reward_timeout\) \(after 1 attempt\)"):
        rw(_images())
    assert rw.attempts == 1 and 0.2 < time.perf_counter() - t0 < 0.25 + 30
    time.sleep(0.1)
    assert _Handler.hits["/slow"] - before == 1


def test_connection_refused():
    with socket.socket() as s:                 # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rw = R.HttpReward(f"http://127.0.0.1:{port}/score", **FAST)
    with pytest.raises(RewardError, match="connection refused.*after 2 attempts"):  # refused at once: retried
        rw(_images())


@pytest.mark.parametrize("path, needle", [
    ("/garbage", "response is not JSON (starts with '<html>Internal proxy page</html>')"),
    ("/short", "returned 2 scores for 3 images"),
    ("/nan", "returned NaN/inf for 1 of 3 images"),
    ("/strings", "'scores' holds non-numbers"),
    ("/missing", "HTTP 404"),
])
def test_bad_replies_fail_at_once_with_one_line(server, path, needle):
    rw = R.HttpReward(server + path, **FAST)
    with pytest.raises(RewardError) as ei:
        rw(_images())
    msg = str(ei.value)
    assert needle in msg and server + path in msg and "\n" not in msg
    assert rw.attempts == 1                    # not transient: no retry


def test_server_errors_are_retried_with_backoff(server):
    rw = R.HttpReward(server + "/flaky", **FAST)
    s = rw(_images())
    assert rw.attempts == 2 and torch.allclose(s, _images().mean((1, 2, 3)), atol=1 / 255)
    down = R.HttpReward(server + "/down", timeout=1.0, retries=2, backoff=0.05)
    t0 = time.perf_counter()
    with pytest.raises(RewardError, match=r"HTTP 500 .*model crashed \(after 3 attempts\)"):
        down(_images())
    assert time.perf_counter() - t0 >= 0.05 + 0.1          # backoff 0.05 then 0.1 s


@pytest.mark.parametrize("path, needle", [("/slow", "timed out"), ("/garbage", "not JSON"), ("/short", "2 scores")])
def test_server_faults_under_both_policies(server, path, needle):
    rw = R.HttpReward(server + path, **(SLOW if path == "/slow" else FAST))
    with pytest.raises(RewardError, match=needle):
        R.evaluate_rewards(rw, _images(), policy="error")
    res = R.evaluate_rewards(rw, _images(), policy="skip")
    assert not res.ok and res.scores is None and needle in res.reason


def test_unserialisable_metadata_and_bad_urls(server):
    rw = R.HttpReward(server + "/good", **FAST)
    with pytest.raises(RewardError, match="not JSON-serialisable"):
        rw(_images(1), ["p"], [{"tensor": torch.zeros(1)}])
    with pytest.raises(RewardError, match="must start with http"):
        R.HttpReward("ftp://x")


def test_weighted_sum_with_a_server_term(server):
    x = _images()
    mixed = R.make_reward(f"0.5*brightness+2*{server}/good")
    res = R.evaluate_rewards(mixed, x)
    assert set(res.components) == {"brightness", server + "/good"}
    assert torch.allclose(res.scores, 2.5 * x.mean((1, 2, 3)), atol=2 / 255)
