"""SFT data in the guide's own form (`input` already holding `<用户>…`) is not wrapped twice."""

from __future__ import annotations

from pathlib import Path

import pytest

from fm9g.data.indexer import build_index
from fm9g.data.samples import SampleMaker, TaskSource, chat_prompt
from fm9g.data.tokenizer import load_tokenizer

from .conftest import write_jsonl

# The `data_sample` of the guide's meta.json example (fm9g-usage.md, jsonl -> index), verbatim.
GUIDE_DATA_SAMPLE = {
    "input": "<用户>For a car, what scams can be plotted with 0% f...",
    "output": "The car deal makes money 3 ways. If you pay in one...",
    "source": "finance_cpm9g",
}
QUESTION = "For a car, what scams can be plotted with 0% f..."


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("What is 0% financing?", "<用户>What is 0% financing?<AI>"),  # plain question: wrapped
        (GUIDE_DATA_SAMPLE["input"], f"<用户>{QUESTION}<AI>"),  # the guide's form: only <AI> added
        ("<用户>q1<AI>a1<用户>q2<AI>", "<用户>q1<AI>a1<用户>q2<AI>"),  # multi-turn, complete: as is
        ("", "<用户><AI>"),
    ],
)
def test_chat_prompt(given: str, expected: str) -> None:
    assert chat_prompt(given) == expected


def _maker(tmp_path: Path, sp_model: Path, rows: list[dict]) -> SampleMaker:
    build_index(write_jsonl(tmp_path / "raw.jsonl", rows), tmp_path / "idx")
    task = TaskSource("finance", str(tmp_path / "idx"), None, (), "segment", False)
    return SampleMaker([task], load_tokenizer(sp_model), max_length=256, sft=True, seed=0)


def test_the_guides_data_sample_is_wrapped_once(tmp_path: Path, sp_model: Path) -> None:
    plain = {"input": QUESTION, "output": GUIDE_DATA_SAMPLE["output"]}
    maker = _maker(tmp_path, sp_model, [GUIDE_DATA_SAMPLE, plain])
    tok = maker.tokenizer
    ((src, tgt),) = maker.make(0, 0, 0).windows
    user, ai = tok.encode("<用户>")[0], tok.encode("<AI>")[0]
    assert src.tolist().count(user) == 1 and src.tolist().count(ai) == 1
    prompt = tok.encode(f"<用户>{QUESTION}<AI>")
    assert src.tolist() == [tok.bos_id, *prompt, *tok.encode(GUIDE_DATA_SAMPLE["output"])]
    assert (tgt[: len(prompt)] == -100).all() and (tgt[len(prompt) :] != -100).all()  # loss on the answer only
    # the guide's pre-wrapped line trains exactly like the bare question it wraps
    ((plain_src, plain_tgt),) = maker.make(0, 1, 0).windows
    assert plain_src.tolist() == src.tolist() and plain_tgt.tolist() == tgt.tolist()
