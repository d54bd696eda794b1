"""`LocalExecutor`: runs the same rendered node scripts as local processes, with the
SLURM_* variables a job would see, so a laptop runs exactly what a cluster would.

Each job is `bash SCRIPT` under a small wrapper that records the exit code in
`<log>.rc` (written atomically), so another fm9g-launch process (status, cancel,
resume) can tell a finished job from a killed one.  Job ids are the wrapper's pid.

A pid is reused once its process is gone, so a recorded id is trusted only while the
process with that pid is still the wrapper of that job: its command line names the
job's exit-code file.  Anything else is never signalled.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from fm9g.orchestrator.executors.base import JobStatus
from fm9g.orchestrator.slurm.states import JobState
from fm9g.rundir.protocol import read_exit_code

WRAPPER_NAME = "fm9g-local-job"
KILL_WAIT_S = 10.0  # after a cancel's SIGTERM, what is left of the job gets SIGKILL (slurm.conf KillWait)

# The exit code a job gets when a job it runs afterok of failed; Slurm cancels such a
# job (--kill-on-invalid-dep), so it reads as CANCELLED here too.
DEPENDENCY_FAILED = 125

# Waits for the jobs it runs afterok of (each given as PID:RC_FILE), runs the script
# once or as an array of tasks (each with its SLURM_ARRAY_TASK_ID, several at once),
# then writes its exit code next to the log (temp name + rename).
_WRAPPER = r"""
export SLURM_JOB_ID=$$
script=$1 rc_file=$2 tasks=$3
shift 3
finish() { printf '%s\n' "$1" > "$rc_file.tmp" && mv -f "$rc_file.tmp" "$rc_file"; exit "$1"; }
for dep in "$@"; do
  pid=${dep%%:*} file=${dep#*:}
  while [ ! -e "$file" ]; do
    if ! kill -0 "$pid" 2>/dev/null && [ ! -e "$file" ]; then
      echo "fm9g-local-job: job $pid ended without an exit code; not running (afterok)" >&2
      finish DEPENDENCY_FAILED
    fi
    sleep 0.2
  done
  if [ "$(cat "$file")" != 0 ]; then
    echo "fm9g-local-job: job $pid failed; not running (afterok)" >&2
    finish DEPENDENCY_FAILED
  fi
done
if [ "$tasks" -gt 0 ]; then
  export SLURM_ARRAY_JOB_ID=$$ SLURM_ARRAY_TASK_COUNT=$tasks
  seq 0 $((tasks - 1)) | xargs -P "${SLURM_CPUS_ON_NODE:-$(nproc)}" -I{} env SLURM_ARRAY_TASK_ID={} bash "$script"
  rc=$?
else
  bash "$script"
  rc=$?
fi
finish "$rc"
""".replace("DEPENDENCY_FAILED", str(DEPENDENCY_FAILED))


def end_state(code: int) -> JobState:
    """The state a local job's exit code means (afterok's DEPENDENCY_FAILED: cancelled)."""
    if code == DEPENDENCY_FAILED:
        return JobState.CANCELLED
    return JobState.COMPLETED if code == 0 else JobState.FAILED


class LocalExecutor:
    """Runs each job as a local process group; the embedded default executor."""

    name = "local"

    def __init__(self) -> None:
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self._rc_files: dict[str, Path] = {}
        self._started: dict[str, float] = {}

    def submit(
        self,
        script: Path,
        *,
        log: Path,
        tag: str,
        env: dict[str, str] | None = None,
        after: Sequence[str] = (),
        array: int | None = None,
    ) -> str:
        unknown = [job_id for job_id in after if job_id not in self._rc_files]
        if unknown:
            raise ValueError(f"afterok on jobs this executor did not start or adopt: {unknown}")
        dependencies = [f"{job_id}:{self._rc_files[job_id]}" for job_id in after]
        log.parent.mkdir(parents=True, exist_ok=True)
        rc_file = log.with_name(log.name + ".rc")
        rc_file.unlink(missing_ok=True)
        job_env = dict(os.environ)
        job_env.update(
            {
                "SLURM_JOB_NAME": tag,
                "SLURM_JOB_NUM_NODES": "1",
                "SLURM_NNODES": "1",
                "SLURM_NODEID": "0",
                "SLURMD_NODENAME": "localhost",
                "SLURM_RESTART_COUNT": "0",
                "SLURM_SUBMIT_DIR": os.getcwd(),
                # Local nodes all live on loopback; torchrun must not guess an external address.
                "FM9G_HOST": "127.0.0.1",
            }
        )
        job_env.update(env or {})
        with open(log, "ab") as out:
            child = subprocess.Popen(
                ["bash", "-c", _WRAPPER, WRAPPER_NAME, str(script), str(rc_file), str(array or 0), *dependencies],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=job_env,
                start_new_session=True,
            )
        job_id = str(child.pid)  # the wrapper exports it as SLURM_JOB_ID, as Slurm would
        self._children[job_id] = child
        self._rc_files[job_id] = rc_file
        self._started[job_id] = time.time()
        return job_id

    def adopt(self, job_id: str, log: Path) -> None:
        """Adopt a job started by another fm9g-launch process (resume, status, cancel)."""
        self._rc_files.setdefault(job_id, log.with_name(log.name + ".rc"))

    def usable_nodes(self) -> set[str] | None:
        return None

    def job_env(self, jobs_at_once: int) -> dict[str, str]:
        # Local "nodes" share this machine's cores; give each its share, as Slurm would.
        return {"SLURM_CPUS_ON_NODE": str(max(1, (os.cpu_count() or 1) // max(1, jobs_at_once)))}

    def tick_interval(self, configured: float) -> float:
        # Polling local processes costs nothing; a short tick keeps laptops responsive.
        return min(configured, 0.5)

    def owns(self, job_id: str) -> bool:
        """True while the process `job_id` is still this job's wrapper (not a reused pid)."""
        child = self._children.get(job_id)
        if child is not None:
            return child.poll() is None
        rc_file = self._rc_files.get(job_id)
        if rc_file is None or not job_id.isdigit():
            return False
        try:
            with open(f"/proc/{job_id}/cmdline", "rb") as handle:
                argv = handle.read().split(b"\0")
        except OSError:
            return False
        return WRAPPER_NAME.encode() in argv and str(rc_file).encode() in argv

    def _status(self, job_id: str) -> JobStatus:
        child = self._children.get(job_id)
        if child is not None:
            child.poll()  # reap, so a dead child is not a zombie that looks alive
        rc_file = self._rc_files.get(job_id)
        ended = read_exit_code(rc_file) if rc_file is not None else None
        if ended is not None:
            code, ended_at = ended
            state = end_state(code)
            return JobStatus(
                state,
                exit_code=code,
                node="localhost",
                reason="DependencyNeverSatisfied" if code == DEPENDENCY_FAILED else "",
                ended_at=ended_at,
                started_at=None if state is JobState.CANCELLED else self._started.get(job_id),
            )
        if rc_file is not None and rc_file.exists():
            return JobStatus(JobState.UNKNOWN)  # written, but not readable yet
        if rc_file is None:
            return JobStatus(JobState.UNKNOWN)
        if self.owns(job_id) and _alive(int(job_id)):
            return JobStatus(JobState.RUNNING, node="localhost", started_at=self._started.get(job_id))
        # Gone without writing its exit code (the wrapper itself was killed), or the
        # pid now belongs to another process.
        return JobStatus(JobState.CANCELLED, node="localhost", reason="process killed", ended_at=time.time())

    def poll(self, job_ids: Sequence[str]) -> dict[str, JobStatus]:
        return {job_id: self._status(job_id) for job_id in job_ids}

    def cancel_node(self, job_id: str, step: str) -> None:
        """A local job is one node (plan_run refuses cluster.start: together here): its node is the job."""
        self.cancel([job_id])

    def release_node(self, job_id: str, node: str) -> bool:
        """Nothing to give back: a local job holds no allocation."""
        return False

    def cancel(self, job_ids: Sequence[str]) -> None:
        """SIGCONT and SIGTERM each job's process group, then SIGKILL whatever of the job is
        left after KILL_WAIT_S, as scancel and slurmd's KillWait do.  SIGCONT first: a
        stopped process holds a SIGTERM pending until it runs again, and a frozen node is
        exactly the job one cancels.  A pid that no longer belongs to the job is left alone."""
        for job_id in job_ids:
            if not self.owns(job_id):
                continue
            try:
                os.killpg(int(job_id), signal.SIGCONT)
                os.killpg(int(job_id), signal.SIGTERM)
            except (ProcessLookupError, PermissionError, ValueError):
                continue
            # The tree as it is now: the wrapper may be gone by then while a child lingers.
            tree = [int(job_id), *descendants(int(job_id))]
            timer = threading.Timer(KILL_WAIT_S, kill_processes, (tree, signal.SIGKILL))
            timer.daemon = True
            timer.start()

    def kill(self, job_id: str, sig: int = signal.SIGKILL) -> None:
        """Kill every process of a job, its own sessions included (a node that dies).

        The node agent runs torchrun in a session of its own, so the job's process
        group alone would leave it behind; this walks the tree like Slurm's
        proctrack/linuxproc does.  Fault injection for tests and benchmarks."""
        kill_processes([int(job_id), *descendants(int(job_id))], sig)


def descendants(root: int) -> list[int]:
    """Every process below `root` in the process tree (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                parent = int(handle.read().rsplit(") ", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return True


def run_processes(run_root: Path) -> list[int]:
    """Every live process of one run on this machine: the wrappers of its jobs (their
    command line names an exit-code file under the run directory), everything below
    them, and whatever started with FM9G_RUN_DIR set to the run (a node agent's torchrun
    and trainers run in a session of their own).  This process is never listed."""
    root = str(Path(run_root).resolve())
    inside = (root + os.sep).encode()
    marker = f"FM9G_RUN_DIR={root}".encode()
    wrappers, members = [], set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                argv = handle.read().split(b"\0")
            with open(f"/proc/{entry}/environ", "rb") as handle:
                environ = handle.read().split(b"\0")
        except OSError:  # gone, or another user's
            continue
        if WRAPPER_NAME.encode() in argv and any(arg.startswith(inside) for arg in argv):
            wrappers.append(int(entry))
        elif marker in environ:
            members.add(int(entry))
    for wrapper in wrappers:
        members.add(wrapper)
        members.update(descendants(wrapper))
    members.discard(os.getpid())
    return sorted(pid for pid in members if _alive(pid))


def kill_processes(pids: Sequence[int], sig: int = signal.SIGKILL) -> None:
    """Send `sig` to each pid that still exists."""
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            continue
