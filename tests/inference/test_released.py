"""Infer and serve the released FM9G models once converted: the 2B (MiniCPM-shaped HF folder,
a custom architecture) and the 8B (Llama-shaped, cpm vocabulary), at tiny shapes with
random weights in the released layouts (tests/helpers/released.py).

The converted folder is native (Granite / Llama) with an HF tokenizer, so stock
transformers serves it with no remote code and no FM9G tokenizer; the released 2B folder
itself is refused with the two ways out named."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
import torch

from fm9g.launchers.infer import _Tokenizer, check_model_dir, generate_transformers, has_hf_tokenizer
from fm9g.launchers.prompts import InferenceError, Sampling
from fm9g.model.convert import convert_released
from fm9g.model.released import read_released
from fm9g.orchestrator.cli import main
from fm9g.rundir import RunDir
from tests.helpers.released import (
    reference_logits,
    released_args,
    vocab_size_of,
    write_released_hf,
    write_tokenizer,
)

SEED = 11
PROMPTS = {"2b": "中国的首都是北京。今天天气", "8b": "中国的首都是北京。人工智能"}


@dataclass(frozen=True)
class Converted:
    kind: str
    source: Path  # the released HF folder
    folder: Path  # the native HF folder convert wrote


@pytest.fixture(scope="module", params=["2b", "8b"])
def converted(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Converted:
    kind = request.param
    root = tmp_path_factory.mktemp(f"released-{kind}")
    tokenizer = write_tokenizer(kind, root / "tokenizer")
    args = released_args(kind, vocab_size_of(tokenizer))
    source = write_released_hf(root / f"{kind}_sft_model", args, SEED, tokenizer=tokenizer)
    folder = convert_released(source, root / f"fm9g-{kind}-hf")
    return Converted(kind, source, folder)


def test_the_released_2b_folder_needs_remote_code_or_convert(converted: Converted) -> None:
    config = json.loads((converted.source / "config.json").read_text())
    if converted.kind == "8b":
        assert config["model_type"] == "llama"
        check_model_dir(converted.source)  # Llama-shaped: native already
        return
    with pytest.raises(InferenceError) as caught:
        check_model_dir(converted.source)
    assert "--trust-remote-code" in str(caught.value) and f"fm9g-launch convert {converted.source}" in str(caught.value)
    check_model_dir(converted.folder)  # what convert wrote loads with no remote code


def test_greedy_infer_follows_the_released_weights(converted: Converted) -> None:
    """The first greedy token of `infer` on the converted folder is the released model's own argmax."""
    assert has_hf_tokenizer(converted.folder)
    tokenizer = _Tokenizer(converted.folder)
    assert tokenizer.hf is not None  # an HF tokenizer, also for the cpm vocabulary: no FM9G code needed
    prompt = PROMPTS[converted.kind]
    ids = tokenizer.encode(prompt)
    if converted.kind == "8b":  # tokenizer.json gives the cpm tokenizer's own ids
        from fm9g.data.tokenizer import load_tokenizer

        cpm = load_tokenizer(converted.source / "vocab.txt")
        assert ids == [cpm.bos_id, *cpm.encode(prompt)]
    released = read_released(converted.source)
    logits = reference_logits(released.state, released.args, torch.tensor([ids]))  # (1, len, vocab)
    expected = int(logits[0, -1].argmax())
    [[output]] = generate_transformers(
        converted.folder, [prompt], Sampling(temperature=0, max_tokens=1, ignore_eos=True, skip_special_tokens=False)
    )
    assert output["text"] == tokenizer.decode([expected], skip_special_tokens=False)


@pytest.fixture
def served(converted: Converted, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[RunDir]:
    monkeypatch.chdir(tmp_path)
    name = f"fm9g-{converted.kind}"
    yield RunDir.of(tmp_path / "runs" / name)
    main(["serve", str(converted.folder), "--name", name, "--stop"])


@pytest.mark.slow  # a serve job (subprocess loading transformers)
def test_serve_the_converted_folder(converted: Converted, served: RunDir, tmp_path: Path) -> None:
    """Served under the run name, the OpenAI client gets what `infer` writes for the same prompt."""
    name = served.name
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": PROMPTS[converted.kind]}, ensure_ascii=False) + "\n")
    out = tmp_path / "o.jsonl"
    argv = ["--prompts", prompts, "--output", out, "--temperature", "0", "--max-tokens", "8", "--name", name]
    argv += ["--executor", "local"]
    assert main(["infer", str(converted.folder), *map(str, argv)]) == 0
    expected = json.loads(out.read_text())["text"]

    assert main(["serve", str(converted.folder), "--name", name, "--executor", "local"]) == 0
    endpoint = json.loads(served.serve_endpoint.read_text())
    assert endpoint["model"] == name
    client = openai.OpenAI(
        base_url=endpoint["url"], api_key=served.api_key_file.read_text().strip(), max_retries=0, timeout=120
    )
    completion = client.completions.create(model=name, prompt=PROMPTS[converted.kind], max_tokens=8, temperature=0)
    assert expected and completion.choices[0].text == expected  # random weights: some text, the same on both
