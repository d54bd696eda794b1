"""HF export/import: transformers' native Granite/Llama reproduce our logits; round trips are exact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fm9g.model.args import ModelArgs, load_model_config
from fm9g.model.convert import export_hf, import_hf
from fm9g.model.dragonfly import build_model
from fm9g.model.hf import architecture_for, fm9g_key, hf_key

transformers = pytest.importorskip("transformers")

STYLES = {
    # FM9G-2B-like: muP scalings, tied head, GQA.
    "granite": {},
    # FM9G-8B-like: no scaling, untied head.
    "llama": {"scale": False, "scale_depth": -1, "tie_lm_head": False, "init_std": 0.05},
}


def tiny(style: str) -> ModelArgs:
    return load_model_config("tiny", vocab_size=131, num_layers=3, **STYLES[style])


@pytest.mark.parametrize("style", sorted(STYLES))
def test_transformers_reproduces_our_logits(style: str, tmp_path: Path) -> None:
    args = tiny(style)
    model = build_model(args, seed=7).eval()
    folder = export_hf(model.state_dict(), args, tmp_path / "hf")
    config = json.loads((folder / "config.json").read_text())
    expected = {"granite": "GraniteForCausalLM", "llama": "LlamaForCausalLM"}[style]
    assert config["architectures"] == [expected] == [architecture_for(args)]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    assert type(theirs).__name__ == expected
    ids = torch.randint(0, args.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, reference = model(ids), theirs(ids).logits
    assert (ours - reference).abs().max().item() <= 1e-4
    # And the scalings matter: the comparison is not trivially passing.
    assert ours.abs().max().item() > 1e-2


@pytest.mark.parametrize("style", sorted(STYLES))
def test_export_import_export_is_identity(style: str, tmp_path: Path) -> None:
    args = tiny(style)
    state = build_model(args, seed=3).state_dict()
    first = export_hf(state, args, tmp_path / "a")
    back, back_args = import_hf(first)
    assert set(back) == set(state)
    for key in state:
        assert torch.equal(back[key], state[key]), key
    second = export_hf(back, back_args, tmp_path / "b")
    one, two = import_hf(first)[0], import_hf(second)[0]
    assert all(torch.equal(one[k], two[k]) for k in one)
    from safetensors.torch import load_file

    a, b = load_file(str(first / "model.safetensors")), load_file(str(second / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((first / "config.json").read_text()) == json.loads((second / "config.json").read_text())


def test_key_maps_are_inverse() -> None:
    for key in build_model(tiny("llama"), "meta").state_dict():
        assert fm9g_key(hf_key(key)) == key
    assert hf_key("encoder.layers.3.ffn.ffn.w_in.w_0.weight") == "model.layers.3.mlp.gate_proj.weight"
    with pytest.raises(KeyError):
        hf_key("encoder.layers.0.ffn.ffn.w_gate.weight")
