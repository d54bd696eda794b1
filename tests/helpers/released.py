"""Files in the layouts the FM9G models were released in, at tiny shapes with random weights.

Key names, dtypes (bf16) and config fields follow shared reference fm9g-formats.md §3.5
(BMTrain `.pt` with the dragonfly keys and a cpm_dragonfly config.json; a Hugging Face
folder with a MiniCPM-shaped 2B config (model_type "fm9g" or "minicpm", scale_emb,
scale_depth, dim_model_base, no tie_word_embeddings key: MiniCPM's default ties) or a
Llama-shaped 8B config, weights as pytorch_model.bin or safetensors) and §6 (a
sentencepiece tokenizer.model for the 2B, a cpm vocab.txt of JSON strings for the 8B).

Used by tests/model/test_released.py, tests/integration/test_released_flow.py, and the
inference tests of released models:

    tokenizer = write_tokenizer("8b", tmp_path)
    args = released_args("8b", vocab_size_of(tokenizer))
    folder = write_released_hf(tmp_path / "8b_sft_model", args, seed=1, tokenizer=tokenizer)
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any, Literal

import torch

from fm9g.data.tokenizer import load_tokenizer, train_sentencepiece
from fm9g.model.args import ModelArgs
from fm9g.model.dragonfly import build_model
from fm9g.model.hf import hf_key

Kind = Literal["2b", "8b"]
Weights = Literal["bin", "safetensors", "sharded-bin"]

ZH = "中国的首都是北京。今天天气很好，我们去公园散步吧！人工智能正在改变世界，数据处理流程九格大模型"
EN = "the quick brown fox jumps over the lazy dog while data pipelines index every line of text"
CODE = 'def f(x):\n    return {"a": x * 2}  # double\n\nprint(f(3))\r\n\tif a<b: pass  \\n'
CHAT = "<用户>中国的首都是哪里？<AI>北京。"


def mixed_corpus(count: int = 60, seed: int = 0) -> list[str]:
    """Chinese, English, code (tabs, CRLF, backslashes), chat markers, emoji and literal "<s>"."""
    rng = random.Random(seed)
    lines = [CHAT, "literal <s> and </s> and <unk> and <0x41> stay text", "emoji 😀🚀 ✓ 𝔘 é\u0301"]
    for index in range(count):
        kind = index % 4
        if kind == 0:
            lines.append("".join(rng.choice(ZH) for _ in range(rng.randint(5, 60))))
        elif kind == 1:
            lines.append(" ".join(rng.choice(EN.split()) for _ in range(rng.randint(3, 30))))
        elif kind == 2:
            lines.append(CODE[: rng.randint(10, len(CODE))])
        else:
            lines.append(rng.choice(ZH) * rng.randint(1, 4) + " mixed 中英 text " + rng.choice(EN.split()))
    return lines


# ------------------------------------------------------------------ tokenizers


def write_tokenizer(kind: Kind, folder: Path) -> Path:
    """2b: a small BPE sentencepiece tokenizer.model; 8b: a cpm vocab.txt (JSON string per line)."""
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "2b":
        return train_sentencepiece(mixed_corpus(300), folder / "tokenizer.model", 600)
    tokens = ["<unk>", "<s>", "</s>", "<用户>", "<AI>"]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    # Words that overlap (qu/quick, 人工/人工智能, "  "/"    ") so greedy longest match is exercised,
    # and entries made of regex syntax so the exported regex must escape them.
    tokens += ["中国", "北京", "首都", "天气", "人工", "人工智能", "九格", "大模型", "the", "quick", "qu", "brown"]
    tokens += ["fox", "def", "return", "print", " ", "  ", "    ", "\n", "\n\n", "(x)", "a<b", "\\n", "*", ".*", "[a]"]
    tokens += sorted(set(ZH + EN + "abcdefghijklmnopqrstuvwxyz") - set(tokens))
    path = folder / "vocab.txt"
    path.write_text("\n".join(json.dumps(t, ensure_ascii=False) for t in tokens) + "\n", encoding="utf-8")
    return path


def vocab_size_of(tokenizer: Path) -> int:
    return load_tokenizer(tokenizer).vocab_size


# ------------------------------------------------------------------ shapes and configs


def released_args(kind: Kind, vocab_size: int) -> ModelArgs:
    """Tiny shapes of the two releases: 2B = muP scalings and a tied head, 8B = plain Llama, untied."""
    common = {"vocab_size": vocab_size, "dim_model": 64, "num_heads": 4, "dim_head": 16, "num_layers": 2}
    if kind == "2b":
        return ModelArgs(
            **common,
            num_kv_heads=4,
            dim_ff=160,
            scale=True,
            scale_emb=12.0,
            scale_depth=1.4,
            dim_model_base=16,
            tie_lm_head=True,
            init_std=0.1,
            max_length=512,
        )
    return ModelArgs(
        **common,
        num_kv_heads=2,
        dim_ff=176,
        scale=False,
        scale_depth=-1.0,
        tie_lm_head=False,
        init_std=0.05,
        max_length=512,
    )


def dragonfly_config(args: ModelArgs) -> dict[str, Any]:
    """config.json beside a released .pt: every DragonflyConfig field, as the FM9G code writes it."""
    return {
        "model_type": "cpm_dragonfly",
        "architectures": ["CPMDragonflyForCausalLM"],
        "vocab_size": args.vocab_size,
        "dim_model": args.dim_model,
        "num_heads": args.num_heads,
        "num_kv_heads": args.num_kv_heads,
        "dim_head": args.dim_head,
        "dim_ff": args.dim_ff,
        "num_layers": args.num_layers,
        "dropout_p": 0.0,
        "activate_fn": "silu",
        "scale": args.scale,
        "scale_emb": args.scale_emb,
        "scale_depth": args.scale_depth,
        "dim_model_base": args.dim_model_base,
        "eps": args.eps,
        "init_std": args.init_std,
        "_dtype": "bf16",
        "base": args.base,
        "qk_norm": False,
        "tie_lm_head": args.tie_lm_head,
        "max_length": args.max_length,
        "pose_prob": 0.0,
        "pose_scaling_factor": 1,
        "rope_scaling_type": "",
        "rope_scaling_factor": 1,
        "orig_max_length": args.max_length,
        "tp": 0,
        "moe_num_experts": 0,
        "moe_top_k": 2,
        "moe_top_p": 0.3,
        "moe_routing_strategy": "topk",
        "num_shared_experts": 0,
        "disable_checkpoint": None,
        "ffn_gated": True,
        "attention_type": "vanilla",
    }


def minicpm_config(args: ModelArgs, model_type: str = "fm9g") -> dict[str, Any]:
    """The 2B HF config.json: MiniCPM field names, a custom architecture loaded with remote code."""
    architecture = "FM9GForCausalLM" if model_type == "fm9g" else "MiniCPMForCausalLM"
    module = "modeling_fm9g" if model_type == "fm9g" else "modeling_minicpm"
    return {
        "architectures": [architecture],
        "auto_map": {
            "AutoConfig": f"{module.replace('modeling', 'configuration')}.{architecture[:-11]}Config",
            "AutoModelForCausalLM": f"{module}.{architecture}",
        },
        "model_type": model_type,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": args.dim_model,
        "initializer_range": args.init_std,
        "intermediate_size": args.dim_ff,
        "max_position_embeddings": args.max_length,
        "num_attention_heads": args.num_heads,
        "num_hidden_layers": args.num_layers,
        "num_key_value_heads": args.num_kv_heads,
        "rms_norm_eps": args.eps,
        "rope_scaling": None,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.36.0",
        "use_cache": True,
        "vocab_size": args.vocab_size,
        "scale_emb": args.scale_emb,
        "dim_model_base": args.dim_model_base,
        "scale_depth": args.scale_depth,
    }


def llama_config(args: ModelArgs) -> dict[str, Any]:
    """The 8B HF config.json (CPM9G -> LlamaForCausalLM converter)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": args.dim_model,
        "initializer_range": args.init_std,
        "intermediate_size": args.dim_ff,
        "max_position_embeddings": args.max_length,
        "num_attention_heads": args.num_heads,
        "num_hidden_layers": args.num_layers,
        "num_key_value_heads": args.num_kv_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": args.eps,
        "rope_scaling": None,
        "rope_theta": args.base,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.40.0",
        "use_cache": True,
        "vocab_size": args.vocab_size,
    }


# ------------------------------------------------------------------ weights


def random_state(args: ModelArgs, seed: int, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """Random weights with the FM9G keys, in the released dtype."""
    return {key: value.to(dtype) for key, value in build_model(args, seed=seed).state_dict().items()}


def write_released_pt(
    folder: Path,
    args: ModelArgs,
    seed: int,
    *,
    tokenizer: Path | None = None,
    with_config: bool = True,
    name: str = "fm9g.pt",
) -> Path:
    """A BMTrain `.pt` (torch.save of the dragonfly state dict) and, optionally, its config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(random_state(args, seed), folder / name)
    if with_config:
        (folder / "config.json").write_text(json.dumps(dragonfly_config(args), indent=2))
    if tokenizer is not None:
        shutil.copy(tokenizer, folder / tokenizer.name)
    return folder / name


def write_released_hf(
    folder: Path,
    args: ModelArgs,
    seed: int,
    *,
    tokenizer: Path | None = None,
    weights: Weights = "bin",
    model_type: str = "fm9g",
) -> Path:
    """A released HF folder: MiniCPM-shaped config when args.scale (2B), Llama-shaped otherwise (8B)."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {hf_key(key): value for key, value in random_state(args, seed).items()}
    if args.tie_lm_head:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]  # save_pretrained(.bin) keeps the tied copy
    # Older transformers stored the RoPE table; a reader must skip it.
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = 1.0 / (
        args.base ** (torch.arange(0, args.dim_head, 2).float() / args.dim_head)
    )
    config = minicpm_config(args, model_type) if args.scale else llama_config(args)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    if weights == "bin":
        torch.save(state, folder / "pytorch_model.bin")
    elif weights == "sharded-bin":
        keys = list(state)
        half = len(keys) // 2
        names = ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
        for name, part in zip(names, (keys[:half], keys[half:]), strict=True):
            torch.save({key: state[key] for key in part}, folder / name)
        index = {"weight_map": {key: names[0] if i < half else names[1] for i, key in enumerate(keys)}}
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    else:
        from safetensors.torch import save_file

        state.pop("lm_head.weight", None) if args.tie_lm_head else None  # safetensors refuses shared storage
        save_file({key: value.contiguous() for key, value in state.items()}, str(folder / "model.safetensors"))
    if tokenizer is not None:
        shutil.copy(tokenizer, folder / tokenizer.name)
        if tokenizer.name == "tokenizer.model":
            (folder / "tokenizer_config.json").write_text(
                json.dumps({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>"})
            )
    return folder


def reference_logits(state: dict[str, torch.Tensor], args: ModelArgs, ids: torch.Tensor) -> torch.Tensor:
    """Logits of the project's own model (model/dragonfly.py) built from `state`, in float32."""
    model = build_model(args.model_copy(update={"dtype": "float32"}), "meta")
    model = model.to_empty(device="cpu")
    model.load_state_dict({key: value.float() for key, value in state.items()})
    with torch.no_grad():
        return model.eval()(ids)
