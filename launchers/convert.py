"""The body of a convert job (node side), what templates/convert.sbatch.j2 runs:

    python -m fm9g.launchers.convert --run-dir RUN --step N --output DIR
    python -m fm9g.launchers.convert --source RELEASED [--model 2.4b|8b|PATH] --output DIR

`fm9g.model.convert` exports the checkpoint (or the released `.pt` / HF folder); this
adds the FM9G chat template (chat_template.jinja) so that chat completions work under
transformers and vLLM, and moves the finished folder into place in one rename: DIR
either does not exist or is complete.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from fm9g.launchers.prompts import CHAT_TEMPLATE
from fm9g.rundir.atomic import replace_dir, write_text


def _staged(output: Path, build: Callable[[Path], object]) -> Path:
    """Run `build(staging)`, add the chat template, and rename the folder to `output`."""
    output = output.resolve()
    staging = output.parent / f".staging-{output.name}"
    shutil.rmtree(staging, ignore_errors=True)  # leftovers of a killed job
    try:
        build(staging)
        write_text(staging / "chat_template.jinja", CHAT_TEMPLATE)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if output.exists():
        old = output.parent / f".old-{output.name}"
        shutil.rmtree(old, ignore_errors=True)
        replace_dir(output, old)
        replace_dir(staging, output)
        shutil.rmtree(old, ignore_errors=True)
    else:
        replace_dir(staging, output)
    return output


def export(run_dir: Path, step: int, output: Path) -> Path:
    """Checkpoint `step` of a run -> HF folder `output`."""
    from fm9g.model.convert import convert

    return _staged(output, lambda staging: convert(run_dir, step, staging))


def export_released(
    source: Path,
    output: Path,
    model: str | None = None,
    tokenizer: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """A released FM9G `.pt` or HF folder -> native HF folder `output` (Granite for the 2B, Llama for the 8B)."""
    from fm9g.model.convert import convert_released

    return _staged(output, lambda staging: convert_released(source, staging, model, tokenizer, progress))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fm9g.launchers.convert", description="Export a checkpoint to a Hugging Face folder."
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run-dir", type=Path)
    source.add_argument("--source", type=Path, help="a released FM9G .pt (or its folder) or HF folder")
    parser.add_argument("--step", type=int, help="with --run-dir: the checkpoint step")
    parser.add_argument("--model", help="with --source: 2.4b, 8b or a JSON config the source must match")
    parser.add_argument("--tokenizer", type=Path, help="with --source: tokenizer file when none lies beside it")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.source is not None:
        print(f"convert: {args.source} -> {args.output}", flush=True)
        done = export_released(args.source, args.output, args.model, args.tokenizer)
    else:
        if args.step is None:
            parser.error("--run-dir needs --step")
        print(f"convert: {args.run_dir} step {args.step} -> {args.output}", flush=True)
        done = export(args.run_dir, args.step, args.output)
    print(f"convert: wrote {done}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
