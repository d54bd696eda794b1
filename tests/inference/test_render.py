"""Stage job scripts: strict, quoted, valid bash, stable (golden files), no API key inside."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from fm9g.launchers.prompts import Sampling
from fm9g.orchestrator.inference.jobs import stage_spec
from fm9g.orchestrator.render import ScriptRenderer
from fm9g.rundir.config import ClusterConfig

GOLDEN = Path(__file__).resolve().parent / "golden"
HOSTILE = "evil $(touch PWNED) \"q\" 's' `id`; rm -rf ~ & echo"

VALUES = {
    "convert": {"step": 60, "output": "/shared/runs/demo/hf/60"},
    "infer": {
        "model": "/shared/runs/demo/hf/60",
        "prompts": "/shared/p.jsonl",
        "output": "/shared/out.jsonl",
        "chat": True,
        "engine": "auto",
        "sampling_json": Sampling(
            temperature=0.7, top_p=0.9, max_tokens=64, n=2, seed=5, top_k=20, stop=("\n\n", "'$(x)'")
        ).to_json(),
        "trust_remote_code": True,
        "engine_args": ["max-model-len=2048", "quantization=awq"],
    },
    "serve": {
        "model": "/shared/runs/demo/hf/60",
        "endpoint": "/shared/runs/demo/serve/endpoint.json",
        "api_key_file": "/shared/runs/demo/serve/api_key",
        "served_name": "demo",
        "engine": "auto",
        "port": 8000,
        "trust_remote_code": False,
        "engine_args": ["max-model-len=4096", "gpu-memory-utilization=0.85", "quantization=awq"],
    },
}


def render(stage: str, *, run_dir: str = "/shared/runs/demo", values: dict | None = None) -> str:
    cluster = ClusterConfig(partition="gpu", gpus_per_node=1, time="1:00:00", setup=["module load cuda/12.1"])
    renderer = ScriptRenderer(
        run_name=Path(run_dir).name,
        run_dir=run_dir,
        cluster=cluster,
        python="/opt/venv/bin/python",
        config_hash="0123456789ab",
    )
    return renderer.render(stage_spec(stage, f"{stage}.sbatch.j2", values or VALUES[stage]), attempt=1)


@pytest.mark.parametrize("stage", sorted(VALUES))
def test_golden(stage: str, golden: Callable[[Path, str], None]) -> None:
    golden(GOLDEN / f"{stage}.sbatch", render(stage))


@pytest.mark.parametrize("stage", sorted(VALUES))
def test_hostile_paths_stay_one_word(stage: str, tmp_path: Path) -> None:
    values = {
        key: (f"{tmp_path}/{HOSTILE}/x" if isinstance(value, str) and value.startswith("/") else value)
        for key, value in VALUES[stage].items()
    }
    if stage == "serve":
        values["engine_args"] = [f"max-model-len={HOSTILE}"]
        values["served_name"] = HOSTILE
    text = render(stage, run_dir=f"{tmp_path}/{HOSTILE}", values=values)
    assert subprocess.run(["bash", "-n"], input=text, text=True, check=False).returncode == 0
    # Run everything but the final exec: nothing in a value may execute.
    body = text.rsplit("\nexec ", 1)[0]
    subprocess.run(["bash", "-c", body.replace("module load cuda/12.1", "true")], cwd=tmp_path, check=True)
    assert not (tmp_path / "PWNED").exists()


def test_infer_script_carries_every_sampling_parameter() -> None:
    """The job gets the Sampling back exactly, through the shell's quoting."""
    from fm9g.launchers.sampling import from_json

    text = render("infer")
    line = next(line for line in text.splitlines() if line.startswith("exec "))
    argv = subprocess.run(
        ["bash", "-c", 'printf "%s\\0" ' + line.removeprefix("exec ")], capture_output=True, check=True
    ).stdout.split(b"\0")
    given = argv[argv.index(b"--sampling-json") + 1].decode()
    assert from_json(given).to_json() == VALUES["infer"]["sampling_json"]
    assert b"--trust-remote-code" in argv


def test_serve_script_names_the_key_file_not_the_key() -> None:
    text = render("serve")
    assert "--api-key-file /shared/runs/demo/serve/api_key" in text
    assert "api-key " not in text and "VLLM_API_KEY" not in text
