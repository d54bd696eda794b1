"""Parsers against text recorded from the project's Slurm 22.05 cluster (tests/cluster/record.sh).

Jobs are found by the names record.sh gives them, not by id, so the assertions hold
after the files are recorded again.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import pytest

from fm9g.orchestrator.slurm import parse
from fm9g.orchestrator.slurm.parse import ParseError, SacctRow, SqueueRow
from fm9g.orchestrator.slurm.states import JobState
from tests.helpers.scontrol import nodes_with_gpus, parse_scontrol_job

Recorded = Callable[[str], str]
HOSTILE_NAME = "fm9g|pretrain node 0"
HOSTILE_COMMENT = "fm9g run=demo|stage=pretrain job=0, attempt=1"


def by_name(rows: list[SqueueRow] | list[SacctRow], name: str) -> list:
    return [row for row in rows if row.name == name]


def one(rows: list[SqueueRow] | list[SacctRow], name: str):
    found = by_name(rows, name)
    assert len(found) == 1, f"expected one {name!r}, got {found}"
    return found[0]


# ---------------------------------------------------------------------- sbatch


def test_sbatch_recorded(recorded: Recorded) -> None:
    assert parse.parse_sbatch(recorded("sbatch_parsable.txt")) > 0


@pytest.mark.parametrize("text, job_id", [("123\n", 123), ("4567;fm9gtest\n", 4567), ("sbatch: notice\n89\n", 89)])
def test_sbatch_forms(text: str, job_id: int) -> None:
    assert parse.parse_sbatch(text) == job_id


@pytest.mark.parametrize("text", ["", "\n", "Submitted batch job 12\n"])
def test_sbatch_rejects_non_parsable(text: str) -> None:
    with pytest.raises(ParseError):
        parse.parse_sbatch(text)


# ---------------------------------------------------------------------- squeue


def test_squeue_busy(recorded: Recorded) -> None:
    rows = parse.parse_squeue(recorded("squeue_busy.txt"))
    running = one(rows, HOSTILE_NAME)
    assert running.state is JobState.RUNNING and running.raw_state == "RUNNING"
    assert running.comment == HOSTILE_COMMENT
    assert running.nodes == running.batch_host == "node4"
    assert running.reason == "None" and running.partition == "debug"
    assert running.array_job_id is None

    array = one(rows, "fm9g-index")  # not split into tasks yet
    assert array.state is JobState.PENDING and array.reason == "Resources"
    assert array.array_job_id == array.job_id and array.array_task == "[0-3]"
    assert array.display_id == f"{array.job_id}_[0-3]"
    assert array.nodes == "" and array.batch_host == "" and array.elapsed == timedelta(0)

    assert one(rows, "fm9g-held").reason == "JobHeldUser"
    two = one(rows, "fm9g-two")
    assert two.partition == "small" and two.state is JobState.PENDING
    assert one(rows, "fm9g-ok").comment == ""  # squeue prints (null)
    assert sum(row.state is JobState.RUNNING for row in rows) == 4


def test_squeue_requeued_and_cancelled(recorded: Recorded) -> None:
    rows = parse.parse_squeue(recorded("squeue_requeued.txt"))
    requeued = one(rows, "fm9g-requeue")
    # A requeued job waits cred_expire+1 s before it may start again.
    assert requeued.state is JobState.PENDING and requeued.reason == "BeginTime"
    assert requeued.comment == "requeue me"
    cancelled = one(rows, "fm9g-cancel")
    assert cancelled.state is JobState.CANCELLED and cancelled.state.is_terminal


def test_squeue_ended(recorded: Recorded) -> None:
    rows = parse.parse_squeue(recorded("squeue_ended.txt"))
    timeout = one(rows, "fm9g-timeout")
    assert timeout.state is JobState.TIMEOUT and timeout.reason == "TimeLimit"
    assert timeout.elapsed >= timedelta(minutes=1)  # --time=1 was used up
    assert one(rows, "fm9g-fail").reason == "NonZeroExitCode"
    assert one(rows, "fm9g-kill").state is JobState.FAILED
    two = one(rows, "fm9g-two")
    assert two.nodes == "node[1-2]" and two.batch_host == "node1"
    assert one(rows, "fm9g-requeue").state is JobState.COMPLETED

    tasks = by_name(rows, "fm9g-index")
    assert sorted(row.array_task for row in tasks) == ["0", "1", "2", "3"]
    assert len({row.array_job_id for row in tasks}) == 1
    assert len({row.job_id for row in tasks}) == 4  # each task has its own id (%A)
    failed = {row.array_task for row in tasks if row.state is JobState.FAILED}
    assert failed == {"1", "3"}


def test_squeue_single_job(recorded: Recorded) -> None:
    (row,) = parse.parse_squeue(recorded("squeue_one.txt"))
    assert row.name == "fm9g-fail" and row.state is JobState.FAILED


def test_squeue_wrong_field_count_is_an_error() -> None:
    with pytest.raises(ParseError, match="expected 10 fields"):
        parse.parse_squeue("123|RUNNING|node1\n")


# ---------------------------------------------------------------------- sacct


def test_sacct_one_row_per_job_no_steps(recorded: Recorded) -> None:
    rows = parse.parse_sacct(recorded("sacct.txt"))
    ids = [row.job_id for row in rows]
    assert len(ids) == len(set(ids))
    assert not any("." in row.display_id for row in rows)
    assert {row.name for row in rows} >= {
        HOSTILE_NAME,
        "fm9g-ok",
        "fm9g-fail",
        "fm9g-kill",
        "fm9g-timeout",
        "fm9g-requeue",
        "fm9g-cancel",
        "fm9g-held",
        "fm9g-two",
        "fm9g-index",
    }


def test_sacct_exit_codes(recorded: Recorded) -> None:
    rows = parse.parse_sacct(recorded("sacct.txt"))
    ok = one(rows, "fm9g-ok")
    assert (ok.state, ok.exit_code, ok.signal) == (JobState.COMPLETED, 0, 0)
    assert ok.start is not None and ok.end is not None and ok.end >= ok.start
    failed = one(rows, "fm9g-fail")
    assert (failed.state, failed.exit_code, failed.signal) == (JobState.FAILED, 3, 0)
    killed = one(rows, "fm9g-kill")
    assert (killed.state, killed.exit_code, killed.signal) == (JobState.FAILED, 0, 9)
    # The allocation record of a timed-out job says 0:0; the batch step was sent SIGTERM.
    timeout = one(rows, "fm9g-timeout")
    assert (timeout.state, timeout.signal) == (JobState.TIMEOUT, 15)
    assert timeout.elapsed >= timedelta(minutes=1)


def test_sacct_cancelled(recorded: Recorded) -> None:
    rows = parse.parse_sacct(recorded("sacct.txt"))
    cancelled = one(rows, "fm9g-cancel")
    assert cancelled.state is JobState.CANCELLED and cancelled.raw_state == "CANCELLED by 0"
    assert cancelled.cancelled_by_uid == 0
    held = one(rows, "fm9g-held")  # cancelled before it ever ran
    assert held.state is JobState.CANCELLED and held.node_list == "" and held.start is None


def test_sacct_requeue_counts_as_restart(recorded: Recorded) -> None:
    rows = parse.parse_sacct(recorded("sacct.txt"))
    requeued = one(rows, "fm9g-requeue")
    assert requeued.state is JobState.COMPLETED and requeued.restarts == 1
    assert requeued.comment == "requeue me"
    assert one(rows, "fm9g-ok").restarts == 0


def test_sacct_names_and_arrays(recorded: Recorded) -> None:
    rows = parse.parse_sacct(recorded("sacct.txt"))
    assert one(rows, HOSTILE_NAME).comment == HOSTILE_COMMENT
    assert one(rows, "fm9g-two").node_list == "node[1-2]"
    tasks = by_name(rows, "fm9g-index")
    assert sorted(row.array_task for row in tasks) == ["0", "1", "2", "3"]
    assert {row.exit_code for row in tasks if row.array_task in ("1", "3")} == {1}
    (base,) = {row.array_job_id for row in tasks}
    assert base in {row.job_id for row in tasks}  # the last task keeps the array's id


# ---------------------------------------------------------------------- sinfo


def test_sinfo_idle(recorded: Recorded) -> None:
    partitions = parse.parse_sinfo_partitions(recorded("sinfo_idle.txt"))
    assert set(partitions) == {"debug", "small"}
    debug, small = partitions["debug"], partitions["small"]
    assert debug.default and not small.default
    assert (debug.node_count, small.node_count) == (4, 2)
    assert debug.node_names == {"node1", "node2", "node3", "node4"}
    assert small.node_names == {"node1", "node2"}
    assert debug.available == "up"
    assert all(group.gres == "" and group.gpus == 0 for group in debug.groups)
    assert nodes_with_gpus(debug, 1) == 0


def test_sinfo_mixed_states_sum_per_partition(recorded: Recorded) -> None:
    partitions = parse.parse_sinfo_partitions(recorded("sinfo_mixed.txt"))
    debug, small = partitions["debug"], partitions["small"]
    assert len(debug.groups) == 3  # drained, allocated, idle
    assert debug.default and debug.node_count == 4 and debug.usable_node_count == 3
    assert small.node_count == 2 and small.usable_node_count == 1


def test_sinfo_busy(recorded: Recorded) -> None:
    partitions = parse.parse_sinfo_partitions(recorded("sinfo_busy.txt"))
    assert partitions["debug"].usable_node_count == 4  # allocated nodes still count


@pytest.mark.parametrize(
    "gres, gpus",
    [
        ("", 0),
        ("gpu:8", 8),
        ("gpu:a100:4(S:0-1)", 4),
        ("gpu:a100:2(S:0,1),gpu:v100:2", 4),
        ("nvme:1", 0),
        ("gpu:h200", 1),
    ],
)
def test_gpus_in_gres(gres: str, gpus: int) -> None:
    assert parse.gpus_in_gres(gres) == gpus


@pytest.mark.parametrize(
    "hostlist, names",
    [
        ("node[1-3,7],gpu01", ["node1", "node2", "node3", "node7", "gpu01"]),
        ("node[08-10]", ["node08", "node09", "node10"]),
        ("node4", ["node4"]),
        ("", []),
    ],
)
def test_expand_hostlist(hostlist: str, names: list[str]) -> None:
    assert parse.expand_hostlist(hostlist) == names


# ---------------------------------------------------------------------- sdiag


def test_sdiag_user_rpcs(recorded: Recorded) -> None:
    counts = parse.parse_sdiag_user_rpcs(recorded("sdiag.txt"))
    assert list(counts) == ["root"] and counts["root"] > 0


def test_sdiag_without_user_block_is_an_error() -> None:
    with pytest.raises(ParseError):
        parse.parse_sdiag_user_rpcs("Server thread count: 3\n")


# ---------------------------------------------------------------------- scontrol


def test_scontrol_running(recorded: Recorded) -> None:
    (job,) = parse_scontrol_job(recorded("scontrol_running.txt"))
    assert job.state is JobState.RUNNING and job.batch_host == "node4" and job.node_list == "node4"
    assert job.restarts == 0 and (job.exit_code, job.signal) == (0, 0)
    # Spaces, "|" and lower-case "key=" in user text stay inside their field.
    assert job.fields["JobName"] == HOSTILE_NAME
    assert job.fields["Comment"] == HOSTILE_COMMENT
    assert job.fields["AllocNode:Sid"].startswith("localhost")


def test_scontrol_requeued(recorded: Recorded) -> None:
    (job,) = parse_scontrol_job(recorded("scontrol_requeued.txt"))
    assert job.state is JobState.PENDING and job.reason == "BeginTime" and job.restarts == 1
    assert job.batch_host == ""


def test_scontrol_completed(recorded: Recorded) -> None:
    (job,) = parse_scontrol_job(recorded("scontrol_completed.txt"))
    assert job.state is JobState.COMPLETED and job.fields["JobName"] == "fm9g-ok"


def test_scontrol_array(recorded: Recorded) -> None:
    (pending,) = parse_scontrol_job(recorded("scontrol_array_pending.txt"))
    assert pending.fields["ArrayTaskId"] == "0-3" and pending.reason == "Resources"
    tasks = parse_scontrol_job(recorded("scontrol_array.txt"))
    assert sorted(task.fields["ArrayTaskId"] for task in tasks) == ["0", "1", "2", "3"]
    assert {task.state for task in tasks} == {JobState.COMPLETED, JobState.FAILED}


# ---------------------------------------------------------------------- values


@pytest.mark.parametrize(
    "text, expected",
    [
        ("0:00", timedelta(0)),
        ("1:20", timedelta(minutes=1, seconds=20)),
        ("00:01:14", timedelta(minutes=1, seconds=14)),
        ("1-02:03:04", timedelta(days=1, hours=2, minutes=3, seconds=4)),
        ("2-05", timedelta(days=2, hours=5)),
        ("45", timedelta(seconds=45)),
        ("INVALID", timedelta(0)),
    ],
)
def test_parse_duration(text: str, expected: timedelta) -> None:
    assert parse.parse_duration(text) == expected


def test_exit_code_and_timestamp() -> None:
    assert parse.parse_exit_code("0:15") == (0, 15)
    assert parse.parse_timestamp("Unknown") is None and parse.parse_timestamp("None") is None
    with pytest.raises(ParseError):
        parse.parse_exit_code("bad")
