"""`fm9g-launch logs RUN --role supervisor`: RUN/supervisor.log, which a detached
supervisor and a supervisor job (supervise.where: job) both write."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fm9g.orchestrator.cli import main
from fm9g.rundir import RunDir
from fm9g.rundir.config import RunConfig, TrainConfig, dump
from tests.helpers.runs import wait_for

LOG = "fm9g-launch: supervisor job 9001 started\nfm9g-launch: submitted master node 0 as job 9002 (start)\n"


def make_run(root: Path) -> RunDir:
    run = RunDir.of(root / "s").make()
    run.config.write_text(dump(RunConfig(train=TrainConfig(model_unique="s"))))
    return run


def test_prints_the_supervisor_log(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = make_run(tmp_path)
    run.supervisor_log.write_text(LOG)
    assert main(["logs", str(run.root), "--role", "supervisor"]) == 0
    assert capsys.readouterr().out == LOG


def test_a_missing_supervisor_log_is_an_error_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = make_run(tmp_path)
    assert main(["logs", str(run.root), "--role", "supervisor"]) == 2
    assert str(run.supervisor_log) in capsys.readouterr().err


def test_follow_waits_for_the_log_and_prints_what_is_appended(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    argv = [sys.executable, "-m", "fm9g.orchestrator.cli", "logs", str(run.root), "--role", "supervisor", "-f"]
    out = tmp_path / "out.txt"
    with open(out, "w") as handle:
        child = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT)
    try:
        # The supervisor job has not started: no log yet.  Then it writes, twice.
        first, second = LOG.splitlines(keepends=True)
        run.supervisor_log.write_text(first)
        wait_for(lambda: out.read_text() == first, 60, "the first line followed")
        with open(run.supervisor_log, "a") as log:
            log.write(second)
        wait_for(lambda: out.read_text() == LOG, 60, "the appended line followed")
        assert child.poll() is None  # -f keeps following
    finally:
        child.kill()
        child.wait()
