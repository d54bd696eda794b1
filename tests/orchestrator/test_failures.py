"""Failure taxonomy: each end maps to the class whose budget pays for it."""

from __future__ import annotations

import pytest

from fm9g.rundir import protocol
from fm9g.orchestrator.failures import FailureClass, classify


@pytest.mark.parametrize("state,code,tail,user,expected", [
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
])
def test_classes(state: str, code: int | None, tail: str, user: bool, expected: FailureClass) -> None:
    assert classify(state, code, tail, cancelled_by_user=user).klass is expected


def test_comm_error_is_named() -> None:
    assert "communication" in classify("FAILED", 1, "DistNetworkError: Failed to recv").reason


def test_config_error_names_the_trainers_reason() -> None:
    failure = classify("FAILED", protocol.EXIT_CONFIG, fatal_reason="data.dataset_config: no such file x.json")
    assert failure.klass is FailureClass.FATAL and "no such file x.json" in failure.reason
    assert "fatal.json" in classify("FAILED", protocol.EXIT_CONFIG).reason  # none recorded: says where to look
