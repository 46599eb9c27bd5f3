"""Per-timestep diagnostics, logged every epoch (issue 6 item 2; spec §3.4, §4.6, §7.3).

Per sampling step i (lists of ``num_steps`` entries, ``None`` where the step has no records):

* ``K`` — records (branches) trained at step i this epoch, per trunk for branching plans;
* ``clip`` — fraction of step i's records whose surrogate sat in its clipped region at the last
  inner update (the trust region's activity; the allocator deactivates mostly-clipped steps);
* ``v`` — the per-branch variance of the zeroth-order guidance ``psi = (sigma_i/b_i) A z`` (score
  units, per latent dim) from the spread of siblings around their parent's mean (spec §7.3); with
  std-normalised advantages ``v ~ Sigma_i/b_i^2`` (spec §4.6). For K = 1 plans the "siblings"
  are the group members at that step;
* ``h_g`` / ``h_rz`` — the Normalized Influence Metric h(t) of spec §3.4 in its two
  normalisations: the guidance force on the native output per unit of the value-gradient estimate
  ``g`` (``h_g = 2 C1 gamma lambda Sigma/(alpha b)``, i.e. ``gamma lambda b`` for the policy-gradient
  family) and per unit of ``r z`` (``h_rz = h_g / sigma_i = gamma omega``). Both are reported raw;
  the plots also draw them divided by their maximum over steps (normalisation (a) of §3.4).
  [UNCERTAIN] (spec §13) which normalisation the paper's figure uses: we log both.

For the zeroth-order family the force follows from the loss's reweighting in closed form: on
policy and unclipped, ``d loss / d f = -(1/d) W o s c_lin omega A z`` (losses/reference.py:
row weight W, outer o, inner s, linear coefficient c_lin), so ``h_rz = |W o s c_lin| omega``.
For the first-order estimators it is measured from the rows: the loss ``w |f - f_ref - shift|^2``
pulls ``f`` with ``2 w shift``, so ``h_g = 2 w |shift| / |g|`` averaged over the step's records.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .allocator import sibling_variance
from .losses.reference import _reweight_scales

TEMPFLOW_SCALE = 2.25    # the loss ops' default (TempFlow-GRPO's 2.25 * std_dev_t, spec §5.3)


def _lists(x: Tensor, present: Tensor) -> list:
    return [float(a) if p else None for a, p in zip(x.tolist(), present.tolist())]


def zo_influence(transition, method, omega_train: Tensor | None, step_weight: Tensor | None) -> dict[str, list]:
    """``h_g`` and ``h_rz`` per step for a zeroth-order loss (float64, from the schedule alone)."""
    n = transition.num_steps
    idx = torch.arange(n)
    c = transition.coeffs(idx, torch.ones(n, dtype=torch.bool), dtype=torch.float64)
    s, o, c_lin, _ = _reweight_scales(c, method.reweight, method.surrogate,
                                      None if omega_train is None else omega_train.to("cpu", torch.float64),
                                      TEMPFLOW_SCALE, n, torch.float64)
    W = torch.ones(n, dtype=torch.float64) if step_weight is None else step_weight.to("cpu", torch.float64)
    on = c.stochastic & (c.sigma > 0)
    h_rz = (W * o * s * c_lin).abs() * c.omega.abs()
    h_g = h_rz * c.sigma
    return {"h_g": _lists(h_g, on), "h_rz": _lists(h_rz, on)}


def fo_influence(num_steps: int, steps: Tensor, weight: Tensor, shift: Tensor, g: Tensor, sigma: Tensor,
                 reduce=None) -> dict:
    """``h_g`` / ``h_rz`` per step measured from first-order rows: ``weight [M]`` the loss weight
    per row, ``shift [M, ...]`` the native target shift, ``g [M, ...]`` the reward gradient it came
    from, ``sigma [M]`` the rows' noise scale."""
    M = steps.numel()
    sn = shift.detach().reshape(M, -1).to(torch.float64).norm(dim=1)
    gn = g.detach().reshape(M, -1).to(torch.float64).norm(dim=1)
    ok = gn > 0
    h = torch.where(ok, 2.0 * weight.detach().to(torch.float64).abs() * sn / gn.clamp(min=1e-300), torch.zeros_like(sn))
    st = steps.cpu()
    cnt = torch.bincount(st[ok.cpu()], minlength=num_steps).to(torch.float64)
    sums = torch.stack([cnt, torch.bincount(st, weights=h.cpu(), minlength=num_steps),
                        torch.bincount(st, weights=sigma.detach().to("cpu", torch.float64), minlength=num_steps),
                        torch.bincount(st, minlength=num_steps).to(torch.float64)])
    if reduce is not None:          # every rank's per-step sums
        sums = reduce(sums)
    cnt, h_sum, sig_sum, rows = sums.unbind(0)
    h_g = h_sum / cnt.clamp(min=1)
    sig = sig_sum / rows.clamp(min=1)
    h_rz = torch.where(sig > 0, h_g / sig.clamp(min=1e-300), torch.zeros_like(h_g))
    return {"h_g": _lists(h_g, cnt > 0), "h_rz": _lists(h_rz, (cnt > 0) & (sig > 0))}


@torch.no_grad()
def step_stats(num_steps: int, steps: Tensor, parents: Tensor, *, trunks: int, adv: Tensor | None = None,
               z: Tensor | None = None, scale: list[float] | None = None, clipped: Tensor | None = None,
               reduce=None) -> dict:
    """``K`` (records per trunk), ``clip`` and ``v`` per step for one epoch's records; ``reduce``
    sums the per-step sums over ranks (``trunks`` is then the run's)."""
    st = steps.reshape(-1).long()
    n_rec = torch.bincount(st.cpu(), minlength=num_steps).to(torch.float64)
    cl = (torch.zeros_like(n_rec) if clipped is None else
          torch.bincount(st.cpu(), weights=clipped.reshape(-1).cpu().to(torch.float64), minlength=num_steps))
    var, npar = torch.zeros_like(n_rec), torch.zeros_like(n_rec)
    with_v = adv is not None and z is not None and scale is not None
    if with_v:
        coef = adv.reshape(-1).to(torch.float64) * torch.tensor(scale, dtype=torch.float64, device=st.device).index_select(0, st)
        var, _, npar = sibling_variance(st, parents.reshape(-1).long().to(st.device), z, coef, num_steps)
        var, npar = var.cpu(), npar.cpu()
    if reduce is not None:
        n_rec, cl, var, npar = reduce(torch.stack([n_rec, cl, var, npar])).unbind(0)
    present = n_rec > 0
    out = {"K": _lists(n_rec / max(trunks, 1), present)}
    if clipped is not None:
        out["clip"] = _lists(cl / n_rec.clamp(min=1), present)
    if with_v:
        out["v"] = _lists(var / npar.clamp(min=1), npar > 0)
    return out
