"""The fused ops registered with ``torch.library``: one custom op per loss, with autograd.

``rsm_fast::zo_loss`` / ``rsm_fast::zo_loss_backward``, ``rsm_fast::score_loss`` /
``rsm_fast::score_loss_backward``, ``rsm_fast::fp_loss`` / ``rsm_fast::fp_loss_backward`` (the
forward-process losses, math in ``decomposed_fp``) and ``rsm_fast::sampler_step``. Each has a CPU kernel (C++ or
the plain-torch fallback), a CUDA kernel (Triton) and a fake (meta) implementation for tracing, so
``torch.compile(fullgraph=True)`` sees each as one opaque node. The backward formulas call the
``*_backward`` ops, so compiled backward graphs stay free of Python too.

These are the raw ops (positional per-row tensors, integer mode codes); ``rsm_fast.ops.api``
holds the user-facing functions with the reference losses' signatures and the input checks.

Eager fast path. ``torch.library``'s Python autograd wrapper costs ~0.3 ms per call on this CPU
(argument normalisation on every call), 40x the C++ kernel at small sizes and far more than a GPU
kernel. Outside ``torch.compile`` the API therefore runs :class:`ZOLossFn` / :class:`ScoreLossFn`,
plain ``autograd.Function`` s that call the same backend functions and the same formulas; under
``torch.compile`` it calls the registered ops, which trace as single nodes. Tests check both.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import backends
from .nvtx import annotate

ZOOut = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]


def _cd(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _contig(g: Tensor | None, like: Tensor) -> Tensor:
    """An upstream per-row gradient as the contiguous ``[B]`` tensor the kernels read (autograd
    hands back expanded stride-0 grads, e.g. from ``.sum()``; an unused output's grad is None)."""
    return g.to(like.dtype).contiguous() if g is not None else torch.zeros_like(like)


# ---------------------------------------------------------------------------------------------
# ZO row loss
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("rsm_fast::zo_loss", mutates_args=())
def zo_loss(f_theta: Tensor, f_old: Tensor, z: Tensor, f_ref: Optional[Tensor], adv: Tensor, omega: Tensor,
            sigma: Tensor, dt: Tensor, stochastic: Tensor, row_weight: Tensor, kl_coef: Tensor,
            omega_train: Tensor, form: int, reweight: int, clip_eps: float, tempflow_scale: float,
            kl_dt_weight: bool, mean: bool) -> ZOOut:
    """-> (loss, policy, kl, clipped, log_ratio, lin, d_lin, d_quad, d_kl); see ``decomposed``."""
    be = backends.for_device(f_theta.device)
    with annotate("zo_loss", f_theta.device):
        return tuple(be.zo_fwd(f_theta, f_old, z, f_ref, adv, omega, sigma, dt, stochastic, row_weight, kl_coef,
                               omega_train, form, reweight, clip_eps, tempflow_scale, kl_dt_weight, mean))


@zo_loss.register_fake
def _(f_theta, f_old, z, f_ref, adv, *rest):
    B, cd = f_theta.shape[0], _cd(f_theta)
    new = lambda dtype=cd: f_theta.new_empty((B,), dtype=dtype)  # noqa: E731
    return new(), new(), new(), new(torch.bool), new(), new(), new(), new(), new()


@torch.library.custom_op("rsm_fast::zo_loss_backward", mutates_args=())
def zo_loss_backward(g_loss: Tensor, g_policy: Tensor, g_kl: Tensor, f_theta: Tensor, f_old: Tensor, z: Tensor,
                     f_ref: Optional[Tensor], omega: Tensor, d_lin: Tensor, d_quad: Tensor, d_kl: Tensor,
                     mean: bool) -> Tensor:
    be = backends.for_device(f_theta.device)
    with annotate("zo_loss_backward", f_theta.device):
        return be.zo_bwd(g_loss, g_policy, g_kl, f_theta, f_old, z, f_ref, omega, d_lin, d_quad, d_kl, mean)


@zo_loss_backward.register_fake
def _(g_loss, g_policy, g_kl, f_theta, *rest):
    return torch.empty_like(f_theta)


def _zo_setup(ctx, inputs, output):
    f_theta, f_old, z, f_ref, _adv, omega = inputs[:6]
    mean = inputs[-1]
    d_lin, d_quad, d_kl = output[6:]
    ctx.has_ref = f_ref is not None
    ctx.mean = mean
    ctx.save_for_backward(f_theta, f_old, z, f_ref if f_ref is not None else f_theta, omega, d_lin, d_quad, d_kl)
    # Only loss, policy and kl are differentiable; the rest are diagnostics / saved coefficients.
    ctx.mark_non_differentiable(*output[3:])


def _zo_backward(ctx, g_loss, g_policy, g_kl, *_unused):
    f_theta, f_old, z, f_ref, omega, d_lin, d_quad, d_kl = ctx.saved_tensors
    grad = zo_loss_backward(_contig(g_loss, d_lin), _contig(g_policy, d_lin), _contig(g_kl, d_lin), f_theta, f_old, z,
                            f_ref if ctx.has_ref else None, omega, d_lin, d_quad, d_kl, ctx.mean)
    return (grad,) + (None,) * 17


zo_loss.register_autograd(_zo_backward, setup_context=_zo_setup)


# ---------------------------------------------------------------------------------------------
# Score regression
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("rsm_fast::score_loss", mutates_args=())
def score_loss(s: Tensor, s_ref: Tensor, psi: Tensor, s_old: Optional[Tensor], c1: Tensor, gamma: Tensor,
               c2: Tensor, mean: bool) -> Tensor:
    be = backends.for_device(s.device)
    with annotate("score_loss", s.device):
        return be.score_fwd(s, s_ref, psi, s_old, c1, gamma, c2, mean)


@score_loss.register_fake
def _(s, *rest):
    return s.new_empty((s.shape[0],), dtype=_cd(s))


@torch.library.custom_op("rsm_fast::score_loss_backward", mutates_args=())
def score_loss_backward(g_loss: Tensor, s: Tensor, s_ref: Tensor, psi: Tensor, s_old: Optional[Tensor],
                        c1: Tensor, gamma: Tensor, c2: Tensor, mean: bool) -> Tensor:
    be = backends.for_device(s.device)
    with annotate("score_loss_backward", s.device):
        return be.score_bwd(g_loss, s, s_ref, psi, s_old, c1, gamma, c2, mean)


@score_loss_backward.register_fake
def _(g_loss, s, *rest):
    return torch.empty_like(s)


def _score_setup(ctx, inputs, output):
    s, s_ref, psi, s_old, c1, gamma, c2, mean = inputs
    ctx.has_old, ctx.mean = s_old is not None, mean
    ctx.save_for_backward(s, s_ref, psi, s_old if s_old is not None else s, c1, gamma, c2)


def _score_backward(ctx, g_loss):
    s, s_ref, psi, s_old, c1, gamma, c2 = ctx.saved_tensors
    grad = score_loss_backward(_contig(g_loss, c1), s, s_ref, psi, s_old if ctx.has_old else None, c1, gamma, c2,
                               ctx.mean)
    return (grad,) + (None,) * 7


score_loss.register_autograd(_score_backward, setup_context=_score_setup)


# ---------------------------------------------------------------------------------------------
# Forward-process loss (DiffusionNFT / AWM; math in ``decomposed_fp``)
# ---------------------------------------------------------------------------------------------
FPOut = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]


@torch.library.custom_op("rsm_fast::fp_loss", mutates_args=())
def fp_loss(v: Tensor, v_old: Optional[Tensor], xa: Tensor, x0: Tensor, v_ref: Optional[Tensor],
            v_ema: Optional[Tensor], t: Tensor, w: Tensor, logp_old: Optional[Tensor], kl_coef: Tensor,
            ema_coef: Tensor, kind: int, beta: float, scale: float, weighting: int, power: float, clip: float,
            mean: bool) -> FPOut:
    """-> (loss, policy, kl, ema_kl, aux [B, 4], clipped, coef [B, 2]); see ``decomposed_fp``."""
    be = backends.for_device(v.device)
    with annotate("fp_loss", v.device):
        return tuple(be.fp_fwd(v, v_old, xa, x0, v_ref, v_ema, t, w, logp_old, kl_coef, ema_coef, kind, beta, scale,
                               weighting, power, clip, mean))


@fp_loss.register_fake
def _(v, *rest):
    B, cd = v.shape[0], _cd(v)
    new = lambda *shape, dtype=cd: v.new_empty((B, *shape), dtype=dtype)  # noqa: E731
    return new(), new(), new(), new(), new(4), new(dtype=torch.bool), new(2)


@torch.library.custom_op("rsm_fast::fp_loss_backward", mutates_args=())
def fp_loss_backward(g_loss: Tensor, g_policy: Tensor, g_kl: Tensor, g_ema: Tensor, v: Tensor,
                     v_old: Optional[Tensor], xa: Tensor, x0: Tensor, v_ref: Optional[Tensor],
                     v_ema: Optional[Tensor], t: Tensor, kl_coef: Tensor, ema_coef: Tensor, coef: Tensor, kind: int,
                     beta: float, mean: bool) -> Tensor:
    be = backends.for_device(v.device)
    with annotate("fp_loss_backward", v.device):
        return be.fp_bwd(g_loss, g_policy, g_kl, g_ema, v, v_old, xa, x0, v_ref, v_ema, t, kl_coef, ema_coef, coef,
                         kind, beta, mean)


@fp_loss_backward.register_fake
def _(g_loss, g_policy, g_kl, g_ema, v, *rest):
    return torch.empty_like(v)


_FP_SAVED = ("v", "v_old", "xa", "x0", "v_ref", "v_ema", "t", "kl_coef", "ema_coef")


def _fp_save(ctx, inputs, coef) -> None:
    """Save what the backward reads; absent optional latents are saved as ``v`` and remembered."""
    v, v_old, xa, x0, v_ref, v_ema, t = inputs[:7]
    ctx.present = tuple(x is not None for x in (v_old, v_ref, v_ema))
    ctx.kind, ctx.beta, ctx.mean = inputs[11], inputs[12], inputs[17]
    ctx.save_for_backward(v, v_old if v_old is not None else v, xa, x0, v_ref if v_ref is not None else v,
                          v_ema if v_ema is not None else v, t, inputs[9], inputs[10], coef)


def _fp_grad(ctx, g_loss, g_policy, g_kl, g_ema, bwd):
    v, v_old, xa, x0, v_ref, v_ema, t, klc, emac, coef = ctx.saved_tensors
    has_old, has_ref, has_ema = ctx.present
    return bwd(_contig(g_loss, t), _contig(g_policy, t), _contig(g_kl, t), _contig(g_ema, t), v,
               v_old if has_old else None, xa, x0, v_ref if has_ref else None, v_ema if has_ema else None, t, klc,
               emac, coef, ctx.kind, ctx.beta, ctx.mean)


def _fp_setup(ctx, inputs, output):
    _fp_save(ctx, inputs, output[6])
    ctx.mark_non_differentiable(*output[4:])


def _fp_backward(ctx, g_loss, g_policy, g_kl, g_ema, *_unused):
    return (_fp_grad(ctx, g_loss, g_policy, g_kl, g_ema, fp_loss_backward),) + (None,) * 17


fp_loss.register_autograd(_fp_backward, setup_context=_fp_setup)


# ---------------------------------------------------------------------------------------------
# Eager fast path: the same backends and formulas without the torch.library autograd wrapper
# ---------------------------------------------------------------------------------------------
class ZOLossFn(torch.autograd.Function):
    """``ZOLossFn.apply(*zo_loss args)``: eager twin of ``rsm_fast::zo_loss`` (same outputs)."""

    @staticmethod
    def forward(ctx, f_theta, f_old, z, f_ref, adv, omega, sigma, dt, stochastic, row_weight, kl_coef, omega_train,
                form, reweight, clip_eps, tempflow_scale, kl_dt_weight, mean):
        be = backends.for_device(f_theta.device)
        with annotate("zo_loss", f_theta.device):
            out = tuple(be.zo_fwd(f_theta, f_old, z, f_ref, adv, omega, sigma, dt, stochastic, row_weight, kl_coef,
                                  omega_train, form, reweight, clip_eps, tempflow_scale, kl_dt_weight, mean))
        ctx.be, ctx.mean, ctx.has_ref = be, mean, f_ref is not None
        ctx.save_for_backward(f_theta, f_old, z, f_ref if f_ref is not None else f_theta, omega, *out[6:])
        ctx.mark_non_differentiable(*out[3:])
        return out

    @staticmethod
    def backward(ctx, g_loss, g_policy, g_kl, *_unused):
        f_theta, f_old, z, f_ref, omega, d_lin, d_quad, d_kl = ctx.saved_tensors
        with annotate("zo_loss_backward", f_theta.device):
            grad = ctx.be.zo_bwd(_contig(g_loss, d_lin), _contig(g_policy, d_lin), _contig(g_kl, d_lin), f_theta,
                                 f_old, z, f_ref if ctx.has_ref else None, omega, d_lin, d_quad, d_kl, ctx.mean)
        return (grad,) + (None,) * 17


class ScoreLossFn(torch.autograd.Function):
    """``ScoreLossFn.apply(*score_loss args)``: eager twin of ``rsm_fast::score_loss``."""

    @staticmethod
    def forward(ctx, s, s_ref, psi, s_old, c1, gamma, c2, mean):
        be = backends.for_device(s.device)
        with annotate("score_loss", s.device):
            out = be.score_fwd(s, s_ref, psi, s_old, c1, gamma, c2, mean)
        ctx.be, ctx.mean, ctx.has_old = be, mean, s_old is not None
        ctx.save_for_backward(s, s_ref, psi, s_old if s_old is not None else s, c1, gamma, c2)
        return out

    @staticmethod
    def backward(ctx, g_loss):
        s, s_ref, psi, s_old, c1, gamma, c2 = ctx.saved_tensors
        with annotate("score_loss_backward", s.device):
            grad = ctx.be.score_bwd(_contig(g_loss, c1), s, s_ref, psi, s_old if ctx.has_old else None, c1, gamma,
                                    c2, ctx.mean)
        return (grad,) + (None,) * 7


class FPLossFn(torch.autograd.Function):
    """``FPLossFn.apply(*fp_loss args)``: eager twin of ``rsm_fast::fp_loss``."""

    @staticmethod
    def forward(ctx, v, v_old, xa, x0, v_ref, v_ema, t, w, logp_old, kl_coef, ema_coef, kind, beta, scale,
                weighting, power, clip, mean):
        be = backends.for_device(v.device)
        with annotate("fp_loss", v.device):
            out = tuple(be.fp_fwd(v, v_old, xa, x0, v_ref, v_ema, t, w, logp_old, kl_coef, ema_coef, kind, beta,
                                  scale, weighting, power, clip, mean))
        ctx.be = be
        _fp_save(ctx, (v, v_old, xa, x0, v_ref, v_ema, t, w, logp_old, kl_coef, ema_coef, kind, beta, scale,
                       weighting, power, clip, mean), out[6])
        ctx.mark_non_differentiable(*out[4:])
        return out

    @staticmethod
    def backward(ctx, g_loss, g_policy, g_kl, g_ema, *_unused):
        with annotate("fp_loss_backward", ctx.saved_tensors[0].device):
            grad = _fp_grad(ctx, g_loss, g_policy, g_kl, g_ema, ctx.be.fp_bwd)
        return (grad,) + (None,) * 17


# ---------------------------------------------------------------------------------------------
# Sampler step (inference only: no autograd formula)
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("rsm_fast::sampler_step", mutates_args=())
def sampler_step(x: Tensor, f: Tensor, z: Tensor, c_x: Tensor, c_f: Tensor, sigma: Tensor, stochastic: Tensor,
                 mean: bool) -> tuple[Tensor, Tensor]:
    be = backends.for_device(x.device)
    with annotate("sampler_step", x.device):
        x_next, logp = be.step_fwd(x, f, z, c_x, c_f, sigma, stochastic, mean)
    return x_next, logp


@sampler_step.register_fake
def _(x, *rest):
    return torch.empty_like(x), x.new_empty((x.shape[0],), dtype=_cd(x))
