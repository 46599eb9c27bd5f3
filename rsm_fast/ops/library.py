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
The Functions call the backends' ``*_unchecked`` entry points: their arguments come out of the
API's checks (and the backward's out of the forward), so the Triton wrappers' Python argument
checks are not repeated on every call; the registered ops (``torch.ops.rsm_fast.*``, callable by
anyone) keep them. Unused outputs' gradients are a cached zero row, not a fresh fill.

One output block. A forward's per-row outputs are rows of one ``[K, B]`` compute-dtype tensor
(the Triton and C++ backends allocate it once, Triton with the partial sums behind it, and return
tensors over its ranges: views, C++ aliases; the plain-torch fallback's separate tensors are
copied into one on the registered-op path only). The eager
``autograd.Function`` s return those views as separate outputs. A registered op may not return
outputs that alias each other, so ``rsm_fast::zo_loss`` and ``rsm_fast::fp_loss`` return the block
itself (``ZO_K`` / ``FP_K`` rows; a bool output lives in the first ``B`` bytes of its row) and
:func:`zo_outputs` / :func:`fp_outputs` cut the outputs out of it (views; what the API does under
``torch.compile``). Neither path reads a tensor back to the host, so a forward + backward can be
captured in a CUDA graph.
"""
from __future__ import annotations

import math
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


# Constant rows by (value, B, dtype, device): a number given for a per-row input, the zero
# gradient of an unused output. Made once and only read afterwards (the ops never write an input).
# Not cached inside torch.compile, CUDA-graph capture (the fill would only run on replay) or
# inference mode (such a tensor cannot be saved for backward), nor non-finite values.
_CONST_ROWS: dict = {}
_MAX_CONST_ROWS = 256


def const_row(value: float, B: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A ``[B]`` tensor filled with ``value`` (cached: no allocation or fill after the first call)."""
    if torch.compiler.is_compiling():
        return torch.full((B,), value, dtype=dtype, device=device)
    key = (value, B, dtype, device)
    t = _CONST_ROWS.get(key)
    if t is not None:
        return t
    t = torch.full((B,), value, dtype=dtype, device=device)
    if (math.isfinite(value) and not torch.is_inference_mode_enabled()
            and not (device.type == "cuda" and torch.cuda.is_current_stream_capturing())):
        if len(_CONST_ROWS) >= _MAX_CONST_ROWS:
            _CONST_ROWS.clear()
        _CONST_ROWS[key] = t
    return t


def _row_grads(gs: tuple, like: Tensor) -> tuple:
    """The upstream gradients of a forward's differentiable ``[B]`` outputs as contiguous ``[B]``
    tensors of ``like``'s dtype: passed through when already so, a cached zero row when absent
    (an unused output), else copied (an expanded grad, e.g. of ``.mean()``: one kernel)."""
    dt = like.dtype
    out = []
    for g in gs:
        if g is None:
            out.append(const_row(0.0, like.shape[0], dt, like.device))
        elif g.dtype is dt and g.is_contiguous():
            out.append(g)
        else:
            out.append(g.to(dt).contiguous())
    return tuple(out)


def _block(outs: tuple, K: int, bool_row: int, parts: tuple) -> Tensor:
    """The ``[K, B]`` block a backend's forward outputs ``outs`` are ranges of (one storage, each
    output at its row), or (a backend that allocates them separately) a fresh block they are
    copied into. ``parts``: for each output, the
    row it starts at (``bool_row``'s output is the bool in that row's first bytes; the row's other
    bytes are zeroed, so the block holds no uninitialised memory)."""
    first = outs[0]
    B, dt = first.shape[0], first.dtype
    st = first.untyped_storage()
    p0, step = st.data_ptr(), B * first.element_size()
    block = None
    if (st.nbytes() >= K * step and first.is_contiguous()
            and all(o.untyped_storage().data_ptr() == p0 and o.data_ptr() == p0 + r * step and o.is_contiguous()
                    for o, r in zip(outs, parts))):
        block = first.new_empty((0,)).set_(st, 0, (K, B), (B, 1))   # the same memory, as one tensor
    if block is None:
        block = torch.empty((K, B), dtype=dt, device=first.device)
        flat = block.view(-1)
        for o, r in zip(outs, parts):
            if r == bool_row:
                block[r].view(torch.uint8)[:B].copy_(o.view(torch.uint8))
            else:
                flat[r * B:r * B + o.numel()].copy_(o.reshape(-1))
    block[bool_row].view(torch.uint8)[B:].zero_()
    return block


def _bool_of(row: Tensor) -> Tensor:
    return row.view(torch.uint8)[:row.shape[0]].view(torch.bool)


# ---------------------------------------------------------------------------------------------
# ZO row loss
# ---------------------------------------------------------------------------------------------
ZO_K = 9                     # rows of the zo block: the nine outputs above, in that order
_ZO_PARTS = tuple(range(ZO_K))
_ZO_CLIP = 3


def zo_outputs(block: Tensor) -> tuple:
    """The nine ``[B]`` outputs of ``rsm_fast::zo_loss`` (``ZOOut`` order) as views of its block;
    the non-differentiable ones detached."""
    r = block.unbind(0)
    d = block.detach().unbind(0)
    return (r[0], r[1], r[2], _bool_of(d[3]), d[4], d[5], d[6], d[7], d[8])


@torch.library.custom_op("rsm_fast::zo_loss", mutates_args=())
def zo_loss(f_theta: Tensor, f_old: Tensor, z: Tensor, f_ref: Optional[Tensor], adv: Tensor, omega: Tensor,
            sigma: Tensor, dt: Tensor, stochastic: Tensor, row_weight: Tensor, kl_coef: Tensor,
            omega_train: Tensor, form: int, reweight: int, clip_eps: float, tempflow_scale: float,
            kl_dt_weight: bool, mean: bool) -> Tensor:
    """-> the ``[9, B]`` block of (loss, policy, kl, clipped, log_ratio, lin, d_lin, d_quad, d_kl);
    :func:`zo_outputs` splits it; see ``decomposed``."""
    be = backends.for_device(f_theta.device)
    with annotate("zo_loss", f_theta.device):
        out = be.zo_fwd(f_theta, f_old, z, f_ref, adv, omega, sigma, dt, stochastic, row_weight, kl_coef,
                        omega_train, form, reweight, clip_eps, tempflow_scale, kl_dt_weight, mean)
        return _block(tuple(out), ZO_K, _ZO_CLIP, _ZO_PARTS)


@zo_loss.register_fake
def _(f_theta, f_old, z, f_ref, adv, *rest):
    return f_theta.new_empty((ZO_K, f_theta.shape[0]), dtype=_cd(f_theta))


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
    ctx.has_ref = f_ref is not None
    ctx.mean = inputs[-1]
    ctx.save_for_backward(f_theta, f_old, z, f_ref if f_ref is not None else f_theta, omega, output)


def _zo_backward(ctx, g_block):
    # Only rows loss, policy and kl are differentiable; the grads of the other rows are ignored.
    f_theta, f_old, z, f_ref, omega, block = ctx.saved_tensors
    g = g_block.to(block.dtype).contiguous()
    grad = zo_loss_backward(g[0], g[1], g[2], f_theta, f_old, z, f_ref if ctx.has_ref else None, omega,
                            block[6], block[7], block[8], ctx.mean)
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
FP_K = 11      # rows of the fp block: loss, policy, kl, ema_kl, aux [B, 4] (rows 4-7), coef [B, 2] (8-9), clipped (10)
_FP_PARTS = (0, 1, 2, 3, 4, 10, 8)      # the row each output of FPOut starts at
_FP_CLIP = 10


def fp_outputs(block: Tensor) -> tuple:
    """The seven outputs of ``rsm_fast::fp_loss`` (``FPOut`` order) as views of its block; the
    non-differentiable ones detached."""
    B = block.shape[1]
    r = block.unbind(0)
    d = block.detach()
    flat = d.view(-1)
    return (r[0], r[1], r[2], r[3], flat[4 * B:8 * B].view(B, 4), _bool_of(d[10]), flat[8 * B:10 * B].view(B, 2))


@torch.library.custom_op("rsm_fast::fp_loss", mutates_args=())
def fp_loss(v: Tensor, v_old: Optional[Tensor], xa: Tensor, x0: Tensor, v_ref: Optional[Tensor],
            v_ema: Optional[Tensor], t: Tensor, w: Tensor, logp_old: Optional[Tensor], kl_coef: Tensor,
            ema_coef: Tensor, kind: int, beta: float, scale: float, weighting: int, power: float, clip: float,
            mean: bool) -> Tensor:
    """-> the ``[11, B]`` block of (loss, policy, kl, ema_kl, aux [B, 4], clipped, coef [B, 2]);
    :func:`fp_outputs` splits it; see ``decomposed_fp``."""
    be = backends.for_device(v.device)
    with annotate("fp_loss", v.device):
        out = be.fp_fwd(v, v_old, xa, x0, v_ref, v_ema, t, w, logp_old, kl_coef, ema_coef, kind, beta, scale,
                        weighting, power, clip, mean)
        return _block(tuple(out), FP_K, _FP_CLIP, _FP_PARTS)


@fp_loss.register_fake
def _(v, *rest):
    return v.new_empty((FP_K, v.shape[0]), dtype=_cd(v))


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
    g_loss, g_policy, g_kl, g_ema = _row_grads((g_loss, g_policy, g_kl, g_ema), t)
    return bwd(g_loss, g_policy, g_kl, g_ema, v, v_old if has_old else None, xa, x0, v_ref if has_ref else None,
               v_ema if has_ema else None, t, klc, emac, coef, ctx.kind, ctx.beta, ctx.mean)


def _fp_setup(ctx, inputs, output):
    B = output.shape[1]
    _fp_save(ctx, inputs, output.view(-1)[8 * B:10 * B].view(B, 2))


def _fp_backward(ctx, g_block):
    # Only rows loss, policy, kl and ema_kl are differentiable; the grads of the other rows are ignored.
    g = g_block.to(ctx.saved_tensors[6].dtype).contiguous()
    return (_fp_grad(ctx, g[0], g[1], g[2], g[3], fp_loss_backward),) + (None,) * 17


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
            out = tuple(be.zo_fwd_unchecked(f_theta, f_old, z, f_ref, adv, omega, sigma, dt, stochastic, row_weight,
                                            kl_coef, omega_train, form, reweight, clip_eps, tempflow_scale,
                                            kl_dt_weight, mean))
        ctx.be, ctx.mean, ctx.has_ref = be, mean, f_ref is not None
        ctx.save_for_backward(f_theta, f_old, z, f_ref if f_ref is not None else f_theta, omega, *out[6:])
        ctx.mark_non_differentiable(*out[3:])
        ctx.set_materialize_grads(False)     # unused outputs' grads: a cached zero row (_row_grads)
        return out

    @staticmethod
    def backward(ctx, g_loss, g_policy, g_kl, *_unused):
        f_theta, f_old, z, f_ref, omega, d_lin, d_quad, d_kl = ctx.saved_tensors
        g_loss, g_policy, g_kl = _row_grads((g_loss, g_policy, g_kl), d_lin)
        with annotate("zo_loss_backward", f_theta.device):
            grad = ctx.be.zo_bwd_unchecked(g_loss, g_policy, g_kl, f_theta, f_old, z, f_ref if ctx.has_ref else None,
                                           omega, d_lin, d_quad, d_kl, ctx.mean)
        return (grad,) + (None,) * 17


class ScoreLossFn(torch.autograd.Function):
    """``ScoreLossFn.apply(*score_loss args)``: eager twin of ``rsm_fast::score_loss``."""

    @staticmethod
    def forward(ctx, s, s_ref, psi, s_old, c1, gamma, c2, mean):
        be = backends.for_device(s.device)
        with annotate("score_loss", s.device):
            out = be.score_fwd_unchecked(s, s_ref, psi, s_old, c1, gamma, c2, mean)
        ctx.be, ctx.mean, ctx.has_old = be, mean, s_old is not None
        ctx.save_for_backward(s, s_ref, psi, s_old if s_old is not None else s, c1, gamma, c2)
        return out

    @staticmethod
    def backward(ctx, g_loss):
        s, s_ref, psi, s_old, c1, gamma, c2 = ctx.saved_tensors
        with annotate("score_loss_backward", s.device):
            grad = ctx.be.score_bwd_unchecked(_row_grads((g_loss,), c1)[0], s, s_ref, psi,
                                              s_old if ctx.has_old else None, c1, gamma, c2, ctx.mean)
        return (grad,) + (None,) * 7


class FPLossFn(torch.autograd.Function):
    """``FPLossFn.apply(*fp_loss args)``: eager twin of ``rsm_fast::fp_loss``."""

    @staticmethod
    def forward(ctx, v, v_old, xa, x0, v_ref, v_ema, t, w, logp_old, kl_coef, ema_coef, kind, beta, scale,
                weighting, power, clip, mean):
        be = backends.for_device(v.device)
        with annotate("fp_loss", v.device):
            out = tuple(be.fp_fwd_unchecked(v, v_old, xa, x0, v_ref, v_ema, t, w, logp_old, kl_coef, ema_coef, kind,
                                            beta, scale, weighting, power, clip, mean))
        ctx.be, ctx.device = be, v.device
        _fp_save(ctx, (v, v_old, xa, x0, v_ref, v_ema, t, w, logp_old, kl_coef, ema_coef, kind, beta, scale,
                       weighting, power, clip, mean), out[6])
        ctx.mark_non_differentiable(*out[4:])
        ctx.set_materialize_grads(False)     # unused outputs' grads: a cached zero row (_row_grads)
        return out

    @staticmethod
    def backward(ctx, g_loss, g_policy, g_kl, g_ema, *_unused):
        with annotate("fp_loss_backward", ctx.device):
            grad = _fp_grad(ctx, g_loss, g_policy, g_kl, g_ema, ctx.be.fp_bwd_unchecked)
        return (grad,) + (None,) * 17


def _fast_apply(cls):
    """``cls.apply`` without ``autograd.Function.apply``'s Python wrapper: outside functorch
    transforms that wrapper only unwraps dead functorch wrappers from every argument (~5 µs for
    the 18 arguments here) and then calls the C++ ``_FunctionBase.apply``, which this calls
    directly (under a functorch transform it defers to ``cls.apply``). The API's tensors are
    never functorch wrappers of an exited transform."""
    c_apply = super(torch.autograd.Function, cls).apply
    transforms_active = torch._C._are_functorch_transforms_active

    def apply(*args):
        if transforms_active():
            return cls.apply(*args)
        return c_apply(*args)

    apply.__doc__ = f"``{cls.__name__}.apply`` (fast path, see :func:`_fast_apply`)."
    return apply


zo_apply = _fast_apply(ZOLossFn)
score_apply = _fast_apply(ScoreLossFn)
fp_apply = _fast_apply(FPLossFn)


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
