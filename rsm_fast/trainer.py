"""The one training engine: rollout -> reward -> estimator/advantages -> loss -> optimizer.

A preset only chooses data (estimator, returns, baseline, surrogate form, reweighting, trust
region, KL); this loop never branches on a method *name*. Per epoch:

1. **rollout** — ``batch_size`` trajectories of the current policy; per step the state, noise,
   rollout output ``f_old`` and reference output ``f_ref`` are stored (spec §14).
2. **reward** — one checked float per trajectory (NaN / wrong shape stop the run here).
3. **estimator** — zeroth order: advantages from the hard reward (group baseline) or from the
   soft, entropy-augmented return ``R_i = r - alpha sum_{j>i} KL_j``; first order: the guidance
   ``Psi = K (Sigma/b) grad r(x0)`` (terminal, spec §9.3) or ``K grad r(x0_hat)`` (current state).
4. **loss** — the reference RSM losses (native-output space) averaged over trained rows.
5. **optimizer** — ``inner_updates`` AdamW steps; a non-finite gradient stops the run before
   the step, so a NaN never reaches the weights.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from . import rewards as R
from . import rollout as RO
from .advantages import center, group_advantages
from .config import RunConfig, to_dict
from .estimators import fo_current_state, soft_returns
from . import ops
from .losses import score_regression_loss, zo_row_loss
from .runlog import PhaseClock, Progress, RunDir
from .tasks import make_task
from .transitions import rowwise


class NonFiniteError(RuntimeError):
    """Loss or gradient became NaN/inf; the weights were left untouched."""


@dataclass
class Rows:
    """Flattened training rows (step-major): every tensor has leading dim ``S*B``."""

    idx: Tensor
    x: Tensor
    z: Tensor
    f_old: Tensor
    f_ref: Tensor
    adv: Tensor | None = None     # zeroth order
    g: Tensor | None = None       # first order: reward gradient per row


class Trainer:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        tc, mc = cfg.train, cfg.method
        if tc.threads:
            torch.set_num_threads(tc.threads)
        self.device = torch.device(tc.device)
        self.task = make_task(cfg.task)
        self.reward_fn, self.builtin_reward = R.resolve(cfg.task.reward, self.task)
        self.reward_name = cfg.task.reward
        torch.manual_seed(tc.seed)
        pc = cfg.policy
        self.policy = self.task.build_policy(hidden=pc.hidden, layers=pc.layers, emb_dim=pc.emb_dim).to(self.device)
        self.params = [p for p in self.policy.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=tc.lr, weight_decay=tc.weight_decay)
        self.sched = None
        if tc.lr_schedule == "cosine":
            self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=tc.epochs, eta_min=tc.lr * tc.lr_final_frac)
        self.gen = torch.Generator().manual_seed(tc.seed)
        self.clock = PhaseClock()
        self.nfe = {"rollout": 0, "reference": 0, "train": 0, "eval": 0}
        stoch = torch.nonzero(self.task.transition.sde_mask).flatten()
        n_train = max(1, math.ceil(tc.timestep_fraction * stoch.numel()))
        self.train_steps = stoch[:n_train].to(self.device)
        self.epochs_done = 0
        self.kl_alpha = mc.kl_coef if mc.kl_coef > 0 else cfg.task.alpha
        fused = tc.loss_impl == "fused"
        self.zo_loss = ops.zo_loss if fused else zo_row_loss
        self.score_loss = ops.score_loss if fused else score_regression_loss
        if fused:  # build / load the device's kernels now, outside the timed phases
            ops.backends.for_device(self.device)

    # ------------------------------------------------------------------------------------------
    def _rows(self, ro: RO.Rollout) -> Rows:
        st = self.train_steps
        B = ro.x0.shape[0]
        flat = lambda t: t.index_select(0, st).flatten(0, 1)  # noqa: E731
        return Rows(idx=st.repeat_interleave(B), x=flat(ro.x), z=flat(ro.z), f_old=flat(ro.f_old), f_ref=flat(ro.f_ref))

    def _advantages(self, ro: RO.Rollout, r: Tensor) -> Tensor:
        """Per-row advantages ``[S*B]`` for the zeroth-order estimator."""
        mc = self.cfg.method
        clip = mc.adv_clip if mc.adv_clip > 0 else None
        S, B = self.train_steps.numel(), r.shape[0]
        if mc.returns == "hard":
            a = group_advantages(r.view(-1, mc.group_size), baseline=mc.baseline, normalize=mc.adv_norm, clip=clip)
            return a.reshape(1, B).expand(S, B).reshape(-1)
        # soft: entropy-augmented return per step, centred across the batch at each step
        ret = soft_returns(r, ro.kl, self.kl_alpha).index_select(0, self.train_steps)   # [S, B]
        a = center(ret, dim=1, baseline=mc.baseline)
        if mc.adv_norm == "group":
            a = a / (a.std(dim=1, keepdim=True) + 1e-4)
        elif mc.adv_norm == "global":
            a = a / (a.std() + 1e-4)
        if clip is not None:
            a = a.clamp(-clip, clip)
        return a.reshape(-1)

    def _fo_guidance(self, rows: Rows, c) -> Tensor:
        """Target shift in native space ``gamma Psi / lambda`` for the first-order estimators."""
        mc = self.cfg.method
        K = mc.fo_reward_scale
        if mc.estimator == "fo_terminal":
            psi = K * rowwise(c.Sigma / c.b, rows.g) * rows.g          # lookahead scale (Sigma/b) g
        else:
            x0_hat = c.x0_hat(rows.f_old, rows.x).detach()
            psi = fo_current_state(rows.x, lambda _x: x0_hat, self._reward_for_grad, alpha=1.0 / K,
                                   identity_jacobian=True)
        gamma = {"one": torch.ones_like(c.alpha), "alpha_bar": c.alpha**2, "sqrt_alpha_bar": c.alpha}[mc.fo_gamma]
        return rowwise(gamma / c.lam, psi) * psi

    def _reward_for_grad(self, x: Tensor) -> Tensor:
        return R.checked(self.reward_fn, self.reward_name, x)

    def _loss(self, rows: Rows, c, f: Tensor, target_shift: Tensor | None):
        mc = self.cfg.method
        if mc.estimator == "zo":
            out = self.zo_loss(f, rows.f_old, rows.z, rows.adv, c, form=mc.surrogate, reweight=mc.reweight,
                                clip_eps=mc.clip_eps, f_ref=rows.f_ref if mc.kl_coef > 0 else None,
                                kl_coef=mc.kl_coef, kl_dt_weight=mc.kl_dt_weight)
            return out.loss.mean(), out
        w = 0.5 * c.omega**2 if mc.fo_weight == "kl" else 0.5 * torch.ones_like(c.omega)
        loss = self.score_loss(f, rows.f_ref, rows.f_old, target_shift, C1=w, gamma=1.0, C2=mc.trust_c2)
        return loss.mean(), None

    # ------------------------------------------------------------------------------------------
    def epoch(self) -> dict:
        tc, mc = self.cfg.train, self.cfg.method
        self.policy.eval()
        with self.clock("rollout"):
            ro = RO.sample(self.policy, self.task, tc.batch_size, self.gen, self.device)
        self.nfe["rollout"] += ro.nfe_policy
        self.nfe["reference"] += ro.nfe_ref
        with self.clock("reward"):
            r = R.checked(self.reward_fn, self.reward_name, ro.x0)
            g = None
            if mc.estimator == "fo_terminal":
                g = self.task.reward_grad(ro.x0) if self.builtin_reward else R.reward_grad(self.reward_fn, self.reward_name, ro.x0)
        with self.clock("train"):
            rows = self._rows(ro)
            if mc.estimator == "zo":
                rows.adv = self._advantages(ro, r)
            elif g is not None:
                rows.g = g.unsqueeze(0).expand(self.train_steps.numel(), *g.shape).reshape(-1, *g.shape[1:])
            c = self.task.transition.coeffs(rows.idx)
            shift = None if mc.estimator == "zo" else self._fo_guidance(rows, c)
            stats = self._optimize(rows, c, shift)
        self.epochs_done += 1
        lr = self.opt.param_groups[0]["lr"]
        if self.sched is not None:
            self.sched.step()
        return {"lr": lr, "reward_mean": float(r.mean()), "reward_std": float(r.std()),
                "kl": float(ro.kl.index_select(0, self.train_steps).sum(0).mean()), **stats}

    def _optimize(self, rows: Rows, c, shift) -> dict:
        tc = self.cfg.train
        self.policy.train()
        stats: dict = {}
        for u in range(tc.inner_updates):
            f = self.policy(rows.x, c, rows.f_ref)
            loss, out = self._loss(rows, c, f, shift)
            self.nfe["train"] += rows.x.shape[0]
            if not torch.isfinite(loss):
                raise NonFiniteError(f"loss became {float(loss.detach())} at epoch {self.epochs_done} (update {u}); weights left unchanged")
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            gn = torch.nn.utils.clip_grad_norm_(self.params, tc.max_grad_norm if tc.max_grad_norm > 0 else float("inf"))
            if not torch.isfinite(gn):
                self.opt.zero_grad(set_to_none=True)
                raise NonFiniteError(f"gradient norm became {float(gn)} at epoch {self.epochs_done} (update {u}); weights left unchanged")
            self.opt.step()
            if u == 0:
                stats["loss"] = float(loss.detach())
                stats["grad_norm"] = float(gn)
                if out is not None:
                    stats["clip_frac"] = float(out.clipped.float().mean())
                    # on the first update the policy IS the rollout policy: this must be exactly 0
                    stats["onpolicy_logratio_absmax"] = float(out.log_ratio.abs().max())
            elif out is not None:
                stats["clip_frac_last"] = float(out.clipped.float().mean())
        return stats

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, n: int | None = None) -> dict:
        n = n or self.cfg.task.eval_samples
        gen = torch.Generator().manual_seed(self.cfg.train.seed + 1_000_003)
        self.policy.eval()
        with self.clock("eval"):
            x0 = RO.sample(self.policy, self.task, n, gen, self.device, record=False)
            r = R.checked(self.reward_fn, self.reward_name, x0)
            out = {"reward_mean": float(r.mean()), "reward_std": float(r.std())}
            if self.builtin_reward:
                out.update(self.task.evaluate(x0.cpu(), seed=self.cfg.train.seed))
        self.nfe["eval"] += n * self.task.transition.num_steps
        return out

    def state_dict(self) -> dict:
        return {"policy": self.policy.state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict() if self.sched is not None else None,
                "epochs_done": self.epochs_done, "generator": self.gen.get_state(), "config": to_dict(self.cfg)}

    def run(self, run_dir: RunDir | None = None, progress: bool = True) -> dict:
        tc = self.cfg.train
        bar = Progress(tc.epochs, enabled=progress)
        if run_dir is not None:
            run_dir.open(to_dict(self.cfg))
        t_start = time.perf_counter()
        try:
            for e in range(tc.epochs):
                stats = self.epoch()
                rec = {"epoch": e, **stats, "nfe": self.nfe_total(), "seconds": self.clock.snapshot()}
                if run_dir is not None:
                    run_dir.log(rec)
                bar.update(e + 1, f"reward {stats['reward_mean']:.3f} kl {stats['kl']:.3f}")
            final = self.evaluate()
            summary = self.summary(final, time.perf_counter() - t_start)
            if run_dir is not None:
                run_dir.save_checkpoint(self.state_dict())
                run_dir.write_summary(summary)
        finally:
            if run_dir is not None:
                run_dir.close()
        return summary

    def nfe_total(self) -> int:
        return self.nfe["rollout"] + self.nfe["reference"] + self.nfe["train"]

    def summary(self, final: dict, wall: float) -> dict:
        secs = self.clock.snapshot()
        secs["total"] = round(wall, 4)
        return {
            "task": self.task.name, "preset": self.cfg.preset, "epochs": self.epochs_done,
            **final,
            "nfe": self.nfe_total(),
            "nfe_by_kind": dict(self.nfe),
            "seconds": secs,
            "seed": self.cfg.train.seed,
            "torch": torch.__version__,
            "device": str(self.device),
        }
