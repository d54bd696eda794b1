"""convert -> infer -> serve through the CLI with the local executor: the same rendered
scripts a cluster would run, as local jobs."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from fm9g.orchestrator.cli import main
from fm9g.orchestrator.executors.local import LocalExecutor
from fm9g.orchestrator.state import TERMINAL_STATES, StateStore
from fm9g.rundir import RunDir

from .conftest import ANSWER, TrainedRun, check_server, write_run_config


def cli(*argv: object) -> int:
    return main([str(a) for a in argv])


def prompts_file(tmp_path: Path, text: str = '{"prompt": "你好"}\n{"input": "中国的首都是哪里"}\n') -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text(text, encoding="utf-8")
    return path


def jobs(run: RunDir, stage: str | None = None) -> list:
    if not run.state_db.exists():
        return []
    store = StateStore(run.state_db, readonly=True)
    try:
        return store.jobs(stage)
    finally:
        store.close()


def stage_status(run: RunDir, name: str) -> str | None:
    store = StateStore(run.state_db, readonly=True)
    try:
        stage = store.stage(name)
        return stage.status if stage else None
    finally:
        store.close()


@pytest.mark.slow  # convert/infer/serve run as local jobs (subprocesses loading transformers)
def test_convert_then_infer(trained_run: TrainedRun, tmp_path: Path) -> None:
    run = trained_run.run
    out = tmp_path / "out" / "completions.jsonl"
    argv = [
        "infer",
        run.root,
        "--prompts",
        prompts_file(tmp_path),
        "--output",
        out,
        "--temperature",
        "0",
        "--max-tokens",
        "24",
    ]
    assert cli(*argv) == 0
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    # data.sft is on in the run's config: the chat format was applied, the learned answers come back.
    assert [r["input"] for r in records] == ["<用户>你好<AI>", "<用户>中国的首都是哪里<AI>"]
    assert [r["text"] for r in records] == [ANSWER, "北京。"]
    assert records[0]["sampling"]["max_tokens"] == 24 and records[0]["sampling"]["temperature"] == 0.0
    hf = run.root / "hf" / str(trained_run.step)
    assert {"config.json", "model.safetensors", "chat_template.jinja"} <= {p.name for p in hf.iterdir()}
    assert stage_status(run, "convert") == "COMPLETED" and stage_status(run, "infer") == "COMPLETED"
    submitted = len(jobs(run))
    assert submitted == 2 and all(job.state == "COMPLETED" for job in jobs(run))
    # Done stages are skipped on a re-run: no new job.
    assert cli(*argv) == 0
    assert len(jobs(run)) == submitted
    assert stage_status(run, "convert") == "SKIPPED" and stage_status(run, "infer") == "SKIPPED"
    assert cli("convert", run.root) == 0 and len(jobs(run)) == submitted


def test_missing_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = RunDir.of(tmp_path / "runs" / "untrained")
    write_run_config(run)
    code = cli("infer", run.root, "--prompts", prompts_file(tmp_path), "--output", tmp_path / "o.jsonl")
    assert code == 2
    err = capsys.readouterr().err
    assert "no complete checkpoint" in err and str(run.root) in err
    assert jobs(run) == []


def test_missing_step(trained_run: TrainedRun, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("convert", trained_run.run.root, "--step", "7") == 2
    err = capsys.readouterr().err
    assert "checkpoint '7'" in err and f"[{trained_run.step}]" in err
    assert jobs(trained_run.run) == []


@pytest.mark.parametrize(
    "text,where",
    [
        ("", ": no prompts"),
        ('{"prompt": "ok"}\n{"prompt": oops}\n', ":2:"),
        ('{"prompt": "ok"}\n{"text": "x"}\n', ":2: no 'prompt'"),
    ],
)
def test_bad_prompt_file(
    trained_run: TrainedRun, tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, where: str
) -> None:
    prompts = prompts_file(tmp_path, text)
    code = cli("infer", trained_run.run.root, "--prompts", prompts, "--output", tmp_path / "o.jsonl")
    assert code == 2
    assert f"{prompts}{where}" in capsys.readouterr().err
    assert jobs(trained_run.run) == []  # nothing was converted or submitted


def test_not_a_run_nor_a_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    assert cli("serve", tmp_path / "empty") == 2
    assert "neither a run directory" in capsys.readouterr().err


@pytest.mark.slow  # convert/infer/serve run as local jobs (subprocesses loading transformers)
def test_infer_on_a_model_folder(hf_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "o.jsonl"
    code = cli(
        "infer",
        hf_model,
        "--prompts",
        prompts_file(tmp_path, '{"prompt": "你好"}\n'),
        "--output",
        out,
        "--chat",
        "--temperature",
        "0",
        "--max-tokens",
        "16",
        "--name",
        "tiny-model",
        "--executor",
        "local",
    )
    assert code == 0
    assert json.loads(out.read_text())["text"] == ANSWER
    run = RunDir.of(tmp_path / "runs" / "tiny-model")
    assert [job.stage for job in jobs(run)] == ["infer"]  # a model folder needs no convert


def test_a_model_folder_wins_over_a_run_of_its_name(hf_model: Path, tmp_path: Path, monkeypatch) -> None:
    """`infer my-model` makes runs/my-model; `serve my-model` later still means the folder."""
    import shutil

    from fm9g.orchestrator.inference.stages import resolve_target

    monkeypatch.chdir(tmp_path)
    shutil.copytree(hf_model, tmp_path / "my-model")
    first = resolve_target(Path("my-model"))
    assert first.model == (tmp_path / "my-model").resolve() and first.run.name == "my-model"
    again = resolve_target(Path("my-model"), name="other")
    assert again.model == (tmp_path / "my-model").resolve() and again.run.name == "other"
    assert resolve_target(Path("my-model")).model is not None


@pytest.fixture
def served(trained_run: TrainedRun) -> Iterator[RunDir]:
    yield trained_run.run
    cli("serve", trained_run.run.root, "--stop")  # never leave a server behind, even on failure


@pytest.mark.slow  # convert/infer/serve run as local jobs (subprocesses loading transformers)
def test_serve_local(served: RunDir, capsys: pytest.CaptureFixture[str]) -> None:
    run = served
    # --engine transformers: on a GPU node with vllm, auto would pick vLLM (tests/inference/test_vllm.py).
    assert cli("serve", run.root, "--executor", "local", "--engine", "transformers") == 0
    endpoint = check_server(run)
    assert endpoint["host"] == "127.0.0.1" and endpoint["engine"] == "transformers"
    assert endpoint["model"] == run.name and endpoint["model_path"] == str((run.root / "hf" / "40").resolve())
    [job] = jobs(run, "serve")
    assert str(job.job_id) == str(endpoint["job_id"])

    from fm9g.orchestrator.status import collect, print_tables

    assert collect(run)["serve"]["url"] == endpoint["url"]
    capsys.readouterr()
    print_tables([run])
    assert f"serving at {endpoint['url']}" in capsys.readouterr().out

    # Serving again finds the live server instead of starting a second one.
    assert cli("serve", run.root) == 0
    assert len(jobs(run, "serve")) == 1

    assert cli("serve", run.root, "--stop") == 0
    assert not run.serve_endpoint.exists()
    executor = LocalExecutor()
    executor.adopt(str(job.job_id), Path(job.log))
    assert executor.poll([str(job.job_id)])[str(job.job_id)].state in TERMINAL_STATES
    assert stage_status(run, "serve") == "COMPLETED"
