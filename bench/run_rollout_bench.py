"""Rollout engine (graphed / eager) vs a diffusers-style per-step loop: ms per NFE, speedup, MFU.
Writes ``bench/results/rollout_<device>_<date>.{md,json}``.

    python bench/run_rollout_bench.py [--model tiny|sd35m] [--rows 1,2,8,24,48] [--out DIR] ...

Every number is measured by this script on the machine it runs on; what it cannot measure it says.
See bench/README.md ("Rollout engine") for what each implementation does.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from rsm_fast import schedules as S  # noqa: E402
from rsm_fast import transitions as T  # noqa: E402
from rsm_fast.engine.plan import PlanSpec, compile_plan  # noqa: E402
from rsm_fast.engine.rollout import RolloutEngine  # noqa: E402

COLUMNS = ("sampler", "plan", "rows", "cfg", "NFE", "graphed ms/NFE", "eager ms/NFE", "loop ms/NFE",
           "graphed vs loop", "eager vs loop", "MFU graphed", "MFU eager", "MFU loop")
IMPLS = ("graphed", "eager", "loop")
BRANCH_K = (6, 6, 8, 10, 0, 0, 0, 0, 0, 0)
NOT_MEASURED_ARCH = "not measured (needs diffusers)"


# ---------------------------------------------------------------------------------------------
# Models (adapter signature: model(x [B, C, H, W], t [B], cond [B, D]) -> [B, C, H, W])
# ---------------------------------------------------------------------------------------------
class TinyConv(nn.Module):
    """A small conditional conv net; overhead-bound on any device (its MFU means little)."""

    def __init__(self, ch=4, width=32, cond_dim=8):
        super().__init__()
        self.inp, self.out = nn.Conv2d(ch, width, 3, padding=1), nn.Conv2d(width, ch, 3, padding=1)
        self.mid = nn.Conv2d(width, width, 3, padding=1)
        self.emb = nn.Linear(cond_dim + 1, width)

    def forward(self, x, t, cond):
        e = self.emb(torch.cat([cond, t[:, None].to(cond.dtype)], 1))[:, :, None, None]
        h = torch.nn.functional.silu(self.inp(x) + e)
        return self.out(torch.nn.functional.silu(self.mid(h)))


def build_model(name: str, device, dtype):
    """(adapter, latent shape, cond_dim, note) or raises RuntimeError with the reason."""
    if name == "tiny":
        m = TinyConv().to(device, dtype).requires_grad_(False)
        return m, (4, 16, 16), 8, "tiny conv net (overhead-bound; MFU not meaningful)"
    if name == "sd35m":
        try:
            from diffusers import SD3Transformer2DModel
            from sd3_step import SD35M_CONFIG, TEXT_TOKENS
        except ImportError as e:
            raise RuntimeError(NOT_MEASURED_ARCH) from e
        with torch.device(device):
            tr = SD3Transformer2DModel(**SD35M_CONFIG).to(dtype).requires_grad_(False)
        enc = torch.randn(1, TEXT_TOKENS, 4096, device=device, dtype=dtype)

        def adapter(x, t, cond):  # cond [B, 2048] pooled; text tokens shared (one prompt embedding)
            return tr(hidden_states=x, encoder_hidden_states=enc.expand(x.shape[0], -1, -1), pooled_projections=cond,
                      timestep=t * 1000, return_dict=False)[0]
        return adapter, (16, 64, 64), 2048, "SD3.5-M transformer, random init, 512² latents"
    raise RuntimeError(f"unknown model {name!r}")


# ---------------------------------------------------------------------------------------------
# The diffusers-style loop (Flow-GRPO sde_step_with_logprob / ddpo ddim_step_with_logprob shape)
# ---------------------------------------------------------------------------------------------
def _model_cfg(model, x, t, cond, uncond, cfg):
    if cfg is None:
        return model(x, t, cond)
    out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, uncond.expand_as(cond)]))
    f_c, f_u = out.chunk(2)
    return f_u + cfg * (f_c - f_u)


def naive_rollout(model, kind: str, table, x, cond, uncond=None, cfg=None, noise=None, noise_level=0.7, eta=1.0,
                  plan=None):
    """Per step: Python float time from a host table, separate eager ops for mean and log-prob,
    host reads where peers do them. ``kind``: 'flow' (table = sigmas, N+1 host floats) or 'ddim'
    (table = (alphas_cumprod [T] CPU, timesteps list)). ``noise(i, B)`` -> z, default randn.
    ``plan``: a compiled branch plan (host) to follow with gathers; None = one row per trajectory."""
    dev = x.device
    steps = len(table) - 1 if kind == "flow" else len(table[1])
    logps = []
    for i in range(steps):
        B = x.shape[0]
        if kind == "flow":
            sigmas = table
            s, s_next = float(sigmas[i]), float(sigmas[i + 1])
            t = torch.full((B,), s, device=dev, dtype=x.dtype)
        else:
            ac, ts = table
            t = torch.full((B,), float(ts[i]), device=dev, dtype=x.dtype)
        rows_cond = cond if plan is None else cond.index_select(0, plan.group[i].to(dev))
        f = _model_cfg(model, x, t, rows_cond, uncond, cfg)
        if plan is not None:     # branching: children gather the parent, the mask comes from the host
            src = plan.src[i].to(dev)
            x, f = x.index_select(0, src), f.index_select(0, src)
            noisy = plan.noisy[i].to(dev)
            on = int(noisy.sum().item())
        else:
            noisy, on = None, 1
        z = torch.randn_like(x) if noise is None else noise(i, x.shape[0])
        if kind == "flow":
            sigma = torch.tensor(s, device=dev)
            sigma_max = float(torch.tensor(sigmas[1]).item())
            dt = s_next - s
            std_dev_t = torch.sqrt(sigma / (1 - torch.where(sigma == 1, torch.tensor(sigma_max, device=dev), sigma)))
            std_dev_t = std_dev_t * noise_level
            mean_sde = x * (1 + std_dev_t**2 / (2 * sigma) * dt) + f * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
            mean_ode = x + f * dt
            std = std_dev_t * math.sqrt(-dt)
        else:
            tt = torch.full((1,), int(ts[i]), device=dev)
            a_t = ac[tt.cpu()].to(dev, x.dtype)                  # CPU table indexed by a device timestep
            a_prev = (ac[torch.full((1,), int(ts[i + 1]), device=dev).cpu()].to(dev, x.dtype)
                      if i + 1 < len(ts) else torch.ones(1, device=dev, dtype=x.dtype))
            x0 = (x - (1 - a_t).sqrt() * f) / a_t.sqrt()
            var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
            std = eta * var.sqrt()
            mean_sde = a_prev.sqrt() * x0 + (1 - a_prev - std**2).clamp_min(0).sqrt() * f
            mean_ode = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * f
        if noisy is None:
            mean, std_r = mean_sde, std * torch.ones(x.shape[0], device=dev, dtype=x.dtype)
        else:
            m = noisy.view(-1, *[1] * (x.dim() - 1))
            mean, std_r = torch.where(m, mean_sde, mean_ode), torch.where(noisy, std, torch.zeros_like(std))
        std_b = std_r.view(-1, *[1] * (x.dim() - 1))
        x_next = mean + std_b * z
        if on:
            sb = std_b.clamp_min(1e-12)
            lp = -((x_next.detach() - mean) ** 2) / (2 * sb**2) - torch.log(sb) - math.log(math.sqrt(2 * math.pi))
            logps.append(lp.mean(dim=tuple(range(1, lp.dim()))))
        x = x_next
    return x, logps


# ---------------------------------------------------------------------------------------------
# Cases, timing, FLOPs
# ---------------------------------------------------------------------------------------------
def sampler(name: str):
    if name == "flow10":
        sig = S.rf_sigmas(10, 3.0)
        return T.flow_grpo_sde(sig, noise_level=0.7), "flow", [float(v) for v in sig]
    ts = S.ddim_timesteps(1000, 50)
    return (T.ddim(S.ddpm_linear_alphas_cumprod(), ts, eta=1.0), "ddim",
            (S.ddpm_linear_alphas_cumprod(), [int(v) for v in ts]))  # float64 host table


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device, warmup=1, repeats=3) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def matmul_tflops(device, dtype) -> float:
    n = 8192 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    ms = time_ms(lambda: a @ b, device, warmup=2, repeats=5)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def flops_per_row(model, latent, cond_dim, device, dtype) -> float:
    x, t, c = (torch.randn(2, *latent, device=device, dtype=dtype), torch.rand(2, device=device, dtype=dtype),
               torch.randn(2, cond_dim, device=device, dtype=dtype))
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(x, t, c)
    return fc.get_total_flops() / 2


def measure(model, latent, cond_dim, device, dtype, cases, impls=IMPLS, repeats=3, warmup=1, peak_tflops=None,
            flops_row=None, check_noise=False) -> list[dict]:
    """One row per case ``(sampler_name, plan_kind, rows, cfg)``. Keys: the case, ``nfe``,
    ``ms_<impl>`` (whole rollout), ``ms_nfe_<impl>``, ``x_<impl>`` (loop ms / impl ms), ``mfu_<impl>``,
    ``shape_<impl>`` (final samples), ``error_<impl>``; ``max_abs_diff`` (engine vs loop on the same
    noise) when ``check_noise`` and the plan is 'sde'."""
    out = []
    g = torch.Generator().manual_seed(0)
    uncond = torch.zeros(1, cond_dim, device=device, dtype=dtype)
    for sname, pkind, rows, cfg in cases:
        tr, kind, table = sampler(sname)
        N = tr.num_steps
        spec = (PlanSpec(kind="sde", num_steps=N, groups=rows, trunks=1) if pkind == "sde" else
                PlanSpec(kind="branch", num_steps=N, groups=1, trunks=rows, k=BRANCH_K[:N]))
        plan = compile_plan(spec)
        cond = torch.randn(spec.groups, cond_dim, generator=g).to(device, dtype)
        x_init = torch.randn(plan.rows[0], *latent, generator=g).to(device, dtype)
        r = dict(sampler=sname, plan=pkind, rows=rows, cfg=cfg, nfe=plan.nfe(cfg=cfg is not None)["total"])
        finals = {}
        for impl in impls:
            if impl == "graphed" and device.type != "cuda":
                r[f"error_{impl}"] = "n/a (CUDA only)"
                continue
            try:
                if impl == "loop":
                    loop_plan = None if pkind == "sde" else plan
                    fn = lambda: naive_rollout(model, kind, table, x_init, cond, uncond, cfg, plan=loop_plan)[0]  # noqa: E731
                else:
                    eng = RolloutEngine(model, tr, plan, seed=1, cfg_scale=cfg, device=device, dtype=dtype,
                                        graphs=impl == "graphed")
                    fn = lambda eng=eng: eng.run(x_init, cond, uncond).x0  # noqa: E731
                finals[impl] = fn()
                r[f"ms_{impl}"] = time_ms(fn, device, warmup, repeats)
                r[f"ms_nfe_{impl}"] = r[f"ms_{impl}"] / r["nfe"]
                r[f"shape_{impl}"] = list(finals[impl].shape)
                if peak_tflops and flops_row:
                    r[f"mfu_{impl}"] = flops_row * r["nfe"] / (r[f"ms_{impl}"] * 1e-3) / (peak_tflops * 1e12)
            except Exception as e:  # reported, never dropped silently
                r[f"error_{impl}"] = f"{type(e).__name__}: {e}"[:200]
        for impl in ("graphed", "eager"):
            if f"ms_{impl}" in r and "ms_loop" in r:
                r[f"x_{impl}"] = r["ms_loop"] / r[f"ms_{impl}"]
        if check_noise and pkind == "sde" and "eager" in impls:
            eng = RolloutEngine(model, tr, plan, seed=1, cfg_scale=cfg, device=device, dtype=dtype)
            from rsm_fast.engine import noise as NZ
            zf = lambda i, B: NZ.gaussian(eng.epoch_seed(0), eng.plan.key[i], i, latent, dtype=dtype, device=device)  # noqa: E731
            a = eng.run(x_init, cond, uncond).x0
            b = naive_rollout(model, kind, table, x_init, cond, uncond, cfg, noise=zf)[0]
            r["max_abs_diff"] = float((a - b).abs().max())
        out.append(r)
    return out


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def _f(v, spec=".3f", none="—"):
    return none if v is None else format(v, spec)


def table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cell = lambda i, k, s=".3f": r.get(f"error_{i}", "err") if f"{k}_{i}" not in r else _f(r[f"{k}_{i}"], s)  # noqa: E731
        lines.append("| " + " | ".join([r["sampler"], r["plan"], str(r["rows"]), "—" if r["cfg"] is None else str(r["cfg"]),
                                         str(r["nfe"]), cell("graphed", "ms_nfe"), cell("eager", "ms_nfe"),
                                         cell("loop", "ms_nfe"), _f(r.get("x_graphed"), ".2f") + "×",
                                         _f(r.get("x_eager"), ".2f") + "×", _f(r.get("mfu_graphed"), ".1%"),
                                         _f(r.get("mfu_eager"), ".1%"), _f(r.get("mfu_loop"), ".1%")]) + " |")
    return "\n".join(lines)


def headline(rows: list[dict], model_name: str) -> list[str]:
    """Targets (printed, never asserted): SD3.5-M class, graphed >= 2x loop at 1-2 rows, >= 1.1x at 24+."""
    out = []
    for label, sel, target in (("1–2 rows", lambda n: n <= 2, 2.0), ("24+ rows", lambda n: n >= 24, 1.1)):
        name = f"SD3.5-M graphed vs diffusers-style loop, {label}: target ≥ {target}×"
        if model_name != "sd35m":
            out.append(f"- {name}: not measured (this run's model is `{model_name}`)")
            continue
        xs = [r["x_graphed"] for r in rows if sel(r["rows"]) and r["plan"] == "sde" and "x_graphed" in r]
        if not xs:
            out.append(f"- {name}: not measured (no graphed cells)")
            continue
        out.append(f"- {name}: worst {min(xs):.2f}× → **{'PASS' if min(xs) >= target else 'FAIL'}**")
    return out


def markdown(env: dict, meta: dict, rows: list[dict], heads: list[str]) -> str:
    h = [f"# Rollout engine benchmark — {env['device']}", "",
         f"- date {env['date']}, git `{env['git']}`",
         f"- torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}, Python {env['python']}",
         f"- sampler_step backend: **{env['backend']}**; torch threads: {env['threads']}; dtype {meta['dtype']}",
         f"- model: **{meta['model']}** — {meta['model_note']}; latent {meta['latent']}; "
         f"{_f(meta['flops_row'], '.3g')} FLOP per row-evaluation (FlopCounterMode)",
         f"- loop: {meta['loop']}",
         f"- matmul rate {meta['peak_tflops']:.2f} TFLOP/s ({meta['matmul']}), the MFU denominator",
         f"- timing: whole rollout, median of {meta['repeats']} after {meta['warmup']} warm-up (graphs captured "
         f"in warm-up); ms/NFE = rollout ms ÷ row-evaluations (CFG counts both halves; padding not counted)",
         "", *heads, "", table(rows)]
    if meta["model"] == "tiny":
        h += ["", "The tiny model is overhead-bound: its MFU shows launch/host overhead, not model efficiency."]
    errs = [f"- {r['sampler']} {r['plan']} rows={r['rows']} cfg={r['cfg']} {k[6:]}: {v}"
            for r in rows for k, v in r.items() if k.startswith("error_") and not v.startswith("n/a")]
    if errs:
        h += ["", "## Errors", "", *errs]
    return "\n".join(h) + "\n"


def default_cases(rows_list, samplers=("flow10", "ddim50"), cfgs=(None, 4.5), branch_rows=1):
    cases = [(s, "sde", n, c) for s in samplers for c in cfgs for n in rows_list]
    if "flow10" in samplers:
        cases += [("flow10", "branch", branch_rows, c) for c in cfgs]
    return cases


def main(argv=None) -> int:
    from run_loss_bench import environment, slug
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("tiny", "sd35m"), default="tiny")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--rows", default="1,2,8,24,48")
    p.add_argument("--samplers", default="flow10,ddim50")
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--repeats", type=int, help="default 5 CUDA, 3 CPU")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--threads", type=int)
    a = p.parse_args(argv)
    device = torch.device(a.device)
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    env = environment(device)
    try:
        import diffusers  # noqa: F401
        loop = ("naive diffusers-style loop written here (diffusers is installed, but its scheduler loop is not "
                "wired in: this script's loop mirrors Flow-GRPO sde_step_with_logprob / ddpo ddim_step_with_logprob)")
    except ImportError:
        loop = ("naive diffusers-style loop written here (diffusers not installed); mirrors Flow-GRPO "
                "sde_step_with_logprob / ddpo ddim_step_with_logprob, randn noise")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"rollout_{slug(env['device'])}_{env['date']}"
    matmul_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    meta = dict(model=a.model, dtype=str(dtype).replace("torch.", ""), loop=loop, warmup=a.warmup,
                repeats=a.repeats or (5 if device.type == "cuda" else 3),
                peak_tflops=matmul_tflops(device, matmul_dtype),
                matmul=f"{'8192' if device.type == 'cuda' else '1024'}² {str(matmul_dtype).replace('torch.', '')}")
    try:
        model, latent, cond_dim, note = build_model(a.model, device, dtype)
    except RuntimeError as e:
        meta.update(model_note=str(e), latent="—", flops_row=None)
        heads = headline([], a.model)
        stem.with_suffix(".md").write_text(markdown(env, meta, [], heads) + f"\n{a.model}: {e}\n")
        stem.with_suffix(".json").write_text(json.dumps(dict(env=env, meta=meta, rows=[], headline=heads), indent=1))
        print(f"{a.model}: {e}; wrote {stem}.md")
        return 0
    meta.update(model_note=note, latent="×".join(map(str, latent)),
                flops_row=flops_per_row(model, latent, cond_dim, device, dtype))
    cases = default_cases([int(n) for n in a.rows.split(",")], tuple(a.samplers.split(",")))
    print(f"{env['device']} | torch {env['torch']} | {a.model} {meta['dtype']} | matmul {meta['peak_tflops']:.2f} "
          f"TFLOP/s | {len(cases)} cases -> {stem}.md", flush=True)
    t0 = time.perf_counter()
    rows = []
    for case in cases:
        rows += measure(model, latent, cond_dim, device, dtype, [case], tuple(a.impls.split(",")), meta["repeats"],
                        a.warmup, meta["peak_tflops"], meta["flops_row"])
        r = rows[-1]
        print(f"{r['sampler']:6s} {r['plan']:6s} rows {r['rows']:2d} cfg {str(r['cfg']):4s} ms/NFE: " +
              " ".join(f"{i} {_f(r.get('ms_nfe_' + i))}" for i in IMPLS) +
              f" | ×loop graphed {_f(r.get('x_graphed'), '.2f')} eager {_f(r.get('x_eager'), '.2f')}", flush=True)
    heads = headline(rows, a.model)
    stem.with_suffix(".md").write_text(markdown(env, meta, rows, heads))
    stem.with_suffix(".json").write_text(json.dumps(dict(env=env, meta=meta, rows=rows, headline=heads), indent=1))
    print("\n".join(["", *heads, f"done in {time.perf_counter() - t0:.0f} s", f"wrote {stem}.md and {stem}.json"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
