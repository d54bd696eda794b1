"""Export a run's checkpoint, or a released FM9G model, to a Hugging Face folder, and import one back.

    python -m fm9g.model.convert --run-dir runs/NAME [--step N] [--output DIR]
    python -m fm9g.model.convert --source RELEASED [--model 2.4b|8b|PATH] --output DIR

The folder holds model.safetensors, config.json (a native Granite or Llama
architecture, see `hf.py`), generation_config.json and the tokenizer files, and loads
with `AutoModelForCausalLM.from_pretrained(folder)` without trust_remote_code.  It is
built in a temporary folder and renamed into place, so a reader never sees half of it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fm9g.model.args import ModelArgs
from fm9g.model.checkpoint import Checkpointer
from fm9g.model.hf import Architecture, from_hf, to_hf
from fm9g.rundir import RunDir
from fm9g.rundir.atomic import replace_dir

SHARD_BYTES = 2 << 30  # per safetensors file: safetensors copies a whole file into memory to write it
Progress = Callable[[int, int], None]


def _tokenizer_config(tokenizer: Any, main_file: Path) -> dict[str, Any] | None:
    """tokenizer_config.json for a sentencepiece model (HF's LlamaTokenizer reads it); None otherwise."""
    if main_file.name != "tokenizer.model":
        return None  # the 8B "cpm" vocab.txt: its tokenizer.json comes from CPMTokenizer.save_hf
    return {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": False,
        "model_max_length": 1 << 20,
        "clean_up_tokenization_spaces": False,
    }


def export_hf(
    state: dict[str, torch.Tensor],
    args: ModelArgs,
    output: str | Path,
    tokenizer: Any = None,
    architecture: Architecture | None = None,
    progress: Progress | None = None,
) -> Path:
    """Write an HF folder from an FM9G state dict; replaces `output` if it exists."""
    output = Path(output)
    bos = getattr(tokenizer, "bos_id", None)
    eos = getattr(tokenizer, "eos_id", None)
    tensors, config = to_hf(state, args, architecture=architecture, bos_id=bos, eos_id=eos)
    tmp = output.parent / f".tmp-{output.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _save_shards(tensors, tmp, progress)
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"bos_token_id": bos, "eos_token_id": eos, "do_sample": False}
    (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    if tokenizer is not None:
        main_file = tokenizer.save_to(tmp)
        tokenizer_config = _tokenizer_config(tokenizer, Path(main_file))
        if tokenizer_config:
            (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
        if hasattr(tokenizer, "save_hf"):  # cpm: tokenizer.json, so no engine needs FM9G's vLLM fork
            tokenizer.save_hf(tmp)
    if output.exists():
        shutil.rmtree(output)
    return replace_dir(tmp, output)


def _save_shards(tensors: dict[str, torch.Tensor], folder: Path, progress: Progress | None) -> None:
    """model.safetensors, or model-0000i-of-0000n.safetensors + index when over SHARD_BYTES."""
    sizes = {key: t.numel() * t.element_size() for key, t in tensors.items()}
    total = sum(sizes.values())
    shards: list[list[str]] = [[]]
    filled = 0
    for key in tensors:
        if shards[-1] and filled + sizes[key] > SHARD_BYTES:
            shards.append([])
            filled = 0
        shards[-1].append(key)
        filled += sizes[key]
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    done = 0
    for name, keys in zip(names, shards, strict=True):
        save_file({key: tensors[key] for key in keys}, str(folder / name), metadata={"format": "pt"})
        done += sum(sizes[key] for key in keys)
        if progress:
            progress(done, total)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": total},
            "weight_map": {key: name for name, keys in zip(names, shards, strict=True) for key in keys},
        }
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def convert_released(
    source: str | Path,
    output: str | Path,
    model: str | None = None,
    tokenizer: str | Path | None = None,
    progress: Progress | None = None,
) -> Path:
    """A released `.pt` or HF folder (see `released.py`) -> a native Granite/Llama HF folder."""
    from fm9g.data.tokenizer import load_tokenizer
    from fm9g.model.released import read_released

    released = read_released(source, model, tokenizer)
    loaded = load_tokenizer(released.tokenizer) if released.tokenizer else None
    return export_hf(released.state, released.args, output, loaded, progress=progress)


def import_hf(folder: str | Path) -> tuple[dict[str, torch.Tensor], ModelArgs]:
    """(FM9G state dict, ModelArgs) from an HF folder with model.safetensors (or its shards)."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    if not tensors:
        raise FileNotFoundError(f"{folder}: no *.safetensors files")
    return from_hf(tensors, config)


def convert(run_dir: str | Path, step: int | None = None, output: str | Path | None = None) -> Path:
    """Export checkpoint `step` (default: latest) of a run; default output runs/<name>/hf/<step>/."""
    from fm9g.data.tokenizer import load_tokenizer

    run = RunDir.of(run_dir)
    checkpoints = Checkpointer(run.checkpoints, rank=0, world_size=1, barrier=lambda: None)
    source = checkpoints.resolve(str(step)) if step is not None else checkpoints.latest()
    if source is None:
        raise FileNotFoundError(f"{run.checkpoints}: no complete checkpoint to convert")
    args = ModelArgs.model_validate(checkpoints.model_config(source))
    tokenizer_dir = checkpoints.tokenizer_dir(source)
    tokenizer = None
    if tokenizer_dir is not None:
        files = sorted(tokenizer_dir.iterdir())
        tokenizer = load_tokenizer(files[0]) if files else None
    target = Path(output) if output else run.root / "hf" / source.name
    return export_hf(checkpoints.load_model(source), args, target, tokenizer)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fm9g.model.convert", description="Export a checkpoint to a HF folder."
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run-dir")
    source.add_argument("--source", help="a released FM9G .pt (or its folder) or HF folder")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument("--model", default=None, help="with --source: 2.4b, 8b or a JSON config to check against")
    parser.add_argument("--output", default=None, help="output folder (default: RUN/hf/<step>)")
    options = parser.parse_args(argv)
    if options.source:
        if not options.output:
            parser.error("--source needs --output")
        print(convert_released(options.source, options.output, options.model))
    else:
        print(convert(options.run_dir, options.step, options.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
