"""A tiny custom-architecture Hugging Face folder, as the released 2B is one: a config.json
with `auto_map` and a `model_type` stock transformers does not know, and the folder's own
`configuration_*.py` / `modeling_*.py`, which only `trust_remote_code=True` runs.

The model ignores its input and always says one token (`favourite`), so a test can tell
that the folder's own code, and nothing else, produced the completion.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

MODEL_TYPE = "fm9g_remote_test"

CONFIGURATION = """
from transformers import PretrainedConfig


class RemoteTestConfig(PretrainedConfig):
    model_type = "fm9g_remote_test"

    def __init__(self, vocab_size=8, hidden_size=4, favourite=0, num_hidden_layers=1, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.favourite = favourite
        self.num_hidden_layers = num_hidden_layers  # generate() sizes its cache from it
        super().__init__(**kwargs)
"""

MODELING = """
import torch
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_remote_test import RemoteTestConfig


class RemoteTestForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = RemoteTestConfig
    base_model_prefix = "model"

    def __init__(self, config):
        super().__init__(config)
        self.embed = torch.nn.Embedding(config.vocab_size, config.hidden_size)
        self.bias = torch.nn.Parameter(torch.zeros(config.vocab_size))
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        hidden = self.embed(input_ids)  # (batch, seq, hidden)
        logits = hidden.new_zeros(*input_ids.shape, self.config.vocab_size) + self.bias  # (batch, seq, vocab)
        return CausalLMOutputWithPast(logits=logits)
"""

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")


def write_custom_folder(folder: Path, *, tokenizer_from: Path, favourite: str) -> Path:
    """The folder, with the tokenizer of `tokenizer_from` (an HF folder) and a model whose
    every greedy step is the first token of `favourite`."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    folder.mkdir(parents=True)
    for name in TOKENIZER_FILES:
        if (tokenizer_from / name).is_file():
            shutil.copy(tokenizer_from / name, folder / name)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    token = tokenizer(favourite, add_special_tokens=False)["input_ids"][-1]
    vocab = len(tokenizer)
    (folder / "configuration_remote_test.py").write_text(CONFIGURATION)
    (folder / "modeling_remote_test.py").write_text(MODELING)
    config = {
        "architectures": ["RemoteTestForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_remote_test.RemoteTestConfig",
            "AutoModelForCausalLM": "modeling_remote_test.RemoteTestForCausalLM",
        },
        "model_type": MODEL_TYPE,
        "vocab_size": vocab,
        "hidden_size": 4,
        "favourite": token,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "torch_dtype": "float32",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    bias = torch.zeros(vocab)
    bias[token] = 10.0
    save_file({"embed.weight": torch.zeros(vocab, 4), "bias": bias}, str(folder / "model.safetensors"))
    return folder
