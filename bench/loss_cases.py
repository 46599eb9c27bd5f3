"""Shared pieces of the fused-loss benchmarks: the grid, random inputs, the three implementations
and the byte model. Imported by ``bench_fused_loss.py`` (pytest-benchmark), ``run_loss_bench.py``
(the results table) and ``profiles/profile_loss.py``.

Implementations, for each loss (``zo``, ``score``, and the forward-process ``nft`` / ``awm``):
  fused     ``rsm_fast.ops.zo_loss`` / ``score_loss`` / ``nft_loss`` / ``awm_loss`` (backend picked
            per device: Triton on CUDA, C++ on CPU, plain-torch ``decomposed`` fallback), called
            with ``check=False`` (no host sync) unless asked otherwise.
  eager     the reference ``rsm_fast.losses.zo_row_loss`` / ``score_regression_loss`` (float32
            math) / ``forward_process.nft_loss`` / ``awm_loss`` (as released: NFT's adaptive
            weights and AWM's mse in float64).
  compiled  the same reference under ``torch.compile(dynamic=False)``.

The forward-process losses return the scalar mean over rows (as the references do); the others
return ``[B]`` row losses. Their cases: NFT at DiffusionNFT's defaults (beta 1, KL 1e-4, reads
v, v_old, x_t, x0, v_ref); AWM at AWM's GenEval defaults (ghuber p 0.25, clip 1, KL 1e-3 to the
reference and 1.0 to the EMA, reads v, eps, x0, v_ref, v_ema), on-policy (the first pass).

Passes: ``fwd`` is the loss forward with autograd recording (as in training: the differentiable
input requires grad); ``fwd+bwd`` adds ``torch.autograd.grad`` of the row losses with the fixed
weights ``1/B`` (the gradient of ``loss.mean()``).
"""
from __future__ import annotations

import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

from rsm_fast import ops  # noqa: E402
from rsm_fast import schedules as S  # noqa: E402
from rsm_fast import transitions as T  # noqa: E402
from rsm_fast.losses import forward_process as FP  # noqa: E402
from rsm_fast.losses import score_regression_loss, zo_row_loss  # noqa: E402
from rsm_fast.ops import backends  # noqa: E402

OPS = ("zo", "score", "nft", "awm")
PASSES = ("fwd", "fwd+bwd")
IMPLS = ("fused", "eager", "compiled")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# The Flow-GRPO / RSM default path: clipped log-ratio hinge, fair reweight (Eq. 24), KL to the reference.
ZO_KW = dict(form="hinge", reweight="fair", clip_eps=1e-4, kl_coef=0.04, kl_dt_weight=False, reduce="mean")
SCORE_C2 = 0.1          # trust-region term on, so s_old is read
HEADLINE = (12, (16, 64, 64))   # 12 rows of SD3.5-M 512^2 latents
# Latent tensors a fused implementation must touch per call: zo reads f_theta, f_old, z, f_ref;
# score reads s_theta, s_ref, psi_hat, s_old. The backward re-reads them and writes one gradient.
LATENT_INPUTS = {"zo": 4, "score": 4, "nft": 5, "awm": 5}

FULL = dict(rows=(4, 12, 24, 48), latents=((4, 64, 64), (16, 64, 64), (16, 128, 128)), dtypes=("fp32", "bf16", "fp16"))
QUICK = dict(rows=(4, 12), latents=((4, 64, 64), (16, 64, 64)), dtypes=("fp32",))


@dataclass(frozen=True)
class Case:
    op: str
    rows: int
    latent: tuple
    dtype: str

    @property
    def numel(self) -> int:
        return self.rows * math.prod(self.latent)

    @property
    def latent_str(self) -> str:
        c, h, w = self.latent
        return f"{c}x{h}x{w}" if h != w else f"{c}x{h}²"

    def __str__(self) -> str:  # also the pytest id
        return f"{self.op}-{self.rows}x{'x'.join(map(str, self.latent))}-{self.dtype}"


def grid_name(name: str | None, device: torch.device) -> str:
    """Explicit name, else ``$RSM_BENCH_GRID``, else full on CUDA and quick on CPU."""
    name = name or os.environ.get("RSM_BENCH_GRID", "").strip() or ("full" if device.type == "cuda" else "quick")
    if name not in ("quick", "full"):
        raise ValueError(f"grid must be 'quick' or 'full', got {name!r}")
    return name


def grid(name: str | None, device: torch.device, ops_=OPS) -> list[Case]:
    """The cases of a grid. quick: rows {4,12} x {4x64², 16x64²} fp32, plus the headline shape in
    bf16; full: rows {4,12,24,48} x {4x64², 16x64², 16x128²} x {fp32, bf16, fp16}."""
    g = FULL if grid_name(name, device) == "full" else QUICK
    cases = [Case(op, b, lat, dt) for op in ops_ for lat in g["latents"] for b in g["rows"] for dt in g["dtypes"]]
    if g is QUICK:
        cases += [Case(op, HEADLINE[0], HEADLINE[1], "bf16") for op in ops_]
    return cases


def parse_latent(s: str) -> tuple:
    """'16x64x64' -> (16, 64, 64)."""
    parts = tuple(int(p) for p in s.lower().replace("²", "").split("x"))
    return parts if len(parts) == 3 else (parts[0], parts[1], parts[1])


def elt_bytes(case: Case) -> int:
    return torch.empty((), dtype=DTYPES[case.dtype]).element_size()


def min_bytes(case: Case, pass_: str) -> int:
    """Byte model: the latent traffic a fused two-pass implementation cannot avoid. Forward: read
    each latent input once; backward: read them again and write the gradient once. Per-row
    ([B]) inputs and outputs are ignored (they are O(B))."""
    k = LATENT_INPUTS[case.op]
    n = k if pass_ == "fwd" else 2 * k + 1
    return n * case.numel * elt_bytes(case)


def backend_name(device: torch.device) -> str:
    return backends.for_device(device).name


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------
def make_inputs(case: Case, device: torch.device, seed: int = 0) -> dict:
    """Random inputs on ``device``; ``inp['x']`` is the tensor the gradient goes to."""
    g = torch.Generator(device=device).manual_seed(seed)
    B, dt = case.rows, DTYPES[case.dtype]
    shape = (B, *case.latent)
    rn = lambda: torch.randn(shape, generator=g, device=device)  # noqa: E731  (fp32, cast below)
    col = lambda v: v.reshape(B, *([1] * len(case.latent)))  # noqa: E731
    if case.op == "zo":
        tr = T.flow_grpo_sde(S.rf_sigmas(10, 3.0), noise_level=0.7)
        idx = torch.arange(B, device=device) % (tr.num_steps - 1)      # the 9 trained steps
        co = tr.coeffs(idx, torch.ones(B, dtype=torch.bool, device=device))
        f_old = rn()
        size = torch.logspace(-4, 0, B, device=device)                # small to large policy moves:
        f_theta = f_old + col(size / co.omega.clamp_min(1e-3)) * rn()   # both clipped and active rows
        inp = dict(f_theta=f_theta.to(dt), f_old=f_old.to(dt), z=rn().to(dt), f_ref=(f_old + 0.3 * rn()).to(dt),
                   adv=torch.randn(B, generator=g, device=device), co=co)
        inp["x"] = inp["f_theta"].requires_grad_()
    elif case.op == "score":
        s_ref = rn()
        inp = dict(s=(s_ref + 0.1 * rn()).to(dt), s_ref=s_ref.to(dt), s_old=(s_ref + 0.05 * rn()).to(dt),
                   psi=rn().to(dt), C1=torch.rand(B, generator=g, device=device) + 0.5,
                   gamma=torch.rand(B, generator=g, device=device), C2=torch.full((B,), SCORE_C2, device=device))
        inp["x"] = inp["s"].requires_grad_()
    elif case.op in ("nft", "awm"):
        x0, eps = rn(), rn()
        t = 0.05 + 0.9 * torch.rand(B, generator=g, device=device)
        v_old = (eps - x0) + 0.3 * rn()
        inp = dict(x0=x0.to(dt), eps=eps.to(dt), x_t=((1 - col(t)) * x0 + col(t) * eps).to(dt), t=t,
                   v=(v_old + 0.05 * rn()).to(dt), v_old=v_old.to(dt), v_ref=(v_old + 0.1 * rn()).to(dt),
                   v_ema=(v_old + 0.02 * rn()).to(dt), adv=2.0 * torch.randn(B, generator=g, device=device))
        inp["x"] = inp["v"].requires_grad_()
    else:
        raise ValueError(f"unknown op {case.op!r}")
    # d mean(loss) / d loss_b, precomputed (contiguous, fp32 like the row losses)
    inp["grad_out"] = torch.full((B,), 1.0 / B, device=device)
    return inp


# ---------------------------------------------------------------------------------------------
# The implementations
# ---------------------------------------------------------------------------------------------
def zo_reference(f_theta, f_old, z, f_ref, adv, co):
    return zo_row_loss(f_theta, f_old, z, adv, co, f_ref=f_ref, **ZO_KW).loss


def score_reference(s, s_ref, s_old, psi, C1, gamma, C2):
    return score_regression_loss(s, s_ref, s_old, psi, C1, gamma, C2)


def nft_reference(v, v_old, v_ref, x_t, x0, t, adv):
    return FP.nft_loss(v, v_old, v_ref, x_t, x0, t, adv, beta=1.0, kl_beta=1e-4)[0]


def awm_reference(v, eps, x0, t, adv, v_ref, v_ema):
    return FP.awm_loss(v, eps, x0, t, adv, v_ref=v_ref, v_ema=v_ema)[0]


def _args(op: str, inp: dict) -> tuple:
    if op == "nft":
        return inp["v"], inp["v_old"], inp["v_ref"], inp["x_t"], inp["x0"], inp["t"], inp["adv"]
    if op == "awm":
        return inp["v"], inp["eps"], inp["x0"], inp["t"], inp["adv"], inp["v_ref"], inp["v_ema"]
    if op == "zo":
        return inp["f_theta"], inp["f_old"], inp["z"], inp["f_ref"], inp["adv"], inp["co"]
    return inp["s"], inp["s_ref"], inp["s_old"], inp["psi"], inp["C1"], inp["gamma"], inp["C2"]


def loss_fns(case: Case, impls=IMPLS, check: bool = False, device: torch.device | None = None,
             reset: bool = True) -> dict[str, Callable]:
    """``{impl: fn(inp) -> [B] row losses}``. Building the compiled one resets Dynamo first (unless
    ``reset=False``), so every case gets its own compile and a grid never reaches the recompile
    limit (past it Dynamo silently runs the function eagerly)."""
    op = case.op
    ref = {"zo": zo_reference, "score": score_reference, "nft": nft_reference, "awm": awm_reference}[op]
    out: dict[str, Callable] = {}
    if "fused" in impls:
        if op == "nft":
            def fused(inp):
                v, vo, vr, xt, x0, t, adv = _args(op, inp)
                return ops.nft_loss(v, vo, vr, xt, x0, t, adv, beta=1.0, kl_beta=1e-4, check=check)[0]
        elif op == "awm":
            def fused(inp):
                v, eps, x0, t, adv, vr, ve = _args(op, inp)
                return ops.awm_loss(v, eps, x0, t, adv, v_ref=vr, v_ema=ve, check=check)[0]
        elif op == "zo":
            def fused(inp):
                ft, fo, z, fr, adv, co = _args(op, inp)
                return ops.zo_loss(ft, fo, z, adv, co, f_ref=fr, check=check, **ZO_KW).loss
        else:
            def fused(inp):
                return ops.score_loss(*_args(op, inp), check=check)
        out["fused"] = fused
    if "eager" in impls:
        out["eager"] = lambda inp: ref(*_args(op, inp))
    if "compiled" in impls:
        if reset:
            torch._dynamo.reset()
        if device is not None and device.type == "cpu":
            # lets torch.profiler see Inductor's C++ kernels (kernel counts on CPU); part of the cache key
            torch._inductor.config.cpp.enable_kernel_profile = True
        compiled = torch.compile(ref, dynamic=False)
        out["compiled"] = lambda inp: compiled(*_args(op, inp))
    return out


def make_step(loss_fn: Callable, inp: dict, pass_: str) -> Callable:
    """The timed callable: forward only, or forward + gradient w.r.t. ``inp['x']``."""
    if pass_ == "fwd":
        return lambda: loss_fn(inp)
    if pass_ != "fwd+bwd":
        raise ValueError(f"pass must be one of {PASSES}, got {pass_!r}")
    x, go = inp["x"], inp["grad_out"]

    def step():
        loss = loss_fn(inp)       # [B] row losses, or the forward-process losses' scalar mean
        return loss, torch.autograd.grad(loss, x, go if loss.dim() else None)[0]

    return step


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Median (and IQR) µs per call. CUDA: events around each call; CPU: perf_counter. With
    ``flush`` a buffer larger than the last-level cache is zeroed before each call (cold cache)."""

    def __init__(self, device: torch.device, flush: bool = True):
        self.device = device
        nbytes = (256 if device.type == "cuda" else 64) << 20
        self.cache = torch.empty(nbytes // 4, dtype=torch.int32, device=device) if flush else None

    def __call__(self, fn, warmup: int, repeats: int) -> tuple[float, float]:
        for _ in range(warmup):
            fn()
        sync(self.device)
        ts = []
        for _ in range(repeats):
            if self.cache is not None:
                self.cache.zero_()
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                ts.append(start.elapsed_time(end) * 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                ts.append((time.perf_counter() - t0) * 1e6)
        q = statistics.quantiles(ts, n=4) if len(ts) > 1 else [ts[0]] * 3
        return statistics.median(ts), q[2] - q[0]
