"""In-process reward deadlines (task.reward_timeout) and which exceptions count as reward faults."""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch

import bad_rewards
from rsm_fast import rewards as R
from rsm_fast.interrupts import RunInterrupted
from rsm_fast.rewards import RewardError

SLACK = 30.0        # generous: the machine is shared, never a tight wall-clock bound


def _x(b=4, seed=0):
    return torch.randn(b, 2, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def stuck():
    rw = bad_rewards.Stuck()
    yield rw
    rw.release.set()                 # let the abandoned daemon thread end
    rw.finished.wait(10)


# ---------------------------------------------------------------- deadline


def test_stuck_reward_faults_after_its_deadline_with_error_policy(stuck):
    t0 = time.monotonic()
    with pytest.raises(RewardError) as ei:
        R.evaluate_rewards(stuck, _x(), timeout=0.3)
    msg = str(ei.value)
    assert "reward 'stuck'" in msg and "task.reward_timeout" in msg and "0.3 s" in msg and "\n" not in msg
    assert 0.3 <= time.monotonic() - t0 < 0.3 + SLACK
    assert stuck.entered.is_set() and not stuck.finished.is_set()    # still running, abandoned


def test_stuck_reward_is_skipped_with_skip_policy(stuck):
    res = R.evaluate_rewards(stuck, _x(), policy="skip", timeout=0.3)
    assert not res.ok and res.scores is None and "task.reward_timeout" in res.reason
    with pytest.raises(R.RewardSkipped, match="did not return within"):
        res.unwrap()


def test_next_call_faults_at_once_while_the_abandoned_call_runs(stuck):
    with pytest.raises(RewardError, match="did not return within"):
        R.evaluate_rewards(stuck, _x(), timeout=0.2)
    t0 = time.monotonic()
    res = R.evaluate_rewards(stuck, _x(), policy="skip", timeout=60.0)
    assert not res.ok and "still running a call abandoned" in res.reason
    assert time.monotonic() - t0 < SLACK               # did not wait out the 60 s deadline
    assert stuck.calls == 1                            # no second thread was started
    stuck.release.set()                                # the abandoned call returns ...
    assert stuck.finished.wait(10)
    for _ in range(100):                               # ... and its worker deregisters itself
        if R.deadline.abandoned(stuck) is None:
            break
        time.sleep(0.05)
    res = R.evaluate_rewards(stuck, _x(), timeout=60.0)   # usable again
    assert res.ok and stuck.calls == 2
    assert torch.equal(res.scores, -0.5 * _x()[:, 0])


def test_fast_reward_under_a_deadline_runs_on_a_worker_and_zero_means_inline():
    seen = []

    def fn(x):
        seen.append(threading.current_thread())
        return x.sum(1)

    x = _x()
    assert torch.equal(R.evaluate_rewards(fn, x, timeout=30.0).scores, x.sum(1))
    assert torch.equal(R.evaluate_rewards(fn, x, timeout=0).scores, x.sum(1))
    assert torch.equal(R.evaluate_rewards(fn, x, timeout=None).scores, x.sum(1))
    assert seen[0] is not threading.current_thread() and seen[0].daemon
    assert seen[1] is threading.current_thread() and seen[2] is threading.current_thread()
    with pytest.raises(ValueError, match="timeout"):
        R.evaluate_rewards(fn, x, timeout=-1)


def test_checked_and_async_take_the_deadline(stuck):
    with pytest.raises(RewardError, match="task.reward_timeout"):
        R.checked(stuck, "stuck", _x(), timeout=0.2)
    other = bad_rewards.Stuck(name="stuck2")
    try:
        with R.AsyncReward(other, policy="skip", timeout=0.2) as ar:
            res = ar.submit(torch.rand(2, 3, 4, 4)).result(timeout=SLACK)
            assert not res.ok and "reward 'stuck2' did not return within 0.2 s" in res.reason
            again = ar.submit(torch.rand(2, 3, 4, 4)).result(timeout=SLACK)
            assert not again.ok and "still running" in again.reason and other.calls == 1
    finally:
        other.release.set()
        other.finished.wait(10)


# ---------------------------------------------------------------- grad mode in the worker


def test_differentiable_reward_under_a_deadline_keeps_its_gradient():
    def quad(x):
        return (x ** 2).sum(1)

    x0 = _x()
    with torch.enable_grad():
        x = x0.clone().requires_grad_(True)
        r = R.evaluate_rewards(quad, x, timeout=30.0).scores
        assert r.requires_grad
        (g,) = torch.autograd.grad(r.sum(), x)
    assert torch.allclose(g, 2 * x0)
    g2 = R.reward_grad(quad, "quad", x0, timeout=30.0)        # first-order entry point
    assert torch.allclose(g2, 2 * x0)


def test_worker_inherits_no_grad_and_inference_mode():
    modes = []

    def probe(x):
        modes.append((torch.is_grad_enabled(), torch.is_inference_mode_enabled()))
        return (x * 2).sum(1)

    x = _x().requires_grad_(True)
    with torch.no_grad():
        r = R.evaluate_rewards(probe, x, timeout=30.0).scores
    assert not r.requires_grad
    with torch.inference_mode():
        R.evaluate_rewards(probe, _x(), timeout=30.0)
    with torch.enable_grad():
        R.evaluate_rewards(probe, x, timeout=30.0)
    assert modes == [(False, False), (False, True), (True, False)]


# ---------------------------------------------------------------- which exceptions are faults


@pytest.mark.parametrize("timeout", [None, 30.0])
@pytest.mark.parametrize("fn, kind", [(bad_rewards.system_exit_reward, "SystemExit"),
                                      (bad_rewards.keyboard_interrupt_reward, "KeyboardInterrupt")])
def test_base_exceptions_from_a_reward_are_faults(fn, kind, timeout):
    with pytest.raises(RewardError) as ei:
        R.evaluate_rewards(fn, _x(), name="bad", timeout=timeout)
    assert f"reward 'bad' raised {kind}" in str(ei.value)
    res = R.evaluate_rewards(fn, _x(), name="bad", policy="skip", timeout=timeout)
    assert not res.ok and kind in res.reason


@pytest.mark.parametrize("timeout", [None, 30.0])
def test_run_interrupted_always_propagates(timeout):
    for policy in R.POLICIES:
        with pytest.raises(RunInterrupted):
            R.evaluate_rewards(bad_rewards.run_interrupted_reward, _x(), policy=policy, timeout=timeout)
    mixed = R.WeightedSum([(1.0, R.as_reward(bad_rewards.run_interrupted_reward))])
    with pytest.raises(RunInterrupted):
        R.evaluate_rewards(mixed, torch.rand(2, 3, 4, 4), policy="skip", timeout=timeout)
    with R.AsyncReward(bad_rewards.run_interrupted_reward, policy="skip", timeout=timeout) as ar:
        with pytest.raises(RunInterrupted):
            ar.submit(_x()).result(timeout=SLACK)


def test_system_exit_inside_a_weighted_sum_names_the_part():
    mixed = R.WeightedSum([(1.0, R.BrightnessReward()), (2.0, R.as_reward(bad_rewards.system_exit_reward))])
    res = R.evaluate_rewards(mixed, torch.rand(2, 3, 4, 4), policy="skip", timeout=30.0)
    assert not res.ok and "system_exit_reward" in res.reason and "SystemExit" in res.reason


# ---------------------------------------------------------------- signals while waiting


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="needs the main thread")
def test_sigint_handler_raising_run_interrupted_ends_the_wait(stuck):
    def handler(signum, frame):
        raise RunInterrupted(signum)

    old = signal.signal(signal.SIGINT, handler)
    timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT))
    try:
        t0 = time.monotonic()
        timer.start()
        with pytest.raises(RunInterrupted):
            R.evaluate_rewards(stuck, _x(), policy="skip", timeout=120.0)
        assert time.monotonic() - t0 < 60.0            # well before the 120 s deadline
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, old)
    assert R.deadline.abandoned(stuck) is not None      # the interrupted call counts as abandoned


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="needs the main thread")
def test_sigint_handler_runs_while_waiting(stuck):
    # the handler releases the stuck reward: the call can only succeed if the handler ran
    # during the wait (a handler run after the wait would find a 120 s timeout fault)
    ran = []

    def handler(signum, frame):
        ran.append(signum)
        stuck.release.set()

    old = signal.signal(signal.SIGINT, handler)
    timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT))
    try:
        timer.start()
        res = R.evaluate_rewards(stuck, _x(), policy="skip", timeout=120.0)
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, old)
    assert ran == [signal.SIGINT] and res.ok


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="needs the main thread")
def test_a_real_ctrl_c_while_waiting_is_not_a_reward_fault(stuck):
    # KeyboardInterrupt raised *by the reward* is a fault; one raised in the waiting caller by the
    # default SIGINT handler is the user's, and propagates even under the "skip" policy
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT))
    try:
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            R.evaluate_rewards(stuck, _x(), policy="skip", timeout=120.0)
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, old)


def test_worker_inherits_cpu_autocast():
    seen = []

    def probe(x):
        seen.append(torch.is_autocast_enabled("cpu"))
        return (x @ x.T).diagonal().float()

    with torch.autocast("cpu", dtype=torch.bfloat16):
        R.evaluate_rewards(probe, _x(), timeout=30.0)
    R.evaluate_rewards(probe, _x(), timeout=30.0)
    assert seen == [True, False]


def test_a_bound_method_reward_is_one_reward_across_lookups(stuck):
    # obj.method makes a new method object on every lookup; the abandoned call must still be found
    with pytest.raises(RewardError, match="did not return within"):
        R.evaluate_rewards(stuck.__call__, _x(), name="m", timeout=0.2)
    res = R.evaluate_rewards(stuck.__call__, _x(), name="m", policy="skip", timeout=30.0)
    assert not res.ok and "still running" in res.reason and stuck.calls == 1
