"""The contract between the node agent, the trainer and the supervisor: environment
variable names, exit codes, and the names every job carries (Slurm job name and
--comment tag).  Stdlib only, so every side can import it cheaply."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

# Environment the node agent gives the trainer (on top of torchrun's RANK, WORLD_SIZE, ...).
ENV_RUN_DIR = "FM9G_RUN_DIR"
ENV_NODE_RANK = "FM9G_NODE_RANK"
ENV_GENERATION = "FM9G_GENERATION"

# Exit codes of a node job, read back by the supervisor (sacct ExitCode / local rc).
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_ENDPOINT_TIMEOUT = 3  # a worker never saw the master's endpoint
EXIT_NO_SPACE = 74  # a disk filled up (ENOSPC/EDQUOT): do not retry until space is freed
EXIT_CONTINUE = 75  # checkpointed on request (preemption/walltime): continue the run
EXIT_CONFIG = 78  # config/data error: retrying cannot help (do-not-retry class)
# A trainer rank to its node agent only (on_node_loss wait/shrink): in-process recovery
# gave up, start this rank again from the disk checkpoint (the fallback).
EXIT_FALLBACK = 76


def slug(name: str) -> str:
    """A run name reduced to characters every Slurm field accepts, plus a short hash so
    two names that reduce alike stay distinct."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_.-")[:40] or "run"
    if safe == name:
        return safe
    return f"{safe}-{hashlib.sha1(name.encode()).hexdigest()[:6]}"


def job_tag(run_name: str, stage: str, role: str, node_rank: int, attempt: int) -> str:
    """The --comment every job carries, so a job can be matched back to its run after a crash."""
    return f"fm9g:{slug(run_name)}:{stage}:{role}:{node_rank}:{attempt}"


def job_name(run_name: str, stage: str, role: str, node_rank: int) -> str:
    return f"fm9g-{slug(run_name)}-{stage}-{role}{node_rank}"


def read_exit_code(path: Path) -> tuple[int, float] | None:
    """(code, end time) from a job's exit record (the node agent's JSON) or a local
    executor's `.rc` file; None while it is absent or unreadable."""
    try:
        text = path.read_text(encoding="utf-8")
        mtime = path.stat().st_mtime
    except OSError:
        return None
    if path.suffix == ".rc":
        try:
            return int(text.strip()), mtime
        except ValueError:
            return None
    try:
        record = json.loads(text)
    except ValueError:
        return None
    code = record.get("code") if isinstance(record, dict) else None
    if isinstance(code, bool) or not isinstance(code, int):
        return None
    when = record.get("time")
    return code, float(when) if isinstance(when, (int, float)) and not isinstance(when, bool) else mtime
