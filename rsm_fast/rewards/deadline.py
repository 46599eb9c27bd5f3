"""Run one in-process reward call under a deadline (``task.reward_timeout``).

Python cannot kill a thread, so :func:`call_with_deadline` runs the call on a fresh *daemon*
worker thread and stops waiting when the deadline passes: the caller gets
:class:`DeadlineExceeded` and the worker is left to finish (or hang) on its own -- it never blocks
interpreter exit, and whatever it eventually returns is dropped.

At most one abandoned call per reward: while a reward's earlier call is still running past its
deadline, the next call of the same reward fails at once with :class:`StillRunning` instead of
starting another thread (a hung model or lock would otherwise pile up one thread per batch). Once
the abandoned call returns, the reward is usable again.

The worker inherits the caller's thread-local torch state -- grad mode, inference mode, autocast
and, when CUDA is initialised, the current device and stream -- so a differentiable reward called
under ``torch.enable_grad()`` builds the same autograd graph it would inline (autograd graphs are
not bound to a thread; the caller back-propagates through it as usual).

The caller waits in short slices of :meth:`threading.Event.wait`, so a signal handler in the main
thread (the trainer's SIGINT/SIGTERM handler raising
:class:`~rsm_fast.interrupts.RunInterrupted`) runs promptly and its exception propagates out of
the wait; the interrupted call is then registered as abandoned like one past its deadline.
"""
from __future__ import annotations

import contextlib
import inspect
import threading
import time
from typing import Any, Callable

import torch

_POLL_S = 0.25          # longest single wait: bounds how late a signal handler runs on any platform
_LOCK = threading.Lock()
_ABANDONED: dict[object, tuple[object, threading.Thread]] = {}   # _ident(key) -> (key kept alive, worker)


class RewardRaised(Exception):
    """Carries whatever the reward call itself raised (``error``, any ``BaseException``), so the
    caller can tell it from an exception raised while waiting -- a signal handler's, e.g. a real
    Ctrl-C's ``KeyboardInterrupt``, which is not the reward's fault and propagates unwrapped."""

    def __init__(self, error: BaseException):
        super().__init__(type(error).__name__)
        self.error = error


class DeadlineExceeded(Exception):
    """The call did not return within its deadline (it goes on running on its daemon thread)."""


class StillRunning(Exception):
    """An earlier call of the same reward, abandoned at its deadline, has not returned yet."""


def _ident(key: object) -> object:
    """Identity of a reward: a bound method is one reward however often ``obj.method`` is looked up
    (each lookup makes a new method object). The entry keeps ``key`` alive, so ids are not reused."""
    if inspect.ismethod(key):
        return id(key.__self__), id(key.__func__)
    return id(key)


def abandoned(key: object) -> threading.Thread | None:
    """The worker of ``key``'s abandoned call when it is still running, else None."""
    with _LOCK:
        entry = _ABANDONED.get(_ident(key))
        if entry is None:
            return None
        if entry[1].is_alive():
            return entry[1]
        del _ABANDONED[_ident(key)]
        return None


def _torch_state() -> list[Callable[[], Any]]:
    """Context-manager factories that recreate the caller's thread-local torch state."""
    grad, infer = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
    out: list[Callable[[], Any]] = [
        (lambda: torch.inference_mode(True)) if infer else (lambda: torch.set_grad_enabled(grad))]
    for dev in ("cuda", "cpu"):
        try:
            if torch.is_autocast_enabled(dev):
                dtype = torch.get_autocast_dtype(dev)
                out.append(lambda dev=dev, dtype=dtype: torch.autocast(dev, dtype=dtype))
        except (TypeError, RuntimeError, AttributeError):   # a torch without per-device autocast queries
            pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        index = torch.cuda.current_device()
        stream = torch.cuda.current_stream(index)
        out += [lambda: torch.cuda.device(index), lambda: torch.cuda.stream(stream)]
    return out


def call_with_deadline(fn: Callable, args: tuple, timeout: float | None, key: object) -> Any:
    """``fn(*args)``, given at most ``timeout`` seconds (None or 0: called inline, no thread).

    Returns the call's value; whatever the call raised (any ``BaseException``) comes back, in the
    caller's thread, as :class:`RewardRaised`. Raises :class:`DeadlineExceeded` past the deadline
    and :class:`StillRunning` when ``key``'s previous call is still running past its own; an
    exception raised by a signal handler during the wait propagates as it is.
    """
    if not timeout:
        try:
            return fn(*args)
        except BaseException as e:  # noqa: BLE001 - handed to the caller, which decides
            raise RewardRaised(e) from None
    if abandoned(key) is not None:
        raise StillRunning()
    state = _torch_state()
    box: dict[str, Any] = {}
    done = threading.Event()

    def work():
        try:
            with contextlib.ExitStack() as stack:
                for make in state:
                    stack.enter_context(make())
                box["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - handed to the caller, which decides
            box["error"] = e
        finally:
            done.set()
            with _LOCK:             # an abandoned call that returns frees its reward
                entry = _ABANDONED.get(_ident(key))
                if entry is not None and entry[1] is threading.current_thread():
                    del _ABANDONED[_ident(key)]

    worker = threading.Thread(target=work, name="rsm-reward-deadline", daemon=True)
    end = time.monotonic() + float(timeout)
    finished = False
    worker.start()
    try:
        while not done.wait(max(0.0, min(end - time.monotonic(), _POLL_S))):
            if time.monotonic() >= end:
                break
    finally:
        with _LOCK:                 # checked under the lock: the worker's cleanup cannot slip between
            finished = done.is_set()
            if not finished:
                _ABANDONED[_ident(key)] = (key, worker)
    if not finished:
        raise DeadlineExceeded()
    if "error" in box:
        raise RewardRaised(box.pop("error"))
    return box["value"]
