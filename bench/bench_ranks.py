"""Training throughput at 1 process vs 2 ranks (torchrun, gloo) on CPU (issue 18, must-show 3).

Each cell is one fresh run of the CLI a user types, the same global batch in both columns:

* 1 process: ``python -m rsm_fast.train ARGS --out $TMP/run``
* 2 ranks:   ``python -m torch.distributed.run --standalone --nproc_per_node 2 -m rsm_fast.train ARGS --out $TMP/run``

Workloads (ARGS):

* **toy2d**: ``--preset rsm-soft-zo --set train.epochs=20 --set train.batch_size=512
  --set method.group_size=16 --set train.threads=1``. ``method.group_size=16`` because the
  preset's group_size 0 makes the whole batch one group, which cannot be split over 2 ranks
  (the trainer gives each rank whole groups); the 1-process run uses the same 32 groups.
* **digits**: ``--task digits-ddim --set train.batch_size=32 --set method.group_size=4
  --set task.num_steps=10 --set task.eval_samples=16 --set train.epochs=2 --set train.threads=1``.

``train.threads=1`` in both columns (torchrun's default OMP_NUM_THREADS for several ranks is 1
too), so 2 ranks use the 2 cores and 1 process uses one; an extra 1-process row with
``train.threads=2`` shows what one process gets from both cores.

samples/s = trajectories per epoch (``train.batch_size``) x epochs / training seconds, where the
training seconds are the sum over epochs of rank 0's ``seconds_epoch`` in ``<out>/log.jsonl``
(rollout + reward + train + alloc: model load, the final evaluation and process start excluded).

    python bench/bench_ranks.py          # -> bench/results/ranks_cpu_<date>.{md,json}
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_memory import RESULTS, failure_text, git_rev, machine, run_measured  # noqa: E402

WORKLOADS = {
    "toy2d": ["--preset", "rsm-soft-zo", "--set", "train.epochs=20", "--set", "train.batch_size=512",
              "--set", "method.group_size=16"],
    "digits": ["--task", "digits-ddim", "--set", "train.batch_size=32", "--set", "method.group_size=4",
               "--set", "task.num_steps=10", "--set", "task.eval_samples=16", "--set", "train.epochs=2"],
}
CELLS = [("1 process", 1, 1), ("2 ranks (torchrun)", 2, 1), ("1 process", 1, 2)]
REPEATS = {"toy2d": 3, "digits": 3}      # median of 3 fresh runs per cell


def command(workload: str, ranks: int, threads: int, out_dir: str) -> list[str]:
    args = [*WORKLOADS[workload], "--set", f"train.threads={threads}", "--quiet", "--out", out_dir]
    if ranks == 1:
        return [sys.executable, "-m", "rsm_fast.train", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
            "-m", "rsm_fast.train", *args]


def measure(workload: str, label: str, ranks: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench_ranks_") as tmp:
        out_dir = str(Path(tmp) / "run")
        cmd = command(workload, ranks, threads, out_dir)
        res = run_measured(cmd, cap_gib=8.0, timeout_s=3600)
        row = {"workload": workload, "label": label, "ranks": ranks, "threads_per_rank": threads,
               "command": shlex.join(["python", *cmd[1:]]).replace(out_dir, "$TMP/run"),
               **{k: v for k, v in res.items() if k != "output_tail"}, "output_tail": res["output_tail"][-1500:]}
        log, summ = Path(out_dir) / "log.jsonl", Path(out_dir) / "summary.json"
        if res["rc"] == 0 and log.is_file() and summ.is_file():
            recs = [json.loads(ln) for ln in log.read_text().splitlines() if ln.strip()]
            epochs = [r for r in recs if "seconds_epoch" in r]
            cfg_batch = {"toy2d": 512, "digits": 32}[workload]
            train_s = sum(sum(r["seconds_epoch"].values()) for r in epochs)
            s = json.loads(summ.read_text())
            row.update(epochs=len(epochs), batch_size=cfg_batch, train_seconds=round(train_s, 3),
                       samples_per_s=round(cfg_batch * len(epochs) / train_s, 2) if train_s > 0 else None,
                       summary_seconds=s.get("seconds"), reward_mean=s.get("reward_mean"))
            row["status"] = "measured"
        else:
            row["status"] = "failed: " + failure_text(res)
    return row


def render(doc: dict) -> str:
    m = doc["machine"]
    lines = [f"# Training throughput, 1 process vs 2 ranks (torchrun, gloo), CPU — {doc['date']}", "",
             f"- backend: CPU, torch.distributed gloo (2 ranks) / plain process (1); torch {m['torch']}; "
             f"CPU: {m['cpu']}, {m['cpus']} cores, {m['ram_gib']} GiB RAM; Python {m['python']}",
             f"- machine load: load average {tuple(round(x, 2) for x in m['loadavg_at_start'])} at start "
             "(shared machine, other jobs running; per-row load in the table)",
             f"- code: {doc['code']}; commands: " + ", then ".join(f"`{c}`" for c in doc["commands"]),
             "- samples/s = train.batch_size x epochs / sum of rank 0's per-epoch `seconds_epoch` "
             "(log.jsonl; excludes start-up, model load and the final evaluation). Median of the fresh runs "
             "of a cell (each listed in `runs/s`; all in the JSON, `repeats`).",
             "- **Caveat**: 2 ranks on a 2-core machine measure the overhead and scaling of *this* machine "
             "(gloo collectives, two processes sharing two cores with other jobs), not what 2 GPUs or 2 nodes give.",
             *[f"- {n}" for n in doc.get("notes", [])], ""]
    for w in WORKLOADS:
        rows = [r for r in doc["rows"] if r["workload"] == w]
        if not rows:
            continue
        lines += [f"## {w}", "", "`python -m rsm_fast.train " + " ".join(WORKLOADS[w]) +
                  " --set train.threads=T --quiet --out $TMP/run` (2 ranks: `python -m torch.distributed.run "
                  "--standalone --nproc_per_node=2 -m rsm_fast.train ...`)", "",
                  "| run | threads/rank | epochs x batch | training s | samples/s | runs/s (each repeat) | vs 1 process, 1 thread | process wall s | load avg before | status |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        base = next((r for r in rows if r["ranks"] == 1 and r["threads_per_rank"] == 1 and r["status"] == "measured"), None)
        for r in rows:
            ok = r["status"] == "measured"
            ratio = (f"{r['samples_per_s'] / base['samples_per_s']:.2f}x" if ok and base and base["samples_per_s"] else "—")
            lines.append(f"| {r['label']} | {r['threads_per_rank']} | "
                         f"{(str(r['epochs']) + ' x ' + str(r['batch_size'])) if ok else '—'} | "
                         f"{r['train_seconds'] if ok else '—'} | {r['samples_per_s'] if ok else '—'} | "
                         f"{', '.join(str(x['samples_per_s']) for x in r.get('repeats', [])) or '—'} | {ratio} | "
                         f"{r['wall_s']} | {r['loadavg_before'][0]:.2f} | {r['status']} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", default="toy2d,digits")
    ap.add_argument("--out", default="")
    a = ap.parse_args(argv)
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    stem = Path(a.out) if a.out else RESULTS / f"ranks_cpu_{date}"
    doc = {"date": date, "machine": machine(), "code": git_rev(),
           "commands": [shlex.join(["python", "bench/bench_ranks.py", *(argv if argv is not None else sys.argv[1:])])],
           "rows": []}
    if stem.with_suffix(".json").is_file():           # keep the other workloads' rows from an earlier call
        old = json.loads(stem.with_suffix(".json").read_text())
        kept = [r for r in old.get("rows", []) if r["workload"] not in a.workloads.split(",")]
        if kept:
            doc["rows"] = kept
            doc["commands"] = old.get("commands", [old.get("command", "")]) + doc["commands"]
            doc["code"] = f"{old.get('code')} (rows of {', '.join(sorted({r['workload'] for r in kept}))}), then {doc['code']}"
    for w in a.workloads.split(","):
        for label, ranks, threads in CELLS:
            print(f"{w}: {label}, threads {threads} ...", flush=True)
            runs = [measure(w, label, ranks, threads) for _ in range(REPEATS[w])]
            ok = sorted((r for r in runs if r["status"] == "measured"), key=lambda r: r["samples_per_s"])
            row = dict(ok[len(ok) // 2] if ok else runs[-1])      # the median run (or the last failure)
            row["repeats"] = [{k: r.get(k) for k in ("status", "samples_per_s", "train_seconds", "wall_s",
                                                     "loadavg_before")} for r in runs]
            print(f"  -> {row['status']} samples/s {row.get('samples_per_s')} wall {row['wall_s']} s", flush=True)
            doc["rows"].append(row)
            stem.parent.mkdir(parents=True, exist_ok=True)
            stem.with_suffix(".json").write_text(json.dumps(doc, indent=1))
            stem.with_suffix(".md").write_text(render(doc))
    print(render(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
