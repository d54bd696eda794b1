"""The doctor's judging and rendering, with no cluster: checks built from recorded
`sinfo` text and from probe records, the fix each failure names, the JSON record and
the table, and the probe script run for real by bash and python on this machine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from fm9g.orchestrator import doctor, doctor_checks, doctor_probe
from fm9g.orchestrator.doctor_checks import Check, DoctorReport, JobOutcome
from fm9g.orchestrator.slurm.parse import parse_sinfo_partitions
from fm9g.rundir.config import RunConfig

RECORDED = Path(__file__).resolve().parents[1] / "slurm" / "recorded"


def partitions() -> dict:
    return parse_sinfo_partitions((RECORDED / "sinfo_idle.txt").read_text())


def config(**cluster: object) -> RunConfig:
    return RunConfig.model_validate({"cluster": cluster})


ENDED = JobOutcome(job_id=7, state="COMPLETED", node="node2", log="/r/env.out", started=True)
PROBE = {
    "host": "node2",
    "python": "/venv/bin/python",
    "python_version": "3.11.7",
    "torch": {"present": True, "version": "2.5.0", "cuda": "12.4", "nccl": "2.21.5"},
    "packages": {"bmtrain": {"present": False}, "flash_attn": {"present": True}, "vllm": {"present": False}},
    "fm9g": {"ok": True},
}


def test_partition_passes_and_fails_with_the_listing() -> None:
    check, chosen = doctor_checks.check_partition(config(nodes=2), partitions())
    assert check.status == "pass" and chosen is not None and chosen.name == "debug"
    check, chosen = doctor_checks.check_partition(config(partition="nosuch"), partitions())
    assert check.status == "fail" and chosen is None
    assert "'nosuch' does not exist" in check.found and "debug (default, 4 nodes)" in check.fix
    check, _ = doctor_checks.check_partition(config(partition="small", nodes=3), partitions())
    assert check.status == "fail" and "cluster.nodes" in check.fix


def test_gres_none_is_a_warning_only_when_gpus_are_asked_for() -> None:
    debug = partitions()["debug"]
    assert doctor_checks.check_gres(config(gpus_per_node=0), debug).status == "pass"
    asked = doctor_checks.check_gres(config(gpus_per_node=8), debug)
    assert asked.status == "warn" and "none" in asked.found and "cluster.gpus_per_node" in asked.fix


def test_setup_failures_map_to_the_config_entry(tmp_path: Path) -> None:
    """The real template run by bash: the ERR trap's line numbers name the entry that failed."""
    setup = ["export A=1", "for x in 1; do\n  true\ndone", "source /nonexistent/bin/activate", "export B=2"]
    cfg = config(setup=setup, python=sys.executable)
    script = doctor.render_probe_script(cfg, "env", tmp_path, "d1", "tok", 2, "debug")
    # Bash runs it here, as the batch shell would (its #SBATCH lines are comments).
    (tmp_path / "doctor_probe.py").write_text(Path(doctor_probe.__file__).read_text())
    subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, check=False, timeout=120)
    raw = (tmp_path / "setup-failures-env.tsv").read_text()
    failures = doctor_checks.map_setup_failures(raw, doctor.setup_first_line(script), setup, None)
    assert [(f.field, f.line) for f in failures] == [("cluster.setup[2]", "source /nonexistent/bin/activate")]
    assert (tmp_path / "token").read_text().strip() == "tok"
    record = json.loads((tmp_path / "env.json").read_text())  # the probe still ran after the failed line
    assert record["torch"]["present"] and record["fm9g"]["ok"]
    check = doctor_checks.check_environment(cfg, ENDED, record, failures, sys.executable)
    assert check.status == "fail"
    assert "cluster.setup[2]" in check.fix and "source /nonexistent/bin/activate" in check.fix


def test_train_env_activation_is_named_as_its_field() -> None:
    raw = "12\t1\tnode3\tsource /envs/x/bin/activate\n"
    failures = doctor_checks.map_setup_failures(raw, 10, ["module load cuda", "export A=1"], "/envs/x")
    assert [(f.field, f.host) for f in failures] == [("cluster.train_env", "node3")]


def test_script_quotes_every_value(tmp_path: Path) -> None:
    root = tmp_path / "runs with space; $(reboot)"
    script = doctor.render_probe_script(config(), "port", root, "d1", "tok", 2, "debug")
    assert "'" + str(root) + "'" in script and "$(reboot)'" in script
    assert "#SBATCH --job-name=fm9g-doctor-port" in script and "--gres" not in script


def test_environment_absent_packages_fail_only_when_the_config_needs_them() -> None:
    ok = doctor_checks.check_environment(config(), ENDED, PROBE, [], "/venv/bin/python")
    assert ok.status == "pass" and "torch 2.5.0 (CUDA 12.4, NCCL 2.21.5)" in ok.found
    assert "absent: bmtrain, vllm" in ok.found
    needs = RunConfig.model_validate({"model": {"backend": "bmtrain"}})
    bad = doctor_checks.check_environment(needs, ENDED, PROBE, [], "/venv/bin/python")
    assert bad.status == "fail" and "model.backend: bmtrain" in bad.found and "install bmtrain" in bad.fix
    cpu = {**PROBE, "torch": {"present": True, "version": "2.5.0+cpu", "cuda": None}}
    gpu_run = doctor_checks.check_environment(config(gpus_per_node=8), ENDED, cpu, [], "/venv/bin/python")
    assert gpu_run.status == "fail" and "CUDA build" in gpu_run.fix


def test_python_that_never_ran_names_the_interpreter() -> None:
    check = doctor_checks.check_environment(config(), ENDED, None, [], "/no/python")
    assert check.status == "fail" and "/no/python" in check.found and "cluster.python" in check.fix


def test_job_that_never_started_times_out_as_busy() -> None:
    pending = JobOutcome(job_id=9, state="TIMED_OUT", log="/r/env.out")
    check = doctor_checks.check_run_dir(pending, "tok", None, "/runs")
    assert check.status == "fail" and doctor_checks.TIMED_OUT_PENDING in check.found
    port = doctor_checks.check_port(pending, None, None, 0, 5.0)
    assert port.status == "fail" and doctor_checks.TIMED_OUT_PENDING in port.found


def test_run_dir_not_shared() -> None:
    check = doctor_checks.check_run_dir(ENDED, "tok", None, "/local/runs")
    assert check.status == "fail" and "not visible here" in check.found and "run_root" in check.fix


def test_blocked_port_names_the_port_and_both_nodes() -> None:
    listener = {"host": "node3", "port": 29577, "accepted": False}
    connector = {"host": "node4", "connected": False, "error": "TimeoutError: timed out"}
    check = doctor_checks.check_port(ENDED, listener, connector, 29577, 5.0)
    assert check.status == "fail"
    assert "node4 could not connect to node3:29577" in check.found
    assert "29577" in check.fix and "node3" in check.fix and "node4" in check.fix


def test_report_json_and_table() -> None:
    report = DoctorReport(
        (Check("partition", "pass", "debug"), Check("port", "fail", "blocked", "open it")),
        "/runs/.doctor/x",
        {"env": 3},
    )
    assert not report.ok
    record = json.loads(report.to_json())
    assert record["ok"] is False and [c["status"] for c in record["checks"]] == ["pass", "fail"]
    console = Console(record=True, width=100)
    console.print(doctor_checks.render_table(report))
    text = console.export_text()
    assert "partition" in text and "open it" in text
    assert DoctorReport((Check("gpu_gres", "warn", "none"),)).ok


@pytest.mark.parametrize("role", ["env", "port"])
def test_setup_marker_is_in_each_script(role: str, tmp_path: Path) -> None:
    script = doctor.render_probe_script(config(setup=["module load x"]), role, tmp_path, "d", "t", 2, None)
    assert script.splitlines()[doctor.setup_first_line(script) - 1] == "module load x"


def test_no_slurm_here_fails_the_partition_check_and_submits_nothing(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no sinfo, no sbatch
    report = doctor.run_doctor(RunConfig.model_validate({"run_root": str(tmp_path / "runs")}), timeout_s=5)
    assert not report.ok and report.jobs == {}
    partition = report.check("partition")
    assert partition.status == "fail" and "sinfo not found on PATH" in partition.found
    assert "not run" in report.check("environment").found
    kept = json.loads((Path(report.folder) / "doctor.json").read_text())
    assert kept["ok"] is False and kept["folder"].startswith(str(tmp_path / "runs" / ".doctor"))
