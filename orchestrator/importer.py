"""`fm9g-launch import` and `convert` of a released model: what the two commands do on
this node, and what they tell the user next.

Import reads a released FM9G model (BMTrain `.pt` or HF folder, see fm9g.model.released)
and writes a checkpoint folder that `pretrain` and `sft` start from; the message lists
the exact `--set` overrides that point a run at it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

Progress = Callable[[int, int], None]


class ImportError_(RuntimeError):
    """A released model that cannot be imported or converted; the message says why and what to do."""


@dataclass(frozen=True)
class Imported:
    """The checkpoint folder an import wrote, and how a run uses it."""

    output: Path
    layout: str
    summary: str
    overrides: list[str]

    def describe(self) -> str:
        sets = " ".join(f"--set {item}" for item in self.overrides)
        return (
            f"imported {self.summary} -> {self.output}\n"
            "fine-tune it (weights only, from step 0):\n"
            f"  fm9g-launch sft --config YOUR_SFT.yaml {sets}\n"
            "or put these fields into the config's model, data and train sections."
        )


def is_released_source(path: Path) -> bool:
    """True when `path` looks like a released model rather than a run directory."""
    if (path / "config.yaml").is_file() or (Path("runs") / path / "config.yaml").is_file():
        return False
    if path.is_file():
        return path.suffix == ".pt"
    return path.is_dir() and (
        bool(list(path.glob("*.pt")))
        or ((path / "config.json").is_file() and bool(list(path.glob("*.safetensors")) + list(path.glob("*.bin"))))
    )


def _summary(layout: str, args: object, source: Path) -> str:
    shape = (
        f"{args.num_layers} layers, dim {args.dim_model}, {args.num_heads} heads, vocab {args.vocab_size}, "  # type: ignore[attr-defined]
        f"{'muP-scaled, tied head' if args.scale else 'Llama-style, untied head'}"  # type: ignore[attr-defined]
    )
    return f"{source} ({layout}: {shape})"


def import_released(
    source: Path,
    output: Path,
    *,
    model: str | None = None,
    tokenizer: Path | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> Imported:
    """Read `source` and write the checkpoint folder `output` (atomically)."""
    from fm9g.model.released import ReleasedFormatError, read_released, write_imported

    try:
        released = read_released(source, model, tokenizer)
        if released.tokenizer is None:
            raise ReleasedFormatError(
                f"{source}: no tokenizer.model, vocab.txt or vocabs.txt beside the weights; pass --tokenizer PATH "
                "(the release's tokenizer: tokenizer.model for the 2B, vocab.txt for the 8B)"
            )
        folder = write_imported(released, output, progress=progress, replace=force)
    except (ReleasedFormatError, OSError) as exc:
        raise ImportError_(str(exc)) from None
    tokenizer_file = next(iter(sorted((folder / "tokenizer").iterdir())))
    overrides = [
        f"model.config={folder / 'config.json'}",
        f"data.tokenizer_path={tokenizer_file}",
        f"train.resume_ckpt={folder}",
        "train.only_load_model=true",
    ]
    return Imported(folder, released.layout, _summary(released.layout, released.args, source), overrides)


def convert_released_source(
    source: Path,
    output: Path | None,
    *,
    model: str | None = None,
    tokenizer: Path | None = None,
    progress: Progress | None = None,
) -> Path:
    """A released `.pt` or HF folder -> native HF folder (here, on this node)."""
    from fm9g.launchers.convert import export_released
    from fm9g.model.released import ReleasedFormatError

    if output is None:
        raise ImportError_(f"converting the released model {source} needs --output DIR (the HF folder to write)")
    try:
        return export_released(source, output, model, tokenizer, progress)
    except (ReleasedFormatError, OSError) as exc:
        raise ImportError_(str(exc)) from None
