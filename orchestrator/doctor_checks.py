"""The judging half of `fm9g-launch doctor`: what the cluster and the probe jobs
reported -> one `Check` each (pass / warn / fail, what was found, the fix), and the
report as a Rich table and as JSON.  Pure: no Slurm, no files; `doctor.py` acts.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from fm9g.orchestrator.slurm import preflight
from fm9g.orchestrator.slurm.parse import Partition

if TYPE_CHECKING:
    from rich.table import Table

    from fm9g.rundir.config import RunConfig

Status = Literal["pass", "warn", "fail"]
CHECK_NAMES = ("partition", "gpu_gres", "run_dir", "environment", "port")

TIMED_OUT_PENDING = "timed out waiting for a node: the partition may be busy"


@dataclass(frozen=True)
class Check:
    """One row of the doctor's table."""

    name: str
    status: Status
    found: str
    fix: str = ""
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class JobOutcome:
    """How a probe job went, as the doctor saw it from the login node."""

    job_id: int | None
    state: str  # a JobState value, "NOT_SUBMITTED", or "TIMED_OUT"
    node: str = ""
    log: str = ""
    error: str = ""  # sbatch's refusal, or why it was not submitted
    started: bool = False

    @property
    def timed_out(self) -> bool:
        return self.state == "TIMED_OUT"


@dataclass(frozen=True)
class SetupFailure:
    """A setup line that failed on a compute node (from the job's ERR trap)."""

    field: str  # "cluster.setup[2]" or "cluster.train_env"
    line: str
    status: int
    host: str


@dataclass(frozen=True)
class DoctorReport:
    """Every check, and where the doctor kept its jobs' files."""

    checks: tuple[Check, ...]
    folder: str = ""
    jobs: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """No check failed (warnings allowed)."""
        return all(check.status != "fail" for check in self.checks)

    def check(self, name: str) -> Check:
        return next(check for check in self.checks if check.name == name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "folder": self.folder,
            "jobs": dict(self.jobs),
            "checks": [asdict(check) for check in self.checks],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


_STYLE = {"pass": "green", "warn": "yellow", "fail": "bold red"}


def render_table(report: DoctorReport) -> Table:
    """The report as a Rich table: check, status, what was found, the fix."""
    from rich.table import Table

    table = Table(title="fm9g-launch doctor", show_lines=True)
    table.add_column("check", no_wrap=True)
    table.add_column("status", no_wrap=True)
    # fold, never cut: a path or a setup line cut with "…" is useless in a fix
    table.add_column("found", overflow="fold")
    table.add_column("fix", overflow="fold")
    for check in report.checks:
        table.add_row(check.name, f"[{_STYLE[check.status]}]{check.status}[/]", check.found, check.fix)
    return table


# ------------------------------------------------------------------------ Slurm facts


class _Known:
    """A PartitionSource over an `sinfo` already read, so preflight does not call it again."""

    def __init__(self, partitions: dict[str, Partition]) -> None:
        self._partitions = partitions

    def partitions(self) -> dict[str, Partition]:
        return self._partitions


def check_partition(config: RunConfig, partitions: dict[str, Partition]) -> tuple[Check, Partition | None]:
    """The partition exists and has cluster.nodes nodes (preflight's own rules)."""
    cluster = config.cluster
    try:
        report = preflight.check(cluster.partition, cluster.nodes, 0, [], _Known(partitions), exclude=cluster.exclude)
    except preflight.PreflightError as exc:
        chosen = partitions.get(cluster.partition) if cluster.partition else None
        found = "; ".join(problem.split(";")[0] for problem in exc.problems)
        fix = "; ".join(problem.split(";", 1)[1].strip() for problem in exc.problems if ";" in problem)
        return Check("partition", "fail", found, fix or "see `sinfo -s`"), chosen
    chosen = partitions[report.partition]
    found = (
        f"{chosen.name}: {chosen.node_count} nodes ({chosen.usable_node_count} usable), "
        f"the run asks for {cluster.nodes}"
    )
    if report.warnings:
        return Check("partition", "warn", f"{found}; {'; '.join(report.warnings)}"), chosen
    return Check("partition", "pass", found), chosen


def check_gres(config: RunConfig, partition: Partition | None) -> Check:
    """GPUs per node in the partition against cluster.gpus_per_node."""
    wanted = config.cluster.gpus_per_node
    if partition is None:
        return Check("gpu_gres", "fail", "not checked: the partition check failed", "fix the partition first")
    have = max((group.gpus for group in partition.groups), default=0)
    found = f"{partition.name}: {'none' if have == 0 else f'up to {have} GPUs per node'}"
    if wanted == 0:
        return Check("gpu_gres", "pass", f"{found}; the run asks for none")
    if have == 0:
        return Check(
            "gpu_gres",
            "warn",
            f"{found}; the run asks for {wanted} per node",
            "choose a partition with GPU nodes (cluster.partition), or set cluster.gpus_per_node: 0",
        )
    if have < wanted:
        return Check(
            "gpu_gres",
            "fail",
            f"{found}; the run asks for {wanted} per node",
            f"set cluster.gpus_per_node to at most {have}",
        )
    return Check("gpu_gres", "pass", f"{found}; the run asks for {wanted}")


# ------------------------------------------------------------------------ probe jobs


def job_problem(outcome: JobOutcome, what: str) -> tuple[str, str] | None:
    """(found, fix) when the job never gave its check a chance; None when it did."""
    if outcome.state == "NOT_SUBMITTED":
        return f"not run: {outcome.error}", "fix the problem above, then run the doctor again"
    if outcome.timed_out and not outcome.started:
        return (
            f"{TIMED_OUT_PENDING} (job {outcome.job_id} never started)",
            "run the doctor when nodes are free, or raise --timeout; `squeue --me` shows why it waits",
        )
    if outcome.timed_out:
        return (
            f"timed out: job {outcome.job_id} started on {outcome.node or '?'} but {what} did not finish",
            f"read the job's log {outcome.log}; raise --timeout if the shared filesystem is slow",
        )
    return None


def check_run_dir(outcome: JobOutcome, token: str, read_back: str | None, runs_root: str) -> Check:
    """The token a compute node wrote under the runs root is visible here."""
    problem = job_problem(outcome, "writing the token")
    if read_back is not None and read_back.strip() == token:
        return Check("run_dir", "pass", f"written on {outcome.node or 'a compute node'}, read back here: {runs_root}")
    if problem is not None:
        return Check("run_dir", "fail", problem[0], problem[1])
    if read_back is not None:
        found = f"the file a compute node wrote under {runs_root} holds something else"
    else:
        found = f"job {outcome.job_id} on {outcome.node or '?'} ended ({outcome.state}) but its file under {runs_root} is not visible here"
    return Check(
        "run_dir",
        "fail",
        found,
        "set run_root to a directory on a filesystem the compute nodes share with this node (not /tmp or a local disk)",
    )


def map_setup_failures(raw: str, first_line: int, setup: Sequence[str], train_env: str | None) -> list[SetupFailure]:
    """The ERR trap's records (`LINENO\\tstatus\\thost\\tcommand`) -> the config entries that failed.

    `first_line` is the script line of the first setup entry; an entry may span lines."""
    spans: list[tuple[int, int, str, str]] = []
    line_no = first_line
    for index, entry in enumerate(setup):
        height = max(1, len(entry.splitlines()))
        spans.append((line_no, line_no + height - 1, f"cluster.setup[{index}]", entry))
        line_no += height
    if train_env:
        spans.append((line_no, line_no, "cluster.train_env", f"source {train_env}/bin/activate"))
    failures = []
    for record in raw.splitlines():
        parts = record.split("\t", 3)
        if len(parts) < 4 or not parts[0].isdigit():
            continue
        number, status, host, command = int(parts[0]), parts[1], parts[2], parts[3]
        where = next((span for span in spans if span[0] <= number <= span[1]), None)
        if where is None:  # inside a function a setup line defined: name the command
            failures.append(SetupFailure("cluster.setup", command, int(status or 1), host))
        else:
            failures.append(SetupFailure(where[2], where[3], int(status or 1), host))
    return failures


def required_packages(config: RunConfig) -> dict[str, str]:
    """Optional GPU packages this config cannot run without -> the field that needs it."""
    needs: dict[str, str] = {}
    if config.model.backend == "bmtrain":
        needs["bmtrain"] = "model.backend: bmtrain"
    if config.train.flash == "cuda":
        needs["flash_attn"] = "train.flash: cuda"
    if config.pipeline.engine == "vllm" and config.pipeline.after_train:
        needs["vllm"] = "pipeline.engine: vllm"
    return needs


def check_environment(
    config: RunConfig,
    outcome: JobOutcome,
    record: Mapping[str, Any] | None,
    failures: Sequence[SetupFailure],
    python: str,
    log_tail: str = "",
) -> Check:
    """The setup lines ran, and their Python imports torch and fm9g on a compute node."""
    where = f"on {outcome.node}" if outcome.node else "on the compute node"
    if failures:
        first = failures[0]
        said = f": {log_tail}" if log_tail else ""
        return Check(
            "environment",
            "fail",
            f"{first.field} `{first.line}` failed (exit {first.status}) on {first.host}{said}",
            f"fix or remove {first.field} (`{first.line}`): it fails on the compute nodes, where every "
            "training job runs it first",
            {"setup_failures": [asdict(failure) for failure in failures], "probe": dict(record or {})},
        )
    if record is None:
        problem = job_problem(outcome, "the environment probe")
        if problem is not None:
            return Check("environment", "fail", problem[0], problem[1])
        said = f" ({log_tail})" if log_tail else ""
        return Check(
            "environment",
            "fail",
            f"{python} did not run {where}{said}",
            "set cluster.python (or cluster.train_env) to an interpreter the compute nodes have, or add the "
            f"cluster.setup line that puts it on the PATH; the job log is {outcome.log}",
        )
    torch = record.get("torch", {})
    packages = record.get("packages", {})
    fm9g = record.get("fm9g", {})
    parts = [f"python {record.get('python_version', '?')} ({record.get('python', python)})"]
    if torch.get("present"):
        cuda = f"CUDA {torch['cuda']}" if torch.get("cuda") else "CPU build"
        nccl = f", NCCL {torch['nccl']}" if torch.get("nccl") else ""
        parts.append(f"torch {torch.get('version')} ({cuda}{nccl})")
    present = [name for name, info in sorted(packages.items()) if info.get("present")]
    absent = [name for name, info in sorted(packages.items()) if not info.get("present")]
    parts.append(f"present: {', '.join(present) or 'none'}; absent: {', '.join(absent) or 'none'}")
    found = f"{where}: " + "; ".join(parts)
    details = {"probe": dict(record)}
    problems: list[tuple[str, str]] = []
    if not torch.get("present"):
        problems.append((f"torch does not import ({torch.get('error', '?')})", "install torch in that environment"))
    elif config.cluster.gpus_per_node > 0 and not torch.get("cuda"):
        problems.append(("torch is a CPU build but the run asks for GPUs", "install a CUDA build of torch there"))
    if not fm9g.get("ok"):
        problems.append(
            (f"fm9g does not import ({fm9g.get('error', '?')})", "`pip install -e .` fm9g-launch into that environment")
        )
    for name, why in required_packages(config).items():
        if not packages.get(name, {}).get("present"):
            problems.append((f"{name} is absent but {why} needs it", f"install {name} there (`make gpu-train-env`)"))
    if problems:
        setup = "cluster.train_env" if config.cluster.train_env else "cluster.setup / cluster.python"
        return Check(
            "environment",
            "fail",
            found + "; " + "; ".join(problem for problem, _ in problems),
            "; ".join(fix for _, fix in problems) + f" (the environment {setup} selects)",
            details,
        )
    return Check("environment", "pass", found, "", details)


def check_port(
    outcome: JobOutcome,
    listener: Mapping[str, Any] | None,
    connector: Mapping[str, Any] | None,
    port: int,
    connect_timeout: float,
) -> Check:
    """A TCP connection from one compute node to a port another listens on."""
    if listener and connector and connector.get("connected"):
        return Check(
            "port",
            "pass",
            f"{connector['host']} connected to {listener['host']}:{listener['port']}",
            details={"listener": dict(listener), "connector": dict(connector)},
        )
    details = {"listener": dict(listener or {}), "connector": dict(connector or {})}
    if listener and listener.get("error") and not listener.get("port"):
        return Check(
            "port",
            "fail",
            f"{listener['host']}: {listener['error']}",
            "set rendezvous.port to a free port (0: any free port)",
            details,
        )
    if listener and connector:
        target = f"{listener['host']}:{listener['port']}"
        return Check(
            "port",
            "fail",
            f"{connector['host']} could not connect to {target} within {connect_timeout:g}s "
            f"({connector.get('error', '?')})",
            f"open TCP port {listener['port']} from {connector['host']} to {listener['host']} (a firewall drops "
            "it): every node connects to the rendezvous store on the master's rendezvous.port; ask the admins "
            "which ports are open between compute nodes and set rendezvous.port to one",
            details,
        )
    problem = job_problem(outcome, "the port probe")
    if problem is not None:
        return Check("port", "fail", problem[0], problem[1], details)
    return Check(
        "port",
        "fail",
        f"job {outcome.job_id} ended ({outcome.state}) without both ends reporting",
        f"read the job's log {outcome.log}",
        details,
    )
