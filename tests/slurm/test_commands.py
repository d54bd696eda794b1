"""The command module without a cluster: argv builders, the call counter, and what
happens when the Slurm commands are not installed at all."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pytest

from fm9g.orchestrator.slurm import commands, parse
from fm9g.orchestrator.slurm.commands import (
    CallCounter,
    PollError,
    SlurmClient,
    SlurmError,
    SubmitError,
)


def test_squeue_argv_is_one_call_in_all_states() -> None:
    argv = commands.squeue_argv([3, 1, 2])
    assert argv[:3] == ["squeue", "--noheader", "--states=all"]
    assert "--jobs=3,1,2" in argv and f"--format={parse.SQUEUE_FORMAT}" in argv


def test_sacct_argv_bounds_the_start_time() -> None:
    argv = commands.sacct_argv([7], datetime(2026, 1, 2, 3, 4, 5))
    assert "--starttime=2026-01-02T03:04:05" in argv and "--duplicates" in argv
    assert f"--delimiter={parse.FIELD_SEPARATOR}" in argv and "--parsable2" in argv


def test_aware_times_are_sent_as_local_time() -> None:
    moment = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    local = moment.astimezone().strftime("%Y-%m-%dT%H:%M:%S")
    assert f"--starttime={local}" in commands.sacct_argv([1], moment)


def test_scancel_argv() -> None:
    assert commands.scancel_argv([5, 6], "USR1", batch_only=True) == [
        "scancel",
        "--signal=USR1",
        "--batch",
        "5",
        "6",
    ]


def test_counter() -> None:
    counter = CallCounter()
    counter.record("squeue", ok=True)
    counter.record("squeue", ok=False)
    assert counter.calls["squeue"] == 2 and counter.failures["squeue"] == 1 and counter.total == 2


def test_empty_requests_make_no_call() -> None:
    client = SlurmClient()
    assert client.squeue([]) == {} and client.sacct([], datetime.now()) == {}
    client.cancel([])
    assert client.counter.total == 0


@pytest.fixture
def no_slurm(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> SlurmClient:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no Slurm commands
    return SlurmClient()


def test_missing_commands_fail_in_their_layer(no_slurm: SlurmClient, tmp_path: Path) -> None:
    assert no_slurm.ping() is False
    with pytest.raises(PollError, match="squeue not found on PATH"):
        no_slurm.squeue([1])
    with pytest.raises(PollError):
        no_slurm.sacct([1], datetime.now())
    with pytest.raises(SubmitError, match="sbatch not found"):
        no_slurm.submit(tmp_path / "job.sh")
    with pytest.raises(SlurmError, match="sinfo not found"):
        no_slurm.partitions()
    assert no_slurm.counter.failures["squeue"] == 1


def test_error_hierarchy() -> None:
    assert issubclass(SubmitError, SlurmError) and issubclass(PollError, SlurmError)
    assert issubclass(SlurmError, RuntimeError)
