"""Preflight against the real test cluster: what it refuses before anything is queued.
Skipped when `scontrol ping` fails."""

from __future__ import annotations

from pathlib import Path

import pytest

from fm9g.orchestrator.slurm.commands import SlurmClient
from fm9g.orchestrator.slurm.preflight import PreflightError, check, check_run
from fm9g.rundir.config import RunConfig

pytestmark = pytest.mark.cluster


def test_nonexistent_partition_is_refused_with_the_list(slurm: SlurmClient) -> None:
    with pytest.raises(PreflightError) as error:
        check("gpu-h200", 1, 0, [], slurm)
    message = str(error.value)
    assert "partition 'gpu-h200' does not exist" in message
    assert "debug (default," in message and "small (2 nodes)" in message
    assert slurm.counter.calls["sbatch"] == 0


@pytest.mark.parametrize("partition, nodes", [("small", 3), (None, 41)])
def test_more_nodes_than_the_partition_has(slurm: SlurmClient, partition: str | None, nodes: int) -> None:
    # sbatch itself would accept this job and leave it pending forever
    # (Reason=PartitionNodeLimit); preflight refuses it.
    with pytest.raises(PreflightError, match=f"asks for {nodes} nodes but partition"):
        check(partition, nodes, 0, [], slurm)


def test_gpu_request_is_refused_on_a_cluster_without_gpus(slurm: SlurmClient) -> None:
    with pytest.raises(PreflightError, match="GPUs per node but the nodes of partition 'debug' have no GPUs"):
        check(None, 1, 1, [], slurm)


def test_a_run_that_fits(slurm: SlurmClient, tmp_path: Path) -> None:
    mixture = tmp_path / "mixture.json"
    mixture.write_text("[]")
    report = check("small", 2, 0, [("data.dataset_config", mixture)], slurm, exclude=["node99"])
    assert report.partition == "small" and report.exclude == ()
    assert report.warnings == ("excluded node(s) node99 do not exist on this cluster; ignoring them",)


def test_check_run_reads_the_run_config(slurm: SlurmClient, tmp_path: Path) -> None:
    config = RunConfig(executor="slurm", cluster={"partition": "small", "nodes": 3})
    with pytest.raises(PreflightError, match="set cluster.nodes to at most 2"):
        check_run(config, slurm)

    config = RunConfig(executor="slurm", cluster={"nodes": 2, "exclude": ["node1", "ghost7"]})
    warnings = check_run(config, slurm)
    assert config.cluster.exclude == ["node1"]  # sbatch would refuse "ghost7"
    assert any("ghost7" in warning for warning in warnings)

    config = RunConfig(executor="slurm", data={"tokenizer_path": str(tmp_path / "missing.model")})
    with pytest.raises(PreflightError, match="data.tokenizer_path: .*missing.model does not exist"):
        check_run(config, slurm)
