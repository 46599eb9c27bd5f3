"""User-facing fused ops, drop-in replacements for the reference losses.

``zo_loss`` and ``score_loss`` take the same arguments as ``rsm_fast.losses.zo_row_loss`` and
``score_regression_loss`` and return the same values (``zo_loss`` returns a ``ZOLossOut``);
``nft_loss``, ``awm_loss`` and ``awm_log_likelihood`` those of ``rsm_fast.losses.forward_process``
(the stats dicts carry every per-row entry of the reference but NFT's ``old_deviate``);
``sampler_step`` is ``GaussianTransition`` coefficients' ``step`` + ``log_prob`` in one pass.
Gradients flow to ``f_theta`` / ``s_theta`` only (and through the ``loss``, ``policy`` and ``kl``
fields); every other input is rollout data, a frozen model's output or a coefficient.

Inputs are checked before any kernel runs: latent tensors must share shape, dtype and device and
be contiguous; per-row values must be numbers or ``[B]`` tensors (metadata only, no device work).

NaN/inf in the per-row inputs. With ``check=True`` (default) a per-row tensor holding NaN or inf
raises :class:`FusedOpNonFiniteError` before any kernel runs, which reads one ``[R]`` verdict per
call back to the host (a device sync: on a GPU it waits for all queued work, e.g. the model's
forward). Where that sync matters (a training step, a CUDA graph):

* ``check=False`` skips the check for that call;
* inside ``with deferred_finite_check() as fc:`` every fused-op call with ``check=True`` records its
  verdict on the device instead (three small kernels: stack, mul, sum; no host read) and runs on;
  afterwards ``fc.ok`` is a 0-d bool device tensor (every recorded input finite) to fold into a
  flag read once per update, and ``fc.raise_if_bad()`` reads it (one sync) and raises the error
  naming the first non-finite input, as the per-call check would have;
* :func:`rows_finite` gives the verdict of given per-row values as a 0-d bool device tensor.

Numbers (``kl_coef=0.04``) are checked on the host at no cost. Inside ``torch.compile`` the tensor
check is skipped (as is a deferred record).
"""
from __future__ import annotations

import contextvars
import math
from typing import Iterable, Mapping

import torch
from torch import Tensor

from ..losses import forward_process as FP
from ..losses.reference import REDUCTIONS, REWEIGHTS, SURROGATE_FORMS, ZOLossOut, _check_choice, _check_common
from ..transitions import StepCoeffs
from . import backends
from . import decomposed_fp as DF
from . import library as L
from .nvtx import annotate


class FusedOpInputError(ValueError):
    """An input of a fused op has the wrong shape, dtype, device or layout, or is not finite."""


class FusedOpNonFiniteError(FusedOpInputError):
    """A per-row input of a fused op holds NaN or inf (the numbers went bad, not the call)."""


def _latents(**tensors: Tensor | None) -> Tensor:
    """Check the latent-sized inputs against the first one; return the first."""
    items = [(k, v) for k, v in tensors.items() if v is not None]
    name0, t0 = items[0]
    if not isinstance(t0, Tensor) or t0.dim() < 2:
        raise FusedOpInputError(f"{name0} must be a [B, ...] tensor with latent dims, got {getattr(t0, 'shape', t0)!r}")
    if t0.dtype not in _LATENT_DTYPES:
        raise FusedOpInputError(f"{name0} must be float16, bfloat16, float32 or float64, got {t0.dtype}")
    shape, dtype, device = t0.shape, t0.dtype, t0.device
    for k, v in items:
        if isinstance(v, Tensor) and v.shape == shape and v.dtype is dtype and v.device == device and v.is_contiguous():
            continue
        if not isinstance(v, Tensor):
            raise FusedOpInputError(f"{k} must be a tensor, got {type(v).__name__}")
        if v.shape != t0.shape:
            raise FusedOpInputError(f"{k} must have shape {tuple(t0.shape)} like {name0}, got {tuple(v.shape)}")
        if v.dtype != t0.dtype:
            raise FusedOpInputError(f"{k} has dtype {v.dtype} but {name0} has {t0.dtype}; cast explicitly")
        if v.device != t0.device:
            raise FusedOpInputError(f"{k} is on {v.device} but {name0} is on {t0.device}")
        raise FusedOpInputError(f"{k} must be contiguous (call .contiguous() on it)")
    return t0


_LATENT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _row(name: str, v, like: Tensor, dtype: torch.dtype | None = None, check: bool = False) -> Tensor:
    """A number, 0-d tensor or ``[B]`` tensor as a contiguous ``[B]`` tensor on ``like``'s device.
    A number becomes a cached constant row (:func:`_const_row`); with ``check`` a non-finite
    number raises :class:`FusedOpNonFiniteError` here (a host value: no device read)."""
    B = like.shape[0]
    if dtype is None:
        dtype = torch.float64 if like.dtype is torch.float64 else torch.float32
    if isinstance(v, Tensor):
        if v.device != like.device:
            raise FusedOpInputError(f"{name} is on {v.device} but the latents are on {like.device}")
        if v.dim() == 1 and v.shape[0] == B:
            return v if v.dtype is dtype and v.is_contiguous() else v.to(dtype).contiguous()
        if v.dim() == 0:
            return v.to(dtype).expand(B).contiguous()
        raise FusedOpInputError(f"{name} must be a number or have shape ({B},), got {tuple(v.shape)}")
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise FusedOpInputError(f"{name} must be a number or a [B] tensor, got {type(v).__name__}")
    if check and not math.isfinite(v):
        raise FusedOpNonFiniteError(f"{name} holds NaN or inf (per-row input of a fused op)")
    return _const_row(float(v), B, dtype, like.device)


_const_row = L.const_row        # a number's constant row (cached; see library.const_row)
_CONST_ROWS = L._CONST_ROWS


# ---------------------------------------------------------------------------------------------
# NaN/inf checks of the per-row inputs
# ---------------------------------------------------------------------------------------------
def _float_rows(rows) -> list[Tensor]:
    vals = rows.values() if isinstance(rows, Mapping) else rows
    return [v for v in vals if isinstance(v, Tensor) and v.is_floating_point()]


def _nonfinite_sums(ts: list[Tensor]) -> Tensor:
    """``[len(ts)]``: for each tensor of ``ts`` (non-empty list), ``sum(t * 0)``: 0 when every
    element is finite, NaN when one is NaN or inf (``inf * 0`` is NaN, and NaN survives the sum).
    Three kernels (stack, mul, sum) when they share shape and dtype (the per-row inputs of one
    call); ``torch.isfinite`` is a composite of four kernels before its ``all``."""
    t0 = ts[0]
    if all(t.shape == t0.shape and t.dtype is t0.dtype for t in ts):
        x = torch.stack(ts) if len(ts) > 1 else t0.unsqueeze(0)
        return x.reshape(len(ts), -1).mul(0).sum(1)
    return torch.stack([t.mul(0).sum().double() for t in ts])


def rows_finite(rows: Mapping[str, Tensor] | Iterable[Tensor | float | None]) -> Tensor:
    """0-d bool tensor: True iff every value of ``rows`` (a dict of, or an iterable of, tensors;
    numbers and None allowed) is finite. Device work only (stack, mul, sum, eq): no host read, so
    it may run inside a CUDA graph; on the first tensor's device (the CPU when there is none).
    Numbers are checked on the host and folded in. Meant for a trainer that checks the per-row
    inputs of an update itself and calls the ops with ``check=False``."""
    vals = list(rows.values()) if isinstance(rows, Mapping) else list(rows)
    nums_ok = all(math.isfinite(v) for v in vals if isinstance(v, (int, float)) and not isinstance(v, bool))
    ts = _float_rows(vals)
    if not ts:
        return torch.tensor(nums_ok)
    ok = _nonfinite_sums(ts).sum() == 0
    return ok if nums_ok else ok & False


class FiniteCheck:
    """The verdicts of the fused ops' NaN/inf checks kept on the device (see the module docstring).

    ``with deferred_finite_check() as fc:`` makes every fused-op call with ``check=True`` record an
    ``[R]`` device tensor (per per-row input: 0 when finite, NaN when not) instead of reading it
    back; after the block:

    * ``fc.ok``: 0-d bool device tensor, True iff every recorded input was finite (cat, sum, eq;
      ``None`` when nothing was recorded);
    * ``fc.first_bad()``: the name of the first non-finite input, or None (one host read);
    * ``fc.raise_if_bad()``: raises :class:`FusedOpNonFiniteError` naming it (one host read).

    The ops still run on bad inputs (their outputs are then NaN/inf); read the verdict before
    anything irreversible (the optimizer step). A ``FiniteCheck`` may be entered again (e.g.
    around each update, or nested); :meth:`reset` forgets what was recorded. The innermost entered
    check records; the context is per thread / task (a ``ContextVar``).
    """

    def __init__(self):
        self._names: list[tuple[str, ...]] = []
        self._flags: list[Tensor] = []
        self._tokens: list = []

    def record(self, rows: Mapping[str, Tensor]) -> None:
        ts = _float_rows(rows)
        if not ts:
            return
        self._names.append(tuple(k for k, v in rows.items() if isinstance(v, Tensor) and v.is_floating_point()))
        self._flags.append(_nonfinite_sums(ts))      # [R]: 0 finite, NaN not

    def _all(self) -> Tensor:
        return torch.cat(self._flags) if len(self._flags) > 1 else self._flags[0]

    @property
    def ok(self) -> Tensor | None:
        if not self._flags:
            return None
        return self._all().sum() == 0                   # 0-d bool; NaN != 0

    def first_bad(self) -> str | None:
        if not self._flags:
            return None
        sums = self._all().tolist()
        names = [n for names in self._names for n in names]
        return next((n for n, v in zip(names, sums) if v != 0), None)

    def raise_if_bad(self) -> None:
        name = self.first_bad()
        if name is not None:
            raise FusedOpNonFiniteError(f"{name} holds NaN or inf (per-row input of a fused op)")

    def reset(self) -> None:
        self._names.clear()
        self._flags.clear()

    def __enter__(self) -> "FiniteCheck":
        self._tokens.append(_DEFERRED.set(self))
        return self

    def __exit__(self, *exc) -> bool:
        _DEFERRED.reset(self._tokens.pop())
        return False


_DEFERRED: contextvars.ContextVar = contextvars.ContextVar("rsm_fast_ops_deferred_finite_check", default=None)


def deferred_finite_check() -> FiniteCheck:
    """``with deferred_finite_check() as fc:`` -- see :class:`FiniteCheck`."""
    return FiniteCheck()


def _check_finite(rows: dict[str, Tensor]) -> None:
    """The per-call NaN/inf check of a fused op's per-row tensors: raise now (one host read), or
    record the verdict on the device inside :func:`deferred_finite_check`."""
    if torch.compiler.is_compiling():
        return
    deferred = _DEFERRED.get()
    if deferred is not None:
        deferred.record(rows)
        return
    ts = _float_rows(rows)
    if not ts:
        return
    sums = _nonfinite_sums(ts).tolist()                 # the one host read
    if any(v != 0 for v in sums):
        names = [k for k, v in rows.items() if isinstance(v, Tensor) and v.is_floating_point()]
        bad = next(n for n, v in zip(names, sums) if v != 0)
        raise FusedOpNonFiniteError(f"{bad} holds NaN or inf (per-row input of a fused op)")


def _choice(name: str, v, choices) -> None:
    if v not in choices:
        raise FusedOpInputError(f"{name} must be one of {choices}, got {v!r}")


def zo_loss(f_theta: Tensor, f_old: Tensor, z: Tensor, adv: Tensor, coeffs: StepCoeffs, *, form: str = "hinge",
            reweight: str = "base", clip_eps: float = 1e-4, f_ref: Tensor | None = None, kl_coef=0.0,
            kl_dt_weight: bool = False, row_weight=None, omega_train=None, tempflow_scale: float = 2.25,
            reduce: str = "mean", check: bool = True) -> ZOLossOut:
    """Fused :func:`rsm_fast.losses.zo_row_loss` (same arguments and outputs)."""
    try:  # the reference's own option checks (same messages), raised as this module's error
        _check_common(form, reweight, clip_eps, omega_train, tempflow_scale, kl_coef)
        _check_choice("reduce", reduce, REDUCTIONS)
    except ValueError as e:
        raise FusedOpInputError(str(e)) from None
    if f_ref is None and not (isinstance(kl_coef, (int, float)) and kl_coef == 0):
        raise FusedOpInputError("f_ref is required when kl_coef is non-zero")
    ft = _latents(f_theta=f_theta, f_old=f_old, z=z, f_ref=f_ref)
    given = (("adv", adv), ("coeffs.omega", coeffs.omega), ("coeffs.sigma", coeffs.sigma), ("coeffs.dt", coeffs.dt),
             ("row_weight", 1.0 if row_weight is None else row_weight), ("kl_coef", kl_coef),
             ("omega_train", 0.0 if omega_train is None else omega_train))
    r = [_row(k, v, ft, check=check) for k, v in given]
    st = _row("coeffs.stochastic", coeffs.stochastic, ft, dtype=torch.bool)
    if check:
        _check_finite({k: t for (k, v), t in zip(given, r) if isinstance(v, Tensor)})
    args = (f_theta, f_old, z, f_ref, r[0], r[1], r[2], r[3], st, r[4], r[5], r[6], SURROGATE_FORMS.index(form),
            REWEIGHTS.index(reweight), float(clip_eps), float(tempflow_scale), bool(kl_dt_weight), reduce == "mean")
    out = L.zo_outputs(L.zo_loss(*args)) if torch.compiler.is_compiling() else L.zo_apply(*args)
    return ZOLossOut(loss=out[0], policy=out[1], kl=out[2], clipped=out[3], log_ratio=out[4], lin=out[5])


def score_loss(s_theta: Tensor, s_ref: Tensor, s_old: Tensor | None, psi_hat: Tensor, C1, gamma, C2=0.0,
               reduce: str = "mean", check: bool = True) -> Tensor:
    """Fused :func:`rsm_fast.losses.score_regression_loss` (same arguments, ``[B]`` output)."""
    _choice("reduce", reduce, REDUCTIONS)
    if s_old is None and not (isinstance(C2, (int, float)) and C2 == 0):
        raise FusedOpInputError("s_old is required when C2 is non-zero")
    s = _latents(s_theta=s_theta, s_ref=s_ref, psi_hat=psi_hat, s_old=s_old)
    given = (("C1", C1), ("gamma", gamma), ("C2", C2))
    rows = {k: _row(k, v, s, check=check) for k, v in given}
    if check:
        _check_finite({k: rows[k] for k, v in given if isinstance(v, Tensor)})
    op = L.score_loss if torch.compiler.is_compiling() else L.score_apply
    return op(s_theta, s_ref, psi_hat, s_old, rows["C1"], rows["gamma"], rows["C2"], reduce == "mean")


def sampler_step(coeffs: StepCoeffs, x: Tensor, f: Tensor, z: Tensor, reduce: str = "mean") -> tuple[Tensor, Tensor]:
    """``(x', log pi(x'|x))`` with ``x' = c_x x + c_f f + sigma z`` (noise dropped on ODE rows)."""
    _choice("reduce", reduce, REDUCTIONS)
    xx = _latents(x=x, f=f, z=z)
    args = (x, f, z, _row("coeffs.c_x", coeffs.c_x, xx), _row("coeffs.c_f", coeffs.c_f, xx),
            _row("coeffs.sigma", coeffs.sigma, xx), _row("coeffs.stochastic", coeffs.stochastic, xx, torch.bool),
            reduce == "mean")
    if torch.compiler.is_compiling():
        return L.sampler_step(*args)
    # eager: call the device's kernel directly (no autograd here, and torch.library's Python
    # dispatch would cost ~80 us per call, more than the kernel at rollout sizes)
    with annotate("sampler_step", x.device):
        return backends.for_device(x.device).step_fwd(*args)


# ---------------------------------------------------------------------------------------------
# Forward-process losses (DiffusionNFT, AWM): one op, ``rsm_fast::fp_loss``
# ---------------------------------------------------------------------------------------------
def _fp_checks(checks) -> None:
    """Run the reference's option checks ``(name, value, kind)`` (same messages) as this module's
    error; ``kind`` is a tuple of choices, ``"positive"`` or ``"nonneg"``."""
    try:
        for name, value, kind in checks:
            if isinstance(kind, tuple):
                FP._check_choice(name, value, kind)
            else:
                FP._check_number(name, value, **{kind: True})
    except ValueError as e:
        raise FusedOpInputError(str(e)) from None


def _fp_rows(name: str, x, like: Tensor) -> Tensor:
    if not isinstance(x, Tensor) or tuple(x.shape) != (like.shape[0],):
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise FusedOpInputError(f"{name} must have shape ({like.shape[0]},), got {got}")
    return _row(name, x, like)


def _fp_call(v, v_old, xa, x0, v_ref, v_ema, t, w, logp_old, kl_coef, ema_coef, kind, beta=1.0, scale=1.0,
             weighting=0, power=1.0, clip=1.0):
    args = (v, v_old, xa, x0, v_ref, v_ema, t, w, logp_old, kl_coef, ema_coef, kind, float(beta), float(scale),
            int(weighting), float(power), float(clip), True)
    return L.fp_outputs(L.fp_loss(*args)) if torch.compiler.is_compiling() else L.fp_apply(*args)


def nft_loss(v_theta: Tensor, v_old: Tensor, v_ref: Tensor | None, x_t: Tensor, x0: Tensor, t: Tensor, adv: Tensor,
             *, beta: float, adv_clip_max: float = 5.0, kl_beta: float = 1e-4, adv_mode: str = "all",
             check: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
    """Fused :func:`rsm_fast.losses.forward_process.nft_loss` (same arguments, loss and stats)."""
    _fp_checks([("beta", beta, "positive"), ("adv_clip_max", adv_clip_max, "positive"),
                ("kl_beta", kl_beta, "nonneg"), ("adv_mode", adv_mode, FP.NFT_ADV_MODES)])
    if v_ref is None and kl_beta != 0:
        raise FusedOpInputError("v_ref is required when kl_beta is non-zero")
    v = _latents(v_theta=v_theta, v_old=v_old, x_t=x_t, x0=x0, v_ref=v_ref)
    tt, a = _fp_rows("t", t, v), _fp_rows("adv", adv, v)
    if check:
        _check_finite({"t": tt, "adv": a})
    r = FP.nft_mix_weight(a, adv_clip_max, adv_mode)
    B, cd, dev = tt.shape[0], tt.dtype, tt.device
    out = _fp_call(v_theta, v_old.detach(), x_t, x0, v_ref, None, tt, r, None, _const_row(float(kl_beta), B, cd, dev),
                   _const_row(0.0, B, cd, dev), 0, beta=beta, scale=adv_clip_max)
    loss_rows, policy, kl, _ema, aux = out[:5]
    stats = {"r": r, "policy": policy, "loss_pos": aux[:, 2], "loss_neg": aux[:, 3], "w_pos": aux[:, 0],
             "w_neg": aux[:, 1], "kl": kl}
    return loss_rows.mean(), {k: x.detach() for k, x in stats.items()}


def awm_loss(v_theta: Tensor, eps: Tensor, x0: Tensor, t: Tensor, adv: Tensor, *, logp_old: Tensor | None = None,
             v_ref: Tensor | None = None, v_ema: Tensor | None = None, weighting: str = "ghuber", p: float = 0.25,
             clip_range: float = 1.0, adv_clip_max: float = 5.0, advantage_max: float | None = 1.0,
             kl_beta: float = 1e-3, ema_beta: float = 1.0, kl_weight: str = "uniform",
             kl_ema_weight: str = "uniform", check: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
    """Fused :func:`rsm_fast.losses.forward_process.awm_loss` (same arguments, loss and stats; the
    likelihood in the compute dtype, see ``decomposed_fp``: pass a ``logp_old`` from
    :func:`awm_log_likelihood` of this module, not the float64 reference's)."""
    checks = [("weighting", weighting, FP.AWM_WEIGHTINGS), ("kl_weight", kl_weight, FP.AWM_KL_WEIGHTS),
              ("kl_ema_weight", kl_ema_weight, FP.AWM_KL_WEIGHTS), ("p", p, "positive"),
              ("clip_range", clip_range, "positive"), ("adv_clip_max", adv_clip_max, "positive"),
              ("kl_beta", kl_beta, "nonneg"), ("ema_beta", ema_beta, "nonneg")]
    if advantage_max is not None:
        checks.append(("advantage_max", advantage_max, "positive"))
    _fp_checks(checks)
    for name, x, coef in (("v_ref", v_ref, kl_beta), ("v_ema", v_ema, ema_beta)):
        if x is None and coef != 0:
            raise FusedOpInputError(f"{name} is required when its coefficient is non-zero")
    v = _latents(v_theta=v_theta, eps=eps, x0=x0, v_ref=v_ref, v_ema=v_ema)
    tt, a = _fp_rows("t", t, v), _fp_rows("adv", adv, v)
    lo = None if logp_old is None else _fp_rows("logp_old", logp_old.detach(), v)
    if check:
        _check_finite({"t": tt, "adv": a} if lo is None else {"t": tt, "adv": a, "logp_old": lo})
    a = torch.clamp(a, -adv_clip_max, adv_clip_max)
    if advantage_max is not None:
        a = a / adv_clip_max * advantage_max
    # 'uniform' KL weights are 1: constant coefficient rows and unscaled stats (x * 1 == x exactly)
    k_ref = None if kl_weight == "uniform" else FP._awm_kl_scale(tt, kl_weight)
    k_ema = None if kl_ema_weight == "uniform" else FP._awm_kl_scale(tt, kl_ema_weight)
    B, cd, dev = tt.shape[0], tt.dtype, tt.device
    out = _fp_call(v_theta, None, eps, x0, v_ref, v_ema, tt, a, lo,
                   _const_row(float(kl_beta), B, cd, dev) if k_ref is None else kl_beta * k_ref,
                   _const_row(float(ema_beta), B, cd, dev) if k_ema is None else ema_beta * k_ema, 1,
                   weighting=DF.WEIGHTINGS.index(weighting), power=p, clip=clip_range)
    loss_rows, policy, kl, ema, aux, clipped = out[:6]
    ratio = aux[:, 1]
    stats = {"logp": aux[:, 0], "ratio": ratio, "adv": a, "policy": policy, "clipped": clipped,
             "kl": kl if k_ref is None else kl * k_ref, "ema_kl": ema if k_ema is None else ema * k_ema,
             "clipfrac": torch.abs(ratio - 1.0) > clip_range}
    return loss_rows.mean(), {k: x.detach() for k, x in stats.items()}


@torch.no_grad()
def awm_log_likelihood(v: Tensor, eps: Tensor, x0: Tensor, t: Tensor, *, weighting: str = "ghuber",
                       p: float = 0.25, check: bool = True) -> Tensor:
    """AWM's per-row surrogate log-likelihood ``[B]`` from the fused op's forward (the compute
    dtype; the ``logp_old`` that :func:`awm_loss` compares against)."""
    _fp_checks([("weighting", weighting, FP.AWM_WEIGHTINGS), ("p", p, "positive")])
    vv = _latents(v=v, eps=eps, x0=x0)
    tt = _fp_rows("t", t, vv)
    if check:
        _check_finite({"t": tt})
    zero = _const_row(0.0, tt.shape[0], tt.dtype, tt.device)
    out = _fp_call(v, None, eps, x0, None, None, tt, zero, None, zero, zero, 1,
                   weighting=DF.WEIGHTINGS.index(weighting), power=p)
    return out[4][:, 0].clone()
