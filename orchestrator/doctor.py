"""`fm9g-launch doctor`: before a first run, check on the cluster itself what a run
needs and what makes a multi-node start hang instead of fail: the partition and its
nodes, GPU gres, a run directory shared between the compute nodes and this node, the
setup lines' Python environment on a compute node, and a TCP port open between two
compute nodes.

The acting half: it reads `sinfo` (through `SlurmClient`), renders two small probe
jobs from `templates/doctor.sbatch.j2` (1 CPU, no GPU, a short walltime, named
`fm9g-doctor-*`), submits them together, waits for their result files under
`<run_root>/.doctor/<id>/` for at most `timeout_s`, and cancels them whatever happens.
Judging is `doctor_checks.py`; the compute-node side is `doctor_probe.py`.
"""

from __future__ import annotations

import math
import os
import re
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fm9g.orchestrator import doctor_checks as checks
from fm9g.orchestrator import doctor_probe
from fm9g.orchestrator.doctor_checks import Check, DoctorReport, JobOutcome
from fm9g.orchestrator.render import render_template, sbatch_flags
from fm9g.orchestrator.slurm.commands import PollError, SlurmClient, SlurmError, SubmitError
from fm9g.orchestrator.slurm.parse import Partition
from fm9g.orchestrator.slurm.states import JobState
from fm9g.rundir import atomic
from fm9g.rundir.config import RunConfig

DEFAULT_TIMEOUT_S = 120.0
CONNECT_TIMEOUT_S = 5.0  # a dropped SYN waits this long: long enough for a slow network, short for a test
SETUP_MARKER = "# fm9g-doctor: cluster.setup begins on the next line"
# A job that ended may have written its files a moment before this node's view of the
# shared filesystem shows them (NFS attribute caching): wait this long before judging.
VISIBILITY_GRACE_S = 5.0
_SCRIPT_PREFIX = re.compile(r"^\S*slurm_script: line \d+: ")


@dataclass
class _Job:
    role: str  # "env" or "port"
    script: Path
    log: Path
    nodes: int
    job_id: int | None = None
    error: str = ""
    state: str = "PENDING"
    node: str = ""
    started: bool = False
    ended_at: float | None = None
    done: bool = False


def probe_python(config: RunConfig) -> str:
    """The interpreter a training job runs its node agent with (as `_node.sbatch.j2` does)."""
    if config.cluster.train_env:
        return f"{config.cluster.train_env}/bin/python"
    return config.cluster.python or sys.executable


def render_probe_script(
    config: RunConfig, role: str, folder: Path, doctor_id: str, token: str, minutes: int, partition: str | None
) -> str:
    """The sbatch script of one probe job ("env" or "port"); every value shell-quoted."""
    cluster = config.cluster.model_copy(
        update={
            "gpus_per_node": 0,  # the probes need no GPU: they start where GPU jobs would wait
            "cpus_per_task": 1,
            "mem": None,
            "time": str(minutes),
            "requeue": False,
            "partition": partition,
        }
    )
    flags = sbatch_flags(cluster, name=f"fm9g-doctor-{role}", comment=f"fm9g-doctor:{doctor_id}", signal=False)
    return render_template("doctor.sbatch.j2")(
        role=role,
        doctor_id=doctor_id,
        sbatch_flags=flags,
        token=token,
        token_path=str(folder / "token"),
        setup_failures=str(folder / f"setup-failures-{role}.tsv"),
        setup=config.cluster.setup,
        train_env=config.cluster.train_env,
        python=probe_python(config),
        probe=str(folder / "doctor_probe.py"),
        env_result=str(folder / "env.json"),
        folder=str(folder),
        port=int(config.rendezvous.port),
        connect_timeout=f"{CONNECT_TIMEOUT_S:g}",
    )


def setup_first_line(script: str) -> int:
    """The 1-based script line of the first cluster.setup entry (for the ERR trap's LINENO)."""
    return script.splitlines().index(SETUP_MARKER) + 2


def run_doctor(
    config: RunConfig,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    client: SlurmClient | None = None,
    say: Callable[[str], None] = lambda _line: None,
) -> DoctorReport:
    """Run every check against the cluster; the report is also written to `<folder>/doctor.json`."""
    client = client or SlurmClient(timeout_s=min(30.0, timeout_s), submit_timeout_s=min(60.0, timeout_s))
    runs_root = Path(config.run_root).resolve()
    doctor_id = time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"
    folder = runs_root / ".doctor" / doctor_id
    try:
        folder.mkdir(parents=True)
    except OSError as exc:
        failed = Check("run_dir", "fail", f"cannot create {folder}: {exc}", "set run_root to a directory you can write")
        return DoctorReport((failed,), str(folder))

    try:
        partitions: dict[str, Partition] = client.partitions()
        partition_check, chosen = checks.check_partition(config, partitions)
    except SlurmError as exc:
        partition_check, chosen = Check("partition", "fail", str(exc), "run the doctor on a login node"), None
    gres_check = checks.check_gres(config, chosen)

    atomic.write_text(folder / "doctor_probe.py", Path(doctor_probe.__file__).read_text(encoding="utf-8"))
    token = secrets.token_hex(8)
    minutes = max(2, math.ceil(timeout_s / 60) + 1)
    jobs = [_Job("env", folder / "env.sbatch", folder / "env.out", 1)]
    if chosen is not None and chosen.node_count >= 2:
        jobs.append(_Job("port", folder / "port.sbatch", folder / "port.out", 2))
    scripts: dict[str, str] = {}
    for job in jobs:
        scripts[job.role] = render_probe_script(
            config, job.role, folder, doctor_id, token, minutes, chosen.name if chosen else None
        )
        atomic.write_text(job.script, scripts[job.role])
    try:
        _submit(client, jobs, chosen, say)
        _wait(client, jobs, folder, time.monotonic() + timeout_s, say)
    finally:
        # Every probe job goes, finished or not (Ctrl-C and timeouts included).
        live = [job.job_id for job in jobs if job.job_id is not None]
        try:
            client.cancel(live)
        except SlurmError as exc:
            say(f"could not cancel doctor jobs {live}: {exc}")

    outcomes = {job.role: _outcome(job) for job in jobs}
    env = outcomes["env"]
    read_back = _read(folder / "token")
    run_dir_check = checks.check_run_dir(env, token, read_back, str(runs_root))
    failures = checks.map_setup_failures(
        _read(folder / "setup-failures-env.tsv") or "",
        setup_first_line(scripts["env"]),
        config.cluster.setup,
        config.cluster.train_env,
    )
    env_check = checks.check_environment(
        config, env, atomic.read_json(folder / "env.json"), failures, probe_python(config), _first_line(jobs[0].log)
    )
    if "port" in outcomes:
        port_check = checks.check_port(
            outcomes["port"],
            atomic.read_json(folder / "port-listener.json"),
            atomic.read_json(folder / "port-connector.json"),
            config.rendezvous.port,
            CONNECT_TIMEOUT_S,
        )
    elif chosen is None:
        port_check = Check("port", "fail", "not checked: the partition check failed", "fix the partition first")
    else:
        port_check = Check("port", "pass", f"not needed: {chosen.name} has one node")
    report = DoctorReport(
        (partition_check, gres_check, run_dir_check, env_check, port_check),
        str(folder),
        {job.role: job.job_id for job in jobs if job.job_id is not None},
    )
    atomic.write_text(folder / "doctor.json", report.to_json() + "\n")
    return report


def _submit(client: SlurmClient, jobs: list[_Job], chosen: Partition | None, say: Callable[[str], None]) -> None:
    for job in jobs:
        if chosen is None:
            job.error, job.state = "the partition check failed", "NOT_SUBMITTED"
            continue
        try:
            job.job_id = client.submit(job.script, extra_args=[f"--nodes={job.nodes}", f"--output={job.log}"])
            say(f"submitted {job.script.name} as job {job.job_id}")
        except SubmitError as exc:
            job.error, job.state = str(exc), "NOT_SUBMITTED"


def _result_files(job: _Job, folder: Path) -> list[Path]:
    if job.role == "env":
        return [folder / "token", folder / "env.json"]
    return [folder / "port-listener.json", folder / "port-connector.json"]


def _wait(client: SlurmClient, jobs: list[_Job], folder: Path, deadline: float, say: Callable[[str], None]) -> None:
    """Poll until every submitted job has its results (or ended and had its grace), or the deadline."""
    waiting = [job for job in jobs if job.job_id is not None]
    while waiting and time.monotonic() < deadline:
        try:
            rows = client.squeue(job.job_id for job in waiting if job.job_id is not None)
        except PollError as exc:  # unknown, never failed: ask again next time
            say(f"squeue: {exc}")
            rows = {}
        now = time.monotonic()
        for job in waiting:
            row = rows.get(job.job_id or -1)
            if row is not None:
                job.state = row.state.value
                if row.state not in (JobState.PENDING, JobState.CONFIGURING) and row.nodes:
                    job.started, job.node = True, row.nodes
                if row.state.is_terminal and job.ended_at is None:
                    job.ended_at = now
            if all(path.exists() for path in _result_files(job, folder)):
                job.done = True
            elif job.ended_at is not None and now - job.ended_at > VISIBILITY_GRACE_S:
                job.done = True
        waiting = [job for job in waiting if not job.done]
        if waiting:
            time.sleep(1.0)
    for job in waiting:
        job.state = "TIMED_OUT"


def _outcome(job: _Job) -> JobOutcome:
    return JobOutcome(job.job_id, job.state, job.node, str(job.log), job.error, job.started)


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        return None


def _first_line(path: Path) -> str:
    """The job log's first line, without bash's `/var/spool/.../slurm_script: line 21: ` prefix."""
    text = _read(path) or ""
    line = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return _SCRIPT_PREFIX.sub("", line)[:300]
