"""Paths of the post-training stages under runs/<name>/ (kept beside `RunDir`, which owns
the training paths):

    hf/<step>/              converted Hugging Face folder of checkpoint <step>
    infer/<stage>.jsonl     completions of an eval prompt set (pipeline default)
    serve/api_key           the server's API key, mode 0600
    serve/endpoint.json     {host, port, url, job_id, engine, model}, written by the serve job
"""

from __future__ import annotations

from pathlib import Path

from fm9g.orchestrator.rundir import RunDir


def hf_dir(run: RunDir, step: int) -> Path:
    return run.root / "hf" / str(step)


def infer_output(run: RunDir, stage: str = "infer") -> Path:
    return run.root / "infer" / f"{stage}.jsonl"


def serve_dir(run: RunDir) -> Path:
    return run.root / "serve"


def serve_endpoint(run: RunDir) -> Path:
    """The path `fm9g-launch status` reads."""
    return serve_dir(run) / "endpoint.json"


def api_key_file(run: RunDir) -> Path:
    return serve_dir(run) / "api_key"
