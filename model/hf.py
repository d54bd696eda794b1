"""FM9G checkpoint keys <-> Hugging Face keys and configs (torchtitan's state-dict adapter).

The conversion is a pure rename (both sides use rotate-half RoPE, so q/k need no
permutation).  The exported config declares an architecture transformers ships
natively, so the folder loads without trust_remote_code:

  - muP-scaled models (FM9G-2B, MiniCPM-style) -> `GraniteForCausalLM`, whose
    embedding_multiplier / residual_multiplier / logits_scaling / attention_multiplier
    are exactly scale_emb, scale_depth/sqrt(L), dim_model/dim_model_base, 1/sqrt(dim_head);
  - plain models (FM9G-8B) -> `LlamaForCausalLM`.
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal

import torch

from fm9g.model.args import ModelArgs

Architecture = Literal["GraniteForCausalLM", "LlamaForCausalLM"]

# FM9G key (with {i} for the layer) -> HF key.
_LAYER_KEYS = {
    "self_att.layernorm_before_attention.weight": "input_layernorm.weight",
    "self_att.self_attention.project_q.weight": "self_attn.q_proj.weight",
    "self_att.self_attention.project_k.weight": "self_attn.k_proj.weight",
    "self_att.self_attention.project_v.weight": "self_attn.v_proj.weight",
    "self_att.self_attention.attention_out.weight": "self_attn.o_proj.weight",
    "ffn.layernorm_before_ffn.weight": "post_attention_layernorm.weight",
    "ffn.ffn.w_in.w_0.weight": "mlp.gate_proj.weight",
    "ffn.ffn.w_in.w_1.weight": "mlp.up_proj.weight",
    "ffn.ffn.w_out.weight": "mlp.down_proj.weight",
}
_TOP_KEYS = {
    "input_embedding.weight": "model.embed_tokens.weight",
    "encoder.output_layernorm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
_FM9G_LAYER = re.compile(r"encoder\.layers\.(\d+)\.(.+)")
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")


def hf_key(key: str) -> str:
    """The HF name of an FM9G parameter."""
    if key in _TOP_KEYS:
        return _TOP_KEYS[key]
    match = _FM9G_LAYER.fullmatch(key)
    if not match or match.group(2) not in _LAYER_KEYS:
        raise KeyError(f"{key!r} is not an FM9G dragonfly parameter")
    return f"model.layers.{match.group(1)}.{_LAYER_KEYS[match.group(2)]}"


def fm9g_key(key: str) -> str:
    """The FM9G name of an HF parameter."""
    top = {hf: ours for ours, hf in _TOP_KEYS.items()}
    if key in top:
        return top[key]
    match = _HF_LAYER.fullmatch(key)
    layer = {hf: ours for ours, hf in _LAYER_KEYS.items()}
    if not match or match.group(2) not in layer:
        raise KeyError(f"{key!r} is not a Llama/Granite parameter this model has")
    return f"encoder.layers.{match.group(1)}.{layer[match.group(2)]}"


def architecture_for(args: ModelArgs) -> Architecture:
    """Granite when any muP scaling is on, else Llama."""
    plain = args.scale_width == 1.0 and args.embedding_scale == 1.0 and args.residual_scale == 1.0
    return "LlamaForCausalLM" if plain else "GraniteForCausalLM"


def hf_config(
    args: ModelArgs,
    bos_id: int | None = None,
    eos_id: int | None = None,
    architecture: Architecture | None = None,
    dtype: str = "float32",
) -> dict[str, Any]:
    """config.json of the exported folder."""
    architecture = architecture or architecture_for(args)
    config: dict[str, Any] = {
        "architectures": [architecture],
        "vocab_size": args.vocab_size,
        "hidden_size": args.dim_model,
        "intermediate_size": args.dim_ff,
        "num_hidden_layers": args.num_layers,
        "num_attention_heads": args.num_heads,
        "num_key_value_heads": args.num_kv_heads,
        "head_dim": args.dim_head,
        "hidden_act": "silu",
        "max_position_embeddings": args.max_length,
        "initializer_range": args.init_std,
        "rms_norm_eps": args.eps,
        # transformers >= 5 reads rope_parameters; 4.x reads rope_theta.
        "rope_theta": args.base,
        "rope_parameters": {"rope_type": "default", "rope_theta": args.base},
        "tie_word_embeddings": args.tie_lm_head,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": args.dropout_p,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "torch_dtype": dtype,
        "use_cache": True,
    }
    if architecture == "GraniteForCausalLM":
        config.update(
            model_type="granite",
            embedding_multiplier=args.embedding_scale,
            residual_multiplier=args.residual_scale,
            logits_scaling=args.scale_width,
            attention_multiplier=1.0 / math.sqrt(args.dim_head),
        )
    else:
        if architecture_for(args) != "LlamaForCausalLM":
            raise ValueError(
                "LlamaForCausalLM cannot express muP scaling (scale / scale_depth): export as GraniteForCausalLM"
            )
        config.update(model_type="llama")
    return config


def to_hf(
    state: dict[str, torch.Tensor],
    args: ModelArgs,
    *,
    architecture: Architecture | None = None,
    bos_id: int | None = None,
    eos_id: int | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(HF state dict, HF config) from an FM9G state dict; a tied head is stored once, as the embedding."""
    tensors = {hf_key(key): value.contiguous() for key, value in state.items()}
    dtype = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    return tensors, hf_config(args, bos_id, eos_id, architecture, dtype)


def args_from_hf(config: dict[str, Any]) -> ModelArgs:
    """ModelArgs from a Granite, Llama or MiniCPM (FM9G-2B: model_type fm9g) config.json."""
    model_type = config.get("model_type")
    rope = config.get("rope_parameters") or {}
    hidden, heads, layers = config["hidden_size"], config["num_attention_heads"], config["num_hidden_layers"]
    fields: dict[str, Any] = {
        "vocab_size": config["vocab_size"],
        "dim_model": hidden,
        "num_heads": heads,
        "num_kv_heads": config.get("num_key_value_heads") or heads,
        "dim_head": config.get("head_dim") or hidden // heads,
        "dim_ff": config["intermediate_size"],
        "num_layers": layers,
        "eps": config.get("rms_norm_eps", 1e-5),
        "init_std": config.get("initializer_range", 0.02),
        "base": rope.get("rope_theta", config.get("rope_theta", 10000.0)),
        # MiniCPM's config class (the FM9G-2B's) defaults to a tied head; Llama's does not.
        "tie_lm_head": config.get("tie_word_embeddings", model_type in ("minicpm", "fm9g")),
        "max_length": config.get("max_position_embeddings", 4096),
        "dropout_p": config.get("attention_dropout", 0.0),
    }
    if model_type == "granite":
        if not math.isclose(config.get("attention_multiplier", 1.0), 1.0 / math.sqrt(fields["dim_head"]), rel_tol=1e-6):
            raise ValueError("attention_multiplier other than 1/sqrt(head_dim) has no FM9G equivalent")
        base_width = hidden / config.get("logits_scaling", 1.0)
        if abs(base_width - round(base_width)) > 1e-6:
            raise ValueError(f"logits_scaling {config.get('logits_scaling')} does not divide hidden_size {hidden}")
        fields.update(
            scale=True,
            scale_emb=config.get("embedding_multiplier", 1.0),
            dim_model_base=round(base_width),
            scale_depth=config.get("residual_multiplier", 1.0) * math.sqrt(layers),
        )
    elif model_type in ("minicpm", "fm9g"):  # FM9G-2B's HF folder: MiniCPM fields (fm9g-formats §3.5)
        missing = [name for name in ("scale_emb", "dim_model_base", "scale_depth") if name not in config]
        if missing:
            raise ValueError(f"model_type {model_type!r} needs {', '.join(missing)} (MiniCPM's muP fields)")
        fields.update(
            scale=True,
            scale_emb=config["scale_emb"],
            dim_model_base=config["dim_model_base"],
            scale_depth=config["scale_depth"],
        )
    elif model_type == "llama":
        fields.update(scale=False, scale_depth=-1.0)
    else:
        raise ValueError(f"model_type {model_type!r} is not importable: use granite, llama, minicpm or fm9g")
    return ModelArgs.model_validate(fields)


def from_hf(tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> tuple[dict[str, torch.Tensor], ModelArgs]:
    """(FM9G state dict, ModelArgs) from HF tensors and config.json."""
    args = args_from_hf(config)
    state = {
        fm9g_key(key): value.contiguous() for key, value in tensors.items() if not key.endswith("rotary_emb.inv_freq")
    }  # old HF checkpoints stored the RoPE table
    if args.tie_lm_head:
        state.pop("lm_head.weight", None)  # some exporters write the tied copy too
    return state, args
