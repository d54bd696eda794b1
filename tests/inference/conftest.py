"""Fixtures of the inference tests: a tiny FM9G model trained here for a few seconds (no
orchestrator) on one chat exchange, saved as a run's checkpoint through fm9g.model's API.

Greedy decoding of `<用户>你好<AI>` then gives ANSWER, so a test can tell a real engine
from one that returns anything.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

from fm9g.rundir import RunDir
from fm9g.rundir import config as config_mod

QUESTION = "你好"
ANSWER = "你好，我是九格。"
EXCHANGES = [("你好", ANSWER), ("中国的首都是哪里", "北京。"), ("the quick brown fox", "jumps over the lazy dog.")]
STEP = 40


@dataclass(frozen=True)
class TrainedRun:
    run: RunDir
    step: int


def _train_checkpoint(run: RunDir) -> None:
    import torch

    from fm9g.data.tokenizer import load_tokenizer, train_sentencepiece
    from fm9g.model.args import load_model_config
    from fm9g.model.checkpoint import Checkpointer
    from fm9g.model.dragonfly import build_model

    texts = [f"<用户>{q}<AI>{a}" for q, a in EXCHANGES] * 20 + ["北京是中国的首都。天气很好。"] * 10
    tokenizer = load_tokenizer(train_sentencepiece(texts, run.root / "tokenizer" / "tokenizer.model", 400))
    args = load_model_config("tiny", vocab_size=tokenizer.vocab_size, max_length=64)
    torch.manual_seed(0)
    model = build_model(args, seed=0)
    rows = [[tokenizer.bos_id, *tokenizer.encode(f"<用户>{q}<AI>{a}"), tokenizer.eos_id] for q, a in EXCHANGES]
    width = max(map(len, rows))
    ids = torch.tensor([row + [tokenizer.eos_id] * (width - len(row)) for row in rows])  # (3, width)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(STEP * 3):
        logits = model(ids[:, :-1])  # (3, width-1, vocab)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1, f"the fixture model did not learn its exchanges (loss {loss.item():.3f})"
    checkpoints = Checkpointer(run.checkpoints, rank=0, world_size=1, barrier=lambda: None)
    checkpoints.save(
        STEP,
        model=model.state_dict(),
        optimizer=None,
        data=None,
        trainer=None,
        log={"iteration": STEP},
        config=args.to_json(),
        tokenizer=tokenizer,
    )


def write_run_config(run: RunDir, **overrides: object) -> None:
    raw: dict = {
        "run_root": str(run.root.parent),
        "executor": "local",
        "data": {"sft": True},
        "train": {"model_unique": run.name},
    }
    for dotted, value in overrides.items():
        config_mod.apply_overrides(raw, [f"{dotted.replace('__', '.')}={json.dumps(value)}"])
    run.make()
    run.config.write_text(config_mod.dump(config_mod.validate(raw, "test")))


@pytest.fixture(scope="session")
def trained_template(tmp_path_factory: pytest.TempPathFactory) -> TrainedRun:
    """A run directory with one trained checkpoint (built once per session)."""
    run = RunDir.of(tmp_path_factory.mktemp("template") / "tiny-sft").make()
    write_run_config(run)
    with one_thread():
        _train_checkpoint(run)
    return TrainedRun(run, STEP)


@pytest.fixture
def trained_run(trained_template: TrainedRun, tmp_path: Path) -> TrainedRun:
    """A fresh copy of the trained run, under tmp_path/runs/tiny-sft."""
    target = tmp_path / "runs" / "tiny-sft"
    shutil.copytree(trained_template.run.root, target)
    run = RunDir.of(target)
    write_run_config(run)  # run_root points at the copy's parent
    return TrainedRun(run, trained_template.step)


@pytest.fixture(scope="session")
def hf_model(trained_template: TrainedRun, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained checkpoint converted in-process (no job), chat template included."""
    from fm9g.launchers.convert import export

    with one_thread():
        return export(trained_template.run.root, trained_template.step, tmp_path_factory.mktemp("hf") / "tiny-sft-hf")


@contextmanager
def one_thread() -> Iterator[None]:
    """torch on one intra-op thread: on two shared cores, more threads only wait on each other."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _few_threads(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # Jobs and servers (subprocesses) get one thread too; a tiny model needs no more.
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("FM9G_TEST_THREADS", "1"))
    with one_thread():
        yield


def http_status(url: str, headers: dict[str, str] | None = None) -> int:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(urllib.request.Request(url, headers=headers or {}), timeout=30) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def check_server(run: RunDir) -> dict:
    """What every served run must offer: completions and chats with the key, 401 without."""
    endpoint = json.loads(run.serve_endpoint.read_text())
    key = run.api_key_file.read_text().strip()
    assert stat.S_IMODE(run.api_key_file.stat().st_mode) == 0o600
    client = openai.OpenAI(base_url=endpoint["url"], api_key=key, max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    assert model == endpoint["model"]
    completion = client.completions.create(model=model, prompt="<用户>你好<AI>", max_tokens=16, temperature=0)
    assert completion.choices[0].text.startswith(ANSWER)
    chat = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "你好"}], max_tokens=16, temperature=0
    )
    assert chat.choices[0].message.content.startswith(ANSWER)
    base = f"http://{endpoint['host']}:{endpoint['port']}"
    assert http_status(f"{base}/v1/models") == 401
    assert http_status(f"{base}/v1/models", {"Authorization": "Bearer wrong"}) == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=endpoint["url"], api_key="wrong", max_retries=0).models.list()
    assert http_status(f"{base}/health") == 200
    # The key is in no script and no log.
    for path in [*run.scripts.glob("serve-*.sbatch"), *run.stage_logs("serve").glob("*")]:
        assert key not in path.read_text(errors="replace"), path
    return endpoint
