"""The endpoint file and generation rule that let a requeued or replaced master win."""

from __future__ import annotations

from pathlib import Path

from fm9g.rundir.endpoint import Endpoint, next_generation, publish_endpoint, read_endpoint


def test_publish_and_read(tmp_path: Path) -> None:
    path = tmp_path / "rendezvous" / "endpoint.json"
    assert read_endpoint(path) is None
    endpoint = Endpoint("node2", 40123, 3, "17", "run-3")
    publish_endpoint(path, endpoint)
    assert read_endpoint(path) == endpoint
    assert [p.name for p in path.parent.iterdir()] == ["endpoint.json"]  # no temp file left


def test_partial_file_reads_as_absent(tmp_path: Path) -> None:
    path = tmp_path / "endpoint.json"
    path.write_text('{"host": "node1", "po')
    assert read_endpoint(path) is None


def test_requeued_master_publishes_a_newer_generation() -> None:
    # Slurm requeues with the original environment (generation 0); the file says 4.
    assert next_generation(0, Endpoint("n", 1, 4, "9", "r-4")) == 5
    assert next_generation(7, Endpoint("n", 1, 4, "9", "r-4")) == 7
    assert next_generation(0, None) == 0
