"""The stages that run on the login node before training: index every dataset of the
mixture that is not indexed yet, and train the tokenizer when none is given.

Both write their results into the run directory and rewrite the run's config to point
at them, so the training stage reads only finished, indexed data.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from fm9g.rundir.atomic import write_json
from fm9g.rundir.config import ConfigError, RunConfig
from fm9g.rundir import RunDir
from fm9g.orchestrator.state import StateStore

if TYPE_CHECKING:
    from fm9g.data.mixture import Mixture

Say = Callable[[str], None]


def _mixture(config: RunConfig) -> Mixture:
    """The run's mixture, parsed and validated once by the data layer (a DataError names file and entry)."""
    from fm9g.data.mixture import load_mixture

    if not config.data.dataset_config:
        raise ConfigError("data.dataset_config is not set: point it at a mixture JSON list (see examples/tiny/mixture.json)")
    return load_mixture(Path(config.data.dataset_config))


def guess_language(path: Path, sample_bytes: int = 65536) -> str:
    """'en' when most characters of the data's first bytes are ASCII, else 'zh'.

    Only the meta.json token estimate depends on it (0.7/char for zh, 1.5/word for en)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in (".jsonl", ".txt"))
    text = ""
    for file in files[:4]:
        with open(file, "rb") as handle:
            text += handle.read(sample_bytes).decode("utf-8", "ignore")
    if not text:
        return "zh"
    ascii_share = sum(1 for ch in text if ord(ch) < 128) / len(text)
    return "en" if ascii_share > 0.9 else "zh"


def index_datasets(config: RunConfig, run: RunDir, store: StateStore, say: Say, progress: bool = True) -> Path:
    """Index raw datasets into the run, write the resolved mixture, return its path."""
    from fm9g.data.indexer import build_index
    from fm9g.data.mixture import needs_index

    resolved = []
    for task in _mixture(config).entries:
        entry = task.model_dump(exclude_none=True)  # absolute path and transforms, as validated
        if needs_index(task):
            stage = f"index:{task.task_name}"
            output = run.indexed / task.task_name
            store.upsert_stage(stage, "index")
            if (output / "meta.json").exists():
                store.set_stage(stage, "SKIPPED", detail=f"already indexed: {output}")
            else:
                store.set_stage(stage, "RUNNING", detail=f"{task.path} -> {output}")
                say(f"indexing {task.path} -> {output}")
                if config.executor == "slurm":
                    from fm9g.orchestrator.index_jobs import index_on_slurm

                    meta = index_on_slurm(Path(task.path), output, guess_language(Path(task.path)), config, run, store, stage, say)
                    store.set_stage(stage, "COMPLETED", detail=f"{meta.get('nlines')} lines", progress=1.0)
                    entry["path"] = str(output)
                    resolved.append(entry)
                    continue

                def report(done: int, total: int, stage: str = stage) -> None:
                    store.set_stage_progress(stage, done / total if total else 1.0)

                with progress_bar(f"index {task.task_name}", progress) as bar:
                    result = build_index(Path(task.path), output, language=guess_language(Path(task.path)),
                                         processes=1, cache_dir=run.indexed / ".cache",
                                         progress=lambda d, t: (bar(d, t), report(d, t)))
                store.set_stage(stage, "COMPLETED", detail=f"{result.nlines} lines", progress=1.0)
            entry["path"] = str(output)
        resolved.append(entry)
    out = run.root / "mixture.json"
    write_json(out, resolved)
    return out


@contextlib.contextmanager
def progress_bar(description: str, enabled: bool) -> Iterator[Callable[[int, int], None]]:
    """A rich byte progress bar, or a silent callback (detached supervisors, tests)."""
    if not enabled:
        yield lambda done, total: None
        return
    from fm9g.data.progress import byte_progress

    with byte_progress(description) as update:
        yield update


def train_tokenizer(config: RunConfig, run: RunDir, store: StateStore, say: Say) -> Path:
    """Train a sentencepiece model from the (indexed) mixture into the run directory."""
    from fm9g.data.reader import IndexedDataset
    from fm9g.data.tokenizer import train_sentencepiece

    target = run.tokenizer_dir / "tokenizer.model"
    store.upsert_stage("tokenizer", "tokenizer")
    if target.exists():
        store.set_stage("tokenizer", "SKIPPED", detail=str(target))
        return target
    store.set_stage("tokenizer", "RUNNING")
    tasks = _mixture(config).entries

    def texts() -> object:
        for task in tasks:
            dataset = IndexedDataset(Path(task.path))
            for i in range(len(dataset)):
                record = dataset.get_json(i)
                for key in ("input", "output"):
                    value = record.get(key)
                    if isinstance(value, str) and value:
                        yield value

    say(f"training a sentencepiece tokenizer (vocab {config.data.tokenizer_vocab_size}) -> {target}")
    train_sentencepiece(texts(), target, config.data.tokenizer_vocab_size)
    store.set_stage("tokenizer", "COMPLETED", detail=str(target), progress=1.0)
    return target
