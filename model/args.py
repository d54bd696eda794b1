"""`ModelArgs`: the FM9G (cpm_dragonfly) model config, and the loader of named configs.

The fields are DragonflyConfig's (model_type `cpm_dragonfly`) with its defaults, and the
HF-style aliases it accepts (hidden_size -> dim_model, ...).  Fields the architecture in
`dragonfly.py` does not implement (MoE, MLA, qk_norm, RoPE scaling, ungated FFN) are
accepted only at their "off" value, so a config that asks for them fails loudly instead
of silently training a different model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, model_validator

CONFIG_DIR = Path(__file__).parent / "configs"


class ModelConfigError(ValueError):
    """A model config that cannot be built; the message names the file and the field."""


def _alias(name: str, *others: str) -> AliasChoices:
    return AliasChoices(name, *others)


class ModelArgs(BaseModel):
    """Architecture hyper-parameters; names and defaults follow DragonflyConfig."""

    # Unknown keys are ignored (FM9G configs carry bookkeeping such as `architectures`),
    # but every known key is validated.
    model_config = ConfigDict(extra="ignore", populate_by_name=True, validate_assignment=True)

    vocab_size: int = Field(122753, ge=1, description="Vocabulary size (the tiny config takes it from the tokenizer).")
    dim_model: int = Field(4096, ge=1, validation_alias=_alias("dim_model", "hidden_size"), description="Hidden size.")
    num_heads: int = Field(
        32, ge=1, validation_alias=_alias("num_heads", "num_attention_heads"), description="Query heads."
    )
    num_kv_heads: int = Field(
        32,
        ge=1,
        validation_alias=_alias("num_kv_heads", "num_key_value_heads"),
        description="Key/value heads (GQA when fewer than num_heads).",
    )
    dim_head: int = Field(128, ge=2, description="Width of one head (even: RoPE rotates halves).")
    dim_ff: int = Field(
        11008,
        ge=1,
        validation_alias=_alias("dim_ff", "intermediate_size"),
        description="Hidden width of the gated FFN.",
    )
    num_layers: int = Field(
        32, ge=1, validation_alias=_alias("num_layers", "num_hidden_layers"), description="Transformer blocks."
    )
    dropout_p: float = Field(0.0, ge=0, lt=1, description="Attention dropout probability (training only).")
    activate_fn: Literal["silu"] = Field(
        "silu",
        validation_alias=_alias("activate_fn", "hidden_act"),
        description="FFN activation; only SwiGLU (silu) exists in FM9G.",
    )
    scale: bool = Field(
        False, description="muP scaling: embeddings x scale_emb, logits / scale_width, matrix lr / scale_width."
    )
    scale_emb: float = Field(1.0, description="Embedding multiplier when `scale`.")
    scale_depth: float = Field(
        -1.0, description="Residual branch multiplier is scale_depth / sqrt(num_layers); <= 0 disables."
    )
    dim_model_base: int = Field(256, ge=1, description="muP base width: scale_width = dim_model / dim_model_base.")
    eps: float = Field(1e-5, gt=0, validation_alias=_alias("eps", "rms_norm_eps"), description="RMSNorm epsilon.")
    init_std: float = Field(
        0.02, gt=0, validation_alias=_alias("init_std", "initializer_range"), description="Std of the normal init."
    )
    dtype: Literal["bf16", "fp16", "float32", "fp32"] = Field(
        "bf16",
        validation_alias=_alias("dtype", "_dtype"),
        description="Storage dtype of the original checkpoints (training here uses fp32 master weights).",
    )
    base: float = Field(10000.0, gt=0, validation_alias=_alias("base", "rope_theta"), description="RoPE theta.")
    tie_lm_head: bool = Field(
        False,
        validation_alias=_alias("tie_lm_head", "tie_word_embeddings"),
        description="Share the output projection with the input embedding.",
    )
    max_length: int = Field(
        8192,
        ge=1,
        validation_alias=_alias("max_length", "max_position_embeddings"),
        description="Longest context the model is meant for (informational: RoPE has no table).",
    )
    # DragonflyConfig fields this implementation only accepts at their default value.
    qk_norm: bool = Field(False, description="Not implemented; must be false.")
    moe_num_experts: int = Field(0, ge=0, description="Not implemented; must be 0.")
    ffn_gated: bool = Field(True, description="Only the gated FFN is implemented; must be true.")
    attention_type: Literal["vanilla"] = Field("vanilla", description="Only vanilla attention (no MLA).")
    rope_scaling_type: Literal[""] = Field("", description="RoPE scaling is not implemented; must be ''.")
    pose_prob: float = Field(0.0, ge=0, le=0, description="PoSE position skipping is not implemented; must be 0.")
    tp: int = Field(0, ge=0, le=1, description="Tensor parallelism is not implemented (0 or 1).")

    @model_validator(mode="after")
    def _supported(self) -> ModelArgs:
        if self.qk_norm:
            raise ValueError("qk_norm=true is not implemented by fm9g.model.dragonfly; set it to false")
        if self.moe_num_experts:
            raise ValueError("mixture-of-experts (moe_num_experts > 0) is not implemented; set it to 0")
        if not self.ffn_gated:
            raise ValueError("only the gated FFN (ffn_gated=true) is implemented")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.dim_head % 2:
            raise ValueError(f"dim_head ({self.dim_head}) must be even for rotate-half RoPE")
        return self

    @property
    def scale_width(self) -> float:
        """dim_model / dim_model_base under muP, else 1 (divides logits and matrix lr)."""
        return self.dim_model / self.dim_model_base if self.scale else 1.0

    @property
    def residual_scale(self) -> float:
        """Multiplier of every residual branch: scale_depth / sqrt(num_layers), or 1."""
        return self.scale_depth / math.sqrt(self.num_layers) if self.scale_depth > 0 else 1.0

    @property
    def embedding_scale(self) -> float:
        """Multiplier of the embedding output: scale_emb under muP, else 1."""
        return self.scale_emb if self.scale else 1.0

    def to_json(self) -> dict[str, Any]:
        """The config in cpm_dragonfly form, as written to a checkpoint's config.json."""
        return {
            "model_type": "cpm_dragonfly",
            "architectures": ["CPMDragonflyForCausalLM"],
            **self.model_dump(mode="json"),
        }


def named_configs() -> list[str]:
    """Names of the bundled configs (model/configs/*.json)."""
    return sorted(path.stem for path in CONFIG_DIR.glob("*.json"))


def load_model_config(name_or_path: str | Path, **overrides: Any) -> ModelArgs:
    """A bundled config by name ('tiny', '2.4b', '8b') or a JSON file, with field overrides."""
    text = str(name_or_path)
    path = CONFIG_DIR / f"{text}.json" if text in named_configs() else Path(text)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelConfigError(
            f"model config {text!r} not found: give one of {named_configs()} or a path to a JSON file"
        ) from None
    except json.JSONDecodeError as exc:
        raise ModelConfigError(f"{path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}") from None
    if not isinstance(raw, dict):
        raise ModelConfigError(f"{path}: a model config is a JSON object, not {type(raw).__name__}")
    raw.update(overrides)
    try:
        return ModelArgs.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'config'}: {err['msg']}" for err in exc.errors())
        raise ModelConfigError(f"{path}: invalid model config: {problems}") from None
