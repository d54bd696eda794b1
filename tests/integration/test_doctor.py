"""`fm9g-launch doctor` on the real test Slurm cluster: it passes on the healthy cluster
and names the cause when something a multi-node start needs is broken.  Each scenario
runs the real command and asserts on its JSON record (and on the copy it keeps under
the runs root), never on the table's prose."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import faults
from tests.helpers.runs import REPO

pytestmark = [pytest.mark.cluster]

CONFIG = REPO / "examples" / "tiny" / "pretrain.yaml"
# Not the default 0 (any free port): the blocked-port scenario must know the port to block.
BLOCKED_PORT = 29577


@pytest.fixture
def root() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="fm9g-doctor-", dir=Path.home()))  # the nodes see $HOME
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


def doctor_argv(root: Path, *sets: str, timeout: float = 45) -> list[str]:
    argv = [sys.executable, "-m", "fm9g.orchestrator.cli", "doctor", "--config", str(CONFIG), "--json"]
    argv += ["--timeout", str(timeout), "--set", f"run_root={root}"]
    for item in sets:
        argv += ["--set", item]
    return argv


def doctor(root: Path, *sets: str, timeout: float = 45) -> tuple[int, dict[str, Any]]:
    """Run `fm9g-launch doctor --json`; (exit status, the record by check name)."""
    argv = doctor_argv(root, *sets, timeout=timeout)
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=REPO, check=False)
    assert result.stdout.strip(), result.stderr
    record = json.loads(result.stdout)
    kept = json.loads((Path(record["folder"]) / "doctor.json").read_text())
    assert kept == record  # the copy under the runs root is the same record
    record["by_name"] = {check["name"]: check for check in record["checks"]}
    return result.returncode, record


def no_doctor_jobs_left(record: dict[str, Any]) -> bool:
    ids = [str(job_id) for job_id in record["jobs"].values()]
    if not ids:
        return True
    listing = subprocess.run(
        ["squeue", "--noheader", "--states=PENDING,RUNNING", f"--jobs={','.join(ids)}", "--format=%i"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return not listing.strip()


def test_healthy_cluster_passes(root: Path) -> None:
    status, record = doctor(root)
    checks = record["by_name"]
    assert status == 0 and record["ok"], record
    assert {name: check["status"] for name, check in checks.items()} == {
        "partition": "pass",
        "gpu_gres": "pass",
        "run_dir": "pass",
        "environment": "pass",
        "port": "pass",
    }
    probe = checks["environment"]["details"]["probe"]
    assert probe["torch"]["present"] and probe["fm9g"]["ok"]
    assert set(probe["packages"]) == {"bmtrain", "flash_attn", "vllm"}
    listener, connector = checks["port"]["details"]["listener"], checks["port"]["details"]["connector"]
    assert listener["host"] != connector["host"]  # two different compute nodes
    assert (Path(record["folder"]) / "token").exists()
    assert no_doctor_jobs_left(record)


def test_setup_line_activating_a_missing_environment(root: Path) -> None:
    status, record = doctor(root, "cluster.setup=['export OMP_NUM_THREADS=1', 'source /nonexistent/bin/activate']")
    checks = record["by_name"]
    assert status == 1 and not record["ok"]
    environment = checks["environment"]
    assert environment["status"] == "fail"
    assert "cluster.setup[1]" in environment["fix"] and "source /nonexistent/bin/activate" in environment["fix"]
    [failure] = environment["details"]["setup_failures"]
    assert failure["field"] == "cluster.setup[1]" and failure["host"].startswith("node")
    assert checks["run_dir"]["status"] == "pass"  # one broken line does not hide the other checks
    assert no_doctor_jobs_left(record)


def test_missing_train_env_is_named(root: Path) -> None:
    status, record = doctor(root, "cluster.train_env=/nonexistent/fm9g-train")
    environment = record["by_name"]["environment"]
    assert status == 1 and environment["status"] == "fail"
    assert "cluster.train_env" in environment["fix"]
    assert [f["field"] for f in environment["details"]["setup_failures"]] == ["cluster.train_env"]
    assert no_doctor_jobs_left(record)


@pytest.mark.skipif(os.geteuid() != 0, reason="blocking a port in the nodes' namespaces (tc) needs root")
def test_blocked_port_between_two_nodes(root: Path) -> None:
    with faults.blocked_tcp_port(BLOCKED_PORT):
        status, record = doctor(root, f"rendezvous.port={BLOCKED_PORT}")
    checks = record["by_name"]
    assert status == 1
    port = checks["port"]
    assert port["status"] == "fail", port
    listener, connector = port["details"]["listener"], port["details"]["connector"]
    assert listener["port"] == BLOCKED_PORT and not connector["connected"]
    assert str(BLOCKED_PORT) in port["found"] and str(BLOCKED_PORT) in port["fix"]
    assert (
        listener["host"] in port["fix"] and connector["host"] in port["fix"] and listener["host"] != connector["host"]
    )
    assert checks["environment"]["status"] == "pass"
    assert no_doctor_jobs_left(record)


def test_partition_that_does_not_exist(root: Path) -> None:
    status, record = doctor(root, "cluster.partition=nosuch")
    checks = record["by_name"]
    assert status == 1
    assert checks["partition"]["status"] == "fail"
    assert "nosuch" in checks["partition"]["found"] and "debug" in checks["partition"]["fix"]
    assert record["jobs"] == {}  # nothing is submitted to a partition that is not there
    assert checks["environment"]["status"] == "fail" and "not run" in checks["environment"]["found"]


# The probe jobs can never start within the test: Slurm holds them until then (BeginTime).
NEVER_STARTS = "cluster.extra_sbatch=['--begin=now+1hour']"


def test_busy_partition_times_out_and_cancels_the_jobs(root: Path) -> None:
    status, record = doctor(root, NEVER_STARTS, timeout=4)
    checks = record["by_name"]
    assert status == 1 and set(record["jobs"]) == {"env", "port"}
    for name in ("run_dir", "environment", "port"):
        assert checks[name]["status"] == "fail"
        assert "timed out waiting for a node: the partition may be busy" in checks[name]["found"]
    assert no_doctor_jobs_left(record)


def test_sigterm_cancels_the_probe_jobs(root: Path) -> None:
    process = subprocess.Popen(
        doctor_argv(root, NEVER_STARTS, timeout=100),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    ids: list[str] = []
    try:
        assert process.stderr is not None
        for line in process.stderr:  # "submitted env.sbatch as job 12"
            if line.startswith("submitted "):
                ids.append(line.split()[-1])
            if len(ids) == 2:
                break
        process.terminate()
        assert process.wait(timeout=30) == 128 + 15
    finally:
        process.kill()
        subprocess.run(["scancel", *ids], check=False)
    states = subprocess.run(
        ["squeue", "--noheader", "--states=all", f"--jobs={','.join(ids)}", "--format=%T"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert states == ["CANCELLED", "CANCELLED"]
