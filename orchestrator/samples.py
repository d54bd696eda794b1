"""A few greedy generations from a finished run's latest checkpoint, for the end-of-run
summary: the quickest proof that the trained model says something.

Only small models are sampled here, on the login node's CPU; a real model's
generations go through `fm9g-launch infer` (a job, on GPU nodes).  The prompts are the
first lines of the config's `pipeline.eval_prompts`: for a tiny model they must be text
its corpus holds (see examples/tiny/make_corpus.py for why anything else is noise).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

# Above this the login node would spend real time and memory; `infer` is the tool then.
MAX_PARAMETERS = 50_000_000
SENTENCE_END = re.compile(r"[.!?。！？]")


@dataclass(frozen=True)
class Sample:
    """One prompt and what the model said after it (its first sentence)."""

    prompt: str
    completion: str


def first_sentence(text: str) -> str:
    """`text` up to and including the end of its first sentence with a word in it (all of
    it when there is none): a lone "." a model starts with is no sentence."""
    word = next((index for index, char in enumerate(text) if char.isalnum()), None)
    found = SENTENCE_END.search(text, word) if word is not None else None
    return text[: found.end()] if found else text


def summary_samples(checkpoint: Path, prompts_file: Path, *, count: int = 2, max_new_tokens: int = 16) -> list[Sample]:
    """Greedy completions of the first `count` prompts of `prompts_file` from `checkpoint`;
    empty for a model above MAX_PARAMETERS or a checkpoint without its tokenizer."""
    import torch

    from fm9g.data.tokenizer import load_tokenizer
    from fm9g.launchers.prompts import read_prompts
    from fm9g.model.args import load_model_config
    from fm9g.model.checkpoint import Checkpointer
    from fm9g.model.dragonfly import build_model, count_parameters

    tokenizer_dir = Checkpointer.tokenizer_dir(checkpoint)
    if tokenizer_dir is None:
        return []
    args = load_model_config(checkpoint / "config.json")
    if count_parameters(build_model(args, device="meta")) > MAX_PARAMETERS:
        return []
    prompts = [prompt.text for prompt in read_prompts(prompts_file)[:count]]
    tokenizer = load_tokenizer(tokenizer_dir)
    model = build_model(args)
    reader = Checkpointer(checkpoint.parent, rank=0, world_size=1, barrier=lambda: None)
    model.load_state_dict(reader.load_model(checkpoint))
    model.eval()
    samples = []
    for prompt in prompts:
        ids = [tokenizer.bos_id, *tokenizer.encode(prompt)]
        new: list[int] = []
        with torch.no_grad():
            for _ in range(max_new_tokens):
                logits = model(torch.tensor([ids]))[0, -1]  # [vocab]
                token = int(logits.argmax())
                if token == tokenizer.eos_id:
                    break
                ids.append(token)
                new.append(token)
        samples.append(Sample(prompt, first_sentence(tokenizer.decode(new))))
    return samples
