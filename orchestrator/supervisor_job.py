"""The supervisor as a Slurm job (supervise.where: job).

`pretrain`/`sft` validate, plan and write the run directory on the login node as
always, then submit `templates/supervisor.sbatch.j2`: a 1-node CPU job whose batch shell
execs `python -m fm9g.orchestrator.supervisor_job RUN`, which supervises the run exactly
as `resume` does (same lock, same re-adoption of the jobs in state.db).

Continuity, two mechanisms:
- Walltime: the job is submitted with --signal=B:USR1@job_lead.  On USR1 it submits its
  successor (a plain job), records a `supervisor_handover` event, releases the lock and
  exits 0; the successor waits for the lock.  The training jobs never notice.
- A kill (scancel, node failure, crash): each supervisor job is submitted together with
  a guard (a guard that comes to run submits its own): the same script with
  --dependency=afternotok:<its id> --kill-on-invalid-dep=yes.
  Slurm itself starts the guard when the supervisor ends badly, and drops it when the
  supervisor exits 0 (the run ended, or it handed over).  Why this and not a heartbeat
  watched by the master node agent: the agent lives only while a training stage runs
  (no watcher during data stages, between generations, after training), and a watcher
  that submits jobs must itself be supervised.  A dependent job costs one pending queue
  entry and no resources, and Slurm keeps it however busy the cluster is.
  supervise.job_restarts caps the guards in a row, so a supervisor that crashes at
  start cannot loop forever.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
import time
from pathlib import Path

from fm9g.orchestrator.launch import LaunchError, SupervisorLock, say
from fm9g.orchestrator.render import render_template, sbatch_value
from fm9g.orchestrator.state import StateStore
from fm9g.rundir import RunDir
from fm9g.rundir.atomic import write_text
from fm9g.rundir.config import ConfigError, RunConfig
from fm9g.rundir.protocol import slug

EVENT_SUBMITTED = "supervisor_job"
EVENT_HANDOVER = "supervisor_handover"
EVENT_GUARD = "supervisor_guard"
EVENT_END = "supervisor_end"
# meta keys: the current supervisor job, and supervisor jobs in a row that did not end cleanly
META_JOB = "supervisor_job"
META_UNFINISHED = "supervisor_unfinished"

LOCK_WAIT_S = 900.0  # a successor waits this long for its predecessor to let go


class HandOver(Exception):
    """USR1 before the walltime: stop supervising and hand the run to a successor job.
    An Exception, not a KeyboardInterrupt, so `supervise` passes it up unhandled."""


def check(config: RunConfig) -> None:
    if config.supervise.where == "job" and config.executor != "slurm":
        raise ConfigError(
            f"supervise.where: job needs executor: slurm (this config has executor: {config.executor}); "
            "set supervise.where: login, or executor: slurm"
        )


def script_path(run: RunDir) -> Path:
    return run.root / "supervisor.sbatch"


def sbatch_flags(config: RunConfig, run: RunDir) -> list[str]:
    """#SBATCH options of a supervisor job, sorted; every value checked for sbatch's parser."""
    sup, cluster = config.supervise, config.cluster
    flags = {
        "--job-name": f"fm9g-{slug(run.name)}-supervisor",
        "--comment": f"fm9g:{slug(run.name)}:supervisor",
        "--nodes": "1",
        "--ntasks": "1",
        "--cpus-per-task": str(sup.job_cpus),
        "--time": sup.job_time,
        "--signal": f"B:USR1@{sup.job_lead}",
        "--open-mode": "append",
    }
    optional = {
        "--partition": sup.job_partition or cluster.partition,
        "--account": sup.job_account or cluster.account,
        "--qos": cluster.qos,
    }
    flags.update({key: str(value) for key, value in optional.items() if value is not None})
    names = {"--partition": "job_partition", "--account": "job_account", "--time": "job_time"}
    lines = [
        f"{key}={sbatch_value(value, 'supervise.' + names.get(key, key.lstrip('-')))}" for key, value in flags.items()
    ]
    lines.append("--no-requeue")  # the guard job owns restarts, never Slurm
    return sorted(lines)


def render_script(config: RunConfig, run: RunDir) -> str:
    return render_template("supervisor.sbatch.j2")(
        run_name=run.name,
        sbatch_flags=sbatch_flags(config, run),
        setup=config.cluster.setup,
        python=config.cluster.python or sys.executable,
        run_root=str(run.root),
    )


GUARD_ENV = "FM9G_SUPERVISOR_GUARD"  # "1" in a guard job's environment, "0" otherwise


def submit(config: RunConfig, run: RunDir, *, why: str) -> int:
    """Submit a supervisor job and, at once, its guard: no moment in which a scancel of
    the new job would leave the run without a supervisor to come."""
    job_id = _sbatch(config, run, guard=False)
    _record(run, EVENT_SUBMITTED, f"supervisor job {job_id} submitted ({why})", job_id=str(job_id), why=why)
    if config.supervise.job_restarts > 0:
        submit_guard(config, run, job_id)
    return job_id


def submit_guard(config: RunConfig, run: RunDir, job_id: int) -> int:
    """The same script, started by Slurm only if `job_id` ends badly (cancelled, killed,
    timed out, crashed) and dropped by Slurm when it exits 0."""
    guard = _sbatch(config, run, guard=True, extra=[f"--dependency=afternotok:{job_id}", "--kill-on-invalid-dep=yes"])
    _record(
        run,
        EVENT_GUARD,
        f"guard supervisor job {guard} waits on job {job_id} ending badly",
        job_id=str(guard),
        guards=str(job_id),
    )
    return guard


def _sbatch(config: RunConfig, run: RunDir, *, guard: bool, extra: list[str] | None = None) -> int:
    from fm9g.orchestrator.slurm.commands import SlurmClient

    path = script_path(run)
    write_text(path, render_script(config, run), mode=0o755)
    # --output on sbatch's argv, not an #SBATCH line: a run path may hold spaces.
    argv = [f"--output={run.supervisor_log}", *(extra or [])]
    # Set both ways: sbatch exports its own environment, and a guard submits plain jobs too.
    return SlurmClient().submit(path, extra_args=argv, env={GUARD_ENV: "1" if guard else "0"})


def _record(run: RunDir, kind: str, message: str, **data: str) -> None:
    store = StateStore(run.state_db)
    try:
        if kind == EVENT_SUBMITTED:
            store.set_meta(META_JOB, data["job_id"])
        store.event(kind, message, **data)
    finally:
        store.close()


def launch_job(config: RunConfig, run: RunDir) -> int:
    """From `pretrain`/`sft`: submit the first supervisor job and say how to follow it."""
    run.cancel_flag.unlink(missing_ok=True)  # a fresh launch is the user's word the run goes on
    job_id = submit(config, run, why="launch")
    where = shlex.quote(str(run.root))
    say(f"supervisor submitted as Slurm job {job_id} (supervise.where: job); log: {run.supervisor_log}")
    say(
        f"watch it: fm9g-launch status {where}   fm9g-launch tui {where}   fm9g-launch logs {where} --role supervisor -f"
    )
    say(f"stop the run: fm9g-launch cancel {where}")
    return 0


def _acquire(run: RunDir, wait_s: float) -> SupervisorLock:
    lock = SupervisorLock(run)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            lock.acquire()
            return lock
        except LaunchError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(2.0)


def _on_usr1(signum: int, frame: object) -> None:
    raise HandOver()


def main(run_root: str) -> int:
    from fm9g.orchestrator.launch import preflight, supervise
    from fm9g.orchestrator.plan import plan_run
    from fm9g.rundir import config as config_mod

    run = RunDir.of(Path(run_root))
    me = os.environ.get("SLURM_JOB_ID", "")
    config = config_mod.load_resolved(run.config)
    store = StateStore(run.state_db)
    try:
        unfinished = int(store.meta(META_UNFINISHED, 0) or 0)
        store.set_meta(META_JOB, me)
        store.set_meta(META_UNFINISHED, unfinished + 1)
        store.event(EVENT_SUBMITTED, f"supervisor job {me} started on {os.uname().nodename}", job_id=me, why="start")
    finally:
        store.close()
    if run.cancel_flag.exists():
        say("the run was cancelled (control/cancel): this supervisor job ends without supervising")
        return _end(run, "cancelled before start")
    signal.signal(signal.SIGUSR1, _on_usr1)
    # A plain supervisor job got its guard when it was submitted; a guard job that runs
    # (its supervisor ended badly) needs one of its own.
    if me and os.environ.get(GUARD_ENV) == "1":
        if unfinished < config.supervise.job_restarts:
            submit_guard(config, run, int(me))
        else:
            say(f"{unfinished} supervisor jobs in a row ended badly (supervise.job_restarts): no guard this time")
    lock: SupervisorLock | None = None
    try:
        lock = _acquire(run, LOCK_WAIT_S)
        for warning in preflight(config):
            say(f"warning: {warning}")
        rc = supervise(plan_run(config, run), progress=False)
        return _end(run, f"supervise returned {rc}")
    except HandOver:
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # one hand-over per job
        successor = submit(config, run, why=f"hand-over from job {me} before its walltime")
        store = StateStore(run.state_db)
        try:
            store.event(
                EVENT_HANDOVER,
                f"supervisor job {me} hands over to job {successor} before its walltime",
                job_id=me,
                successor=str(successor),
            )
            store.set_meta(META_UNFINISHED, 0)
        finally:
            store.close()
        return 0
    finally:
        if lock is not None:
            lock.release()


def _end(run: RunDir, why: str) -> int:
    """A clean end: exit 0 so Slurm drops the guard job."""
    store = StateStore(run.state_db)
    try:
        store.set_meta(META_UNFINISHED, 0)
        store.event(EVENT_END, f"supervisor job {os.environ.get('SLURM_JOB_ID', '')} ended: {why}")
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
