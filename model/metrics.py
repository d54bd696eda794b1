"""What the trainer reports: a stdout line per step, TensorBoard scalars, metrics.jsonl
lines (rank 0), and a heartbeat file per node (local rank 0 of each node).

metrics.jsonl is appended with one `write()` per line on an O_APPEND descriptor, so a
reader (status, TUI) sees whole lines or nothing new; heartbeats go through the atomic
writer because the supervisor reads them while they are rewritten.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from fm9g.rundir.atomic import write_json

# TensorBoard tag of each metrics field; per-task losses go to Loss/train/<task>.
TAGS = {
    "loss": "Loss/train",
    "lr": "Optimizer/lr",
    "grad_norm": "Optimizer/grad_norm",
    "tokens_per_s": "Throughput/tokens_per_s",
    "tflops": "Throughput/tflops",
    "mfu": "Throughput/mfu",
}


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


class MetricsLogger:
    """Rank 0's sinks: stdout, TensorBoard (tensorboardX) and metrics.jsonl."""

    def __init__(self, metrics_path: Path, tensorboard_dir: Path, enabled: bool) -> None:
        self.enabled = enabled
        self.writer = None
        self.fd: int | None = None
        if enabled:
            from tensorboardX import SummaryWriter

            tensorboard_dir.mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(logdir=str(tensorboard_dir))
            self.fd = os.open(metrics_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def say(self, message: str) -> None:
        """A line on stdout (rank 0 only)."""
        if self.enabled:
            print(message, flush=True)

    def log_step(self, record: dict[str, Any]) -> None:
        """One step's figures to all three sinks."""
        if not self.enabled:
            return
        step = record["step"]
        parts = [f"step {step}"]
        for key, fmt in (
            ("loss", "loss {:.4f}"),
            ("lr", "lr {:.3e}"),
            ("grad_norm", "grad_norm {:.3f}"),
            ("tokens_per_s", "tokens/s {:.0f}"),
            ("tflops", "tflops {:.3f}"),
            ("mfu", "mfu {:.2%}"),
        ):
            if _finite(record.get(key)):
                parts.append(fmt.format(record[key]))
        if record.get("task_loss"):
            parts.append("task_loss " + " ".join(f"{k}={v:.4f}" for k, v in record["task_loss"].items()))
        print(" | ".join(parts), flush=True)
        for key, tag in TAGS.items():
            if _finite(record.get(key)):
                self.writer.add_scalar(tag, record[key], step)
        for task, value in (record.get("task_loss") or {}).items():
            if _finite(value):  # FM9G skipped NaN task losses too
                self.writer.add_scalar(f"Loss/train/{task}", value, step)
        self.writer.flush()
        line = json.dumps({"time": time.time(), **record}, ensure_ascii=False) + "\n"
        os.write(self.fd, line.encode("utf-8"))

    def log_inspect(self, step: int, stats: dict[str, dict[str, float]]) -> None:
        """Per-parameter statistics (train.inspect_iters): a table on stdout and Inspect/* scalars."""
        if not self.enabled:
            return
        print(f"inspect step {step}: {'name':<60} {'std':>10} {'max|w|':>10} {'grad_std':>10}", flush=True)
        for name, values in stats.items():
            print(
                f"  {name:<72} {values['std']:10.4g} {values['max']:10.4g} {values.get('grad_std', float('nan')):10.4g}"
            )
            for key, value in values.items():
                if _finite(value):
                    self.writer.add_scalar(f"Inspect/{name}/{key}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def write_heartbeat(
    path: Path, step: int, generation: int, started: float, start_step: int, first_step_at: float | None = None
) -> None:
    """The node's liveness record, read by the supervisor: `started` (when this trainer
    process passed the rendezvous), `start_step` and `first_step_at` (when it finished its
    first step) date the phases of a recovery."""
    write_json(
        path,
        {
            "step": step,
            "time": time.time(),
            "pid": os.getpid(),
            "generation": generation,
            "started": started,
            "start_step": start_step,
            "first_step_at": first_step_at,
        },
        indent=None,
        durable=False,
    )
