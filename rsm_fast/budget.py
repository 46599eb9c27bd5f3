"""The trainer's side of the budget allocator: ``rollout.allocator = online`` (spec §7.3).

:class:`BudgetController` owns an :class:`~rsm_fast.allocator.OnlineAllocator` for a ``branch``
plan. After every epoch's update it is shown the epoch's records (step, branching parent,
advantage, sampling noise) and the clip mask of the last inner update; it then proposes the next
epoch's K per step, which the trainer compiles into a new plan. What one branch at step i costs
depends on ``rollout.alloc_units``:

* ``branches`` — every branch costs 1, the budget is branches per trunk (the paper's released
  runs: sum K = 54 for TempFlow's 6 x 9);
* ``nfe`` — model evaluations as the trainer counts them (``Trainer.nfe``): a child at step i is
  denoised by ODE to the end (``g (N-1-i)`` forwards, g = 2 with CFG), its record is evaluated
  once by the frozen reference (``g``) and ``inner_updates`` times by the policy (``g`` each);
  the trunk's own forwards up to the last branching step are the fixed overhead
  (:func:`~rsm_fast.allocator.branch_costs`); the budget is NFE per trunk;
* ``seconds`` — the same cost model priced with this machine's measured seconds per forward,
  per decoded+scored sample and per training record (:func:`~rsm_fast.allocator.seconds_per_unit`
  on the epoch's phase clock, EMA-blended); the budget is seconds per epoch.

Step weights (``rollout.alloc_weights``): ``uniform`` minimises ``sum_i v_i / K_i``, the variance of
the guidance estimates themselves (w = 1, how the paper's released profiles come out, spec §7.2).
``influence`` minimises the variance of what the loss does with them: on policy and unclipped, a
branch at step i pulls the model output with ``h_rz,i A z`` (``diagnostics.zo_influence``: the
reweighting's ``|o s c_lin| omega_i``), and psi is ``scale_i A z``, so ``w_i = (h_rz,i / scale_i)^2``
makes ``w_i v_i`` the per-branch variance of that pull; a clipped record pulls with 0, so ``w_i`` is
further multiplied by ``1 - clip_i`` (EMA of the step's clip fraction, spec §7.3's
``(1 - clipfrac_i) h_i^2``). [UNCERTAIN] The model's Jacobian from output to parameters is taken
as the same at every step. On a Flow-GRPO schedule with equal dt, TempFlow's outer ``2.25 sigma_i``
makes ``h_rz`` the same at every step but t = 1, so ``influence`` keeps TempFlow's own even split
in branch units; under fair clipping ``h_rz = omega_i``, which grows with SNR.

Objective (``rollout.alloc_objective``): ``budget`` spends the budget on the least estimator variance
``sum w v / K``; ``variance`` keeps the variance the starting profile would have under the current
estimates and buys it at the least cost (:func:`~rsm_fast.allocator.allocate_for_variance`), so an
epoch gets cheaper instead of more precise; the budget is then only a cap.

``rollout.alloc_budget = 0`` keeps the cost of the starting profile (``rollout.profile`` /
``rollout.k``): the allocator then only moves budget, it never spends more. [DECISION] With
``seconds`` and budget 0, the budget is the starting profile's cost priced at the first epoch's
measurement, then held fixed.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .allocator import OnlineAllocator, branch_costs, closed_form_variance, seconds_per_unit, step_scale
from .config import ConfigError
from .diagnostics import zo_influence


def influence_weights(transition, method, psi_units: str = "score", omega_train: Tensor | None = None) -> list[float]:
    """Per step ``(h_rz,i / scale_i)^2``: the squared force of the loss on the model output per unit
    of psi (module doc); 0 where the step is not stochastic or psi's scale is 0. Float64."""
    h = zo_influence(transition, method, omega_train, None)["h_rz"]
    scale = step_scale(transition, psi_units)
    return [(a / s) ** 2 if a is not None and s > 0 else 0.0 for a, s in zip(h, scale)]


class BudgetController:
    def __init__(self, cfg, transition, plan, cfg_guidance: bool, omega_train: Tensor | None = None):
        ro, tc = cfg.rollout, cfg.train      # config.validate: a 'branch' plan and the zeroth-order estimator
        self.units, self.cfg_g = ro.alloc_units, cfg_guidance
        self.inner = tc.inner_updates
        n = plan.num_steps
        k0 = [int(a) for a in plan.spec.k]
        if not any(k0):
            raise ConfigError("config field 'rollout.profile': the allocator needs a starting profile with branches")
        if any(0 < a < ro.alloc_k_min for a in k0) or (ro.alloc_k_max and max(k0) > ro.alloc_k_max):
            raise ConfigError(f"config field 'rollout.profile': starting K {k0} must be 0 or within "
                              f"[alloc_k_min, alloc_k_max] = [{ro.alloc_k_min}, {ro.alloc_k_max or 'inf'}]")
        self.trunks = plan.spec.groups * plan.spec.trunks
        costs, overhead = self._nfe_costs(plan) if self.units == "nfe" else (None, None)
        # spec §4.6: v_i ~ Sigma_i / b_i^2 before any observation (std-normalised advantages)
        # (psi = scale A z with E[A^2] ~ 1 and unit z: scale^2, i.e. Sigma/b^2 in score units, omega^2 native)
        scale = step_scale(transition, ro.alloc_psi_units)
        prior = [a * a for a in scale] if ro.alloc_psi_units == "native" else closed_form_variance(transition)
        self._w0 = (influence_weights(transition, cfg.method, ro.alloc_psi_units, omega_train)
                    if ro.alloc_weights == "influence" else None)
        # alloc_budget 0: the starting profile's cost, priced below by the allocator itself (for
        # seconds after the first epoch's measurement); 1.0 only holds the place until then
        budget = ro.alloc_budget or 1.0
        if self.units == "seconds" and ro.alloc_budget:
            budget = budget / self.trunks          # seconds per epoch -> per trunk, like the prices
        try:
            self.alloc = OnlineAllocator(
                n, budget, costs=costs, overhead=overhead, init=k0, trainable=[i < n - 1 for i in range(n)],
                scale=scale, prior=prior, rule=ro.alloc_rule, weights=self._w0,
                k_min=ro.alloc_k_min, k_max=ro.alloc_k_max or None, ema=ro.alloc_ema, every=ro.alloc_every,
                max_step=ro.alloc_max_step or None, patience=ro.alloc_patience, clip_tau=ro.alloc_clip_tau,
                snr_min=ro.alloc_snr_min if ro.alloc_snr_min > 0 else None, objective=ro.alloc_objective)
        except ValueError as e:
            raise ConfigError(f"config field 'rollout.allocator': {e}") from None
        self._budget_pending = self.units == "seconds" and ro.alloc_budget == 0
        if ro.alloc_budget == 0 and self.units != "seconds":
            budget = self.alloc.budget = self.alloc._used(k0)
        if self.units != "seconds" and not self.alloc._used(k0) <= budget * (1 + 1e-9):
            raise ConfigError(f"config field 'rollout.alloc_budget': {budget:g} {self.units} per trunk is less than the "
                              f"starting profile's {self.alloc._used(k0):g}")

    # -- costs -----------------------------------------------------------------------------------
    def _nfe_costs(self, plan):
        g = 2 if self.cfg_g else 1
        bc = branch_costs(plan, f_fwd=1.0, f_ref=1.0, f_train=float(self.inner * g), cfg=self.cfg_g)
        return bc.marginal, bc.trunk

    def _price_seconds(self, plan, seconds: dict) -> None:
        spu = seconds_per_unit(plan, seconds, cfg=self.cfg_g)
        bc = branch_costs(plan, f_fwd=spu["f_fwd"], f_decode=spu["f_decode"], f_reward=spu["f_reward"],
                          f_train=spu["f_train"], f_ref=spu["f_fwd"], cfg=self.cfg_g)
        # per-epoch seconds = trunks x per-trunk cost: price per trunk, budget per epoch / trunks
        marginal = [max(c, 1e-12) for c in bc.marginal]
        first = self.alloc.epochs == 1
        self.alloc.update_costs(marginal, overhead=bc.trunk, ema=None if first else 0.5)
        if self._budget_pending:
            self.alloc.budget = self.alloc._used(self.alloc.profile)
            self._budget_pending = False

    # -- one epoch -------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, plan, rec_step: Tensor, record_set: Tensor, adv: Tensor, z: Tensor, clipped: Tensor | None,
             seconds: dict | None, reduce=None) -> tuple[list[int], dict]:
        """Observe one epoch (``record_set``: the baseline set of each of this process's records)
        and propose the next K per step from the run's ``plan``; returns the profile and this
        epoch's per-step estimates for the log. ``reduce`` sums the per-step statistics over ranks."""
        obs = self.alloc.observe(rec_step, record_set, adv=adv, z=z, clipped=clipped, reduce=reduce)
        if self._w0 is not None:     # influence: a clipped record pulls with 0
            self.alloc.set_weights([w * (1.0 - (c or 0.0)) for w, c in zip(self._w0, self.alloc.clip)])
        if self.units == "seconds" and seconds is not None:
            self._price_seconds(plan, seconds)
        k = self.alloc.propose()
        return k, {"v": [None if v is None else float(v) for v in self.alloc.v],
                   "v_epoch": obs["v_epoch"], "clip_ema": list(self.alloc.clip),
                   "budget": self.alloc.budget, "used": self.alloc._used(k), "units": self.units}

    def state_dict(self) -> dict:
        return {"allocator": self.alloc.state_dict(), "budget": self.alloc.budget,
                "budget_pending": self._budget_pending}

    def load_state_dict(self, state: dict) -> None:
        self.alloc.load_state_dict(state["allocator"])
        b = float(state["budget"])
        if not math.isfinite(b) or b <= 0:
            raise ValueError(f"allocator budget must be a positive number, got {b}")
        self.alloc.budget = b
        self._budget_pending = bool(state.get("budget_pending", False))
