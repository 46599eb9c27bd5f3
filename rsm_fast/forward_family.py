"""The forward-process estimator family (``method.estimator=forward``): DiffusionNFT and AWM.

An epoch: a deterministic solver rollout keeps only the final samples
(:class:`~rsm_fast.engine.solver_rollout.SolverRollout`, ``rollout.solver``), they are scored, the
advantages are centred per prompt group; then each sample is noised again on the forward process
at the method's timesteps (:mod:`rsm_fast.engine.forward_rows`: NFT's random ``floor(0.99 N)`` of
the N steps, AWM's ``discrete_wo_init`` strata; fresh counter-based noise) and the model regresses
there: the fused op ``rsm_fast::fp_loss`` (``ops.nft_loss`` / ``ops.awm_loss``), or with
``train.loss_impl=reference`` the eager transcription :mod:`rsm_fast.losses.forward_process`. No
trajectory, log-probability or allocator is involved. The old (NFT) / EMA (AWM) weights are a
shadow copy of the trained parameters that follows them after every epoch,
``shadow <- d shadow + (1 - d) theta`` with ``d`` from ``method.fp_decay``; they are evaluated by
writing the shadow into the trained tensors in place (and back), which a compiled region or a
captured graph reads like any weight update.

[DECISION] One shadow copy of the trained tensors (for a LoRA, the LoRA tensors) rather than a
second gated LoRA adapter: the copy costs two tensor copies of the trained weights per no-grad
evaluation pass, a second adapter would add a LoRA branch to every forward of the run (rollout and
training), and full fine-tuning needs the copy anyway.

[DECISION] Every task runs the losses in rectified-flow coordinates. A VP model's forward process
``x = alpha x0 + sigma eps`` is the rectified flow at ``t = sigma / (alpha + sigma)`` scaled by
``alpha + sigma`` (``x / (alpha + sigma) = (1 - t) x0 + t eps``), and an epsilon prediction at
``x`` has the velocity ``v = eps_hat - x0_hat`` with ``x0_hat = (x - sigma eps_hat) / alpha``. The
released losses (written for SD3's flow) then apply unchanged to the 2-D task, digits-ddim and SD1.5;
for a flow model ``alpha + sigma = 1`` and nothing changes.

No-grad evaluations (reference, old / EMA shadow, AWM's pre-update likelihood when
``train.inner_updates > 1``) are counted as ``reference`` NFE; the trained forward as ``train``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from . import ops
from . import rewards as R
from . import solvers as SV
from .advantages import set_advantages
from .dist_stats import global_set_advantages
from .engine.forward_rows import awm_steps, forward_rows, nft_steps
from .engine.solver_rollout import SolverRollout
from .interrupts import fault_point
from .losses import forward_process as FP
from .train_step import weights_applied
from .transitions import rowwise

if TYPE_CHECKING:
    from .trainer import Trainer


def grid_from_transition(tr) -> SV.Grid:
    """The solver grid of a task's transition: flow (``v``) from its ``t`` table and the last
    ``t_next``; VP (``eps``) from its marginal ``alpha`` / ``sigma_t`` tables, the final point from
    the last ODE step ``c_x = alpha_next / alpha``."""
    t = tr.table("t")
    if tr.native == "v":
        return SV.Grid.from_flow_t(torch.cat([t, tr.table("t_next")[-1:]]))
    alpha, sigma = tr.table("alpha"), tr.table("sigma_t")
    c_x, c_f = tr.table("c_x_ode")[-1], tr.table("c_f_ode")[-1]
    # DDIM's ODE step: c_x = alpha'/alpha, c_f = sigma' - c_x sigma; a clean end (final alpha_bar 1)
    # gives sigma' = 0 up to rounding, snapped so the solvers see lambda = +inf exactly
    a_end = (c_x * alpha[-1]).clamp(max=1.0)
    s_end = (c_f + c_x * sigma[-1]).clamp(min=0.0)
    s_end = torch.where(s_end < 1e-12, torch.zeros_like(s_end), s_end)
    return SV.Grid("vp", torch.cat([alpha, a_end.reshape(1)]), torch.cat([sigma, s_end.reshape(1)]), t)


class ForwardFamily:
    """The ``forward`` estimator family (module docstring; its interface: rsm_fast/families.py)."""

    def __init__(self, trainer: "Trainer"):
        self.tr = tr = trainer
        mc, trans = tr.cfg.method, tr.task.transition
        self.grid = grid_from_transition(trans)
        self.native = trans.native
        plan = tr.plan
        if plan.initial_key.numel() != plan.group[-1].numel():
            raise RuntimeError("the forward family needs a K = 1 plan (one final sample per initial row)")
        self.rollout = SolverRollout(tr.handle.model, tr.cfg.rollout.solver, self.native, self.grid,
                                     keys=plan.initial_key, group=plan.group[-1],
                                     chunk_size=tr.cfg.rollout.chunk_size or None, seed=tr.cfg.train.seed,
                                     cfg_scale=tr.task.cfg_scale, device=tr.device, graphs=tr.cfg.rollout.graphs)
        self.shadow = [p.detach().clone() for p in tr.params]      # NFT's old / AWM's EMA weights
        self.nft = mc.fp_loss == "nft"
        # the fused op (rsm_fast::fp_loss) or the float64-capable reference; AWM's pre-update
        # likelihood comes from the same implementation so the ratio is exactly 1 at equal weights
        self.losses = ops if tr.cfg.train.loss_impl == "fused" else FP

    # -- state (checkpoints) ------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"shadow": [s.detach().clone() for s in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        shadow = state["shadow"]
        if len(shadow) != len(self.shadow) or any(a.shape != b.shape for a, b in zip(shadow, self.shadow)):
            raise ValueError("checkpoint 'forward' shadow weights do not match this policy")
        with torch.no_grad():
            for s, v in zip(self.shadow, shadow):
                s.copy_(v)

    def _shadow_applied(self):
        return weights_applied(self.tr.params, self.shadow)

    # -- the family interface (rsm_fast/families.py) -----------------------------------------
    def prepare(self) -> None:
        pass

    def sample(self):
        return self._sample_and_score()

    def rows(self, batch) -> dict:
        from .train_step import micro_batches

        x0, r = batch
        rows = self._rows(x0, self._advantages(r))
        rows["parts"] = len(micro_batches(rows["x_t"].shape[0], self.tr.cfg.train.grad_accum))
        rows["gap"] = []     # the first update's mean |v - v_ref|^2 per row: the epoch's "kl" (velocity MSE)
        return rows

    def num_rows(self, rows: dict) -> int:
        return rows["x_t"].shape[0]

    def total_rows(self, rows: dict) -> int:
        return rows["x_t"].shape[0] * self.tr.world.size      # every rank holds the same number of rows

    def after_update(self, rows: dict) -> None:
        tr, kind = self.tr, self.tr.cfg.method.fp_decay
        d = (FP.nft_old_decay(tr.epochs_done, int(kind[-1])) if kind.startswith("nft")
             else FP.awm_ema_decay(tr.epochs_done, "constant" if kind == "awm_const" else "linear"))
        FP.ema_update_(self.shadow, tr.params, d)
        rows["decay"] = d

    def logs(self, batch, rows: dict, stats: dict) -> dict:
        tr = self.tr
        gap = rows["gap"]
        kl = float(torch.stack(gap).sum()) / rows["x_t"].shape[0] if gap else float("nan")
        if tr.world.active:
            kl = float(tr.world.sum(torch.tensor([kl], dtype=torch.float64), "stats")) / tr.world.size
        r = tr.world.gather(batch[1], op="reward gather")
        return {"reward_mean": float(r.mean()), "reward_std": float(r.std()), "kl": kl,
                "records": self.total_rows(rows), "shadow_decay": rows["decay"]}

    def per_step(self, batch, rows: dict, seconds: dict) -> dict:
        return {}

    def _sample_and_score(self):
        tr = self.tr
        with tr.clock("rollout"):
            tr.conds = tr.task.conditions(tr._spec.groups, tr.gen)          # every rank: all groups
            first, total = tr._rows0
            x_init = tr.task.initial_latents(total, tr.gen)
            c = None if tr.conds.cond is None else tr.conds.cond.to(tr.device)
            u = None if tr.conds.uncond is None else tr.conds.uncond.to(tr.device)
            if x_init is None:
                fs = self.rollout.run(c, u, latent_shape=tuple(tr.task.latent_shape), epoch=tr.epochs_done)
            else:
                fs = self.rollout.run(c, u, x_init=x_init[first:first + self.rollout.rows].to(tr.device),
                                      epoch=tr.epochs_done)
        tr.nfe["rollout"] += fs.nfe["total"]
        tr._groups = fs.group
        fault_point("after-rollout")
        tr._check_samples(fs.x0)
        skip = None
        with tr.clock("reward"):
            try:
                r = tr._score(fs.x0, fs.group)
            except R.RewardSkipped as e:
                skip = str(e)
        if tr.world.any(skip is not None, "reward skip agreement"):
            tr.epochs_done += 1
            tr.skipped += 1
            return {"skipped": skip or "a reward fault on another rank", "lr": tr.opt.param_groups[0]["lr"]}
        return fs.x0, r

    def _advantages(self, r: Tensor) -> Tensor:
        """Per-sample advantages centred in each prompt group (the plan's baseline sets at the last
        step), clipped to ``method.adv_clip``; ``adv_norm=global`` divides by every rank's std."""
        tr, mc = self.tr, self.tr.cfg.method
        group = self.rollout.group
        sid = group - group.min()
        sizes = torch.bincount(sid.cpu()).tolist()
        clip = mc.adv_clip if mc.adv_clip > 0 else None
        if tr.world.active and mc.adv_norm == "global":
            return global_set_advantages(tr.world, r, sid, sizes, baseline=mc.baseline, clip=clip)
        return set_advantages(r, sid, sizes, baseline=mc.baseline, normalize=mc.adv_norm, clip=clip)

    # -- training rows ------------------------------------------------------------------------
    def _native(self, fn, x: Tensor, t: Tensor, group: Tensor) -> Tensor:
        """``fn``'s native output at the rows (CFG-combined as the rollout). Without grad it runs
        through the rollout's chunked evaluation at the rollout's chunk size, so the rows x steps
        of an epoch never go through the model in one call and, with ``rollout.graphs``, the
        policy (and the shadow written into its tensors) replays the rollout's captured graph."""
        tr = self.tr
        if torch.is_grad_enabled():
            return tr._policy_out(x, t, group, model=fn)
        c = tr.conds.cond
        c = None if c is None else c.to(tr.device).index_select(0, group)
        u = None if tr.conds.uncond is None else tr.conds.uncond.to(tr.device)
        model = None if fn is tr.handle.model else fn
        return self.rollout._evaluate(x, t, c, u, {"padding": 0}, model=model)

    def _velocity(self, f: Tensor, rows: dict, sl=slice(None)) -> Tensor:
        """The model's velocity in rectified-flow coordinates (module docstring)."""
        f = f.float()
        if self.native == "v":
            return f
        x, a, s = rows["x_t"][sl], rows["alpha"][sl], rows["sigma"][sl]
        x0_hat = (x - rowwise(s, x) * f) / rowwise(a, x)
        return f - x0_hat

    def _rows(self, x0: Tensor, adv: Tensor) -> dict:
        tr, mc = self.tr, self.tr.cfg.method
        keys, N = self.rollout.keys, self.grid.num_steps
        seed = self.rollout.epoch_seed(tr.epochs_done)
        steps = (nft_steps(N, mc.fp_fraction, keys, seed=seed) if self.nft
                 else awm_steps(N, mc.fp_timesteps, mc.fp_fraction, keys, seed=seed))
        fr = forward_rows(x0.float(), keys, steps.to(keys.device), self.grid, seed=seed)
        scale = fr.alpha + fr.sigma
        rows = {"x_t": fr.x_t, "t": fr.t, "alpha": fr.alpha, "sigma": fr.sigma, "eps": fr.eps,
                "t_rf": fr.sigma / scale, "x_rf": fr.x_t / rowwise(scale, fr.x_t),
                "x0": x0.float().index_select(0, fr.sample), "adv": adv.index_select(0, fr.sample),
                "group": self.rollout.group.index_select(0, fr.sample)}
        M, g = fr.x_t.shape[0], 1 if tr.task.cfg_scale is None else 2
        ev = lambda fn: self._velocity(self._native(fn, rows["x_t"], rows["t"], rows["group"]), rows)  # noqa: E731
        with torch.no_grad():
            rows["v_ref"] = ev(tr.handle.reference) if mc.fp_kl > 0 else None
            need_shadow = self.nft or mc.fp_ema_kl > 0
            if need_shadow:
                with self._shadow_applied():
                    rows["v_shadow"] = ev(tr.handle.model)
            rows["logp_old"] = None
            if not self.nft and tr.cfg.train.inner_updates > 1:     # the pre-update likelihood (off-policy)
                rows["logp_old"] = self.losses.awm_log_likelihood(ev(tr.handle.model), rows["eps"], rows["x0"],
                                                                  rows["t_rf"], weighting=mc.fp_weighting, p=mc.fp_power)
            tr.nfe["reference"] += M * g * ((mc.fp_kl > 0) + need_shadow + (rows["logp_old"] is not None))
        return rows

    def loss(self, rows: dict, sl: slice):
        tr, mc = self.tr, self.tr.cfg.method
        cmax = mc.adv_clip if mc.adv_clip > 0 else 5.0
        pick = lambda k: None if rows[k] is None else rows[k][sl]  # noqa: E731
        v = self._velocity(self._native(tr.handle.model, rows["x_t"][sl], rows["t"][sl], rows["group"][sl]), rows, sl)
        v = v.contiguous()                                   # the fused op reads flat rows
        if self.nft:
            loss, stats = self.losses.nft_loss(v, rows["v_shadow"][sl], pick("v_ref"), rows["x_rf"][sl], rows["x0"][sl],
                                               rows["t_rf"][sl], rows["adv"][sl], beta=mc.fp_beta, adv_clip_max=cmax,
                                               kl_beta=mc.fp_kl)
        else:
            loss, stats = self.losses.awm_loss(v, rows["eps"][sl], rows["x0"][sl], rows["t_rf"][sl], rows["adv"][sl],
                                               logp_old=pick("logp_old"), v_ref=pick("v_ref"),
                                               v_ema=pick("v_shadow") if mc.fp_ema_kl > 0 else None,
                                               weighting=mc.fp_weighting, p=mc.fp_power, clip_range=mc.fp_clip,
                                               adv_clip_max=cmax, kl_beta=mc.fp_kl, ema_beta=mc.fp_ema_kl)
        if rows["v_ref"] is not None and len(rows["gap"]) < rows["parts"]:
            rows["gap"].append(stats["kl"].sum())      # uniform KL weight: mean |v - v_ref|^2 per row
        return loss, None
