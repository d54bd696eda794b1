"""Render job scripts from the Jinja2 templates: a JobSpec in, script text out, no I/O
besides reading the packaged templates.

Two kinds of value reach a script and each has its own guard:
- shell values (paths, names, env) go through `shlex.quote`, so a run called
  `x"; rm -rf ~; $(reboot)` is one harmless word;
- `#SBATCH` values are parsed by sbatch itself, not by bash, and sbatch splits on
  whitespace and strips quotes, so a value with whitespace, quotes or `#` is refused
  with a ConfigError instead of being half-quoted.
"""

from __future__ import annotations

import functools
import hashlib
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources

import jinja2

from fm9g.rundir.config import ClusterConfig, ConfigError
from fm9g.rundir.protocol import job_name, job_tag

_SBATCH_SAFE = re.compile(r"^[A-Za-z0-9_.,:=@%/+\-\[\]*()]*$")


def sbatch_value(value: object, what: str) -> str:
    """A value for an #SBATCH line, refused when sbatch's parser could split it."""
    text = str(value)
    if not _SBATCH_SAFE.match(text):
        raise ConfigError(
            f"{what}={text!r} cannot go on an #SBATCH line (whitespace, quotes or '#' are not allowed there); fix the value in the config"
        )
    return text


def sbatch_flags(cluster: ClusterConfig, *, name: str, comment: str, signal: bool = True, nodes: int = 1) -> list[str]:
    """The #SBATCH options of one job, sorted (stable golden files)."""
    flags = {
        "--job-name": name,
        "--comment": comment,
        "--nodes": str(nodes),
        "--ntasks-per-node": "1",
        "--open-mode": "append",  # a requeue must not truncate the log
        # --signal=B: to the batch shell only; torchrun itself dies on USR1 and kills its
        # workers 30 s after a SIGTERM, so the agent must be the one that hears it.  In an
        # allocation of several nodes the agents are srun steps: the signal goes to the steps.
        "--signal": f"B:USR1@{cluster.signal_lead}" if nodes == 1 else f"USR1@{cluster.signal_lead}",
    }
    if not signal:
        del flags["--signal"]
    if nodes > 1:
        flags["--no-kill"] = ""  # one node failing must not end the others
    optional = {
        "--partition": cluster.partition,
        "--account": cluster.account,
        "--qos": cluster.qos,
        "--constraint": cluster.constraint,
        "--time": cluster.time,
        "--cpus-per-task": cluster.cpus_per_task,
        "--mem": cluster.mem,
        "--exclude": ",".join(cluster.exclude) if cluster.exclude else None,
        "--gres": f"gpu:{cluster.gpus_per_node}" if cluster.gpus_per_node else None,
    }
    for key, value in optional.items():
        if value is not None:
            flags[key] = str(value)
    lines = [
        f"{key}={sbatch_value(value, 'cluster.' + key.lstrip('-').replace('-', '_'))}" if value else key
        for key, value in flags.items()
    ]
    # One owner of requeue per job: Slurm (--requeue) or the supervisor (--no-requeue).
    lines.append("--requeue" if cluster.requeue else "--no-requeue")
    for extra in cluster.extra_sbatch:
        lines.append(sbatch_value(extra.strip(), "cluster.extra_sbatch"))
    return sorted(lines)


@dataclass(frozen=True)
class JobSpec:
    """One job of a plan: its template and the values only it has.  Pure data.

    Everything that changes between a dry run and the real submission (afterok job ids,
    the array size, the log path) goes on sbatch's command line, never into the
    script, so the script a dry run writes is the one a real run submits."""

    stage: str  # "train", "index:wiki", "tokenizer", "convert", "infer", "serve"
    role: str  # master, worker, shard, merge, tokenizer, convert, infer, serve
    template: str  # a file under templates/
    node_rank: int = 0
    generation: int = 0
    values: dict[str, object] = field(default_factory=dict)  # template values beyond the common ones
    env: tuple[tuple[str, str], ...] = ()
    gpus: bool = True  # False: index and tokenizer jobs ask for no GPU
    signal: bool = True  # False: no --signal (jobs with no checkpoint to take)
    array: int | None = None  # array tasks (index shards); given to sbatch as --array
    nodes: int = 1  # nodes in the allocation: > 1 only for the training stage's `together` job
    # cluster fields this job sets for itself, over the run's (the store job: 1 CPU, a little memory)
    resources: tuple[tuple[str, object], ...] = ()

    def tag(self, run_name: str, attempt: int) -> str:
        return job_tag(run_name, self.stage, self.role, self.node_rank, attempt)

    def name(self, run_name: str) -> str:
        return job_name(run_name, self.stage.replace(":", "-"), self.role, self.node_rank)

    @property
    def _prefix(self) -> str:
        stage = self.stage.replace(":", "-")
        return stage if self.role == self.stage else f"{stage}-{self.role}{self.node_rank}"

    def script_name(self, attempt: int) -> str:
        return f"{self._prefix}-a{attempt}.sbatch"

    def log_name(self, attempt: int) -> str:
        if self.role in ("master", "worker"):
            return f"{self.role}{self.node_rank}-a{attempt}.out"
        return f"{self._prefix}-a{attempt}.out"


@dataclass(frozen=True)
class ScriptRenderer:
    """Renders any JobSpec of one run: the values every script shares, bound once."""

    run_name: str
    run_dir: str
    cluster: ClusterConfig
    python: str
    config_hash: str

    def render(self, spec: JobSpec, attempt: int, cluster: ClusterConfig | None = None) -> str:
        """Script text of `spec`'s attempt; `cluster` overrides the run's (live node exclusions)."""
        cluster = cluster or self.cluster
        if not spec.gpus:
            cluster = cluster.model_copy(update={"gpus_per_node": 0})
        if spec.resources:
            cluster = cluster.model_copy(update=dict(spec.resources))
        for key, _ in spec.env:
            if not _ENV_NAME.match(key):
                raise ConfigError(f"environment variable name {key!r} is not valid in a shell")
        flags = sbatch_flags(
            cluster,
            name=spec.name(self.run_name),
            comment=spec.tag(self.run_name, attempt),
            signal=spec.signal,
            nodes=spec.nodes,
        )
        return render_template(spec.template)(
            run_name=self.run_name,
            run_dir=self.run_dir,
            stage=spec.stage,
            role=spec.role,
            node_rank=spec.node_rank,
            attempt=attempt,
            generation=spec.generation,
            python=self.python,
            config_hash=self.config_hash,
            sbatch_flags=flags,
            setup=cluster.setup,
            # The GPU environments (issue 17): train jobs and infer/serve jobs each activate their own.
            train_env=cluster.train_env,
            serve_env=cluster.serve_env,
            env=list(spec.env),
            gpus_per_node=cluster.gpus_per_node,
            **spec.values,
        )


@functools.cache
def render_template(name: str) -> Callable[..., str]:
    """The render function of one of the project's templates (strict, `q` quotes)."""
    return _environment().get_template(name).render


def _environment() -> jinja2.Environment:
    """One strict environment per process (templates compile once)."""
    env = jinja2.Environment(
        loader=jinja2.FunctionLoader(_load_template),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
    )
    env.filters["q"] = lambda value: shlex.quote(str(value))
    return env


def _load_template(name: str) -> str:
    return resources.files("fm9g.templates").joinpath(name).read_text(encoding="utf-8")


_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def config_hash(config_text: str) -> str:
    """The short hash each script's header carries, of the run's config.yaml text."""
    return hashlib.sha256(config_text.encode("utf-8")).hexdigest()[:12]
