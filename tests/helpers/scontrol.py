"""`scontrol show job` and `scontrol requeue`, and GPU counting on a sinfo partition: Slurm
calls that only the tests make (the supervisor never requeues a job itself, and reads job
states from squeue/sacct).  They live here, not in fm9g.orchestrator.slurm, so that the
Slurm layer holds only what production runs.

`tests/cluster/record.sh` records `scontrol show job` with `show_job_argv`, and
`tests/slurm/test_parse.py` feeds that text to `parse_scontrol_job`."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, field

from fm9g.orchestrator.slurm.commands import _INVALID_JOB_ID, SlurmClient, SlurmError, _failure
from fm9g.orchestrator.slurm.parse import ParseError, Partition, _int, parse_exit_code
from fm9g.orchestrator.slurm.states import JobState

# What scontrol prints for an id slurmctld does not know (any more).


@dataclass(frozen=True)
class ScontrolJob:
    """The fields of `scontrol show job -o` the tests read, plus all of them raw."""

    job_id: int
    state: JobState
    raw_state: str
    reason: str
    batch_host: str
    node_list: str
    restarts: int
    exit_code: int
    signal: int
    fields: dict[str, str] = field(repr=False)


def show_job_argv(job_id: int) -> list[str]:
    """`scontrol show job -o ID`: one line per job."""
    return ["scontrol", "show", "job", "--oneliner", str(job_id)]


def requeue_argv(job_id: int) -> list[str]:
    """`scontrol requeue ID`."""
    return ["scontrol", "requeue", str(job_id)]


# A key starts a field when it follows a space: "Key=" with the key characters
# Slurm uses ("AllocNode:Sid", "CPUs/Task", "NtasksPerN:B:S:C").  Slurm's keys
# start with a capital letter; requiring one keeps "Comment=run=demo stage=x"
# whole.  A value holding " Capital=" still splits: read names and comments
# from squeue, whose fields are separated unambiguously.
_SCONTROL_KEY = re.compile(r"(?:^|\s)([A-Z][A-Za-z0-9_:/]*)=")


def parse_scontrol_job(text: str) -> list[ScontrolJob]:
    """Jobs from `scontrol show job -o` (one line per job; an array prints one per task)."""
    jobs = []
    for line in text.splitlines():
        if not line.strip():
            continue
        fields = _scontrol_fields(line)
        if "JobId" not in fields or "JobState" not in fields:
            raise ParseError(f"scontrol show job: no JobId/JobState in {line[:120]!r}")
        exit_code, signal = parse_exit_code(fields.get("ExitCode", "0:0"))
        jobs.append(
            ScontrolJob(
                job_id=_int(fields["JobId"], "scontrol JobId"),
                state=JobState.from_slurm(fields["JobState"]),
                raw_state=fields["JobState"],
                reason=fields.get("Reason", ""),
                batch_host=fields.get("BatchHost", ""),
                node_list="" if fields.get("NodeList") in (None, "(null)") else fields["NodeList"],
                restarts=_int(fields.get("Restarts", "0"), "scontrol Restarts"),
                exit_code=exit_code,
                signal=signal,
                fields=fields,
            )
        )
    return jobs


def _scontrol_fields(line: str) -> dict[str, str]:
    matches = list(_SCONTROL_KEY.finditer(line))
    fields = {}
    for here, after in zip(matches, [*matches[1:], None], strict=True):
        end = after.start() if after is not None else len(line)
        fields[here.group(1)] = line[here.end() : end].strip()
    return fields


def show_job(client: SlurmClient, job_id: int) -> ScontrolJob | None:
    """`scontrol show job` for one job; None once slurmctld has forgotten it."""
    result = _scontrol(client, show_job_argv(job_id))
    if result.returncode != 0:
        if _INVALID_JOB_ID in result.stderr:
            return None
        raise _error(result, show_job_argv(job_id), "check `scontrol ping`")
    jobs = parse_scontrol_job(result.stdout)
    # An array job id prints every task; prefer the record that is this id.
    return next((job for job in jobs if job.job_id == job_id), jobs[0] if jobs else None)


def requeue(client: SlurmClient, job_id: int) -> None:
    """Put a job back in the queue under the same id (Restarts+1).

    Slurm 22.05 also requeues a job that has already ended, while slurmctld still
    remembers it (MinJobAge), and runs it again: requeue only jobs seen RUNNING."""
    result = _scontrol(client, requeue_argv(job_id))
    if result.returncode != 0:
        # Slurm refuses to requeue a PENDING job ("Job is pending execution").
        hint = (
            "the job has not started yet, so there is nothing to requeue"
            if "pending execution" in result.stderr
            else "check the job with `scontrol show job`"
        )
        raise _error(result, requeue_argv(job_id), hint)


def nodes_with_gpus(partition: Partition, gpus_per_node: int) -> int:
    """Nodes of `partition` with at least `gpus_per_node` GPUs of any type."""
    return sum(group.count for group in partition.groups if group.gpus >= gpus_per_node)


def _scontrol(client: SlurmClient, argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Run `argv` through the client's own runner: its timeout, its error, its call counter."""
    return client._run_checked_timeout(argv, client.timeout_s)


def _error(result: subprocess.CompletedProcess[str], argv: list[str], hint: str) -> SlurmError:
    return SlurmError(
        _failure(" ".join(argv[:2]), result, hint),
        argv=argv,
        returncode=result.returncode,
        stdout=result.stdout,
        stderr=result.stderr,
    )
