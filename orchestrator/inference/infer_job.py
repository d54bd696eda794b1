"""The body of an infer job (node side), what templates/infer.sbatch.j2 runs:

    python -m fm9g.orchestrator.inference.infer_job --model HF_DIR --prompts IN.jsonl --output OUT.jsonl
        [--chat] [--engine auto|vllm|transformers] [--temperature T --top-p P --max-tokens N --n N --seed S]

It writes OUT.jsonl in one atomic step: one line per prompt, in the prompt file's order.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from fm9g.rundir.atomic import write_text
from fm9g.orchestrator.inference.errors import InferenceError
from fm9g.orchestrator.inference.sampling_options import add_sampling_options
from fm9g.orchestrator.inference.prompts import (
    Sampling,
    completion_record,
    dump_jsonl,
    format_prompt,
    read_prompts,
)


def sampling_from(args: argparse.Namespace) -> Sampling:
    return Sampling(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens, n=args.n, seed=args.seed)


def run(model: Path, prompts_path: Path, output: Path, sampling: Sampling, *, chat: bool, engine_choice: str) -> int:
    """Generate completions for every prompt and write them; returns the number written."""
    from fm9g.orchestrator.inference.engines import choose_engine, generate

    prompts = read_prompts(prompts_path)
    texts = [format_prompt(p.text, chat) for p in prompts]
    engine = choose_engine(engine_choice)  # type: ignore[arg-type]
    print(f"infer: {len(prompts)} prompts from {prompts_path}, model {model}, engine {engine}, "
          f"sampling {sampling.to_dict()}, chat format {'on' if chat else 'off'}", flush=True)
    started = time.monotonic()

    def progress(done: int, total: int) -> None:
        if done == total or done % 10 == 0:
            print(f"infer: {done}/{total} prompts ({time.monotonic() - started:.1f}s)", flush=True)

    results = generate(engine, model, texts, sampling, progress)
    records = [completion_record(p, text, outputs, sampling=sampling, model=str(model), engine=engine)
               for p, text, outputs in zip(prompts, texts, results)]
    write_text(output, dump_jsonl(records))
    print(f"infer: wrote {len(records)} lines to {output}", flush=True)
    return len(records)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fm9g.orchestrator.inference.infer_job",
                                     description="Offline batch generation over a jsonl prompt file.")
    parser.add_argument("--model", type=Path, required=True, help="Hugging Face model folder")
    parser.add_argument("--prompts", type=Path, required=True, help="jsonl, one {\"prompt\": ...} per line")
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
