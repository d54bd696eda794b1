"""Sampling parameters: vLLM's names and ranges, per prompt line, checked against the
engine before a job is queued; and their effect on the transformers engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fm9g.launchers.infer import generate_transformers
from fm9g.launchers.prompts import InferenceError, read_prompts, sampling_per_prompt
from fm9g.launchers.sampling import PARAMETERS, Sampling, SamplingError, check_engine, from_json
from fm9g.orchestrator.cli import build_parser, main

from .conftest import ANSWER, TrainedRun

CHAT = "<用户>你好<AI>"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "p.jsonl"
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------ the checks (no model)


@pytest.mark.parametrize(
    "values,message",
    [
        ({"temperature": 0, "n": 2}, "greedy decoding gives one completion"),
        ({"top_k": -2}, "top_k -2"),
        ({"min_p": 1.5}, "min_p 1.5"),
        ({"presence_penalty": 2.5}, "presence_penalty 2.5: must be in [-2, 2]"),
        ({"frequency_penalty": -3.0}, "frequency_penalty -3.0"),
        ({"repetition_penalty": 0.0}, "repetition_penalty 0.0: must be > 0"),
        ({"min_tokens": 9, "max_tokens": 4}, "min_tokens 9"),
        ({"top_p": 0.0}, "top_p 0.0"),
    ],
)
def test_vllm_ranges_on_every_engine(values: dict, message: str) -> None:
    with pytest.raises(SamplingError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Sampling(**values)


def test_temperature_above_two_is_refused_where_vllm_may_run() -> None:
    hot = Sampling(temperature=2.5)
    check_engine(hot, "transformers")  # transformers takes any temperature
    with pytest.raises(SamplingError, match=r"vLLM takes \[0, 2\]"):
        check_engine(hot, "vllm")
    with pytest.raises(SamplingError, match="--engine auto may run vLLM"):
        check_engine(hot, "auto")


def test_a_vllm_only_parameter_is_refused_where_transformers_may_run() -> None:
    plain = Sampling(spaces_between_special_tokens=False)
    check_engine(plain, "vllm")
    for engine in ("transformers", "auto"):
        with pytest.raises(SamplingError, match="spaces_between_special_tokens: the transformers engine"):
            check_engine(plain, engine)  # type: ignore[arg-type]


def test_prompt_lines_carry_their_own_parameters(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '{"prompt": "a", "top_k": 20, "stop": "\\n", "id": 7}\n'
        '{"prompt": "b", "sampling": {"repetition_penalty": 1.2, "logit_bias": {"5": -200}}}\n'
        '{"prompt": "c"}\n',
    )
    prompts = read_prompts(path)
    base = Sampling(temperature=0.5, seed=3)
    first, second, third = sampling_per_prompt(path, prompts, base, "auto")
    assert (first.top_k, first.stop, first.temperature, first.seed) == (20, ("\n",), 0.5, 3)
    assert second.repetition_penalty == 1.2 and second.logit_bias == ((5, -100.0),)  # clamped as vLLM does
    assert third == base


@pytest.mark.parametrize(
    "line,message",
    [
        ('{"prompt": "a", "temperature": 3}', ":2: temperature 3.0: vLLM takes [0, 2]"),
        ('{"prompt": "a", "temperature": 0, "n": 3}', ":2: n 3 with temperature 0"),
        ('{"prompt": "a", "top_k": "many"}', ":2: top_k: expected an integer"),
        ('{"prompt": "a", "max_new_tokens": 9}', ":2: max_new_tokens: vLLM calls it 'max_tokens'"),
        ('{"prompt": "a", "logprobs": 2}', ":2: logprobs: not accepted by infer"),
        ('{"prompt": "a", "sampling": {"topk": 2}}', ":2: sampling.topk: not a sampling parameter"),
        ('{"prompt": "a", "stop": ["x", ""]}', ":2: stop: an empty string"),
    ],
)
def test_a_bad_line_is_named(tmp_path: Path, line: str, message: str) -> None:
    path = write(tmp_path, '{"prompt": "fine"}\n' + line + "\n")
    with pytest.raises(InferenceError) as caught:
        sampling_per_prompt(path, read_prompts(path), Sampling(), "auto")
    assert f"{path}{message}" in str(caught.value)


FULL = {
    "temperature": 0.3,
    "top_p": 0.5,
    "max_tokens": 9,
    "n": 2,
    "seed": 4,
    "top_k": 7,
    "min_p": 0.1,
    "min_tokens": 2,
    "presence_penalty": 0.5,
    "frequency_penalty": -0.5,
    "repetition_penalty": 1.3,
    "stop": ["a", "b"],
    "stop_token_ids": [3, 4],
    "include_stop_str_in_output": True,
    "ignore_eos": True,
    "bad_words": ["bad"],
    "logit_bias": {"1": 2.0},
    "allowed_token_ids": [1, 2, 3],
    "skip_special_tokens": False,
    "spaces_between_special_tokens": False,
}


def test_json_round_trip_of_every_parameter() -> None:
    assert set(FULL) == set(PARAMETERS)
    full = Sampling(
        temperature=0.3,
        top_p=0.5,
        max_tokens=9,
        n=2,
        seed=4,
        top_k=7,
        min_p=0.1,
        min_tokens=2,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        repetition_penalty=1.3,
        stop=("a", "b"),
        stop_token_ids=(3, 4),
        include_stop_str_in_output=True,
        ignore_eos=True,
        bad_words=("bad",),
        logit_bias=((1, 2.0),),
        allowed_token_ids=(1, 2, 3),
        skip_special_tokens=False,
        spaces_between_special_tokens=False,
    )
    assert set(full.to_dict()) == set(PARAMETERS)  # every parameter differs from its default here
    assert from_json(full.to_json()) == full
    assert Sampling().to_dict() == {"temperature": 0.8, "top_p": 0.95, "max_tokens": 128, "n": 1, "seed": 0}


# SamplingParams fields of vLLM (vllm/sampling_params.py at commit 00388f6, read for this test).
VLLM_FIELDS = set(
    "n presence_penalty frequency_penalty repetition_penalty temperature top_p top_k min_p seed stop "
    "stop_token_ids ignore_eos max_tokens min_tokens logprobs prompt_logprobs detokenize skip_special_tokens "
    "spaces_between_special_tokens include_stop_str_in_output output_kind structured_outputs logit_bias "
    "allowed_token_ids extra_args bad_words".split()
)


def test_vllm_gets_its_own_field_names_and_only_what_is_set() -> None:
    full = from_json(json.dumps({name: value for name, value in FULL.items()}))
    kwargs = full.vllm_kwargs()
    assert set(kwargs) <= VLLM_FIELDS and set(kwargs) == set(PARAMETERS)
    assert kwargs["logit_bias"] == {1: 2.0} and kwargs["stop"] == ["a", "b"]
    assert set(Sampling(temperature=0).vllm_kwargs()) == {"temperature", "top_p", "max_tokens", "n", "seed"}


def test_cli_options_match_the_table() -> None:
    args = build_parser().parse_args(
        ["infer", "r", "--prompts", "p", "--output", "o", "--top-k", "5", "--stop", "x", "--stop", "y"]
        + ["--logit-bias", "3=-1.5", "--no-skip-special-tokens", "--stop-token-ids", "4", "5", "--ignore-eos"]
    )
    from fm9g.launchers.sampling import sampling_from

    sampling = sampling_from(args)
    assert sampling.top_k == 5 and sampling.stop == ("x", "y") and sampling.logit_bias == ((3, -1.5),)
    assert sampling.stop_token_ids == (4, 5) and sampling.ignore_eos and not sampling.skip_special_tokens


def test_cli_refuses_before_any_conversion(trained_run: TrainedRun, tmp_path: Path, capsys) -> None:
    run = trained_run.run
    path = write(tmp_path, '{"prompt": "你好"}\n{"prompt": "hot", "temperature": 2.5}\n')
    code = main(["infer", str(run.root), "--prompts", str(path), "--output", str(tmp_path / "o.jsonl")])
    assert code == 2
    assert f"{path}:2: temperature 2.5" in capsys.readouterr().err
    assert not (run.root / "hf").exists() and not list(run.scripts.glob("*.sbatch"))
    code = main(
        ["infer", str(run.root), "--prompts", str(path), "--output", str(tmp_path / "o.jsonl")]
        + ["--n", "2", "--temperature", "0"]
    )
    assert code == 2 and "greedy decoding gives one completion" in capsys.readouterr().err


# ------------------------------------------------------------------ effects on the transformers engine


def one(hf_model: Path, prompt: str = CHAT, **values: object) -> dict:
    [[output]] = generate_transformers(hf_model, [prompt], Sampling(**{"temperature": 0, "max_tokens": 24, **values}))
    return output


def test_stop_string_cuts_the_text(hf_model: Path) -> None:
    assert one(hf_model)["text"] == ANSWER  # 你好，我是九格。
    cut = one(hf_model, stop=("我是",))
    assert cut["text"] == "你好，" and cut["finish_reason"] == "stop"
    kept = one(hf_model, stop=("我是",), include_stop_str_in_output=True)
    assert kept["text"] == "你好，我是"


def test_ignore_eos_and_min_tokens_run_to_the_length(hf_model: Path) -> None:
    assert one(hf_model, max_tokens=24)["finish_reason"] == "stop"
    past = one(hf_model, max_tokens=24, ignore_eos=True)
    assert past["finish_reason"] == "length" and past["tokens"] == 24 and past["text"].startswith(ANSWER)
    assert one(hf_model, max_tokens=24, min_tokens=24)["tokens"] == 24


def test_logit_bias_bad_words_and_allowed_tokens_change_the_answer(hf_model: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_model)
    first = tokenizer(CHAT)["input_ids"]
    answer_ids = tokenizer(CHAT + ANSWER)["input_ids"][len(first) :]
    banned = one(hf_model, logit_bias=((answer_ids[0], -100.0),))
    assert not banned["text"].startswith(ANSWER[:1]) or banned["text"] != ANSWER
    assert one(hf_model, bad_words=("我是九格",))["text"] != ANSWER  # one token of this tokenizer
    only = one(hf_model, allowed_token_ids=(answer_ids[0], answer_ids[1]), max_tokens=6, ignore_eos=True)
    assert only["tokens"] == 6 and set(tokenizer(only["text"], add_special_tokens=False)["input_ids"]) <= set(
        answer_ids[:2]
    )


def test_penalties_change_a_sampled_continuation(hf_model: Path) -> None:
    greedy_long = one(hf_model, max_tokens=24, ignore_eos=True)["text"]
    repeated = one(hf_model, max_tokens=24, ignore_eos=True, frequency_penalty=2.0, presence_penalty=2.0)["text"]
    assert repeated != greedy_long
    # The learned answer repeats the prompt's 你好, which a strong repetition penalty (prompt included) forbids.
    assert not one(hf_model, repetition_penalty=100.0)["text"].startswith("你好")


def test_top_k_one_is_greedy_at_any_temperature(hf_model: Path) -> None:
    hot = one(hf_model, temperature=1.9, top_k=1, seed=5)
    assert hot["text"] == ANSWER


def test_per_line_parameters_reach_the_job_output(hf_model: Path, tmp_path: Path) -> None:
    from fm9g.launchers import infer

    prompts = write(tmp_path, '{"prompt": "你好"}\n{"prompt": "你好", "stop": ["我是"], "max_tokens": 8}\n')
    out = tmp_path / "o.jsonl"
    argv = ["--model", str(hf_model), "--prompts", str(prompts), "--output", str(out), "--chat"]
    assert infer.main([*argv, "--engine", "transformers", "--temperature", "0", "--max-tokens", "24"]) == 0
    first, second = (json.loads(line) for line in out.read_text().splitlines())
    assert first["text"] == ANSWER and "stop" not in first["sampling"]
    assert (
        second["text"] == "你好，" and second["sampling"]["stop"] == ["我是"] and second["sampling"]["max_tokens"] == 8
    )
