"""The C++ build machinery of rsm_fast.ops.cpu_ext: keyed build folders, our flock build lock,
recovery from a killed build, the one-line messages. Most tests build tiny sources through
``build_extension`` (the code path ``load()`` uses); each uses its own TORCH_EXTENSIONS_DIR. Builds
run in subprocesses (generous timeouts; the 2-core machine is shared, so no wall-clock asserts)."""
from __future__ import annotations

import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from rsm_fast.ops import cpu_ext

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 900  # per subprocess
TINY_H = "#pragma once\ninline int tiny_offset() { return 1; }\n"
# pybind11 only: a few seconds to compile
TINY_CPP = textwrap.dedent("""\
    #include <pybind11/pybind11.h>
    #include "tiny.h"
    #ifndef TINY
    #define TINY 0
    #endif
    static int plus(int a, int b) { return a + b + tiny_offset() + TINY; }
    PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("plus", &plus); }
    """)
# torch/extension.h: ~20 s to compile, a wide window to kill the build in
BIG_CPP = textwrap.dedent("""\
    #include <torch/extension.h>
    #include "tiny.h"
    static torch::Tensor twice(torch::Tensor x) { return x * 2 + tiny_offset(); }
    PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("twice", &twice); }
    """)
COMPILING = re.compile(r"^rsm_fast: compiling (.+) in (\S+) \(.*cached afterwards\) \.\.\.$", re.M)


def _sources(folder: Path, cpp: str = TINY_CPP) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tiny.cpp").write_text(cpp)
    (folder / "tiny.h").write_text(TINY_H)
    return folder


def _env(ext_root: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RSM_FAST_NO_CPP", cpu_ext.LOCK_TIMEOUT_ENV)}
    env["TORCH_EXTENSIONS_DIR"] = str(ext_root)
    env.update(extra)
    return env


def _build_code(src: Path, cflags=(), call="m.plus(1, 2)", name="tiny") -> str:
    return (f"from rsm_fast.ops import cpu_ext\nimport torch\n"
            f"m = cpu_ext.build_extension({name!r}, [{str(src / 'tiny.cpp')!r}], [{str(src / 'tiny.h')!r}], "
            f"{list(cflags)!r})\nprint('RESULT', {call}, m.__file__)\n")


def _py(code: str, env: dict, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=TIMEOUT, cwd=str(ROOT), **kw)


def _result(res: subprocess.CompletedProcess) -> tuple[str, str]:
    assert res.returncode == 0, res.stderr[-3000:]
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("RESULT "))
    _, value, so = line.split()
    return value, so


@pytest.fixture(autouse=True)
def _own_ext_root(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.delenv(cpu_ext.LOCK_TIMEOUT_ENV, raising=False)


def test_two_install_paths_share_one_key_and_build(tmp_path):
    a, b = _sources(tmp_path / "install_a"), _sources(tmp_path / "install_b")
    key = lambda d, cflags=(): cpu_ext.build_folder("tiny", [d / "tiny.cpp"], [d / "tiny.h"], cflags)  # noqa: E731
    assert key(a) == key(b)
    assert re.fullmatch(r"tiny-[0-9a-f]{16}", os.path.basename(key(a)))
    assert os.path.dirname(key(a)) == str(tmp_path / "ext")
    assert key(a, ["-DTINY=1"]) != key(a)  # flags are in the key
    c = _sources(tmp_path / "install_c")
    (c / "tiny.h").write_text(TINY_H.replace("1;", "2;"))
    assert key(c) != key(a)  # a header-only edit is in the key
    # the real csrc/ sources, copied to two install paths, give the same folder (nothing is built)
    csrc = [ROOT / "csrc" / f for f in cpu_ext.SOURCES + cpu_ext.HEADERS]
    folders = []
    for inst in ("ci_clone", "dev_tree"):
        d = tmp_path / inst / "csrc"
        d.mkdir(parents=True)
        for f in csrc:
            shutil.copy(f, d / f.name)
        folders.append(cpu_ext.build_folder(cpu_ext.NAME, [d / s for s in cpu_ext.SOURCES],
                                            [d / h for h in cpu_ext.HEADERS], cpu_ext.CFLAGS, cpu_ext.LDFLAGS))
    assert folders[0] == folders[1] and re.search(r"/rsm_fast_cpu_ops-[0-9a-f]{16}$", folders[0])

    env = _env(tmp_path / "ext")
    first = _py(_build_code(a), env)
    assert _result(first)[0] == "4"
    assert [m.group(2) for m in COMPILING.finditer(first.stderr)] == [key(a)]
    so = _result(first)[1]
    mtime = os.stat(so).st_mtime_ns
    second = _py(_build_code(b), env)  # the other install: loads the shared build, compiles nothing
    assert _result(second) == ("4", so)
    assert second.stderr.strip() == "", second.stderr
    assert os.stat(so).st_mtime_ns == mtime


def test_two_keys_coexist_and_reload_without_rebuild(tmp_path):
    src, env = _sources(tmp_path / "src"), _env(tmp_path / "ext")
    files = f"[{str(src / 'tiny.cpp')!r}], [{str(src / 'tiny.h')!r}]"
    code = ("from rsm_fast.ops import cpu_ext\n"
            f"a = cpu_ext.build_extension('tiny', {files}, ['-DTINY=10'])\n"
            f"b = cpu_ext.build_extension('tiny', {files}, ['-DTINY=20'])\n"
            "print('RESULT', a.plus(1, 2), b.plus(1, 2), a.__file__, b.__file__)\n")
    res = _py(code, env)
    assert res.returncode == 0, res.stderr[-3000:]
    _, va, vb, so_a, so_b = next(ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")).split()
    assert (va, vb) == ("14", "24")  # both keys loaded side by side in one process
    # a message for every build that compiles, not only the first ever
    dirs = [m.group(2) for m in COMPILING.finditer(res.stderr)]
    assert len(dirs) == 2 and dirs[0] != dirs[1], res.stderr
    assert sorted(glob.glob(str(tmp_path / "ext" / "tiny-*"))) == sorted(dirs)
    mtimes = {so: os.stat(so).st_mtime_ns for so in (so_a, so_b)}
    again = _py(_build_code(src, ["-DTINY=10"]), env)  # the first key again, in a new process
    assert _result(again) == ("14", so_a)
    assert again.stderr.strip() == "", again.stderr  # no compile message: the cached build is loaded
    assert {so: os.stat(so).st_mtime_ns for so in (so_a, so_b)} == mtimes


def test_concurrent_builders_compile_once(tmp_path):
    """Two processes want the same missing build: one compiles, the other waits for it and loads it."""
    src, env = _sources(tmp_path / "src"), _env(tmp_path / "ext")
    procs = [subprocess.Popen([sys.executable, "-c", _build_code(src)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=str(ROOT)) for _ in range(2)]
    outs = [p.communicate(timeout=TIMEOUT) for p in procs]
    results = [_result(subprocess.CompletedProcess(p.args, p.returncode, o, e)) for p, (o, e) in zip(procs, outs)]
    assert results[0] == results[1] and results[0][0] == "4"
    stderr = "".join(e for _, e in outs)
    assert len(COMPILING.findall(stderr)) == 1, stderr
    assert all(ln.startswith(("rsm_fast: compiling ", "rsm_fast: waiting for another build ")) for ln in
               stderr.splitlines()), stderr


def test_live_lock_holder_makes_load_wait_then_fall_back(tmp_path):
    """Another live builder holds the (real csrc) folder's lock: load() waits, times out after 2 s with
    one line naming the lock path and returns None (the PyTorch fallback); nothing is compiled."""
    env = _env(tmp_path / "ext")
    holder_code = ("import os, sys, time\nfrom rsm_fast.ops import cpu_ext\nimport importlib.resources as r\n"
                   "s = r.files('rsm_fast.csrc')\n"
                   "f = cpu_ext.build_folder(cpu_ext.NAME, [s / x for x in cpu_ext.SOURCES], "
                   "[s / x for x in cpu_ext.HEADERS], cpu_ext.CFLAGS, cpu_ext.LDFLAGS)\n"
                   "os.makedirs(f, exist_ok=True)\n"
                   "with cpu_ext.build_lock(f, 10) as p:\n    print(p, flush=True)\n    time.sleep(600)\n")
    holder = subprocess.Popen([sys.executable, "-c", holder_code], env=env, stdout=subprocess.PIPE, text=True,
                              cwd=str(ROOT))
    try:
        lock_path = holder.stdout.readline().strip()
        assert lock_path.endswith("/build.lock") and os.path.exists(lock_path), lock_path
        probe = "from rsm_fast.ops import cpu_ext; print('RESULT', cpu_ext.load() is None, cpu_ext.available())"
        res = subprocess.run([sys.executable, "-W", "always", "-c", probe], capture_output=True, text=True,
                             timeout=TIMEOUT, cwd=str(ROOT), env={**env, cpu_ext.LOCK_TIMEOUT_ENV: "2"})
        assert res.returncode == 0, res.stderr
        assert "RESULT True False" in res.stdout
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 2, res.stderr  # the waiting line, then the one fallback warning
        assert lines[0].startswith("rsm_fast: waiting for another build of the C++ CPU ops "
                                   f"(pid {holder.pid}) holding {lock_path} ")
        assert "UserWarning: rsm_fast: C++ CPU ops unavailable (timed out after 2 s waiting for the build lock " \
               f"{lock_path} (pid {holder.pid};" in lines[1]
        assert lines[1].endswith("); using the PyTorch fallback")
        assert not glob.glob(str(tmp_path / "ext" / "*" / "*.so"))  # nothing was built
    finally:
        holder.kill()
        holder.wait(timeout=60)


def _kill_session(sid: int) -> None:
    """SIGKILL every process left in session ``sid`` (the killed builder's orphaned ninja/compilers)."""
    for _ in range(50):
        left = []
        for entry in os.listdir("/proc"):
            try:
                if entry.isdigit() and os.getsid(int(entry)) == sid:
                    with open(f"/proc/{entry}/stat") as f:
                        if f.read().rsplit(")", 1)[1].split()[0] == "Z":  # dead already, awaiting its reaper
                            continue
                    os.kill(int(entry), signal.SIGKILL)
                    left.append(entry)
            except (OSError, IndexError):
                continue
        if not left:
            return
        time.sleep(0.1)


# The session kill (every builder process gone) is the easier case of the process kill (orphaned
# compilers left running, which the recovery must wait for): it runs with the slow tests (~40 s).
@pytest.mark.parametrize("kill", ["process", pytest.param("session", marks=pytest.mark.slow)])
def test_killed_build_recovers_without_waiting(tmp_path, kill):
    """SIGKILL the builder while it compiles: only the Python process (``kill -9 PID``: its ninja and
    compilers run on, orphaned; ninja puts each compiler in a process group of its own) or every process
    of its session. torch's ``lock`` stays behind -- before, every later run waited forever. The next run
    in the same folder recovers, with a 3600 s lock timeout that a wait would make obvious: it waits for
    the orphans if any are left (one line), removes the stale lock (one line naming it), builds, loads."""
    src, ext = _sources(tmp_path / "src", BIG_CPP), tmp_path / "ext"
    env = _env(ext, **{cpu_ext.LOCK_TIMEOUT_ENV: "3600"})
    code = _build_code(src, call="float(m.twice(torch.ones(1)))", name="big")
    victim = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, cwd=str(ROOT), start_new_session=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not glob.glob(str(ext / "big-*" / "lock")):  # torch's baton: ninja is about to run
            assert victim.poll() is None, "the build ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(1.0)  # let the compiler get going
    finally:
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(timeout=60)
        if kill == "session":
            _kill_session(victim.pid)
    (folder,) = glob.glob(str(ext / "big-*"))
    stale = os.path.join(folder, "lock")
    assert os.path.exists(stale) and not os.path.exists(os.path.join(folder, cpu_ext.DONE_FILE))

    t0 = time.monotonic()
    res = _py(code, env)
    elapsed = time.monotonic() - t0
    value, so = _result(res)
    assert value == "3.0" and os.path.dirname(so) == folder
    assert f"rsm_fast: removed the stale torch build lock {stale} (left by a killed build)" in res.stderr.splitlines()
    assert "waiting for another build" not in res.stderr  # the dead builder's flock went with it
    if kill == "session":
        assert "leftover build process" not in res.stderr
    assert elapsed < 3600
    print(f"\nrecovery after a killed build ({kill}): {elapsed:.1f} s; stderr: {res.stderr.strip()!r}")
    assert not os.path.exists(stale)
    again = _py(code, env)
    assert _result(again) == ("3.0", so) and again.stderr.strip() == ""


@pytest.mark.slow
def test_real_csrc_build_in_keyed_folder(tmp_path):
    """load() builds csrc/ from scratch in <root>/rsm_fast_cpu_ops-<key> (one compile line), then a new
    process loads it without a word."""
    env = _env(tmp_path / "ext")
    probe = "from rsm_fast.ops import cpu_ext; m = cpu_ext.load(); print('RESULT', m is not None, m.__file__)"
    t0 = time.monotonic()
    res = _py(probe, env)
    elapsed = time.monotonic() - t0
    ok, so = _result(res)
    assert ok == "True"
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    m = COMPILING.match(lines[0])
    assert m and m.group(1) == "the C++ CPU ops" and "about a minute on 2 cores" in lines[0]
    assert re.fullmatch(re.escape(str(tmp_path / "ext")) + r"/rsm_fast_cpu_ops-[0-9a-f]{16}", m.group(2))
    assert os.path.dirname(so) == m.group(2)
    print(f"\nreal csrc build: {elapsed:.1f} s")
    again = _py(probe, env)
    assert _result(again) == ("True", so) and again.stderr.strip() == ""
