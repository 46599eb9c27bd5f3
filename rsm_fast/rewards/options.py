"""Reward evaluation options taken from the run config (``task.reward_*``).

One small frozen value, :class:`RewardOptions`, carries what the config says about calling a
reward: the deadline of one call, the HTTP client's retries, its response-body cap and its
``Authorization`` header. :func:`~.registry.resolve` hands it to every HTTP term of a spec; the
trainer passes ``timeout`` to :func:`~.base.evaluate_rewards` / :class:`~.combine.AsyncReward`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Mapping

from .secrets import MASK

MIB = 1 << 20


@dataclass(frozen=True)
class RewardOptions:
    """``timeout``: seconds one reward call may take (0 = no deadline; for HTTP: no total
    deadline, each socket operation then waits at most :data:`~.remote.IO_TIMEOUT`);
    ``retries``: HTTP retries of a transient fault; ``max_bytes``: the largest HTTP response body
    read; ``auth``: ``Authorization`` header value or ``""`` (never shown by ``repr``); ``backend``:
    how reward models run, ``"eager"`` or ``"tensorrt"`` (:mod:`.backend`, ``task.reward_backend``)."""

    timeout: float = 600.0
    retries: int = 2
    max_bytes: int = 64 * MIB
    auth: str = field(default="", repr=False)
    backend: str = "eager"

    def __post_init__(self):
        if not (self.timeout >= 0):             # also rejects NaN
            raise ValueError(f"reward timeout must be >= 0 s (task.reward_timeout), got {self.timeout!r}")
        if int(self.retries) != self.retries or self.retries < 0:
            raise ValueError(f"reward retries must be an integer >= 0 (task.reward_retries), got {self.retries!r}")
        if int(self.max_bytes) != self.max_bytes or self.max_bytes < 1:
            raise ValueError(f"reward body cap must be >= 1 byte (task.reward_max_mb), got {self.max_bytes!r}")
        if not isinstance(self.auth, str):
            raise ValueError("reward Authorization header (task.reward_auth) must be a string")
        from .backend import BACKENDS
        if self.backend not in BACKENDS:
            raise ValueError(f"reward backend must be one of {BACKENDS} (task.reward_backend), got {self.backend!r}")

    def __repr__(self) -> str:
        return (f"RewardOptions(timeout={self.timeout!r}, retries={self.retries!r}, max_bytes={self.max_bytes!r}, "
                f"auth={MASK if self.auth else ''!r}, backend={self.backend!r})")

    @classmethod
    def from_task_config(cls, task_cfg, environ: Mapping[str, str] | None = None) -> "RewardOptions":
        """From a :class:`rsm_fast.config.TaskConfig`: ``reward_timeout``, ``reward_retries``,
        ``reward_max_mb`` (MiB) and ``reward_auth``, or, when that is empty, the environment
        variable named by ``reward_auth_env`` (``environ`` defaults to ``os.environ``);
        ``reward_backend``."""
        env = os.environ if environ is None else environ
        auth = getattr(task_cfg, "reward_auth", "") or ""
        var = getattr(task_cfg, "reward_auth_env", "") or ""
        if not auth and var:
            auth = env.get(var, "") or ""
        return cls(timeout=float(getattr(task_cfg, "reward_timeout", 600.0)),
                   retries=int(getattr(task_cfg, "reward_retries", 2)),
                   max_bytes=max(1, int(float(getattr(task_cfg, "reward_max_mb", 64.0)) * MIB)),
                   auth=auth.strip(), backend=str(getattr(task_cfg, "reward_backend", "eager") or "eager"))

    def http_kwargs(self) -> dict:
        """Keyword arguments for :class:`~.remote.HttpReward`."""
        return {"timeout": self.timeout or None, "retries": int(self.retries), "max_bytes": int(self.max_bytes),
                "auth": self.auth or None}
