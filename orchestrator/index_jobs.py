"""The index stage on Slurm: a directory of many files becomes one array job (one task
per shard, `templates/index.sbatch.j2`) and a merge job that runs `afterok` of it.
Finished shards are skipped by the shard cache, so a re-run only redoes what failed."""

from __future__ import annotations

import sys
import time
from datetime import datetime, timedelta
from collections.abc import Callable
from pathlib import Path

from fm9g.rundir.atomic import read_json, write_text
from fm9g.rundir.config import ConfigError, RunConfig
from fm9g.orchestrator.render import config_hash, render_template, sbatch_flags, slug
from fm9g.rundir import RunDir
from fm9g.orchestrator.state import StateStore

# About one shard per 64 MB, at most this many array tasks per dataset.
SHARD_BYTES = 64 << 20
MAX_SHARDS = 256


def shard_count(path: Path) -> int:
    """One shard per file, or per 64 MB of a big file, whichever is more; at most MAX_SHARDS."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.suffix in (".jsonl", ".txt")]
    by_size = -(-sum(p.stat().st_size for p in files) // SHARD_BYTES)
    return max(1, min(MAX_SHARDS, max(len(files), by_size)))


def _script(run: RunDir, config: RunConfig, stage: str, role: str, plan: Path, extra: list[str]) -> Path:
    cluster = config.cluster.model_copy(update={"gpus_per_node": 0})  # indexing needs no GPU
    tag = f"fm9g:{slug(run.name)}:{stage}:{role}"
    flags = [f for f in sbatch_flags(cluster, name=f"fm9g-{slug(run.name)}-{role}", comment=tag)
             if not f.startswith("--signal")] + extra
    text = render_template("index.sbatch.j2", run_name=run.name, stage=stage, role=role, plan=str(plan),
                           python=config.cluster.python or sys.executable,
                           config_hash=config_hash(plan.read_text()), sbatch_flags=sorted(flags),
                           setup=config.cluster.setup)
    path = run.scripts / f"{stage.replace(':', '-')}-{role}.sbatch"
    write_text(path, text, mode=0o755)
    return path


def index_on_slurm(source: Path, output: Path, language: str, config: RunConfig, run: RunDir, store: StateStore,
                   stage: str, say: Callable[[str], None], poll: float = 1.0) -> dict:
    """Index `source` into `output` with an array job and a merge job; returns meta.json."""
    from fm9g.data.index_plan import plan_shards
    from fm9g.orchestrator.slurm.commands import SlurmClient

    client = SlurmClient()
    work = run.indexed / ".work" / stage.split(":", 1)[1]
    plan = plan_shards(source, shard_count(source), work, output=output, language=language)
    shards = len(read_json(plan)["shards"])
    logs = run.stage_logs(stage.replace(":", "-"))
    logs.mkdir(parents=True, exist_ok=True)
    array_script = _script(run, config, stage, "shard", plan, [f"--array=0-{shards - 1}"])
    where = str(logs).replace("%", "%%")  # '%' starts an sbatch filename pattern
    array_id = client.submit(array_script, extra_args=[f"--output={where}/shard-%a.out"])
    merge_script = _script(run, config, stage, "merge", plan, [f"--dependency=afterok:{array_id}", "--kill-on-invalid-dep=yes"])
    merge_id = client.submit(merge_script, extra_args=[f"--output={where}/merge.out"])
    store.event("submitted", f"{stage}: {shards} shard tasks as array job {array_id}, merge job {merge_id}", stage=stage)
    say(f"{stage}: {shards} shard(s) as array job {array_id}, then merge job {merge_id}")
    while True:
        time.sleep(poll)
        queued = client.squeue([merge_id])
        if merge_id in queued and queued[merge_id].state.is_active:
            done = len(list((work / "shards").glob("*/result.json"))) if (work / "shards").exists() else 0
            store.set_stage_progress(stage, min(done, shards) / shards * 0.95, detail=f"{done}/{shards} shards")
            continue
        record = client.sacct([merge_id], datetime.now() - timedelta(days=1)).get(merge_id)
        if record is None and merge_id not in queued:
            continue  # accounting lags: ask again
        state = record.state.value if record else queued[merge_id].state.value
        if state == "COMPLETED" and (output / "meta.json").exists():
            return read_json(output / "meta.json") or {}
        raise ConfigError(f"{stage}: indexing {source} failed (merge job {merge_id} ended {state}); "
                          f"see {logs}/shard-*.out and {logs}/merge.out")
