"""Render job scripts from the Jinja2 templates: plan in, script text out, no I/O
besides reading the packaged templates.

Two kinds of value reach a script and each has its own guard:
- shell values (paths, names, env) go through `shlex.quote`, so a run called
  `x"; rm -rf ~; $(reboot)` is one harmless word;
- `#SBATCH` values are parsed by sbatch itself, not by bash, and sbatch splits on
  whitespace and strips quotes, so a value with whitespace, quotes or `#` is refused
  with a ConfigError instead of being half-quoted.
"""

from __future__ import annotations

import hashlib
import re
import shlex
from dataclasses import dataclass, field
from importlib import resources
from typing import Literal

import jinja2

from fm9g.rundir.config import ClusterConfig, ConfigError
from fm9g.rundir.protocol import job_name, job_tag, slug

Role = Literal["master", "worker"]

_SBATCH_SAFE = re.compile(r"^[A-Za-z0-9_.,:=@%/+\-\[\]*()]*$")


def sbatch_value(value: object, what: str) -> str:
    """A value for an #SBATCH line, refused when sbatch's parser could split it."""
    text = str(value)
    if not _SBATCH_SAFE.match(text):
        raise ConfigError(f"{what}={text!r} cannot go on an #SBATCH line (whitespace, quotes or '#' are not allowed there); fix the value in the config")
    return text


def sbatch_flags(cluster: ClusterConfig, *, name: str, comment: str) -> list[str]:
    """The #SBATCH options of one node job, sorted (stable golden files)."""
    flags = {
        "--job-name": name,
        "--comment": comment,
        "--nodes": "1",
        "--ntasks-per-node": "1",
        "--open-mode": "append",  # a requeue must not truncate the log
        # --signal=B: to the batch shell only; torchrun itself dies on USR1 and kills its
        # workers 30 s after a SIGTERM, so the agent must be the one that hears it.
        "--signal": f"B:USR1@{cluster.signal_lead}",
    }
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
    lines = [f"{key}={sbatch_value(value, 'cluster.' + key.lstrip('-').replace('-', '_'))}"
             for key, value in flags.items()]
    # One owner of requeue per job: Slurm (--requeue) or the supervisor (--no-requeue).
    lines.append("--requeue" if cluster.requeue else "--no-requeue")
    for extra in cluster.extra_sbatch:
        lines.append(sbatch_value(extra.strip(), "cluster.extra_sbatch"))
    return sorted(lines)


@dataclass(frozen=True)
class NodeJob:
    """Everything one node job's script needs."""

    run_name: str
    run_dir: str
    stage: str
    role: Role
    node_rank: int
    attempt: int
    generation: int
    python: str
    config_hash: str
    env: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    @property
    def tag(self) -> str:
        return job_tag(self.run_name, self.stage, self.role, self.node_rank, self.attempt)

    @property
    def name(self) -> str:
        return job_name(self.run_name, self.stage, self.role, self.node_rank)

    @property
    def script_name(self) -> str:
        return f"{self.stage}-{self.role}{self.node_rank}-a{self.attempt}.sbatch"


def _environment() -> jinja2.Environment:
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


def render_node(job: NodeJob, cluster: ClusterConfig) -> str:
    """Script text of one master or worker node job."""
    for key, _ in job.env:
        if not _ENV_NAME.match(key):
            raise ConfigError(f"environment variable name {key!r} is not valid in a shell")
    template = _environment().get_template(f"{job.role}.sbatch.j2")
    return template.render(
        run_name=job.run_name,
        run_dir=job.run_dir,
        stage=job.stage,
        role=job.role,
        node_rank=job.node_rank,
        attempt=job.attempt,
        generation=job.generation,
        python=job.python,
        config_hash=job.config_hash,
        sbatch_flags=sbatch_flags(cluster, name=job.name, comment=job.tag),
        setup=cluster.setup,
        env=list(job.env),
    )


def render_template(name: str, **values: object) -> str:
    """Render any other packaged template (index, convert, infer, serve) strictly."""
    return _environment().get_template(name).render(**values)


def config_hash(config_text: str) -> str:
    return hashlib.sha256(config_text.encode("utf-8")).hexdigest()[:12]
