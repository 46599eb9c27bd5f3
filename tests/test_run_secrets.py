"""A training run against a reward server on 127.0.0.1 whose URL carries a token and whose
Authorization header comes from the environment (issue 17, item 6): the server sees both, no file
the run writes (config, log, checkpoints, summary) and no message holds either, and ``--resume``
asks for the redacted secret instead of sending ``***``."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

pytest.importorskip("diffusers")

URL_TOKEN = "tok-9f3c1e77a2"
AUTH = "Bearer hdr-5b1d0c44e8"
TIMEOUT = 900


class _Scores(BaseHTTPRequestHandler):
    seen: list = []

    def log_message(self, *args):
        pass

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Scores.seen.append((self.path, self.headers.get("Authorization")))
        body = json.dumps({"scores": [float(i % 3) for i in range(len(req["images"]))]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Scores)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    _Scores.seen = []
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def _cli(cwd, *args, fault=None):
    env = {k: v for k, v in os.environ.items() if k not in ("RSM_FAST_FAULT", "RSM_FAST_REWARD_AUTH")}
    env["RSM_FAST_REWARD_AUTH"] = AUTH
    if fault:
        env["RSM_FAST_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "rsm_fast.train", "--quiet", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT)


def test_secrets_reach_the_server_and_no_written_file(tmp_path, server):
    url = f"{server}/score?token={URL_TOKEN}"
    sets = ["task.condition=none", "task.num_steps=4", "train.batch_size=8", "method.group_size=4",
            "task.eval_samples=8", "train.threads=1", "train.epochs=3", "train.checkpoint_every=1"]
    args = ["--preset", "grpo", "--task", "digits-ddim", "--reward", url, "--out", "run"]
    for s in sets:
        args += ["--set", s]
    p = _cli(tmp_path, *args, fault="after-log:2")
    assert p.returncode == -9, p.stderr
    assert _Scores.seen and all(path == f"/score?token={URL_TOKEN}" and auth == AUTH for path, auth in _Scores.seen)
    # resuming from config.yaml alone: the token was never written, so the run asks for it
    p = _cli(tmp_path, "--resume", "run")
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "task.reward" in p.stderr, p.stderr
    p = _cli(tmp_path, "--resume", "run", "--reward", url)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "run" / "summary.json").exists()
    written = [f for f in (tmp_path / "run").rglob("*") if f.is_file()]
    assert any(f.name == "state.pt" for f in written)
    for f in written:
        data = f.read_bytes()
        for secret in (URL_TOKEN, AUTH, AUTH.split()[1]):
            assert secret.encode() not in data, f"{secret} in {f}"
    assert "score?token=***" in (tmp_path / "run" / "config.yaml").read_text()
    assert URL_TOKEN not in p.stderr + p.stdout and AUTH not in p.stderr + p.stdout
