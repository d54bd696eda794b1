"""The tokenizer stage's job: train a sentencepiece model from a run's indexed mixture.

It runs as a job (templates/tokenizer.sbatch.j2), not in the login-node supervisor:
it reads every dataset of the mixture, which on real data is no work for a login node.

    python -m fm9g.launchers.tokenizer --mixture runs/X/mixture.json --vocab-size 8000 \\
        --output runs/X/tokenizer/tokenizer.model
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

from fm9g.data.errors import DataError
from fm9g.data.mixture import load_mixture
from fm9g.data.reader import IndexedDataset
from fm9g.data.tokenizer import train_sentencepiece
from fm9g.rundir import protocol


def mixture_texts(mixture_path: Path) -> Iterator[str]:
    """The input and output strings of every record of every (indexed) dataset."""
    for task in load_mixture(mixture_path).entries:
        dataset = IndexedDataset(Path(task.path))
        for i in range(len(dataset)):
            record = dataset.get_json(i)
            for key in ("input", "output"):
                value = record.get(key)
                if isinstance(value, str) and value:
                    yield value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fm9g.launchers.tokenizer", description=__doc__.split("\n")[0])
    parser.add_argument("--mixture", type=Path, required=True, help="the run's mixture.json (indexed datasets)")
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--output", type=Path, required=True, help="tokenizer.model to write (atomically)")
    args = parser.parse_args(argv)
    try:
        path = train_sentencepiece(mixture_texts(args.mixture), args.output, args.vocab_size)
    except DataError as exc:
        print(f"fm9g tokenizer: error: {exc}", file=sys.stderr)
        return protocol.EXIT_CONFIG  # a data error: retrying cannot help
    print(f"fm9g tokenizer: wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
