"""convert, infer and serve as jobs on the real test Slurm cluster (tests/cluster): the
server runs on a compute node at its cluster address and is reached from here."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from fm9g.orchestrator.cli import main
from fm9g.orchestrator.state import StateStore
from fm9g.rundir import RunDir

from .conftest import ANSWER, TrainedRun, check_server

pytestmark = [pytest.mark.cluster, pytest.mark.slow]  # convert, infer and serve jobs on the test cluster


def cli(*argv: object) -> int:
    return main([str(a) for a in argv])


def slurm_state(job_id: str) -> str:
    """The job's state as sacct (or squeue, while it is in slurmctld's memory) reports it."""
    out = subprocess.run(
        ["squeue", "--noheader", "--states=all", "--format=%T", f"--jobs={job_id}"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    ).stdout.strip()
    return (
        out
        or subprocess.run(
            ["sacct", "--noheader", "--parsable2", "--format=State", "-X", f"--jobs={job_id}"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        ).stdout.strip()
    )


@pytest.fixture
def slurm_run(trained_run: TrainedRun) -> Iterator[TrainedRun]:
    yield trained_run
    cli("serve", trained_run.run.root, "--stop")  # never leave a server job behind


def test_infer_and_serve_on_slurm(slurm_run: TrainedRun, tmp_path: Path) -> None:
    run: RunDir = slurm_run.run
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "你好"}\n', encoding="utf-8")
    out = tmp_path / "out.jsonl"
    assert (
        cli(
            "infer",
            run.root,
            "--executor",
            "slurm",
            "--prompts",
            prompts,
            "--output",
            out,
            "--temperature",
            "0",
            "--max-tokens",
            "16",
        )
        == 0
    )
    assert json.loads(out.read_text())["text"] == ANSWER

    assert cli("serve", run.root, "--executor", "slurm") == 0
    endpoint = check_server(run)
    assert endpoint["host"].startswith(("10.", "127.")) and endpoint["hostname"].startswith("node")
    store = StateStore(run.state_db, readonly=True)
    try:
        stages = [job.stage for job in store.jobs()]
        serve_job = store.jobs("serve")[-1]
    finally:
        store.close()
    assert stages == ["convert", "infer", "serve"]  # serve found the checkpoint already converted
    assert str(serve_job.job_id) == str(endpoint["job_id"])
    assert slurm_state(str(serve_job.job_id)) == "RUNNING"

    assert cli("serve", run.root, "--stop") == 0
    assert not run.serve_endpoint.exists()
    assert slurm_state(str(serve_job.job_id)) in ("CANCELLED", "COMPLETED", "CANCELLED by 0")
