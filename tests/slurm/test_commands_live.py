"""SlurmClient against the real test cluster (tests/cluster/up.sh): submit, poll with
squeue and sacct, cancel, requeue, and the errors sbatch gives.  Skipped when
`scontrol ping` fails.  Waits are bounded by a number of polls; no test asserts on
how long anything took."""

from __future__ import annotations

import getpass
import os
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import TypeVar

import pytest

from fm9g.orchestrator.slurm.commands import SlurmClient, SlurmError, SubmitError
from fm9g.orchestrator.slurm.states import JobState
from tests.helpers import scontrol

pytestmark = pytest.mark.cluster

T = TypeVar("T")
ACTIVE_OR_DONE = {
    JobState.PENDING,
    JobState.CONFIGURING,
    JobState.RUNNING,
    JobState.COMPLETING,
    JobState.COMPLETED,
}


def eventually(probe: Callable[[], T | None | bool], what: str, polls: int = 120) -> T:
    """Poll `probe` every half second until it returns a truthy value; fail naming `what`."""
    for _ in range(polls):
        value = probe()
        if value:
            return value  # type: ignore[return-value]
        time.sleep(0.5)
    pytest.fail(f"gave up waiting for {what} after {polls} polls")


def write_script(directory: Path, name: str, body: str) -> Path:
    script = directory / f"{name}.sh"
    script.write_text(
        f"#!/bin/bash\n#SBATCH --output={directory}/%j.out\n#SBATCH --open-mode=append\n#SBATCH --nodes=1\n{body}\n"
    )
    return script


@pytest.fixture
def since() -> datetime:
    return datetime.now() - timedelta(minutes=2)


@pytest.fixture
def cleanup(slurm: SlurmClient) -> Iterator[list[int]]:
    """Job ids to scancel after the test, whatever happened."""
    job_ids: list[int] = []
    yield job_ids
    slurm.cancel(job_ids)


def test_submit_then_squeue_then_sacct_completed(
    slurm: SlurmClient, tmp_path: Path, since: datetime, cleanup: list[int]
) -> None:
    script = write_script(tmp_path, "ok", 'sleep 2; echo "host=$(hostname) token=$FM9G_LIVE_TOKEN"')
    job_id = slurm.submit(
        script,
        extra_args=["--job-name=fm9g-live|ok", "--comment=fm9g test=live attempt=1"],
        env={"FM9G_LIVE_TOKEN": "t0k3n"},
    )
    cleanup.append(job_id)

    row = slurm.squeue([job_id])[job_id]
    assert row.state in ACTIVE_OR_DONE
    assert row.name == "fm9g-live|ok" and row.comment == "fm9g test=live attempt=1"

    record = eventually(
        lambda: (r := slurm.sacct([job_id], since).get(job_id)) and r.state.is_terminal and r,
        f"sacct to report job {job_id} ended",
    )
    assert record.state is JobState.COMPLETED
    assert (record.exit_code, record.signal, record.restarts) == (0, 0, 0)
    assert record.node_list.startswith("node")
    output = (tmp_path / f"{job_id}.out").read_text()
    assert f"host={record.node_list}" in output and "token=t0k3n" in output


def test_failed_job_reports_its_exit_code(
    slurm: SlurmClient, tmp_path: Path, since: datetime, cleanup: list[int]
) -> None:
    job_id = slurm.submit(write_script(tmp_path, "fail", "exit 7"))
    cleanup.append(job_id)
    row = eventually(
        lambda: (r := slurm.squeue([job_id]).get(job_id)) and r.state.is_terminal and r,
        "squeue to show the job ended",
    )
    assert row.state is JobState.FAILED and row.reason == "NonZeroExitCode"
    record = eventually(
        lambda: (r := slurm.sacct([job_id], since).get(job_id)) and r.state.is_terminal and r,
        "sacct to report the job ended",
    )
    assert (record.state, record.exit_code) == (JobState.FAILED, 7)


def test_cancel_a_running_job(slurm: SlurmClient, tmp_path: Path, since: datetime, cleanup: list[int]) -> None:
    job_id = slurm.submit(write_script(tmp_path, "long", "sleep 300"))
    cleanup.append(job_id)
    eventually(lambda: slurm.squeue([job_id])[job_id].state is JobState.RUNNING, "RUNNING")
    slurm.cancel([job_id])
    row = eventually(
        lambda: (r := slurm.squeue([job_id]).get(job_id)) and r.state.is_terminal and r,
        "squeue to show the job cancelled",
    )
    assert row.state is JobState.CANCELLED
    record = eventually(
        lambda: (r := slurm.sacct([job_id], since).get(job_id)) and r.state.is_terminal and r,
        "sacct to report the job cancelled",
    )
    assert record.state is JobState.CANCELLED and record.cancelled_by_uid == os.getuid()
    slurm.cancel([job_id])  # cancelling an ended job again is not an error


def test_squeue_is_one_call_for_many_jobs(slurm: SlurmClient, tmp_path: Path, cleanup: list[int]) -> None:
    script = write_script(tmp_path, "held", "true")
    job_ids = [slurm.submit(script, extra_args=["--hold"]) for _ in range(3)]
    cleanup.extend(job_ids)
    before = slurm.counter.calls["squeue"]
    rows = slurm.squeue(job_ids)
    assert slurm.counter.calls["squeue"] == before + 1
    assert set(rows) == set(job_ids)
    assert all(row.state is JobState.PENDING and row.reason == "JobHeldUser" for row in rows.values())
    # A pending job cannot be requeued; the error says so.
    with pytest.raises(SlurmError, match="nothing to requeue"):
        scontrol.requeue(slurm, job_ids[0])


def test_unknown_job_ids_are_absent_not_errors(slurm: SlurmClient) -> None:
    # squeue 22.05 exits 1 ("Invalid job id specified") for one unknown id, 0 for several.
    unknown = 2_000_000_000
    assert slurm.squeue([unknown]) == {}
    assert slurm.squeue([unknown, unknown + 1]) == {}
    assert scontrol.show_job(slurm, unknown) is None


def test_requeue_keeps_the_job_id(slurm: SlurmClient, tmp_path: Path, since: datetime, cleanup: list[int]) -> None:
    job_id = slurm.submit(write_script(tmp_path, "requeue", "sleep 300"), extra_args=["--requeue"])
    cleanup.append(job_id)
    eventually(lambda: slurm.squeue([job_id])[job_id].state is JobState.RUNNING, "RUNNING")
    first = scontrol.show_job(slurm, job_id)
    assert first is not None and first.batch_host.startswith("node") and first.restarts == 0
    scontrol.requeue(slurm, job_id)
    again = eventually(lambda: (j := scontrol.show_job(slurm, job_id)) and j.restarts == 1 and j, "Restarts=1")
    assert again.job_id == job_id and again.state.is_active
    # Wait for the second run: slurmdbd 22.05 writes a requeued job's new record only
    # when it starts again, so a job cancelled during the cred_expire wait keeps
    # REQUEUED as its last sacct state (only squeue knows it was cancelled).
    eventually(lambda: slurm.squeue([job_id])[job_id].state is JobState.RUNNING, "RUNNING again")
    slurm.cancel([job_id])
    record = eventually(
        lambda: (r := slurm.sacct([job_id], since).get(job_id)) and r.state.is_terminal and r,
        "sacct to report the requeued job ended",
    )
    assert record.restarts == 1 and record.state is JobState.CANCELLED


def test_sbatch_refusal_is_a_submit_error_with_advice(slurm: SlurmClient, tmp_path: Path) -> None:
    with pytest.raises(SubmitError) as error:
        slurm.submit(write_script(tmp_path, "bad", "true"), extra_args=["--partition=no-such-partition"])
    assert error.value.returncode == 1
    assert "invalid partition" in error.value.stderr
    assert "sinfo -s" in str(error.value)
    assert slurm.counter.failures["sbatch"] == 1


def test_partitions(slurm: SlurmClient) -> None:
    partitions = slurm.partitions()
    assert partitions["debug"].default and partitions["debug"].node_count >= 4
    assert partitions["small"].node_count == 2 and not partitions["small"].default
    assert all(scontrol.nodes_with_gpus(p, 1) == 0 for p in partitions.values())


def test_sdiag_counts_this_users_rpcs(slurm: SlurmClient) -> None:
    slurm.ping()
    counts = slurm.sdiag_user_rpcs()
    assert counts.get(getpass.getuser(), 0) > 0
