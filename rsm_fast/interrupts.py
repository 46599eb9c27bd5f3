"""Stops requested from outside the run: SIGINT / SIGTERM.

:class:`RunInterrupted` derives from ``BaseException`` (like ``KeyboardInterrupt``) so that no
``except Exception`` on the way up -- a reward's fault policy included -- mistakes a stop for a fault.
"""
from __future__ import annotations

import signal


class RunInterrupted(BaseException):
    """The run was asked to stop by signal ``signum``; raised only where abandoning the current
    phase loses nothing that the last checkpoint does not hold."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopController:
    """SIGINT / SIGTERM for a training run.

    The first signal asks the run to stop: where the current phase may be abandoned (inside
    :meth:`abandonable`: model loading, rollout, reward, evaluation -- nothing there touches what
    the last checkpoint holds) :class:`RunInterrupted` is raised at once; elsewhere (the update,
    the allocator, a checkpoint write) the flag is read at the next :meth:`check` after the phase.
    A second signal exits the process at once (``os._exit``; the run directory's lock is a
    kernel flock and is released with the process)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, stream=None):
        self.signum: int | None = None
        self._abandonable = 0
        self._old: dict = {}
        self._stream = stream

    def install(self) -> "StopController":
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def uninstall(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}

    def __enter__(self):
        return self.install()

    def __exit__(self, *exc):
        self.uninstall()
        return False

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _say(self, msg: str) -> None:
        import sys

        stream = self._stream or sys.stderr
        try:
            stream.write(f"\nrsm_fast: {msg}\n")
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed stream must not turn a stop into a crash
            pass

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:
            import os

            self._say(f"second {name}: exiting now, without a checkpoint for the current epoch")
            os._exit(128 + signum)
        self.signum = signum
        self._say(f"{name} received: stopping safely and writing a checkpoint (send it again to exit at once)")
        if self._abandonable:
            raise RunInterrupted(signum)

    def check(self) -> None:
        if self.signum is not None:
            raise RunInterrupted(self.signum)

    def abandonable(self):
        """Context manager: a stop requested inside (or before) it raises at once."""
        ctl = self

        class _Region:
            def __enter__(self_):
                ctl._abandonable += 1
                if ctl.signum is not None:
                    ctl._abandonable -= 1
                    raise RunInterrupted(ctl.signum)

            def __exit__(self_, *exc):
                ctl._abandonable -= 1
                return False

        return _Region()


_FAULT: dict = {}


def fault_point(name: str) -> None:
    """Fault injection for the kill-and-resume tests: ``RSM_FAST_FAULT=<name>:<n>[:<SIGNAL>]``
    sends the process SIGKILL (or ``SIGNAL``, e.g. TERM) the ``n``-th time it passes point
    ``name`` (1-based). Under torchrun, ``RSM_FAST_FAULT_RANK=<r>`` limits it to rank ``r``, and
    it fires only in the first attempt (``TORCHELASTIC_RESTART_COUNT`` 0), so a restarted run
    goes on. Unset (always, outside tests), this is one dict lookup."""
    if "spec" not in _FAULT:
        import os

        raw = os.environ.get("RSM_FAST_FAULT", "").strip()
        only = os.environ.get("RSM_FAST_FAULT_RANK", "").strip()
        if only and only != os.environ.get("RANK", "0"):
            raw = ""
        if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") not in ("", "0"):
            raw = ""
        spec = None
        if raw:
            parts = raw.split(":")
            spec = (parts[0], int(parts[1]) if len(parts) > 1 else 1,
                    getattr(signal, f"SIG{parts[2]}") if len(parts) > 2 else signal.SIGKILL)
        _FAULT.update(spec=spec, count=0)
    spec = _FAULT["spec"]
    if spec is None or spec[0] != name:
        return
    _FAULT["count"] += 1
    if _FAULT["count"] == spec[1]:
        import os

        os.kill(os.getpid(), spec[2])
