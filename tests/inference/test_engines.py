"""The transformers engine and the infer job body, in-process on the fixture model."""

from __future__ import annotations

import json
from pathlib import Path

from fm9g.launchers import infer
from fm9g.launchers.infer import (
    choose_engine,
    generate_transformers,
    has_hf_tokenizer,
    vllm_usable,
)
from fm9g.launchers.prompts import Sampling

from .conftest import ANSWER


def test_greedy_gives_the_learned_answer(hf_model: Path) -> None:
    assert (hf_model / "chat_template.jinja").is_file()
    [[output]] = generate_transformers(hf_model, ["<用户>你好<AI>"], Sampling(temperature=0, max_tokens=32))
    assert output == {"text": ANSWER, "finish_reason": "stop", "tokens": output["tokens"]}
    assert output["tokens"] >= 2


def test_sampling_is_seeded_per_prompt(hf_model: Path) -> None:
    sampling = Sampling(temperature=1.5, top_p=1.0, max_tokens=6, n=3, seed=11)
    first = generate_transformers(hf_model, ["天气", "the quick"], sampling)
    # The same prompt at another position, alone, with seed + index matching: same completions.
    again = generate_transformers(
        hf_model, ["the quick"], Sampling(temperature=1.5, top_p=1.0, max_tokens=6, n=3, seed=12)
    )
    assert len(first) == 2 and all(len(outputs) == 3 for outputs in first)
    assert first[1] == again[0]
    assert all(o["finish_reason"] == "length" or o["tokens"] <= 6 for o in first[0])


def test_infer_main_writes_every_prompt_in_order(hf_model: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "你好"}\n{"input": "中国的首都是哪里"}\n\n{"prompt": "the quick brown fox"}\n')
    output = tmp_path / "deep" / "out.jsonl"
    argv = [
        "--model",
        str(hf_model),
        "--prompts",
        str(prompts),
        "--output",
        str(output),
        "--chat",
        "--engine",
        "transformers",
        "--temperature",
        "0",
        "--max-tokens",
        "24",
    ]
    assert infer.main(argv) == 0
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["line"] for r in records] == [1, 2, 4]
    assert [r["text"] for r in records] == [ANSWER, "北京。", "jumps over the lazy dog."]
    assert records[0]["input"] == "<用户>你好<AI>" and records[0]["engine"] == "transformers"
    assert records[0]["sampling"] == {"temperature": 0.0, "top_p": 0.95, "max_tokens": 24, "n": 1, "seed": 0}


def test_infer_main_reports_bad_input(hf_model: Path, tmp_path: Path, capsys) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "ok"}\nnot json\n')
    argv = ["--model", str(hf_model), "--prompts", str(prompts), "--output", str(tmp_path / "o.jsonl")]
    assert infer.main(argv) == 2
    assert f"{prompts}:2:" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def test_engine_choice_on_this_machine(hf_model: Path) -> None:
    assert choose_engine("transformers") == "transformers"
    assert choose_engine("auto") == ("vllm" if vllm_usable() else "transformers")
    assert has_hf_tokenizer(hf_model)
