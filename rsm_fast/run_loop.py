"""The run loop around :class:`~rsm_fast.trainer.Trainer`: epochs, held-out evaluations,
periodic checkpoints, exact resume and safe stops.

Per epoch: ``trainer.epoch()`` -> (every ``train.eval_every`` epochs) a held-out evaluation in
the epoch's record under ``eval`` -> the record appended to ``log.jsonl`` -> (every
``train.checkpoint_every`` epochs, and after the last) a checkpoint whose ``run.log_bytes`` is
the log's length at that point. After the last epoch: the final evaluation, ``checkpoint.pt``,
the exported LoRA and ``summary.json``.

**Resume.** ``run(..., resume=state)`` loads the trainer's state, truncates the log to the
checkpoint's position and continues with the next epoch, so the log holds every epoch once and
the run computes what the uninterrupted run computes: on the CPU the final weights, every logged
number but the timings (``seconds``, ``seconds_epoch``) and the process's ``peak_memory_mb``, and
the summary's NFE are identical (tests/test_resume.py).

**Stops** (:class:`~rsm_fast.interrupts.StopController`). A stop requested in the rollout or the
reward phase abandons the epoch: the cheap counters the phase moved (the trainer's generator,
torch's RNG, NFE, clock) are put back, so the checkpoint written then equals the one after the
previous epoch. A stop requested during the update waits for the epoch to finish (log record
included). A stop in the final evaluation needs no new checkpoint: the one after the last epoch
holds everything. The exception then reaches ``python -m rsm_fast.train``, which prints how to
resume and exits ``128 + signal``.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from . import checkpoint as C
from .config import to_dict
from .distributed import set_phase
from .interrupts import RunInterrupted, fault_point
from .rewards.secrets import redact_config
from .runlog import Progress

if TYPE_CHECKING:
    from .rundir import RunDir
    from .trainer import Trainer


def _state(trainer: "Trainer", run_dir: "RunDir", extra: dict) -> dict:
    """The trainer's state plus what the loop needs to continue (log position, wall-clock, before)."""
    return {**trainer.state_dict(), "run": {**extra, "log_bytes": run_dir.log_position()}}


def _export(trainer: "Trainer", path):
    """The task's adapter export (image models) with the EMA weights applied; None without one.
    FSDP2: every rank gathers the full weights (a collective), rank 0 exports them."""
    if not hasattr(trainer.task, "export"):
        return None
    with trainer._ema_applied():
        if not trainer.sharded:
            return trainer.task.export(path)
        from . import parallel as PAR

        full = PAR.full_state_dict(trainer.policy)
        return trainer.task.export(path, state_dict=full) if trainer.world.main else None


def _save(trainer: "Trainer", run_dir: "RunDir | None", extra: dict) -> None:
    """A checkpoint: rank 0 writes it; under FSDP2 every rank first writes its shards into a
    staging folder that rank 0 moves into the checkpoint before the atomic rename."""
    shards = None
    if trainer.sharded:
        shards = trainer.out_path / C.CKPT_DIR / f".tmp-shards-{trainer.epochs_done:06d}"
        trainer.save_shards(shards)
        trainer.world.barrier("checkpoint shards written")
    if run_dir is not None:
        C.save(run_dir, trainer.epochs_done, _state(trainer, run_dir, extra), keep=trainer.cfg.train.keep_checkpoints,
               export=None if trainer.sharded else (lambda path: _export(trainer, path)), fault=fault_point,
               shards=shards)
        run_dir.committed()
    if trainer.sharded:
        trainer.world.barrier("checkpoint written")


def run(trainer: "Trainer", run_dir: "RunDir | None" = None, *, progress: bool = True, stop=None,
        resume: dict | None = None, out=None) -> dict:
    """Train to ``train.epochs`` and evaluate; ``resume``: a checkpoint's state to continue from;
    ``stop``: the :class:`~rsm_fast.interrupts.StopController` (None: no signal handling). Several
    ranks: rank 0 alone has the ``run_dir``; ``out`` is its path on every rank (FSDP2 shards)."""
    cfg, tc = trainer.cfg, trainer.cfg.train
    trainer.stop = stop
    trainer.out_path = Path(out) if out is not None else (run_dir.path if run_dir is not None else None)
    if trainer.sharded and trainer.out_path is None:
        raise ValueError("an FSDP2 run needs its run directory's path on every rank (out=)")
    writes = run_dir is not None or trainer.sharded       # this rank takes part in checkpoints
    extra = {"before": None, "wall": 0.0}
    if resume is not None:
        trainer.load_state_dict(resume)
        extra.update({k: v for k, v in resume.get("run", {}).items() if k in ("before", "wall")})
    if run_dir is not None:
        run_dir.open(redact_config(to_dict(cfg)),
                     log_bytes=None if resume is None else int(resume["run"]["log_bytes"]))
    saved_at = trainer.epochs_done if resume is not None else None   # epoch of the newest checkpoint
    bar = Progress(tc.epochs, enabled=progress, start=trainer.epochs_done)
    t0 = time.perf_counter()

    def wall() -> float:
        return round(float(extra["wall"]) + time.perf_counter() - t0, 4)

    ok, snap = False, None
    try:
        if tc.eval_before and extra["before"] is None:
            with trainer.abandonable():
                extra["before"] = trainer.evaluate()
        while trainer.epochs_done < tc.epochs:
            set_phase(f"epoch {trainer.epochs_done}")    # several ranks: named in a failed collective
            snap = trainer.snapshot()
            fault_point("epoch-start")
            stats = trainer.epoch()
            snap = None
            fault_point("after-epoch")
            done = trainer.epochs_done
            if tc.eval_every and done % tc.eval_every == 0 and done < tc.epochs:
                stats["eval"] = trainer.evaluate()
            rec = {"epoch": done - 1, **stats, "nfe": trainer.nfe_total(), "seconds": trainer.clock.snapshot()}
            if run_dir is not None:
                run_dir.log(rec)
                fault_point("after-log")
            if writes and ((tc.checkpoint_every and done % tc.checkpoint_every == 0) or done == tc.epochs):
                _save(trainer, run_dir, {**extra, "wall": wall()})
                saved_at = done
            bar.update(done, f"skipped: {stats['skipped']}" if "skipped" in stats else
                       f"reward {stats['reward_mean']:.3f} kl {stats['kl']:.3f}")
            trainer.check_stop()        # several ranks: agreed by all
        set_phase("final evaluation")
        with trainer.abandonable():
            fault_point("final-eval")
            final = trainer.evaluate()
        summary = trainer.summary(final, wall())
        if extra["before"] is not None:
            summary["before"] = extra["before"]
        exported = _export(trainer, trainer.out_path / "lora") if trainer.sharded else None
        if run_dir is not None:
            run_dir.save_checkpoint(_state(trainer, run_dir, {**extra, "wall": wall()}))
            if not trainer.sharded:
                exported = _export(trainer, run_dir.path / "lora")
            if exported is not None:
                run_dir.own("lora")
                summary["lora"] = str(exported)
            fault_point("summary")
            run_dir.write_summary(summary)
        ok = True
    except RunInterrupted:
        if snap is not None:        # abandoned inside an epoch: back to its start
            trainer.restore(snap)
        if writes and saved_at != trainer.epochs_done:
            _save(trainer, run_dir, {**extra, "wall": wall()})
        raise
    finally:
        trainer.close()
        trainer.stop = None
        if run_dir is not None:
            run_dir.close(ok=ok or run_dir.has_checkpoint())
    return summary
