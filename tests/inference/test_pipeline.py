"""run_post_train_stages: convert -> infer afterok, skipped when done, a failed stage re-run alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fm9g.orchestrator.executors.local import LocalExecutor
from fm9g.orchestrator.inference.pipeline import run_post_train_stages
from fm9g.orchestrator.state import StateStore
from fm9g.rundir import config as config_mod

from .conftest import ANSWER, TrainedRun


def statuses(store: StateStore) -> dict[str, str]:
    return {stage.name: stage.status for stage in store.stages()}


@pytest.mark.slow  # convert and infer run as local jobs (subprocesses loading transformers)
def test_convert_then_infer_after_training(trained_run: TrainedRun, tmp_path: Path) -> None:
    run = trained_run.run
    prompts = tmp_path / "eval.jsonl"
    prompts.write_text('{"prompt": "你好"}\n{"prompt": broken\n', encoding="utf-8")
    raw = config_mod.read_file(run.config)
    raw["pipeline"] = {"after_train": ["infer", "convert"], "eval_prompts": str(prompts), "eval_max_tokens": 16}
    config = config_mod.validate(raw, "test")
    messages: list[str] = []
    store = StateStore(run.state_db)
    try:
        # The eval prompt file is bad: convert completes, infer fails, and says how to re-run it.
        assert run_post_train_stages(run, config, store, LocalExecutor(), messages.append) == 1
        assert statuses(store) == {"convert": "COMPLETED", "infer": "FAILED"}
        assert any(f"{prompts}:2:" in m for m in messages)
        assert any("fm9g-launch infer" in m for m in messages)

        prompts.write_text('{"prompt": "你好"}\n', encoding="utf-8")
        assert run_post_train_stages(run, config, store, LocalExecutor(), messages.append) == 0
        assert statuses(store) == {"convert": "SKIPPED", "infer": "COMPLETED"}
        output = run.root / "infer" / "infer.jsonl"
        record = json.loads(output.read_text())
        assert record["text"] == ANSWER and record["sampling"]["temperature"] == 0.0

        submitted = len(store.jobs())
        assert run_post_train_stages(run, config, store, LocalExecutor(), messages.append) == 0
        assert statuses(store) == {"convert": "SKIPPED", "infer": "SKIPPED"}
        assert len(store.jobs()) == submitted == 2
    finally:
        store.close()


def test_nothing_configured_does_nothing(trained_run: TrainedRun) -> None:
    config = config_mod.load_resolved(trained_run.run.config)
    store = StateStore(trained_run.run.state_db)
    try:
        assert run_post_train_stages(trained_run.run, config, store, LocalExecutor(), print) == 0
        assert store.stages() == [] and store.jobs() == []
    finally:
        store.close()
