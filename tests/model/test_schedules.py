"""LR schedules (FM9G formulas, resume window, state) and the muP optimizer groups."""

from __future__ import annotations

import math

import pytest
import torch

from fm9g.model.args import load_model_config
from fm9g.model.dragonfly import build_model
from fm9g.model.optim import build_optimizer, is_hidden_matrix
from fm9g.model.schedules import build_scheduler, resolve_iters


def optimizer(lr: float = 1.0, groups: int = 1) -> torch.optim.Optimizer:
    params = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr / (i + 1)} for i in range(groups)]
    return torch.optim.SGD(params, lr=lr)


def lrs(schedule, steps: int) -> list[float]:
    out = [schedule.current_lr]
    for _ in range(steps):
        schedule.step()
        out.append(schedule.current_lr)
    return out


def test_cosine_formula() -> None:
    s = build_scheduler(optimizer(), "Cosine", lr=1.0, train_iters=110, warmup_iters=10)
    got = lrs(s, 120)
    assert got[0] == 0.0 and got[5] == pytest.approx(0.5) and got[10] == pytest.approx(1.0)
    for n in (10, 30, 60, 109):
        p = (n - 10) / 100
        assert got[n] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * p)))
    assert got[110] == pytest.approx(0.1) and got[120] == pytest.approx(0.1)  # flat at 0.1·lr after the end


def test_wsd_formula_and_fractions() -> None:
    s = build_scheduler(optimizer(), "WarmupStableDrop", lr=2.0, train_iters=100, warmup_iters=0.1, drop_iters=0.2)
    got = lrs(s, 100)
    assert got[5] == pytest.approx(1.0) and got[10] == 2.0 and got[80] == 2.0
    assert got[90] == pytest.approx(2.0 * (0.1 + 0.9 * 10 / 20))
    assert got[100] == pytest.approx(0.2)
    assert resolve_iters(0.1, 1000) == 100 and resolve_iters(20, 1000) == 20


def test_wse_formula() -> None:
    s = build_scheduler(
        optimizer(),
        "warmupstableexp",
        lr=1.0,
        train_iters=100,
        warmup_iters=4,
        drop_iters=10,
        drop_begin=20,
        drop_rate=0.5,
    )
    got = lrs(s, 40)
    assert got[2] == pytest.approx(0.5) and got[20] == 1.0
    assert got[30] == pytest.approx(0.5) and got[40] == pytest.approx(0.25)
    default_begin = build_scheduler(
        optimizer(), "warmupstableexp", lr=1.0, train_iters=100, warmup_iters=4, drop_iters=10, start_step=14
    )
    assert default_begin.current_lr == pytest.approx(0.5)  # drop_begin -1 = right after warmup


def test_groups_keep_their_ratio() -> None:
    opt = optimizer(lr=1.0, groups=2)
    build_scheduler(opt, "cosine", lr=1.0, train_iters=50, warmup_iters=10, start_step=5)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.5, 0.25])


def test_resume_no_optimze() -> None:
    cos = build_scheduler(
        optimizer(), "cosine", lr=1.0, train_iters=100, warmup_iters=10, start_step=50, resume_no_optimze=3
    )
    got = lrs(cos, 4)
    assert got[:3] == [0.0, 0.0, 0.0] and got[3] > 0.5
    wsd = build_scheduler(
        optimizer(),
        "warmupstabledrop",
        lr=1.0,
        train_iters=100,
        warmup_iters=10,
        drop_iters=0.1,
        start_step=50,
        resume_no_optimze=4,
    )
    assert lrs(wsd, 5) == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0, 1.0])


def test_state_dict_round_trip() -> None:
    a = build_scheduler(optimizer(), "warmupstabledrop", lr=1.0, train_iters=100, warmup_iters=10, drop_iters=30)
    for _ in range(75):
        a.step()
    opt = optimizer()
    b = build_scheduler(opt, "warmupstabledrop", lr=1.0, train_iters=100, warmup_iters=10, drop_iters=30)
    b.load_state_dict(a.state_dict())
    assert b.num_iter == 75 and b.current_lr == a.current_lr and opt.param_groups[0]["lr"] == a.current_lr
    assert lrs(a, 10) == lrs(b, 10)
    with pytest.raises(ValueError, match="unknown lr_scheduler"):
        build_scheduler(optimizer(), "linear", lr=1.0, train_iters=10, warmup_iters=1)


def test_muP_param_groups() -> None:
    args = load_model_config("tiny", vocab_size=50)
    model = build_model(args, "meta")
    opt = build_optimizer(model, lr=0.01, weight_decay=0.1, scale_width=args.scale_width)
    matrices, others = opt.param_groups
    assert matrices["lr"] == pytest.approx(0.01 / args.scale_width) and others["lr"] == 0.01
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in others["params"]} == (
        {"input_embedding.weight", "encoder.output_layernorm.weight"}
        | {
            f"encoder.layers.{i}.{n}"
            for i in range(args.num_layers)
            for n in ("self_att.layernorm_before_attention.weight", "ffn.layernorm_before_ffn.weight")
        }
    )
    assert all(g["betas"] == (0.9, 0.95) and g["weight_decay"] == 0.1 for g in opt.param_groups)
    assert not is_hidden_matrix("module.lm_head.weight") and is_hidden_matrix(
        "module.encoder.layers.0.ffn.ffn.w_out.weight"
    )
