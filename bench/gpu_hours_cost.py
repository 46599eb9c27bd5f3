"""Forward-equivalents in the GPU-hours benchmark (issue 20, item 4): the per-epoch columns
bench/gpu_hours.py records and the table notes bench/gpu_hours_report.py writes.

A run's forward-equivalents = training NFE + its scored samples x (decode + reward FLOPs) / FLOPs of
one denoiser forward (+ the samples whose decode + reward were differentiated x their forward +
backward FLOPs), with the FLOP prices of :mod:`rsm_fast.cost`. Rows of a CSV written before these
columns, or of a reward with no price (a server, ``module:function``), have ``fe`` NaN: the tables
print "unknown" there instead of a number.
"""
from __future__ import annotations

import math

from rsm_fast.cost import Prices, forward_equivalents, price

COLUMNS = ("scored", "scored_grad", "fe")      # appended to the per-epoch CSV (old CSVs lack them)


def run_prices(cfg, reward: str | None = None) -> Prices:
    """The prices of one run's config (``reward``: the trainer's resolved spec, else the config's)."""
    return price(cfg.task, reward, cfg.policy)


def cost_columns(tr, prices: Prices) -> dict:
    """This trainer's cumulative scored samples (training only, as ``Trainer.nfe_total`` excludes
    evaluation) and forward-equivalents so far."""
    s, g = tr.scored["reward"], tr.scored["reward_grad"]
    return {"scored": s, "scored_grad": g, "fe": round(forward_equivalents(tr.nfe_total(), s, prices, g), 3)}


def fe_of(row: dict) -> float:
    """A row's forward-equivalents (NaN when unknown: an older CSV, or an unpriced reward)."""
    v = row.get("fe", math.nan)
    return math.nan if v is None or v == "" else float(v)


def _flops(v) -> str:
    return "unknown" if v is None or (isinstance(v, float) and math.isnan(v)) else "0" if v == 0 else f"{float(v):.4g}"


def prices_note(meta: dict) -> list[str]:
    """Markdown bullets stating the prices the forward-equivalent columns used (or that they are unknown)."""
    prices = meta.get("prices")
    if not prices:
        return ["- Forward-equivalents: **unknown** for these runs (their CSV predates the scored-sample and "
                "forward-equivalent columns, rsm_fast/cost.py): the forward-equivalent columns say 'unknown'."]
    uniq: dict[str, list[str]] = {}
    for label, d in prices.items():
        p = Prices.from_dict(d)
        per = p.scored_flops / p.fwd_flops
        grad = p.grad_flops / p.fwd_flops
        text = (f"{p.task} / reward `{p.reward}`: denoiser forward {_flops(p.fwd_flops)} FLOPs, decode "
                f"{_flops(p.decode_flops)}, reward {_flops(p.reward_flops)} per scored sample "
                f"(= {_flops(per)} forwards; a reward gradient, decode + reward fwd+bwd, = {_flops(grad)} forwards)."
                f" Source: {p.source}")
        uniq.setdefault(text, []).append(label)
    lines = ["- Forward-equivalents (fwd-equiv) = training NFE + scored samples × (decode + reward FLOPs) / "
             "denoiser-forward FLOPs + reward-gradient samples × (decode + reward forward+backward FLOPs) / "
             "denoiser-forward FLOPs, counting the samples the trainer decoded and scored (`Trainer.scored`; "
             "evaluation excluded, like eval NFE). Prices (rsm_fast/cost.py):"]
    for text, labels in uniq.items():
        who = "" if len(uniq) == 1 else f" [{', '.join(labels)}]"
        lines.append(f"  - {text}{who}")
    return lines
