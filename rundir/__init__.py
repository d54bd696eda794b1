"""The run-directory contract every process shares (the bottom layer: it imports no other
`fm9g` package).  `RunDir` owns every path under `runs/<name>/`; nobody else spells them.

    runs/<name>/
      config.yaml                 the resolved, validated config (written once per launch)
      mixture.json                the mixture the trainer reads (raw paths -> run indexes)
      state.db                    SQLite (WAL): stages, jobs, attempts, events
      scripts/                    rendered scripts, one per job attempt
      rendezvous/endpoint.json    {host, port, generation, job_id, rdzv_id}
      rendezvous/store.json       supervise.on_node_loss wait/shrink: the store job's {host, port, serial, job_id}
      events/inproc/<uid>.jsonl   wait/shrink: one line per membership event of one trainer process or agent
      logs/<stage>/<job>.out
      heartbeats/<node>.json      last step, time, pid
      control/                    flags: checkpoint_now, DONE, cancel, fatal.json, exits/<job>[.n<rank>].json,
                                  steps/<job>.n<rank>.json (cluster.start: together)
      checkpoints/<step>/  checkpoints/latest
      hf/<step>/                  converted Hugging Face folders
      infer/<stage>.jsonl         completions of an eval prompt set
      serve/api_key  serve/endpoint.json
      tensorboard/
      metrics.jsonl
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunDir:
    """Paths of one run; cheap to build and safe to pass to any process."""

    root: Path

    @classmethod
    def of(cls, root: str | Path) -> RunDir:
        return cls(Path(root).resolve())

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def state_db(self) -> Path:
        return self.root / "state.db"

    @property
    def scripts(self) -> Path:
        return self.root / "scripts"

    @property
    def rendezvous(self) -> Path:
        return self.root / "rendezvous"

    @property
    def endpoint(self) -> Path:
        return self.rendezvous / "endpoint.json"

    @property
    def store_endpoint(self) -> Path:
        """supervise.on_node_loss wait/shrink: where the run's store job listens (StoreEndpoint)."""
        return self.rendezvous / "store.json"

    @property
    def inproc_events(self) -> Path:
        """wait/shrink: one append-only JSON-lines file per trainer process and node agent,
        <uid>.jsonl, of membership events (rundir.inproc_events); the supervisor imports them."""
        return self.root / "events" / "inproc"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def stage_logs(self, stage: str) -> Path:
        """logs/<stage>/, with a stage's ':' (index:<task>) spelled '-' for the folder name."""
        return self.logs / stage.replace(":", "-")

    @property
    def heartbeats(self) -> Path:
        return self.root / "heartbeats"

    def heartbeat(self, node_rank: int) -> Path:
        return self.heartbeats / f"node{node_rank}.json"

    @property
    def control(self) -> Path:
        return self.root / "control"

    @property
    def done_flag(self) -> Path:
        """Written by rank 0 when training finished; agents stop restarting once it exists."""
        return self.control / "DONE"

    @property
    def checkpoint_now_flag(self) -> Path:
        """Raised by a node agent on USR1 (preemption/walltime); ranks read it at step boundaries."""
        return self.control / "checkpoint_now"

    @property
    def cancel_flag(self) -> Path:
        """Raised by `fm9g-launch cancel` (and the TUI): the supervisor reads job ends as a user's decision."""
        return self.control / "cancel"

    @property
    def fatal_record(self) -> Path:
        """Written by the trainer on a config or data error: retrying cannot help."""
        return self.control / "fatal.json"

    def read_fatal(self) -> str | None:
        """The reason in control/fatal.json; None when there is none (or it cannot be read yet)."""
        import json

        try:
            record = json.loads(self.fatal_record.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        reason = record.get("reason") if isinstance(record, dict) else None
        return str(reason) if reason else None

    def exit_record(self, job_id: str, node_rank: int | None = None) -> Path:
        """Written by a node agent as it exits: its exit code, which squeue cannot tell
        and sacct may report only seconds later.  In an allocation of several nodes
        (cluster.start: together) the job id is shared, so each node's record carries its
        rank; the allocation's batch script writes it when the node agent could not (its
        node died, or it was killed)."""
        name = job_id if node_rank is None else f"{job_id}.n{node_rank}"
        return self.control / "exits" / f"{name}.json"

    def step_record(self, job_id: str, node_rank: int) -> Path:
        """Written by a node agent started as a step of a shared allocation: its host and
        Slurm step id, so one node can be cancelled or released without the others."""
        return self.control / "steps" / f"{job_id}.n{node_rank}.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def latest_pointer(self) -> Path:
        """A text file naming the step of the last complete checkpoint."""
        return self.checkpoints / "latest"

    def latest_step(self) -> int | None:
        """The step `checkpoints/latest` names, or None before the first checkpoint."""
        try:
            return int(self.latest_pointer.read_text().strip())
        except (OSError, ValueError):
            return None

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def mixture(self) -> Path:
        """The mixture the trainer reads: data.dataset_config with raw datasets replaced
        by the indexes the run's index stages build."""
        return self.root / "mixture.json"

    @property
    def dry_run(self) -> Path:
        """Where `--dry-run` writes its plan and scripts; nothing of the run reads it."""
        return self.root / "dry-run"

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / "tokenizer"

    @property
    def indexed(self) -> Path:
        """Index directories built by the run's `index` stage for raw datasets."""
        return self.root / "indexed"

    def hf_dir(self, step: int) -> Path:
        """The Hugging Face folder converted from checkpoint `step`."""
        return self.root / "hf" / str(step)

    def infer_output(self, stage: str = "infer") -> Path:
        return self.root / "infer" / f"{stage}.jsonl"

    @property
    def serve_dir(self) -> Path:
        return self.root / "serve"

    @property
    def serve_endpoint(self) -> Path:
        """{host, port, url, job_id, engine, model}, written by the serve job."""
        return self.serve_dir / "endpoint.json"

    @property
    def api_key_file(self) -> Path:
        """The server's API key, mode 0600."""
        return self.serve_dir / "api_key"

    @property
    def supervisor_log(self) -> Path:
        return self.root / "supervisor.log"

    @property
    def lock(self) -> Path:
        return self.root / "supervisor.lock"

    def make(self) -> RunDir:
        """Create the directories every stage expects."""
        for path in (
            self.scripts,
            self.rendezvous,
            self.logs,
            self.heartbeats,
            self.control,
            self.checkpoints,
            self.tensorboard,
        ):
            path.mkdir(parents=True, exist_ok=True)
        return self
