"""The one training engine: rollout -> reward -> estimator/advantages -> loss -> optimizer.

A preset only chooses data (rollout plan, estimator, returns, baseline, surrogate form,
reweighting, trust region, KL); this loop never branches on a method *name*. Per epoch:

1. **rollout** — the :class:`~rsm_fast.engine.rollout.RolloutEngine` executes the configured
   plan (``rollout.plan``: K = 1 SDE trajectories, one-step branching from an ODE trunk, or a
   recursive tree) with counter-based noise; every trained transition becomes a record (state,
   step, noise, rollout output ``f_old``, old log-prob, group, ancestry). The frozen reference is
   then evaluated once at every record (``f_ref``: KL, soft returns, first-order targets).
2. **reward** — one checked float per final sample (NaN / wrong shape stop the run here).
3. **estimator** — zeroth order: a record's value is the mean return of the final samples that
   descend from it (hard reward, or the soft return ``r - alpha sum_{j>i} KL_j``), centred within
   its baseline set (the siblings of one branching parent, else its group at that step; see
   ``engine.plan.compile_plan``); first order: ``Psi = K (Sigma/b) grad r(x0)`` averaged over the
   descendants (terminal, spec §9.3), ``K (Sigma/b) grad_{x'} r(x0_hat(x'))`` at the record's
   sampled next state (lookahead: SQDF, Residual ∇-DB) or ``K grad r(x0_hat)`` (current state,
   VGG-Flow); Table 1's gamma, C1 and C2 per method are data (``method.fo_*``, ``trust_*``).
4. **loss** — the RSM losses (native-output space) averaged over records (fused ops by default).
5. **optimizer** — ``inner_updates`` AdamW steps; a non-finite loss or gradient stops the run
   before the step, so a NaN never reaches the weights.
"""
from __future__ import annotations

import math
import signal
from contextlib import nullcontext
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

from . import rewards as R
from . import ops
from . import diagnostics as D
from .advantages import set_advantages
from .allocator import step_scale
from .budget import BudgetController
from .config import GROUPED, ConfigError, RunConfig
from .engine.credit import Credit
from .engine.plan import PlanError, PlanSpec, compile_plan
from .engine.rollout import Records, RolloutEngine
from .engine.waves import merge_plans, merge_records, wave_plans
from .families import make_family
from .training_plan import plan_spec
from .fo_guidance import FirstOrderMixin
from .distributed import ONE, World, rank_groups
from .dist_stats import gather_eval, global_set_advantages
from .interrupts import RunInterrupted, fault_point
from .trainer_state import TrainerState
from .losses import score_regression_loss, zo_row_loss
from .models.runtime import make_optimizer, peak_memory
from .ops.nvtx import annotate
from .runlog import PhaseClock
from .rundir import RunDir
from .train_step import TrainStep
from .tasks import make_task
from .tasks.base import Conditioning
from .transitions import pcpo_target

EVAL_CHUNK = 1024   # rows per model call in the final evaluation when rollout.chunk_size is 0

class NonFiniteError(RuntimeError):
    """Loss or gradient became NaN/inf; the weights were left untouched."""


@dataclass
class Rows:
    """The epoch's training rows: one per record (every tensor has leading dim ``M``)."""

    idx: Tensor                   # step index
    t: Tensor                     # model time value at that step
    x: Tensor
    z: Tensor
    f_old: Tensor
    f_ref: Tensor
    adv: Tensor | None = None     # zeroth order
    g: Tensor | None = None       # first order: reward gradient per row


def _slice_rows(rows: Rows, sl: slice) -> Rows:
    return Rows(**{k: (None if v is None else v[sl]) for k, v in vars(rows).items()})


def _slice_coeffs(c, sl: slice):
    if sl == slice(0, c.t.shape[0]):
        return c
    return replace(c, **{f.name: getattr(c, f.name)[sl] for f in fields(c)})


class Trainer(TrainerState, FirstOrderMixin):
    def __init__(self, cfg: RunConfig, world: World | None = None, device: str | None = None):
        """``world``: this process's rank and the run's size (:mod:`rsm_fast.distributed`; default
        one process); ``device``: the rank's device when it differs from ``train.device``
        (``cuda`` -> ``cuda:LOCAL_RANK``)."""
        self.cfg = cfg
        self.world = world or ONE
        tc, mc = cfg.train, cfg.method
        if tc.threads:
            torch.set_num_threads(tc.threads)
        if torch.cuda.is_available():     # flow_grpo sets both; no effect on CPU
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(tc.tf32)
        self.device = torch.device(device or tc.device)
        try:
            self.task = make_task(cfg.task, self.device, policy=cfg.policy)
        except ValueError as e:     # bad model folder / prompt file / resolution: one line, nothing written
            raise ConfigError(str(e).splitlines()[0]) from None
        self.reward_name = cfg.task.reward or self.task.default_reward
        self.reward_fn, self.builtin_reward = R.resolve(self.reward_name, self.task,
                                                        options=R.RewardOptions.from_task_config(cfg.task))
        if mc.estimator in ("fo_terminal", "fo_current", "fo_lookahead") and not (self.builtin_reward or getattr(self.reward_fn, "differentiable", False)):
            raise ConfigError(f"config field 'task.reward': {R.redact_spec(self.reward_name)!r} is not differentiable, but "
                              f"method.estimator {mc.estimator!r} needs its gradient")
        torch.manual_seed(tc.seed)
        self.handle = self.task.make_policy(cfg.policy)
        self.policy = self.handle.module.to(self.device)
        self.sharded = self.world.active and tc.parallel == "fsdp"
        if self.sharded:
            self._check_even_split(cfg)
        if self.world.active:     # DDP (replicate) or FSDP2 on the module the adapter calls: same names, same calls
            from . import parallel as PAR

            if self.sharded:
                PAR.shard_policy(self.policy, reference=self.handle.frozen)
            else:
                PAR.replicate_policy(self.policy)
        self.params = [p for p in self.policy.parameters() if p.requires_grad]
        try:
            self.opt = make_optimizer(self.params, tc.optimizer, lr=tc.lr, weight_decay=tc.weight_decay)
        except ImportError as e:
            raise ConfigError(f"config field 'train.optimizer': {e}") from None
        self.sched = None
        if tc.lr_schedule == "cosine":
            self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=tc.epochs, eta_min=tc.lr * tc.lr_final_frac)
        self.gen = torch.Generator().manual_seed(tc.seed)
        # inner updates, micro-batches, compiled regions, EMA (rsm_fast/train_step.py)
        self.step = TrainStep(self.policy, self.params, self.opt, compile=tc.compile, grad_accum=tc.grad_accum,
                              max_grad_norm=tc.max_grad_norm, ema_decay=tc.ema_decay, ema_every=tc.ema_every,
                              world=self.world, sharded=self.sharded)
        self.clock = PhaseClock(self.device)   # CUDA: synchronised at phase edges (runlog.py)
        self.stop = None        # a StopController while rsm_fast.run_loop drives the trainer
        self.nfe = {"rollout": 0, "reference": 0, "train": 0, "eval": 0}
        self.scored = {"reward": 0, "reward_grad": 0, "eval": 0}   # samples decoded + scored (rsm_fast/cost.py)
        self.epochs_done = 0
        self.skipped = 0
        self.kl_alpha = mc.kl_coef if mc.kl_coef > 0 else cfg.task.alpha
        tr = self.task.transition
        self._build_plan(plan_spec(cfg, tr.num_steps, tr.sde_mask))
        self._omega_train = self._pcpo_target(tr) if mc.reweight == "pcpo" else None
        # rollout.allocator=online: K per step re-allocated after every update (rsm_fast/budget.py)
        self.budget = (BudgetController(cfg, tr, self._gplan, self.task.cfg_scale is not None, self._omega_train)
                       if cfg.rollout.allocator else None)
        self._psi_scale = step_scale(tr, cfg.rollout.alloc_psi_units)     # psi = scale A z (diagnostics' v)
        # Zeroth order with a reward model/server and several waves: score wave w on a worker thread
        # while wave w + 1 samples. First-order estimators need the reward's autograd graph, and the
        # built-in analytic rewards cost nothing, so both are scored after the rollout.
        self.async_reward = None
        if len(self.engines) > 1 and mc.estimator == "zo" and not self.builtin_reward:
            self.async_reward = R.AsyncReward(self.reward_fn, policy=tc.reward_faults, name=self.reward_name,
                                              timeout=cfg.task.reward_timeout)
        self._t_table = tr.table("t").to(self.device, torch.float32)
        fused = tc.loss_impl == "fused"
        self.zo_loss = ops.zo_loss if fused else zo_row_loss
        self.score_loss = ops.score_loss if fused else score_regression_loss
        if fused:  # build / load the device's kernels now, outside the timed phases
            ops.backends.for_device(self.device)
        self.family = make_family(self)     # zo / fo / forward (rsm_fast/families.py)

    def _check_even_split(self, cfg: RunConfig) -> None:
        """FSDP2 gathers the weights in every forward, a collective: every rank must make the same
        model calls, so the groups and the evaluation samples must split evenly over the ranks."""
        n, G = self.world.size, cfg.method.group_size
        groups = cfg.train.batch_size // (G if cfg.method.estimator in GROUPED and G else cfg.train.batch_size)
        if groups % n:
            raise ConfigError(f"config field 'train.batch_size': train.parallel=fsdp needs the epoch's {groups} "
                              f"group(s) to split evenly over {n} ranks")
        ev = cfg.task.eval_samples or self.task.default_eval_samples
        if ev % n:
            raise ConfigError(f"config field 'task.eval_samples': train.parallel=fsdp needs the {ev} evaluation "
                              f"samples to split evenly over {n} ranks")

    def _pcpo_target(self, tr) -> Tensor:
        """PCPO-reweight's target native weight per step (:func:`rsm_fast.transitions.pcpo_target`)."""
        return pcpo_target(tr, self.cfg.method.pcpo_target).to(self.device)    # cast to the rows' dtype at use

    def _build_plan(self, spec: PlanSpec) -> None:
        """Compile ``spec`` (in ``rollout.waves`` waves), one engine per wave, the merged epoch plan,
        its credit map and its per-record step weights. Called again when a MixGRPO window moves."""
        cfg, tc, mc = self.cfg, self.cfg.train, self.cfg.method
        self._spec = spec
        try:
            g0, ng = rank_groups(spec.groups, self.world)
            plans = wave_plans(replace(spec, groups=ng, group_offset=g0), cfg.rollout.waves)
            # the whole run's plan (every rank's groups): step counts, trunks, allocator costs
            self._gplan = compile_plan(spec) if self.world.size > 1 else None
        except (PlanError, ValueError) as e:      # split_groups' messages name rollout.waves; the plan compiler's do not
            msg = str(e)
            raise ConfigError(msg if msg.startswith("rollout.waves") else f"training plan: {msg}") from None
        model = self.engine.model if hasattr(self, "engine") else self.handle.model
        self.engines = []
        for p in plans:   # one engine per wave; with graphs they share one GraphedModel
            self.engines.append(RolloutEngine(model, self.task.transition, p, chunk_size=cfg.rollout.chunk_size or None,
                                              seed=tc.seed, cfg_scale=self.task.cfg_scale, device=self.device,
                                              graphs=cfg.rollout.graphs))
            model = self.engines[0].model
        self.engine = self.engines[0]
        self.plan = merge_plans([e.plan for e in self.engines])   # this rank's epoch, wave-major
        self._gplan = self._gplan or self.plan
        self._rows0 = (g0 * spec.trunks, self._gplan.rows[0])   # this rank's first x_T row, all ranks' rows
        if mc.estimator == "zo" and mc.baseline == "loo" and min(self.plan.set_sizes) < 2:
            raise ConfigError(f"method.baseline 'loo' needs >= 2 records per baseline set; rollout.plan "
                              f"{cfg.rollout.plan} with method.group_size {mc.group_size} makes a set of "
                              f"{min(self.plan.set_sizes)}")
        self.credit = Credit(self.plan)
        # step weights Kbar / K_i (records per step n_i, mean over trained steps nbar; spec §7.3):
        # every trained step contributes the mean of its records, whatever its branch count
        counts = torch.bincount(self._gplan.record_step.cpu(), minlength=self.plan.num_steps).to(torch.float32)
        w = counts[counts > 0].mean() / counts.clamp(min=1)
        self._row_weight = (None if mc.step_weight == "records" or bool((w[counts > 0] == 1).all())
                            else w.to(self.device).index_select(0, self.plan.record_step))
        self._step_w = None if self._row_weight is None else w      # per step, for the diagnostics

    # ------------------------------------------------------------------------------------------
    def _rollout(self, engines: list[RolloutEngine], plan, cond: Conditioning, gen: torch.Generator, epoch: int,
                 on_wave=None, ref_chunk: int | None = None, rows0: tuple[int, int] | None = None,
                 grad: bool = False, reference: bool = True) -> tuple[Records, Tensor | None, int]:
        """Roll out the waves ``engines`` (whose merged plan is ``plan``) one after the other, calling
        ``on_wave(records)`` after each (the reward overlap), then the frozen reference at every record.
        ``rows0 = (first, total)``: a task's own initial latents are drawn for all ``total`` rows of
        the run (every rank) and this rank keeps its block from ``first``. ``grad``: keep the
        forwards' graphs (:mod:`rsm_fast.fused_path`; the reference's too); ``reference=False``:
        no reference pass (``f_ref`` None)."""
        first, total = rows0 or (0, plan.rows[0])
        x_init = self.task.initial_latents(total, gen)
        if x_init is not None and (first, total) != (0, plan.rows[0]):
            x_init = x_init[first:first + plan.rows[0]]
        c, u = cond.cond, cond.uncond
        c = None if c is None else c.to(self.device)
        u = None if u is None else u.to(self.device)
        from .fused_path import shared_reference
        joint = shared_reference(self.handle, engines[0]) if grad and reference else None
        recs, r0 = [], 0
        for engine in engines:
            if x_init is None:
                rec = engine.run(None, c, u, latent_shape=tuple(self.task.latent_shape), epoch=epoch, grad=grad,
                                 joint=joint)
            else:
                n = engine.plan.rows[0]
                rec = engine.run(x_init[r0:r0 + n].to(self.device), c, u, epoch=epoch, grad=grad, joint=joint)
                r0 += n
            if on_wave is not None:
                on_wave(rec)
            recs.append(rec)
        rec = merge_records(recs, plan)
        if not reference:
            return rec, None, 0
        # rollout.chunk_size 0 means "all rows in one call": for the records too
        chunk = ref_chunk or self.cfg.rollout.chunk_size or max(1, rec.x.shape[0])
        with annotate("reference", self.device):      # an NVTX sub-phase of the rollout
            if grad:
                from .fused_path import reference_with_graph
                f_ref, n_ref = reference_with_graph(engines[0], self.handle.reference, rec, c, u)
            else:
                f_ref, n_ref = engines[0].evaluate_records(self.handle.reference, rec, c, u, chunk_size=chunk)
        return rec, f_ref, n_ref

    def _record_kl(self, rec: Records, f_ref: Tensor):
        """Per-record coefficients (every record is a noisy step) and KL(pi_old || pi_ref) in nats."""
        c = self.task.transition.coeffs(rec.step, torch.ones_like(rec.step, dtype=torch.bool))
        return c, c.kl(rec.f_old, f_ref, reduce="sum")

    def _score(self, x0: Tensor, group: Tensor, conds: Conditioning | None = None, kind: str | None = None) -> Tensor:
        """Reward of final samples (or of Tweedie estimates) ``x0`` whose groups are ``group``, counted in
        ``self.scored[kind]`` (default: ``reward_grad`` when ``x0`` carries a graph, else ``reward``)."""
        self.scored[kind or ("reward_grad" if x0.requires_grad and torch.is_grad_enabled() else "reward")] += x0.shape[0]
        images = self.task.decode(x0)
        if self.builtin_reward:
            return R.checked(self.reward_fn, self.reward_name, images)
        prompts, meta = (conds or self.conds).rows(group)
        return R.evaluate_rewards(self.reward_fn, images, prompts, meta, policy=self.cfg.train.reward_faults,
                                  timeout=self.cfg.task.reward_timeout).unwrap()

    def _reward_grad(self, x0: Tensor, group: Tensor, chunk: int = 0) -> Tensor:
        """``grad_{x0} r`` per row, one decode + reward backward per ``chunk`` rows (0: all at once).
        Autograd keeps every layer of the decode and the reward model for each row of a call, so
        the chunk bounds that memory; rows are independent, so the result does not depend on it."""
        if self.builtin_reward:
            self.scored["reward_grad"] += x0.shape[0]
            return self.task.reward_grad(x0)
        n, g = x0.shape[0], torch.empty_like(x0)
        step = max(1, chunk if 0 < chunk < n else n)
        for s in range(0, n, step):
            with torch.enable_grad():
                x = x0[s:s + step].detach().requires_grad_(True)
                (g[s:s + step],) = torch.autograd.grad(self._score(x, group[s:s + step]).sum(), x)
        if not torch.isfinite(g).all():
            raise R.RewardError(f"reward '{self.reward_name}' returned a non-finite gradient")
        return g

    def _advantages(self, r: Tensor, record_kl: Tensor) -> Tensor:
        """Per-record advantages ``[M]`` for the zeroth-order estimator."""
        mc = self.cfg.method
        if mc.returns == "hard":
            values = self.credit.mean_over_leaves(r)
        else:
            values = self.credit.soft_values(r, record_kl, self.kl_alpha)
        plan, clip = self.plan, (mc.adv_clip if mc.adv_clip > 0 else None)
        if self.world.active and mc.adv_norm == "global":   # the std over every rank's records, as one process
            return global_set_advantages(self.world, values, plan.record_set, plan.set_sizes, baseline=mc.baseline,
                                         clip=clip)
        return set_advantages(values, plan.record_set, plan.set_sizes, baseline=mc.baseline, normalize=mc.adv_norm,
                              clip=clip)

    def _policy_out(self, x: Tensor, t: Tensor, group: Tensor, model=None) -> Tensor:
        """The policy's (or ``model``'s) native output as the rollout saw it (CFG-combined with CFG)."""
        model = model or self.handle.model
        c = self.conds.cond
        c = None if c is None else c.to(self.device).index_select(0, group)
        w = self.task.cfg_scale
        if w is None:
            return model(x, t, c)
        u = self.conds.uncond.to(self.device).expand(x.shape[0], *self.conds.uncond.shape[1:])
        both = model(torch.cat([x, x]), torch.cat([t, t]), None if c is None else torch.cat([c, u]))
        f_c, f_u = both[:x.shape[0]], both[x.shape[0]:]
        return f_u + w * (f_c - f_u)

    def _loss(self, rows: Rows, c, f: Tensor, target_shift: Tensor | None, row_weight="plan"):
        """Mean loss over ``rows`` and the zeroth-order per-row outputs; ``row_weight`` the rows'
        K-bar/K_i weights (default: the whole epoch's, ``self._row_weight``)."""
        mc = self.cfg.method
        row_weight = self._row_weight if isinstance(row_weight, str) else row_weight
        if mc.estimator == "zo":
            out = self.zo_loss(f, rows.f_old, rows.z, rows.adv, c, form=mc.surrogate, reweight=mc.reweight,
                                clip_eps=mc.clip_eps, f_ref=rows.f_ref if mc.kl_coef > 0 else None,
                                kl_coef=mc.kl_coef, kl_dt_weight=mc.kl_dt_weight, row_weight=row_weight,
                                omega_train=(self._omega_train.index_select(0, rows.idx).to(c.omega.dtype)
                                             if mc.reweight == "pcpo" else None))
            return out.loss.mean(), out
        # first order (Thm. 3.2 in native space): C1 (|f - (f_ref + shift)|^2 + C2 |f - f_old|^2)
        c1 = self._fo_c1(c)
        w = c1 if row_weight is None else c1 * row_weight
        loss = self.score_loss(f, rows.f_ref, rows.f_old, target_shift, C1=w, gamma=1.0, C2=self._fo_c2(c, c1))
        return loss.mean(), None

    # ------------------------------------------------------------------------------------------
    def epoch(self) -> dict:
        """One epoch of the estimator family (rsm_fast/families.py): rollout and rewards, rows,
        ``train.inner_updates`` optimizer steps, the epoch's record and per-step diagnostics."""
        sec0, nfe0 = dict(self.clock.seconds), self._counters()
        self.policy.eval()
        fam = self.family
        fam.prepare()
        with self.abandonable():    # rollout and reward touch no weights: a stop may abandon them
            batch = fam.sample()
        if isinstance(batch, dict):     # a skipped epoch's record
            self._sum_nfe(nfe0)
            return batch
        fault_point("train-start")
        with self.clock("train"):
            rows = fam.rows(batch)
            stats = self._optimize(rows)
            fam.after_update(rows)
        self.epochs_done += 1
        lr = self.opt.param_groups[0]["lr"]
        if self.sched is not None:
            self.sched.step()
        logs = fam.logs(batch, rows, stats)
        self._sum_nfe(nfe0)
        out = {"lr": lr, **logs, "peak_memory_mb": self._peak_mb(), **stats,
               **({"cuda_graphs": self.engine.model.stats()} if self.engine.graphs_active else {}),
               "seconds_epoch": {k: round(v - sec0.get(k, 0.0), 4) for k, v in self.clock.seconds.items()},
               "nfe_epoch": {k: v - nfe0.get(k, 0) for k, v in self.nfe.items()},
               "scored_epoch": {k: v - nfe0.get(("scored", k), 0) for k, v in self.scored.items()}}
        a0 = self.clock.seconds.get("alloc", 0.0)
        with self.clock("alloc"):   # diagnostics, allocator and the next plan: this epoch's cost too
            out.update(fam.per_step(batch, rows, out["seconds_epoch"]))
        out["seconds_epoch"]["alloc"] = round(self.clock.seconds["alloc"] - a0, 4)
        return out

    def abandonable(self):
        """The stop controller's abandonable region (nothing when no controller drives the run).
        Several ranks never abandon a phase on their own: a stop is agreed at the epoch's end
        (:meth:`check_stop`), so every rank writes the same checkpoint."""
        return self.stop.abandonable() if self.stop is not None and not self.world.active else nullcontext()

    def check_stop(self) -> None:
        """Raise :class:`RunInterrupted` when a stop was requested (on any rank, agreed by all)."""
        if self.stop is None:
            return
        if not self.world.active:
            self.stop.check()
        elif self.world.any(self.stop.requested, "stop agreement"):
            raise RunInterrupted(self.stop.signum or signal.SIGTERM)

    def _sum_nfe(self, nfe0: dict) -> None:
        """Make the NFE and scored-sample counters the run's (every rank's) totals: this epoch's
        increments (since the snapshot ``nfe0`` of :meth:`_counters`) are summed."""
        if not self.world.active:
            return
        now = self._counters()
        d = torch.tensor([v - nfe0.get(k, 0) for k, v in now.items()], dtype=torch.int64)
        d = self.world.sum(d, "NFE sum").tolist()
        self._set_counters({k: nfe0.get(k, 0) + int(v) for k, v in zip(now, d)})

    def _sample_and_score(self, grad: bool = False):
        """The epoch's rollout and reward: ``(records, f_ref, reference NFE, coeffs, record KL,
        rewards, reward gradients)``, or the epoch's record when the reward policy skipped it.
        ``grad``: the rollout keeps its forwards' graphs (:mod:`rsm_fast.fused_path`)."""
        mc = self.cfg.method
        pending = []
        with self.clock("rollout"):
            self.conds = self.task.conditions(self._spec.groups, self.gen)    # every rank: all groups
            submit = None
            if self.async_reward is not None:
                def submit(w: Records):   # decode here, score on the worker while the next wave samples
                    self.scored["reward"] += w.x0.shape[0]
                    pending.append(self.async_reward.submit(self.task.decode(w.x0), *self.conds.rows(w.x0_group)))
            rec, f_ref, n_ref = self._rollout(self.engines, self.plan, self.conds, self.gen, self.epochs_done, submit,
                                              rows0=self._rows0, grad=grad)
        self.nfe["rollout"] += rec.nfe["total"]
        self.nfe["reference"] += n_ref
        self._groups = rec.group
        fault_point("after-rollout")
        self._check_samples(rec.x0)
        c, record_kl = self._record_kl(rec, f_ref)
        skip = None
        with self.clock("reward"):   # with waves: only the wait for scores not yet finished
            try:
                if pending:
                    r = torch.cat([f.result().unwrap() for f in pending]).to(self.device)
                else:
                    r = self._score(rec.x0, rec.x0_group)
                g = self._fo_grads(rec, c) if mc.estimator != "zo" else None
            except R.RewardSkipped as e:           # policy "skip": this epoch makes no update
                skip = str(e)
        if self.world.any(skip is not None, "reward skip agreement"):     # on every rank when on any
            self.epochs_done += 1
            self.skipped += 1
            return {"skipped": skip or "a reward fault on another rank", "lr": self.opt.param_groups[0]["lr"]}
        return rec, f_ref, n_ref, c, record_kl, r, g

    def _check_samples(self, x0: Tensor) -> None:
        if self.world.any(not bool(torch.isfinite(x0).all()), "sample check"):   # one host read per epoch
            when = (f"after epoch {self.epochs_done - 1}'s update" if self.epochs_done else "before any update")
            raise NonFiniteError(f"the rollout produced non-finite samples {when}: the weights are finite but too "
                                 f"large for the sampler (train.lr={self.cfg.train.lr:g}, train.weight_decay="
                                 f"{self.cfg.train.weight_decay:g}) or the sampler settings are degenerate "
                                 "(task.eta, task.noise_level)")

    def _peak_mb(self) -> float:
        mb = torch.tensor([peak_memory(self.device) / 2**20], dtype=torch.float64)
        return round(float(self.world.max(mb, "memory max")), 1)

    def _per_step(self, rec: Records, rows: Rows, shift, c, seconds: dict) -> dict:
        """Per-timestep diagnostics of this epoch (:mod:`rsm_fast.diagnostics`) and, with
        ``rollout.allocator``, the next epoch's profile (compiled here, so ``self.plan`` is next's)."""
        mc, plan, n = self.cfg.method, self.plan, self.plan.num_steps
        clipped = getattr(self, "_last_clipped", None)
        alloc = None
        reduce = (lambda t: self.world.sum(t, "per-step statistics")) if self.world.active else None
        if self.budget is not None:     # its observation measures this epoch's v: not computed twice
            if self.world.active:       # prices in seconds: the ranks' mean
                keys = sorted(seconds)
                mean = self.world.sum(torch.tensor([seconds[k] for k in keys], dtype=torch.float64), "seconds") / self.world.size
                seconds = dict(zip(keys, mean.tolist()))
            k, alloc = self.budget.step(self._gplan, rec.step, plan.record_set, rows.adv, rec.z, clipped, seconds,
                                        reduce=reduce)
        zo = rows.adv is not None and alloc is None
        per = D.step_stats(n, rec.step, plan.record_set, trunks=self._gplan.spec.groups * plan.spec.trunks,
                           adv=rows.adv if zo else None, z=rec.z if zo else None, scale=self._psi_scale, clipped=clipped,
                           reduce=reduce)
        if rows.adv is not None:
            per.update(D.zo_influence(self.task.transition, mc, self._omega_train if mc.reweight == "pcpo" else None,
                                      self._step_w))
        elif shift is not None and rows.g is not None:
            per.update(D.fo_influence(n, rec.step, self._fo_row_weight(c), shift, rows.g, c.sigma, reduce=reduce))
        out = {"per_step": per}
        if alloc is not None:
            per["v"], per["v_alloc"] = alloc["v_epoch"], alloc["v"]
            out["alloc"] = {"next_k": k, "budget": alloc["budget"], "used": alloc["used"], "units": alloc["units"]}
            if tuple(k) != tuple(self._spec.k):
                self._build_plan(replace(self._spec, k=tuple(k)))
        return out

    def _optimize(self, rows) -> dict:
        """``inner_updates`` optimizer steps on the family's rows (micro-batched with
        ``train.grad_accum``; :class:`~rsm_fast.train_step.TrainStep`). Leaves the last update's
        clip mask in ``self._last_clipped`` for the diagnostics and the allocator."""
        self.policy.train()
        fam, g = self.family, 1 if self.task.cfg_scale is None else 2

        def on_forward(n: int):     # (a fused epoch's first update reuses the rollout's forward)
            self.nfe["train"] += 0 if getattr(fam, "reused_forward", False) else n * g

        try:
            stats, self._last_clipped = self.step.run(fam.num_rows(rows), self.cfg.train.inner_updates,
                                                      lambda sl: fam.loss(rows, sl), on_forward, NonFiniteError,
                                                      self.epochs_done, fam.total_rows(rows))
        except ops.FusedOpNonFiniteError as e:
            raise NonFiniteError(f"a loss input became non-finite at epoch {self.epochs_done} ({e}); "
                                 "the weights were left unchanged") from None
        return stats

    # ------------------------------------------------------------------------------------------
    def evaluate(self, n: int | None = None) -> dict:
        """``n`` fresh samples of the current policy (its EMA weights with ``train.ema_decay``;
        full SDE, one group each, held-out seed): reward, KL to the reference along the samples'
        paths, and the task's own metrics."""
        with self._ema_applied():
            return self._evaluate(n)

    def _ema_applied(self):
        return self.step.ema.applied() if self.step.ema is not None else nullcontext()

    def sde_engine(self, model, rows: int, seed: int, chunk: int, group_offset: int = 0) -> RolloutEngine:
        """An engine of the task's full-SDE sampler over ``rows`` rows, one group each (the
        evaluation's; rsm_fast/optimum.py's reference samples)."""
        tr = self.task.transition
        spec = PlanSpec("sde", tr.num_steps, rows, 1, sde_mask=tuple(bool(v) for v in tr.sde_mask),
                        group_offset=group_offset)
        return RolloutEngine(model, tr, compile_plan(spec), seed=seed, cfg_scale=self.task.cfg_scale,
                             chunk_size=chunk, device=self.device)

    @torch.no_grad()
    def _evaluate(self, n: int | None = None) -> dict:
        n = n or self.cfg.task.eval_samples or self.task.default_eval_samples
        seed = self.cfg.train.seed + 1_000_003
        g0, ng = rank_groups(n, self.world)     # several ranks: a contiguous block of the n samples each
        # evaluation rows go through the model EVAL_CHUNK at a time unless rollout.chunk_size says
        # otherwise: 8192 digits samples in one call (x 10 steps for the reference) peaked at 14 GB
        chunk = self.cfg.rollout.chunk_size or min(n, EVAL_CHUNK)
        engine = self.sde_engine(self.handle.model, ng, seed, chunk, group_offset=g0)
        self.policy.eval()
        nfe0 = self._counters()
        with self.clock("eval"):
            gen = torch.Generator().manual_seed(seed)
            conds = self.task.conditions(n, gen)
            rec, f_ref, n_ref = self._rollout([engine], engine.plan, conds, gen, 0, ref_chunk=chunk, rows0=(g0, n))
            kl = Credit(engine.plan).path_kl(self._record_kl(rec, f_ref)[1]).sum(0)
            r = self._score(rec.x0, rec.x0_group, conds, kind="eval")
            metrics = self.builtin_reward and hasattr(self.task, "evaluate")
            x0 = rec.x0
            if self.world.active:
                r, kl, x0 = gather_eval(self.world, r, kl, x0 if metrics else None)
            out = {"reward_mean": float(r.mean()), "reward_std": float(r.std()), "kl_to_reference": float(kl.mean())}
            if metrics:
                out.update(self.task.evaluate(x0.cpu(), seed=self.cfg.train.seed))
                if "objective_target" in out:      # J = E[r] - alpha KL (path; marginal), and its share of J*'s gain
                    a, j0 = self.task.alpha, out["objective_reference"]
                    gain = out["objective_target"] - j0
                    j, jm = out["reward_mean"] - a * out["kl_to_reference"], out["reward_mean"] - a * out["kl_marginal"]
                    share = (lambda v: (v - j0) / gain if gain > 0 else math.nan)   # no gain: alpha -> inf
                    out.update(objective=j, objective_gain=share(j), objective_marginal=jm,
                               objective_gain_marginal=share(jm))
        self.nfe["eval"] += rec.nfe["total"] + n_ref
        self._sum_nfe(nfe0)
        return out

    def run(self, run_dir: RunDir | None = None, progress: bool = True, **kw) -> dict:
        """Train ``train.epochs`` epochs, evaluate, write the run directory (rsm_fast/run_loop.py:
        periodic checkpoints, resume, stops)."""
        from .run_loop import run

        return run(self, run_dir, progress=progress, **kw)

    def close(self) -> None:
        """Stop the reward worker thread (if any); the trainer can still evaluate afterwards."""
        if self.async_reward is not None:
            self.async_reward.close()
            self.async_reward = None

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
            "scored": dict(self.scored),
            "skipped_epochs": self.skipped,
            "seconds": secs,
            "seed": self.cfg.train.seed,
            "torch": torch.__version__,
            "device": str(self.device),
        }
