"""Failure taxonomy: each end maps to the class whose budget pays for it."""

from __future__ import annotations

import pytest

from fm9g.orchestrator.failures import FailureClass, classify
from fm9g.rundir import protocol


@pytest.mark.parametrize(
    "state,code,tail,user,expected",
    [
        ("NODE_FAIL", None, "", False, FailureClass.INFRA),
        ("PREEMPTED", 0, "", False, FailureClass.INFRA),
        ("TIMEOUT", None, "", False, FailureClass.INFRA),
        ("BOOT_FAIL", None, "", False, FailureClass.INFRA),
        ("CANCELLED", None, "", False, FailureClass.INFRA),
        ("CANCELLED", None, "", True, FailureClass.FATAL),
        ("FAILED", 1, "RuntimeError: boom", False, FailureClass.APP),
        ("FAILED", 1, "gloo: Connection closed by peer [10.0.0.2]", False, FailureClass.APP),
        ("FAILED", protocol.EXIT_CONFIG, "", False, FailureClass.FATAL),
        ("FAILED", protocol.EXIT_CONTINUE, "", False, FailureClass.CONTINUE),
        ("COMPLETED", protocol.EXIT_CONTINUE, "", False, FailureClass.CONTINUE),
    ],
)
def test_classes(state: str, code: int | None, tail: str, user: bool, expected: FailureClass) -> None:
    assert classify(state, code, tail, cancelled_by_user=user).klass is expected


def test_comm_error_is_named() -> None:
    assert "communication" in classify("FAILED", 1, "DistNetworkError: Failed to recv").reason


def test_config_error_names_the_trainers_reason() -> None:
    failure = classify("FAILED", protocol.EXIT_CONFIG, fatal_reason="data.dataset_config: no such file x.json")
    assert failure.klass is FailureClass.FATAL and "no such file x.json" in failure.reason
    assert "fatal.json" in classify("FAILED", protocol.EXIT_CONFIG).reason  # none recorded: says where to look


def test_full_disk_is_fatal_and_says_how_to_go_on() -> None:
    failure = classify("FAILED", protocol.EXIT_NO_SPACE, run_name="tiny")
    assert failure.klass is FailureClass.FATAL
    assert "disk is full" in failure.reason and "`fm9g-launch resume tiny`" in failure.reason
    named = classify("FAILED", protocol.EXIT_NO_SPACE, fatal_reason="the filesystem mounted at /scratch is full")
    assert "/scratch" in named.reason


def test_read_fatal_gives_the_reason_or_none(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from fm9g.rundir import RunDir
    from fm9g.rundir.atomic import write_json

    run = RunDir.of(tmp_path / "r").make()
    assert run.read_fatal() is None
    run.fatal_record.write_text("{not json", encoding="utf-8")
    assert run.read_fatal() is None  # half-read or garbled: no reason, never an exception
    write_json(run.fatal_record, {"reason": "DataError: x.jsonl:3: bad"})
    assert run.read_fatal() == "DataError: x.jsonl:3: bad"
