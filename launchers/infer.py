"""The body of an infer job (node side), what templates/infer.sbatch.j2 runs:

    python -m fm9g.launchers.infer --model HF_DIR --prompts IN.jsonl --output OUT.jsonl
        [--chat] [--engine auto|vllm|transformers] [--temperature T --top-p P --max-tokens N --n N --seed S]

It writes OUT.jsonl in one atomic step: one line per prompt, in the prompt file's order.

The engines: vLLM's `LLM.generate` when vllm is importable and a CUDA GPU is present,
else transformers' `generate` on whatever device torch has.  torch, transformers and
vllm are imported only inside the functions that use them, so the login side can import
`check_model_dir` and a CPU install never needs vllm.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from fm9g.launchers.prompts import (
    InferenceError,
    Sampling,
    add_sampling_options,
    completion_record,
    dump_jsonl,
    format_prompt,
    read_prompts,
    sampling_from,
)
from fm9g.rundir.atomic import write_text

Engine = Literal["vllm", "transformers"]
EngineChoice = Literal["auto", "vllm", "transformers"]
VLLM_MISSING = "vllm not installed / no CUDA GPU"


def vllm_usable() -> bool:
    """True when vllm can be imported and torch sees a CUDA GPU."""
    if importlib.util.find_spec("vllm") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


def choose_engine(requested: EngineChoice) -> Engine:
    """The engine to run: `auto` picks vLLM on a GPU node with vllm, transformers otherwise."""
    if requested == "transformers":
        return "transformers"
    usable = vllm_usable()
    if requested == "vllm" and not usable:
        raise InferenceError(
            f"--engine vllm asked for, but {VLLM_MISSING} on this node; "
            "install the gpu extra (pip install 'fm9g-launch[gpu]') on a GPU node, or use --engine auto"
        )
    return "vllm" if usable else "transformers"


def tokenizer_mode(model_dir: Path) -> str:
    """vLLM's tokenizer_mode: "cpm" for a folder with only the 8B cpm vocab (FM9G's vLLM fork), else "auto"."""
    has_hf = any((model_dir / name).exists() for name in ("tokenizer.json", "tokenizer.model"))
    has_cpm = any((model_dir / name).exists() for name in ("vocab.txt", "vocabs.txt"))
    return "cpm" if has_cpm and not has_hf else "auto"


def check_model_dir(model_dir: Path) -> None:
    if not (model_dir / "config.json").is_file():
        raise InferenceError(
            f"{model_dir}: not a Hugging Face model folder (no config.json); "
            "convert a run first (fm9g-launch convert RUN) or pass the run itself"
        )


class _Tokenizer:
    """encode (with BOS) / decode / eos over an HF tokenizer, or FM9G's own for a cpm vocab."""

    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoTokenizer

        try:
            self.hf: Any = AutoTokenizer.from_pretrained(model_dir)
            self.ours: Any = None
            self.eos_id = self.hf.eos_token_id
        except (OSError, ValueError, TypeError, KeyError):
            # The 8B "cpm" vocab.txt has no HF tokenizer class; FM9G's loader reads it.
            from fm9g.data.tokenizer import load_tokenizer

            self.hf = None
            self.ours = load_tokenizer(model_dir)
            self.eos_id = self.ours.eos_id

    def encode(self, text: str) -> list[int]:
        if self.hf is not None:
            return list(self.hf(text)["input_ids"])
        return [self.ours.bos_id, *self.ours.encode(text)]

    def decode(self, ids: list[int]) -> str:
        if self.hf is not None:
            return str(self.hf.decode(ids, skip_special_tokens=True))
        return str(self.ours.decode(ids))


def generate_transformers(
    model_dir: Path,
    texts: list[str],
    sampling: Sampling,
    progress: Callable[[int, int], None] = lambda done, total: None,
) -> list[list[dict[str, Any]]]:
    """Completions of each text with transformers `generate`, one prompt at a time.

    The RNG is seeded with `seed + index` before each prompt, so a prompt's completions
    do not depend on the other prompts of the file or on their order."""
    import torch
    from transformers import AutoModelForCausalLM

    check_model_dir(model_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = _Tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto").to(device).eval()
    eos = tokenizer.eos_id
    options: dict[str, Any] = {
        "max_new_tokens": sampling.max_tokens,
        "num_return_sequences": sampling.n,
        "eos_token_id": eos,
        "pad_token_id": eos if eos is not None else 0,
    }
    if sampling.temperature > 0:
        options.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p)
    else:
        options.update(do_sample=False, temperature=None, top_p=None)
    results = []
    for index, text in enumerate(texts):
        ids = torch.tensor([tokenizer.encode(text)], device=device)  # (1, prompt_len)
        torch.manual_seed(sampling.seed + index)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **options)  # (n, prompt_len + new)
        outputs = []
        for row in out[:, ids.shape[1] :].tolist():
            stop = eos is not None and eos in row
            row = row[: row.index(eos)] if stop else row
            outputs.append(
                {
                    "text": tokenizer.decode(row),
                    "finish_reason": "stop" if stop else "length",
                    "tokens": len(row) + (1 if stop else 0),
                }
            )
        results.append(outputs)
        progress(index + 1, len(texts))
    return results


def generate_vllm(
    model_dir: Path,
    texts: list[str],
    sampling: Sampling,
    progress: Callable[[int, int], None] = lambda done, total: None,
) -> list[list[dict[str, Any]]]:
    """Completions of each text with vLLM's offline `LLM.generate` (GPU)."""
    from vllm import LLM, SamplingParams

    check_model_dir(model_dir)
    llm = LLM(model=str(model_dir), tokenizer_mode=tokenizer_mode(model_dir), dtype="auto", seed=sampling.seed)
    # One SamplingParams per prompt, seeded like the transformers engine (seed + index).
    params = [
        SamplingParams(
            n=sampling.n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=sampling.max_tokens,
            seed=sampling.seed + index,
        )
        for index in range(len(texts))
    ]
    results = []
    for request in llm.generate(texts, params):
        results.append(
            [
                {
                    "text": choice.text,
                    "finish_reason": choice.finish_reason or "length",
                    "tokens": len(choice.token_ids),
                }
                for choice in request.outputs
            ]
        )
    progress(len(texts), len(texts))
    return results


def generate(
    engine: Engine,
    model_dir: Path,
    texts: list[str],
    sampling: Sampling,
    progress: Callable[[int, int], None] = lambda done, total: None,
) -> list[list[dict[str, Any]]]:
    runner = generate_vllm if engine == "vllm" else generate_transformers
    return runner(model_dir, texts, sampling, progress)


def run(model: Path, prompts_path: Path, output: Path, sampling: Sampling, *, chat: bool, engine_choice: str) -> int:
    """Generate completions for every prompt and write them; returns the number written."""
    prompts = read_prompts(prompts_path)
    texts = [format_prompt(p.text, chat) for p in prompts]
    engine = choose_engine(engine_choice)  # type: ignore[arg-type]
    print(
        f"infer: {len(prompts)} prompts from {prompts_path}, model {model}, engine {engine}, "
        f"sampling {sampling.to_dict()}, chat format {'on' if chat else 'off'}",
        flush=True,
    )
    started = time.monotonic()

    def progress(done: int, total: int) -> None:
        if done == total or done % 10 == 0:
            print(f"infer: {done}/{total} prompts ({time.monotonic() - started:.1f}s)", flush=True)

    results = generate(engine, model, texts, sampling, progress)
    records = [
        completion_record(p, text, outputs, sampling=sampling, model=str(model), engine=engine)
        for p, text, outputs in zip(prompts, texts, results)
    ]
    write_text(output, dump_jsonl(records))
    print(f"infer: wrote {len(records)} lines to {output}", flush=True)
    return len(records)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fm9g.launchers.infer", description="Offline batch generation over a jsonl prompt file."
    )
    parser.add_argument("--model", type=Path, required=True, help="Hugging Face model folder")
    parser.add_argument("--prompts", type=Path, required=True, help='jsonl, one {"prompt": ...} per line')
    parser.add_argument("--output", type=Path, required=True, help="jsonl of completions, same order")
    parser.add_argument("--chat", action="store_true", help="wrap prompts in the chat format <用户>…<AI>")
    parser.add_argument("--engine", choices=["auto", "vllm", "transformers"], default="auto")
    add_sampling_options(parser)
    args = parser.parse_args(argv)
    try:
        run(args.model, args.prompts, args.output, sampling_from(args), chat=args.chat, engine_choice=args.engine)
    except InferenceError as exc:
        print(f"infer: error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
