"""The plan and the run-directory rules around it: a dry run validates what a real run
validates and writes the scripts the real run submits; a refused command writes nothing."""

from __future__ import annotations

import fcntl
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from fm9g.orchestrator.cli import main
from fm9g.orchestrator.plan import StageKind, plan_run
from fm9g.rundir import RunDir
from fm9g.rundir import config as config_mod
from tests.helpers.runs import TINY, events, pretrain_argv, state

EXAMPLE = TINY.parent


def tiny_copy(tmp_path: Path, mixture: list[dict] | None = None) -> Path:
    """The tiny example's config, mixture and data under tmp_path (the mixture editable)."""
    shutil.copytree(EXAMPLE, tmp_path / "tiny")
    if mixture is not None:
        (tmp_path / "tiny" / "mixture.json").write_text(json.dumps(mixture))
    return tmp_path / "tiny" / "pretrain.yaml"


def cli_args(config: Path, root: Path, name: str, *extra: str) -> list[str]:
    return [
        "pretrain",
        "--config",
        str(config),
        "--name",
        name,
        "--no-progress",
        "--executor",
        "local",
        "--yes",
        "--set",
        f"run_root={root}",
        "--set",
        "train.train_iters=12",
        "--set",
        "train.save_iters=6",
        *extra,
    ]


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root`, by relative path (a run directory, byte for byte)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_plan_lists_every_stage_with_its_jobs_and_dependencies(tmp_path: Path) -> None:
    config, _ = config_mod.load(TINY, [f"run_root={tmp_path}", "pipeline.after_train=[convert]"])
    run = RunDir.of(tmp_path / "p")
    plan = plan_run(config, run)
    kinds = [(stage.name, stage.kind) for stage in plan.stages]
    assert kinds == [
        ("index:zh", StageKind.INDEX),
        ("index:en", StageKind.INDEX),
        ("tokenizer", StageKind.TOKENIZER),
        ("train", StageKind.TRAIN),
        ("convert", StageKind.CONVERT),
    ]
    assert plan.stage("tokenizer").depends_on == ("index:zh", "index:en")
    assert plan.stage("train").depends_on == ("index:zh", "index:en", "tokenizer")
    assert [job.role for job in plan.stage("index:zh").jobs] == ["shard", "merge"]
    assert [job.role for job in plan.stage("train").jobs] == ["master", "worker"]
    assert not run.root.exists(), "planning writes nothing"


@pytest.mark.parametrize("dry_run", [True, False])
def test_missing_mixture_is_the_same_error_with_or_without_dry_run(
    tmp_path: Path, dry_run: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tiny_copy(tmp_path)
    (config.parent / "mixture.json").unlink()
    code = main(cli_args(config, tmp_path / "runs", "m", *(["--dry-run"] if dry_run else [])))
    error = capsys.readouterr().err
    assert code == 2 and "mixture.json" in error
    assert not (tmp_path / "runs" / "m").exists(), "a refused launch leaves no run behind"


@pytest.mark.parametrize("dry_run", [True, False])
def test_negative_weight_is_refused_before_anything_runs(
    tmp_path: Path, dry_run: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    mixture = json.loads((EXAMPLE / "mixture.json").read_text())
    mixture[0]["abs_weight"] = -1
    config = tiny_copy(tmp_path, mixture)
    code = main(cli_args(config, tmp_path / "runs", "w", *(["--dry-run"] if dry_run else [])))
    assert code == 2 and "abs_weight" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "w").exists()


def test_dry_run_of_an_existing_run_writes_nowhere_the_run_reads(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    assert main(cli_args(TINY, root, "d", "--dry-run")) == 0
    run = RunDir.of(root / "d")
    assert not run.config.exists() and not run.scripts.exists()
    before = {k: v for k, v in snapshot(run.root).items() if not k.startswith("dry-run/")}
    assert main(cli_args(TINY, root, "d", "--dry-run", "--set", "train.lr=0.5")) == 0
    after = {k: v for k, v in snapshot(run.root).items() if not k.startswith("dry-run/")}
    assert before == after
    assert "lr: 0.5" in (run.dry_run / "config.yaml").read_text()


def test_a_command_refused_by_the_lock_leaves_the_run_byte_for_byte(tmp_path: Path) -> None:
    """issue 18 #1: `pretrain --name X` while X's supervisor runs used to rewrite config.yaml first."""
    root = tmp_path / "runs"
    run = RunDir.of(root / "x")
    run.make()
    (run.config).write_text("the live run's config\n")
    (run.scripts / "train-master0-a1.sbatch").write_text("the live run's script\n")
    with open(run.lock, "a+") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a live supervisor
        before = snapshot(run.root)
        assert main(cli_args(TINY, root, "x", "--set", "train.train_iters=20")) == 2
        assert main(["resume", str(run.root)]) == 2
        assert snapshot(run.root) == before


@pytest.mark.slow
def test_dry_run_scripts_are_the_bytes_the_real_run_submits(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    argv = pretrain_argv(root, "same", "--set", "train.train_iters=12", "--set", "train.save_iters=6")
    subprocess.run([*argv, "--dry-run"], check=True, capture_output=True, timeout=120)
    result = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    run = RunDir.of(root / "same")
    dry = sorted((run.dry_run / "scripts").iterdir())
    assert len(dry) == 7  # 2 datasets x (shard, merge), tokenizer, master, worker
    for script in dry:
        assert script.read_bytes() == (run.scripts / script.name).read_bytes(), script.name
    assert (run.dry_run / "config.yaml").read_bytes() == run.config.read_bytes()
    # every job of every stage has a row, and the index jobs ran as tracked jobs
    submitted = events(run.root, "submitted")
    with state(run.root) as store:
        stages = {row.stage for row in store.jobs()}
        assert {"index:zh", "index:en", "tokenizer", "train"} <= stages
        merges = [row for row in store.jobs() if row.role == "merge"]
        assert len(merges) == 2
        for merge in merges:
            shard = next(row for row in store.jobs(merge.stage) if row.role == "shard")
            event = next(e for e in submitted if e.job == merge.id)
            assert event.data["after"] == [shard.job_id]  # afterok of its own shard array


def test_resume_of_an_unreadable_state_db_says_what_to_do(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """issue 18 #3: a corrupt state.db is an error naming the file and the way out, not a traceback."""
    root = tmp_path / "runs"
    assert main(cli_args(TINY, root, "c", "--dry-run")) == 0
    run = RunDir.of(root / "c")
    run.make()
    shutil.copy(run.dry_run / "config.yaml", run.config)
    run.state_db.write_bytes(b"not a database" * 100)
    assert main(["resume", str(run.root), "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert str(run.state_db) in error and "resume" in error
    assert run.state_db.read_bytes() == b"not a database" * 100  # left for the user to inspect


def test_a_viewer_holding_the_lock_briefly_does_not_refuse_a_supervisor(tmp_path: Path) -> None:
    """`status` takes the run's lock for a moment while it reconciles; a `resume` started
    in that moment waits for it instead of reporting a supervisor that does not exist."""
    import threading

    from fm9g.orchestrator.launch import SupervisorLock
    from fm9g.orchestrator.reconcile import unsupervised

    run = RunDir.of(tmp_path / "v").make()
    taken, release = threading.Event(), threading.Event()

    def viewer() -> None:
        with unsupervised(run) as free:
            assert free
            taken.set()
            release.wait(5)

    thread = threading.Thread(target=viewer)
    thread.start()
    taken.wait(5)
    threading.Timer(0.3, release.set).start()
    lock = SupervisorLock(run)
    lock.acquire()  # would raise LaunchError without the grace
    lock.release()
    thread.join()
