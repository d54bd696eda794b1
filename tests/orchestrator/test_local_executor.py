"""The local executor runs scripts as process groups and reports their ends to any
fm9g-launch process (through the <log>.rc file), like squeue/sacct would."""

from __future__ import annotations

from pathlib import Path

from fm9g.orchestrator.executors.local import LocalExecutor
from tests.helpers.runs import wait_for


def wait_state(executor: LocalExecutor, job_id: str, states: set[str], limit: float = 20.0) -> str:
    """The job's state once it is one of `states`."""
    return wait_for(
        lambda: (state := executor.poll([job_id])[job_id].state) in states and state,
        limit,
        f"job {job_id} to reach {sorted(states)}",
        interval=0.05,
    )


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
    job = executor.submit(
        script(tmp_path, 'echo "node=$SLURMD_NODENAME job=$SLURM_JOB_NAME"; exit 7'), log=log, tag="fm9g:t"
    )
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


def test_a_reused_pid_is_never_signalled(tmp_path: Path) -> None:
    """issue 18 #7: a recorded job id whose process is gone, now held by an unrelated
    process (pid reuse), reads as ended and is not signalled by cancel."""
    import subprocess

    bystander = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        executor = LocalExecutor()
        executor.adopt(str(bystander.pid), tmp_path / "old-job.out")  # the row names this pid
        status = executor.poll([str(bystander.pid)])[str(bystander.pid)]
        assert status.state.is_terminal  # not the job: it ended
        executor.cancel([str(bystander.pid)])
        assert bystander.poll() is None, "an unrelated process was signalled"
    finally:
        bystander.kill()
        bystander.wait()


def test_array_tasks_and_afterok_dependencies(tmp_path: Path) -> None:
    """An array runs every task with its SLURM_ARRAY_TASK_ID; a job afterok of a failed
    one is cancelled (DependencyNeverSatisfied), as Slurm's --kill-on-invalid-dep does."""
    tasks = tmp_path / "tasks.sh"
    tasks.write_text('echo "task $SLURM_ARRAY_TASK_ID"\n[ "$SLURM_ARRAY_TASK_ID" != 2 ] || exit "$FAIL"\n')
    merge = tmp_path / "merge.sh"
    merge.write_text("echo merged\n")
    for fail, array_state, merge_state in (("0", "COMPLETED", "COMPLETED"), ("3", "FAILED", "CANCELLED")):
        executor = LocalExecutor()
        array = executor.submit(tasks, log=tmp_path / f"a{fail}.out", tag="t", array=4, env={"FAIL": fail})
        after = executor.submit(merge, log=tmp_path / f"m{fail}.out", tag="t", after=[array])
        assert wait_state(executor, after, {"COMPLETED", "CANCELLED", "FAILED"}) == merge_state
        assert executor.poll([array])[array].state == array_state
        assert sorted((tmp_path / f"a{fail}.out").read_text().split("\n")[:4]) == [f"task {i}" for i in range(4)]
        assert ("merged" in (tmp_path / f"m{fail}.out").read_text()) == (merge_state == "COMPLETED")


def test_a_local_job_is_its_own_node(tmp_path: Path) -> None:
    """The node calls of an allocation, on a job that is one node: cancelling the node
    cancels the job; there is nothing to release."""
    executor = LocalExecutor()
    job = executor.submit(script(tmp_path, "sleep 300"), log=tmp_path / "n.out", tag="t")
    assert wait_state(executor, job, {"RUNNING"}) == "RUNNING"
    assert executor.release_node(job, "localhost") is False
    executor.cancel_node(job, "0")
    assert wait_state(executor, job, {"CANCELLED", "FAILED"}) in {"CANCELLED", "FAILED"}
