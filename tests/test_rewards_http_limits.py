"""HTTP reward client limits: redirects, body cap, total deadline, retries, auth header, secrets."""
from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from rsm_fast import rewards as R
from rsm_fast.config import TaskConfig
from rsm_fast.rewards import RewardError, remote

SLACK = 30.0
TOKEN, PASSWORD, AUTH = "tok_SECRET_123", "pw_SECRET_456", "Bearer auth_SECRET_789"


class _Handler(BaseHTTPRequestHandler):
    """One server per fixture; ``self.server.log`` records (path, Authorization) of each request."""

    def log_message(self, *args):
        pass

    def _scores(self, n=2):
        return json.dumps({"scores": [0.5] * n}).encode()

    def _reply(self, code, body=b"", headers=(), length=True):
        try:
            self.send_response(code)
            for k, v in headers:
                self.send_header(k, v)
            if length:
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:
            pass

    def do_POST(self):
        path = self.path.split("?", 1)[0]
        self.server.log.append((self.path, self.headers.get("Authorization")))
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        srv = self.server
        if path == "/good":
            return self._reply(200, self._scores(), [("Content-Type", "application/json")])
        if path == "/away":                                  # to the other host
            return self._reply(302, b"", [("Location", f"{srv.other}/good?token={TOKEN}")])
        if path == "/near":                                  # same origin, relative Location
            return self._reply(307, b"", [("Location", "/good")])
        if path == "/loop":
            return self._reply(302, b"", [("Location", "/loop")])
        if path == "/big-announced":                         # says 10 MB, sends a little
            return self._reply(200, b'{"scores": [', [("Content-Length", str(10 << 20))], length=False)
        if path == "/big-stream":                            # no Content-Length: endless body
            self._reply(200, b"", length=False)
            return self._stream(b" " * 8192, limit=200 << 20)
        if path == "/chunked":
            return self._chunked([b'{"scores": ', b"[0.25, ", b"0.75]}"])
        if path == "/big-chunked":
            return self._chunked([b" " * 65536] * 64)
        if path == "/trickle":                               # honest length, one byte per 0.2 s
            self._reply(200, b"", [("Content-Length", "1000")], length=False)
            return self._stream(b" ", limit=300, pause=0.2)
        if path == "/trickle-headers":                       # a header that never ends
            try:
                self.wfile.write(b"HTTP/1.0 200 OK\r\nX-Slow: ")
            except OSError:
                return
            return self._stream(b"a", limit=300, pause=0.2)
        if path == "/down":
            return self._reply(500, b"model crashed")
        if path == "/echo":                                  # a server that echoes credentials back
            return self._reply(401, f"bad credentials {self.path} {self.headers.get('Authorization')}".encode())
        return self._reply(404, b"no such endpoint")

    def _stream(self, piece, limit, pause=0.0):
        sent = 0
        try:
            while sent < limit:
                self.wfile.write(piece)
                self.wfile.flush()
                sent += len(piece)
                if pause:
                    time.sleep(pause)
        except OSError:
            pass

    def _chunked(self, pieces):
        self.protocol_version = "HTTP/1.1"
        try:
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Connection", "close")
            self.end_headers()
            for p in pieces:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(p), p))
            self.wfile.write(b"0\r\n\r\n")
        except OSError:
            pass


def _serve(host):
    srv = ThreadingHTTPServer((host, 0), _Handler)
    srv.daemon_threads = True
    srv.log = []
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


@pytest.fixture(scope="module")
def servers():
    a = _serve("127.0.0.1")
    try:
        b = _serve("127.0.0.2")        # Linux routes all of 127/8 to loopback: a second host
    except OSError:
        a.shutdown()
        pytest.skip("127.0.0.2 is not routable here")
    a.other = f"http://127.0.0.2:{b.server_address[1]}"
    b.other = f"http://127.0.0.1:{a.server_address[1]}"
    yield a, b
    for s in (a, b):
        s.shutdown()
        s.server_close()


@pytest.fixture
def url(servers):
    a, b = servers
    a.log.clear()
    b.log.clear()
    return f"http://127.0.0.1:{a.server_address[1]}"


def _img(b=2):
    return torch.rand(b, 3, 4, 4, generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------- redirects


def test_redirect_to_another_host_is_refused_and_its_scores_never_used(servers, url):
    a, b = servers
    rw = R.HttpReward(url + "/away", timeout=10, retries=2, backoff=0.01)
    with pytest.raises(RewardError) as ei:
        rw(_img())
    msg = str(ei.value)
    assert "refused HTTP 302 redirect to another origin (http://127.0.0.2:" in msg and "\n" not in msg
    assert TOKEN not in msg and rw.attempts == 1          # not transient: no retry
    assert b.log == []                                    # the other host never saw the batch
    assert [p for p, _ in a.log] == ["/away"]


def test_same_origin_redirect_is_followed_a_bounded_number_of_times(url, servers):
    rw = R.HttpReward(url + "/near", timeout=10)
    assert torch.equal(rw(_img()), torch.tensor([0.5, 0.5]))
    assert [p for p, _ in servers[0].log] == ["/near", "/good"]
    with pytest.raises(RewardError, match="more than 3 redirects"):
        R.HttpReward(url + "/loop", timeout=10, max_redirects=3)(_img())
    assert sum(p == "/loop" for p, _ in servers[0].log) == 4


# ---------------------------------------------------------------- body cap


def test_announced_oversized_body_is_refused_before_reading(url):
    rw = R.HttpReward(url + "/big-announced", timeout=10, max_bytes=1000)
    with pytest.raises(RewardError, match=r"announced 10485760 bytes, over the cap of 1000 bytes \(task.reward_max_mb\)"):
        rw(_img())
    assert rw.attempts == 1


@pytest.mark.parametrize("path", ["/big-stream", "/big-chunked"])
def test_body_without_length_is_cut_at_the_cap(url, path, monkeypatch):
    got = []
    real = remote._TimedSocket.recv_into

    def counting(self, buf, *args):
        n = real(self, buf, *args)
        got.append(n)
        return n

    monkeypatch.setattr(remote._TimedSocket, "recv_into", counting)
    cap = 100_000
    rw = R.HttpReward(url + path, timeout=20, max_bytes=cap)
    with pytest.raises(RewardError, match=f"more than {cap} bytes, over the cap"):
        rw(_img())
    # bytes taken off the socket: the cap + 1, the headers, chunk framing and one read buffer at most
    assert cap < sum(got) < cap + 1 + 16384 + 8192


def test_chunked_reply_is_read(url):
    assert torch.equal(R.HttpReward(url + "/chunked", timeout=10)(_img()), torch.tensor([0.25, 0.75]))


# ---------------------------------------------------------------- total deadline and retries


@pytest.mark.parametrize("path", ["/trickle", "/trickle-headers"])
def test_trickling_server_hits_the_total_deadline(url, path):
    # every read gets a byte within 0.2 s, so only a deadline over the whole call can end it
    rw = R.HttpReward(url + path, timeout=1.0, retries=3, backoff=0.01)
    t0 = time.monotonic()
    with pytest.raises(RewardError, match=r"total deadline of 1 s \(task.reward_timeout\)"):
        rw(_img())
    assert time.monotonic() - t0 < 1.0 + SLACK


def test_retries_stay_within_the_deadline(url, servers):
    rw = R.HttpReward(url + "/down", timeout=1.0, retries=1000, backoff=0.05)
    t0 = time.monotonic()
    with pytest.raises(RewardError, match=r"HTTP 500 .*model crashed \(after \d+ attempts\)"):
        rw(_img())
    assert time.monotonic() - t0 < 1.0 + SLACK
    # backoff 0.05, 0.1, 0.2, 0.4, ... : at most 5 attempts fit in 1 s, far fewer than 1001
    assert 2 <= rw.attempts <= 6 and len(servers[0].log) == rw.attempts


def test_refused_connection_retries_until_the_deadline():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rw = R.HttpReward(f"http://127.0.0.1:{port}/x", timeout=0.5, retries=1000, backoff=0.02)
    with pytest.raises(RewardError, match="connection refused"):
        rw(_img())
    assert 1 < rw.attempts < 1001


# ---------------------------------------------------------------- auth header and options


def test_auth_header_from_options_reaches_every_http_term(url, servers):
    opts = R.RewardOptions(timeout=10, retries=0, max_bytes=4096, auth=AUTH)
    rw = R.make_reward(url + "/good", options=opts)
    assert rw.timeout == 10 and rw.retries == 0 and rw.max_bytes == 4096
    rw(_img())
    mixed = R.make_reward(f"0.5*brightness+2*{url}/good", options=opts)
    R.evaluate_rewards(mixed, _img())
    fn, builtin = R.resolve(url + "/good", None, options=opts)
    fn(_img())
    assert not builtin and [h for _, h in servers[0].log] == [AUTH] * 3


def test_auth_header_from_the_environment(url, servers, monkeypatch):
    monkeypatch.setenv("MY_REWARD_AUTH", "Token env_SECRET")
    opts = R.RewardOptions.from_task_config(TaskConfig(reward_auth_env="MY_REWARD_AUTH", reward_timeout=7,
                                                       reward_retries=1, reward_max_mb=0.5))
    assert opts == R.RewardOptions(timeout=7.0, retries=1, max_bytes=524288, auth="Token env_SECRET")
    assert "env_SECRET" not in repr(opts)
    R.make_reward(url + "/good", options=opts)(_img())
    assert servers[0].log[-1][1] == "Token env_SECRET"
    explicit = R.RewardOptions.from_task_config(TaskConfig(reward_auth="Bearer x1", reward_auth_env="MY_REWARD_AUTH"))
    assert explicit.auth == "Bearer x1"                 # the config value wins over the variable
    assert R.RewardOptions.from_task_config(TaskConfig(reward_timeout=0)).http_kwargs()["timeout"] is None


def test_no_auth_header_without_auth(url, servers):
    R.HttpReward(url + "/good", timeout=10)(_img())
    assert servers[0].log[-1][1] is None


# ---------------------------------------------------------------- secrets stay out of messages


def _secret_free(text):
    return all(s not in text for s in (TOKEN, PASSWORD, AUTH, AUTH.split()[1]))


def test_secrets_never_appear_in_errors_names_or_reprs(url):
    host = url.replace("http://", "")
    for path in ("/echo", "/away", "/missing", "/big-announced"):
        rw = R.HttpReward(f"http://user:{PASSWORD}@{host}{path}?token={TOKEN}&x=1", timeout=10, retries=0,
                          max_bytes=1000, auth=AUTH)
        with pytest.raises(RewardError) as ei:
            rw(_img())
        res = R.evaluate_rewards(rw, _img(), policy="skip")
        for text in (str(ei.value), repr(ei.value), res.reason, rw.name, repr(rw)):
            assert _secret_free(text), text
        assert "token=***" in str(ei.value) and "user:***@" in str(ei.value)
    assert "bad credentials" in str(R.evaluate_rewards(
        R.HttpReward(f"{url}/echo?token={TOKEN}", timeout=10, auth=AUTH), _img(), policy="skip").reason)


def test_secrets_stay_out_of_connection_and_spec_errors():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bad = f"http://127.0.0.1:{port}/x?api_key={TOKEN}"
    with pytest.raises(RewardError) as ei:
        R.HttpReward(bad, timeout=5, retries=0, auth=AUTH)(_img())
    assert "connection refused" in str(ei.value) and _secret_free(str(ei.value))
    for spec in (f"ftp://u:{PASSWORD}@h/x", f"jpeg+htps://h/x?token={TOKEN}", f"0.5*http://h:notaport/x?token={TOKEN}"):
        with pytest.raises(RewardError) as ei:
            R.make_reward(spec)
        assert _secret_free(str(ei.value)), str(ei.value)
    with pytest.raises(RewardError) as ei:
        R.HttpReward("http://127.0.0.1:1/x", auth=f"Bearer {TOKEN}\r\nX-Evil: 1")
    assert _secret_free(str(ei.value)) and "control characters" in str(ei.value)


# ---------------------------------------------------------------- HTTPS (self-signed, own CA file)


@pytest.fixture(scope="module")
def tls_url(tmp_path_factory):
    import shutil
    import ssl
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a test certificate")
    d = tmp_path_factory.mktemp("tls")
    key, cert = d / "key.pem", d / "cert.pem"
    r = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                        "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
                        "-addext", "subjectAltName=IP:127.0.0.1"], capture_output=True, timeout=60)
    if r.returncode:
        pytest.skip("openssl could not make a test certificate")
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads, srv.log, srv.other = True, [], "https://127.0.0.2:1"
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"https://127.0.0.1:{srv.server_address[1]}", str(cert)
    srv.shutdown()
    srv.server_close()


def test_https_verifies_the_certificate_and_keeps_the_deadline(tls_url):
    url, cafile = tls_url
    assert torch.equal(R.HttpReward(url + "/good", timeout=10, cafile=cafile)(_img()), torch.tensor([0.5, 0.5]))
    untrusted = R.HttpReward(url + "/good", timeout=10, retries=3)           # system trust store only
    with pytest.raises(RewardError, match="TLS failed: CERTIFICATE_VERIFY_FAILED"):
        untrusted(_img())
    assert untrusted.attempts == 1                                           # not retried
    rw = R.HttpReward(url + "/trickle", timeout=1.0, retries=2, backoff=0.01, cafile=cafile)
    t0 = time.monotonic()
    with pytest.raises(RewardError, match="total deadline of 1 s"):
        rw(_img())
    assert time.monotonic() - t0 < 1.0 + SLACK
