"""Pure parsers: the text Slurm's commands print, to typed records.  No I/O here.

Each parser pairs with one exact command line in `commands.py`; the format strings both
use are the constants below, so the two cannot drift apart.  `tests/cluster/record.sh`
saves real output of those commands from the project's Slurm 22.05 test cluster into
`tests/slurm/recorded/`, and `tests/slurm/test_parse.py` feeds it to these functions.

Field separator: job names and comments are user text and may contain `|`, `,` or
spaces, so squeue, sacct and sinfo are asked to separate fields with ASCII Unit
Separator (0x1F), which no one types into a job name.  A newline inside a name or a
comment would still split a record; fm9g never submits one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from fm9g.orchestrator.slurm.states import JobState

FIELD_SEPARATOR = "\x1f"

# squeue: %A is the job's own numeric id (unique per array task); %i is the id as
# users see it ("123", "123_4", "123_[5-9]" for not-yet-split array tasks).
# %B is the batch host (where the node agent runs), %k the --comment tag.
SQUEUE_FIELDS = ("%A", "%i", "%T", "%r", "%N", "%B", "%M", "%P", "%j", "%k")
SQUEUE_FORMAT = FIELD_SEPARATOR.join(SQUEUE_FIELDS)

# sacct: JobIDRaw is the numeric id (JobID prints "123_4" for array tasks).  There is
# no Restarts field in 22.05 ("Invalid field requested"); commands.sacct passes
# --duplicates instead, and each earlier record of the same job is one restart.
SACCT_FIELDS = (
    "JobIDRaw",
    "JobID",
    "JobName",
    "State",
    "ExitCode",
    "NodeList",
    "Start",
    "End",
    "Elapsed",
    "Comment",
)
SACCT_FORMAT = ",".join(SACCT_FIELDS)

# sinfo: %P is the partition name with "*" on the default one.  sinfo prints one line
# per distinct combination of the other fields, so a partition whose nodes differ in
# state or gres spans several lines; %D counts the nodes of each line.
SINFO_FIELDS = ("%P", "%a", "%D", "%T", "%N", "%G")
SINFO_FORMAT = FIELD_SEPARATOR.join(SINFO_FIELDS)

# Node states (sinfo %T, suffix stripped) in which a node takes new jobs, now or
# once its current job ends.  A trailing "*" means "not responding" and rules it out.
_USABLE_NODE_STATES = frozenset({"idle", "allocated", "mixed", "completing", "planned"})


class ParseError(ValueError):
    """Slurm printed something this module does not understand."""


@dataclass(frozen=True)
class SqueueRow:
    """One job as `squeue --format=SQUEUE_FORMAT` prints it."""

    job_id: int
    display_id: str
    array_job_id: int | None
    array_task: str | None
    state: JobState
    raw_state: str
    reason: str
    nodes: str
    batch_host: str
    elapsed: timedelta
    partition: str
    name: str
    comment: str


@dataclass(frozen=True)
class SacctRow:
    """One job's latest accounting record, with its restart count and batch-step exit."""

    job_id: int
    display_id: str
    array_job_id: int | None
    array_task: str | None
    name: str
    state: JobState
    raw_state: str
    cancelled_by_uid: int | None
    exit_code: int
    signal: int
    node_list: str
    start: datetime | None
    end: datetime | None
    elapsed: timedelta
    comment: str
    restarts: int


@dataclass(frozen=True)
class PartitionNodes:
    """One sinfo line: a group of a partition's nodes sharing state and gres."""

    count: int
    state: str
    node_list: str
    gres: str

    @property
    def usable(self) -> bool:
        """These nodes respond and take jobs (now or when their jobs end)."""
        return not self.state.endswith("*") and self.state.rstrip("~#!%$@^-+") in _USABLE_NODE_STATES

    @property
    def gpus(self) -> int:
        """GPUs per node in this group, from gres like `gpu:8` or `gpu:a100:4(S:0-1)`."""
        return gpus_in_gres(self.gres)


@dataclass(frozen=True)
class Partition:
    """A partition from `sinfo --format=SINFO_FORMAT`, summed over its lines."""

    name: str
    default: bool
    available: str
    groups: tuple[PartitionNodes, ...]

    @property
    def node_count(self) -> int:
        """All nodes in the partition, in any state."""
        return sum(group.count for group in self.groups)

    @property
    def usable_node_count(self) -> int:
        """Nodes that respond and are not drained or down."""
        return sum(group.count for group in self.groups if group.usable)

    @property
    def node_names(self) -> frozenset[str]:
        """Every node name in the partition (hostlists expanded)."""
        return frozenset(name for group in self.groups for name in expand_hostlist(group.node_list))


# ------------------------------------------------------------------------ sbatch


def parse_sbatch(stdout: str) -> int:
    """The job id from `sbatch --parsable` output: `123` or `123;cluster`."""
    lines = [line.strip() for line in stdout.splitlines() if line.strip()]
    if not lines:
        raise ParseError("sbatch --parsable printed no job id")
    # The id is the last line; site plugins may print notices before it.
    job_id = lines[-1].split(";", 1)[0]
    if not job_id.isdigit():
        raise ParseError(f"sbatch --parsable printed {lines[-1]!r}, not a job id")
    return int(job_id)


# ------------------------------------------------------------------------ squeue


def parse_squeue(text: str) -> list[SqueueRow]:
    """Rows of `squeue --noheader --format=SQUEUE_FORMAT`."""
    rows = []
    for values in _records(text, len(SQUEUE_FIELDS), "squeue"):
        (
            job_id,
            display_id,
            raw_state,
            reason,
            nodes,
            batch_host,
            elapsed,
            partition,
            name,
            comment,
        ) = values
        array_job_id, array_task = split_array_id(display_id)
        rows.append(
            SqueueRow(
                job_id=_int(job_id, "squeue %A"),
                display_id=display_id,
                array_job_id=array_job_id,
                array_task=array_task,
                state=JobState.from_slurm(raw_state),
                raw_state=raw_state,
                reason=reason,
                nodes=nodes,
                # squeue prints "n/a" for the batch host of a job that has none yet.
                batch_host="" if batch_host in ("n/a", "(null)") else batch_host,
                elapsed=parse_duration(elapsed),
                partition=partition,
                name=name,
                comment="" if comment == "(null)" else comment,
            )
        )
    return rows


# ------------------------------------------------------------------------ sacct


def parse_sacct(text: str) -> list[SacctRow]:
    """Jobs from `sacct --parsable2 --noheader --duplicates --format=SACCT_FORMAT`.

    Steps (`.batch`, `.extern`, `.0`) are folded into their job: with `--duplicates`
    a requeued job has one allocation record per run, each followed by its steps; the
    last record is the job's state and the earlier ones count as restarts.
    """
    jobs: dict[int, SacctRow] = {}
    order: list[int] = []
    runs: dict[int, int] = {}
    for values in _records(text, len(SACCT_FIELDS), "sacct"):
        raw_id, display_id, name, raw_state, exit_text, node_list, start, end, elapsed, comment = values
        base, _, step = raw_id.partition(".")
        job_id = _int(base, "sacct JobIDRaw")
        if step:
            job = jobs.get(job_id)
            if job is not None and step == "batch":
                jobs[job_id] = _with_batch_exit(job, exit_text)
            continue
        exit_code, signal = parse_exit_code(exit_text)
        array_job_id, array_task = split_array_id(display_id)
        if job_id not in jobs:
            order.append(job_id)
        runs[job_id] = runs.get(job_id, 0) + 1
        jobs[job_id] = SacctRow(
            job_id=job_id,
            display_id=display_id,
            array_job_id=array_job_id,
            array_task=array_task,
            name=name,
            state=JobState.from_slurm(raw_state),
            raw_state=raw_state,
            cancelled_by_uid=_cancelled_by(raw_state),
            exit_code=exit_code,
            signal=signal,
            node_list="" if node_list == "None assigned" else node_list,
            start=parse_timestamp(start),
            end=parse_timestamp(end),
            elapsed=parse_duration(elapsed),
            comment=comment,
            restarts=runs[job_id] - 1,
        )
    return [jobs[job_id] for job_id in order]


def _with_batch_exit(job: SacctRow, batch_exit_text: str) -> SacctRow:
    # The allocation record of a job killed by a signal often says 0:0 (scancel:
    # the allocation is CANCELLED, the batch step carries 0:15); the batch step
    # knows what killed the script, so it fills a blank allocation exit code.
    if job.exit_code or job.signal:
        return job
    exit_code, signal = parse_exit_code(batch_exit_text)
    if not (exit_code or signal):
        return job
    return replace(job, exit_code=exit_code, signal=signal)


def _cancelled_by(raw_state: str) -> int | None:
    _, by, uid = raw_state.partition(" by ")
    return int(uid) if by and uid.strip().isdigit() else None


# ------------------------------------------------------------------------ sinfo


def parse_sinfo_partitions(text: str) -> dict[str, Partition]:
    """Partitions from `sinfo --noheader --format=SINFO_FORMAT`, keyed by name."""
    lines: dict[str, list[PartitionNodes]] = {}
    flags: dict[str, tuple[bool, str]] = {}
    for values in _records(text, len(SINFO_FIELDS), "sinfo"):
        raw_name, available, count, state, node_list, gres = values
        name = raw_name.rstrip("*")
        default = raw_name.endswith("*") or flags.get(name, (False, ""))[0]
        flags[name] = (default, available)
        lines.setdefault(name, []).append(
            PartitionNodes(
                count=_int(count, "sinfo %D"),
                state=state,
                node_list=node_list,
                gres="" if gres == "(null)" else gres,
            )
        )
    return {
        name: Partition(name=name, default=flags[name][0], available=flags[name][1], groups=tuple(groups))
        for name, groups in lines.items()
    }


def gpus_in_gres(gres: str) -> int:
    """GPUs a node has, from a gres string: `gpu:8`, `gpu:a100:4(S:0-1),nvme:1` -> 8, 4."""
    total = 0
    for item in _split_top_level(gres):
        item = item.split("(", 1)[0]
        parts = item.split(":")
        if parts[0] != "gpu":
            continue
        # gpu, gpu:N, gpu:type, gpu:type:N -- a bare type means one.
        count = parts[-1] if len(parts) > 1 else "1"
        total += int(count) if count.isdigit() else 1
    return total


def _split_outside(text: str, open_: str, close: str) -> list[str]:
    """Split on commas that are not inside `open_`...`close` brackets; drop empty items."""
    items, depth, current = [], 0, ""
    for char in text:
        depth += char == open_
        depth -= char == close
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    if current:
        items.append(current)
    return [item for item in items if item]


def _split_top_level(text: str) -> list[str]:
    # Commas inside "(S:0,1)" socket lists are not item separators.
    return _split_outside(text, "(", ")")


def expand_hostlist(hostlist: str) -> list[str]:
    """Expand a Slurm hostlist: `node[1-3,7],gpu01` -> node1, node2, node3, node7, gpu01."""
    names: list[str] = []
    for item in _split_hostlist(hostlist):
        match = re.fullmatch(r"([^\[\]]*)\[([^\]]+)\](.*)", item)
        if not match:
            names.append(item)
            continue
        prefix, ranges, suffix = match.groups()
        for part in ranges.split(","):
            low, _, high = part.partition("-")
            if not high:
                names.extend(expand_hostlist(f"{prefix}{low}{suffix}"))
                continue
            # Zero padding is kept: node[01-03] -> node01, node02, node03.
            width = len(low) if low.startswith("0") else 0
            for number in range(int(low), int(high) + 1):
                names.extend(expand_hostlist(f"{prefix}{number:0{width}d}{suffix}"))
    return names


def _split_hostlist(hostlist: str) -> list[str]:
    # Commas inside "node[1-3,5]" ranges are not item separators.
    return [item for item in _split_outside(hostlist.strip(), "[", "]") if item != "(null)"]


# ------------------------------------------------------------------------ sdiag


def parse_sdiag_user_rpcs(text: str) -> dict[str, int]:
    """RPC counts per user from sdiag's "Remote Procedure Call statistics by user" block."""
    counts: dict[str, int] = {}
    inside = False
    for line in text.splitlines():
        if line.startswith("Remote Procedure Call statistics by user"):
            inside = True
            continue
        if not inside:
            continue
        # The block ends at the next unindented heading or a blank line.
        if not line.strip() or not line[0].isspace():
            break
        match = re.match(r"\s*(\S+)\s*\(\s*\d+\)\s*count:(\d+)", line)
        if match is None:
            raise ParseError(f"sdiag: unexpected line in the per-user RPC block: {line!r}")
        counts[match.group(1)] = int(match.group(2))
    if not inside:
        raise ParseError("sdiag printed no 'Remote Procedure Call statistics by user' block")
    return counts


# ------------------------------------------------------------------------ values


def split_array_id(display_id: str) -> tuple[int | None, str | None]:
    """`123_4` -> (123, "4"), `123_[5-9%2]` -> (123, "[5-9%2]"), `123` -> (None, None)."""
    base, underscore, task = display_id.partition("_")
    if not underscore:
        return None, None
    return _int(base, "array job id"), task


def parse_exit_code(text: str) -> tuple[int, int]:
    """Slurm's `exit:signal` pair, e.g. `3:0` -> (3, 0), `0:15` -> (0, 15)."""
    code, _, signal = text.strip().partition(":")
    if not code.isdigit() or not (signal or "0").isdigit():
        raise ParseError(f"exit code {text!r} is not EXIT:SIGNAL")
    return int(code), int(signal or 0)


def parse_duration(text: str) -> timedelta:
    """Slurm durations: `SS`, `MM:SS`, `HH:MM:SS`, `D-HH[:MM[:SS]]`; junk -> 0."""
    text = text.strip()
    days = 0
    if "-" in text:
        day_text, text = text.split("-", 1)
        if not day_text.isdigit():
            return timedelta(0)
        days = int(day_text)
    parts = text.split(":")
    if not all(part.isdigit() for part in parts) or len(parts) > 3:
        # squeue prints "INVALID" for a job whose start time is in the future.
        return timedelta(0)
    numbers = [int(part) for part in parts]
    if days and len(numbers) < 3:
        numbers += [0] * (3 - len(numbers))  # "D-HH" and "D-HH:MM" count from hours
    hours, minutes, seconds = [0] * (3 - len(numbers)) + numbers
    return timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)


def parse_timestamp(text: str) -> datetime | None:
    """sacct's local time `2026-11-29T05:04:13`; `Unknown`/`None` -> None."""
    try:
        return datetime.fromisoformat(text.strip())
    except ValueError:
        return None


def _records(text: str, width: int, command: str) -> list[list[str]]:
    records = []
    for line in text.splitlines():
        if not line.strip():
            continue
        values = line.split(FIELD_SEPARATOR)
        if len(values) != width:
            raise ParseError(
                f"{command}: expected {width} fields separated by 0x1F, got {len(values)} in {line[:120]!r}"
            )
        records.append(values)
    return records


def _int(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ParseError(f"{what}: {text!r} is not a number") from None
