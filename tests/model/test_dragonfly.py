"""Architecture: configs, parameter names and counts, packed attention, muP scalings."""

from __future__ import annotations

import pytest
import torch

from fm9g.model.args import ModelArgs, ModelConfigError, load_model_config
from fm9g.model.attention import (
    FlashAttention,
    SdpaAttention,
    cu_seqlens_from_segments,
    flash_available,
    packed_causal_mask,
    select_attention,
    set_attention,
)
from fm9g.model.dragonfly import build_model, count_parameters


def tiny(**overrides) -> ModelArgs:
    return load_model_config("tiny", vocab_size=97, **overrides)


def expected_count(args: ModelArgs) -> int:
    """Parameter count from the shapes in the FM9G checkpoint keys."""
    d, h, kv, dh, ff = args.dim_model, args.num_heads, args.num_kv_heads, args.dim_head, args.dim_ff
    layer = 2 * d + d * h * dh * 2 + d * kv * dh * 2 + 3 * d * ff
    heads = 1 if args.tie_lm_head else 2
    return heads * args.vocab_size * d + args.num_layers * layer + d


def test_2_4b_parameter_count() -> None:
    args = load_model_config("2.4b")
    model = build_model(args, "meta")
    assert count_parameters(model) == expected_count(args) == 2_724_880_896
    # MiniCPM-2B's "2.4B without embeddings".
    assert count_parameters(model, embeddings=False) == 2_442_057_984
    assert args.scale_width == 9.0 and args.tie_lm_head


def test_8b_parameter_count() -> None:
    args = load_model_config("8b")
    model = build_model(args, "meta")
    assert count_parameters(model) == expected_count(args) == 8_765_444_096
    assert 7.7e9 < count_parameters(model, embeddings=False) < 7.9e9
    assert "lm_head.weight" in dict(model.named_parameters())
    assert args.scale_width == 1.0 and args.residual_scale == 1.0 and args.embedding_scale == 1.0


def test_state_dict_keys_are_fm9g_checkpoint_keys() -> None:
    keys = set(build_model(tiny(num_layers=1, tie_lm_head=False), "meta").state_dict())
    prefix = "encoder.layers.0."
    assert keys == {
        "input_embedding.weight",
        "encoder.output_layernorm.weight",
        "lm_head.weight",
        prefix + "self_att.layernorm_before_attention.weight",
        prefix + "self_att.self_attention.project_q.weight",
        prefix + "self_att.self_attention.project_k.weight",
        prefix + "self_att.self_attention.project_v.weight",
        prefix + "self_att.self_attention.attention_out.weight",
        prefix + "ffn.layernorm_before_ffn.weight",
        prefix + "ffn.ffn.w_in.w_0.weight",
        prefix + "ffn.ffn.w_in.w_1.weight",
        prefix + "ffn.ffn.w_out.weight",
    }


def test_hf_aliases_and_unsupported_fields(tmp_path) -> None:
    args = ModelArgs.model_validate(
        {
            "hidden_size": 32,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 64,
            "num_hidden_layers": 3,
            "rms_norm_eps": 1e-6,
            "hidden_act": "silu",
            "dim_head": 8,
        }
    )
    assert (args.dim_model, args.num_heads, args.num_kv_heads, args.dim_ff, args.num_layers, args.eps) == (
        32,
        4,
        2,
        64,
        3,
        1e-6,
    )
    bad = tmp_path / "moe.json"
    bad.write_text('{"moe_num_experts": 4}')
    with pytest.raises(ModelConfigError, match="moe_num_experts"):
        load_model_config(bad)
    with pytest.raises(ModelConfigError, match="not found"):
        load_model_config("13b")


def test_muP_scalings_change_the_output() -> None:
    torch.manual_seed(0)
    ids = torch.randint(0, 97, (1, 12))
    base = build_model(tiny(), seed=1)
    plain = build_model(tiny(scale=False, scale_depth=-1), seed=1)
    plain.load_state_dict(base.state_dict())
    assert not torch.allclose(base(ids), plain(ids))
    # With scale off, embeddings and logits are unscaled: logits = norm(h) @ E^T exactly.
    h = plain.input_embedding(ids)
    for layer in plain.encoder.layers:
        h = layer(h, *_tables(plain, ids), plain.attention_kernel.prepare(None, None, None, ids.shape))
    expected = plain.encoder.output_layernorm(h) @ plain.input_embedding.weight.T
    torch.testing.assert_close(plain(ids), expected)


def _tables(model, ids):
    from fm9g.model.dragonfly import rotary_tables

    positions = torch.arange(ids.shape[1]).expand_as(ids)
    return rotary_tables(positions, model.args.dim_head, model.args.base)


def _packed_batch(lengths_per_row: list[list[int]], vocab: int = 97):
    """input_ids, position_ids, segment_ids for rows packed from samples of the given lengths."""
    ids, pos, seg = [], [], []
    for lengths in lengths_per_row:
        ids.append(torch.randint(1, vocab, (sum(lengths),)))
        pos.append(torch.cat([torch.arange(n) for n in lengths]))
        seg.append(torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]))
    return torch.stack(ids), torch.stack(pos), torch.stack(seg).to(torch.int32)


def test_sdpa_packed_matches_each_sample_alone() -> None:
    torch.manual_seed(0)
    model = build_model(tiny(num_layers=2), seed=3).eval()
    rows = [[5, 3, 8], [16]]
    ids, pos, seg = _packed_batch(rows)
    packed = model(ids, pos, seg)
    for row, lengths in enumerate(rows):
        start = 0
        for n in lengths:
            alone = model(ids[row : row + 1, start : start + n])
            torch.testing.assert_close(packed[row : row + 1, start : start + n], alone, atol=1e-5, rtol=1e-5)
            start += n
    # Without the segment mask the second sample would see the first one.
    leaky = model(ids, pos)
    assert not torch.allclose(leaky[0, 5:8], packed[0, 5:8], atol=1e-4)


def test_mask_and_cu_seqlens_helpers() -> None:
    _, _, seg = _packed_batch([[2, 3], [5]])
    mask = packed_causal_mask(seg)
    assert mask.shape == (2, 1, 5, 5)
    assert mask[0, 0].int().tolist() == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 1, 1, 1],
    ]
    cu, longest = cu_seqlens_from_segments(seg)
    assert cu.tolist() == [0, 2, 5, 10] and longest == 5 and cu.dtype == torch.int32


def test_select_attention_on_cpu() -> None:
    assert isinstance(select_attention("auto", torch.device("cpu")), SdpaAttention)
    assert isinstance(select_attention("none", torch.device("cpu")), SdpaAttention)
    with pytest.raises(RuntimeError, match="flash-attn"):
        select_attention("cuda", torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not flash_available(), reason="flash-attn varlen needs a CUDA GPU and the flash-attn package")
def test_flash_varlen_matches_sdpa() -> None:
    torch.manual_seed(0)
    model = build_model(tiny(), "cuda", seed=3).eval()
    ids, pos, seg = (t.cuda() for t in _packed_batch([[5, 3, 8], [16]]))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        reference = model(ids, pos, seg).float()
        set_attention(model, FlashAttention())
        cu, longest = cu_seqlens_from_segments(seg)
        flash = model(ids, pos, seg, cu, longest).float()
    torch.testing.assert_close(flash, reference, atol=5e-2, rtol=5e-2)


def test_activation_checkpointing_gives_the_same_gradients() -> None:
    torch.manual_seed(0)
    ids = torch.randint(0, 97, (2, 10))
    grads = []
    for recompute in (False, True):
        model = build_model(tiny(), seed=5)
        model.encoder.checkpoint_layers = recompute
        model(ids).float().logsumexp(-1).mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
