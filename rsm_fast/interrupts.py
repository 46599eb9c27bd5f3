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
