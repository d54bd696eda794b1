"""The one module that runs Slurm's commands: sbatch, squeue, sacct, scancel, sinfo,
scontrol and sdiag, each through `subprocess` with a timeout, each result parsed by
`parse.py` into typed records.

`SlurmClient` holds the timeouts and a `CallCounter`, so a benchmark can tell how many
RPC-making commands a supervisor sent to the controller.  Nothing here retries: a
retried sbatch can submit a job twice, and a retried poll hides controller trouble
that the caller should see and back off from.

Errors belong to this layer: `SubmitError` (sbatch refused or did not answer) carries
sbatch's raw output; `PollError` (squeue/sacct could not tell) means "state unknown",
never "failed"; everything else is a `SlurmError`.  Each message says what to do next.

The argv builders (`squeue_argv`, ...) are pure and public, so that
`tests/cluster/record.sh` records exactly the command lines this module runs.
"""

from __future__ import annotations

import os
import subprocess
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TypeVar

from fm9g.orchestrator.slurm import parse
from fm9g.orchestrator.slurm.parse import Partition, SacctRow, SqueueRow

_Row = TypeVar("_Row")

# What Slurm prints for an id it does not know (any more).  Slurm 22.05's squeue
# errors out with it when given exactly one id (with several ids it just omits the
# unknown ones).  That does not mean the poll failed.
_INVALID_JOB_ID = "Invalid job id specified"

# sbatch's stderr -> the advice a user needs.  First match wins.
_SUBMIT_HINTS: tuple[tuple[str, str], ...] = (
    ("invalid partition", "set cluster.partition to one of the partitions `sinfo -s` lists"),
    (
        "Invalid generic resource",
        "this cluster has no such gres: set cluster.gpus_per_node: 0 or choose a GPU partition",
    ),
    (
        "Requested node configuration is not available",
        "ask for no more nodes, GPUs, CPUs or memory than the partition's nodes have (`sinfo -N -l`)",
    ),
    (
        "Invalid node name specified",
        "remove unknown node names from cluster.exclude (`sinfo -N` lists the nodes)",
    ),
    (
        "Invalid account",
        "set cluster.account to an account you belong to (`sacctmgr show assoc user=$USER`)",
    ),
    (
        "Invalid qos",
        "set cluster.qos to a QOS your account may use (`sacctmgr show assoc user=$USER format=qos`)",
    ),
    (
        "Unable to contact slurm controller",
        "the controller is down or unreachable: check `scontrol ping`, then resubmit",
    ),
    (
        "Socket timed out",
        "the controller is overloaded: wait, check `squeue --me` for the job, then resubmit",
    ),
    (
        "QOSMaxSubmitJobPerUserLimit",
        "you have too many jobs queued: wait for some to finish or cancel some",
    ),
    (
        "AssocMaxSubmitJobLimit",
        "you have too many jobs queued: wait for some to finish or cancel some",
    ),
)


class SlurmError(RuntimeError):
    """A Slurm command failed; the message says what to do next."""

    def __init__(
        self,
        message: str,
        *,
        argv: Sequence[str] = (),
        returncode: int | None = None,
        stdout: str = "",
        stderr: str = "",
    ) -> None:
        super().__init__(message)
        self.argv = tuple(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr


class SubmitError(SlurmError):
    """sbatch refused the job or did not answer; `stdout`/`stderr`/`returncode` are sbatch's own."""


class PollError(SlurmError):
    """squeue or sacct could not tell the jobs' states: treat them as UNKNOWN, never as failed."""


@dataclass
class CallCounter:
    """How many times each Slurm command ran, and how many of those runs failed."""

    calls: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)

    def record(self, command: str, *, ok: bool) -> None:
        """Count one run of `command`."""
        self.calls[command] += 1
        if not ok:
            self.failures[command] += 1

    @property
    def total(self) -> int:
        """All runs of all commands."""
        return sum(self.calls.values())


# ------------------------------------------------------------------------ argv


def sbatch_argv(script_path: Path | str, extra_args: Sequence[str] = ()) -> list[str]:
    """`sbatch --parsable [extra_args] SCRIPT`."""
    return ["sbatch", "--parsable", *extra_args, str(script_path)]


def squeue_argv(job_ids: Iterable[int]) -> list[str]:
    """One squeue call for all `job_ids`, in any state."""
    # --states=all: with --jobs, squeue 22.05 still hides jobs that have ended (but
    # are kept for MinJobAge); asking for all states shows their final state.
    return [
        "squeue",
        "--noheader",
        "--states=all",
        f"--jobs={_id_list(job_ids)}",
        f"--format={parse.SQUEUE_FORMAT}",
    ]


def sacct_argv(job_ids: Iterable[int], since: datetime) -> list[str]:
    """One sacct call for all `job_ids` that started after `since`, every run of each."""
    # --starttime bounds the database scan: with --jobs and no -S, sacct searches
    # from the Unix epoch, and a reused job id (controller state lost) would match
    # an old job.  --duplicates lists each run of a requeued job (see parse_sacct).
    return [
        "sacct",
        "--noheader",
        "--parsable2",
        f"--delimiter={parse.FIELD_SEPARATOR}",
        "--duplicates",
        f"--starttime={_slurm_time(since)}",
        f"--jobs={_id_list(job_ids)}",
        f"--format={parse.SACCT_FORMAT}",
    ]


def scancel_argv(job_ids: Iterable[int], signal: str | None = None, *, batch_only: bool = False) -> list[str]:
    """`scancel [--signal=SIG] [--batch] IDS...`."""
    argv = ["scancel"]
    if signal is not None:
        argv.append(f"--signal={signal}")
    if batch_only:
        argv.append("--batch")
    return argv + [str(job_id) for job_id in job_ids]


def scancel_step_argv(job_id: int, step: int) -> list[str]:
    """`scancel JOB.STEP`: one step of a job (one node of a `together` allocation)."""
    return ["scancel", f"{int(job_id)}.{int(step)}"]


def release_nodes_argv(job_id: int, keep: Iterable[str]) -> list[str]:
    """`scontrol update JobId=J NodeList=...`: shrink a running job to the nodes in `keep`."""
    return ["scontrol", "update", f"JobId={int(job_id)}", f"NodeList={','.join(keep)}"]


def sinfo_argv() -> list[str]:
    """Partitions with node counts, states, node lists and gres."""
    return ["sinfo", "--noheader", f"--format={parse.SINFO_FORMAT}"]


def sdiag_argv() -> list[str]:
    """`sdiag`: controller statistics, including RPCs per user."""
    return ["sdiag"]


def ping_argv() -> list[str]:
    """`scontrol ping`: is the controller up?"""
    return ["scontrol", "ping"]


def _id_list(job_ids: Iterable[int]) -> str:
    return ",".join(str(int(job_id)) for job_id in job_ids)


def _slurm_time(moment: datetime) -> str:
    # Slurm reads and prints local wall-clock time without a zone.
    if moment.tzinfo is not None:
        moment = moment.astimezone().replace(tzinfo=None)
    return moment.strftime("%Y-%m-%dT%H:%M:%S")


# ------------------------------------------------------------------------ client


class SlurmClient:
    """Runs Slurm's commands with timeouts and counts them in `counter`."""

    def __init__(
        self,
        *,
        counter: CallCounter | None = None,
        timeout_s: float = 30.0,
        submit_timeout_s: float = 60.0,
        sacct_timeout_s: float = 60.0,
    ) -> None:
        self.counter = counter if counter is not None else CallCounter()
        self.timeout_s = timeout_s
        self.submit_timeout_s = submit_timeout_s
        self.sacct_timeout_s = sacct_timeout_s

    def submit(
        self,
        script_path: Path | str,
        *,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> int:
        """Submit a batch script; returns the job id.  `env` is added to the job's environment."""
        argv = sbatch_argv(script_path, extra_args)
        # sbatch exports its own environment into the job (--export=ALL by default),
        # so extra variables for the job are set on sbatch's process.
        environment = {**os.environ, **env} if env else None
        try:
            result = self._run(argv, self.submit_timeout_s, env=environment)
        except subprocess.TimeoutExpired as exc:
            raise SubmitError(
                f"sbatch did not answer within {self.submit_timeout_s:g}s; the job may or may not "
                "exist: look for it by name or comment with squeue before submitting again",
                argv=argv,
                stdout=_text(exc.stdout),
                stderr=_text(exc.stderr),
            ) from None
        except SlurmError as exc:  # sbatch missing: still a submission that did not happen
            raise SubmitError(str(exc), argv=argv) from None
        if result.returncode != 0:
            raise SubmitError(
                _submit_message(result),
                argv=argv,
                returncode=result.returncode,
                stdout=result.stdout,
                stderr=result.stderr,
            )
        try:
            return parse.parse_sbatch(result.stdout)
        except parse.ParseError as exc:
            raise SubmitError(
                f"{exc}; check squeue before submitting again",
                argv=argv,
                returncode=result.returncode,
                stdout=result.stdout,
                stderr=result.stderr,
            ) from None

    def squeue(self, job_ids: Iterable[int]) -> dict[int, SqueueRow]:
        """States of `job_ids` in ONE squeue call, keyed by each job's own id (array tasks too).

        A job that has left slurmctld's memory is absent: ask sacct.  Raises PollError
        when squeue cannot answer.
        """
        ids = sorted(set(job_ids))
        if not ids:
            return {}
        argv = squeue_argv(ids)
        result = self._poll(argv, self.timeout_s)
        if result.returncode != 0 and len(ids) == 1 and _INVALID_JOB_ID in result.stderr:
            return {}
        rows = self._parsed_poll(
            argv, result, "squeue", parse.parse_squeue, "treat the jobs as UNKNOWN and poll again later"
        )
        return {row.job_id: row for row in rows}

    def sacct(self, job_ids: Iterable[int], since: datetime) -> dict[int, SacctRow]:
        """Accounting records of `job_ids` started after `since`, in ONE sacct call.

        Accounting lags slurmctld by a few seconds, so a job that just left the queue
        may be missing or still RUNNING here.  A requeued job gets its new record only
        when it starts again: one cancelled while waiting to restart stays REQUEUED in
        sacct for good, and only squeue (for MinJobAge) shows it CANCELLED.
        Raises PollError when sacct cannot answer.
        """
        ids = sorted(set(job_ids))
        if not ids:
            return {}
        argv = sacct_argv(ids, since)
        result = self._poll(argv, self.sacct_timeout_s)
        hint = "treat the jobs as UNKNOWN and poll again later"
        if "accounting storage is disabled" in result.stderr:
            hint = "this cluster keeps no accounting (AccountingStorageType=none); ask its admins for slurmdbd"
        rows = self._parsed_poll(argv, result, "sacct", parse.parse_sacct, hint)
        return {row.job_id: row for row in rows}

    def cancel(self, job_ids: Iterable[int], signal: str | None = None, *, batch_only: bool = False) -> None:
        """scancel the jobs (or send them `signal`); ids that already ended are fine."""
        ids = sorted(set(job_ids))
        if not ids:
            return
        # scancel 22.05 exits 0 for ids it does not know or that already ended, so
        # a non-zero status is a real failure (controller unreachable, permission).
        self._check(
            scancel_argv(ids, signal, batch_only=batch_only),
            "check `scontrol ping` and cancel again",
        )

    def cancel_step(self, job_id: int, step: int) -> None:
        """scancel one step of a job; the job and its other steps run on."""
        self._check(scancel_step_argv(job_id, step), "check `scontrol ping` and cancel again")

    def release_node(self, job_id: int, node: str) -> bool:
        """Shrink a running job by one node (Slurm frees it for other jobs); False when
        the job no longer holds `node` (Slurm already dropped a failed node)."""
        listing = self._check(["squeue", "-h", "-j", str(int(job_id)), "-o", "%N"], "check `scontrol ping`")
        nodelist = listing.stdout.strip()
        if not nodelist:
            return False
        hosts = parse.expand_hostlist(nodelist)
        if node not in hosts or len(hosts) < 2:
            return False
        self._check(
            release_nodes_argv(job_id, [host for host in hosts if host != node]),
            f"release node {node} from job {job_id} by hand (scontrol update JobId={job_id} NodeList=...)",
        )
        return True

    def partitions(self) -> dict[str, Partition]:
        """Every partition this user can see, keyed by name."""
        result = self._check(sinfo_argv(), "check `scontrol ping`")
        return parse.parse_sinfo_partitions(result.stdout)

    def sdiag_user_rpcs(self) -> dict[str, int]:
        """RPCs per user since the controller's statistics were last reset."""
        result = self._check(sdiag_argv(), "check `scontrol ping`")
        return parse.parse_sdiag_user_rpcs(result.stdout)

    def ping(self) -> bool:
        """The controller answers `scontrol ping`."""
        return self.ping_report()[0]

    def ping_report(self) -> tuple[bool, str]:
        """(the controller answers `scontrol ping`, what it said or why it said nothing: one line)."""
        try:
            result = self._run(ping_argv(), self.timeout_s)
        except subprocess.TimeoutExpired:
            return False, f"no answer within {self.timeout_s:g}s"
        except SlurmError as exc:
            return False, str(exc).split(":")[0]  # "scontrol ping not found on PATH"
        # One line per controller ("Slurmctld(primary) at vm is UP", then any backups).
        said = [line.strip() for line in result.stdout.splitlines() if "Slurmctld" in line]
        up = [line for line in said if "is UP" in line]
        if result.returncode == 0 and up:
            return True, up[0]
        # A DOWN controller's line comes before a banner of asterisks: name the line.
        return False, (said[0] if said else "") or _last_line(result.stderr) or f"exit status {result.returncode}"

    # -------------------------------------------------------------------- plumbing

    def _run(
        self, argv: Sequence[str], timeout_s: float, env: Mapping[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        # scontrol is counted per subcommand: "scontrol ping" and "scontrol show"
        # cost the controller different amounts.
        command = f"{argv[0]} {argv[1]}" if argv[0] == "scontrol" and len(argv) > 1 else argv[0]
        try:
            result = subprocess.run(
                list(argv),
                capture_output=True,
                text=True,
                timeout=timeout_s,
                env=dict(env) if env is not None else None,
                stdin=subprocess.DEVNULL,
                check=False,  # the status is judged by each caller, with Slurm's message
            )
        except subprocess.TimeoutExpired:
            self.counter.record(command, ok=False)
            raise
        except FileNotFoundError:
            self.counter.record(command, ok=False)
            raise SlurmError(
                f"{command} not found on PATH: run fm9g-launch on a login node of the cluster, or use executor: local",
                argv=argv,
            ) from None
        self.counter.record(command, ok=result.returncode == 0)
        return result

    def _run_checked_timeout(self, argv: Sequence[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
        try:
            return self._run(argv, timeout_s)
        except subprocess.TimeoutExpired:
            raise SlurmError(
                f"{' '.join(argv[:3])} did not answer within {timeout_s:g}s: the controller "
                "is slow or down; check `scontrol ping` and try again",
                argv=argv,
            ) from None

    @staticmethod
    def _parsed_poll(
        argv: Sequence[str],
        result: subprocess.CompletedProcess[str],
        command: str,
        parser: Callable[[str], list[_Row]],
        hint: str,
    ) -> list[_Row]:
        """A poll's rows; a failed command or unreadable output is a PollError (UNKNOWN)."""
        if result.returncode != 0:
            raise PollError(
                _failure(command, result, hint),
                argv=argv,
                returncode=result.returncode,
                stdout=result.stdout,
                stderr=result.stderr,
            )
        try:
            return parser(result.stdout)
        except parse.ParseError as exc:
            raise PollError(f"{exc}; treat the jobs as UNKNOWN", argv=argv, stdout=result.stdout) from None

    def _poll(self, argv: Sequence[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
        try:
            return self._run_checked_timeout(argv, timeout_s)
        except SlurmError as exc:  # no answer, or no command: the jobs' states are unknown for now
            raise PollError(f"{exc} (the jobs count as UNKNOWN until a poll answers)", argv=argv) from None

    def _check(self, argv: Sequence[str], hint: str) -> subprocess.CompletedProcess[str]:
        result = self._run_checked_timeout(argv, self.timeout_s)
        if result.returncode != 0:
            raise SlurmError(
                _failure(argv[0], result, hint),
                argv=argv,
                returncode=result.returncode,
                stdout=result.stdout,
                stderr=result.stderr,
            )
        return result


def _submit_message(result: subprocess.CompletedProcess[str]) -> str:
    hint = next(
        (advice for needle, advice in _SUBMIT_HINTS if needle in result.stderr),
        "read sbatch's message, fix the script or its options, and submit again",
    )
    return _failure("sbatch", result, hint)


def _failure(command: str, result: subprocess.CompletedProcess[str], hint: str) -> str:
    said = _last_line(result.stderr) or _last_line(result.stdout) or "no output"
    return f"{command} failed (exit {result.returncode}): {said}; {hint}"


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _text(value: str | bytes | None) -> str:
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else value
