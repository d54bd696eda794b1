"""GPU-only behaviour of the fixes of issue 17, on one real CUDA device (skipped elsewhere).

- train.ignore_cuda_oom: a batch that really runs out of GPU memory is skipped, and the next
  step trains (with a DDP wrapper at world size 1 it failed: pytorch#18853);
- the flash-attn probe picks flash-attn when it works, and its deterministic backward gives
  the same gradients twice;
- the peak table knows this GPU.
The straight-vs-resumed loss figures on a GPU come from benchmarks/gpu_train_check.py (run
by benchmarks/gpu_check.sh), which reports the difference instead of asserting a guess.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from fm9g.model import train
from fm9g.model.attention import FlashAttention, cu_seqlens_from_segments, probe_flash
from fm9g.model.distributed import Dist, init_distributed
from fm9g.model.flops import peak_tflops_of
from fm9g.rundir import RunDir
from fm9g.rundir import config as config_mod

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    from gpu_train_check import build_corpus

    return build_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture
def ctx() -> Iterator[Dist]:
    ctx = init_distributed()
    try:
        yield ctx
    finally:
        ctx.close()


def make_run(path: Path, corpus: dict[str, Path], **train_args: Any) -> RunDir:
    run = RunDir.of(path).make()
    config = config_mod.RunConfig.model_validate(
        {
            "model": {"config": "tiny"},
            "data": {
                "dataset_config": str(corpus["mixture"]),
                "tokenizer_path": str(corpus["tokenizer"]),
                "max_length": 128,
                "dataloader_num_workers": 0,
            },
            "train": {"train_iters": 4, "batch_size": 2, "lr": 0.01, "warmup_iters": 0, "save": False, **train_args},
        }
    )
    run.config.write_text(config_mod.dump(config))
    return run


def tiled(batch: dict[str, Any], copies: int) -> dict[str, Any]:
    """`batch` with its rows repeated `copies` times: the same packing, `copies` times the memory."""
    out = dict(batch)
    for key in ("input_ids", "targets", "position_ids", "segment_ids", "task_ids"):
        out[key] = batch[key].repeat(copies, 1)
    out["cu_seqlens"], out["max_seqlen"] = cu_seqlens_from_segments(out["segment_ids"])
    out["num_tokens"] = batch["num_tokens"] * copies
    return out


def test_an_oom_batch_is_skipped_and_training_goes_on(tmp_path: Path, corpus: dict[str, Path], ctx: Dist) -> None:
    run = make_run(tmp_path / "oom", corpus, ignore_cuda_oom=True)
    trainer = train.Trainer(run, config_mod.load_resolved(run.config), ctx)
    try:
        trainer.load()
        assert not isinstance(trainer.model, torch.nn.parallel.DistributedDataParallel)
        batch = next(iter(trainer.loader))
        first = trainer._guarded_step([batch])
        # Cap this process at ~1.5 GiB, then feed a batch whose logits alone need more.
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(ctx.device).total_memory
        torch.cuda.set_per_process_memory_fraction(1.5 * 2**30 / total, ctx.device)
        try:
            skipped = trainer._guarded_step([tiled(batch, 4096)])
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0, ctx.device)
        assert skipped["tokens"] == 0 and "loss" not in skipped
        after = trainer._guarded_step([batch])  # the failing step left nothing half-done behind
        assert after["tokens"] == first["tokens"] and torch.isfinite(torch.tensor(after["loss"]))
    finally:
        trainer.close()


def test_flash_probe_and_deterministic_backward() -> None:
    reason = probe_flash()
    if reason is not None:
        pytest.skip(f"flash-attn does not work here: {reason}")
    segments = torch.arange(256, device="cuda").div(64, rounding_mode="floor").expand(2, 256)
    kernel = FlashAttention(deterministic=True)
    grads = []
    for _ in range(2):
        torch.manual_seed(1)
        q = torch.randn(2, 256, 4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        attend = kernel.prepare(segments, None, None, (2, 256))
        attend(q, q, q, 0.0).float().square().sum().backward()
        grads.append(q.grad.clone())
    assert torch.equal(grads[0], grads[1])


def test_this_gpu_has_a_bf16_peak_or_says_so() -> None:
    name = torch.cuda.get_device_name()
    peak = peak_tflops_of(name)
    print(json.dumps({"gpu": name, "peak_tflops_bf16": peak}))
    major, _ = torch.cuda.get_device_capability()
    if major >= 8 and any(key in name for key in ("H100", "H200", "H800", "H20", "A100", "A800")):
        assert peak is not None
