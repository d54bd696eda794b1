"""The GPU-path fixes that can be reached on a CPU (issue 17): how the torch backend wraps
the model, FSDP2's mixed-precision policy and logged gradient norm, the flash-attn probe,
the MFU peak table.  Each test fails on the code before the fix."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from fm9g.model.args import load_model_config
from fm9g.model.attention import SdpaAttention, probe_flash, select_attention
from fm9g.model.backends import TorchBackend
from fm9g.model.distributed import ENV_DEVICE, Dist, init_distributed
from fm9g.model.dragonfly import build_model
from fm9g.model.flops import peak_tflops_of


@pytest.fixture
def ctx(monkeypatch: pytest.MonkeyPatch) -> Iterator[Dist]:
    """A one-process gloo group on the CPU."""
    monkeypatch.setenv(ENV_DEVICE, "cpu")
    ctx = init_distributed()
    try:
        yield ctx
    finally:
        ctx.close()


def tiny() -> nn.Module:
    return build_model(load_model_config("tiny", vocab_size=64), torch.device("cpu"), seed=0)


def test_one_rank_is_not_wrapped_in_ddp_and_may_skip_an_oom_batch(ctx: Dist) -> None:
    # An OOM in backward leaves DDP's reducer mid-reduction and the next step fails with
    # "Expected to have finished reduction in the prior iteration" (pytorch#18853), so the
    # batch skip of train.ignore_cuda_oom is only allowed where there is no DDP wrapper.
    model = tiny()
    backend = TorchBackend(ctx, fsdp=False)
    wrapped = backend.wrap(model)
    assert wrapped is model and not isinstance(wrapped, nn.parallel.DistributedDataParallel)
    assert backend.can_skip_a_batch
    with backend.accumulation(last=False):  # gradient accumulation needs no no_sync() without DDP
        pass
    assert set(backend.model_state()) == set(model.state_dict())
    assert TorchBackend(ctx, fsdp=True).can_skip_a_batch is False


def test_fsdp2_bf16_runs_a_mixed_precision_policy_and_fp32_stays_unchanged(ctx: Dist) -> None:
    ids = torch.randint(0, 64, (1, 16))
    fp32 = TorchBackend(ctx, fsdp=True, bf16=False).wrap(tiny())
    assert fp32(ids).dtype == torch.float32
    bf16 = TorchBackend(ctx, fsdp=True, bf16=True).wrap(tiny())
    seen: list[torch.dtype] = []
    layer = bf16.encoder.layers[0]
    layer.register_forward_pre_hook(lambda module, args: seen.append(next(module.parameters()).dtype))
    # No autocast here: only the policy can make the all-gathered weights and the output bf16.
    out = bf16(ids)
    assert out.dtype == torch.bfloat16 and seen == [torch.bfloat16]
    out.float().sum().backward()
    # After backward: fp32 masters, and gradients reduced in fp32 (reduce_dtype).
    assert all(
        p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32 for p in bf16.parameters()
    )


def test_flash_probe_imports_for_real_and_says_why_it_falls_back() -> None:
    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here; the GPU tests cover the working probe")
    reason = probe_flash()
    assert reason is not None and "flash-attn does not import" in reason and "flash_attn" in reason
    assert isinstance(select_attention("auto", torch.device("cpu")), SdpaAttention)
    with pytest.raises(RuntimeError, match="make gpu-train-env"):
        select_attention("cuda", torch.device("cpu"))


@pytest.mark.parametrize(
    ("name", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", 835.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA H200 NVL", 835.0),
        ("NVIDIA H20", 148.0),
        ("NVIDIA H800 PCIe", 756.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("Tesla V100-SXM2-32GB", None),  # no bf16 tensor cores
    ],
)
def test_peak_table_tells_pcie_and_nvl_parts_from_sxm(name: str, tflops: float | None) -> None:
    assert peak_tflops_of(name) == tflops


GLOBAL_NORM_SCRIPT = """
import torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._ops._math_ops import _NormPartial  # what clip_grad_norm_ returned (torch < 2.13)
from fm9g.model.backends import global_norm
dist.init_process_group("gloo")
rank = dist.get_rank()
mesh = init_device_mesh("cpu", (2,))
# Each rank's norm of its shard of the gradients: 3 and 4; the global norm is sqrt(3^2 + 4^2) = 5.
local = torch.tensor(3.0 if rank == 0 else 4.0)
norm = DTensor.from_local(local, mesh, [_NormPartial(norm_type=2.0)])
print(f"rank{rank} global={global_norm(norm):.4f} local={float(norm.to_local()):.4f}", flush=True)
dist.barrier()  # neither rank tears gloo down while the other still talks to it
dist.destroy_process_group()
"""


@pytest.mark.slow  # a torchrun subprocess
def test_global_norm_reduces_partial_dtensor_norms_over_ranks(tmp_path: Path) -> None:
    # torch 2.13's clip_grad_norm_ already returns a Replicate DTensor; the torch versions the
    # floor admits (2.6 on) returned a _NormPartial one whose float() was this rank's share
    # (pytorch#166638).  global_norm reduces either kind to the same global figure.
    script = tmp_path / "global_norm.py"
    script.write_text(GLOBAL_NORM_SCRIPT)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        cwd=Path(__file__).resolve().parents[2],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank0 global=5.0000 local=3.0000" in result.stdout
    assert "rank1 global=5.0000 local=4.0000" in result.stdout
