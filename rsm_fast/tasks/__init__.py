"""Tasks: a sampler (transition), a reference, a reward and an evaluation with known targets."""
from __future__ import annotations

from .toy2d import Toy2D, Toy2DConfig

TASKS = ("toy2d",)


def make_task(cfg):
    """Build the task named by ``cfg.name`` (a :class:`rsm_fast.config.TaskConfig`)."""
    if cfg.name == "toy2d":
        return Toy2D(Toy2DConfig(alpha=cfg.alpha, num_steps=cfg.num_steps, eta=cfg.eta, eval_samples=cfg.eval_samples))
    raise ValueError(f"config field 'task.name' must be one of {list(TASKS)}, got {cfg.name!r}")
