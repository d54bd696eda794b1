"""Read the released FM9G models into FM9G state dicts, and write them as checkpoints.

Two released layouts (reference fm9g-formats.md §3.5):

  - BMTrain `.pt`: one `torch.save`d state dict with the dragonfly keys
    (`input_embedding.weight`, `encoder.layers.{i}.self_att.self_attention.project_q.weight`,
    ..., `lm_head.weight` when untied), a `.pt` file or a folder holding one, with a
    cpm_dragonfly `config.json` and the tokenizer beside it when the release ships them;
  - Hugging Face folder: `config.json` (MiniCPM-shaped 2B, model_type "fm9g" or "minicpm",
    with scale_emb / scale_depth / dim_model_base; Llama-shaped 8B), weights as
    `pytorch_model*.bin` or `*.safetensors` (sharded or not), tokenizer files.

The model shape comes from the source where it states it (config.json, else the tensor
shapes) and is checked against `--model` when one is given: a mismatch names the field.
Tensors keep their stored dtype (bf16 for the releases); the trainer and the HF export
cast where they need to.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import ValidationError

from fm9g.model.args import ModelArgs, ModelConfigError, load_model_config
from fm9g.model.hf import args_from_hf, fm9g_key, hf_key

Layout = Literal["bmtrain-pt", "hf"]
Progress = Callable[[int, int], None]

TOKENIZER_FILES = ("tokenizer.model", "vocab.txt", "vocabs.txt")
# Fields that define the architecture; the rest (init_std, max_length, dtype) only describe it.
SHAPE_FIELDS = (
    "vocab_size",
    "dim_model",
    "num_heads",
    "num_kv_heads",
    "dim_head",
    "dim_ff",
    "num_layers",
    "tie_lm_head",
    "scale",
    "scale_emb",
    "scale_depth",
    "dim_model_base",
    "eps",
    "base",
)
_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "float32"}
_LAYER = re.compile(r"encoder\.layers\.(\d+)\.")


class ReleasedFormatError(ValueError):
    """A source that is not a readable released FM9G model; the message names the file and field."""


@dataclass
class Released:
    """A released model read into FM9G form."""

    source: Path
    layout: Layout
    state: dict[str, torch.Tensor]  # FM9G keys, stored dtype
    args: ModelArgs
    tokenizer: Path | None
    described_by: str  # where the shape came from, for messages


# ------------------------------------------------------------------ tensors


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    """A torch.save'd state dict, memory-mapped (a 16 GB file is not read twice into RAM)."""
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc):
            raise ReleasedFormatError(f"{path}: not a torch checkpoint ({exc})") from None
        loaded = torch.load(path, map_location="cpu", weights_only=True)  # legacy (pre-zip) format
    except Exception as exc:  # unpickling errors have many types
        raise ReleasedFormatError(f"{path}: not a torch checkpoint ({type(exc).__name__}: {exc})") from None
    # Some exporters wrap the weights ({"state_dict": {...}}, {"model": {...}}).
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(loaded, dict) and set(loaded) == {wrapper} and isinstance(loaded[wrapper], dict):
            loaded = loaded[wrapper]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ReleasedFormatError(f"{path}: expected a state dict of tensors, found {type(loaded).__name__}")
    return loaded


def _hf_weight_files(folder: Path) -> list[Path]:
    safetensors = sorted(folder.glob("*.safetensors"))
    if safetensors:
        return safetensors
    bins = sorted(p for p in folder.glob("pytorch_model*.bin"))
    if not bins:
        raise ReleasedFormatError(f"{folder}: no weights (model*.safetensors or pytorch_model*.bin) beside config.json")
    return bins


def _load_hf_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        tensors.update(load_file(str(file)) if file.suffix == ".safetensors" else _torch_load(file))
    return tensors


# ------------------------------------------------------------------ shapes


def tensor_facts(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """What the FM9G tensors themselves say about the shape."""
    facts: dict[str, Any] = {}
    if "input_embedding.weight" in state:
        facts["vocab_size"], facts["dim_model"] = state["input_embedding.weight"].shape
    layers = {int(m.group(1)) for key in state if (m := _LAYER.match(key))}
    if layers:
        facts["num_layers"] = max(layers) + 1
    gate = state.get("encoder.layers.0.ffn.ffn.w_in.w_0.weight")
    if gate is not None:
        facts["dim_ff"] = gate.shape[0]
    facts["tie_lm_head"] = "lm_head.weight" not in state
    return facts


def _same(field: str, one: Any, other: Any) -> bool:
    if isinstance(one, float) or isinstance(other, float):
        return math.isclose(float(one), float(other), rel_tol=1e-6)
    return bool(one == other)


def check_shape(stated: dict[str, Any], expected: ModelArgs, where: str, model_name: str) -> None:
    """Raise naming the first field the source states differently from `--model`."""
    for field in SHAPE_FIELDS:
        if field not in stated:
            continue
        if field in ("scale_emb", "dim_model_base") and not (stated.get("scale", expected.scale) or expected.scale):
            continue  # muP fields mean nothing with scale off
        if field == "scale_depth" and stated[field] <= 0 and expected.scale_depth <= 0:
            continue
        if not _same(field, stated[field], getattr(expected, field)):
            raise ReleasedFormatError(
                f"{where}: {field} is {stated[field]!r} but --model {model_name} has {getattr(expected, field)!r}; "
                "pass the --model that matches the source, or leave --model out to take the source's shape"
            )


def check_tensors(state: dict[str, torch.Tensor], args: ModelArgs, where: str) -> None:
    """Every parameter of the model is present with its shape, and nothing else is."""
    from fm9g.model.dragonfly import build_model

    wanted = {key: tuple(value.shape) for key, value in build_model(args, "meta").state_dict().items()}
    unknown = sorted(set(state) - set(wanted))
    if unknown:
        raise ReleasedFormatError(
            f"{where}: {len(unknown)} tensor(s) this model does not have, e.g. {unknown[:3]} "
            f"(for {args.num_layers} layers, {'tied' if args.tie_lm_head else 'untied'} head)"
        )
    missing = sorted(set(wanted) - set(state))
    if missing:
        raise ReleasedFormatError(f"{where}: {len(missing)} tensor(s) missing, e.g. {missing[:3]}")
    for key, shape in wanted.items():
        if tuple(state[key].shape) != shape:
            raise ReleasedFormatError(
                f"{where}: {key} has shape {tuple(state[key].shape)} but the model config "
                f"(dim_model {args.dim_model}, num_heads {args.num_heads}, num_kv_heads {args.num_kv_heads}, "
                f"dim_head {args.dim_head}, dim_ff {args.dim_ff}, vocab_size {args.vocab_size}) needs {shape}"
            )


def _settle(stated: dict[str, Any], model: str | None, where: str, complete: bool) -> ModelArgs:
    """ModelArgs from what the source states, checked against and completed by `--model`."""
    if model is None:
        if not complete:
            raise ReleasedFormatError(
                f"{where} does not state the whole model shape (no config.json: heads, dim_head and the "
                "muP scalings are not in the tensors); pass --model 2.4b, --model 8b or --model PATH.json"
            )
        return ModelArgs.model_validate(stated)
    try:
        expected = load_model_config(model)
    except ModelConfigError as exc:
        raise ReleasedFormatError(str(exc)) from None
    check_shape(stated, expected, where, model)
    return expected.model_copy(update={k: v for k, v in stated.items() if k in ModelArgs.model_fields})


def _dtype_name(state: dict[str, torch.Tensor]) -> str:
    return _DTYPES.get(next(iter(state.values())).dtype, "float32")


# ------------------------------------------------------------------ readers


def find_tokenizer(folder: Path) -> Path | None:
    """The tokenizer file a release ships beside its weights, if any."""
    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            return folder / name
    return None


_HF_TYPES = ("llama", "minicpm", "fm9g", "granite")


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ReleasedFormatError(f"{path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}") from None
    if not isinstance(config, dict):
        raise ReleasedFormatError(f"{path}: a model config is a JSON object, not {type(config).__name__}")
    if config.get("rope_scaling"):
        raise ReleasedFormatError(f"{path}: rope_scaling {config['rope_scaling']!r} is not implemented here")
    return config


def _args_of(config: dict[str, Any], path: Path) -> ModelArgs:
    """ModelArgs from HF field names (MiniCPM/FM9G-2B, Llama, Granite) or DragonflyConfig's."""
    try:
        if config.get("model_type") in _HF_TYPES and "hidden_size" in config:
            return args_from_hf(config)
        return ModelArgs.model_validate(config)  # cpm_dragonfly names (dim_model, num_heads, ...)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in exc.errors())
        raise ReleasedFormatError(f"{path}: {problems}") from None
    except (KeyError, ValueError) as exc:
        raise ReleasedFormatError(f"{path}: {exc.args[0] if exc.args else exc}") from None


def _fm9g_names(tensors: dict[str, torch.Tensor], where: Path) -> dict[str, torch.Tensor]:
    """The tensors under FM9G names, whichever of the two namings the file uses."""
    state: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if key.endswith("rotary_emb.inv_freq"):
            continue  # older transformers stored the RoPE table
        try:
            state[key if _is_fm9g_key(key) else fm9g_key(key)] = value
        except KeyError:
            raise ReleasedFormatError(
                f"{where}: tensor {key!r} is neither an FM9G dragonfly parameter nor a Llama/MiniCPM one"
            ) from None
    return state


def _read_pt(path: Path, model: str | None) -> tuple[dict[str, torch.Tensor], ModelArgs, str]:
    state = _torch_load(path)
    foreign = [key for key in state if not _is_fm9g_key(key)]
    if foreign:
        raise ReleasedFormatError(
            f"{path}: keys that are not FM9G dragonfly parameters, e.g. {foreign[:3]}; a released BMTrain "
            "checkpoint has input_embedding.weight, encoder.layers.{i}.self_att.self_attention.project_q.weight, ..."
        )
    config_file = path.parent / "config.json"
    facts = tensor_facts(state)
    if not config_file.is_file():
        args = _settle(facts, model, f"{path} (tensor shapes)", complete=False)
        return state, args.model_copy(update={"dtype": _dtype_name(state)}), f"{path} with --model {model}"
    stated = _args_of(_read_config(config_file), config_file).model_dump()
    for field, value in facts.items():  # the config and the tensors must agree too
        if not _same(field, value, stated[field]):
            raise ReleasedFormatError(
                f"{config_file}: {field} is {stated[field]!r} but the tensors of {path.name} say {value!r}"
            )
    args = _settle(stated, model, str(config_file), complete=True)
    return state, args.model_copy(update={"dtype": _dtype_name(state)}), str(config_file)


def _is_fm9g_key(key: str) -> bool:
    try:
        hf_key(key)
    except KeyError:
        return False
    return True


def _read_hf(folder: Path, model: str | None) -> tuple[dict[str, torch.Tensor], ModelArgs, str]:
    config_file = folder / "config.json"
    stated = _args_of(_read_config(config_file), config_file)
    state = _fm9g_names(_load_hf_tensors(_hf_weight_files(folder)), folder)
    if stated.tie_lm_head and "lm_head.weight" in state:  # save_pretrained(.bin) keeps the tied copy
        copy, embedding = state.pop("lm_head.weight"), state.get("input_embedding.weight")
        if embedding is None or copy.shape != embedding.shape or not torch.equal(copy, embedding):
            raise ReleasedFormatError(
                f"{config_file}: the head is tied (tie_word_embeddings true, or MiniCPM's default) but "
                "lm_head.weight differs from the input embedding; set tie_word_embeddings to false"
            )
    args = _settle(stated.model_dump(), model, str(config_file), complete=True)
    return state, args.model_copy(update={"dtype": _dtype_name(state)}), str(config_file)


def detect_layout(source: Path) -> tuple[Layout, Path]:
    """(layout, the file or folder to read) of a released source."""
    if source.is_file() and source.suffix == ".pt":
        return "bmtrain-pt", source
    if source.is_dir():
        if (source / "config.json").is_file() and (
            list(source.glob("*.safetensors")) or list(source.glob("pytorch_model*.bin"))
        ):
            return "hf", source
        pts = sorted(source.glob("*.pt"))
        if len(pts) == 1:
            return "bmtrain-pt", pts[0]
        if len(pts) > 1:
            raise ReleasedFormatError(
                f"{source}: several .pt files ({', '.join(p.name for p in pts)}); name the one to read"
            )
    if not source.exists():
        raise ReleasedFormatError(f"{source} does not exist")
    raise ReleasedFormatError(
        f"{source}: not a released FM9G model: expected a BMTrain .pt file (or a folder with one), or a "
        "Hugging Face folder (config.json with pytorch_model*.bin or *.safetensors)"
    )


def read_released(source: str | Path, model: str | None = None, tokenizer: str | Path | None = None) -> Released:
    """Read a released `.pt` or HF folder; `model` (2.4b, 8b or a JSON path) is checked against it."""
    source = Path(source)
    layout, path = detect_layout(source)
    if layout == "hf":
        state, args, where = _read_hf(path, model)
    else:
        state, args, where = _read_pt(path, model)
    check_tensors(state, args, str(path))
    found = Path(tokenizer) if tokenizer else find_tokenizer(path if path.is_dir() else path.parent)
    if found is not None and not found.exists():
        raise ReleasedFormatError(f"--tokenizer {found} does not exist")
    return Released(source, layout, state, args, found, where)


def tensor_bytes(state: dict[str, torch.Tensor]) -> int:
    """Bytes of all tensors (progress totals)."""
    return sum(t.numel() * t.element_size() for t in state.values())


# ------------------------------------------------------------------ import


class _CountingWriter:
    """A binary file that reports the bytes written so far (torch.save has no progress hook)."""

    def __init__(self, handle: Any, total: int, progress: Progress | None) -> None:
        self.handle, self.total, self.progress, self.done = handle, total, progress, 0

    def write(self, data: bytes) -> int:
        written = self.handle.write(data)
        self.done += len(data)
        if self.progress:
            self.progress(min(self.done, self.total), self.total)
        return written

    def flush(self) -> None:
        self.handle.flush()


def write_imported(
    released: Released, output: str | Path, progress: Progress | None = None, replace: bool = False
) -> Path:
    """Write `released` as a checkpoint that `train.resume_ckpt` loads (weights only, step 0).

    The folder is built beside `output` and renamed into place: `output` either does not
    exist or is complete.  Layout (model/checkpoint.py's, step 0):
    fm9g_live_checkpoint-0.pt, .log_ckpt, config.json, tokenizer/, import.json, COMPLETE.
    """
    import shutil
    import time

    from fm9g.data.tokenizer import load_tokenizer
    from fm9g.model.checkpoint import MARKER, SAVE_NAME
    from fm9g.rundir.atomic import replace_dir, write_json

    output = Path(output).resolve()
    if output.exists() and not replace:
        raise ReleasedFormatError(
            f"--output {output} already exists; remove it, choose another folder, or pass --force"
        )
    tmp = output.parent / f".tmp-import-{output.name}"
    shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a killed import
    tmp.mkdir(parents=True)
    try:
        if released.tokenizer is not None:
            tokenizer = load_tokenizer(released.tokenizer)
            if tokenizer.vocab_size > released.args.vocab_size:
                raise ReleasedFormatError(
                    f"{released.tokenizer}: {tokenizer.vocab_size} tokens, more than the model's vocab_size "
                    f"{released.args.vocab_size}; give the tokenizer of this model (--tokenizer)"
                )
            tokenizer.save_to(tmp / "tokenizer")
        state = {key: value.contiguous() for key, value in released.state.items()}
        with open(tmp / f"{SAVE_NAME}-0.pt", "wb") as handle:
            torch.save(state, _CountingWriter(handle, tensor_bytes(state), progress))  # type: ignore[arg-type]
        write_json(tmp / f"{SAVE_NAME}-0.log_ckpt", {"iteration": 0})
        write_json(tmp / "config.json", released.args.to_json())
        write_json(
            tmp / "import.json",
            {
                "source": str(released.source.resolve()),
                "layout": released.layout,
                "shape_from": released.described_by,
                "tensors": len(state),
                "dtype": released.args.dtype,
                "tokenizer": str(released.tokenizer) if released.tokenizer else None,
            },
        )
        write_json(tmp / MARKER, {"step": 0, "world_size": 1, "time": time.time(), "imported": True})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if output.exists():  # --force: the old folder goes only once the new one is complete
        old = output.parent / f".old-import-{output.name}"
        shutil.rmtree(old, ignore_errors=True)
        replace_dir(output, old)
        shutil.rmtree(old, ignore_errors=True)
    return replace_dir(tmp, output)
