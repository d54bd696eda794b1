"""The plan of a run: which stages it has, their jobs, and the order they run in.

`plan_run(config, run)` validates what a real run validates before anything is queued
(the mixture and its transforms, the names of every job) and returns a `Plan`; it
writes nothing.  `--dry-run` prints the plan and writes its scripts; the runner
submits the same specs through the same renderer, so the scripts are the same bytes.

    index:<task>   one per raw dataset: an array job over shards, then a merge (afterok)
    tokenizer      when data.tokenizer_path is unset: trains one from the indexed data
    train          the master and worker node jobs (nodes + cluster.spares of them), and,
                   with supervise.on_node_loss wait/shrink, the store job first
    convert, infer, serve   after training, when pipeline.after_train asks (their
                   scripts name the checkpoint step, so they are rendered when it exists)
"""

from __future__ import annotations

import enum
import io
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from fm9g.orchestrator.render import JobSpec, ScriptRenderer, config_hash
from fm9g.rundir import RunDir
from fm9g.rundir import config as config_mod
from fm9g.rundir.config import ConfigError, RunConfig

TRAIN = "train"
TOKENIZER = "tokenizer"
# The store job's stage name in state.db (job rows, events): not TRAIN, so its row is
# never one of the training stage's node rows.  It has no row in the stages table.
STORE = "store"
# The store job's own resources: one CPU and a little memory (torch imported, a TCPStore
# of a few thousand keys), never the GPU node's memory; no node features asked for.
STORE_RESOURCES: tuple[tuple[str, object], ...] = (("cpus_per_task", 1), ("mem", "2G"), ("constraint", None))
INPROC_MODES = ("wait", "shrink")  # supervise.on_node_loss values that recover in process

# About one shard per 64 MB, at most this many array tasks per dataset.
SHARD_BYTES = 64 << 20
MAX_SHARDS = 256


class StageKind(str, enum.Enum):
    INDEX = "index"
    TOKENIZER = "tokenizer"
    TRAIN = "train"
    CONVERT = "convert"
    INFER = "infer"
    SERVE = "serve"


@dataclass(frozen=True)
class IndexSource:
    """One raw dataset of the mixture and where its index goes."""

    task_name: str
    source: Path
    output: Path
    work: Path
    language: str
    shards: int  # asked of plan_shards; its PLAN.json may round to a few more

    @property
    def shard_plan(self) -> Path:
        """The PLAN.json the shard and merge jobs read (written by the runner)."""
        return self.work / "PLAN.json"


@dataclass(frozen=True)
class StagePlan:
    name: str
    kind: StageKind
    depends_on: tuple[str, ...] = ()
    jobs: tuple[JobSpec, ...] = ()
    skip: str | None = None  # why the stage will not run (already done, given in the config)
    note: str = ""


@dataclass(frozen=True)
class Plan:
    run: RunDir
    config: RunConfig
    config_text: str  # exactly what runs/<name>/config.yaml holds
    mixture: list[dict[str, object]]  # the mixture the trainer reads: raw paths replaced by their indexes
    stages: tuple[StagePlan, ...]
    index_sources: tuple[IndexSource, ...] = field(default_factory=tuple)
    # The first attempt's script of every job that will run, by file name: rendered once
    # while planning (a bad #SBATCH value fails there), written as is by a dry run.
    scripts: dict[str, str] = field(default_factory=dict)

    def stage(self, name: str) -> StagePlan:
        return next(stage for stage in self.stages if stage.name == name)

    def renderer(self) -> ScriptRenderer:
        """The renderer every job of this run is written with (dry run and real run alike)."""
        return ScriptRenderer(
            run_name=self.run.name,
            run_dir=str(self.run.root),
            cluster=self.config.cluster,
            python=self.config.cluster.python or sys.executable,
            config_hash=config_hash(self.config_text),
        )

    def describe(self) -> str:
        """The dry-run listing: stages in order, their jobs and what each waits for."""
        out = io.StringIO()
        out.write(f"run {self.run.name} ({self.config.executor} executor, config {config_hash(self.config_text)})\n")
        for stage in self.stages:
            after = f"  after {', '.join(stage.depends_on)}" if stage.depends_on else ""
            state = f"  [skipped: {stage.skip}]" if stage.skip else ""
            out.write(f"  {stage.name}{after}{state}\n")
            if stage.note:
                out.write(f"      {stage.note}\n")
            for job in stage.jobs if not stage.skip else ():
                array = f" x{job.array} tasks" if job.array else ""
                out.write(
                    f"      {job.role}{job.node_rank if job.role in ('master', 'worker') else ''}{array}: "
                    f"{job.script_name(1)}\n"
                )
        return out.getvalue()


def inproc_recovery(config: RunConfig) -> bool:
    """Whether the trainer ranks recover in process (supervise.on_node_loss wait/shrink):
    they form their groups through the store job's TCPStore, not torchrun's rendezvous."""
    return config.supervise.on_node_loss in INPROC_MODES


def node_slots(config: RunConfig) -> int:
    """Node jobs the training stage keeps running: cluster.nodes, plus cluster.spares
    under in-process recovery (ranks nodes..nodes+spares-1, warm workers that the
    trainers' own membership takes in when a node is lost)."""
    return config.cluster.nodes + (config.cluster.spares if inproc_recovery(config) else 0)


def check_recovery(config: RunConfig) -> None:
    """Refuse the combinations in-process recovery cannot run (a ConfigError naming the
    field and the fix)."""
    mode = config.supervise.on_node_loss
    if config.cluster.spares and not inproc_recovery(config):
        raise ConfigError(
            f"cluster.spares: {config.cluster.spares} needs supervise.on_node_loss: wait or shrink "
            f"(with {mode}, torchrun's rendezvous has no place for a warm spare): "
            "set cluster.spares: 0, or supervise.on_node_loss: wait"
        )
    if not inproc_recovery(config):
        return
    if config.model.backend != "torch":
        raise ConfigError(
            f"supervise.on_node_loss: {mode} needs model.backend: torch (a {config.model.backend} rank's "
            "ZeRO-3 shards have no live copy on a peer): set model.backend: torch, "
            "or supervise.on_node_loss: restart"
        )
    if config.cluster.start == "together":
        raise ConfigError(
            f"cluster.start: together is not supported with supervise.on_node_loss: {mode} yet: "
            "set cluster.start: separate, or supervise.on_node_loss: restart"
        )


def store_spec() -> JobSpec:
    """The store job (supervise.on_node_loss wait/shrink): one CPU hosting the run's
    TCPStore (launchers/store_host.py); no GPU, no checkpoint signal."""
    return JobSpec(
        stage=STORE,
        role=STORE,
        template="store.sbatch.j2",
        gpus=False,
        signal=False,
        resources=STORE_RESOURCES,
    )


def node_spec(node_rank: int, generation: int) -> JobSpec:
    """A master (rank 0) or worker node job of the training stage."""
    role = "master" if node_rank == 0 else "worker"
    return JobSpec(stage=TRAIN, role=role, template=f"{role}.sbatch.j2", node_rank=node_rank, generation=generation)


def together_spec(run: RunDir, nodes: int, generation: int) -> JobSpec:
    """One allocation of all `nodes` nodes of the training stage (cluster.start: together):
    its script starts each node's agent as an srun step, logging where that node's own job
    would (JobSpec.log_name of its node_spec)."""
    return JobSpec(
        stage=TRAIN,
        role="together",
        template="together.sbatch.j2",
        generation=generation,
        nodes=nodes,
        values={
            "node_specs": [node_spec(rank, generation) for rank in range(nodes)],
            "log_dir": str(run.stage_logs(TRAIN)),
            "exits_dir": str(run.exit_record("0").parent),
        },
    )


def index_specs(source: IndexSource, shards: int) -> tuple[JobSpec, JobSpec]:
    """The shard array job and the merge job of one dataset's index stage."""
    stage = f"index:{source.task_name}"
    values = {"plan": str(source.shard_plan)}
    return (
        JobSpec(
            stage=stage, role="shard", template="index.sbatch.j2", values=values, gpus=False, signal=False, array=shards
        ),
        JobSpec(stage=stage, role="merge", template="index.sbatch.j2", values=values, gpus=False, signal=False),
    )


def tokenizer_spec(run: RunDir, vocab_size: int) -> JobSpec:
    return JobSpec(
        stage=TOKENIZER,
        role=TOKENIZER,
        template="tokenizer.sbatch.j2",
        gpus=False,
        signal=False,
        values={
            "mixture": str(run.mixture),
            "vocab_size": vocab_size,
            "output": str(run.tokenizer_dir / "tokenizer.model"),
        },
    )


def shard_count(files: list[Path]) -> int:
    """One shard per file, or per 64 MB of a big file, whichever is more; at most MAX_SHARDS."""
    by_size = -(-sum(p.stat().st_size for p in files) // SHARD_BYTES)
    return max(1, min(MAX_SHARDS, max(len(files), by_size)))


def guess_language(files: list[Path], sample_bytes: int = 65536) -> str:
    """'en' when most characters of the data's first bytes are ASCII, else 'zh'.

    Only the meta.json token estimate depends on it (0.7/char for zh, 1.5/word for en)."""
    text = ""
    for file in files[:4]:
        with open(file, "rb") as handle:
            text += handle.read(sample_bytes).decode("utf-8", "ignore")
    if not text:
        return "zh"
    ascii_share = sum(1 for ch in text if ord(ch) < 128) / len(text)
    return "en" if ascii_share > 0.9 else "zh"


def plan_run(config: RunConfig, run: RunDir) -> Plan:
    """Validate `config` for `run` and plan every stage; writes nothing.

    Raises ConfigError (naming the file, the entry and the fix) for anything a real run
    would refuse before queueing: a missing or bad mixture, a transform that fails on
    every sampled record, a value that cannot go into a script."""
    from fm9g.data.errors import DataError
    from fm9g.data.index_plan import collect_inputs
    from fm9g.data.mixture import check_transforms, load_mixture, needs_index

    check_recovery(config)
    if not config.data.dataset_config:
        raise ConfigError(
            "data.dataset_config is not set: point it at a mixture JSON list (see examples/tiny/mixture.json)"
        )
    try:
        mixture = load_mixture(Path(config.data.dataset_config))
        check_transforms(mixture)  # a transform failing on every sampled record fails here, not mid-run
    except DataError as exc:
        raise ConfigError(str(exc)) from None

    stages: list[StagePlan] = []
    sources: list[IndexSource] = []
    resolved: list[dict[str, object]] = []
    for task in mixture.entries:
        entry = task.model_dump(exclude_none=True)  # absolute path and transforms, as validated
        if needs_index(task):
            output = run.indexed / task.task_name
            entry["path"] = str(output)
            name = f"index:{task.task_name}"
            if (output / "meta.json").exists():
                stages.append(StagePlan(name, StageKind.INDEX, skip=f"already indexed: {output}"))
            else:
                try:
                    files = collect_inputs(Path(task.path))  # the indexer's own list of this dataset's files
                except DataError as exc:
                    raise ConfigError(f"{config.data.dataset_config}: entry {task.task_name!r}: {exc}") from None
                source = IndexSource(
                    task.task_name,
                    Path(task.path),
                    output,
                    run.indexed / ".work" / task.task_name,
                    guess_language(files),
                    shard_count(files),
                )
                sources.append(source)
                stages.append(
                    StagePlan(
                        name,
                        StageKind.INDEX,
                        jobs=index_specs(source, source.shards),
                        note=f"{source.source} -> {output}",
                    )
                )
        resolved.append(entry)
    index_stages = tuple(stage.name for stage in stages if not stage.skip)

    data_stages = index_stages
    if config.data.tokenizer_path is None:
        target = run.tokenizer_dir / "tokenizer.model"
        skip = f"already trained: {target}" if target.exists() else None
        stages.append(
            StagePlan(
                TOKENIZER,
                StageKind.TOKENIZER,
                depends_on=index_stages,
                jobs=(tokenizer_spec(run, config.data.tokenizer_vocab_size),),
                skip=skip,
                note=f"sentencepiece, vocab {config.data.tokenizer_vocab_size} -> {target}",
            )
        )
        data_stages = (*index_stages, TOKENIZER) if not skip else index_stages

    nodes = config.cluster.nodes
    together = config.cluster.start == "together" and nodes > 1
    if config.cluster.start == "together" and config.executor == "local":
        raise ConfigError(
            "cluster.start: together takes the nodes as one Slurm allocation, and this run uses the local "
            "executor: set executor: slurm (or --executor slurm), or cluster.start: separate"
        )
    if together:
        train_jobs: tuple[JobSpec, ...] = (together_spec(run, nodes, 0),)
        note = (
            f"one allocation of {nodes} nodes (cluster.start: together), a node agent per node; "
            "a lost node is replaced by a single-node job"
        )
    elif inproc_recovery(config):
        spares = config.cluster.spares
        train_jobs = (store_spec(), *(node_spec(rank, 0) for rank in range(node_slots(config))))
        note = (
            f"{nodes} node job(s)" + (f" and {spares} spare(s)" if spares else "") + ", in-process recovery "
            f"(supervise.on_node_loss: {config.supervise.on_node_loss}) through the store job's TCPStore"
        )
    else:
        train_jobs = tuple(node_spec(rank, 0) for rank in range(nodes))
        note = f"{nodes} node job(s), torchrun rendezvous through the master's store"
    stages.append(StagePlan(TRAIN, StageKind.TRAIN, depends_on=data_stages, jobs=train_jobs, note=note))
    wanted = set(config.pipeline.after_train)
    if wanted:
        later = "rendered when training ends: its script names the checkpoint step"
        stages.append(StagePlan("convert", StageKind.CONVERT, depends_on=(TRAIN,), note=later))
        for kind in (StageKind.INFER, StageKind.SERVE):
            if kind.value in wanted:
                stages.append(StagePlan(kind.value, kind, depends_on=("convert",), note=later))

    plan = Plan(
        run=run,
        config=config,
        config_text=config_mod.dump(config),
        mixture=resolved,
        stages=tuple(stages),
        index_sources=tuple(sources),
    )
    renderer = plan.renderer()
    scripts = {
        job.script_name(1): renderer.render(job, 1) for stage in plan.stages if not stage.skip for job in stage.jobs
    }
    return replace(plan, scripts=scripts)
