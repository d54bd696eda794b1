"""The FM9G guide's arguments: the table in docs/guide-arguments.md matches the config
schema and the guide, and the arguments no other test covers show their effect here."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import BaseModel, ValidationError

from fm9g.data.indexer import build_index
from fm9g.model import train
from fm9g.model.checkpoint import SAVE_NAME, Checkpointer
from fm9g.model.distributed import init_distributed
from fm9g.rundir import RunDir
from fm9g.rundir import config as cfg
from tests.model.test_train import corpus, make_run, metrics, read_scalars  # noqa: F401 - corpus is a fixture

REPO = Path(__file__).resolve().parents[2]
TABLE = REPO / "docs" / "guide-arguments.md"
README = REPO / "README.md"

# The guide's parameter list (fm9g-usage.md, 参数详细介绍), in its order, as it writes it.
GUIDE: dict[str, Any] = {
    "model_unique": "2b_0701",
    "resume_ckpt": "",
    "config": "2.4b",
    "flash": "cuda",
    "max_length": "4096",
    "local": "False",
    "dataloader": "indexed",
    "save": "True",
    "tokenizer_path": "./tokenizer/tokenizer.model",
    "load_grad": "False",
    "grad_ckpt_num": "160",
    "exp_group": "",
    "ignore_cuda_oom": "1",
    "tensorboard_all_tasks": "0",
    "stop_when_end": "0",
    "only_run_dataloader": "0",
    "eps": "1e-6",
    "inspect_iters": "100",
    "strict_state_dict": "1",
    "resume_no_optimze": "0",
    "tp_size": "1",
    "async_save": "False",
    "batch_size": "1",
    "save_iters": "500",
    "train_iters": "10000",
    "dataset_config": "fm9g_sft",
    "dataloader_num_threads": 1,
    "dataloader_prefetch": 1,
    "dataloader_prefetch_factor": 1,
    "dataloader_num_workers": 1,
    "parallel_load_datastate": "8",
    "lr": "1e-2",
    "warmup_iters": "20",
    "drop_iters": "0.1",
    "only_load_model": "1",
    "lr_scheduler": "Cosine",
    "load_dataloader_ckpt": "0",
    "drop_begin": "-1",
    "drop_rate": "0.5",
    "use_checkpoint": "0",
}


def table_rows() -> list[dict[str, str]]:
    """The rows between the guide-args markers: in README.md once pasted there, else the docs file."""
    for source in (README, TABLE):
        text = source.read_text(encoding="utf-8") if source.exists() else ""
        match = re.search(r"<!-- guide-args -->\n(.*?)<!-- /guide-args -->", text, re.S)
        if match:
            break
    assert match, f"no <!-- guide-args --> table in {README} or {TABLE}"
    lines = [line for line in match.group(1).splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = []
    for line in lines[2:]:
        cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip()[1:-1])]
        assert len(cells) == len(header), line
        rows.append(dict(zip(header, cells)))
    return rows


def _code(cell: str) -> str:
    match = re.fullmatch(r"`(.*)`", cell)
    assert match, f"expected one `code` value, got {cell!r}"
    return match.group(1)


def test_the_table_matches_the_config_schema_and_the_guide() -> None:
    rows = table_rows()
    assert [_code(row["guide argument"]) for row in rows] == list(GUIDE), "one row per guide argument, in its order"
    sections: dict[str, type[BaseModel]] = {"model": cfg.ModelConfig, "data": cfg.DataConfig, "train": cfg.TrainConfig}
    for row in rows:
        name = _code(row["guide argument"])
        section, field = _code(row["field here"]).split(".")
        assert field == name, row
        schema = sections[section].model_fields[field]
        assert json.loads(_code(row["default here"])) == schema.default, f"{name}: the table's default is stale"
        assert json.loads(_code(row["guide's default"])) == GUIDE[name], f"{name}: not the guide's default"
        try:  # the guide's value as this schema reads it ("1" -> true, "4096" -> 4096, "Cosine" -> cosine)
            read = getattr(sections[section].model_validate({field: GUIDE[name]}), field)
        except ValidationError:
            read = "refused"
        if read != schema.default:
            assert row["why the defaults differ"] not in ("", "—"), f"{name}: the defaults differ with no reason"


def test_every_test_the_table_names_exists() -> None:
    for row in table_rows():
        for file, function in re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", row["shown by"]):
            source = REPO / file
            assert source.exists(), file
            assert re.search(rf"^def {function}\(", source.read_text(encoding="utf-8"), re.M), f"{file}::{function}"


# ---------------------------------------------------------------- effects, no training


def test_model_unique_names_the_run(tmp_path: Path) -> None:
    path = tmp_path / "pretrain.yaml"
    path.write_text("train:\n  model_unique: 2b_0701\n")
    assert cfg.load(path)[1] == "2b_0701"
    path.write_text("train:\n  lr: 0.01\n")
    assert cfg.load(path)[1] == "pretrain"  # empty: the config file's name


def test_only_the_indexed_dataloader_exists() -> None:
    assert cfg.load(None, ["train.dataloader=indexed"])[0].train.dataloader == "indexed"
    with pytest.raises(cfg.ConfigError, match="train.dataloader"):
        cfg.load(None, ["train.dataloader=simple"])


def test_grad_ckpt_num_maps_ranks_onto_optimizer_files(tmp_path: Path) -> None:
    step = tmp_path / "4"
    step.mkdir()
    for rank in range(3):  # written by three ranks
        torch.save({"written_by": rank}, step / f"{SAVE_NAME}-4.rank-{rank}.opt")
    rank4 = Checkpointer(tmp_path, rank=4, world_size=6, barrier=lambda: None)
    assert rank4.load_optimizer(step, grad_ckpt_num=0)["written_by"] == 4 % 3  # 0: count the files
    assert rank4.load_optimizer(step, grad_ckpt_num=2)["written_by"] == 4 % 2


# ---------------------------------------------------------------- effects on a short training run


@pytest.fixture(scope="module")
def finite_mixture(corpus: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    """One task of 24 short lines that does not repeat: its data ends after a few steps."""
    root = tmp_path_factory.mktemp("finite")
    raw = root / "lines.jsonl"
    raw.write_text("".join(json.dumps({"input": "", "output": f"line {i} of the data"}) + "\n" for i in range(24)))
    build_index(raw, root / "index", durable=False)
    mixture = root / "mixture.json"
    entry = {"dataset_name": "f", "task_name": "f", "abs_weight": 1.0, "path": str(root / "index")}
    mixture.write_text(json.dumps([{**entry, "allow_repeat": False}]))
    return mixture


@pytest.fixture(scope="module")
def baseline(corpus: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> RunDir:  # noqa: F811
    run = make_run(tmp_path_factory.mktemp("guide") / "base", corpus, train_iters=4, save_iters=2)
    assert train.run(run.root) == 0
    return run


def _steps_saved(run: RunDir) -> list[int]:
    return sorted(int(p.name) for p in run.checkpoints.iterdir() if p.name.isdigit())


def _tensorboard(run: RunDir) -> Path:
    return Path(json.loads(run.summary.read_text())["tensorboard"])


@pytest.mark.slow  # a few 4-step training runs of the tiny model
@pytest.mark.parametrize(
    "argument", ["local", "save", "save_iters", "exp_group", "tensorboard_all_tasks", "eps", "stop_when_end"]
)
def test_a_training_run_shows_the_argument(
    argument: str,
    baseline: RunDir,
    corpus: dict[str, Path],  # noqa: F811
    finite_mixture: Path,
    tmp_path: Path,
) -> None:
    base = metrics(baseline)
    assert _steps_saved(baseline) == [2, 4] and set(base[1]["task_loss"]) <= {"en", "zh"}
    assert any(tag.startswith("Loss/train/") for tag in read_scalars(_tensorboard(baseline)))
    if argument == "stop_when_end":
        finite = {**corpus, "mixture": finite_mixture}
        stops = make_run(tmp_path / "stops", finite, train_iters=2)
        goes_on = make_run(tmp_path / "goes_on", finite, train_iters=2, stop_when_end=False)
        assert train.run(stops.root) == 0 and train.run(goes_on.root) == 0
        assert json.loads(stops.summary.read_text())["final_step"] == 2
        ended = json.loads(goes_on.summary.read_text())
        assert ended["final_step"] > 2 and ended["outcome"] == "done"  # ran until the data was used up
        return
    changed = {"local": True, "save": False, "save_iters": 3, "exp_group": "grp_", "tensorboard_all_tasks": False}
    changed["eps"] = 1e-6
    run = make_run(tmp_path / argument, corpus, **{"train_iters": 4, "save_iters": 2, argument: changed[argument]})
    assert train.run(run.root) == 0
    got = metrics(run)
    if argument == "local":  # accepted and changes nothing
        assert all(got[s]["loss"] == base[s]["loss"] for s in base) and _steps_saved(run) == [2, 4]
    elif argument == "save":
        assert _steps_saved(run) == [] and sorted(got) == [1, 2, 3, 4]
    elif argument == "save_iters":
        assert _steps_saved(run) == [3, 4]  # every 3 steps, and at the end
    elif argument == "exp_group":
        assert _tensorboard(run) == run.tensorboard / f"grp_{run.name}"
        assert read_scalars(_tensorboard(run))["Loss/train"]
    elif argument == "tensorboard_all_tasks":
        assert all("task_loss" not in record for record in got.values())
        assert not any(tag.startswith("Loss/train/") for tag in read_scalars(_tensorboard(run)))
    elif argument == "eps":
        assert json.loads((baseline.checkpoints / "4" / "config.json").read_text())["eps"] == 1e-5
        assert json.loads((run.checkpoints / "4" / "config.json").read_text())["eps"] == 1e-6


def _loaded_trainer(run: RunDir) -> train.Trainer:
    ctx = init_distributed()
    trainer = train.Trainer(run, cfg.load_resolved(run.config), ctx)
    try:
        trainer.load()
    except BaseException:
        trainer.close()
        ctx.close()
        raise
    trainer.close()
    ctx.close()
    return trainer


@pytest.mark.slow
@pytest.mark.parametrize("restore", [True, False])
def test_load_dataloader_ckpt_restores_the_data_position(
    restore: bool,
    baseline: RunDir,
    corpus: dict[str, Path],  # noqa: F811
    tmp_path: Path,
) -> None:
    step2 = baseline.checkpoints / "2"
    run = make_run(tmp_path / "resumed", corpus, train_iters=4, resume_ckpt=str(step2), load_dataloader_ckpt=restore)
    trainer = _loaded_trainer(run)
    assert trainer.progress.step == 2  # a full resume either way
    assert trainer.loader.state_dict()["batches"] == (2 if restore else 0)


@pytest.mark.slow
def test_strict_state_dict_decides_on_missing_keys(baseline: RunDir, corpus: dict[str, Path], tmp_path: Path) -> None:  # noqa: F811
    copy = tmp_path / "ckpt" / "4"
    shutil.copytree(baseline.checkpoints / "4", copy)
    weights = copy / f"{SAVE_NAME}-4.pt"
    state = torch.load(weights)
    dropped = "encoder.output_layernorm.weight"
    del state[dropped]
    torch.save(state, weights)
    strict = make_run(tmp_path / "strict", corpus, resume_ckpt=str(copy), only_load_model=True)
    with pytest.raises(RuntimeError, match=f"Missing key.*{re.escape(dropped)}"):
        _loaded_trainer(strict)
    loose = make_run(tmp_path / "loose", corpus, resume_ckpt=str(copy), only_load_model=True, strict_state_dict=False)
    assert any(dropped in note and "non-strict load" in note for note in _loaded_trainer(loose).notes)
