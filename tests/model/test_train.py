"""The trainer end to end on a tiny model and the real data pipeline (CPU, gloo).

Sessions run in-process through `fm9g.model.train.run` (one-process group), except the
torchrun launches with two processes.  Every test here but the `gpu` ones pins the CPU
(FM9G_DEVICE=cpu, inherited by torchrun's workers): on a GPU machine they would otherwise
train in bf16 with flash-attn's non-deterministic backward, where their 1e-6 equalities do
not hold, and the two-rank launches would need two GPUs.  The GPU claims are tested by the
`gpu` tests, here and in tests/gpu/.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from fm9g.model import train
from fm9g.model.distributed import ENV_DEVICE, init_distributed
from fm9g.rundir import RunDir, protocol
from fm9g.rundir import config as config_mod
from tests.helpers.tmpfs import mounted_tmpfs

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def cpu_unless_gpu_test(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """FM9G_DEVICE=cpu for every test not marked `gpu` (see the module docstring)."""
    if request.node.get_closest_marker("gpu") is None:
        monkeypatch.setenv(ENV_DEVICE, "cpu")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A sentencepiece tokenizer and a two-task indexed mixture from the tiny example data."""
    from fm9g.data.indexer import build_index
    from fm9g.data.tokenizer import train_sentencepiece

    root = tmp_path_factory.mktemp("corpus")
    sources = {"en": REPO / "examples/tiny/data/en.jsonl", "zh": REPO / "examples/tiny/data/zh.txt"}
    entries = []
    for task, source in sources.items():
        small = root / f"{task}{source.suffix}"
        small.write_text("".join(source.read_text(encoding="utf-8").splitlines(keepends=True)[:300]), encoding="utf-8")
        build_index(small, root / f"{task}_index", language="en" if task == "en" else "zh", durable=False)
        entries.append(
            {
                "dataset_name": task,
                "task_name": task,
                "abs_weight": 0.5,
                "path": str(root / f"{task}_index"),
                "allow_repeat": True,
                "ave_tokens_per_line": 60,
            }
        )
    mixture = root / "mixture.json"
    mixture.write_text(json.dumps(entries))
    tokenizer = train_sentencepiece([root / "en.jsonl", root / "zh.txt"], root / "tokenizer.model", 500)
    return {"mixture": mixture, "tokenizer": tokenizer}


def make_run(path: Path, corpus: dict[str, Path], model: dict[str, Any] | None = None, **train_args: Any) -> RunDir:
    """A run directory with a resolved config.yaml for the tiny model."""
    run = RunDir.of(path).make()
    train_section = {
        "train_iters": 12,
        "save_iters": 4,
        "batch_size": 2,
        "lr": 0.01,
        "warmup_iters": 2,
        "inspect_iters": 0,
        "seed": 7,
        **train_args,
    }
    config = config_mod.RunConfig.model_validate(
        {
            "model": {"config": "tiny", **(model or {})},
            "data": {
                "dataset_config": str(corpus["mixture"]),
                "tokenizer_path": str(corpus["tokenizer"]),
                "max_length": 64,
                "dataloader_num_workers": 0,
            },
            "train": train_section,
        }
    )
    run.config.write_text(config_mod.dump(config))
    return run


def set_train(run: RunDir, **values: Any) -> None:
    raw = yaml.safe_load(run.config.read_text())
    raw["train"].update(values)
    run.config.write_text(yaml.safe_dump(raw))


def metrics(run: RunDir) -> dict[int, dict[str, Any]]:
    """The last record of every step in metrics.jsonl."""
    records = [json.loads(line) for line in run.metrics.read_text().splitlines()]
    return {record["step"]: record for record in records}


def read_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Scalars of every TensorBoard event file under `folder` (TFRecord framing, Event protos)."""
    from tensorboardX.proto import event_pb2

    scalars: dict[str, list[tuple[int, float]]] = {}
    for file in folder.rglob("events.out.tfevents.*"):
        data = file.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_resume_reproduces_the_uninterrupted_run(tmp_path: Path, corpus: dict[str, Path]) -> None:
    straight = make_run(tmp_path / "straight", corpus)
    assert train.run(straight.root) == 0
    split = make_run(tmp_path / "split", corpus, max_session_steps=6)
    assert train.run(split.root) == 0
    first = json.loads(split.summary.read_text())
    assert first["outcome"] == "session_limit" and first["final_step"] == 6
    assert not split.done_flag.exists() and (split.checkpoints / "latest").read_text().strip() == "6"
    set_train(split, max_session_steps=0)
    assert train.run(split.root) == 0
    second = json.loads(split.summary.read_text())
    # summary.json covers the whole run, not only the last session.
    assert (second["start_step"], second["final_step"], second["steps_run"], second["sessions"]) == (0, 12, 12, 2)
    assert second["first_loss"] == first["first_loss"] and second["last_loss"] != first["last_loss"]
    assert split.done_flag.exists() and second["checkpoint"].endswith("checkpoints/12")

    a, b = metrics(straight), metrics(split)
    assert sorted(a) == sorted(b) == list(range(1, 13))
    for step in a:
        assert abs(a[step]["loss"] - b[step]["loss"]) <= 1e-6, step
        assert a[step]["lr"] == b[step]["lr"]
    assert set().union(*(record["task_loss"] for record in a.values())) == {"en", "zh"}
    # Training on real text lowers the loss even in 12 steps.
    losses = [a[step]["loss"] for step in sorted(a)]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1


def test_fsdp2_matches_ddp_and_resumes(tmp_path: Path, corpus: dict[str, Path]) -> None:
    ddp = make_run(tmp_path / "ddp1", corpus, train_iters=4)
    assert train.run(ddp.root) == 0
    fsdp = make_run(tmp_path / "fsdp1", corpus, model={"fsdp": True}, train_iters=4, max_session_steps=2)
    assert train.run(fsdp.root) == 0 and not fsdp.done_flag.exists()
    set_train(fsdp, max_session_steps=0)
    assert train.run(fsdp.root) == 0 and fsdp.done_flag.exists()
    a, b = metrics(ddp), metrics(fsdp)
    assert sorted(b) == [1, 2, 3, 4]
    assert all(abs(a[step]["loss"] - b[step]["loss"]) <= 1e-5 for step in a)
    # The FSDP checkpoint holds the full model under the FM9G keys, like DDP's.
    assert set(torch.load(fsdp.checkpoints / "4" / "fm9g_live_checkpoint-4.pt")) == set(
        torch.load(ddp.checkpoints / "4" / "fm9g_live_checkpoint-4.pt")
    )


def test_sharded_optimizer_state_is_refused_by_another_layout(tmp_path: Path, corpus: dict[str, Path]) -> None:
    fsdp = make_run(tmp_path / "fsdp_state", corpus, model={"fsdp": True}, train_iters=2, save_iters=2)
    assert train.run(fsdp.root) == 0
    step2 = str(fsdp.checkpoints / "2")
    ddp = make_run(tmp_path / "ddp_from_fsdp", corpus, train_iters=4, resume_ckpt=step2)
    assert train.run(ddp.root) == protocol.EXIT_CONFIG
    reason = json.loads((ddp.control / "fatal.json").read_text())["reason"]
    assert "written by torch-fsdp2 with 1 ranks" in reason and "train.load_grad: false" in reason
    # The fix the message names: weights, schedule position and data continue; Adam restarts.
    weights = make_run(tmp_path / "ddp_weights", corpus, train_iters=4, resume_ckpt=step2, load_grad=False)
    assert train.run(weights.root) == 0
    assert sorted(metrics(weights)) == [3, 4]


def test_fsdp_resumes_whole_optimizer_state_from_a_ddp_checkpoint(tmp_path: Path, corpus: dict[str, Path]) -> None:
    """DDP's Adam moments are whole tensors: FSDP2 cuts its own rows of them, and the run
    continues exactly as the DDP run that wrote them."""
    ddp = make_run(tmp_path / "ddp", corpus, train_iters=4, save_iters=2)
    assert train.run(ddp.root) == 0
    fsdp = make_run(
        tmp_path / "fsdp", corpus, model={"fsdp": True}, train_iters=4, resume_ckpt=str(ddp.checkpoints / "2")
    )
    assert train.run(fsdp.root) == 0
    assert sorted(metrics(fsdp)) == [3, 4]
    for step in (3, 4):
        assert abs(metrics(fsdp)[step]["loss"] - metrics(ddp)[step]["loss"]) <= 1e-5


def test_tensorboard_heartbeat_and_layout(tmp_path: Path, corpus: dict[str, Path]) -> None:
    run = make_run(tmp_path / "tb", corpus, train_iters=4, save_iters=2, peak_tflops=1.0, inspect_iters=2)
    assert train.run(run.root) == 0
    summary = json.loads(run.summary.read_text())
    scalars = read_scalars(Path(summary["tensorboard"]))
    for tag in (
        "Loss/train",
        "Optimizer/lr",
        "Optimizer/grad_norm",
        "Throughput/tokens_per_s",
        "Throughput/tflops",
        "Throughput/mfu",
    ):
        assert [step for step, _ in scalars[tag]] == [1, 2, 3, 4], tag
    for task in ("en", "zh"):  # a task shows up in the steps whose batches held it
        assert scalars[f"Loss/train/{task}"] and {s for s, _ in scalars[f"Loss/train/{task}"]} <= {1, 2, 3, 4}
    assert [round(v, 4) for _, v in scalars["Loss/train"]] == [round(metrics(run)[s]["loss"], 4) for s in (1, 2, 3, 4)]
    assert any(tag.startswith("Inspect/") for tag in scalars)
    beat = json.loads(run.heartbeat(0).read_text())
    assert beat["step"] == 4 and beat["pid"] == os.getpid() and beat["generation"] == 0
    step_dir = run.checkpoints / "4"
    assert {p.name for p in step_dir.iterdir()} >= {
        "fm9g_live_checkpoint-4.pt",
        "fm9g_live_checkpoint-4.rank-0.opt",
        "fm9g_live_checkpoint-4.log_ckpt",
        "dataset_ckpt",
        "trainer_state.pt",
        "config.json",
        "COMPLETE",
        "tokenizer",
    }
    assert json.loads((step_dir / "fm9g_live_checkpoint-4.log_ckpt").read_text())["iteration"] == 4
    keys = set(torch.load(step_dir / "fm9g_live_checkpoint-4.pt"))
    assert "encoder.layers.0.self_att.self_attention.project_q.weight" in keys and "input_embedding.weight" in keys


def test_train_step_lowers_the_loss(tmp_path: Path, corpus: dict[str, Path]) -> None:
    run = make_run(tmp_path / "step", corpus, warmup_iters=0, lr=0.02)
    ctx = init_distributed()
    try:
        trainer = train.Trainer(run, config_mod.load_resolved(run.config), ctx)
        trainer.load()
        batch = next(iter(trainer.loader))
        losses = [trainer.train_step([batch])["loss"] for _ in range(8)]
        trainer.close()
    finally:
        ctx.close()
    assert losses[-1] < losses[0] - 0.5, losses


def test_checkpoint_now_saves_and_exits_without_done(tmp_path: Path, corpus: dict[str, Path]) -> None:
    run = make_run(tmp_path / "now", corpus)
    run.checkpoint_now_flag.write_text("{}")
    assert train.run(run.root) == protocol.EXIT_OK
    assert not run.done_flag.exists()
    assert (run.checkpoints / "latest").read_text().strip() == "1"
    assert json.loads(run.summary.read_text())["outcome"] == "checkpoint_now"
    run.checkpoint_now_flag.unlink()
    set_train(run, train_iters=3)
    assert train.run(run.root) == 0 and run.done_flag.exists()
    assert sorted(metrics(run)) == [1, 2, 3]


def test_only_load_model_starts_at_step_zero(tmp_path: Path, corpus: dict[str, Path]) -> None:
    base = make_run(tmp_path / "base", corpus, train_iters=8, save_iters=8)
    assert train.run(base.root) == 0
    tuned = make_run(
        tmp_path / "tuned", corpus, train_iters=2, resume_ckpt=str(base.checkpoints / "8"), only_load_model=True
    )
    assert train.run(tuned.root) == 0
    summary = json.loads(tuned.summary.read_text())
    assert (summary["start_step"], summary["final_step"]) == (0, 2)
    # The loaded weights are trained ones: the first loss is far below a fresh model's.
    assert metrics(tuned)[1]["loss"] < metrics(base)[1]["loss"] - 0.3


def test_config_errors_are_fatal(tmp_path: Path, corpus: dict[str, Path]) -> None:
    run = make_run(tmp_path / "bad", corpus, model={"config": "13b"})
    assert train.run(run.root) == protocol.EXIT_CONFIG
    assert "13b" in json.loads((run.control / "fatal.json").read_text())["reason"]
    cpu_bmtrain = make_run(tmp_path / "bmt", corpus, model={"backend": "bmtrain"})
    if not torch.cuda.is_available():
        assert train.run(cpu_bmtrain.root) == protocol.EXIT_CONFIG
        assert "CUDA" in json.loads((cpu_bmtrain.control / "fatal.json").read_text())["reason"]
    missing = make_run(tmp_path / "missing", corpus, resume_ckpt="99")
    assert train.run(missing.root) == protocol.EXIT_CONFIG
    assert "incomplete" in json.loads((missing.control / "fatal.json").read_text())["reason"]


def _torchrun2(run: RunDir, generation: int = 0) -> subprocess.CompletedProcess[str]:
    """Two trainer processes on this machine under torchrun (gloo: FM9G_DEVICE=cpu is inherited)."""
    env = {**os.environ, protocol.ENV_NODE_RANK: "0", protocol.ENV_GENERATION: str(generation), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "fm9g.model.train",
            "--run-dir",
            str(run.root),
        ],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow  # torchrun subprocesses
def test_torchrun_two_processes(tmp_path: Path, corpus: dict[str, Path]) -> None:
    run = make_run(tmp_path / "ddp", corpus, train_iters=4, save_iters=2)
    result = _torchrun2(run, generation=3)
    assert "world_size=2" in result.stdout
    assert run.done_flag.exists() and sorted(metrics(run)) == [1, 2, 3, 4]
    assert json.loads(run.heartbeat(0).read_text())["generation"] == 3
    files = {p.name for p in (run.checkpoints / "4").iterdir()} | {
        p.name for p in (run.checkpoints / "4" / "dataset_ckpt").iterdir()
    }
    # DDP's weights and Adam state are replicated: rank 0 alone writes them (one host copy per
    # node, not one per GPU); each rank still saves its own data position.
    assert {
        "fm9g_live_checkpoint-4.pt",
        "fm9g_live_checkpoint-4.rank-0.opt",
        "dataset_0.data",
        "dataset_1.data",
    } <= files
    assert not any(name.endswith(".rank-1.opt") for name in files)

    # A two-rank resume reads rank 0's optimizer file on both ranks and repeats the straight run.
    split = make_run(tmp_path / "ddp_split", corpus, train_iters=4, save_iters=2, max_session_steps=2)
    _torchrun2(split)
    assert not split.done_flag.exists()
    set_train(split, max_session_steps=0)
    _torchrun2(split)
    a, b = metrics(run), metrics(split)
    assert sorted(b) == [1, 2, 3, 4]
    assert all(abs(a[step]["loss"] - b[step]["loss"]) <= 1e-6 for step in a), (a, b)
    assert all(abs(a[step]["grad_norm"] - b[step]["grad_norm"]) <= 1e-6 for step in a)

    # FSDP2 on two ranks logs the global gradient norm, not this rank's shard of it: the same
    # figure as DDP's (which all-reduces whole gradients) up to rounding.
    fsdp = make_run(tmp_path / "fsdp2", corpus, model={"fsdp": True}, train_iters=4, save_iters=4)
    _torchrun2(fsdp)
    c = metrics(fsdp)
    for step in a:
        assert abs(a[step]["loss"] - c[step]["loss"]) <= 1e-5, (step, a[step], c[step])
        assert abs(a[step]["grad_norm"] - c[step]["grad_norm"]) <= 1e-4 * a[step]["grad_norm"], (step, a[step], c[step])

    # Two FSDP2 ranks resume DDP's whole Adam moments, each cutting its own rows of them.
    resumed = make_run(
        tmp_path / "fsdp2_from_ddp", corpus, model={"fsdp": True}, train_iters=4, resume_ckpt=str(run.checkpoints / "2")
    )
    _torchrun2(resumed)
    d = metrics(resumed)
    assert sorted(d) == [3, 4]
    assert all(abs(a[step]["loss"] - d[step]["loss"]) <= 1e-5 for step in d), (a, d)


def test_convert_a_trained_run(tmp_path: Path, corpus: dict[str, Path]) -> None:
    transformers = pytest.importorskip("transformers")
    from fm9g.model.args import ModelArgs
    from fm9g.model.convert import convert
    from fm9g.model.dragonfly import build_model

    run = make_run(tmp_path / "conv", corpus, train_iters=2, save_iters=2)
    assert train.run(run.root) == 0
    folder = convert(run.root)
    assert folder == run.root / "hf" / "2"
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.model"} <= {
        p.name for p in folder.iterdir()
    }
    step_dir = run.checkpoints / "2"
    ours = build_model(ModelArgs.model_validate(json.loads((step_dir / "config.json").read_text())), seed=0).eval()
    ours.load_state_dict(torch.load(step_dir / "fm9g_live_checkpoint-2.pt"))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.randint(0, ours.args.vocab_size, (1, 16))
    with torch.no_grad():
        assert (ours(ids) - theirs(ids).logits).abs().max().item() <= 1e-4


def test_options_accumulation_recompute_async_save_and_pruning(tmp_path: Path, corpus: dict[str, Path]) -> None:
    plain = make_run(tmp_path / "plain", corpus, train_iters=4, grad_accum=2)
    assert train.run(plain.root) == 0
    run = make_run(
        tmp_path / "opts",
        corpus,
        train_iters=4,
        save_iters=1,
        grad_accum=2,
        use_checkpoint=True,
        async_save=True,
        keep_checkpoints=2,
    )
    assert train.run(run.root) == 0
    # Recomputing activations changes no number; async saves all became visible; only 2 are kept.
    assert all(abs(metrics(plain)[s]["loss"] - metrics(run)[s]["loss"]) <= 1e-6 for s in (1, 2, 3, 4))
    assert sorted(p.name for p in run.checkpoints.iterdir() if p.name.isdigit()) == ["3", "4"]
    assert (run.checkpoints / "latest").read_text().strip() == "4"
    assert metrics(run)[4]["tokens"] == metrics(plain)[4]["tokens"] > 4 * 2 * 64  # two micro-batches a step


def test_only_run_dataloader(tmp_path: Path, corpus: dict[str, Path]) -> None:
    run = make_run(tmp_path / "data_only", corpus, train_iters=3, only_run_dataloader=True)
    assert train.run(run.root) == 0 and run.done_flag.exists()
    records = metrics(run)
    assert sorted(records) == [1, 2, 3] and all("loss" not in r and r["tokens_per_s"] > 0 for r in records.values())
    assert not any(p.name.isdigit() for p in run.checkpoints.iterdir())


def _bmtrain_missing() -> str | None:
    """Why the bmtrain backend cannot run here, or None when it can."""
    if not torch.cuda.is_available():
        return "the bmtrain backend needs a CUDA GPU (BMTrain's ZeRO-3 runs on NCCL); none here"
    try:
        import bmtrain  # noqa: F401
    except (ImportError, OSError) as exc:
        return f"bmtrain is not installed ({exc}): make gpu-train-env builds an environment with it"
    return None


def _torchrun(run: RunDir, nproc: int) -> str:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            str(nproc),
            "-m",
            "fm9g.model.train",
            "--run-dir",
            str(run.root),
        ],
        check=False,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


@pytest.mark.gpu
@pytest.mark.slow  # torchrun subprocesses
@pytest.mark.skipif(_bmtrain_missing() is not None, reason=str(_bmtrain_missing()))
def test_bmtrain_backend_trains_matches_torch_and_resumes(tmp_path: Path, corpus: dict[str, Path]) -> None:
    nproc = min(2, torch.cuda.device_count())  # two ranks partition every parameter when two GPUs exist
    fp32 = {"dtype": "fp32"}
    reference = make_run(tmp_path / "torch", corpus, model=fp32, train_iters=6, save_iters=3)
    _torchrun(reference, nproc)
    straight = make_run(
        tmp_path / "bmt", corpus, model={**fp32, "backend": "bmtrain", "offload": False}, train_iters=6, save_iters=3
    )
    _torchrun(straight, nproc)
    split = make_run(
        tmp_path / "bmt_split",
        corpus,
        model={**fp32, "backend": "bmtrain", "offload": False},
        train_iters=6,
        save_iters=3,
        max_session_steps=3,
    )
    _torchrun(split, nproc)
    assert not split.done_flag.exists()
    set_train(split, max_session_steps=0)
    _torchrun(split, nproc)
    assert straight.done_flag.exists() and split.done_flag.exists()

    torch_m, bmt_m, split_m = metrics(reference), metrics(straight), metrics(split)
    # Same init, same data, and in fp32 the same AdamW update: the backends differ only in how
    # gradients are reduced (all-reduce vs ZeRO-3 reduce-scatter), i.e. in rounding.
    assert abs(torch_m[1]["loss"] - bmt_m[1]["loss"]) <= 1e-4
    assert all(abs(torch_m[s]["loss"] - bmt_m[s]["loss"]) <= 1e-3 for s in range(1, 7))
    assert bmt_m[6]["loss"] < bmt_m[1]["loss"]
    # Resume restores the partitioned Adam state, the schedule and the data position.
    assert all(abs(bmt_m[s]["loss"] - split_m[s]["loss"]) <= 1e-4 for s in range(1, 7))
    # The gathered checkpoint holds the full model under the FM9G keys and shapes, like torch's.
    ours = torch.load(straight.checkpoints / "6" / "fm9g_live_checkpoint-6.pt")
    theirs = torch.load(reference.checkpoints / "6" / "fm9g_live_checkpoint-6.pt")
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    assert {p.name for p in (straight.checkpoints / "6").iterdir()} >= {
        f"fm9g_live_checkpoint-6.rank-{r}.opt" for r in range(nproc)
    }


@pytest.mark.gpu
@pytest.mark.slow  # torchrun subprocesses
@pytest.mark.skipif(_bmtrain_missing() is not None, reason=str(_bmtrain_missing()))
def test_bmtrain_bf16_offload_like_the_fm9g_script(tmp_path: Path, corpus: dict[str, Path]) -> None:
    run = make_run(
        tmp_path / "bmt_bf16",
        corpus,
        model={"backend": "bmtrain"},
        train_iters=8,
        save_iters=8,
        use_checkpoint=True,
        grad_accum=2,
    )
    out = _torchrun(run, 1)
    assert "bf16=True, backend bmtrain-zero3-offload" in out
    records = metrics(run)
    assert sorted(records) == list(range(1, 9)) and records[8]["loss"] < records[1]["loss"]
    assert (run.checkpoints / "8" / "COMPLETE").is_file()


# ---------------------------------------------------------------- issue 18: full disk, hints, summaries


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 512 KiB tmpfs: room for a run directory, not for the tiny model's checkpoint (about 1.5 MB)."""
    with mounted_tmpfs(tmp_path / "small_fs", "512k") as mount:
        yield mount


@pytest.mark.parametrize("async_save", [False, True])
def test_full_disk_while_saving_a_checkpoint_is_a_recorded_failure(
    small_tmpfs: Path, corpus: dict[str, Path], async_save: bool
) -> None:
    from fm9g.orchestrator.failures import FailureClass, classify
    from fm9g.orchestrator.slurm.states import JobState

    run = make_run(small_tmpfs / "run", corpus, train_iters=4, save_iters=2, async_save=async_save)
    assert train.run(run.root) == protocol.EXIT_NO_SPACE
    reason = run.read_fatal()
    assert reason is not None and f"mounted at {small_tmpfs} is full" in reason and "free of" in reason
    assert f"`fm9g-launch resume {run.name}`" in reason
    assert json.loads(run.fatal_record.read_text())["exit_code"] == protocol.EXIT_NO_SPACE
    assert not list(run.checkpoints.glob(".tmp-*")) and run.latest_step() is None  # nothing half-written kept
    failure = classify(JobState.FAILED, protocol.EXIT_NO_SPACE, fatal_reason=reason, run_name=run.name)
    assert failure.klass is FailureClass.FATAL and "disk is full" in failure.reason
    assert f"fm9g-launch resume {run.name}" in failure.reason


def test_full_disk_while_writing_metrics_exits_with_the_no_space_code(
    small_tmpfs: Path, corpus: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    run = make_run(small_tmpfs / "run", corpus, train_iters=4, save=False)
    filler = small_tmpfs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)  # fill every last page: metrics, heartbeats, fatal.json fail
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    assert train.run(run.root) == protocol.EXIT_NO_SPACE
    assert f"mounted at {small_tmpfs} is full" in capsys.readouterr().err
    filler.unlink()  # space freed: the same run goes on
    assert train.run(run.root) == protocol.EXIT_OK


def test_a_bad_line_names_what_a_run_config_user_can_do(tmp_path: Path, corpus: dict[str, Path]) -> None:
    script = tmp_path / "boom.py"
    script.write_text("def transform(data, num_sample, r):\n    raise ValueError('boom')\n")
    entries = json.loads(corpus["mixture"].read_text())
    entries[0]["transforms"] = str(script)
    mixture = tmp_path / "mixture.json"
    mixture.write_text(json.dumps(entries))
    run = make_run(tmp_path / "bad_transform", corpus, train_iters=2)
    raw = yaml.safe_load(run.config.read_text())
    raw["data"]["dataset_config"] = str(mixture)
    run.config.write_text(yaml.safe_dump(raw))
    assert train.run(run.root) == protocol.EXIT_CONFIG
    reason = run.read_fatal()
    assert reason is not None and "boom" in reason
    assert "on_error" not in reason  # a run config has no such option
    assert "abs_weight" in reason and f"fm9g-launch resume {run.name}" in reason


def test_summary_of_a_new_line_is_not_merged_with_the_old_one() -> None:
    before = {"start_step": 0, "final_step": 6, "steps_run": 6, "first_loss": 9.0, "sessions": 1}
    again = {"start_step": 0, "final_step": 4, "steps_run": 4, "first_loss": 8.0, "last_loss": 7.0}
    assert train.merge_summary(before, again) == {**again, "sessions": 1}
    later = {"start_step": 6, "final_step": 10, "steps_run": 4, "first_loss": 5.0, "last_loss": 4.0}
    merged = train.merge_summary(before, later)
    assert (merged["start_step"], merged["steps_run"], merged["first_loss"], merged["last_loss"]) == (0, 10, 9.0, 4.0)
    assert train.merge_summary(None, later) == {**later, "sessions": 1}
