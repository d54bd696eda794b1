"""Pydantic v2 models of a run's config, one per section, and the loader that reports
bad input by file, field path and fix.

The `train` section carries every argument of the FM9G usage guide's parameter list
(参数详细介绍) under its original name.  The three guide arguments that describe the
data (`dataset_config`, `tokenizer_path`, `max_length`) and the dataloader knobs live in
`data`, and the model config name (`config`) lives in `model`; the loader's "did you
mean" points there when someone writes them under `train`.
"""

from __future__ import annotations

import copy
import difflib
import json
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file, the field and the fix."""


class DuplicateKeyError(ValueError):
    """A key given twice in one mapping of a YAML or JSON file (1-based `line`, 0 if unknown).

    Both parsers silently keep the last value, so `train:` written twice would drop the
    whole first section; callers turn this into their layer's error naming the file."""

    def __init__(self, key: str, line: int, first_line: int = 0) -> None:
        self.key, self.line, self.first_line = key, line, first_line
        where = f" (first at line {first_line})" if first_line else ""
        super().__init__(f"key {key!r} appears twice in the same mapping{where}; keep one of them")


class Section(BaseModel):
    """Base of every section: unknown keys are errors, assignments are validated."""

    # allow_inf_nan=False: `lr: .inf` or `--set train.lr=nan` passes every `gt=0` bound
    # and would only show up as a NaN loss after the run has started.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ClusterConfig(Section):
    """Where and how the jobs run (Slurm options; the local executor ignores most)."""

    partition: str | None = Field(None, description="Slurm partition (-p). None: the cluster's default partition.")
    nodes: int = Field(1, ge=1, description="Nodes in a training stage.")
    start: Literal["separate", "together"] = Field(
        "separate",
        description=(
            "How a training stage takes its nodes. separate: one single-node job per node, each "
            "starting when it finds a node (the guide's way; a node that starts first holds its "
            "allocation while the rest queue). together: one allocation of all the nodes, so they "
            "start at once, with one node agent per node (srun step); a lost node is still "
            "replaced by a single-node job. Slurm executor only."
        ),
    )
    spares: int = Field(
        0,
        ge=0,
        description=(
            "supervise.on_node_loss wait/shrink: extra node jobs kept running, warm (torch imported, model "
            "built), that take a lost node's place in about a second; a fresh job then replaces the spare."
        ),
    )
    gpus_per_node: int = Field(
        0, ge=0, description="GPUs per node, requested as --gres=gpu:N; also torchrun's --nproc-per-node when > 0."
    )
    procs_per_node: int | None = Field(
        None, ge=1, description="Trainer processes per node; default: gpus_per_node, or 1 on CPU."
    )
    cpus_per_task: int | None = Field(None, ge=1, description="--cpus-per-task for each node job.")
    mem: str | None = Field(None, description="--mem, e.g. '200G'.")
    time: str | None = Field(None, description="Walltime (--time), e.g. '2-00:00:00'.")
    account: str | None = Field(None, description="--account.")
    qos: str | None = Field(None, description="--qos.")
    constraint: str | None = Field(None, description="--constraint (node features).")
    exclude: list[str] = Field(default_factory=list, description="Nodes never to use (--exclude).")
    extra_sbatch: list[str] = Field(
        default_factory=list, description="Extra '#SBATCH' options, each like '--reservation=x'."
    )
    setup: list[str] = Field(
        default_factory=list,
        description="Shell lines run before the node agent: module load, conda/venv activation, exports. Trusted, rendered verbatim.",
    )
    python: str | None = Field(
        None, description="Python interpreter on the compute nodes; default: the one running fm9g-launch."
    )
    train_env: str | None = Field(
        None,
        description="A virtual environment (folder) the training jobs activate and whose python runs the node agent: `make gpu-train-env` builds one with bmtrain and flash-attn. None: cluster.python.",
    )
    serve_env: str | None = Field(
        None,
        description="A virtual environment (folder) the infer and serve jobs activate and whose python runs them: `make gpu-serve-env` builds one with vLLM. None: cluster.python.",
    )
    signal_lead: int = Field(
        120,
        ge=0,
        description="Seconds before the walltime at which Slurm sends USR1 (--signal=B:USR1@lead) so the trainer checkpoints.",
    )
    requeue: bool = Field(
        False,
        description="Let Slurm requeue a job on node failure (--requeue). Off: the supervisor owns resubmission (never both).",
    )

    @field_validator("train_env", "serve_env")
    @classmethod
    def _absolute_env(cls, value: str | None) -> str | None:
        # The path is shell-quoted into the job script, so $HOME or ~ would stay literal there.
        if value is not None and not os.path.isabs(value):
            raise ValueError(
                f"{value!r} must be an absolute path to a virtual environment (it is quoted into the job "
                "script, so $HOME and ~ are not expanded), e.g. /shared/envs/fm9g-train"
            )
        return value


class ModelConfig(Section):
    """The architecture to build."""

    config: str = Field("tiny", description="A named model config (tiny, 2.4b, 8b) or a path to a model config JSON.")
    backend: Literal["torch", "bmtrain"] = Field(
        "torch", description="torch: DDP (FSDP2 with fsdp=true); bmtrain: ZeRO-3, GPU only."
    )
    fsdp: bool = Field(
        False, description="Shard parameters with FSDP2 (torch backend) for models that do not fit one device."
    )
    dtype: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="Compute dtype: auto = bf16 autocast on GPU, fp32 on CPU."
    )
    offload: bool | None = Field(
        None,
        description="bmtrain with bf16: keep Adam states on the CPU (AdamOffloadOptimizer). None: on for bf16, as the FM9G script always passed --offload; off for fp32. The torch backend has no offload.",
    )

    @model_validator(mode="after")
    def _backend_options(self) -> ModelConfig:
        if self.backend == "bmtrain" and self.fsdp:
            raise ValueError(
                "fsdp is a torch-backend option (bmtrain already shards with ZeRO-3): "
                "remove model.fsdp or use model.backend: torch"
            )
        if self.backend == "torch" and self.offload:
            raise ValueError("offload is a bmtrain option: remove model.offload, or use model.backend: bmtrain")
        return self


class DataConfig(Section):
    """The dataset mixture, the tokenizer and the dataloader."""

    dataset_config: str | None = Field(
        None,
        description="Path to the mixture JSON list (guide format: dataset_name, task_name, abs_weight, path, transforms, allow_repeat, ...).",
    )
    tokenizer_path: str | None = Field(
        None,
        description="sentencepiece tokenizer.model (2B) or cpm vocab.txt (8B). None: train a sentencepiece model from the data into the run directory.",
    )
    tokenizer_vocab_size: int = Field(
        2000, ge=300, description="Vocabulary size when the tokenizer is trained from the data."
    )
    max_length: int = Field(4096, ge=8, description="Tokens per packed sequence.")
    oversize_rule: Literal["segment", "drop", "head"] = Field(
        "segment", description="What to do with a sample longer than max_length."
    )
    sft: bool = Field(False, description="Chat format (<用户>…<AI>…) with loss on the answer only.")
    dataloader_num_threads: int = Field(
        1,
        ge=1,
        description="Reader threads in each loader worker process (shared by the tasks); needs dataloader_num_workers >= 1 when above 1.",
    )
    dataloader_prefetch: int = Field(
        1,
        ge=1,
        description="Chunks of 8 lines each reader thread is asked to prepare ahead, per task (the guide's prefetch_slice).",
    )
    dataloader_prefetch_factor: int = Field(
        1, ge=1, description="Multiplies the read-ahead depth per worker (torch DataLoader's prefetch_factor)."
    )
    dataloader_num_workers: int = Field(
        1, ge=0, description="Loader worker processes per rank (0: lines are made in the trainer process)."
    )
    parallel_load_datastate: int | None = Field(
        None,
        description="Refused: the guide's loader read and merged every rank's data-state file with this many threads; here each rank restores its position from one small file of its own.",
    )

    @field_validator("parallel_load_datastate")
    @classmethod
    def _no_parallel_load(cls, value: int | None) -> int | None:
        if value is not None:
            raise ValueError(
                "does not apply here: the guide's loader loaded and merged every rank's data-state file "
                "with this many threads, while this loader's state is one small file per rank "
                "(checkpoints/<step>/dataset_ckpt/dataset_<rank>.data) that each rank reads alone, so there "
                "is nothing to load in parallel; remove it (train.load_dataloader_ckpt chooses whether the "
                "data position is restored, data.dataloader_num_workers/dataloader_num_threads set the "
                "loader's parallelism)"
            )
        return value

    @model_validator(mode="after")
    def _threads_need_workers(self) -> DataConfig:
        if self.dataloader_num_threads > 1 and self.dataloader_num_workers == 0:
            raise ValueError(
                f"data.dataloader_num_threads={self.dataloader_num_threads} needs data.dataloader_num_workers >= 1: "
                "the reader threads run inside the loader's worker processes; raise dataloader_num_workers "
                "or set dataloader_num_threads: 1"
            )
        return self


class TrainConfig(Section):
    """Every argument of the guide's parameter list, plus the optimiser knobs the FM9G
    shell script hard-coded (seed, clip_grad, weight_decay)."""

    model_unique: str = Field(
        "",
        description="Run name: checkpoints, logs and TensorBoard go under runs/<model_unique>/. Empty: the config file's name.",
    )
    resume_ckpt: str = Field(
        "", description="Step to resume from ('' = the latest checkpoint of this run, if any; 'none' = start fresh)."
    )
    flash: Literal["auto", "cuda", "none"] = Field(
        "auto",
        description="Attention kernel: cuda = flash-attn varlen (needs a GPU and flash-attn), none = torch SDPA, auto = cuda when available.",
    )
    local: bool = Field(
        False,
        description="Kept for compatibility with the guide; the original script's two branches were identical, so it changes nothing.",
    )
    dataloader: Literal["indexed"] = Field("indexed", description="Only the indexed dataloader exists.")
    save: bool = Field(True, description="Write checkpoints every save_iters and at the end.")
    load_grad: bool = Field(True, description="On resume, load optimizer states as well as weights.")
    grad_ckpt_num: int = Field(
        0,
        ge=0,
        description="Optimizer files to map ranks onto (rank % N) when loading; 0 = count the *.rank-<r>.opt files in the checkpoint.",
    )
    exp_group: str = Field("", description="Prefix of the TensorBoard directory (tensorboard/<exp_group><name>).")
    ignore_cuda_oom: bool = Field(
        True, description="Skip a batch that runs out of GPU memory instead of dying (GPU only)."
    )
    tensorboard_all_tasks: bool = Field(True, description="Log Loss/train/<task> for every task.")
    stop_when_end: bool = Field(True, description="Stop at train_iters. False: run until the data is exhausted.")
    only_run_dataloader: bool = Field(
        False, description="Only iterate the data (measure the loader); no forward/backward."
    )
    eps: float | None = Field(None, gt=0, description="RMSNorm epsilon; None: the model config's value.")
    inspect_iters: int = Field(100, ge=0, description="Every N steps log parameter/gradient statistics (0 = never).")
    strict_state_dict: bool = Field(True, description="Loading weights requires exactly matching keys.")
    resume_no_optimze: int = Field(
        0,
        ge=0,
        description="(sic, the guide's spelling) Steps after a resume with lr 0 (cosine) or a re-warmup from 0 (WSD).",
    )
    tp_size: int = Field(1, ge=1, description="Tensor-parallel size; only 1 is supported by the torch backend.")
    async_save: bool = Field(False, description="Write checkpoints in a background thread.")
    batch_size: int = Field(1, ge=1, description="Sequences of max_length packed per step per rank.")
    save_iters: int = Field(500, ge=1, description="Checkpoint every N steps.")
    train_iters: int = Field(10000, ge=1, description="Total steps; also the LR schedule's end.")
    lr: float = Field(1e-2, gt=0, description="Base learning rate (matrices get lr / scale_width under muP).")
    warmup_iters: float = Field(20, ge=0, description="Warmup steps; a value below 1 is a fraction of train_iters.")
    drop_iters: float = Field(0.1, ge=0, description="WSD decay length; a value below 1 is a fraction of train_iters.")
    only_load_model: bool = Field(False, description="With resume_ckpt: load weights only and start at step 0.")
    lr_scheduler: Literal["cosine", "warmupstabledrop", "warmupstableexp"] = Field(
        "cosine", description="LR schedule (case-insensitive)."
    )
    load_dataloader_ckpt: bool = Field(
        True, description="On resume, restore the dataloader position so no sample is seen twice."
    )
    drop_begin: int = Field(
        -1, description="warmupstableexp: step where the exponential decay begins (-1 = after warmup)."
    )
    drop_rate: float = Field(0.5, gt=0, description="warmupstableexp: lr factor per drop_iters steps.")
    use_checkpoint: bool = Field(False, description="Activation (gradient) checkpointing of every layer.")
    seed: int = Field(1234, description="Seed of model init, data order and dropout.")
    clip_grad: float = Field(1.0, gt=0, description="Gradient norm clip.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    log_iters: int = Field(1, ge=1, description="Log metrics every N steps.")
    step_sleep: float = Field(
        0.0, ge=0, description="Seconds to sleep after each step (tests use it to make fault injection land mid-run)."
    )
    max_session_steps: int = Field(
        0,
        ge=0,
        description="Checkpoint and exit (without DONE, like checkpoint-now) after this many steps of one trainer session; 0 = no limit. For time-boxed allocations and resume tests.",
    )
    keep_checkpoints: int = Field(0, ge=0, description="Keep only the newest N complete checkpoints (0 = keep all).")
    peak_tflops: float | None = Field(
        None,
        gt=0,
        description="Peak TFLOP/s of one device for the MFU figure; None: a table of known GPUs (H100/H200/A100/...), and no MFU on CPU.",
    )
    deterministic: bool = Field(
        False,
        description="flash-attn's deterministic backward (slower): on a GPU a resumed run then repeats the uninterrupted one's losses; off, flash-attn accumulates dQ with atomics and the last bits differ.",
    )

    @field_validator("lr_scheduler", mode="before")
    @classmethod
    def _lower_scheduler(cls, value: Any) -> Any:
        # The guide writes "Cosine"; the original trainer compared lower-case strings.
        return value.lower() if isinstance(value, str) else value

    @field_validator("tp_size")
    @classmethod
    def _only_tp1(cls, value: int) -> int:
        if value != 1:
            raise ValueError(
                "tensor parallelism is not implemented; use tp_size: 1 (FSDP2 via model.fsdp shards large models instead)"
            )
        return value


class RendezvousConfig(Section):
    """torchrun rendezvous across the single-node jobs."""

    max_restarts: int = Field(3, ge=0, description="torchrun --max-restarts (a budget per generation).")
    join_timeout: int = Field(600, ge=10, description="Seconds torchrun waits for all nodes to join.")
    endpoint_timeout: int = Field(
        900, ge=1, description="Seconds a worker waits for the master to publish its endpoint."
    )
    keep_alive_interval: int = Field(
        1, ge=1, description="rdzv keep-alive interval (s); small values detect a lost node fast."
    )
    keep_alive_max_attempt: int = Field(3, ge=1, description="Missed keep-alives before a node counts as lost.")
    term_grace: float = Field(3.0, ge=0, description="Seconds between SIGTERM and SIGKILL of a stale torchrun.")
    port: int = Field(
        0, ge=0, le=65535, description="Store port on the master; 0 = any free port (published in endpoint.json)."
    )


class SuperviseConfig(Section):
    """Retry budgets and watchdogs of the supervisor."""

    infra_retries: int = Field(
        10, ge=0, description="Resubmissions for infrastructure failures (NODE_FAIL, PREEMPTED, TIMEOUT, ...)."
    )
    app_retries: int = Field(
        3, ge=0, description="Resubmissions for application failures (non-zero exit, comm errors)."
    )
    replacement_timeout: int = Field(
        600, ge=1, description="Seconds healthy nodes wait for a replacement before a full restart."
    )
    hang_timeout: int = Field(
        900, ge=10, description="Seconds without step progress before the generation is restarted."
    )
    stall_checkpoints: int = Field(
        3, ge=1, description="Stop when this many recoveries in a row did not advance the latest checkpoint."
    )
    exclude_after: int = Field(2, ge=1, description="Exclude a node after this many failures on it.")
    exclude_for: int = Field(3600, ge=1, description="Seconds a node stays excluded.")
    repair_local: bool = Field(
        False,
        description="Repair failed nodes with the local executor too (default: a local node failure stops the run with a clear message).",
    )
    poll_interval: float = Field(
        2.0, gt=0, description="Seconds between squeue polls (backs off to 8x when nothing changes)."
    )
    on_node_loss: Literal["restart", "wait", "shrink"] = Field(
        "restart",
        description=(
            "What the survivors do when a node or rank is lost. restart: every trainer process is started "
            "again from the last checkpoint (torchrun's rendezvous; any backend). wait: the survivors keep "
            "their processes and wait, warm, for the replacement, which gets the state from a peer (the loss "
            "curve equals an uninterrupted run's). shrink: the survivors go on at once with fewer ranks, "
            "each taking over the lost ranks' data slots so the global batch stays the same, and grow back "
            "when the replacement joins. wait and shrink need model.backend: torch (with fsdp, each rank's "
            "shards are copied to a peer every supervise.snapshot_every steps), and host the run's store in "
            "a 1-CPU job of its own."
        ),
    )
    inproc_hang_timeout: float = Field(
        10.0,
        gt=0,
        description="wait/shrink: seconds a rank's heartbeat may stay silent before it is declared hung and killed.",
    )
    snapshot_every: int = Field(
        1,
        ge=1,
        description=(
            "wait/shrink with model.fsdp: every this many steps each rank copies its parameter and Adam "
            "shards to host memory and to a peer rank on the next node, so a lost node's shards survive. "
            "Larger: less traffic per step, more steps retrained after a loss that strikes mid-copy."
        ),
    )
    inproc_join_timeout: float = Field(
        300.0,
        gt=0,
        description=(
            "wait/shrink: seconds one re-forming may take (under wait: the replacement's budget) "
            "before the ranks fall back to a restart from the last checkpoint."
        ),
    )
    where: Literal["login", "job"] = Field(
        "login",
        description="Where the supervisor runs: 'login' (the launching shell, or --detach) or 'job' (a 1-node CPU Slurm job that hands over to a successor job before its walltime; Slurm executor only).",
    )
    job_partition: str | None = Field(
        None, description="Partition of the supervisor job (where: job); None: cluster.partition."
    )
    job_account: str | None = Field(
        None, description="--account of the supervisor job (where: job); None: cluster.account."
    )
    job_time: str = Field(
        "4:00:00", description="Walltime of one supervisor job (where: job); it hands over to a successor before it."
    )
    job_cpus: int = Field(1, ge=1, description="--cpus-per-task of the supervisor job (where: job).")
    job_lead: int = Field(
        60,
        ge=10,
        description="Seconds before the supervisor job's walltime at which it hands over (--signal=B:USR1@lead).",
    )
    job_restarts: int = Field(
        20,
        ge=0,
        description="Supervisor jobs that may end without finishing (killed, crashed) in a row before no guard job follows (where: job).",
    )


class PipelineConfig(Section):
    """Stages run after training (fm9g.orchestrator.inference.pipeline), in the order
    convert -> infer -> serve, each only after the one before succeeded (afterok)."""

    after_train: list[Literal["convert", "infer", "serve"]] = Field(
        default_factory=list,
        description="Stages to run once training completes; infer and serve convert the latest checkpoint first.",
    )
    eval_prompts: str | None = Field(
        None,
        description='jsonl prompt file ({"prompt": ...} per line) for the infer stage; required when after_train has infer.',
    )
    eval_output: str | None = Field(
        None, description="Where the infer stage writes its completions; default runs/<name>/infer/infer.jsonl."
    )
    eval_temperature: float = Field(0.0, ge=0, description="Sampling temperature of the eval prompts (0 = greedy).")
    eval_top_p: float = Field(0.95, gt=0, le=1, description="Nucleus sampling mass of the eval prompts.")
    eval_max_tokens: int = Field(128, ge=1, description="New tokens per eval completion.")
    eval_seed: int = Field(0, description="Sampling seed of the eval prompts (prompt i uses seed + i).")
    engine: Literal["auto", "vllm", "transformers"] = Field(
        "auto", description="auto: vLLM on GPU nodes that have it, else transformers."
    )
    serve_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="Port of the serve stage's server; 0 = any free port (published in serve/endpoint.json).",
    )
    trust_remote_code: bool = Field(
        False,
        description="Let infer and serve run a custom architecture's own code (config.json auto_map); "
        "the alternative is `fm9g-launch convert` to a native architecture.",
    )
    serve_engine_args: list[str] = Field(
        default_factory=list,
        description="vLLM engine arguments of the serve stage as KEY=VALUE, e.g. max-model-len=4096.",
    )

    @model_validator(mode="after")
    def _prompts_for_infer(self) -> PipelineConfig:
        if "infer" in self.after_train and not self.eval_prompts:
            raise ValueError(
                "pipeline.after_train has infer but pipeline.eval_prompts is not set: point it at a jsonl prompt file (see examples/tiny/prompts.jsonl)"
            )
        return self


class RunConfig(Section):
    """A whole run."""

    run_root: str = Field("runs", description="Directory that holds runs/<name>/.")
    executor: Literal["auto", "local", "slurm"] = Field(
        "auto",
        description="auto: slurm where `sbatch` is on the PATH and the controller answers `scontrol ping`, "
        "else local (chosen once, at launch; the run's config.yaml names the result); "
        "local: processes on this machine; slurm: sbatch jobs.",
    )
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    rendezvous: RendezvousConfig = Field(default_factory=RendezvousConfig)
    supervise: SuperviseConfig = Field(default_factory=SuperviseConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)

    @model_validator(mode="after")
    def _warmup_fits(self) -> RunConfig:
        warmup = self.train.warmup_iters
        if warmup >= 1 and warmup > self.train.train_iters:
            raise ValueError(
                f"train.warmup_iters ({warmup:g}) is longer than train.train_iters ({self.train.train_iters}); lower it or give a fraction below 1"
            )
        return self

    def run_name(self, source: Path | None) -> str:
        """model_unique, else the config file's stem."""
        return self.train.model_unique or (source.stem if source else "run")


# ---------------------------------------------------------------------------- loading

# Fields whose relative paths are resolved against the config file's directory.
_PATH_FIELDS = (
    ("data", "dataset_config"),
    ("data", "tokenizer_path"),
    ("model", "config"),
    ("pipeline", "eval_prompts"),
    ("pipeline", "eval_output"),
)


def _all_field_paths(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[str]:
    paths = []
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            paths.extend(_all_field_paths(annotation, f"{prefix}{name}."))
        else:
            paths.append(prefix + name)
    return paths


def suggest(path: str) -> str | None:
    """The closest valid dotted field name to `path`, across all sections."""
    candidates = _all_field_paths()
    leaf = path.rsplit(".", 1)[-1]
    # Exact leaf in another section first (train.max_length -> data.max_length).
    same_leaf = [c for c in candidates if c.rsplit(".", 1)[-1] == leaf]
    if same_leaf:
        return same_leaf[0]
    match = difflib.get_close_matches(path, candidates, n=1, cutoff=0.6)
    if match:
        return match[0]
    leaves = {c.rsplit(".", 1)[-1]: c for c in candidates}
    match = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.6)
    return leaves[match[0]] if match else None


def _override_for(loc: str, overrides: dict[str, str]) -> tuple[str | None, list[str]]:
    """(the --set item that wrote exactly `loc` or a section above it, --set items below `loc`)."""
    exact = None
    for key, item in overrides.items():
        if loc == key or loc.startswith(key + "."):
            exact = item
    inside = [item for key, item in overrides.items() if not loc or key.startswith(loc + ".")]
    return exact, inside


def _describe(error: dict[str, Any]) -> str:
    loc = ".".join(str(part) for part in error["loc"])
    kind = error["type"]
    if kind == "extra_forbidden":
        hint = suggest(loc)
        fix = (
            f"did you mean '{hint}'?"
            if hint
            else "remove it (every field, with its default and description, is defined in fm9g/rundir/config.py; examples/ has working recipes)"
        )
        return f"unknown key '{loc}': {fix}"
    got = error.get("input")
    shown = json.dumps(got, ensure_ascii=False, default=str) if not isinstance(got, dict) else "a mapping"
    if kind == "missing":
        return f"'{loc}' is required"
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"'{loc}': {message} (got {shown})" if loc else message


def validate(raw: dict[str, Any], source: str, overrides: list[str] | None = None) -> RunConfig:
    """Validate a raw mapping; errors become one ConfigError naming `source` and each field.

    A field written by `--set KEY=VALUE` (one of `overrides`) is blamed on that option,
    not on the file: the file may not even mention the field."""
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        by_key = {".".join(parse_override(item)[0]): item for item in overrides or []}
        lines, from_file = [], False
        for err in exc.errors():
            loc = ".".join(str(part) for part in err["loc"])
            exact, inside = _override_for(loc, by_key)
            if exact is not None:
                lines.append(f"  - --set {exact}: {_describe(err)}; fix or drop this --set option")
            elif inside:
                # A section- or run-level check (warmup vs train_iters) that a --set value may have tipped.
                from_file = True
                lines.append(f"  - {_describe(err)} (with --set {', --set '.join(inside)})")
            else:
                from_file = True
                lines.append(f"  - {_describe(err)}")
        header = f"{source}: invalid config" if from_file or not overrides else "invalid --set override"
        raise ConfigError(header + "\n" + "\n".join(lines)) from None


def parse_override(item: str) -> tuple[list[str], Any]:
    """'a.b=c' -> (['a', 'b'], value), the value parsed as a YAML scalar ('3' -> 3, 'true' -> True)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.lr=3e-4")
    key, _, text = item.partition("=")
    key = key.strip()
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
        raise ConfigError(f"--set {item!r}: '{key}' is not a dotted field name like train.lr")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    # YAML reads 1e-4 as a string; let pydantic see a float.
    if isinstance(value, str) and re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", value):
        value = float(value)
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        keys, value = parse_override(item)
        node = raw
        for key in keys[:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: '{key}' is a value, not a section")
            node = child
        node[keys[-1]] = value
    return raw


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        # Only the mapping's own keys count: a key it also takes from a `<<` merge is an
        # intended override, so the check runs before flatten_mapping mixes them.
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise DuplicateKeyError(str(key), line, seen[key])
                seen[key] = line
            except TypeError:
                continue  # an unhashable key: construct_mapping below reports it
        return super().construct_mapping(node, deep=deep)


def load_yaml_strict(text: str) -> Any:
    """yaml.safe_load, but a duplicate mapping key raises DuplicateKeyError with its line."""
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass


_JSON_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[{}\[\]:]')


def _json_duplicate_line(text: str, key: str) -> tuple[int, int]:
    """(line of the second `key` in one JSON object, line of the first); (0, 0) if not found.

    Runs only on text json.loads accepted, so a token scan (strings, brackets, colons) suffices."""
    stack: list[dict[str, int] | None] = []
    previous: re.Match[str] | None = None
    for match in _JSON_TOKEN.finditer(text):
        token = match.group()
        if token == "{":
            stack.append({})
        elif token == "[":
            stack.append(None)
        elif token in "]}":
            if stack:
                stack.pop()
        elif (
            token == ":"
            and previous is not None
            and previous.group().startswith('"')
            and stack
            and stack[-1] is not None
        ):
            name = json.loads(previous.group())
            line = text.count("\n", 0, previous.start()) + 1
            keys = stack[-1]
            if name == key and name in keys:
                return line, keys[name]
            keys.setdefault(name, line)
        previous = match
    return 0, 0


def load_json_strict(text: str) -> Any:
    """json.loads, but a key repeated in one object raises DuplicateKeyError with its line."""

    def pairs_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for key, value in pairs:
            if key in result:
                raise DuplicateKeyError(key, 0)
            result[key] = value
        return result

    try:
        return json.loads(text, object_pairs_hook=pairs_hook)
    except DuplicateKeyError as exc:
        line, first = _json_duplicate_line(text, exc.key)
        raise DuplicateKeyError(exc.key, line, first) from None


def read_file(path: Path) -> dict[str, Any]:
    """Parse a YAML or JSON config file into a mapping, with the line of a syntax error."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found; pass an existing file to --config (see examples/)") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        if path.suffix == ".json":
            data = load_json_strict(text)
        else:
            data = load_yaml_strict(text)
    except DuplicateKeyError as exc:
        where = f"{path}:{exc.line}" if exc.line else str(path)
        raise ConfigError(f"{where}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of sections (cluster, model, data, train, ...), not {type(data).__name__}"
        )
    return data


def _resolve_paths(raw: dict[str, Any], base: Path) -> None:
    for section, field in _PATH_FIELDS:
        node = raw.get(section)
        if not isinstance(node, dict):
            continue
        value = node.get(field)
        if not isinstance(value, str) or not value or os.path.isabs(value):
            continue
        if section == "model" and not (value.endswith(".json") or "/" in value):
            continue  # a named model config, not a path
        node[field] = str((base / value).resolve())


def merge_layers(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """`top` over `base`, section by section (a fresh dict: neither input changes).

    Mappings merge key by key; anything else in `top` (a value, a list) replaces the
    value in `base` whole, so a run config's `cluster.setup` list replaces the site's."""
    merged = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_layers(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load(
    path: str | Path | None, overrides: list[str] | None = None, base: dict[str, Any] | None = None
) -> tuple[RunConfig, str]:
    """Load, override and validate a config; returns (config, run name).

    `base` is a layer beneath the file (the site defaults, fm9g.rundir.site), already
    validated by its caller: precedence is default < base < file < `overrides`."""
    source = Path(path) if path else None
    raw = read_file(source) if source else {}
    if source:
        _resolve_paths(raw, source.resolve().parent)
    if base:
        raw = merge_layers(base, raw)
    raw = apply_overrides(raw, overrides or [])
    if source is None:
        _resolve_paths(raw, Path.cwd())
    config = validate(raw, str(source) if source else "--set", overrides)
    return config, config.run_name(source)


def load_resolved(path: str | Path) -> RunConfig:
    """Read `runs/<name>/config.yaml`, the already resolved config of a run."""
    source = Path(path)
    return validate(read_file(source), str(source))


def dump(config: RunConfig) -> str:
    """YAML text of the fully resolved config (every default spelled out)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
