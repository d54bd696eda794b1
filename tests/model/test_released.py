"""Released FM9G layouts (BMTrain .pt, HF folders with .bin or safetensors) are read exactly,
converted to native HF folders whose logits equal the project's model, and imported as
checkpoints the trainer loads; the cpm vocabulary becomes an HF tokenizer with the same ids."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fm9g.data.cpm_tokenizer import CPMTokenizer
from fm9g.model.args import load_model_config
from fm9g.model.checkpoint import Checkpointer
from fm9g.model.convert import convert_released
from fm9g.model.released import SHAPE_FIELDS, ReleasedFormatError, read_released, write_imported
from tests.helpers.released import (
    mixed_corpus,
    random_state,
    reference_logits,
    released_args,
    vocab_size_of,
    write_released_hf,
    write_released_pt,
    write_tokenizer,
)

transformers = pytest.importorskip("transformers")

# (name, kind, writer): every released layout at tiny shapes.
LAYOUTS = [
    ("pt-2b", "2b", "pt"),
    ("pt-8b", "8b", "pt"),
    ("hf-2b-fm9g-bin", "2b", "bin"),
    ("hf-2b-minicpm-safetensors", "2b", "safetensors"),
    ("hf-8b-bin", "8b", "bin"),
    ("hf-8b-sharded-bin", "8b", "sharded-bin"),
]
SEED = 11


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    return {kind: write_tokenizer(kind, root / kind) for kind in ("2b", "8b")}


def _write(layout: str, kind: str, writer: str, folder: Path, tokenizer: Path) -> tuple[Path, object]:
    args = released_args(kind, vocab_size_of(tokenizer))  # type: ignore[arg-type]
    if writer == "pt":
        write_released_pt(folder, args, SEED, tokenizer=tokenizer)
        return folder, args
    model_type = "minicpm" if "minicpm" in layout else "fm9g"
    return write_released_hf(folder, args, SEED, tokenizer=tokenizer, weights=writer, model_type=model_type), args  # type: ignore[arg-type]


@pytest.mark.parametrize(("layout", "kind", "writer"), LAYOUTS, ids=[name for name, _, _ in LAYOUTS])
def test_read_is_exact_and_convert_matches_logits(
    layout: str, kind: str, writer: str, tokenizers: dict[str, Path], tmp_path: Path
) -> None:
    source, args = _write(layout, kind, writer, tmp_path / layout, tokenizers[kind])
    released = read_released(source)
    expected = random_state(args, SEED)  # type: ignore[arg-type]
    assert released.layout == ("bmtrain-pt" if writer == "pt" else "hf")
    assert set(released.state) == set(expected)
    for key, value in expected.items():
        assert released.state[key].dtype == torch.bfloat16 and torch.equal(released.state[key], value), key
    for field in SHAPE_FIELDS:
        assert getattr(released.args, field) == pytest.approx(getattr(args, field)), field
    assert released.tokenizer is not None and released.tokenizer.name == tokenizers[kind].name

    folder = convert_released(source, tmp_path / "hf", model=None)
    config = json.loads((folder / "config.json").read_text())
    native = {"2b": "GraniteForCausalLM", "8b": "LlamaForCausalLM"}[kind]
    assert config["architectures"] == [native] and "auto_map" not in config
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert type(theirs).__name__ == native
    ids = torch.randint(0, args.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))  # type: ignore[attr-defined]
    with torch.no_grad():
        got = theirs(ids).logits
    want = reference_logits(expected, args, ids)  # type: ignore[arg-type]
    assert (got - want).abs().max().item() <= 1e-4
    assert want.abs().max().item() > 1e-2  # not a trivially passing comparison
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    assert tokenizer.bos_token_id == 1 and tokenizer.eos_token_id == 2


def test_model_mismatch_names_the_field(tokenizers: dict[str, Path], tmp_path: Path) -> None:
    args = released_args("2b", vocab_size_of(tokenizers["2b"]))
    source = write_released_hf(tmp_path / "2b", args, SEED, tokenizer=tokenizers["2b"])
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**args.model_dump(), "num_layers": 3}))
    with pytest.raises(ReleasedFormatError, match=r"config\.json: num_layers is 2 but --model .*other\.json has 3"):
        read_released(source, str(other))
    with pytest.raises(ReleasedFormatError, match="vocab_size is .* but --model 8b has 119696"):
        read_released(source, "8b")
    same = tmp_path / "same.json"
    same.write_text(json.dumps(args.model_dump()))
    assert read_released(source, str(same)).args.num_layers == 2


def test_bare_pt_needs_model_and_is_checked_against_tensors(tokenizers: dict[str, Path], tmp_path: Path) -> None:
    args = released_args("8b", vocab_size_of(tokenizers["8b"]))
    pt = write_released_pt(tmp_path / "bare", args, SEED, with_config=False)
    with pytest.raises(ReleasedFormatError, match="pass --model 2.4b, --model 8b or --model PATH"):
        read_released(pt)
    exact = tmp_path / "8b-tiny.json"
    exact.write_text(json.dumps(args.model_dump()))
    released = read_released(pt, str(exact))
    assert released.args.num_kv_heads == 2 and released.tokenizer is None
    wrong_heads = tmp_path / "wrong.json"
    wrong_heads.write_text(json.dumps({**args.model_dump(), "num_kv_heads": 4}))
    with pytest.raises(ReleasedFormatError, match="project_k.weight has shape"):
        read_released(pt, str(wrong_heads))
    wrong_ff = tmp_path / "wrong-ff.json"
    wrong_ff.write_text(json.dumps({**args.model_dump(), "dim_ff": 64}))
    with pytest.raises(ReleasedFormatError, match="dim_ff is 176 but --model"):
        read_released(pt, str(wrong_ff))


def test_config_disagreeing_with_tensors_is_refused(tokenizers: dict[str, Path], tmp_path: Path) -> None:
    args = released_args("2b", vocab_size_of(tokenizers["2b"]))
    pt = write_released_pt(tmp_path / "pt", args, SEED)
    config = json.loads((pt.parent / "config.json").read_text())
    (pt.parent / "config.json").write_text(json.dumps({**config, "num_layers": 4}))
    with pytest.raises(ReleasedFormatError, match="num_layers is 4 but the tensors of fm9g.pt say 2"):
        read_released(pt)
    torch.save({"model.embed_tokens.weight": torch.zeros(3, 3)}, tmp_path / "hf_keys.pt")
    with pytest.raises(ReleasedFormatError, match="not FM9G dragonfly parameters"):
        read_released(tmp_path / "hf_keys.pt", "2.4b")


def test_import_writes_a_checkpoint_the_trainer_loads(tokenizers: dict[str, Path], tmp_path: Path) -> None:
    args = released_args("8b", vocab_size_of(tokenizers["8b"]))
    source = write_released_hf(tmp_path / "8b", args, SEED, tokenizer=tokenizers["8b"])
    seen: list[tuple[int, int]] = []
    output = write_imported(
        read_released(source, None), tmp_path / "imported", progress=lambda d, t: seen.append((d, t))
    )
    assert seen and seen[-1][0] == seen[-1][1] > 0
    checkpoints = Checkpointer(tmp_path / "run" / "checkpoints", rank=0, world_size=1, barrier=lambda: None)
    resolved = checkpoints.resolve(str(output))
    assert checkpoints.step_of(resolved) == 0 and Checkpointer.is_complete(resolved)
    loaded = checkpoints.load_model(resolved)
    expected = random_state(args, SEED)
    assert set(loaded) == set(expected) and all(torch.equal(loaded[k], expected[k]) for k in expected)
    assert load_model_config(output / "config.json").model_dump() == read_released(source).args.model_dump()
    assert (output / "tokenizer" / "vocab.txt").read_bytes() == tokenizers["8b"].read_bytes()
    assert json.loads((output / "import.json").read_text())["layout"] == "hf"
    with pytest.raises(ReleasedFormatError, match="already exists; .* --force"):
        write_imported(read_released(source), output)
    assert not list(tmp_path.glob(".tmp-import-*"))


def test_cpm_tokenizer_json_gives_the_same_ids(tokenizers: dict[str, Path], tmp_path: Path) -> None:
    cpm = CPMTokenizer(tokenizers["8b"])
    cpm.save_hf(tmp_path)
    (tmp_path / "vocab.txt").write_bytes(tokenizers["8b"].read_bytes())
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert type(hf).__name__ in ("PreTrainedTokenizerFast", "TokenizersBackend")
    corpus = mixed_corpus(200, seed=3)
    for text in corpus:
        ours = cpm.encode(text)
        assert hf(text, add_special_tokens=False)["input_ids"] == ours, text
        assert hf(text)["input_ids"] == [cpm.bos_id, *ours]
        assert hf.decode(ours) == cpm.decode(ours) == text
    # Greedy longest match, not the fewest tokens: "quick" is one entry, "qu"+"ick" is not taken.
    assert hf.convert_ids_to_tokens(hf("quick brown", add_special_tokens=False)["input_ids"])[0] == "quick"
    # Control tokens in text are text (split_special_tokens), as in the cpm encoder.
    assert cpm.bos_id not in hf("a <s> b", add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------ the CLI (in-process)


def _cli(*argv: str) -> int:
    from fm9g.orchestrator.cli import main

    return main(list(argv))


def test_import_and_convert_commands(
    tokenizers: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = released_args("2b", vocab_size_of(tokenizers["2b"]))
    bare = write_released_hf(tmp_path / "no-tokenizer", args, SEED)
    assert _cli("import", str(tmp_path / "missing"), "--output", str(tmp_path / "x"), "--no-progress") == 2
    assert "missing does not exist" in capsys.readouterr().err
    assert _cli("import", str(bare), "--output", str(tmp_path / "x"), "--no-progress") == 2
    assert "pass --tokenizer PATH" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()

    out = tmp_path / "imported"
    argv = ["import", str(bare), "--output", str(out), "--tokenizer", str(tokenizers["2b"]), "--no-progress"]
    assert _cli(*argv) == 0
    printed = capsys.readouterr().out
    assert f"--set train.resume_ckpt={out.resolve()}" in printed and "--set train.only_load_model=true" in printed
    assert _cli(*argv) == 2
    assert "already exists" in capsys.readouterr().err
    assert _cli(*argv, "--force") == 0
    assert (out / "tokenizer" / "tokenizer.model").is_file()
    assert not list(tmp_path.glob(".*import*"))

    assert _cli("convert", str(bare), "--no-progress") == 2
    assert "needs --output DIR" in capsys.readouterr().err
    hf = tmp_path / "hf"
    assert _cli("convert", str(bare), "--output", str(hf), "--tokenizer", str(tokenizers["2b"]), "--no-progress") == 0
    assert capsys.readouterr().out.strip() == str(hf.resolve())
    assert {"config.json", "model.safetensors", "tokenizer.model", "chat_template.jinja"} <= {
        p.name for p in hf.iterdir()
    }


def test_infer_and_serve_name_convert_for_a_released_pt(tokenizers: dict[str, Path], tmp_path: Path) -> None:
    from fm9g.launchers.prompts import InferenceError
    from fm9g.orchestrator.inference.stages import resolve_target

    args = released_args("8b", vocab_size_of(tokenizers["8b"]))
    pt = write_released_pt(tmp_path / "sft_8b_v2", args, SEED, tokenizer=tokenizers["8b"])
    for target in (pt, pt.parent):  # the folder has a config.json, but a cpm_dragonfly one
        with pytest.raises(InferenceError, match=r"BMTrain checkpoint \(\.pt\).*fm9g-launch convert"):
            resolve_target(target, run_root=tmp_path / "runs")
    assert not (tmp_path / "runs").exists()


def test_cpm_tokenizer_json_matches_on_random_vocabularies(tmp_path: Path) -> None:
    """Random overlapping vocabularies over regex syntax, CJK, emoji and whitespace (over 32
    siblings per trie node, so the regex's guarded blocks are used) and random text that
    also holds characters outside the vocabulary: the same ids, the same text back."""
    import random

    from tokenizers import Tokenizer

    rng = random.Random(0)
    alphabet = list("()[]{}.*+?|\\^$-<>/ \n\t\rabcxyz019") + [chr(0x4E00 + i) for i in range(30)] + list("😀🚀é")
    outside = list("QW§Ω中𝔘")  # never in the vocabulary: byte fallback
    for trial in range(3):
        entries = {"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6))) for _ in range(6000)}
        entries |= {"=" * 3000, "=" * 16, "=", " " * 64, " " * 8}
        tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *sorted(entries - set(outside))]
        vocab = tmp_path / f"vocab-{trial}.txt"
        vocab.write_text("\n".join(json.dumps(t, ensure_ascii=False) for t in tokens) + "\n", encoding="utf-8")
        cpm = CPMTokenizer(vocab)
        cpm.save_hf(tmp_path / str(trial))
        hf = Tokenizer.from_file(str(tmp_path / str(trial) / "tokenizer.json"))
        # A very long entry (code indentation, separator lines) and its shorter relatives.
        long_texts = ["=" * 3000, "=" * 2999 + "x", " " * 64 + "def"]
        for text in long_texts:
            assert hf.encode(text, add_special_tokens=False).ids == cpm.encode(text)
        for _ in range(200):
            text = "".join(rng.choice(alphabet + outside) for _ in range(rng.randint(0, 80)))
            ids = cpm.encode(text)
            assert hf.encode(text, add_special_tokens=False).ids == ids, repr(text)
            assert hf.decode(ids, skip_special_tokens=False) == text


def test_hf_folder_with_dragonfly_names_and_bad_configs(tokenizers: dict[str, Path], tmp_path: Path) -> None:
    """The 2B HF folder's exact config was never seen (fm9g-formats §3.5): a folder with a
    cpm_dragonfly config and dragonfly key names in pytorch_model.bin is read the same."""
    from tests.helpers.released import dragonfly_config

    args = released_args("2b", vocab_size_of(tokenizers["2b"]))
    folder = tmp_path / "dragonfly-hf"
    folder.mkdir()
    torch.save(random_state(args, SEED), folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps({**dragonfly_config(args), "architectures": ["FM9GForCausalLM"]}))
    released = read_released(folder)
    assert released.layout == "hf" and released.args.scale_emb == 12.0 and released.args.tie_lm_head
    expected = random_state(args, SEED)
    assert all(torch.equal(released.state[key], expected[key]) for key in expected)

    (folder / "config.json").write_text('{"model_type": "fm9g",\n "hidden_size": }')
    with pytest.raises(ReleasedFormatError, match=r"config\.json:2:\d+: invalid JSON"):
        read_released(folder)
    (folder / "config.json").write_text(json.dumps({**dragonfly_config(args), "moe_num_experts": 8}))
    with pytest.raises(ReleasedFormatError, match="mixture-of-experts"):
        read_released(folder)
    hf = write_released_hf(tmp_path / "minicpm", args, SEED, model_type="minicpm")
    config = json.loads((hf / "config.json").read_text())
    del config["scale_emb"]
    (hf / "config.json").write_text(json.dumps(config))
    with pytest.raises(ReleasedFormatError, match="needs scale_emb"):
        read_released(hf)


def test_sharded_export_through_the_job_body(
    tokenizers: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`python -m fm9g.launchers.convert --source` (the job body): shards over SHARD_BYTES
    get an index that transformers follows, and the chat template is added."""
    import fm9g.model.convert as convert_module
    from fm9g.launchers.convert import main

    args = released_args("8b", vocab_size_of(tokenizers["8b"]))
    pt = write_released_pt(tmp_path / "8b", args, SEED, tokenizer=tokenizers["8b"])
    monkeypatch.setattr(convert_module, "SHARD_BYTES", 40_000)
    assert main(["--source", str(pt), "--output", str(tmp_path / "hf")]) == 0
    folder = tmp_path / "hf"
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert (folder / "chat_template.jinja").is_file()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.randint(0, args.vocab_size, (1, 17), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = theirs(ids).logits
    assert (got - reference_logits(random_state(args, SEED), args, ids)).abs().max().item() <= 1e-4
