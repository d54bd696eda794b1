"""Custom architectures (config.json `auto_map`): refused with both ways out named, unless
--trust-remote-code, which then runs the folder's own code on both infer and serve."""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest

from fm9g.launchers import infer
from fm9g.launchers.infer import check_model_dir, custom_architecture, generate_transformers
from fm9g.launchers.prompts import InferenceError, Sampling
from fm9g.orchestrator.cli import main
from fm9g.rundir import RunDir

from .remote_code import write_custom_folder

FAVOURITE = "九"


@pytest.fixture
def custom(hf_model: Path, tmp_path: Path) -> Path:
    return write_custom_folder(tmp_path / "custom-model", tokenizer_from=hf_model, favourite=FAVOURITE)


def test_custom_folder_needs_the_flag(custom: Path) -> None:
    assert custom_architecture(json.loads((custom / "config.json").read_text()))
    with pytest.raises(InferenceError) as caught:
        check_model_dir(custom)
    message = str(caught.value)
    assert str(custom) in message and "auto_map" in message
    assert "--trust-remote-code" in message and f"fm9g-launch convert {custom}" in message
    check_model_dir(custom, trust_remote_code=True)


def test_native_folder_needs_nothing(hf_model: Path) -> None:
    assert custom_architecture(json.loads((hf_model / "config.json").read_text())) is None
    check_model_dir(hf_model)


def test_the_flag_runs_the_folders_code(custom: Path) -> None:
    [[output]] = generate_transformers(
        custom, ["你好"], Sampling(temperature=0, max_tokens=3, ignore_eos=True), trust_remote_code=True
    )
    assert output["text"] == FAVOURITE * 3 and output["finish_reason"] == "length"


def test_infer_job_body_without_and_with_the_flag(custom: Path, tmp_path: Path, capsys) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "你好", "max_tokens": 2, "ignore_eos": true}\n')
    out = tmp_path / "o.jsonl"
    argv = ["--model", str(custom), "--prompts", str(prompts), "--output", str(out), "--temperature", "0"]
    assert infer.main(argv) == 2
    assert "--trust-remote-code" in capsys.readouterr().err and not out.exists()
    assert infer.main([*argv, "--trust-remote-code"]) == 0
    assert json.loads(out.read_text())["text"] == FAVOURITE * 2


def test_cli_refuses_before_any_job(custom: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "你好"}\n')
    code = main(["infer", str(custom), "--prompts", str(prompts), "--output", str(tmp_path / "o.jsonl")])
    assert code == 2
    err = capsys.readouterr().err
    assert "--trust-remote-code" in err and "fm9g-launch convert" in err
    assert main(["serve", str(custom)]) == 2
    assert "--trust-remote-code" in capsys.readouterr().err
    run = RunDir.of(tmp_path / "runs" / "custom-model")
    assert not list(run.scripts.glob("*.sbatch"))  # nothing was rendered, so nothing was queued


@pytest.mark.slow  # a serve job (subprocess loading transformers)
def test_serve_with_the_flag(custom: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    run = RunDir.of(tmp_path / "runs" / "custom-model")
    try:
        assert main(["serve", str(custom), "--trust-remote-code", "--executor", "local"]) == 0
        endpoint = json.loads(run.serve_endpoint.read_text())
        client = openai.OpenAI(
            base_url=endpoint["url"], api_key=run.api_key_file.read_text().strip(), max_retries=0, timeout=120
        )
        completion = client.completions.create(model="custom-model", prompt="你好", max_tokens=2, temperature=0)
        assert completion.choices[0].text.startswith(FAVOURITE)
    finally:
        main(["serve", str(custom), "--stop"])
