"""Preflight decisions, fed with partitions parsed from recorded sinfo output."""

from __future__ import annotations

from pathlib import Path

import pytest

from fm9g.orchestrator.slurm import parse
from fm9g.orchestrator.slurm.parse import Partition
from fm9g.orchestrator.slurm.preflight import PreflightError, check

RECORDED = Path(__file__).parent / "recorded"


class RecordedPartitions:
    """Answers `partitions()` from a recorded sinfo file (no Slurm call)."""

    def __init__(self, name: str) -> None:
        self.text = (RECORDED / name).read_text(encoding="utf-8")

    def partitions(self) -> dict[str, Partition]:
        return parse.parse_sinfo_partitions(self.text)


IDLE = RecordedPartitions("sinfo_idle.txt")
MIXED = RecordedPartitions("sinfo_mixed.txt")


def test_default_partition_resolves() -> None:
    report = check(None, 4, 0, [], IDLE)
    assert report.partition == "debug" and report.warnings == () and report.exclude == ()


def test_unknown_partition_lists_the_real_ones() -> None:
    with pytest.raises(PreflightError) as error:
        check("gpu-a100", 1, 0, [], IDLE)
    message = str(error.value)
    assert "'gpu-a100' does not exist" in message and "debug (default, 4 nodes)" in message
    assert "small (2 nodes)" in message and "nothing was submitted" in message


def test_too_many_nodes_for_the_partition() -> None:
    with pytest.raises(PreflightError, match="asks for 3 nodes but partition 'small' has 2"):
        check("small", 3, 0, [], IDLE)


def test_excluded_nodes_shrink_the_partition_and_unknown_ones_are_dropped() -> None:
    with pytest.raises(PreflightError, match="has 3 after excluding 1"):
        check(None, 4, 0, [], IDLE, exclude=["node4"])
    report = check(None, 3, 0, [], IDLE, exclude=["node4", "node99"])
    assert report.exclude == ("node4",)
    assert any("node99" in warning for warning in report.warnings)


def test_gpu_request_on_a_cpu_partition() -> None:
    with pytest.raises(PreflightError, match="have no GPUs .*set cluster.gpus_per_node to 0"):
        check(None, 1, 8, [], IDLE)


def test_missing_paths_are_all_reported_together(tmp_path: Path) -> None:
    present = tmp_path / "mixture.json"
    present.write_text("[]")
    with pytest.raises(PreflightError) as error:
        check(
            "nope",
            1,
            0,
            [("data.dataset_config", present), ("data.tokenizer_path", tmp_path / "tok.model")],
            IDLE,
        )
    assert len(error.value.problems) == 2
    assert "data.tokenizer_path" in str(error.value) and "does not exist" in str(error.value)


def test_drained_node_is_a_warning_not_an_error() -> None:
    report = check(None, 4, 0, [], MIXED)
    assert report.warnings == ("only 3 of 4 nodes in partition 'debug' are up; the run waits until 4 are",)
