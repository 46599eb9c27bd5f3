"""The first-order estimators' side of the trainer (spec §4.1, §4.2, §6 Table 1, §9): the reward
gradients per record (terminal, current state, lookahead at the sampled next state), the temporal
weight gamma, the loss weight C1, the trust region C2, and the native-space target shift they
make. A mixin of :class:`~rsm_fast.trainer.Trainer`, kept apart so the trainer stays readable;
it reads the trainer's config, task, policy handle, reward and NFE counters."""
from __future__ import annotations

from types import SimpleNamespace
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from . import rewards as R
from .estimators import _slice_coeffs, detached_tweedie, tweedie_reward_grad
from .transitions import rowwise

if TYPE_CHECKING:
    from .engine.rollout import Records
    from .trainer import Rows


class FirstOrderMixin:
    def _fo_guidance(self, rows: Rows, c) -> Tensor:
        """Target shift in native space for the first-order estimators.

        A score-space guidance ``gamma Psi`` moves the transition mean by ``b gamma Psi``; in native
        space (``mean = c_x x + c_f f``) that is a shift of ``b gamma Psi / c_f``. Where ``c_f = b
        lambda`` this is the textbook ``gamma Psi / lambda``; unlike it, it stays finite at the flow
        models' t = 1, where lambda = 0 but the sampler's ``c_f`` is not (spec §2.3).

        ``rows.g`` is the estimator's reward gradient per row (spec §3.4, Eq. 20): the terminal
        ``grad_{x0} r`` (mean over descendants) and the lookahead ``grad_{x'} r(x0_hat(x'))`` use the
        lookahead scale ``Psi = K (Sigma/b) g``; the current-state ``grad_x r(x0_hat(x))`` is
        ``Psi = K g`` (Eq. 13). ``gamma(t_i)``: :meth:`_fo_gamma`."""
        mc = self.cfg.method
        if rows.g is None:   # a caller that skipped the reward phase: the per-record estimators only
            rows.g = self._fo_record_grads(rows.x, rows.idx, rows.f_old, rows.z, self._groups, c)
        K, g = mc.fo_reward_scale, rows.g
        if mc.estimator == "fo_current":
            b_psi = K * rowwise(c.b, g) * g                  # b Psi, Psi = K g
        else:
            b_psi = K * rowwise(c.Sigma, g) * g              # b Psi, Psi = K (Sigma/b) g
        return rowwise(self._fo_gamma(rows.idx, c) / c.c_f, b_psi) * b_psi

    def _fo_gamma(self, idx: Tensor, c) -> Tensor:
        """Table 1's temporal weight gamma(t_i) per row (spec §6) from ``method.fo_gamma``:
        ``alpha_bar``/``sqrt_alpha_bar`` are alpha_t^2 / alpha_t of the row's state (RF: (1-t)^2 /
        1-t: VGG-Flow's eta 'quad' / the redesign's linear eta), ``*_next`` those of the next state
        t' (Residual ∇-DB's rho = alpha_bar_{t'}, 'squared', or its sqrt), ``discount`` SQDF's
        ``gamma_disc ** (steps remaining after the transition)`` (its ``timestep_gamma = N - i - 1``:
        1 on the last step). ``method.fo_gamma_native`` multiplies by |lambda(t)|: the guidance is
        then ``eta`` per unit of native output (VGG-Flow: gamma = eta (1-t)/t)."""
        mc = self.cfg.method
        kind = mc.fo_gamma
        if kind == "discount":
            left = (self.task.transition.num_steps - 1 - idx).to(c.alpha.dtype)
            gamma = torch.full_like(c.alpha, mc.fo_discount) ** left
        elif kind in ("alpha_bar_next", "sqrt_alpha_bar_next"):
            # alpha_{t'} = a_i alpha_t (spec §2.1: a_i = alpha_{t'}/alpha_t); at RF's t = 1 (alpha_t = 0) it is 1 - t'
            a_next = torch.where(c.alpha > 0, c.a * c.alpha, 1 - c.t_next)
            gamma = a_next**2 if kind == "alpha_bar_next" else a_next
        else:
            gamma = {"one": torch.ones_like(c.alpha), "alpha_bar": c.alpha**2, "sqrt_alpha_bar": c.alpha}[kind]
        return gamma * c.lam.abs() if mc.fo_gamma_native else gamma

    def _fo_c1(self, c) -> Tensor:
        """Table 1's C1 per row in native space (before step weights): the score-space C1 times
        lambda^2, since ``s - s' = lambda (f - f')``. ``kl``: 0.5 omega^2 (score b^2/(2 Sigma), PG /
        SQDF with alpha = fo_c1_scale); ``native``: 0.5 (score 1/(2 lambda^2); x2 = VGG-Flow's
        ``(t/(1-t))^2``); ``precision``: omega^2/Sigma (score b^2/Sigma^2: Residual ∇-DB's
        ``|(mu_theta - mu_target)/Sigma|^2`` with kappa = 1). Times ``method.fo_c1_scale``."""
        mc = self.cfg.method
        if mc.fo_weight == "kl":
            w = 0.5 * c.omega**2
        elif mc.fo_weight == "precision":
            S = c.Sigma
            w = torch.where(S > 0, c.omega**2 / torch.where(S > 0, S, torch.ones_like(S)), torch.zeros_like(S))
        else:
            w = 0.5 * torch.ones_like(c.omega)
        return mc.fo_c1_scale * w

    def _fo_c2(self, c, c1: Tensor):
        """Table 1's relative C2 per row: ``method.trust_c2`` plus, with ``method.trust_eps`` = c_reg,
        Residual ∇-DB's eps-space MSE to the rollout policy ``c_reg |eps_theta - eps_old|^2`` (spec
        §9.1). Since ``eps = -sigma_t s`` that is ``c_reg sigma_t^2 |s - s_old|^2 = c_reg sigma_t^2
        lambda^2 |f - f_old|^2`` (c_reg |df|^2 for epsilon models, c_reg (1-t)^2 |dv|^2 for RF), i.e.
        relative to the score-space C1 ``C2 = c_reg sigma_t^2 / C1 = c_reg (1 - alpha_bar_t)
        Sigma^2/b^2`` (Table 1, kappa = 1). Rows with C1 = 0 carry no loss at all."""
        mc = self.cfg.method
        if mc.trust_eps == 0:
            return mc.trust_c2
        absolute = mc.trust_eps * c.sigma_t**2 * c.lam**2
        on = c1 > 0
        return mc.trust_c2 + torch.where(on, absolute / torch.where(on, c1, torch.ones_like(c1)), torch.zeros_like(c1))

    def _fo_grads(self, rec: Records, c) -> Tensor:
        """The reward phase's first-order signal: ``grad_{x0} r`` per final sample (fo_terminal,
        one decode + reward backward per ``method.fo_grad_chunk`` samples: 0 = rollout.chunk_size,
        0 there = all), the path gradient of :meth:`_fo_path_grads` (fo_lookahead, fo_value=path)
        or the per-record gradient of :meth:`_fo_record_grads` (fo_current, fo_lookahead)."""
        mc = self.cfg.method
        if mc.estimator == "fo_terminal":
            return self._reward_grad(rec.x0, rec.x0_group, chunk=mc.fo_grad_chunk or self.cfg.rollout.chunk_size)
        if mc.estimator == "fo_lookahead" and mc.fo_value == "path":
            return self._fo_path_grads(rec)
        if mc.estimator == "fo_lookahead" and mc.fo_value == "exact":
            # the ceiling: g with K (Sigma/b) g = Psi*(x) exactly (closed form, float64)
            psi = self.task.psi_star(rec.x.double(), c.alpha.double() ** 2)
            return (rowwise(c.b.double() / (mc.fo_reward_scale * c.Sigma.double()), psi) * psi).to(rec.x.dtype)
        return self._fo_record_grads(rec.x, rec.step, rec.f_old, rec.z, rec.group, c)

    def _fo_path_grads(self, rec: Records) -> Tensor:
        """Per record at step i: ``g_i = grad_{x_{i+1}} R_i`` along the record's own sampled path,
        ``R_i = r(x_N) - alpha sum_{j>i} KL_j(x_j)`` (soft returns; hard: ``r(x_N)``), with the
        path's noise held fixed, so ``x_{j+1} = mean_theta(x_j) + sigma_j z_j`` is differentiated
        through the rollout policy (reparameterisation). Its expectation given ``x_{i+1}`` is the
        gradient of the current policy's (soft) value there, so with the lookahead scale
        ``Psi = (Sigma/(alpha b)) g`` the estimator is consistent for ``Psi*`` at the fixed point,
        like soft zeroth order, without its score-function noise.

        One backward sweep (the adjoint of the sampled path): ``a_N = grad r(x_N)``;
        ``a_j = (d mean_j/d x_j)^T a_{j+1} - alpha grad_{x_j} KL_j`` with the policy and the
        reference evaluated with grad at the recorded ``x_j`` (chunks of ``method.fo_grad_chunk``
        rows, counted as reference NFE: 2 per row and step); ``g_i = a_{i+1}``. Needs every step
        recorded on every path (checked by the config).

        ``method.fo_path_rule`` reads the sweep at another point of the step. ``current``:
        ``Psi_i = K a_i``, the gradient of the return from the record's own state ``x_i`` (its own
        KL included), with the current-state scale; ``trapezoid``: the mean of that and the
        lookahead ``K (Sigma/b) a_{i+1}``. Both are returned in lookahead units
        (``g = (b/Sigma) a_i`` for the current-state part) so :meth:`_fo_guidance` is unchanged,
        and both take the sweep one step further, to ``x_0`` (2 more evaluations per path). On the
        2-D task the lookahead lands short of p* (it is the gradient of J over the sampler's
        Gaussian steps, whose optimum is not p*), the current-state rule past it, and the
        trapezoid's seeds on both sides of it (bench/results/default_run_toy2d_2026-12-06.md)."""
        mc, tr = self.cfg.method, self.task.transition
        anc = rec.leaf_ancestor                                   # [N, R_N] record per step and sample
        N, R = anc.shape
        have = (anc >= 0).all(1).tolist()
        L = max((j for j in range(N) if have[j]), default=-1)     # the last recorded (noisy) step
        if L < 0 or not all(have[:L + 1]) or bool((anc[L + 1:] >= 0).any()):
            raise RuntimeError("method.fo_value=path needs a record at every noisy step of every path (plan bug)")
        chunk = mc.fo_grad_chunk or self.cfg.rollout.chunk_size or R
        g = torch.empty_like(rec.x)
        a = self._fo_path_tail(rec, L, chunk)                     # a_{L+1}
        g.index_copy_(0, anc[L], a.to(g.dtype))
        if rec.graph is not None:      # train.fused_epoch: differentiate the rollout's own forwards
            from .fused_path import sweep_step as step_vjp
        else:
            step_vjp = type(self)._fo_sweep_step
        w_cur = {"next": 0.0, "current": 1.0, "trapezoid": 0.5}[mc.fo_path_rule]
        cache = self.__dict__.setdefault("_sweep_coeffs", {})    # every record of step j: one set of coefficients
        for j in range(L, -1 if w_cur else 0, -1):
            ids = anc[j]
            key = (j, ids.shape[0])
            if key not in cache:
                cache[key] = tr.coeffs(rec.step.index_select(0, ids), torch.ones_like(ids, dtype=torch.bool))
            c = cache[key]
            a = step_vjp(self, rec, j, ids, c, a, chunk)
            if w_cur:     # the current-state gradient a_j, in lookahead units, mixed into record j's g
                cur = rowwise(c.b / c.Sigma, a) * a
                g.index_copy_(0, ids, (1 - w_cur) * g.index_select(0, ids) + w_cur * cur.to(g.dtype))
            if j > 0:
                g.index_copy_(0, anc[j - 1], a)
        if not torch.isfinite(g).all():
            raise R.RewardError(f"reward '{self.reward_name}' returned a non-finite path gradient")
        return g

    def _fo_path_tail(self, rec: Records, L: int, chunk: int) -> Tensor:
        """``a_{L+1}`` per final sample: the final steps after the last recorded step ``L`` are
        deterministic (DDIM's last step to t = 0), so the gradient of ``r(x_N)`` reaches ``x_{L+1}``
        through them alone (counted as reference NFE)."""
        tr = self.task.transition
        anc = rec.leaf_ancestor
        N, R = anc.shape
        last = anc[L]
        cL = tr.coeffs(rec.step.index_select(0, last), torch.ones_like(last, dtype=torch.bool))
        x_next = cL.step(rec.x.index_select(0, last), rec.f_old.index_select(0, last), rec.z.index_select(0, last))
        a = torch.empty_like(x_next)
        for s in range(0, R, chunk):
            sl = slice(s, min(s + chunk, R))
            with torch.enable_grad():
                x = x_next[sl].detach().requires_grad_(True)
                y = x
                for j in range(L + 1, N):
                    cj = tr.coeffs_at(j, y.shape[0], device=y.device, dtype=cL.alpha.dtype, stochastic=False)
                    y = cj.step(y, self._policy_out(y, self._t_table[j].expand(y.shape[0]), rec.x0_group[sl]),
                                torch.zeros_like(y))
                gr = self._reward_grad(y.detach(), rec.x0_group[sl]).to(y.dtype)
                (a[sl],) = torch.autograd.grad(y, x, grad_outputs=gr) if N > L + 1 else (gr,)
        self.nfe["reference"] += (N - 1 - L) * R * (2 if self.task.cfg_scale is not None else 1)
        return a

    def _fo_sweep_step(self, rec: Records, j: int, ids: Tensor, c, a: Tensor, chunk: int) -> Tensor:
        """One step of the adjoint sweep: ``a_j = (d mean_j/d x_j)^T a_{j+1} - alpha grad_{x_j} KL_j``
        at the records ``ids`` of step ``j``, the policy and the reference evaluated again with grad
        (2 reference NFE per row; 1 with hard returns)."""
        soft, alpha = self.cfg.method.returns == "soft", float(self.kl_alpha)
        R = ids.shape[0]
        nxt = torch.empty_like(a)
        for s in range(0, R, chunk):
            sl = slice(s, min(s + chunk, R))
            rid = ids[sl]
            cs = _slice_coeffs(c, sl)
            with torch.enable_grad():
                x = rec.x.index_select(0, rid).detach().requires_grad_(True)
                t = self._t_table.index_select(0, rec.step.index_select(0, rid))
                grp = rec.group.index_select(0, rid)
                f = self._policy_out(x, t, grp)
                obj = (cs.mean(x, f) * a[sl].to(f.dtype)).sum()
                if soft:
                    f_ref = self._policy_out(x, t, grp, model=self.handle.reference)
                    obj = obj - alpha * cs.kl(f, f_ref, reduce="sum").sum()
                (gx,) = torch.autograd.grad(obj, x)
            nxt[sl] = gx.to(a.dtype)
        self.nfe["reference"] += (2 if soft else 1) * R * (2 if self.task.cfg_scale is not None else 1)
        return nxt

    def _fo_record_grads(self, x: Tensor, step: Tensor, f_old: Tensor, z: Tensor, group: Tensor, c) -> Tensor:
        """Per-record ``g`` ``[M, ...]`` of the current-state and lookahead estimators (spec §4.1,
        §4.2), one decode + reward backward per chunk of ``method.fo_grad_chunk`` records.

        * ``fo_current`` (VGG-Flow): ``g = grad_{x_t} r(x0_hat(x_t))``, x0_hat from the rollout
          output ``f_old``; ``fo_jacobian=auto``: identity (``x_t - t v.detach()``, spec §4.1).
        * ``fo_lookahead`` (SQDF, Residual ∇-DB): ``g = grad_{x'} r(x0_hat(x'))`` at the record's own
          sampled next state ``x' = mu_old + sigma z`` with x0_hat at step i + 1 from
          ``method.fo_lookahead_model``'s output there, evaluated once (no grad; counted as
          reference NFE) and held fixed inside Tweedie; on the last step x' is the final sample
          (x0_hat = x'). ``fo_jacobian=auto``: ``tweedie``, d x0_hat/dx' = 1/alpha_{t'} (eps) or I
          (v). [UNCERTAIN] the peers backpropagate through the network as well (see
          ``estimators.fo_lookahead_next``)."""
        mc, tr = self.cfg.method, self.task.transition
        jac = mc.fo_jacobian
        if jac == "auto":
            jac = "identity" if mc.estimator == "fo_current" else "tweedie"
        chunk = mc.fo_grad_chunk or self.cfg.rollout.chunk_size or None
        if mc.estimator == "fo_current":
            points, x0_fn = x, detached_tweedie(f_old, c)
        else:
            points = c.step(x, f_old, z).to(x.dtype)       # the rollout's sampled next state
            final = step + 1 >= tr.num_steps
            nxt = torch.where(final, step, step + 1)
            cn = tr.coeffs(nxt, torch.ones_like(nxt, dtype=torch.bool), dtype=c.alpha.dtype)
            f_next = torch.zeros_like(points)
            keep = torch.nonzero(~final).flatten()
            if keep.numel():
                model = self.handle.model if mc.fo_lookahead_model == "policy" else self.handle.reference
                cond = None if self.conds.cond is None else self.conds.cond.to(self.device)
                uncond = None if self.conds.uncond is None else self.conds.uncond.to(self.device)
                # evaluate_records reads only x, step and group of its records
                sub = SimpleNamespace(x=points.index_select(0, keep), step=nxt.index_select(0, keep),
                                      group=group.index_select(0, keep))
                out, n = self.engine.evaluate_records(model, sub, cond, uncond,
                                                      chunk_size=self.cfg.rollout.chunk_size or max(1, keep.numel()))
                f_next = f_next.index_copy(0, keep, out.to(f_next.dtype))
                self.nfe["reference"] += n
            x0_fn = detached_tweedie(f_next, cn, final)
        g = tweedie_reward_grad(points, x0_fn, lambda y, sl: self._score(y, group[sl]), jacobian=jac, chunk=chunk)
        if not torch.isfinite(g).all():
            raise R.RewardError(f"reward '{self.reward_name}' returned a non-finite gradient")
        return g.to(x.dtype)

    def _fo_row_weight(self, c) -> Tensor:
        """The first-order loss weight per row (C1 in native space), for the influence metric."""
        w = self._fo_c1(c)
        return w if self._row_weight is None else w * self._row_weight

