"""Shared random cases and the float64 oracle of the fused forward-process loss op (``fp_fwd`` /
``fp_bwd``), imported by the backend test files.

The oracle is a per-row transcription of the released loss lines written from the formulas
(NVlabs/DiffusionNFT @ 24af5554 scripts/train_nft_sd3.py; scxue/advantage_weighted_matching @ be513723
scripts/train_sd3_awm.py), with each output (policy, KL to the reference, KL to the EMA) kept per
row and differentiable, so a backend's backward can be checked against autograd for any per-row
upstream gradients. It calls neither the op under test nor ``rsm_fast.losses``.
"""
from __future__ import annotations

import torch

F64 = torch.float64
WEIGHTINGS = ("uniform", "t", "t**2", "huber", "ghuber")


def make_fp_case(kind: str, seed: int, B: int = 12, latent=(3, 5, 7), dtype=F64, clip: float = 0.2):
    """Fresh rows: x0, eps, t in (0.02, 0.98), x_t on the rectified flow, outputs near v* at random
    distances (1e-3 .. 1), advantages of both signs with clipped and zero rows; for AWM a
    ``logp_shift`` [B] that puts the off-policy ratio on both sides of ``[1 - clip, 1 + clip]``.
    Rows 0, 1, 2 have the advantages 7.5, -6 and 0, so ``B >= 3``."""
    if B < 3:
        raise ValueError(f"make_fp_case needs B >= 3 (rows 0-2 carry fixed advantages), got {B}")
    g = torch.Generator().manual_seed(seed)
    rn = lambda: torch.randn(B, *latent, generator=g, dtype=F64)  # noqa: E731
    col = lambda v: v.reshape(B, *([1] * len(latent)))  # noqa: E731
    x0, eps = rn(), rn()
    t = 0.02 + 0.96 * torch.rand(B, generator=g, dtype=F64)
    x_t = (1 - col(t)) * x0 + col(t) * eps
    size = torch.logspace(-3, 0, B, dtype=F64)[torch.randperm(B, generator=g)]
    v_old = (eps - x0) + col(size) * rn()
    v = v_old + 0.1 * col(size) * rn()
    adv = 3.0 * torch.randn(B, generator=g, dtype=F64)
    adv[0], adv[1], adv[2] = 7.5, -6.0, 0.0
    shift = (torch.rand(B, generator=g, dtype=F64) - 0.5) * 6 * clip     # l - l_old in [-3c, 3c]
    c = dict(v=v, v_old=v_old, x_t=x_t, eps=eps, x0=x0, v_ref=v_old + 0.2 * rn(), v_ema=v + 0.05 * rn(),
             t=t, adv=adv, logp_shift=shift)
    return {k: (x.to(dtype) if x.dim() > 1 else x) for k, x in c.items()}


def nft_rows(v, v_old, x_t, x0, t, r, beta, cmax):
    """DiffusionNFT's per-row policy loss ``C (r L+ + (1 - r) L-) / beta`` (release order: x0_hat,
    float64 adaptive weights under no_grad floored after the mean) -> ``(policy, w+, w-, L+, L-)``."""
    te = t.view(-1, *([1] * (v.dim() - 1)))
    pos = beta * v + (1 - beta) * v_old
    neg = (1.0 + beta) * v_old - beta * v
    x0p, x0n = x_t - te * pos, x_t - te * neg
    dims = tuple(range(1, v.dim()))
    with torch.no_grad():
        wp = torch.abs(x0p.double() - x0.double()).mean(dim=dims, keepdim=True).clip(min=0.00001)
        wn = torch.abs(x0n.double() - x0.double()).mean(dim=dims, keepdim=True).clip(min=0.00001)
    lp = ((x0p - x0) ** 2 / wp).mean(dim=dims)
    ln = ((x0n - x0) ** 2 / wn).mean(dim=dims)
    return (r * lp / beta + (1 - r) * ln / beta) * cmax, wp.flatten(), wn.flatten(), lp, ln


def awm_logp(v, eps, x0, t, weighting, p):
    """compute_log_prob_awm's per-row surrogate log-likelihood (float64)."""
    mse = ((v.double() - (eps.double() - x0.double())) ** 2).mean(dim=tuple(range(1, v.dim())))
    td = t.double()
    if weighting == "uniform":
        return -mse
    if weighting == "t":
        return -mse * td
    if weighting == "t**2":
        return -mse * td ** 2
    if weighting == "huber":
        return -(torch.sqrt(mse + 1e-10) - 1e-5) * td
    return -((mse + 1e-10) ** p - 1e-10 ** p) * td / p


def awm_rows(v, eps, x0, t, a, logp_old, weighting, p, clip):
    """AWM's per-row clipped surrogate ``max(-A' ratio, -A' clamp(ratio))`` -> ``(policy, logp, ratio)``."""
    logp = awm_logp(v, eps, x0, t, weighting, p)
    old = logp.detach() if logp_old is None else logp_old
    ratio = torch.exp(logp - old)
    un = -a * ratio
    cl = -a * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    return torch.maximum(un, cl), logp, ratio


def kl_scale(t, mode):
    if mode == "uniform":
        return torch.ones_like(t)
    std = torch.sqrt(t / (1 - torch.clamp(t, 0, 0.99))) * 0.7
    return 1.0 / (2 * std ** 2)


def mix_weight(adv, cmax):
    return torch.clamp((torch.clamp(adv, -cmax, cmax) / cmax) / 2.0 + 0.5, 0, 1)


def awm_adv(adv, cmax, adv_max):
    a = torch.clamp(adv, -cmax, cmax)
    return a if adv_max is None else a / cmax * adv_max


def oracle(c: dict, kind: str, *, beta=1.0, cmax=5.0, weighting="ghuber", p=0.25, clip=0.2, adv_max=1.0,
           off_policy=False, kl_beta=0.0, ema_beta=0.0, kl_weight="uniform", ema_weight="uniform"):
    """Per-row float64 outputs as functions of a fresh leaf ``v``: returns ``(v, out)`` with ``out``
    holding ``loss, policy, kl, ema_kl`` (differentiable) and the detached ``aux`` ``[B, 4]`` and
    ``clipped``; plus the per-row ``w``, ``logp_old``, ``kl_coef`` and ``ema_coef`` the raw op takes."""
    v = c["v"].to(F64).clone().requires_grad_(True)
    t = c["t"]
    dims = tuple(range(1, v.dim()))
    kl = ((v - c["v_ref"].to(F64)) ** 2).mean(dim=dims) if kl_beta or kind == "nft" else torch.zeros_like(t)
    ema = ((v - c["v_ema"].to(F64)) ** 2).mean(dim=dims) if ema_beta else torch.zeros_like(t)
    out = {}
    if kind == "nft":
        w = mix_weight(c["adv"], cmax)
        policy, wp, wn, lp, ln = nft_rows(v, c["v_old"].to(F64), c["x_t"].to(F64), c["x0"].to(F64), t, w, beta, cmax)
        out["aux"] = torch.stack([wp, wn, lp.detach(), ln.detach()], 1)
        out["clipped"] = torch.zeros_like(t, dtype=torch.bool)
        klc, emac, logp_old = torch.full_like(t, kl_beta), torch.zeros_like(t), None
    else:
        w = awm_adv(c["adv"], cmax, adv_max)
        logp_old = None
        if off_policy:
            logp_old = awm_logp(c["v"].to(F64), c["eps"].to(F64), c["x0"].to(F64), t, weighting, p) - c["logp_shift"]
        policy, logp, ratio = awm_rows(v, c["eps"].to(F64), c["x0"].to(F64), t, w, logp_old, weighting, p, clip)
        mse = ((v.detach() - (c["eps"].to(F64) - c["x0"].to(F64))) ** 2).mean(dim=dims)
        out["aux"] = torch.stack([logp.detach(), ratio.detach(), mse, torch.zeros_like(t)], 1)
        out["clipped"] = ((w > 0) & (ratio > 1 + clip)) | ((w < 0) & (ratio < 1 - clip))
        klc, emac = kl_beta * kl_scale(t, kl_weight), ema_beta * kl_scale(t, ema_weight)
    out.update(policy=policy, kl=kl, ema_kl=ema, loss=policy + klc * kl + emac * ema)
    return v, out, dict(w=w, logp_old=logp_old, kl_coef=klc, ema_coef=emac)


def raw_args(c: dict, kind: str, rows: dict, *, beta=1.0, cmax=5.0, weighting="ghuber", p=0.25, clip=0.2,
             with_ref=True, with_ema=False, mean=True, cd=F64):
    """The backend ``fp_fwd`` arguments for case ``c`` (``rows`` from :func:`oracle`)."""
    nft = kind == "nft"
    lo = rows["logp_old"]
    return (c["v"], c["v_old"] if nft else None, c["x_t"] if nft else c["eps"], c["x0"],
            c["v_ref"] if with_ref else None, c["v_ema"] if with_ema else None, c["t"].to(cd), rows["w"].to(cd),
            None if lo is None else lo.to(cd), rows["kl_coef"].to(cd), rows["ema_coef"].to(cd), 0 if nft else 1,
            float(beta), float(cmax), WEIGHTINGS.index(weighting), float(p), float(clip), mean)


def oracle_grad(v, out, seed: int):
    """Random per-row upstream grads ``(g_loss, g_policy, g_kl, g_ema)`` and the oracle's gradient of
    ``sum(g_loss loss + g_policy policy + g_kl kl + g_ema ema_kl)`` w.r.t. ``v``."""
    g = torch.Generator().manual_seed(seed + 1)
    B = v.shape[0]
    gs = tuple(torch.randn(B, generator=g, dtype=F64) for _ in range(4))
    total = (gs[0] * out["loss"] + gs[1] * out["policy"] + gs[2] * out["kl"] + gs[3] * out["ema_kl"]).sum()
    return gs, torch.autograd.grad(total, v, allow_unused=True)[0]


# The configurations every backend is checked on: (kind, options for oracle / raw_args).
CONFIGS = [
    ("nft", dict(beta=1.0, kl_beta=1e-2)),
    ("nft", dict(beta=0.1, kl_beta=0.0)),
    ("nft", dict(beta=0.3, kl_beta=0.5, ema_beta=0.0)),
    *[("awm", dict(weighting=wt, clip=0.2, off_policy=True, kl_beta=1e-2, ema_beta=0.5, kl_weight="elbo"))
      for wt in WEIGHTINGS],
    ("awm", dict(weighting="ghuber", clip=1.0, off_policy=False, kl_beta=1e-3, ema_beta=1.0)),
    ("awm", dict(weighting="t", clip=0.2, off_policy=True, adv_max=None, kl_beta=0.0, ema_beta=0.0)),
]


def split(opts: dict):
    """``(oracle kwargs, raw_args kwargs)`` of a CONFIGS entry (an NFT entry names ``beta``: NFT
    always passes ``v_ref``, whose KL the oracle reports whatever ``kl_beta``)."""
    o = dict(opts)
    ra = {k: o[k] for k in ("beta", "cmax", "weighting", "p", "clip") if k in o}
    ra["with_ref"] = bool(o.get("kl_beta", 0.0)) or "beta" in o     # NFT always passes v_ref (kl stat)
    ra["with_ema"] = bool(o.get("ema_beta", 0.0))
    return o, ra
