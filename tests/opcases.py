"""Shared random cases and helpers for the fused-op tests (imported by the backend test files):
the backends available on this machine, the built C++ extension as a fixture, per-case seeds and
the relative comparison the C++ tests use."""
from __future__ import annotations

import os
import warnings
import zlib

import pytest
import torch

from rsm_fast import schedules as S
from rsm_fast import transitions as T
from rsm_fast.losses import zo_row_loss

F64 = torch.float64


def available_backends() -> list[str]:
    """'decomposed', plus 'cpp' when the C++ ops build (built on first use, cached afterwards) and
    'triton' under TRITON_INTERPRET=1 when its kernels import."""
    from rsm_fast.ops import backends

    names = ["decomposed"]
    if backends._cpp() is not None:
        names.append("cpp")
    if os.environ.get("TRITON_INTERPRET") == "1":
        try:
            backends._triton()
            names.append("triton")
        except Exception:  # noqa: BLE001 - kernels absent or triton missing: not available here
            pass
    return names


@pytest.fixture(scope="module")
def ext():
    """The built C++ extension module; the test skips (with the build's warning) when it cannot build."""
    from rsm_fast.ops import cpu_ext

    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        mod = cpu_ext.load()
    if mod is None:
        pytest.skip(f"C++ CPU ops could not be built: {w[0].message if w else 'unknown reason'}")
    return mod


def seed_of(*key) -> int:
    return zlib.crc32(repr(key).encode())


def close_rel(got, exp, rel):
    """|got - exp| <= rel (|exp| + max|exp| / 10): relative, with a floor at the vector's scale (and at
    the subnormal spacing of a low-precision output: fp16 gradients can be that small)."""
    exp = exp.to(F64)
    scale = float(exp.abs().max()) if exp.numel() else 0.0
    atol = rel * max(scale, 1e-30) / 10
    if got.dtype in (torch.float16, torch.bfloat16):
        atol = max(atol, torch.finfo(got.dtype).tiny * torch.finfo(got.dtype).eps)
    torch.testing.assert_close(got.to(F64), exp, rtol=rel, atol=atol)


def make_zo_case(family: str, seed: int, B: int = 16, latent=(3, 5, 7), ode_frac: float = 0.25, dtype=F64):
    """Random rows at random steps of a real transition, spanning clipped and unclipped regimes."""
    g = torch.Generator().manual_seed(seed)
    if family == "ddim":
        tr = T.ddim(S.ddpm_linear_alphas_cumprod(), S.ddim_timesteps(1000, 10), eta=1.0)
    else:
        tr = T.flow_grpo_sde(S.rf_sigmas(10, 3.0), noise_level=0.7)
    idx = torch.randint(0, tr.num_steps, (B,), generator=g)
    stoch = torch.rand(B, generator=g, dtype=F64) >= ode_frac
    co = tr.coeffs(idx, stoch, dtype=F64)
    rn = lambda: torch.randn(B, *latent, generator=g, dtype=F64)  # noqa: E731
    col = lambda v: v.reshape(B, *([1] * len(latent)))  # noqa: E731
    f_old = rn()
    size = torch.logspace(-4, 0, B, dtype=F64)[torch.randperm(B, generator=g)]
    f_theta = (f_old + col(size / co.omega.clamp_min(1e-3)) * rn()).to(dtype)
    adv = torch.randn(B, generator=g, dtype=F64)
    adv[0] = 0.0
    return dict(co=co, f_theta=f_theta, f_old=f_old.to(dtype), z=rn().to(dtype), f_ref=(f_old + 0.3 * rn()).to(dtype),
                adv=adv, row_weight=torch.rand(B, generator=g, dtype=F64) + 0.5,
                kl_coef=torch.rand(B, generator=g, dtype=F64), omega_train=co.omega * (0.5 + torch.rand(B, generator=g, dtype=F64)))


def decomposed_args(c, with_kl: bool, cd=F64):
    co = c["co"]
    return (c["f_theta"], c["f_old"], c["z"], c["f_ref"] if with_kl else None, c["adv"].to(cd), co.omega.to(cd),
            co.sigma.to(cd), co.dt.to(cd), co.stochastic, c["row_weight"].to(cd),
            c["kl_coef"].to(cd) if with_kl else torch.zeros_like(c["adv"], dtype=cd), c["omega_train"].to(cd))


def zo_reference(c, form: str, reweight: str, eps: float, with_kl: bool, kl_dt: bool, mean: bool, seed: int):
    """The float64 oracle on case ``c``: ``zo_row_loss`` and the autograd gradient w.r.t. f_theta of
    ``sum(g_loss loss + g_policy policy + g_kl kl)`` with random per-row grads (seeded ``seed + 1``).
    -> ``(ref, (g_loss, g_policy, g_kl), grad)``."""
    f = c["f_theta"].clone().requires_grad_(True)
    ref = zo_row_loss(f, c["f_old"], c["z"], c["adv"], c["co"], form=form, reweight=reweight, clip_eps=eps,
                      f_ref=c["f_ref"] if with_kl else None, kl_coef=c["kl_coef"] if with_kl else 0.0,
                      kl_dt_weight=kl_dt, row_weight=c["row_weight"], omega_train=c["omega_train"],
                      tempflow_scale=2.25, reduce="mean" if mean else "sum")
    g = torch.Generator().manual_seed(seed + 1)
    grads = tuple(torch.randn(f.shape[0], generator=g, dtype=F64) for _ in range(3))
    want = torch.autograd.grad((grads[0] * ref.loss + grads[1] * ref.policy + grads[2] * ref.kl).sum(), f)[0]
    return ref, grads, want
