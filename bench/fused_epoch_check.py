"""The fused epoch against the unfused one on a real-architecture model: peak memory, time per epoch,
model evaluations, and the memory preflight's estimate of each (issue 21: "the fused epoch needs one
GPU check: rollout-with-grad memory and time on a real UNet").

    python bench/fused_epoch_check.py [--device cuda] [--model sd3-tiny] [--epochs 3] [--batch 8]
                                      [--steps 10] [--out DIR]

Two ``python -m rsm_fast.train`` runs of ``rsm-soft-fo`` (the preset the fused epoch serves: its
path sweep and first inner update differentiate the rollout's own graphs) that differ only in
``train.fused_epoch``, with a differentiable reward (``color:1,0,0``; random weights, so the reward
value means nothing). Per run: the peak memory over its epochs (the CUDA allocator's peak on a GPU,
the process's max RSS on a CPU, as the trainer logs it), the median seconds of the epochs after the
first (compiles and warm-up in the first), NFE by kind, and ``rsm_fast.preflight.check_memory``'s
estimate of the peak (with its "rollout graphs" part for the fused run). Writes
``DIR/fused_epoch_<device>.{md,json}``; ``python -m rsm_fast.gpucheck`` runs it as its ``fused`` stage.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PRESET, REWARD = "rsm-soft-fo", "color:1,0,0"


def sets(a, fused: bool) -> list[str]:
    return [f"train.device={a.device}", f"train.epochs={a.epochs}", f"train.batch_size={a.batch}",
            f"task.num_steps={a.steps}", "task.eval_samples=4", f"train.fused_epoch={str(fused).lower()}"]


def estimate(a, fused: bool) -> dict:
    from rsm_fast.config import build_config
    from rsm_fast.preflight import check_memory

    argv = ["task.name=diffusers", f"task.model={a.model}", f"task.reward={REWARD}", *sets(a, fused)]
    est = check_memory(build_config(PRESET, None, argv), a.device, available=1 << 62, host=1 << 62)
    if est is None:
        return {}
    return {"estimate_mb": round(est.total / 2**20, 1),
            "rollout_graphs_mb": round(est.train.get("rollout graphs", 0) / 2**20, 1)}


def run(a, fused: bool, work: Path) -> dict:
    out = work / f"run-{'fused' if fused else 'unfused'}"
    argv = [sys.executable, "-m", "rsm_fast.train", "--model", a.model, "--preset", PRESET, "--reward", REWARD,
            "--quiet", "--out", str(out)]
    for kv in sets(a, fused):
        argv += ["--set", kv]
    r = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"fused_epoch_check: the {'fused' if fused else 'unfused'} run failed (rc {r.returncode}): "
                         + (r.stderr.strip().splitlines() or ["?"])[-1])
    epochs = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines() if ln.strip()]
    epochs = [e for e in epochs if "peak_memory_mb" in e]
    secs = [sum(e["seconds_epoch"].values()) for e in epochs]
    summary = json.loads((out / "summary.json").read_text())
    return {"fused_epoch": fused, "peak_memory_mb": max(e["peak_memory_mb"] for e in epochs),
            "epoch_seconds": round(statistics.median(secs[1:] or secs), 4), "epochs": len(epochs),
            "nfe_by_kind": summary.get("nfe_by_kind"), "reward_mean": summary.get("reward_mean"),
            **estimate(a, fused)}


def markdown(a, rows: list[dict], device: str) -> str:
    lines = [f"# Fused vs unfused epoch, {PRESET} on {a.model} ({device})", "",
             f"- command: `python bench/fused_epoch_check.py --device {a.device} --model {a.model} --epochs {a.epochs} "
             f"--batch {a.batch} --steps {a.steps}`", f"- reward {REWARD} (random weights: its value means nothing)",
             "", "| train.fused_epoch | peak memory, MB | preflight estimate, MB | of it rollout graphs, MB | "
             "s per epoch | NFE by kind |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['fused_epoch']} | {r['peak_memory_mb']} | {r.get('estimate_mb', '-')} | "
                     f"{r.get('rollout_graphs_mb', '-')} | {r['epoch_seconds']} | {r['nfe_by_kind']} |")
    u, f = rows
    if not a.device.startswith("cuda"):
        lines += ["", "- on a CPU the peak is the process's max RSS, imports included: only a GPU's peaks compare"]
    lines += ["", f"- fused / unfused: peak memory {f['peak_memory_mb'] / u['peak_memory_mb']:.2f}x, time per epoch "
              f"{f['epoch_seconds'] / max(u['epoch_seconds'], 1e-9):.2f}x"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="sd3-tiny")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    a = p.parse_args(argv)
    if a.epochs < 1 or a.batch < 1 or a.steps < 2:
        p.error("--epochs and --batch must be >= 1, --steps >= 2")
    device = torch.cuda.get_device_name(0) if a.device.startswith("cuda") and torch.cuda.is_available() else a.device
    with tempfile.TemporaryDirectory(prefix="fused-epoch-") as tmp:
        rows = [run(a, False, Path(tmp)), run(a, True, Path(tmp))]
    a.out.mkdir(parents=True, exist_ok=True)
    slug = "".join(c if c.isalnum() else "-" for c in device.lower())
    md = markdown(a, rows, device)
    (a.out / f"fused_epoch_{slug}.md").write_text(md)
    (a.out / f"fused_epoch_{slug}.json").write_text(json.dumps({"device": device, "rows": rows}, indent=1))
    print(md, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
