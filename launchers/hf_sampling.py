"""vLLM's sampling parameters on transformers `generate`, with vLLM's meaning.

Most map onto a `generate` argument of the same meaning (top_k, min_p, min_tokens,
repetition_penalty, bad_words, logit_bias).  Three have no transformers counterpart
with vLLM's semantics and are written here, small: presence and frequency penalties
(vLLM applies them to the generated tokens only, where transformers has none),
allowed_token_ids (a mask), and stop strings (a per-row criterion that works with
FM9G's own cpm tokenizer too, not only with an HF tokenizer).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from fm9g.launchers.sampling import Sampling


class OutputPenalties(LogitsProcessor):
    """vLLM's presence and frequency penalties: logits -= frequency * count + presence * (count > 0),
    counting only the tokens generated after the prompt."""

    def __init__(self, prompt_length: int, presence: float, frequency: float) -> None:
        self.prompt_length, self.presence, self.frequency = prompt_length, presence, frequency

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[:, self.prompt_length :]  # (rows, generated so far)
        counts = torch.zeros_like(scores)  # (rows, vocab)
        counts.scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


class AllowedTokens(LogitsProcessor):
    """Only the listed token ids can be generated (vLLM's allowed_token_ids)."""

    def __init__(self, allowed: tuple[int, ...]) -> None:
        self.allowed = torch.tensor(allowed, dtype=torch.long)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        mask = torch.full_like(scores, float("-inf"))
        mask[:, self.allowed.to(scores.device)] = 0
        return scores + mask


class StopStrings(StoppingCriteria):
    """A row is done once its decoded new text holds any stop string."""

    def __init__(self, prompt_length: int, stops: tuple[str, ...], decode: Callable[[list[int]], str]) -> None:
        self.prompt_length, self.stops, self.decode = prompt_length, stops, decode

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        texts = [self.decode(row) for row in input_ids[:, self.prompt_length :].tolist()]
        done = [any(stop in text for stop in self.stops) for text in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)  # type: ignore[return-value]


def generate_options(
    sampling: Sampling,
    *,
    prompt_length: int,
    eos_id: int | None,
    encode_plain: Callable[[str], list[int]],
    decode: Callable[[list[int]], str],
) -> dict[str, Any]:
    """Keyword arguments of `model.generate` for one prompt of `prompt_length` tokens."""
    stop_ids = [*([] if sampling.ignore_eos or eos_id is None else [eos_id]), *sampling.stop_token_ids]
    options: dict[str, Any] = {
        "max_new_tokens": sampling.max_tokens,
        "num_return_sequences": sampling.n,
        # ignore_eos: nothing but the stop token ids ends a row (vLLM's ignore_eos).
        "eos_token_id": stop_ids or None,
        "pad_token_id": eos_id if eos_id is not None else 0,
        "repetition_penalty": sampling.repetition_penalty if sampling.repetition_penalty != 1.0 else None,
    }
    if sampling.min_tokens:
        options["min_new_tokens"] = sampling.min_tokens
    if sampling.greedy:
        options.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    else:
        options.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p)
        # top_k 0 (or -1) is "all tokens" in vLLM; transformers' default (50 in many
        # generation configs) would cut the distribution, so it is set either way.
        options["top_k"] = sampling.top_k if sampling.top_k > 0 else 0
        if sampling.min_p:
            options["min_p"] = sampling.min_p
    if sampling.bad_words:
        # As vLLM (SamplingParams.update_from_tokenizer): each word alone and after a space.
        variants = {tuple(encode_plain(prefix + word.lstrip())) for word in sampling.bad_words for prefix in ("", " ")}
        options["bad_words_ids"] = [list(ids) for ids in sorted(variants) if ids]
    if sampling.logit_bias:
        options["sequence_bias"] = {(token,): bias for token, bias in sampling.logit_bias}
    processors = LogitsProcessorList()
    if sampling.presence_penalty or sampling.frequency_penalty:
        processors.append(OutputPenalties(prompt_length, sampling.presence_penalty, sampling.frequency_penalty))
    if sampling.allowed_token_ids:
        processors.append(AllowedTokens(sampling.allowed_token_ids))
    if processors:
        options["logits_processor"] = processors
    if sampling.stop:
        options["stopping_criteria"] = StoppingCriteriaList([StopStrings(prompt_length, sampling.stop, decode)])
    return options


def finish(
    row: list[int], sampling: Sampling, *, eos_id: int | None, decode: Callable[[list[int]], str]
) -> dict[str, Any]:
    """One completion record from the generated ids of a row: cut at EOS, a stop token id
    or a stop string, as vLLM does (stop strings left out unless include_stop_str_in_output)."""
    ends = set(sampling.stop_token_ids) | ({eos_id} if eos_id is not None and not sampling.ignore_eos else set())
    cut = next((i for i, token in enumerate(row) if token in ends), None)
    reason = "length"
    if cut is not None:
        reason = "stop"
        # An EOS ends the text; a stop token id stays in it (vLLM keeps non-special stop tokens).
        row = row[: cut + (0 if row[cut] == eos_id else 1)]
        tokens = cut + 1
    else:
        tokens = len(row)
    text = decode(row)
    hits = [(text.find(stop), stop) for stop in sampling.stop if stop in text]
    if hits:
        at, stop = min(hits)
        text = text[: at + (len(stop) if sampling.include_stop_str_in_output else 0)]
        reason = "stop"
    return {"text": text, "finish_reason": reason, "tokens": tokens}
