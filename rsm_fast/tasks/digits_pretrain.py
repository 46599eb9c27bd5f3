"""Reproduce the digits task's shipped checkpoints (rsm_fast/assets/digits/).

    python -m rsm_fast.tasks.digits_pretrain --what classifier --out rsm_fast/assets/digits --seed 0
    python -m rsm_fast.tasks.digits_pretrain --what ddpm --out rsm_fast/assets/digits --seed 0
    python -m rsm_fast.tasks.digits_pretrain --what flow --out rsm_fast/assets/digits --seed 0

Writes ``DIR/<what>.safetensors`` (config in its metadata) and merges provenance (command, seed,
steps, wall time, versions) and metrics into ``DIR/digits.json``. The generators are evaluated
with the classifier found in ``DIR`` (else the shipped one): class agreement of samples drawn by
the task's 20-step samplers (SDE and ODE) at several CFG scales. Train the classifier first.

Objectives: DDPM ``|eps_hat(x_t, t, y) - eps|^2`` with ``t ~ U{0..999}``; rectified flow
``|v_hat(x_t, 1000 t, y) - (eps - x0)|^2`` with ``t ~ U(0, 1)``; labels dropped to the null class
with probability 0.1 (classifier-free guidance, Ho & Salimans 2022). The shipped weights are an
EMA of the training weights (decay 0.999 with the usual (1+s)/(10+s) warm-up).
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import digits as D

DEFAULT_STEPS = {"classifier": 1500, "ddpm": 1500, "flow": 1500}
DEFAULT_BATCH = {"classifier": 128, "ddpm": 64, "flow": 64}
DEFAULT_LR = {"classifier": 2e-3, "ddpm": 2e-3, "flow": 2e-3}
LABEL_DROPOUT = 0.1
EMA_DECAY = 0.999
EVAL_CFG = (1.0, 3.0)


def _augment(x01: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Classifier augmentation: a random shift of up to 1 pixel (zero fill) and pixel noise 0.05."""
    B = x01.shape[0]
    pad = F.pad(x01, (1, 1, 1, 1))
    dx = torch.randint(0, 3, (B,), generator=gen)
    dy = torch.randint(0, 3, (B,), generator=gen)
    rows = (dy[:, None] + torch.arange(D.SIZE)[None])[:, None, :, None].expand(B, 1, D.SIZE, D.SIZE + 2)
    out = pad.gather(2, rows)
    cols = (dx[:, None] + torch.arange(D.SIZE)[None])[:, None, None, :].expand(B, 1, D.SIZE, D.SIZE)
    out = out.gather(3, cols)
    return (out + 0.05 * torch.randn(out.shape, generator=gen)).clamp(0, 1)


def _lr_at(step: int, steps: int, lr: float, warmup: int = 100) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    p = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def train_classifier(data: dict, steps: int, lr: float, batch: int, seed: int, log) -> tuple[D.DigitClassifier, dict]:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    clf = D.DigitClassifier()
    opt = torch.optim.AdamW(clf.parameters(), lr=lr, weight_decay=1e-4)
    x01, y = D.decode(data["train_x"]), data["train_y"]
    for s in range(steps):
        for g in opt.param_groups:
            g["lr"] = _lr_at(s, steps, lr)
        idx = torch.randint(0, x01.shape[0], (batch,), generator=gen)
        loss = F.cross_entropy(clf(_augment(x01[idx], gen)), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (s + 1) % 250 == 0:
            log(f"step {s + 1}/{steps} loss {loss.item():.4f}")
    clf.eval()
    metrics = {
        "heldout_accuracy": D.class_agreement(clf, D.decode(data["heldout_x"]), data["heldout_y"]),
        "train_accuracy": D.class_agreement(clf, x01, y),
        "heldout_size": int(data["heldout_y"].numel()),
    }
    return clf, metrics


def train_generator(family: str, data: dict, steps: int, lr: float, batch: int, seed: int, log):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    unet = D.make_unet()
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    ac = D.vp_alphas_cumprod().to(torch.float32)
    x_all, y_all = data["train_x"], data["train_y"]
    run = 0.0
    for s in range(steps):
        for g in opt.param_groups:
            g["lr"] = _lr_at(s, steps, lr)
        idx = torch.randint(0, x_all.shape[0], (batch,), generator=gen)
        x0, y = x_all[idx], y_all[idx].clone()
        y[torch.rand(batch, generator=gen) < LABEL_DROPOUT] = D.NULL_LABEL
        eps = torch.randn(x0.shape, generator=gen)
        if family == "ddim":
            t = torch.randint(0, D.NUM_TRAIN_TIMESTEPS, (batch,), generator=gen)
            ab = ac[t][:, None, None, None]
            xt = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
            target, t_in = eps, t.to(torch.float32)
        else:
            t = torch.rand(batch, generator=gen)
            tt = t[:, None, None, None]
            xt = (1 - tt) * x0 + tt * eps
            target, t_in = eps - x0, D.unet_timestep("flow", t)
        loss = F.mse_loss(unet(xt, t_in, class_labels=y).sample, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        d = min(EMA_DECAY, (1 + s) / (10 + s))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - d)
        run = 0.98 * run + 0.02 * loss.item() if s else loss.item()
        if (s + 1) % 250 == 0:
            log(f"step {s + 1}/{steps} loss(avg) {run:.4f}")
    return ema.eval(), {"final_loss_avg": run}


@torch.no_grad()
def evaluate_generator(family: str, unet, classifier, n_per_class: int = 20, seed: int = 1234) -> dict:
    """Class agreement of 20-step samples (the task's SDE and ODE samplers) at each CFG scale, and
    the wall time of one 32-image x 20-step CFG rollout by the plain loop."""
    out = {}
    labels = torch.arange(D.NUM_CLASSES).repeat_interleave(n_per_class)
    for mode in ("sde", "ode"):
        task = D.Digits(family, 20)
        for w in EVAL_CFG:
            gen = torch.Generator().manual_seed(seed)
            imgs = task.sample(unet, labels, gen, cfg_scale=w, stochastic=(mode == "sde"))
            out[f"class_agreement_{mode}_cfg{w:g}"] = round(D.class_agreement(classifier, imgs, labels), 4)
    task = D.Digits(family, 20)
    lab = torch.arange(32) % 10
    task.sample(unet, lab, torch.Generator().manual_seed(0))  # warm-up
    t0 = time.perf_counter()
    task.sample(unet, lab, torch.Generator().manual_seed(0))
    out["rollout_32x20_cfg_seconds"] = round(time.perf_counter() - t0, 3)
    out["eval_samples_per_setting"] = int(labels.numel())
    return out


def _save_grid(images: torch.Tensor, path: Path, nrow: int = 10) -> None:
    from PIL import Image

    B = images.shape[0]
    rows = math.ceil(B / nrow)
    grid = torch.zeros(rows * D.SIZE, nrow * D.SIZE)
    for i in range(B):
        r, c = divmod(i, nrow)
        grid[r * D.SIZE:(r + 1) * D.SIZE, c * D.SIZE:(c + 1) * D.SIZE] = images[i, 0]
    Image.fromarray((grid * 255).round().to(torch.uint8).numpy(), mode="L").resize(
        (nrow * D.SIZE * 2, rows * D.SIZE * 2), Image.NEAREST).save(path)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--what", required=True, choices=("ddpm", "flow", "classifier"))
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None, help=f"optimizer steps (default {DEFAULT_STEPS})")
    ap.add_argument("--batch", type=int, default=None, help=f"batch size (default {DEFAULT_BATCH})")
    ap.add_argument("--lr", type=float, default=None, help=f"peak learning rate (default {DEFAULT_LR})")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1: on a shared CPU, 2 threads under contention ran 6-20x slower)")
    ap.add_argument("--eval-per-class", type=int, default=20, help="samples per digit and setting in the evaluation")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    steps = a.steps or DEFAULT_STEPS[a.what]
    lr = a.lr or DEFAULT_LR[a.what]
    batch = a.batch or DEFAULT_BATCH[a.what]
    a.out.mkdir(parents=True, exist_ok=True)
    log = lambda m: print(f"[{a.what} {time.strftime('%H:%M:%S')}] {m}", flush=True)  # noqa: E731
    data = D.load_digits_split()
    tr_idx, ho_idx = D.split_indices(D.load_digits_images()[1])
    t0 = time.perf_counter()
    if a.what == "classifier":
        model, metrics = train_classifier(data, steps, lr, batch, a.seed, log)
        config = model.config
    else:
        family = "ddim" if a.what == "ddpm" else "flow"
        model, metrics = train_generator(family, data, steps, lr, batch, a.seed, log)
        config = {k: list(v) if isinstance(v, tuple) else v for k, v in D.UNET_CONFIG.items()}
    wall = time.perf_counter() - t0
    path = a.out / f"{a.what}.safetensors"
    D.save_checkpoint(model, path, config)
    if a.what != "classifier":
        clf_path = a.out / "classifier.safetensors"
        clf = D.load_classifier(clf_path if clf_path.exists() else None)
        unet = D.load_unet(path)  # evaluate what was written
        metrics.update(evaluate_generator(family, unet, clf, a.eval_per_class))
        task = D.Digits(family, 20)
        _save_grid(task.sample(unet, torch.arange(100) % 10, torch.Generator().manual_seed(0)),
                   a.out / f"samples_{a.what}.png")
    entry = {
        "command": "python -m rsm_fast.tasks.digits_pretrain " + " ".join(sys.argv[1:] if argv is None else argv),
        "seed": a.seed, "steps": steps, "batch": batch, "lr": lr, "wall_time_s": round(wall, 1),
        "params": sum(p.numel() for p in model.parameters()), "config": config, "metrics": metrics,
        "file_bytes": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "versions": {"torch": torch.__version__, "python": platform.python_version(),
                     "diffusers": __import__("diffusers").__version__, "threads": torch.get_num_threads()},
    }
    summary_path = a.out / "digits.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    summary["data"] = {"source": "sklearn.datasets.load_digits", "size": D.SIZE, "heldout_fraction": D.HELDOUT_FRACTION,
                       "split_seed": D.SPLIT_SEED, "train": int(tr_idx.numel()), "heldout": int(ho_idx.numel()),
                       "heldout_checksum": D.split_checksum(ho_idx)}
    summary[a.what] = entry
    summary_path.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    log(f"wrote {path} ({entry['file_bytes']} bytes) in {wall:.1f}s: {json.dumps(metrics)}")
    return entry


if __name__ == "__main__":
    main()
