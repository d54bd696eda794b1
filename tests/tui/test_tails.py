"""LogFollower and MetricsTail against real files: growth, partial lines, truncation,
rotation, split UTF-8 characters."""

from __future__ import annotations

import json
import os
from pathlib import Path

from fm9g.orchestrator.tui.logtail import LogFollower
from fm9g.orchestrator.views import MetricsTail, parse_point


def append(path: Path, data: bytes) -> None:
    with open(path, "ab") as handle:
        handle.write(data)


def test_log_follower_grows_truncates_rotates(tmp_path: Path) -> None:
    log = tmp_path / "job.out"
    follower = LogFollower(log)
    assert follower.poll().missing
    log.write_bytes(b"one\n")
    first = follower.poll()
    assert first.text == "one\n" and not first.reopened
    append(log, b"two\nthr")
    assert follower.poll().text == "two\nthr"
    assert follower.poll().text == ""
    append(log, b"ee\n")
    assert follower.poll().text == "ee\n"
    # truncation: `> log` then new output
    log.write_bytes(b"new\n")
    chunk = follower.poll()
    assert chunk.reopened and chunk.text == "new\n"
    # rotation: what the old file got last is still delivered, then the new file
    append(log, b"last of old\n")
    os.rename(log, tmp_path / "job.out.1")
    gone = follower.poll()  # between the rename and the new file: the old file's rest
    assert gone.missing and gone.text == "last of old\n"
    log.write_bytes(b"fresh\n")
    chunk = follower.poll()
    assert chunk.reopened and chunk.before == "" and chunk.text == "fresh\n"
    follower.close()


def test_log_follower_rotation_without_gap(tmp_path: Path) -> None:
    log = tmp_path / "job.out"
    log.write_bytes(b"a\n")
    follower = LogFollower(log)
    follower.poll()
    append(log, b"b\n")
    os.rename(log, tmp_path / "old")
    log.write_bytes(b"c\n")
    chunk = follower.poll()
    assert (chunk.before, chunk.reopened, chunk.text) == ("b\n", True, "c\n")
    follower.close()


def test_log_follower_keeps_split_utf8_and_starts_near_the_end(tmp_path: Path) -> None:
    log = tmp_path / "job.out"
    text = "训练开始\n".encode()
    log.write_bytes(text[:4])
    follower = LogFollower(log)
    assert follower.poll().text == "训"
    append(log, text[4:])
    assert follower.poll().text == "练开始\n"
    follower.close()
    big = tmp_path / "big.out"
    big.write_bytes(b"".join(b"line %d\n" % i for i in range(20000)))
    tail = LogFollower(big, initial_bytes=1000)
    text = tail.poll().text
    assert text.endswith("line 19999\n") and text.startswith("line ") and len(text) <= 1000
    tail.close()


def test_parse_point_reads_what_the_trainer_writes() -> None:
    """model/train.py `_report` writes per-task losses as one `task_loss` dict; a value
    that is not a finite number is dropped, and nothing else is read as a task's loss."""
    point = parse_point(
        {
            "step": 3,
            "loss": 2.5,
            "lr": float("nan"),
            "task_loss": {"wiki": 2.0, "bad": "x", "inf": 1e999},
            "loss/code": 1.5,
            "task_losses": {"chat": 1.0},
        }
    )
    assert point is not None and point.step == 3 and point.lr is None
    assert point.task_losses == {"wiki": 2.0}
    assert parse_point({"loss": 1.0}) is None
    assert parse_point([1, 2]) is None
    assert parse_point({"step": True}) is None


def test_metrics_tail_partial_lines_and_truncation(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    tail = MetricsTail(path, history=5)
    assert not tail.poll() and tail.last is None
    path.write_text("".join(json.dumps({"step": s, "loss": 10.0 - s}) + "\n" for s in range(1, 8)) + '{"step": 8, "lo')
    assert tail.poll()
    assert [p.step for p in tail.points] == [3, 4, 5, 6, 7]  # bounded history
    append(path, b'ss": 2.0, "task_loss": {"code": 1.0}}\n')
    assert tail.poll() and tail.last is not None and tail.last.step == 8 and tail.tasks == {"code": 1.0}
    assert not tail.poll()
    append(path, b'not json\n{"step": 9}')  # a bad line is skipped; a complete unterminated object is taken
    assert tail.poll() and tail.last is not None and tail.last.step == 9
    path.write_text(json.dumps({"step": 1, "loss": 5.0}) + "\n")  # a restarted trainer rewrote it
    assert tail.poll()
    assert [p.step for p in tail.points] == [1]


def test_metrics_tail_starts_near_the_end_of_a_big_file(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 5001)))
    tail = MetricsTail(path, history=100, initial_bytes=2000)
    tail.poll()
    assert tail.last is not None and tail.last.step == 5000
    assert all(p.step > 4900 for p in tail.points)
