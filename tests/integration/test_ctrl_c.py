"""Ctrl-C on a foreground `pretrain`, typed into a real pseudo-terminal (the terminal
sends SIGINT to the foreground process group, as it does for a person).

Local executor: the first Ctrl-C checkpoints every rank and stops, a second one stops at
once; either way no process of the run is left, and the same command resumes.  Slurm:
Ctrl-C detaches; the jobs keep running and the record names `resume` and `cancel`."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import threading
import time
from pathlib import Path

import pytest

from fm9g.orchestrator.executors.local import descendants, run_processes
from fm9g.rundir import protocol
from tests.helpers import runs
from tests.helpers.signals import terminal_signals

CTRL_C = b"\x03"
# Slow steps, so the run is still training when the test types Ctrl-C.
ARGS = (
    "--nodes",
    "2",
    "--set",
    "train.train_iters=60",
    "--set",
    "train.save_iters=1000",
    "--set",
    "train.step_sleep=0.1",
)


class Terminal:
    """A command on the slave side of a pty, as the foreground job of its own terminal."""

    def __init__(self, argv: list[str], cwd: Path) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: its own session, the pty as its controlling terminal
            try:
                terminal_signals()  # as a shell leaves them for its foreground job
                os.chdir(cwd)
                os.execv(argv[0], argv)
            finally:
                os._exit(127)
        self.output = bytearray()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self.fd, 4096)
            except OSError:  # EIO once the child side closed
                return
            if not chunk:
                return
            self.output.extend(chunk)

    def type(self, data: bytes) -> None:
        os.write(self.fd, data)

    def wait(self, limit: float) -> int:
        """The exit status (128 + signal for a signalled child); fails after `limit` s."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.reader.join(5)
                return os.waitstatus_to_exitcode(status) % 256
            time.sleep(0.2)
        os.kill(self.pid, 9)
        pytest.fail(f"the command did not exit within {limit}s after Ctrl-C:\n{self.text()[-3000:]}")

    def text(self) -> str:
        return self.output.decode("utf-8", "replace")


def alive(pid: int) -> bool:
    """True while `pid` is a process that is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def run_pids(run: Path) -> set[int]:
    """The run's processes now: each job's recorded pid (state.db) and everything below it,
    plus every process started with FM9G_RUN_DIR pointing at the run."""
    with runs.state(run) as store:
        jobs = [int(row.job_id) for row in store.jobs() if row.job_id and row.job_id.isdigit()]
    pids = set(run_processes(run))
    for job in jobs:
        if alive(job):
            pids.add(job)
            pids.update(descendants(job))
    return pids


def start_training(tmp_path: Path, name: str) -> tuple[Terminal, Path, set[int]]:
    """The tiny run in a terminal, once it has taken a few steps; its processes then."""
    argv = runs.pretrain_argv(tmp_path / "runs", name, *ARGS)
    terminal = Terminal(argv, tmp_path)
    run = tmp_path / "runs" / name
    runs.wait_for(lambda: runs.last_step(run) >= 5, 180, "five training steps")
    pids = run_pids(run)
    assert len(pids) >= 6, pids  # two wrappers, two agents, two torchruns, their trainers
    return terminal, run, pids


def interrupt_events(run: Path) -> list[dict]:
    return [event.data for event in runs.events(run, "interrupt")]


@pytest.mark.slow
def test_ctrl_c_checkpoints_stops_everything_and_the_same_command_resumes(tmp_path: Path) -> None:
    terminal, run, pids = start_training(tmp_path, "cc")
    terminal.type(CTRL_C)
    code = terminal.wait(180)
    assert code == 130, terminal.text()[-3000:]
    assert not [pid for pid in pids if alive(pid)], terminal.text()[-3000:]
    assert run_processes(run) == []
    # The graceful path: every node agent ended with the continue code after its trainers saved.
    with runs.state(run) as store:
        ends = {row.node_rank: row.exit_code for row in store.jobs("train")}
    assert ends == {0: protocol.EXIT_CONTINUE, 1: protocol.EXIT_CONTINUE}, ends
    stopped = interrupt_events(run)
    assert stopped[0]["mode"] == "checkpoint" and stopped[-1]["mode"] == "checkpoint"
    step = runs.checkpoint_step(run)
    assert step >= 5 and stopped[-1]["step"] == step
    assert not (run / "control" / "checkpoint_now").exists()

    again = subprocess.run(
        runs.pretrain_argv(tmp_path / "runs", "cc", *ARGS), cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_step"] == 60 and summary["sessions"] == 2
    # The second session's first logged step is the one after the checkpoint.
    generations = [record for record in runs.metrics(run) if record["generation"] > 0]
    assert generations[0]["step"] == step + 1, generations[:2]


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once(tmp_path: Path) -> None:
    terminal, run, pids = start_training(tmp_path, "cc2")
    terminal.type(CTRL_C)
    runs.wait_for(lambda: interrupt_events(run), 60, "the first Ctrl-C on the record")
    terminal.type(CTRL_C)
    code = terminal.wait(120)
    assert code == 130, terminal.text()[-3000:]
    assert not [pid for pid in pids if alive(pid)], terminal.text()[-3000:]
    assert run_processes(run) == []
    modes = [event["mode"] for event in interrupt_events(run)]
    assert modes[0] == "checkpoint" and modes[-1] == "kill", modes


# ------------------------------------------------------------------------- Slurm


def squeue_ids() -> set[str]:
    listed = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, check=True, timeout=30)
    return set(listed.stdout.split())


@pytest.mark.cluster
def test_ctrl_c_on_slurm_detaches_and_names_resume_and_cancel(shared_tmp: Path) -> None:
    argv = runs.pretrain_argv(shared_tmp, "ccs", *ARGS, executor="slurm")
    terminal = Terminal(argv, shared_tmp)
    run = shared_tmp / "ccs"
    try:
        runs.wait_for(lambda: runs.last_step(run) >= 2, 300, "two training steps on the cluster")
        terminal.type(CTRL_C)
        code = terminal.wait(60)
        assert code == 130, terminal.text()[-3000:]
        [detached] = interrupt_events(run)
        assert detached["mode"] == "detach"
        assert detached["resume"] == f"fm9g-launch resume {run}"
        assert detached["cancel"] == f"fm9g-launch cancel {run}"
        assert len(detached["job_ids"]) == 2
        assert set(detached["job_ids"]) <= squeue_ids()  # still queued or running
        assert "fm9g-launch resume" in terminal.text() and "fm9g-launch cancel" in terminal.text()
    finally:
        subprocess.run(runs.cli("cancel", str(run)), capture_output=True, timeout=120, check=False)


def test_run_processes_finds_a_runs_processes_and_no_others(tmp_path: Path) -> None:
    run, other = tmp_path / "run", tmp_path / "run-2"
    ours = subprocess.Popen(["sleep", "60"], env={**os.environ, "FM9G_RUN_DIR": str(run)}, start_new_session=True)
    theirs = subprocess.Popen(["sleep", "60"], env={**os.environ, "FM9G_RUN_DIR": str(other)}, start_new_session=True)
    try:
        found = run_processes(run)
        assert ours.pid in found and theirs.pid not in found
    finally:
        for child in (ours, theirs):
            child.kill()
            child.wait()
    assert run_processes(run) == []
