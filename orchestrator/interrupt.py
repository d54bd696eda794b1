"""What Ctrl-C on a foreground supervisor means, by executor.

local: the jobs are processes of this machine that this command started, and people
expect Ctrl-C to stop what they started.  The first Ctrl-C raises control/checkpoint_now,
the path Slurm's walltime USR1 takes: every rank saves at its next step boundary and
exits, and the node agents exit with the continue code.  Jobs of the other stages
(index, tokenizer, convert, infer) are cancelled; the next run redoes what they had not
finished.  A second Ctrl-C (or no end within supervise.hang_timeout) kills every process
of every job at once: a checkpoint is written to a temporary folder and renamed, so the
last complete one survives.  Either way a last sweep leaves no process of the run alive,
and the same command run again resumes from the checkpoint.

slurm: the jobs belong to the cluster and run on without this terminal; Ctrl-C detaches
and says how to watch them again (`resume`) and how to stop them (`cancel`).

Both write an `interrupt` event, so what the Ctrl-C did is on the record.
"""

from __future__ import annotations

import shlex
import signal
import time
from collections.abc import Callable

from fm9g.orchestrator.executors.local import LocalExecutor, kill_processes, run_processes
from fm9g.orchestrator.jobs import JobTracker
from fm9g.orchestrator.plan import TRAIN, Plan
from fm9g.orchestrator.state import JobState, StageStatus, StateStore
from fm9g.rundir.atomic import write_json

Say = Callable[[str], None]
EVENT = "interrupt"
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a Ctrl-C'd command


def detach_on_interrupt(plan: Plan, say: Say) -> int:
    """Slurm: leave the jobs running, record it, and name `resume` and `cancel`."""
    run = plan.run
    where = shlex.quote(str(run.root))
    resume, cancel = f"fm9g-launch resume {where}", f"fm9g-launch cancel {where}"
    store = StateStore(run.state_db)
    try:
        live = [row.job_id for row in store.jobs(live_only=True) if row.job_id]
        store.event(
            EVENT, "Ctrl-C: detached; the jobs keep running", mode="detach", job_ids=live, resume=resume, cancel=cancel
        )
    finally:
        store.close()
    say(
        f"detached; the run's {len(live)} submitted job(s) keep running: `{resume}` watches them again, `{cancel}` stops them"
    )
    return EXIT_INTERRUPTED


def stop_on_interrupt(plan: Plan, say: Say, sleep: Callable[[float], None] = time.sleep) -> int:
    """Local: checkpoint and stop every job (a second Ctrl-C: kill them now); nothing of
    the run is left running when this returns."""
    run = plan.run
    store = StateStore(run.state_db)
    executor = LocalExecutor()
    tracker = JobTracker(run, store, executor, plan.renderer())
    mode = "checkpoint"
    try:
        try:
            ask_to_stop(plan, tracker, say)
            wait_for_ends(tracker, plan.config.supervise.hang_timeout, sleep)
        except (KeyboardInterrupt, TimeoutError) as why:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            mode = "kill"
            again = "Ctrl-C again" if isinstance(why, KeyboardInterrupt) else str(why)
            store.event(EVENT, f"{again}: killing every job now", mode=mode)
            say("stopping every job now")
        # A third Ctrl-C must not leave this half done: the rest takes a moment.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        # Whatever is still alive goes now: jobs that did not end, and any process of the
        # run no row knows of (one started just as the Ctrl-C arrived).
        leftover = run_processes(run.root)
        kill_processes(leftover)
        tracker.poll()
        for row in tracker.live_rows():
            store.update_job(row.id, state=JobState.CANCELLED, reason="killed (Ctrl-C)", ended_at=time.time())
        step = run.latest_step()
        where = f"checkpoint step {step}" if step is not None else "no checkpoint yet"
        for stage in store.stages():
            if stage.status is StageStatus.RUNNING:
                store.set_stage(stage.name, StageStatus.CANCELLED, detail=f"stopped by Ctrl-C ({where})")
        store.event(EVENT, f"stopped: {where}", mode=mode, step=step, killed=leftover)
        run.checkpoint_now_flag.unlink(missing_ok=True)
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        store.close()
    say(
        f"stopped ({where}); nothing of the run is running. Run the same command again, or "
        f"`fm9g-launch resume {shlex.quote(str(run.root))}`, to go on from there"
    )
    return EXIT_INTERRUPTED


def ask_to_stop(plan: Plan, tracker: JobTracker, say: Say) -> None:
    """Raise checkpoint_now for the training jobs; cancel the other stages' jobs."""
    live = tracker.live_rows()
    tracker.adopt(live)
    training = [row for row in live if row.stage == TRAIN]
    if training:
        write_json(plan.run.checkpoint_now_flag, {"time": time.time(), "reason": "Ctrl-C"})
        say("Ctrl-C: every rank checkpoints at its next step and stops (Ctrl-C again stops at once)")
    cancelled = tracker.cancel([row for row in live if row.stage != TRAIN], reason="interrupted (Ctrl-C)")
    tracker.store.event(
        EVENT,
        "Ctrl-C: checkpoint and stop",
        mode="checkpoint",
        job_ids=[row.job_id for row in training],
        cancelled=cancelled,
    )


def wait_for_ends(tracker: JobTracker, bound: float, sleep: Callable[[float], None]) -> None:
    """Poll until no job of the run is live; TimeoutError past `bound` seconds."""
    deadline = time.monotonic() + bound
    while tracker.live_rows():
        if time.monotonic() > deadline:
            raise TimeoutError(f"jobs still running after {bound:g}s (supervise.hang_timeout)")
        tracker.poll()
        sleep(0.2)
