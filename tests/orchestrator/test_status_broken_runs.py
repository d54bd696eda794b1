"""`fm9g-launch status` degrades per run: a run whose state.db or config.yaml cannot be
read is listed with an error saying why and how to fix it, and every other run is still
listed (`: > runs/X/state.db; fm9g-launch status` once ended in a sqlite traceback)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fm9g.orchestrator.cli import main
from fm9g.orchestrator.state import StateStore
from fm9g.orchestrator.views import UNREADABLE, RunReader, list_runs
from fm9g.rundir import RunDir
from fm9g.rundir import config as cfg
from fm9g.rundir.atomic import write_bytes, write_text


def make_run(root: Path, name: str) -> RunDir:
    run = RunDir.of(root / name).make()
    write_text(run.config, cfg.dump(cfg.RunConfig()))
    store = StateStore(run.state_db)
    try:
        store.set_meta("owner", "alice")
        store.upsert_stage("train", "train")
        store.set_stage("train", "RUNNING")
    finally:
        store.close()
    return run


@pytest.fixture
def runs_root(tmp_path: Path) -> Path:
    """good (fine), empty (`: > state.db`), garbage (not a database), noconfig (config.yaml gone)."""
    root = tmp_path / "runs"
    make_run(root, "good")
    write_bytes(make_run(root, "empty").state_db, b"")
    write_bytes(make_run(root, "garbage").state_db, b"this is not a sqlite database\n" * 100)
    make_run(root, "noconfig").config.unlink()
    return root


def status_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    assert main(["status", "--json", *argv]) == 0
    return {run["name"]: run for run in json.loads(capsys.readouterr().out)["runs"]}


def test_status_json_lists_every_run_with_an_error_for_the_broken(
    runs_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = status_json(capsys, "--runs-root", str(runs_root))
    assert sorted(runs) == ["empty", "garbage", "good", "noconfig"]
    assert runs["good"]["error"] is None and runs["good"]["status"] == "RUNNING" and runs["good"]["owner"] == "alice"
    for name in ("empty", "garbage"):
        error = runs[name]["error"]
        assert runs[name]["status"] == UNREADABLE and runs[name]["stages"] == []
        assert error["source"] == "state.db" and "resume" in error["fix"] and str(runs_root / name) in error["fix"]
    # without its config the run's state is still read; the error names the missing file
    assert runs["noconfig"]["status"] == "RUNNING" and runs["noconfig"]["owner"] == "alice"
    assert runs["noconfig"]["error"]["source"] == "config.yaml"


def test_status_never_repairs_a_broken_state_db(runs_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status_json(capsys, "--runs-root", str(runs_root))
    assert (runs_root / "empty" / "state.db").stat().st_size == 0  # not silently turned into an empty schema


def test_status_of_one_broken_run_and_the_tables(runs_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert status_json(capsys, str(runs_root / "empty"))["empty"]["error"]["source"] == "state.db"
    assert status_json(capsys, str(runs_root / "noconfig"))["noconfig"]["error"]["source"] == "config.yaml"
    for argv in (
        ["--runs-root", str(runs_root)],
        [str(runs_root / "garbage")],
        ["--failures", "--runs-root", str(runs_root)],
    ):
        assert main(["status", *argv]) == 0
    capsys.readouterr()


def test_a_config_that_does_not_load(runs_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_text(runs_root / "good" / "config.yaml", "train: [not, a, mapping]\n")
    error = status_json(capsys, str(runs_root / "good"))["good"]["error"]
    assert error["source"] == "config.yaml" and str(runs_root / "good" / "config.yaml") in error["fix"]


def test_the_tui_readers_show_the_same(runs_root: Path) -> None:
    summaries = {summary.name: summary for summary in list_runs(runs_root)}
    assert [summaries[name].status for name in ("empty", "garbage", "good")] == [UNREADABLE, UNREADABLE, "RUNNING"]
    view = RunReader(RunDir.of(runs_root / "garbage"), lambda: 0.0).load()
    assert view.status == UNREADABLE and view.error is not None and view.error.source == "state.db"
    view = RunReader(RunDir.of(runs_root / "noconfig"), lambda: 0.0).load()
    assert view.status == "RUNNING" and view.error is not None and view.error.source == "config.yaml"
