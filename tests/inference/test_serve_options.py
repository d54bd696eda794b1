"""Serving as the FM9G guide's users run vLLM: their API key, a port they choose, engine
arguments passed through, the run's name as the model id.  What cannot work is refused
before any job is queued."""

from __future__ import annotations

import json
import shutil
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from fm9g.launchers import serve
from fm9g.launchers.infer import check_engine_for_model, serving_dtype
from fm9g.launchers.prompts import InferenceError
from fm9g.launchers.serve import Serving, parse_engine_arg, vllm_argv
from fm9g.orchestrator.cli import main
from fm9g.rundir import RunDir

from .conftest import ANSWER, TrainedRun, http_status


def test_engine_args() -> None:
    assert parse_engine_arg("max-model-len=4096") == ("max-model-len", "4096")
    assert parse_engine_arg("gpu_memory_utilization=0.85") == ("gpu-memory-utilization", "0.85")
    assert parse_engine_arg("--quantization=awq") == ("quantization", "awq")
    assert parse_engine_arg("enforce-eager") == ("enforce-eager", None)
    with pytest.raises(ValueError, match="use --port"):
        parse_engine_arg("port=8000")
    with pytest.raises(ValueError, match="use --api-key or --api-key-file"):
        parse_engine_arg("api_key=x")
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        parse_engine_arg("max model len=1")


def test_offline_engine_args_become_llm_keywords() -> None:
    from fm9g.launchers.engine_args import llm_kwargs

    pairs = [parse_engine_arg(t) for t in ("max-model-len=4096", "gpu-memory-utilization=0.85", "enforce-eager")]
    pairs.append(parse_engine_arg("quantization=awq"))
    assert llm_kwargs(pairs) == {
        "max_model_len": 4096,
        "gpu_memory_utilization": 0.85,
        "enforce_eager": True,
        "quantization": "awq",
    }


def test_infer_refuses_engine_args_on_transformers(
    trained_run: TrainedRun, hf_model: Path, tmp_path: Path, capsys
) -> None:
    from fm9g.launchers import infer

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "你好"}\n')
    run = trained_run.run
    argv = ["infer", str(run.root), "--prompts", str(prompts), "--output", str(tmp_path / "o.jsonl")]
    assert main([*argv, "--engine", "transformers", "--engine-arg", "max-model-len=64"]) == 2
    assert "--engine transformers takes none" in capsys.readouterr().err
    assert not list(run.scripts.glob("*.sbatch"))
    body = ["--model", str(hf_model), "--prompts", str(prompts), "--output", str(tmp_path / "o.jsonl")]
    assert infer.main([*body, "--engine", "auto", "--engine-arg", "max-model-len=64"]) == 2  # no vLLM here
    assert "engine arguments are vLLM's" in capsys.readouterr().err and not (tmp_path / "o.jsonl").exists()


def test_vllm_command_line(hf_model: Path, tmp_path: Path) -> None:
    serving = Serving(
        model=hf_model,
        name="tiny-sft",
        key_file=tmp_path / "key",
        endpoint=tmp_path / "endpoint.json",
        host="10.0.0.5",
        port=8000,
        job="1",
        trust_remote_code=True,
        engine_args=(("max-model-len", "4096"), ("gpu-memory-utilization", "0.85"), ("enforce-eager", None)),
    )
    argv = vllm_argv(serving)
    assert argv[argv.index("--served-model-name") + 1 : argv.index("--served-model-name") + 3] == [
        "tiny-sft",
        str(hf_model),
    ]
    assert argv[argv.index("--port") + 1] == "8000" and "--trust-remote-code" in argv
    assert argv[-5:] == ["--max-model-len", "4096", "--gpu-memory-utilization", "0.85", "--enforce-eager"]
    # The fixture export is fp32: served in bf16, said explicitly; no tokenizer mode at all (vLLM has no "cpm").
    assert json.loads((hf_model / "config.json").read_text()).get("torch_dtype", "float32") == "float32"
    assert argv[argv.index("--dtype") + 1] == "bfloat16"
    assert not any("tokenizer-mode" in a or a == "cpm" for a in argv)
    chosen = vllm_argv(Serving(**{**serving.__dict__, "engine_args": (("dtype", "float16"),)}))
    assert chosen.count("--dtype") == 1 and chosen[chosen.index("--dtype") + 1] == "float16"


def test_dtype_per_device(hf_model: Path, tmp_path: Path) -> None:
    assert serving_dtype(hf_model, gpu=True) == "bfloat16" and serving_dtype(hf_model, gpu=False) == "auto"
    half = tmp_path / "half"
    half.mkdir()
    config = json.loads((hf_model / "config.json").read_text())
    (half / "config.json").write_text(json.dumps({**config, "torch_dtype": "bfloat16"}))
    assert serving_dtype(half, gpu=True) == "auto"


def test_a_vocab_txt_only_folder_is_refused_for_vllm(hf_model: Path, tmp_path: Path) -> None:
    folder = tmp_path / "old-8b"
    folder.mkdir()
    shutil.copy(hf_model / "config.json", folder / "config.json")
    (folder / "vocab.txt").write_text('"<unk>"\n"<s>"\n"</s>"\n')
    with pytest.raises(InferenceError, match="no tokenizer.json .* vLLM cannot load"):
        check_engine_for_model("vllm", folder)
    check_engine_for_model("auto", folder)  # auto runs it on transformers with FM9G's own tokenizer
    check_engine_for_model("vllm", hf_model)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--engine", "transformers", "--engine-arg", "max-model-len=4096"], "--engine transformers takes none"),
        (["--engine-arg", "port=9"], "use --port"),
        (["--api-key", " "], "--api-key is empty"),
        (["--api-key-file", "/nonexistent/key"], "--api-key-file /nonexistent/key: cannot read it"),
    ],
)
def test_refused_before_any_job(trained_run: TrainedRun, capsys, extra: list[str], message: str) -> None:
    run = trained_run.run
    assert main(["serve", str(run.root), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (run.root / "hf").exists() and not list(run.scripts.glob("*.sbatch"))


def test_job_body_refuses_engine_args_on_transformers(hf_model: Path, tmp_path: Path, capsys) -> None:
    key = tmp_path / "key"
    key.write_text("k")
    argv = ["--model", str(hf_model), "--endpoint", str(tmp_path / "e.json"), "--api-key-file", str(key)]
    assert serve.main([*argv, "--engine", "transformers", "--engine-arg", "max-model-len=64"]) == 2
    assert "engine arguments are vLLM's" in capsys.readouterr().err
    assert not (tmp_path / "e.json").exists()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def served(trained_run: TrainedRun) -> Iterator[RunDir]:
    yield trained_run.run
    main(["serve", str(trained_run.run.root), "--stop"])


@pytest.mark.slow  # a serve job (subprocess loading transformers)
def test_users_key_port_and_model_names(served: RunDir, tmp_path: Path, capsys) -> None:
    run = served
    key_file = tmp_path / "my-key"
    key_file.write_text("sk-fm9g-users-own-key\n")
    port = free_port()
    assert main(["serve", str(run.root), "--api-key-file", str(key_file), "--port", str(port)]) == 0
    endpoint = json.loads(run.serve_endpoint.read_text())
    assert endpoint["port"] == port and endpoint["model"] == run.name
    assert endpoint["model_path"] == str((run.root / "hf" / "40").resolve())
    assert run.api_key_file.read_text().strip() == "sk-fm9g-users-own-key"
    assert stat.S_IMODE(run.api_key_file.stat().st_mode) == 0o600
    for script in run.scripts.glob("serve-*.sbatch"):
        assert "sk-fm9g-users-own-key" not in script.read_text()

    client = openai.OpenAI(base_url=endpoint["url"], api_key="sk-fm9g-users-own-key", max_retries=0, timeout=120)
    assert [m.id for m in client.models.list().data] == [run.name, endpoint["model_path"]]
    for model in (run.name, endpoint["model_path"]):  # the name, and the path still
        completion = client.completions.create(model=model, prompt="<用户>你好<AI>", max_tokens=16, temperature=0)
        assert completion.choices[0].text.startswith(ANSWER) and completion.model == run.name
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="some-other-model", prompt="x", max_tokens=2)
    stream = client.chat.completions.create(
        model=run.name, messages=[{"role": "user", "content": "你好"}], max_tokens=16, temperature=0, stream=True
    )
    chunks = list(stream)
    assert {chunk.model for chunk in chunks} == {run.name}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).startswith(ANSWER)
    base = f"http://{endpoint['host']}:{endpoint['port']}"
    assert http_status(f"{base}/v1/models", {"Authorization": "Bearer wrong"}) == 401

    # examples/client.py, as the README shows it: the run's name is the model id.
    client_py = Path(__file__).resolve().parents[2] / "examples" / "client.py"
    printed = subprocess.run(
        [sys.executable, str(client_py), str(run.root), "你好"], capture_output=True, text=True, timeout=300, check=True
    ).stdout
    assert f"completion: {ANSWER}" in printed and f"chat: {ANSWER}" in printed

    # Another key while this server runs: refused, not silently ignored.
    capsys.readouterr()
    assert main(["serve", str(run.root), "--api-key", "another"]) == 2
    assert "another API key" in capsys.readouterr().err
    assert run.api_key_file.read_text().strip() == "sk-fm9g-users-own-key"
