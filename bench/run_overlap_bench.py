"""Reward/rollout overlap: epoch wall time with the reward scored after the rollout (``waves=1``)
against scoring each wave on a worker thread while the next wave samples (``waves=2, 4, 8``).

Setup: the digits task (``digits-ddim``, 20 DDIM steps, 32 samples in 8 groups of 4, grpo), its
images scored by a reward *server* in another process over HTTP (``rsm_fast.rewards.HttpReward``):
the server decodes the PNGs, JPEG-compresses each image (DDPO's compressibility score, -KB) and
then holds the reply for ``--per-image-ms`` per image, standing in for a reward model running on
another device (a GenEval/LLaVA server). The client-side PNG encoding, HTTP round trips and the
trainer's decode are real. Per setting the first epoch is a warm-up; the table reports medians over
the remaining epochs of the trainer's phase clock (``reward`` = the time the trainer *waited* for
scores after the last wave).

    python bench/run_overlap_bench.py                # writes bench/results/overlap_<device>_<date>.md/.json
    python bench/run_overlap_bench.py --epochs 3 --waves 1 4 --per-image-ms 10
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import platform
import statistics
import subprocess
import sys
import time
from datetime import date
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def serve(port: int, per_image_ms: float) -> None:
    """The reward server (run in a child process)."""
    import numpy as np
    from PIL import Image

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            scores = []
            for s in req["images"]:
                im = Image.open(io.BytesIO(base64.b64decode(s)))
                buf = io.BytesIO()
                Image.fromarray(np.asarray(im)).save(buf, format="JPEG", quality=95)
                scores.append(-buf.tell() / 1000.0)
            time.sleep(per_image_ms * len(scores) / 1000.0)
            body = json.dumps({"scores": scores}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    srv = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    print("ready", flush=True)
    srv.serve_forever()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(url: str, waves: int, epochs: int, threads: int, steps: int, batch: int, group: int) -> dict:
    from rsm_fast.config import build_config
    from rsm_fast.trainer import Trainer

    cfg = build_config("grpo", None, [
        "task.name=digits-ddim", f"task.num_steps={steps}", f"train.batch_size={batch}",
        f"method.group_size={group}", f"task.reward={url}", f"rollout.waves={waves}", f"train.threads={threads}",
        f"train.epochs={epochs}", "task.eval_samples=16"])
    tr = Trainer(cfg)
    rows = []
    try:
        for e in range(epochs):
            before = tr.clock.snapshot()
            t0 = time.perf_counter()
            tr.epoch()
            wall = time.perf_counter() - t0
            after = tr.clock.snapshot()
            if e == 0:
                continue                                   # warm-up: kernels, first connections
            rows.append({"wall": wall, **{k: after.get(k, 0.0) - before.get(k, 0.0)
                                          for k in ("rollout", "reward", "train")}})
    finally:
        tr.close()
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    return {"waves": waves, "epochs_timed": len(rows), **{f"{k}_s": round(v, 4) for k, v in med.items()},
            "wall_min_s": round(min(r["wall"] for r in rows), 4), "wall_max_s": round(max(r["wall"] for r in rows), 4)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--waves", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--epochs", type=int, default=6, help="epochs per setting (the first is a warm-up)")
    ap.add_argument("--per-image-ms", type=float, default=20.0, help="server-side model time per image")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads of the trainer")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--serve", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve:
        serve(args.serve, args.per_image_ms)
        return 0
    sys.path.insert(0, str(ROOT))
    import torch

    port = _free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--serve", str(port), "--per-image-ms", str(args.per_image_ms)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready", "reward server did not start"
        url = f"http://127.0.0.1:{port}/score"
        results = [measure(url, w, args.epochs, args.threads, args.steps, args.batch, args.group) for w in args.waves]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    base = results[0]["wall_s"]
    cpu = platform.processor() or platform.machine()
    head = {"device": f"cpu ({cpu}), {args.threads} torch thread(s)", "torch": torch.__version__,
            "python": platform.python_version(), "date": str(date.today()), "per_image_ms": args.per_image_ms,
            "task": f"digits-ddim, {args.steps} DDIM steps, {args.batch} samples in groups of {args.group}, grpo"}
    lines = [f"# Reward/rollout overlap — {head['device']}, {head['date']}", "",
             f"torch {head['torch']}, Python {head['python']}. {head['task']}; reward server in another process "
             f"(PNG over HTTP, JPEG score, {args.per_image_ms:g} ms per image of server-side model time). "
             f"Medians over {results[0]['epochs_timed']} epochs after one warm-up (`bench/run_overlap_bench.py`).", "",
             "| waves | epoch wall s | rollout s | reward wait s | train s | speed-up vs waves=1 | wall min–max s |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['waves']} | {r['wall_s']:.3f} | {r['rollout_s']:.3f} | {r['reward_s']:.3f} | "
                     f"{r['train_s']:.3f} | {base / r['wall_s']:.2f}× | {r['wall_min_s']:.3f}–{r['wall_max_s']:.3f} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"overlap_cpu_{head['date']}"
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    (out / f"{stem}.json").write_text(json.dumps({"header": head, "results": results}, indent=1) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
