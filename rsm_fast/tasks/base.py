"""What the trainer needs from a task (the model adapter end of the data flow).

A task supplies the sampler and the network; the trainer supplies everything else (rollout plan,
rewards, estimator, loss, optimizer). The contract, met by the 2-D task, the digits task and the
diffusers models:

* ``name``, ``latent_shape`` (per row), ``transition`` (a :class:`~rsm_fast.transitions.GaussianTransition`);
* ``make_policy(policy_cfg) -> PolicyHandle``: the trainable module and two callables in the
  rollout engine's convention ``(x [C, ...], t [C], cond [C, ...] | None) -> native output``:
  ``model`` (the policy being trained) and ``reference`` (the frozen reference, safe to call
  between policy calls and under graph capture: no module swapping);
* ``conditions(groups, gen) -> Conditioning``: per-group conditioning rows, the unconditional row
  for CFG, and the prompts / metadata the rewards see (all ``None`` for an unconditional task);
* ``initial_latents(n, gen) -> Tensor | None``: ``x_T`` for ``n`` rows, or ``None`` for the
  engine's counter-based standard normal;
* ``decode(x0) -> images`` in ``[0, 1]`` (the 2-D task's "image" is the point itself);
* ``cfg_scale`` (``None``: no classifier-free guidance);
* ``evaluate(x0, ...) -> dict`` (optional): task-specific metrics of final samples;
* ``default_eval_samples``: samples of the final evaluation when ``task.eval_samples`` is 0 (the
  2-D task 8192, a cheap float64-checked mean; digits 1024, about a minute of CPU; diffusers 16).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import Tensor, nn


@dataclass
class Conditioning:
    cond: Tensor | None = None               # [P, ...] one row per group (prompt)
    uncond: Tensor | None = None             # [1, ...] the unconditional row (CFG)
    prompts: list[str] | None = None         # [P]
    metadata: list[dict] | None = None       # [P]

    def rows(self, group: Tensor) -> tuple[list[str] | None, list[dict] | None]:
        """Prompts / metadata per sample from the samples' group ids (host list, for rewards)."""
        ids = group.tolist()
        return (None if self.prompts is None else [self.prompts[i] for i in ids],
                None if self.metadata is None else [self.metadata[i] for i in ids])


@dataclass
class PolicyHandle:
    module: nn.Module                         # owns the trainable parameters
    model: Callable[..., Tensor]              # (x, t, cond) -> native output of the policy
    reference: Callable[..., Tensor]          # (x, t, cond) -> native output of the frozen reference
    frozen: nn.Module | None = None           # the reference's own module when it is a frozen copy (full
                                              # fine-tuning): FSDP2 shards it like the policy
    # (x, t, f_ref, cond) -> the policy's output given the reference's output f_ref at the same point,
    # for a policy that is the reference plus a correction (the 2-D task's): a pass that needs both
    # (the fused epoch's rollout, rsm_fast/fused_path.py) evaluates the reference once. None: apart.
    model_on_reference: Callable[..., Tensor] | None = None


class TrainedModules(nn.Module):
    """Several trained modules as one ``PolicyHandle.module`` (a denoiser and its text encoders'
    LoRA): the optimizer, EMA, gradient clipping and checkpoints see ``<part>.<parameter name>``.
    The adapter calls the parts, never this container, so DDP replication, gradient-sync control
    and ``train.compile=full`` act on :meth:`called_modules` (rsm_fast/parallel.py, train_step.py)."""

    def __init__(self, parts: dict):
        super().__init__()
        for name, module in parts.items():
            self.add_module(name, module)

    def called_modules(self) -> list[nn.Module]:
        return list(self.children())

    def forward(self, *args, **kwargs):
        raise RuntimeError("TrainedModules is a container; the model adapter calls its parts")


def lora_targets(policy_cfg, key: str = "lora_targets") -> tuple[str, ...]:
    """``policy.lora_targets`` ("to_q,to_k,...") as the module names peft targets (``key``: another
    field of the same form, e.g. ``text_lora_targets``)."""
    return tuple(s.strip() for s in getattr(policy_cfg, key).split(",") if s.strip())
