"""The local executor runs scripts as process groups and reports their ends to any
fm9g-launch process (through the <log>.rc file), like squeue/sacct would."""

from __future__ import annotations

from pathlib import Path

from fm9g.orchestrator.executors.local import LocalExecutor
from tests.helpers.runs import wait_for


def wait_state(executor: LocalExecutor, job_id: str, states: set[str], limit: float = 20.0) -> str:
    """The job's state once it is one of `states`."""
    return wait_for(lambda: (state := executor.poll([job_id])[job_id].state) in states and state, limit,
                    f"job {job_id} to reach {sorted(states)}", interval=0.05)


def gone(pid: int) -> bool:
    """The process has exited (it may linger as a zombie until its parent reaps it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][:1] == "Z"
    except (OSError, IndexError):
        return True


def script(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "job.sbatch"
    path.write_text("#!/bin/bash\n" + body + "\n")
    return path


def test_exit_codes_and_slurm_environment(tmp_path: Path) -> None:
    executor = LocalExecutor()
    log = tmp_path / "logs" / "job.out"
    job = executor.submit(script(tmp_path, 'echo "node=$SLURMD_NODENAME job=$SLURM_JOB_NAME"; exit 7'), log=log, tag="fm9g:t")
    assert wait_state(executor, job, {"FAILED"}) == "FAILED"
    assert executor.poll([job])[job].exit_code == 7
    assert "node=localhost job=fm9g:t" in log.read_text()
    # Another process (a fresh executor) sees the same end through the rc file.
    other = LocalExecutor()
    other.adopt(job, log)
    assert other.poll([job])[job].state == "FAILED"


def test_cancel_kills_the_whole_group(tmp_path: Path) -> None:
    executor = LocalExecutor()
    pid_file = tmp_path / "child.pid"
    job = executor.submit(script(tmp_path, f"sleep 300 & echo $! > {pid_file}; wait"), log=tmp_path / "a.out", tag="t")
    assert wait_state(executor, job, {"RUNNING"}) == "RUNNING"
    wait_for(lambda: pid_file.exists() and pid_file.read_text().strip(), 20, "the child's pid", interval=0.05)
    child = int(pid_file.read_text())
    executor.cancel([job])
    assert wait_state(executor, job, {"CANCELLED", "FAILED"}) in {"CANCELLED", "FAILED"}
    wait_for(lambda: not Path(f"/proc/{child}").exists() or gone(child), 10, f"the child {child} to die", interval=0.05)


def test_log_is_appended_not_truncated(tmp_path: Path) -> None:
    executor = LocalExecutor()
    log = tmp_path / "job.out"
    log.write_text("previous attempt\n")
    job = executor.submit(script(tmp_path, "echo second attempt"), log=log, tag="t")
    wait_state(executor, job, {"COMPLETED"})
    assert log.read_text() == "previous attempt\nsecond attempt\n"
