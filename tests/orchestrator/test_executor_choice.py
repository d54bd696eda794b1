"""`executor: auto` (issue 15 #1): Slurm where `sbatch` is on the PATH and the controller
answers, this machine otherwise; chosen once, written to the run's config.yaml and
recorded as an `executor_choice` event.  Local with several nodes where Slurm answers
needs --yes (or a terminal's yes)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from fm9g.orchestrator.executors import choose, make_executor
from fm9g.orchestrator.launch import LaunchOptions, record_choice, settle_executor
from fm9g.rundir import RunDir
from fm9g.rundir import config as config_mod
from fm9g.rundir.config import ConfigError
from tests.helpers.runs import TINY, cli, events

NO_CONF = "/nonexistent/slurm.conf"


def options(**fields: object) -> LaunchOptions:
    return LaunchOptions(config_path=TINY, overrides=[], **fields)  # type: ignore[arg-type]


def test_no_sbatch_on_the_path_is_local(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no sbatch, no scontrol
    choice = choose.choose_auto()
    assert (choice.kind, choice.why) == ("local", "no sbatch on PATH")


def test_a_missing_slurm_conf_is_local_with_the_file_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_CONF", NO_CONF)
    choice = choose.choose_auto()
    assert choice.kind == "local"
    # Where sbatch is installed the why names the file; elsewhere the missing sbatch.
    assert NO_CONF in choice.why if shutil.which("sbatch") else choice.why == "no sbatch on PATH"


def test_auto_is_written_concrete_and_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_CONF", NO_CONF)
    config, _ = config_mod.load(TINY, [f"run_root={tmp_path}"])
    assert config.executor == "auto"  # the example names none
    run = RunDir.of(tmp_path / "r").make()
    settled, choice = settle_executor(config, run, options())
    assert settled.executor == "local" and choice.requested == "auto"
    record_choice(run, choice)
    [event] = events(run.root, choose.EVENT)
    assert (event.data["chosen"], event.data["requested"]) == ("local", "auto")
    assert event.data["why"] == choice.why


def test_auto_keeps_the_executor_an_existing_run_was_started_with(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Re-running the command of a Slurm run resumes it on Slurm, whatever a probe would say now."""
    monkeypatch.setenv("PATH", str(tmp_path))  # a probe here would say local
    config, _ = config_mod.load(TINY, [f"run_root={tmp_path}"])
    run = RunDir.of(tmp_path / "r").make()
    run.config.write_text(config_mod.dump(config.model_copy(update={"executor": "slurm"})))
    settled, choice = settle_executor(config, run, options())
    assert settled.executor == "slurm" and "config.yaml" in choice.why


def test_a_named_executor_is_not_probed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    config, _ = config_mod.load(TINY, [f"run_root={tmp_path}", "executor=slurm"])
    settled, choice = settle_executor(config, RunDir.of(tmp_path / "r"), options(executor="slurm"))
    assert settled.executor == "slurm" and choice.requested == "slurm"


def test_make_executor_refuses_auto() -> None:
    with pytest.raises(ConfigError, match="executor: local"):
        make_executor("auto")


def test_resume_of_a_config_saying_auto_names_the_fix(tmp_path: Path) -> None:
    config, _ = config_mod.load(TINY, [f"run_root={tmp_path}"])
    run = RunDir.of(tmp_path / "r").make()
    run.config.write_text(config_mod.dump(config))  # executor: auto, as by a hand edit
    result = subprocess.run(cli("resume", str(run.root), "--no-progress"), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "executor: local" in result.stderr
    assert not run.state_db.exists()


def test_a_model_folder_run_resolves_auto_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """infer/serve/convert on a bare model folder: the choice is recorded and its config.yaml
    keeps it, so `cancel` and `serve --stop` never probe."""
    from fm9g.orchestrator.inference.jobs import open_context
    from fm9g.orchestrator.inference.stages import resolve_target

    monkeypatch.setenv("SLURM_CONF", NO_CONF)
    monkeypatch.setenv("FM9G_LAUNCH_SITE", "")
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    target = resolve_target(folder, run_root=tmp_path / "runs")
    assert config_mod.load_resolved(target.run.config).executor == "auto"
    ctx = open_context(target.run, target.config, "auto", say=lambda line: None)
    try:
        assert ctx.executor.name == "local" and ctx.config.executor == "local"
    finally:
        ctx.store.close()
    assert config_mod.load_resolved(target.run.config).executor == "local"
    [event] = events(target.run.root, choose.EVENT)
    assert event.data["chosen"] == "local"


# ------------------------------------------------------- local with several nodes, Slurm up


def launch_argv(root: Path, *extra: str) -> list[str]:
    return cli("pretrain", "--config", str(TINY), "--name", "r", "--no-progress", "--set", f"run_root={root}", *extra)


@pytest.mark.cluster
def test_local_on_several_nodes_where_slurm_answers_is_refused_without_a_terminal(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    argv = launch_argv(root, "--executor", "local", "--nodes", "2")
    refused = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--yes" in refused.stderr
    assert not (root / "r").exists(), "a refused launch writes nothing"
    # A dry run writes nothing the run reads, so it asks nothing.
    dry = subprocess.run([*argv, "--dry-run"], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert dry.returncode == 0, dry.stderr
    assert not (root / "r" / "config.yaml").exists()


@pytest.mark.cluster
def test_local_on_one_node_asks_nothing(tmp_path: Path) -> None:
    """One node on this machine is what local means: no question, whatever Slurm says.
    The run stops at an unreadable state.db, right after config.yaml is written."""
    run = RunDir.of(tmp_path / "runs" / "r").make()
    run.state_db.write_bytes(b"not a database" * 100)
    argv = launch_argv(tmp_path / "runs", "--executor", "local", "--nodes", "1")
    result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and str(run.state_db) in result.stderr  # past the question
    assert config_mod.load_resolved(run.config).executor == "local"


def answer_at_a_terminal(argv: list[str], answer: bytes) -> subprocess.CompletedProcess[str]:
    """Run `argv` with a pseudo-terminal as stdin, `answer` typed ahead into it."""
    import os
    import pty

    master, terminal = pty.openpty()
    try:
        proc = subprocess.Popen(argv, stdin=terminal, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        os.close(terminal)
        os.write(master, answer)  # the terminal holds it until the question reads it
        out, error = proc.communicate(timeout=120)
    finally:
        os.close(master)
    return subprocess.CompletedProcess(argv, proc.returncode, out, error)


@pytest.mark.cluster
@pytest.mark.parametrize("answer", [b"n\n", b"\n"])
def test_no_at_the_terminal_starts_nothing(tmp_path: Path, answer: bytes) -> None:
    root = tmp_path / "runs"
    result = answer_at_a_terminal(launch_argv(root, "--executor", "local", "--nodes", "2"), answer)
    assert result.returncode == 2, result.stderr
    assert not (root / "r").exists()


@pytest.mark.cluster
def test_yes_at_the_terminal_goes_on(tmp_path: Path) -> None:
    """Without a terminal the same command is refused; with one, `y` lets it start.  It
    stops at an unreadable state.db, right after config.yaml is written."""
    run = RunDir.of(tmp_path / "runs" / "r").make()
    run.state_db.write_bytes(b"not a database" * 100)
    result = answer_at_a_terminal(launch_argv(tmp_path / "runs", "--executor", "local", "--nodes", "2"), b"y\n")
    assert result.returncode == 2 and str(run.state_db) in result.stderr  # past the question
    assert config_mod.load_resolved(run.config).executor == "local"


def silent_slurm_conf(tmp_path: Path) -> str:
    """A Slurm config whose controller is nobody: `scontrol ping` says DOWN at once."""
    conf = tmp_path / "silent.conf"
    conf.write_text(
        "ClusterName=silent\nSlurmctldHost=localhost(127.0.0.1)\nSlurmctldPort=9\nMessageTimeout=1\n"
        "NodeName=n1\nPartitionName=p Nodes=n1\n"
    )
    return str(conf)


@pytest.mark.skipif(shutil.which("sbatch") is None, reason="needs Slurm's commands installed (not a running cluster)")
def test_auto_with_a_silent_controller_does_not_quietly_run_every_node_here(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLURM_CONF", silent_slurm_conf(tmp_path))
    root = tmp_path / "runs"
    refused = subprocess.run(
        launch_argv(root, "--nodes", "2"), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120
    )
    assert refused.returncode == 2 and "--yes" in refused.stderr, refused.stderr
    assert not (root / "r").exists(), "a refused launch writes nothing"
    # One node on this machine is what a laptop run looks like: no question.
    config, choice = settle_executor(config_mod.load(TINY)[0], RunDir.of(root / "r"), options())
    assert choice.kind == "local" and choice.slurm_silent
    assert "is DOWN" in choice.why  # the controller's own line, not the banner under it
