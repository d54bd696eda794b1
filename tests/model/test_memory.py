"""The memory arithmetic the examples and the trainer's refusal rest on (fm9g.model.memory)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fm9g.model.args import load_model_config
from fm9g.model.dragonfly import build_model, count_parameters
from fm9g.model.memory import GIB, check_fits, estimate, layout_of, parameter_count

REPO = Path(__file__).resolve().parents[2]
GPU_80GB = 80 * 10**9  # an "80 GB" H100/A100 reports 79.1-85 GB; the smallest, in bytes


@pytest.mark.parametrize("name", ["tiny", "2.4b", "8b"])
def test_parameter_count_is_the_built_models(name: str) -> None:
    args = load_model_config(name)
    assert parameter_count(args) == count_parameters(build_model(args, "meta"))


def test_8b_on_ddp_is_refused_with_the_fix_and_fsdp2_fits() -> None:
    args = load_model_config("8b")
    problem, _ = check_fits(args, "ddp", gpus=8, tokens=4096, checkpoint=True, device_bytes=GPU_80GB)
    assert problem is not None and "model.fsdp: true" in problem and "8.77B parameters" in problem
    problem, note = check_fits(args, "fsdp2", gpus=8, tokens=4096, checkpoint=True, device_bytes=GPU_80GB)
    assert problem is None and "fsdp2, 8 GPUs" in note
    # The exact terms: 16 bytes per parameter, sharded or not.
    assert estimate(args, "ddp", gpus=1, tokens=1, checkpoint=True).states == 16 * parameter_count(args)
    assert estimate(args, "fsdp2", gpus=64, tokens=1, checkpoint=True).states == 16 * parameter_count(args) / 64


@pytest.mark.parametrize("example", ["fm9g_2b", "fm9g_8b"])
def test_each_examples_default_layout_fits_an_80gb_gpu(example: str) -> None:
    raw = yaml.safe_load((REPO / "examples" / example / "pretrain.yaml").read_text())
    model, train, cluster = raw["model"], raw["train"], raw["cluster"]
    args = load_model_config(model["config"])
    layout = layout_of(model.get("backend", "torch"), model.get("fsdp", False), offload=True)
    need = estimate(
        args,
        layout,
        gpus=cluster["nodes"] * cluster["gpus_per_node"],
        tokens=train["batch_size"] * raw["data"]["max_length"],
        checkpoint=train.get("use_checkpoint", False),
    )
    assert need.total < 0.85 * GPU_80GB, f"{example}: {need.total / GIB:.1f} GiB"
