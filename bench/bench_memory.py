"""Peak memory (CPU RSS) and wall time of training under each precision / memory setting (issue 18).

Two workloads, every setting in its own fresh subprocess, so each peak is that setting's own
(``os.wait4`` returns the child's ``ru_maxrss``: the largest resident set the process reached,
model build included):

* **digits**: one training epoch of the digits task through the CLI a user runs,
  ``python -m rsm_fast.train --task digits-ddim --set train.batch_size=32 --set method.group_size=4
  --set task.num_steps=10 --set task.eval_samples=16 --set train.epochs=1 --set policy.dtype=... ...``
  (preset rsm-soft-zo, the CLI default; ``--out`` in a temporary folder). Wall = the whole process
  (imports, model load, the epoch, the final evaluation); the log's ``seconds_epoch`` is kept too.
* **sd35m**: one LoRA training step of a full-size SD3.5-Medium-architecture transformer
  (``rsm_fast.models.configs`` ``sd35m-full``: 24 layers, 24 x 64 heads, 2.24 B parameters) with
  random weights, built directly in ``policy.dtype`` (``torch.set_default_dtype``, so an fp32 copy
  never exists), LoRA rank 8 on to_q/to_k/to_v/to_out.0 via ``rsm_fast.models.lora.add_lora``
  (fp32 LoRA weights), 1 row of 16 x 64 x 64 latents (512 px), 205 text tokens (77 CLIP + 128 T5,
  Flow-GRPO's max_sequence_length; as bench/sd3_step.py) of random values instead of the
  CLIP/T5 encoders (they would not fit in this machine's RAM next to the transformer), then
  forward + fp32 MSE loss to a random target + backward + AdamW step (``runtime.make_optimizer``).
  The model is never run through the trainer, so the text encoders and VAE are not in the peak.

Settings: ``policy.dtype`` fp32 / bf16 x ``policy.gradient_checkpointing`` off / on, attention sdpa.
xformers and adamw8bit are listed as not measurable (CUDA-only packages, absent here).

Safety on a shared machine: a child whose RSS passes ``--cap-gib`` (default: available memory at
start minus 3 GiB) is killed by this script and the row says so (a lower bound, not a peak).

    python bench/bench_memory.py                      # both parts -> bench/results/memory_cpu_<date>.{md,json}
    python bench/bench_memory.py --parts digits       # one part
    python bench/bench_memory.py --rerun-failed bench/results/memory_cpu_<date>.json
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
GIB = 2**30

DIGITS_BASE = ["--task", "digits-ddim", "--set", "train.batch_size=32", "--set", "method.group_size=4",
               "--set", "task.num_steps=10", "--set", "task.eval_samples=16", "--set", "train.epochs=1",
               "--quiet"]
SETTINGS = [("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True)]
TEXT_TOKENS = 205
NOT_MEASURABLE = [
    {"setting": "policy.attention=xformers",
     "why": "not measurable on this machine: xformers is not installed and its kernels need CUDA "
            "(rsm_fast.models.runtime.set_attention_backend refuses it before a model loads)"},
    {"setting": "train.optimizer=adamw8bit",
     "why": "not measurable on this machine: bitsandbytes AdamW8bit is not installed and needs a CUDA device"},
    {"setting": "policy.dtype=fp16",
     "why": "not measured here: fp16 weights (no loss scaling) are meant for GPUs; the half-precision "
            "setting measured on this CPU is bf16"},
]


# ---------------------------------------------------------------------------------------------
# machine
# ---------------------------------------------------------------------------------------------
def machine() -> dict:
    try:
        from machine_info import cpu_model
    except ImportError:
        from bench.machine_info import cpu_model
    import psutil
    import torch

    vm = psutil.virtual_memory()
    return {"cpu": cpu_model(), "cpus": os.cpu_count(), "ram_gib": round(vm.total / GIB, 1),
            "available_gib_at_start": round(vm.available / GIB, 1), "loadavg_at_start": os.getloadavg(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "backend": "CPU (no GPU); torch " + torch.__version__ + ", " +
                       ("oneDNN bf16 (avx512_bf16)" if "avx512_bf16" in Path("/proc/cpuinfo").read_text() else "no avx512_bf16")}


def git_rev() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "rsm_fast"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return rev + ("+uncommitted rsm_fast changes" if dirty else "")
    except OSError:
        return "unknown"


def default_cap_gib() -> float:
    import psutil

    return max(2.0, psutil.virtual_memory().available / GIB - 3.0)


# ---------------------------------------------------------------------------------------------
# one measured child
# ---------------------------------------------------------------------------------------------
def run_measured(cmd: list[str], *, cap_gib: float, timeout_s: float, env: dict | None = None) -> dict:
    """Run ``cmd`` (a fresh process), poll its process tree's RSS, return peak RSS (``ru_maxrss`` of
    the child via ``os.wait4``, and the largest polled tree sum), wall seconds, exit status, output tail."""
    import psutil

    out = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True)
    proc = psutil.Process(p.pid)
    tree_peak, killed = 0, ""
    while True:
        pid, status, ru = os.wait4(p.pid, os.WNOHANG)
        if pid:
            break
        try:
            rss = proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))
        except psutil.Error:
            rss = 0
        tree_peak = max(tree_peak, rss)
        if not killed and rss > cap_gib * GIB:
            killed = f"killed by the bench: RSS {rss / GIB:.2f} GiB passed the cap {cap_gib:.1f} GiB (protecting the shared machine)"
            os.killpg(p.pid, signal.SIGKILL)
        elif not killed and time.perf_counter() - t0 > timeout_s:
            killed = f"killed by the bench after {timeout_s:.0f} s (timeout)"
            os.killpg(p.pid, signal.SIGKILL)
        time.sleep(0.1)
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    out.seek(0)
    text = out.read()
    out.close()
    os.unlink(out.name)
    return {"rc": p.returncode, "wall_s": round(wall, 2), "peak_rss_gib": round(ru.ru_maxrss * 1024 / GIB, 3),
            "tree_peak_rss_gib_polled": round(tree_peak / GIB, 3), "killed": killed,
            "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "output_tail": text[-3000:]}


def last_json_line(text: str) -> dict | None:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return None


def failure_text(res: dict) -> str:
    if res["killed"]:
        phases = [ln for ln in res["output_tail"].splitlines() if ln.startswith("phase:")]
        return res["killed"] + (f"; during {phases[-1][len('phase: '):]}" if phases else "")
    lines = [ln for ln in res["output_tail"].strip().splitlines() if ln.strip()]
    return f"exit {res['rc']}: " + (lines[-1][:400] if lines else "(no output)")


# ---------------------------------------------------------------------------------------------
# digits part
# ---------------------------------------------------------------------------------------------
def digits_cmd(dtype: str, ckpt: bool, out_dir: str) -> list[str]:
    return [sys.executable, "-m", "rsm_fast.train", *DIGITS_BASE, "--set", f"policy.dtype={dtype}",
            "--set", f"policy.gradient_checkpointing={'true' if ckpt else 'false'}",
            "--set", "policy.attention=sdpa", "--out", out_dir]


def measure_digits(dtype: str, ckpt: bool, cap_gib: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench_mem_digits_") as tmp:
        out_dir = os.path.join(tmp, "run")
        cmd = digits_cmd(dtype, ckpt, out_dir)
        res = run_measured(cmd, cap_gib=cap_gib, timeout_s=1800)
        row = {"part": "digits", "dtype": dtype, "gradient_checkpointing": ckpt, "attention": "sdpa",
               "command": shlex.join(["python", *cmd[1:]]).replace(out_dir, "$TMP/run"), **res}
        log = Path(out_dir) / "log.jsonl"
        if res["rc"] == 0 and log.is_file():
            rec = [json.loads(ln) for ln in log.read_text().splitlines() if ln.strip()]
            epochs = [r for r in rec if "seconds_epoch" in r]
            if epochs:
                row["seconds_epoch"] = epochs[-1]["seconds_epoch"]
                row["log_peak_memory_mb"] = epochs[-1].get("peak_memory_mb")
    row["status"] = "measured" if res["rc"] == 0 and not res["killed"] else "failed: " + failure_text(res)
    return row


# ---------------------------------------------------------------------------------------------
# SD3.5-M part: the child process
# ---------------------------------------------------------------------------------------------
def sd35m_child(dtype_name: str, ckpt: bool, attention: str, tokens: int, seed: int = 0) -> None:
    import resource

    import torch
    from diffusers import SD3Transformer2DModel

    from rsm_fast.models import lora as L
    from rsm_fast.models import runtime as R
    from rsm_fast.models.configs import get_config

    def rss_gib():
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, 3)

    rep = {"dtype": dtype_name, "gradient_checkpointing": ckpt, "attention": attention, "text_tokens": tokens}
    dtype = R.resolve_dtype(dtype_name)
    torch.manual_seed(seed)
    _, cfg = get_config("sd35m-full")
    t0 = time.perf_counter()
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)            # build straight in the weight dtype: no fp32 copy first
    try:
        model = SD3Transformer2DModel(**cfg["transformer"])
    finally:
        torch.set_default_dtype(prev)
    L.add_lora(model, rank=8)
    R.set_attention_backend(model, attention)
    R.set_gradient_checkpointing(model, ckpt)
    model.train()
    rep["params"] = sum(p.numel() for p in model.parameters())
    rep["lora_params"] = sum(p.numel() for p in L.lora_parameters(model))
    rep["build_s"] = round(time.perf_counter() - t0, 2)
    rep["peak_rss_after_build_gib"] = rss_gib()
    tc = cfg["transformer"]
    side = 512 // 8
    x = torch.randn(1, tc["in_channels"], side, side).to(dtype)
    enc = torch.randn(1, tokens, tc["joint_attention_dim"]).to(dtype)
    pooled = torch.randn(1, tc["pooled_projection_dim"]).to(dtype)
    t = torch.tensor([500.0])
    target = torch.randn(1, tc["out_channels"], side, side)
    opt = R.make_optimizer(L.lora_parameters(model), "adamw", lr=1e-4)
    print(f"phase: forward (built in {rep['build_s']} s, peak RSS so far {rep['peak_rss_after_build_gib']} GiB)", flush=True)
    t1 = time.perf_counter()
    out = model(hidden_states=x, encoder_hidden_states=enc, pooled_projections=pooled, timestep=t, return_dict=False)[0]
    loss = (out.float() - target).pow(2).mean()     # loss math in fp32, as the trainer's
    t2 = time.perf_counter()
    rep["peak_rss_after_forward_gib"] = rss_gib()
    print(f"phase: backward (forward {t2 - t1:.1f} s, peak RSS so far {rep['peak_rss_after_forward_gib']} GiB)", flush=True)
    loss.backward()
    t3 = time.perf_counter()
    opt.step()
    opt.zero_grad(set_to_none=True)
    t4 = time.perf_counter()
    rep.update(forward_s=round(t2 - t1, 2), backward_s=round(t3 - t2, 2), optimizer_s=round(t4 - t3, 2),
               step_s=round(t4 - t1, 2), loss=float(loss), finite=bool(torch.isfinite(loss)),
               peak_rss_gib_self=rss_gib(), threads=torch.get_num_threads())
    print(json.dumps(rep), flush=True)


def sd35m_cmd(dtype: str, ckpt: bool, tokens: int) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--sd35m-child", "--dtype", dtype,
            "--ckpt", "on" if ckpt else "off", "--attention", "sdpa", "--tokens", str(tokens)]


def measure_sd35m(dtype: str, ckpt: bool, cap_gib: float, tokens: int) -> dict:
    cmd = sd35m_cmd(dtype, ckpt, tokens)
    res = run_measured(cmd, cap_gib=cap_gib, timeout_s=2400)
    row = {"part": "sd35m", "dtype": dtype, "gradient_checkpointing": ckpt, "attention": "sdpa",
           "command": shlex.join(["python", "bench/bench_memory.py", *cmd[2:]]), **res}
    child = last_json_line(res["output_tail"]) if res["rc"] == 0 else None
    if child:
        row["child"] = child
    row["status"] = "measured" if child and not res["killed"] else "failed: " + failure_text(res)
    return row


# ---------------------------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------------------------
def _peak(r: dict) -> str:
    if r["status"] == "measured":
        return _gib(r["peak_rss_gib"])
    if "passed the cap" in (r.get("killed") or ""):
        return f"> {r['peak_rss_gib']:.2f} (killed at the cap)"
    return "—"


def _gib(v):
    return f"{v:.2f}" if isinstance(v, (int, float)) else "—"


def render(doc: dict) -> str:
    m = doc["machine"]
    lines = [f"# Peak memory (CPU RSS) per precision / memory setting — {doc['date']}", "",
             f"- backend: {m['backend']}; CPU: {m['cpu']}, {m['cpus']} cores, {m['ram_gib']} GiB RAM "
             f"({m['available_gib_at_start']} GiB available at start); Python {m['python']}; {m['platform']}",
             f"- machine load: load average {tuple(round(x, 2) for x in m['loadavg_at_start'])} at start"
             + "".join(f"; {tuple(round(x, 2) for x in c['machine']['loadavg_at_start'])} at the start of the later "
                       f"`--parts {c['parts']}` call" for c in doc.get("later_calls", []))
             + " (shared machine; other jobs were running, so wall times are noisy; per-row load in the tables)",
             f"- code: {doc['code']}; command: `{doc['command']}`"
             + "".join(f", then `{c}`" for c in doc.get("rerun_commands", [])),
             f"- peak RSS = `ru_maxrss` of the setting's own fresh process (`os.wait4`), build included; "
             f"a process passing the cap (available memory at start minus 3 GiB: {doc['cap_gib']:.1f} GiB in the first pass; "
             "a rerun's own cap is in its status) is killed and reported as a lower bound, not measured; "
             "`(rerun)` marks a row rerun once with `--rerun-failed` after the others", ""]
    dig = [r for r in doc["rows"] if r["part"] == "digits"]
    if dig:
        lines += ["## Digits task, one training epoch through the CLI", "",
                  "`python -m rsm_fast.train " + " ".join(DIGITS_BASE) +
                  " --set policy.dtype=D --set policy.gradient_checkpointing=G --set policy.attention=sdpa --out $TMP/run`"
                  " (preset rsm-soft-zo: 32 trajectories, groups of 4, 10 DDIM steps, 16 eval samples)", "",
                  "| policy.dtype | gradient ckpt | attention | peak RSS GiB | process wall s | epoch rollout / train s | load avg before | status |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in dig:
            se = r.get("seconds_epoch") or {}
            ep = f"{se['rollout']:.1f} / {se['train']:.1f}" if se else "—"
            ok = r["status"] == "measured"
            lines.append(f"| {r['dtype']} | {'on' if r['gradient_checkpointing'] else 'off'} | {r['attention']} | "
                         f"{_peak(r)} | {r['wall_s'] if ok else '—'} | {ep} | "
                         f"{r['loadavg_before'][0]:.2f} | {r['status']}{' (rerun)' if 'previous_failure' in r else ''} |")
        lines.append("")
        earlier = doc.get("earlier_digits_pass") or []
        if earlier:
            lines += ["An earlier pass of the same digits commands, at load average "
                      f"{min(r['loadavg_before'][0] for r in earlier):.1f}-{max(r['loadavg_before'][0] for r in earlier):.1f}, "
                      "measured peak RSS " + " / ".join(_gib(r["peak_rss_gib"]) for r in earlier) + " GiB and wall "
                      + " / ".join(str(r["wall_s"]) for r in earlier) + " s (same row order; JSON `earlier_digits_pass`): "
                      "the peaks agree within a few percent, the wall times show the load.", ""]
    sd = [r for r in doc["rows"] if r["part"] == "sd35m"]
    if sd:
        lines += ["## SD3.5-M-architecture transformer (random weights), one LoRA step, 1 row at 512 px", "",
                  f"`python bench/bench_memory.py --sd35m-child --dtype D --ckpt G --attention sdpa --tokens {doc['tokens']}`: "
                  "2.24 B-parameter `sd35m-full` transformer built in D, LoRA r=8 (to_q,k,v,out.0; fp32), "
                  f"{doc['tokens']} random text-embedding tokens (no CLIP/T5, no VAE), forward + fp32 MSE + backward + AdamW", "",
                  "| policy.dtype | gradient ckpt | attention | peak RSS GiB | RSS after build GiB | step s (fwd / bwd / opt) | build s | load avg before | status |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in sd:
            c = r.get("child") or {}
            ok = r["status"] == "measured"
            steps = f"{c['step_s']:.1f} ({c['forward_s']:.1f} / {c['backward_s']:.1f} / {c['optimizer_s']:.2f})" if c else "—"
            lines.append(f"| {r['dtype']} | {'on' if r['gradient_checkpointing'] else 'off'} | {r['attention']} | "
                         f"{_peak(r)} | {_gib(c.get('peak_rss_after_build_gib'))} | {steps} | "
                         f"{c.get('build_s', '—')} | {r['loadavg_before'][0]:.2f} | {r['status']}"
                         f"{' (rerun)' if 'previous_failure' in r else ''} |")
        lines.append("")
    lines += ["## Not measurable on this machine", ""]
    lines += [f"- `{n['setting']}`: {n['why']}" for n in doc["not_measurable"]]
    lines += ["", "Wall times are single runs on a loaded 2-core machine (no repetitions): they show the order of "
              "magnitude, not a timing claim. Every process ran with torch's default thread count (the 2 cores); "
              "on this loaded machine the throughput benchmark (`ranks_cpu_<date>.md`) measured a 2-thread process "
              "much slower than a 1-thread one, so these wall times are pessimistic. "
              "The JSON holds each row's command, exit status, output tail and load."]
    return "\n".join(lines) + "\n"


def write(doc: dict, stem: Path) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    stem.with_suffix(".md").write_text(render(doc))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="digits,sd35m", help="comma list of digits, sd35m")
    ap.add_argument("--settings", default="", help="subset, e.g. 'fp32:off,bf16:on' (default: all four)")
    ap.add_argument("--tokens", type=int, default=TEXT_TOKENS)
    ap.add_argument("--cap-gib", type=float, default=0.0, help="kill a child past this RSS (0 = available - 3 GiB)")
    ap.add_argument("--out", default="", help="results stem (default bench/results/memory_cpu_<date>)")
    ap.add_argument("--rerun-failed", default="", help="a results JSON: rerun its failed rows in place")
    ap.add_argument("--sd35m-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--ckpt", default="off", choices=("on", "off"))
    ap.add_argument("--attention", default="sdpa")
    a = ap.parse_args(argv)
    if a.sd35m_child:
        sd35m_child(a.dtype, a.ckpt == "on", a.attention, a.tokens)
        return 0
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    cap = a.cap_gib or default_cap_gib()
    if a.rerun_failed:
        path = Path(a.rerun_failed)
        doc = json.loads(path.read_text())
        doc.setdefault("rerun_commands", []).append(
            shlex.join(["python", "bench/bench_memory.py", *(argv if argv is not None else sys.argv[1:])]))
        doc["not_measurable"] = NOT_MEASURABLE
        for i, r in enumerate(doc["rows"]):
            if r["status"] != "measured":
                print(f"rerun {r['part']} {r['dtype']} ckpt={r['gradient_checkpointing']}", flush=True)
                new = (measure_digits(r["dtype"], r["gradient_checkpointing"], cap) if r["part"] == "digits"
                       else measure_sd35m(r["dtype"], r["gradient_checkpointing"], cap, doc["tokens"]))
                new["previous_failure"] = r["status"]
                doc["rows"][i] = new
                write(doc, path.with_suffix(""))
        print(render(doc))
        return 0
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    stem = Path(a.out) if a.out else RESULTS / f"memory_cpu_{date}"
    settings = SETTINGS
    if a.settings:
        want = {(s.split(":")[0], s.split(":")[1] == "on") for s in a.settings.split(",")}
        settings = [s for s in SETTINGS if s in want]
    doc = {"date": date, "machine": machine(), "code": git_rev(), "cap_gib": cap, "tokens": a.tokens,
           "command": shlex.join(["python", "bench/bench_memory.py", *(argv if argv is not None else sys.argv[1:])]),
           "not_measurable": NOT_MEASURABLE, "rows": []}
    if stem.with_suffix(".json").is_file():           # keep rows of the other part from an earlier call
        old = json.loads(stem.with_suffix(".json").read_text())
        doc["rows"] = [r for r in old.get("rows", []) if r["part"] not in a.parts.split(",")]
        if doc["rows"]:                                # the kept rows' commands stay on record
            doc["command"] = " ; ".join([old["command"], *old.get("rerun_commands", []), doc["command"]])
            doc["code"] = f"{old.get('code')}, then {doc['code']}"
            doc["later_calls"] = old.get("later_calls", []) + [{"parts": a.parts, "machine": doc["machine"], "cap_gib": cap}]
            doc["machine"], doc["cap_gib"] = old["machine"], old["cap_gib"]     # the first pass's
    for part in a.parts.split(","):
        for dtype, ckpt in settings:
            print(f"{part} dtype={dtype} ckpt={ckpt} ...", flush=True)
            row = (measure_digits(dtype, ckpt, cap) if part == "digits" else measure_sd35m(dtype, ckpt, cap, a.tokens))
            print(f"  -> {row['status']} peak {row['peak_rss_gib']} GiB wall {row['wall_s']} s", flush=True)
            doc["rows"].append(row)
            write(doc, stem)
    print(render(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
