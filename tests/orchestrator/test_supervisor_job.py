"""supervise.where: job: the config fields and the rendered supervisor script (no Slurm)."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from fm9g.orchestrator import supervisor_job
from fm9g.rundir import RunDir
from fm9g.rundir.config import ConfigError, RunConfig, validate


def config(**supervise: object) -> RunConfig:
    return RunConfig.model_validate(
        {"executor": "slurm", "cluster": {"partition": "debug", "account": "proj"}, "supervise": supervise}
    )


def test_default_is_login_and_fields_have_modest_defaults() -> None:
    sup = RunConfig().supervise
    assert sup.where == "login" and sup.job_cpus == 1 and sup.job_time == "4:00:00"
    assert sup.job_partition is None and sup.job_account is None and sup.job_lead == 60


def test_unknown_where_is_an_error_naming_the_field() -> None:
    with pytest.raises(ConfigError, match="supervise.where"):
        validate({"supervise": {"where": "cloud"}}, "run.yaml")


def test_job_needs_slurm() -> None:
    with pytest.raises(ConfigError, match="supervise.where: job needs executor: slurm"):
        supervisor_job.check(RunConfig.model_validate({"supervise": {"where": "job"}}))
    supervisor_job.check(config(where="job"))


def test_script_signal_line_and_cluster_defaults(tmp_path: Path) -> None:
    run = RunDir.of(tmp_path / "r1")
    script = supervisor_job.render_script(config(where="job", job_lead=90, job_time="30"), run)
    lines = script.splitlines()
    assert "#SBATCH --signal=B:USR1@90" in lines
    assert "#SBATCH --time=30" in lines and "#SBATCH --cpus-per-task=1" in lines
    assert "#SBATCH --partition=debug" in lines and "#SBATCH --account=proj" in lines
    assert "#SBATCH --no-requeue" in lines and "#SBATCH --job-name=fm9g-r1-supervisor" in lines
    assert not any("--gres" in line for line in lines)
    # exec: the batch shell becomes the supervisor, so it is the one USR1 reaches
    assert lines[-1].startswith("exec ") and lines[-1].endswith("-m fm9g.orchestrator.supervisor_job " + str(run.root))


def test_own_partition_and_account_win(tmp_path: Path) -> None:
    script = supervisor_job.render_script(
        config(where="job", job_partition="cpu", job_account="ops", job_cpus=2), RunDir.of(tmp_path / "r")
    )
    assert "#SBATCH --partition=cpu" in script and "#SBATCH --account=ops" in script
    assert "#SBATCH --cpus-per-task=2" in script


def test_run_path_is_quoted(tmp_path: Path) -> None:
    root = tmp_path / "runs with space; $(reboot)" / "r"
    script = supervisor_job.render_script(config(where="job"), RunDir.of(root))
    last = script.splitlines()[-1]
    assert shlex.split(last)[-1] == str(root)
    assert "'" + str(root) + "'" in last


def test_unsafe_sbatch_value_is_refused_naming_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="supervise.job_time"):
        supervisor_job.render_script(config(where="job", job_time="1 day"), RunDir.of(tmp_path / "r"))
