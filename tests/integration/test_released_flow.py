"""A released model end to end through the CLI, as a new user runs it: `import` a file in
the released layout, `sft` from it for a few steps (local executor, tiny shapes) with the
--set options import printed, `convert` the run, and load the result with stock
transformers: its logits equal the project's model on the fine-tuned weights, and the 8B's
cpm tokenizer.json gives the cpm ids.  Then `infer` and `serve` on the run: the OpenAI
client, asking for the run's name, gets the text infer wrote for the same prompt."""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path

import openai
import pytest
import torch

from fm9g.data.tokenizer import load_tokenizer
from fm9g.model.args import load_model_config
from fm9g.model.checkpoint import Checkpointer
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
from tests.helpers.runs import REPO, cli, losses

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow

SEED = 5
STEPS = 4
# (name, kind, layout): the 2B as its HF .bin folder, the 8B as its BMTrain .pt.
FLOWS = [("2b-hf-bin", "2b", "hf"), ("8b-pt", "8b", "pt")]


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(cli(*args), cwd=cwd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"fm9g-launch {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done


def _printed_overrides(stdout: str) -> list[str]:
    """The --set options of the `fm9g-launch sft ...` line import printed."""
    line = next(line for line in stdout.splitlines() if line.strip().startswith("fm9g-launch sft"))
    words = shlex.split(line)
    return [words[i + 1] for i, word in enumerate(words) if word == "--set"]


@pytest.mark.parametrize(("name", "kind", "layout"), FLOWS, ids=[name for name, _, _ in FLOWS])
def test_import_sft_convert_transformers(name: str, kind: str, layout: str, tmp_path: Path) -> None:
    tokenizer = write_tokenizer(kind, tmp_path / "tokenizer")  # type: ignore[arg-type]
    args = released_args(kind, vocab_size_of(tokenizer))  # type: ignore[arg-type]
    if layout == "hf":
        source = write_released_hf(tmp_path / "released", args, SEED, tokenizer=tokenizer)
    else:
        source = write_released_pt(tmp_path / "released", args, SEED, tokenizer=tokenizer)

    imported = tmp_path / "imported"
    done = _run("import", str(source), "--output", str(imported), "--no-progress", cwd=tmp_path)
    overrides = _printed_overrides(done.stdout)
    assert f"train.resume_ckpt={imported}" in overrides

    root = tmp_path / "runs"
    sets = [
        *overrides,
        f"run_root={root}",
        f"train.train_iters={STEPS}",
        "train.save_iters=2",
        "train.log_iters=1",
        "train.warmup_iters=1",
    ]
    config = REPO / "examples" / "tiny" / "sft.yaml"
    _run(
        "sft",
        "--config",
        str(config),
        "--name",
        name,
        "--no-progress",
        "--executor",
        "local",
        *sum((["--set", s] for s in sets), []),
        cwd=tmp_path,
    )
    run = root / name
    assert sorted(losses(run)) == list(range(1, STEPS + 1))  # weights only: the steps start at 0

    # The fine-tuned weights started from the released ones: a few small steps away from
    # them, not from a fresh initialisation (which is ~init_std away everywhere).
    checkpoints = Checkpointer(run / "checkpoints", rank=0, world_size=1, barrier=lambda: None)
    latest = checkpoints.latest()
    assert latest is not None and latest.name == str(STEPS)
    tuned = checkpoints.load_model(latest)
    released = random_state(args, SEED)
    embedding_shift = (tuned["input_embedding.weight"].float() - released["input_embedding.weight"].float()).abs()
    assert 0 < embedding_shift.max().item() < 0.1

    done = _run("convert", str(run), "--executor", "local", cwd=tmp_path)
    folder = Path(done.stdout.strip().splitlines()[-1])
    native = {"2b": "GraniteForCausalLM", "8b": "LlamaForCausalLM"}[kind]
    assert json.loads((folder / "config.json").read_text())["architectures"] == [native]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.randint(0, args.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = theirs(ids).logits
    want = reference_logits(tuned, load_model_config(latest / "config.json"), ids)
    assert (got - want).abs().max().item() <= 1e-4

    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    ours = load_tokenizer(tokenizer)
    for text in mixed_corpus(40, seed=7):
        if kind == "8b":
            assert hf_tokenizer(text, add_special_tokens=False)["input_ids"] == ours.encode(text), text
        assert hf_tokenizer.decode(ours.encode(text)) == ours.decode(ours.encode(text))

    # infer and serve the fine-tuned run, as the guide's users then do.
    # Already in the chat form, so infer (which wraps an sft run's prompts) and the raw
    # /v1/completions endpoint feed the model the same text.
    prompt = "<用户>中国的首都是北京。today<AI>"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": prompt}, ensure_ascii=False) + "\n")
    out = tmp_path / "out.jsonl"
    greedy = ["--temperature", "0", "--max-tokens", "8", "--engine", "transformers", "--executor", "local"]
    _run("infer", str(run), "--prompts", str(prompts), "--output", str(out), *greedy, cwd=tmp_path)
    expected = json.loads(out.read_text())["text"]
    _run("serve", str(run), "--engine", "transformers", "--executor", "local", cwd=tmp_path)
    try:
        endpoint = json.loads((run / "serve" / "endpoint.json").read_text())
        assert endpoint["model"] == name
        key = (run / "serve" / "api_key").read_text().strip()
        client = openai.OpenAI(base_url=endpoint["url"], api_key=key, max_retries=0, timeout=120)
        completion = client.completions.create(model=name, prompt=prompt, max_tokens=8, temperature=0)
        assert expected and completion.choices[0].text == expected
    finally:
        _run("serve", str(run), "--stop", cwd=tmp_path)
