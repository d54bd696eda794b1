"""Checks run before anything is queued: is what the run asks for something this
cluster can ever give?  Each problem names its fix; nothing is submitted.

These exist because Slurm 22.05 accepts jobs it can never run: a job asking for more
nodes than its partition has is queued and pends forever (Reason=PartitionNodeLimit),
and so a four-node run would wait for a fourth node that does not exist.  Other
mistakes sbatch does refuse, but only one job at a time, after some jobs of the
run may already be queued.

The checks read `sinfo` once (through `SlurmClient.partitions`) and the filesystem.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from fm9g.orchestrator.slurm.parse import Partition, expand_hostlist

if TYPE_CHECKING:
    from fm9g.rundir.config import RunConfig


class PreflightError(RuntimeError):
    """The run cannot work on this cluster as configured; `problems` lists each fix."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = tuple(problems)
        if len(self.problems) == 1:
            message = f"preflight: {self.problems[0]}"
        else:
            message = f"preflight found {len(self.problems)} problems:\n" + "\n".join(
                f"  - {problem}" for problem in self.problems
            )
        super().__init__(message + "\nnothing was submitted")


class PartitionSource(Protocol):
    """What preflight needs from a Slurm client: `SlurmClient` is one."""

    def partitions(self) -> dict[str, Partition]: ...


@dataclass(frozen=True)
class PreflightReport:
    """What passed: the partition resolved, the excluded nodes that exist, warnings."""

    partition: str
    exclude: tuple[str, ...]
    warnings: tuple[str, ...]


def check(
    partition: str | None,
    nodes: int,
    gpus_per_node: int,
    paths: Sequence[tuple[str, Path]],
    client: PartitionSource,
    *,
    exclude: Sequence[str] = (),
) -> PreflightReport:
    """Check a run's request against the cluster; raise PreflightError listing every problem."""
    problems = [
        f"{label}: {path} does not exist; fix the path (the compute nodes read it from the shared filesystem)"
        for label, path in paths
        if not Path(path).exists()
    ]
    warnings: list[str] = []
    partitions = client.partitions()
    chosen = _resolve_partition(partition, partitions, problems)
    if chosen is None:
        raise PreflightError(problems)

    known = frozenset().union(*(p.node_names for p in partitions.values()))
    unknown = [name for name in exclude if name not in known]
    if unknown:
        # sbatch refuses the whole job for one unknown name ("Invalid node name
        # specified"); a node that was retired from the cluster is not worth that.
        warnings.append(f"excluded node(s) {', '.join(unknown)} do not exist on this cluster; ignoring them")
    kept = tuple(name for name in exclude if name in known)
    excluded_here = chosen.node_names & set(kept)

    where = f"partition {chosen.name!r}"
    total = chosen.node_count - len(excluded_here)
    if nodes > total:
        excluded_note = f" after excluding {len(excluded_here)}" if excluded_here else ""
        problems.append(
            f"the run asks for {nodes} nodes but {where} has {total}{excluded_note}; set cluster.nodes "
            f"to at most {total} or choose a bigger partition ({_listing(partitions)})"
        )
    elif nodes > chosen.usable_node_count - len(excluded_here & _usable_names(chosen)):
        warnings.append(
            f"only {chosen.usable_node_count} of {chosen.node_count} nodes in {where} are up; "
            f"the run waits until {nodes} are"
        )

    if gpus_per_node > 0:
        eligible = {
            name for group in chosen.groups if group.gpus >= gpus_per_node for name in expand_hostlist(group.node_list)
        } - excluded_here
        if not eligible:
            have = max((group.gpus for group in chosen.groups), default=0)
            what = "no GPUs (no gpu gres)" if have == 0 else f"at most {have} GPUs per node"
            problems.append(
                f"the run asks for {gpus_per_node} GPUs per node but the nodes of {where} have {what}; "
                f"set cluster.gpus_per_node to {have} or choose a partition with GPU nodes"
            )
        elif len(eligible) < nodes:
            problems.append(
                f"the run asks for {nodes} nodes with {gpus_per_node} GPUs each but only {len(eligible)} "
                f"nodes of {where} have that many; lower cluster.nodes or cluster.gpus_per_node"
            )

    if chosen.available != "up":
        warnings.append(f"{where} is {chosen.available}: jobs wait in the queue until an admin sets it up")
    if problems:
        raise PreflightError(problems)
    return PreflightReport(partition=chosen.name, exclude=kept, warnings=tuple(warnings))


def check_run(config: RunConfig, client: PartitionSource | None = None) -> list[str]:
    """Preflight for a whole run config; drops unknown nodes from cluster.exclude; returns warnings."""
    if client is None:
        from fm9g.orchestrator.slurm.commands import SlurmClient

        client = SlurmClient()
    cluster = config.cluster
    report = check(
        cluster.partition,
        cluster.nodes,
        cluster.gpus_per_node,
        run_paths(config),
        client,
        exclude=cluster.exclude,
    )
    if list(report.exclude) != list(cluster.exclude):
        # Rendered scripts pass cluster.exclude to --exclude, where one unknown name
        # makes sbatch refuse the job; keep only the names that exist.
        cluster.exclude = list(report.exclude)
    return list(report.warnings)


def run_paths(config: RunConfig) -> list[tuple[str, Path]]:
    """The (config field, path) pairs of a run config that must exist before submitting."""
    paths: list[tuple[str, Path]] = []
    if config.data.dataset_config:
        paths.append(("data.dataset_config", Path(config.data.dataset_config)))
    if config.data.tokenizer_path:
        paths.append(("data.tokenizer_path", Path(config.data.tokenizer_path)))
    # model.config is either a named config ("tiny", "8b") or a path to a JSON file.
    if config.model.config.endswith(".json") or "/" in config.model.config:
        paths.append(("model.config", Path(config.model.config)))
    if config.cluster.python:
        paths.append(("cluster.python", Path(config.cluster.python)))
    return paths


def _resolve_partition(name: str | None, partitions: dict[str, Partition], problems: list[str]) -> Partition | None:
    if not partitions:
        problems.append("sinfo lists no partitions you can use; ask the cluster's admins for access")
        return None
    if name is None:
        default = next((p for p in partitions.values() if p.default), None)
        if default is None:
            problems.append(
                f"the cluster has no default partition; set cluster.partition to one of: {_listing(partitions)}"
            )
        return default
    if name not in partitions:
        problems.append(f"partition {name!r} does not exist; set cluster.partition to one of: {_listing(partitions)}")
        return None
    return partitions[name]


def _listing(partitions: dict[str, Partition]) -> str:
    return ", ".join(f"{p.name} ({'default, ' if p.default else ''}{p.node_count} nodes)" for p in partitions.values())


def _usable_names(partition: Partition) -> set[str]:
    return {name for group in partition.groups if group.usable for name in expand_hostlist(group.node_list)}
