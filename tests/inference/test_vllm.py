"""The vLLM engine (GPU): offline generation and the served endpoint.  Skipped where vllm
or a CUDA GPU is missing (never faked).

Written against vLLM's current API (`LLM(model, dtype, seed, trust_remote_code, **engine
args)`, `SamplingParams` fields and ranges, `--served-model-name NAME PATH`); none of it
has run yet: no GPU with vLLM has been lent to this project."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from fm9g.launchers.infer import VLLM_MISSING, vllm_usable
from fm9g.launchers.prompts import Sampling

from .conftest import ANSWER

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not vllm_usable(), reason=VLLM_MISSING)]

# Small: the tests share one GPU with whatever else runs there.
LIGHT = {"gpu_memory_utilization": 0.3, "max_model_len": 256, "enforce_eager": True}


def test_vllm_generate(hf_model: Path) -> None:
    from fm9g.launchers.infer import generate_vllm

    [[output]] = generate_vllm(hf_model, ["<用户>你好<AI>"], Sampling(temperature=0, max_tokens=16), engine_args=LIGHT)
    assert output["text"].startswith("你好")


def test_vllm_per_prompt_sampling_and_shutdown(hf_model: Path) -> None:
    """Two LLMs one after the other in this process: the first is shut down, so the second
    passes its free-memory check; per-prompt parameters reach vLLM's SamplingParams."""
    from fm9g.launchers.infer import generate_vllm

    base = Sampling(temperature=0, max_tokens=16)
    stopped = Sampling(temperature=0, max_tokens=16, stop=("我是",))
    sampled = Sampling(temperature=1.0, top_k=1, n=2, max_tokens=16, repetition_penalty=1.0, seed=3)
    first = generate_vllm(hf_model, ["<用户>你好<AI>"] * 3, [base, stopped, sampled], engine_args=LIGHT)
    assert first[0][0]["text"] == ANSWER
    assert first[1][0]["text"] == "你好，" and first[1][0]["finish_reason"] == "stop"
    assert [o["text"] for o in first[2]] == [ANSWER, ANSWER]  # top_k 1 is greedy at any temperature
    again = generate_vllm(hf_model, ["<用户>你好<AI>"], base, engine_args=LIGHT)
    assert again[0][0]["text"] == ANSWER


def test_vllm_released_8b_with_its_tokenizer_json(tmp_path: Path) -> None:
    """The 8B's cpm vocabulary through the tokenizer.json convert writes: upstream vLLM, no "cpm" mode."""
    from fm9g.launchers.infer import generate_transformers, generate_vllm
    from fm9g.model.convert import convert_released
    from tests.helpers.released import released_args, vocab_size_of, write_released_hf, write_tokenizer

    tokenizer = write_tokenizer("8b", tmp_path / "tok")
    source = write_released_hf(tmp_path / "8b", released_args("8b", vocab_size_of(tokenizer)), 11, tokenizer=tokenizer)
    folder = convert_released(source, tmp_path / "8b-hf")
    sampling = Sampling(temperature=0, max_tokens=4, ignore_eos=True)
    [[ours]] = generate_vllm(folder, ["中国的首都是北京。"], sampling, engine_args=LIGHT)
    assert ours["tokens"] == 4
    [[reference]] = generate_transformers(folder, ["中国的首都是北京。"], Sampling(temperature=0, max_tokens=1))
    assert ours["text"].startswith(reference["text"])  # the same first token (bf16 on both engines)


def test_vllm_serve(trained_run, tmp_path: Path) -> None:
    from fm9g.orchestrator.cli import main

    from .conftest import check_server

    args = ["--engine-arg", "max-model-len=256", "--engine-arg", "gpu-memory-utilization=0.3"]
    try:
        assert main(["serve", str(trained_run.run.root), "--engine", "vllm", "--executor", "local", *args]) == 0
        endpoint = check_server(trained_run.run)
        assert endpoint["engine"] == "vllm" and endpoint["model"] == trained_run.run.name
    finally:
        main(["serve", str(trained_run.run.root), "--stop"])


@pytest.mark.skipif(
    not os.environ.get("FM9G_AWQ_MODEL"),
    reason="set FM9G_AWQ_MODEL to an AWQ (or GPTQ, with FM9G_QUANTIZATION=gptq) FM9G 2B folder; "
    "none can be made offline here (quantizing needs autoawq / llm-compressor and calibration data)",
)
def test_vllm_serve_quantized_2b(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import openai

    from fm9g.orchestrator.cli import main
    from fm9g.rundir import RunDir

    model = Path(os.environ["FM9G_AWQ_MODEL"])
    method = os.environ.get("FM9G_QUANTIZATION", "awq")
    monkeypatch.chdir(tmp_path)
    run = RunDir.of(tmp_path / "runs" / "fm9g-2b-quant")
    argv = ["serve", str(model), "--name", run.name, "--engine", "vllm", "--executor", "local"]
    try:
        assert main([*argv, "--engine-arg", f"quantization={method}", "--engine-arg", "max-model-len=1024"]) == 0
        endpoint = json.loads(run.serve_endpoint.read_text())
        client = openai.OpenAI(base_url=endpoint["url"], api_key=run.api_key_file.read_text().strip(), max_retries=0)
        reply = client.completions.create(model=run.name, prompt="<用户>中国的首都是哪里？<AI>", max_tokens=16)
        assert reply.choices[0].text.strip()
    finally:
        main(["serve", str(model), "--name", run.name, "--stop"])
