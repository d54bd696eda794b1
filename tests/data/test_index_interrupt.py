"""`fm9g-launch index -j N` stopped from outside: SIGTERM cleans up like Ctrl-C, SIGKILL of
the parent takes the workers with it, and the next run sweeps what a killed run left."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fm9g.data.index_temp import make_temp_dir, sweep_stale, temp_prefix
from fm9g.data.indexer import build_index
from tests.helpers.signals import terminal_signals

from .conftest import corpus_lines

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to find the workers")


def _big_input(path: Path) -> Path:
    """A jsonl over 8 MiB, so that a -j 2 build has two shards and a worker pool."""
    text = ("\n".join(json.dumps({"output": line}, ensure_ascii=False) for line in corpus_lines(2000)) + "\n").encode()
    with open(path, "wb") as handle:
        while handle.tell() < 9 << 20:
            handle.write(text)
    return path


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status", encoding="ascii", errors="replace") as status:
                for line in status:
                    if line.startswith("PPid:"):
                        if int(line.split()[1]) == pid:
                            found.append(int(entry))
                        break
        except OSError:
            continue
    return found


def _alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_until(check, what: str, limit: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    """Poll `check` (a bound on waiting, not an assertion on time)."""
    deadline = time.monotonic() + limit
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.02)


def _finish(process: subprocess.Popen[bytes]) -> bytes:
    """The process's stderr once it exits; if it hangs, its threads' stacks in the failure."""
    try:
        return process.communicate(timeout=120)[1]
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGABRT)
        raise AssertionError("fm9g-launch index hung:\n" + process.communicate()[1].decode()[-6000:]) from None


def _start_index(tmp_path: Path, tokenizer: Path) -> tuple[subprocess.Popen[bytes], Path, list[int]]:
    """Start `fm9g-launch index -j 2`, stop it (SIGSTOP) once its two workers exist; return them."""
    source = _big_input(tmp_path / "in.jsonl")
    output = tmp_path / "out" / "idx"
    # The tokenizer makes the shards slow enough to be mid-build; SIGSTOP then pins the parent
    # before it can merge, so the signal always lands during the build.
    command = [
        sys.executable,
        "-m",
        "fm9g.orchestrator.cli",
        "index",
        str(source),
        "-o",
        str(output),
        "-j",
        "2",
        "--tokenizer",
        str(tokenizer),
        "--no-progress",
    ]
    env = {**os.environ, "PYTHONFAULTHANDLER": "1"}  # a hang (SIGABRT below) shows every thread's stack
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, preexec_fn=terminal_signals
    )
    _wait_until(lambda: len(_children(process.pid)) >= 2 or process.poll() is not None, "the index workers")
    assert process.poll() is None, process.communicate()
    os.kill(process.pid, signal.SIGSTOP)
    return process, output, _children(process.pid)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_cleans_up_like_ctrl_c_and_prints_the_index_message(
    tmp_path: Path, sp_model: Path, signum: signal.Signals
) -> None:
    process, output, workers = _start_index(tmp_path, sp_model)
    os.kill(process.pid, signum)
    os.kill(process.pid, signal.SIGCONT)
    stderr = _finish(process)
    assert process.returncode == 128 + signum, stderr
    text = stderr.decode()
    assert "index interrupted" in text and "run the same command again" in text
    assert "resume RUN" not in text and "Traceback" not in text, text
    assert not output.exists()
    assert [p.name for p in output.parent.iterdir()] == []  # no hidden .idx.work-/.tmp- folder left
    for pid in workers:
        _wait_until(lambda pid=pid: not _alive(pid), f"worker {pid} to exit")


def test_sigkill_of_the_parent_ends_the_workers_and_the_next_run_sweeps_its_folders(
    tmp_path: Path, sp_model: Path
) -> None:
    process, output, workers = _start_index(tmp_path, sp_model)
    os.kill(process.pid, signal.SIGKILL)
    process.communicate(timeout=120)
    for pid in workers:  # PR_SET_PDEATHSIG: the kernel kills them; before, they blocked on the queue forever
        _wait_until(lambda pid=pid: not _alive(pid), f"orphaned worker {pid} to die")
    left = [p for p in output.parent.iterdir() if p.name.startswith(f".{output.name}.")]
    assert any(".work-" in p.name for p in left), "a SIGKILLed build cannot remove its work folder"

    result = build_index(tmp_path / "in.jsonl", output)
    assert sorted(result.stale_removed) == sorted(str(p) for p in left)
    assert [p.name for p in output.parent.iterdir()] == ["idx"]


def test_sweep_leaves_folders_of_live_processes_other_hosts_and_other_outputs(tmp_path: Path) -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        mine_live = make_temp_dir(tmp_path, "idx", "work")  # this process: alive
        other_live = tmp_path / (temp_prefix("idx", "tmp").rsplit("-", 2)[0] + f"-{sleeper.pid}-abc")
        stale = tmp_path / (temp_prefix("idx", "tmp").rsplit("-", 2)[0] + f"-{dead.pid}-abc")
        other_host = tmp_path / f".idx.tmp-someotherhost-{dead.pid}-abc"
        other_output = tmp_path / (temp_prefix("data", "tmp").rsplit("-", 2)[0] + f"-{dead.pid}-abc")
        legacy = tmp_path / ".idx.work-k2j3h4g5"  # an old-style name: cannot tell whether it is in use
        for path in (other_live, stale, other_host, other_output, legacy):
            path.mkdir()
        (stale / "data.jsonl").write_bytes(b"x" * 1000)
        swept = sweep_stale(tmp_path, "idx")
        assert [(s.path, s.nbytes) for s in swept] == [(stale, 1000)]
        assert all(p.exists() for p in (mine_live, other_live, other_host, other_output, legacy))
    finally:
        sleeper.kill()
        sleeper.wait()
