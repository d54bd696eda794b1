"""The body of a convert job (node side), what templates/convert.sbatch.j2 runs:

    python -m fm9g.launchers.convert --run-dir RUN --step N --output DIR

`fm9g.model.convert.convert` exports the checkpoint; this adds the FM9G chat template
(chat_template.jinja) so that chat completions work under transformers and vLLM, and
moves the finished folder into place in one rename: DIR either does not exist or is
complete.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from fm9g.launchers.prompts import CHAT_TEMPLATE
from fm9g.rundir.atomic import replace_dir, write_text


def export(run_dir: Path, step: int, output: Path) -> Path:
    from fm9g.model.convert import convert

    output = output.resolve()
    staging = output.parent / f".staging-{output.name}"
    shutil.rmtree(staging, ignore_errors=True)  # leftovers of a killed job
    convert(run_dir, step, staging)
    write_text(staging / "chat_template.jinja", CHAT_TEMPLATE)
    if output.exists():
        old = output.parent / f".old-{output.name}"
        shutil.rmtree(old, ignore_errors=True)
        replace_dir(output, old)
        replace_dir(staging, output)
        shutil.rmtree(old, ignore_errors=True)
    else:
        replace_dir(staging, output)
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fm9g.launchers.convert", description="Export a run's checkpoint to a Hugging Face folder."
    )
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--step", type=int, required=True)
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    print(f"convert: {args.run_dir} step {args.step} -> {args.output}", flush=True)
    print(f"convert: wrote {export(args.run_dir, args.step, args.output)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
