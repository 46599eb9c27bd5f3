"""Tasks: a sampler (transition), a reference, a reward and an evaluation (contract: ``base.py``)."""
from __future__ import annotations

from .toy2d import Toy2D, Toy2DConfig

TASKS = ("toy2d", "digits-ddim", "digits-flow", "diffusers")


def make_task(cfg, device="cpu", policy=None):
    """Build the task named by ``cfg.name`` (a :class:`rsm_fast.config.TaskConfig`); ``policy`` (a
    :class:`rsm_fast.config.PolicyConfig`, or None for the defaults) carries the image models'
    load-time precision and memory settings (the 2-D task's MLP takes only their defaults:
    ``config_checks`` refuses the others)."""
    if cfg.name == "toy2d":
        return Toy2D(Toy2DConfig(alpha=cfg.alpha, num_steps=cfg.num_steps, eta=cfg.eta, eval_samples=cfg.eval_samples or 8192))
    if cfg.name in ("digits-ddim", "digits-flow"):
        from .digits_task import make_digits_task

        return make_digits_task(cfg, device, policy)
    if cfg.name == "diffusers":
        from .diffusers_task import DiffusersTask

        return DiffusersTask(cfg, device, policy)
    raise ValueError(f"config field 'task.name' must be one of {list(TASKS)}, got {cfg.name!r}")
