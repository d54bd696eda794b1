"""The dataset mixture config (the guide's JSON list of tasks), validated before anything runs.

Each entry names an indexed dataset (or raw jsonl/txt that an index stage will build,
see `needs_index`), its sampling weight and an optional transform script. Relative
`path` and `transforms` values resolve against the mixture file's directory. Every
problem is a DataError naming the file, the entry (position and task_name), the
field and the fix.
"""

from __future__ import annotations

import difflib
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fm9g.data.errors import DataError
from fm9g.data.transforms import load_transform
from fm9g.rundir.config import DuplicateKeyError, load_json_strict

OversizeRule = Literal["drop", "head", "segment"]


class MixtureEntry(BaseModel):
    """One task of the mixture (one element of the JSON list)."""

    model_config = ConfigDict(extra="forbid")

    dataset_name: str = Field(description="Name of the dataset (informational).")
    task_name: str = Field(description="Unique name of the task; keys the loader state and per-task loss.")
    path: str = Field(description="Index directory (data.jsonl + index/index.h5), or raw .jsonl/.txt to be indexed.")
    abs_weight: float | None = Field(
        None, ge=0, description="Target share of tokens; sampling probability ∝ abs_weight / average segment length."
    )
    weight: float = Field(
        1.0, ge=0, description="Used only when no entry has abs_weight: probability ∝ weight × data bytes."
    )
    transforms: str | None = Field(
        None, description="Python file defining transform(data, num_sample, r); none = identity."
    )
    allow_repeat: bool = Field(True, description="Start a new shuffled epoch when exhausted; false = the task stops.")
    nlines: int | None = Field(None, ge=0, description="Lines in the dataset (documentation; meta.json has it).")
    ave_tokens_per_line: float | None = Field(
        None, description="Initial average segment length for the weights (-1 or absent: max_length)."
    )
    total_tokens: float | None = Field(None, ge=0, description="Estimated tokens in billions (documentation).")
    oversize_rule: OversizeRule | None = Field(None, description="drop | head | segment; absent: the loader's default.")
    incontext_weight: list[float] = Field(
        default_factory=lambda: [1.0], description="Distribution of the num_sample argument passed to transform."
    )
    do_compact: bool = Field(False, description="Head rule on instruction data keeps the input's head and tail halves.")
    is_long: bool = Field(False, description="Marks long-context data (informational).")

    @field_validator("incontext_weight")
    @classmethod
    def _valid_distribution(cls, value: list[float]) -> list[float]:
        if not value or any(w < 0 for w in value) or sum(value) <= 0:
            raise ValueError("must be a non-empty list of non-negative numbers with a positive sum")
        return value

    @field_validator("task_name", "dataset_name", "path")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value


class Mixture(BaseModel):
    """A validated mixture: entries with absolute `path` and `transforms`."""

    source: str
    base_dir: Path
    entries: list[MixtureEntry]

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def task_names(self) -> list[str]:
        """Task names in entry order (the loader's task ids)."""
        return [entry.task_name for entry in self.entries]

    @property
    def uses_abs_weight(self) -> bool:
        """True when the weights are token shares (abs_weight), False for weight × bytes."""
        return self.entries[0].abs_weight is not None


def is_indexed(path: Path) -> bool:
    """True for an index directory (data.jsonl plus a text or HDF5 index)."""
    return (
        path.is_dir()
        and (path / "data.jsonl").is_file()
        and ((path / "index").is_file() or (path / "index.h5").is_file())
    )


def needs_index(entry: MixtureEntry) -> bool:
    """True when the entry points at raw jsonl/txt that an index stage must build first."""
    return not is_indexed(Path(entry.path))


def _is_raw(path: Path) -> bool:
    if path.is_file():
        return path.suffix in (".jsonl", ".txt")
    return path.is_dir() and any(p.suffix in (".jsonl", ".txt") for p in path.rglob("*"))


def _where(source: str, index: int, raw: Any) -> str:
    name = raw.get("task_name") if isinstance(raw, dict) else None
    return f"{source}: entry {index}" + (f" ({name})" if isinstance(name, str) else "")


def _describe(error: dict[str, Any]) -> str:
    field = ".".join(str(part) for part in error["loc"]) or "(entry)"
    if error["type"] == "extra_forbidden":
        close = difflib.get_close_matches(field, list(MixtureEntry.model_fields), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; allowed fields: {', '.join(MixtureEntry.model_fields)}"
        return f"field '{field}': unknown field{hint}"
    if error["type"] == "missing":
        return f"field '{field}': required field is missing"
    return f"field '{field}': {error['msg']}"


def _resolve(base_dir: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base_dir / path)


def load_mixture(path_or_list: str | Path | list[dict[str, Any]], base_dir: str | Path | None = None) -> Mixture:
    """Read and validate a mixture (file path or already-parsed list); base_dir defaults to the file's directory."""
    if isinstance(path_or_list, (str, Path)):
        source_path = Path(path_or_list)
        try:
            raw = load_json_strict(source_path.read_text(encoding="utf-8"))
        except DuplicateKeyError as error:
            where = f"{source_path}:{error.line}" if error.line else str(source_path)
            raise DataError(f"{where}: {error}") from None
        except OSError as error:
            raise DataError(f"{source_path}: cannot read the mixture file ({error})") from None
        except json.JSONDecodeError as error:
            raise DataError(f"{source_path}:{error.lineno}: not valid JSON ({error.msg})") from None
        source = str(source_path)
        base = Path(base_dir) if base_dir is not None else source_path.absolute().parent
    else:
        raw = path_or_list
        source = "<mixture>"
        base = Path(base_dir) if base_dir is not None else Path.cwd()
    if not isinstance(raw, list):
        raise DataError(f"{source}: a mixture is a JSON list of task objects, got {type(raw).__name__}")
    if not raw:
        raise DataError(f"{source}: the mixture has no entries")
    base = base.absolute()

    entries: list[MixtureEntry] = []
    for index, item in enumerate(raw):
        where = _where(source, index, item)
        if not isinstance(item, dict):
            raise DataError(f"{where}: each entry must be a JSON object, got {type(item).__name__}")
        try:
            entries.append(MixtureEntry.model_validate(item))
        except ValidationError as error:
            problems = "; ".join(_describe(e) for e in error.errors(include_url=False))  # type: ignore[arg-type]
            raise DataError(f"{where}: {problems}") from None

    seen: dict[str, int] = {}
    for index, entry in enumerate(entries):
        if entry.task_name in seen:
            raise DataError(
                f"{_where(source, index, raw[index])}: field 'task_name': duplicate of entry {seen[entry.task_name]}; "
                "task names must be unique"
            )
        seen[entry.task_name] = index

    with_abs = [i for i, e in enumerate(entries) if e.abs_weight is not None]
    if with_abs and len(with_abs) != len(entries):
        missing = next(i for i in range(len(entries)) if i not in with_abs)
        raise DataError(
            f"{_where(source, missing, raw[missing])}: field 'abs_weight': missing while other entries set it; "
            "give every entry an abs_weight (or none, to use weight)"
        )
    weights = [e.abs_weight if with_abs else e.weight for e in entries]
    if not any(w and w > 0 for w in weights):
        field = "abs_weight" if with_abs else "weight"
        raise DataError(f"{source}: field '{field}': all weights are zero; at least one task needs a positive weight")

    for index, entry in enumerate(entries):
        where = _where(source, index, raw[index])
        data_path = _resolve(base, entry.path)
        if not data_path.exists():
            raise DataError(f"{where}: field 'path': {data_path} does not exist")
        if not is_indexed(data_path) and not _is_raw(data_path):
            raise DataError(
                f"{where}: field 'path': {data_path} is neither an index directory (data.jsonl + index) "
                "nor .jsonl/.txt data to index"
            )
        entry.path = str(data_path)
        if entry.transforms:
            script = _resolve(base, entry.transforms)
            load_transform(script, where)
            entry.transforms = str(script)
        else:
            entry.transforms = None
    return Mixture(source=source, base_dir=base, entries=entries)


def _first_records(path: Path, count: int) -> Iterator[tuple[Path, int, bytes]]:
    """(file, 1-based line, raw jsonl line) of the first `count` records of an entry's data."""
    from fm9g.data.index_plan import collect_inputs  # the indexer's own file list (hidden folders skipped)
    from fm9g.data.txt2jsonl import txt_line_to_jsonl

    files = [path / "data.jsonl"] if is_indexed(path) else collect_inputs(path)

    given = 0
    for file in files:
        with open(file, "rb") as handle:
            for number, raw in enumerate(handle, start=1):
                if given >= count:
                    return
                body = raw.rstrip(b"\r\n")
                if file.suffix == ".txt":
                    line = txt_line_to_jsonl(body.decode("utf-8", "replace"))
                    if line is None:
                        continue
                    body = line.encode("utf-8")
                elif not body.strip():
                    continue
                given += 1
                yield file, number, body


def check_transforms(mixture: Mixture, sample: int = 8) -> None:
    """Apply each entry's transform to its first `sample` records; raise a DataError when all fail.

    A transform that fails on every call would otherwise be found only after the run has
    started (each bad record is an error there). One failing record among good ones is
    the data's problem, found in the run with its line; so only "every sampled call
    failed" is refused here, naming the transform, the dataset file and the first record.
    """
    from fm9g.data.index_check import decode_json
    from fm9g.data.samples import _incontext_index

    for index, entry in enumerate(mixture.entries):
        if not entry.transforms:
            continue
        where = f"{mixture.source}: entry {index} ({entry.task_name})"
        transform = load_transform(entry.transforms, where)
        failures: list[str] = []
        tried = 0
        for file, number, body in _first_records(Path(entry.path), sample):
            tried += 1
            try:
                data = decode_json(body)
            except (ValueError, UnicodeDecodeError):
                failures.append(f"{file}:{number}: not valid JSON")
                continue
            rng = random.Random(f"check:{entry.task_name}:{number}")
            try:
                result = transform(data, _incontext_index(tuple(entry.incontext_weight), rng), rng)
            except Exception as error:  # the user's code: report whatever it raises
                failures.append(f"{file}:{number}: raised {type(error).__name__}: {error}")
                continue
            if not isinstance(result, dict):
                failures.append(f"{file}:{number}: returned {type(result).__name__}, not a dict with input/output")
        if tried and len(failures) == tried:
            raise DataError(
                f"{where}: field 'transforms': transform in {entry.transforms} failed on all {tried} records "
                f"tried from {entry.path}, e.g. record {failures[0]}; fix the script (test it on a line of "
                "the data) or remove 'transforms' from the entry"
            )
