"""`fm9g-launch plot`: a run's loss and lr curves (overall, and loss per task) from
metrics.jsonl, drawn to a PNG with matplotlib's Agg canvas (no display, no pyplot
global state)."""

from __future__ import annotations

import json
from pathlib import Path

from fm9g.rundir import RunDir
from fm9g.orchestrator.tui.metrics import MetricPoint, parse_point


class PlotError(ValueError):
    """Nothing to plot; the message says why and what to check."""


def read_points(path: Path) -> list[MetricPoint]:
    """Every logged step of metrics.jsonl, by step; a step logged twice (a resumed run
    replays the steps after its last checkpoint) keeps its latest value.  Bad and
    partial lines are skipped."""
    by_step: dict[int, MetricPoint] = {}
    try:
        handle = open(path, "rb")
    except OSError as exc:
        raise PlotError(f"cannot read {path}: {exc.strerror}; has the run logged a step yet?") from exc
    with handle:
        for line in handle:
            try:
                point = parse_point(json.loads(line))
            except ValueError:
                continue
            if point is not None:
                by_step[point.step] = point
    return [by_step[step] for step in sorted(by_step)]


def plot_run(run: RunDir, output: Path, *, dpi: int = 120) -> Path:
    """Write the curves of `run` to `output` (PNG); returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    points = read_points(run.metrics)
    losses = [(p.step, p.loss) for p in points if p.loss is not None]
    lrs = [(p.step, p.lr) for p in points if p.lr is not None]
    if not losses and not lrs:
        raise PlotError(f"{run.metrics} has no step with a loss or an lr to plot")
    tasks = sorted({task for p in points for task in p.task_losses})

    figure = Figure(figsize=(10, 7), layout="constrained")
    FigureCanvasAgg(figure)
    loss_axes, lr_axes = figure.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    if losses:
        loss_axes.plot(*zip(*losses), label="loss", color="black", linewidth=1.6)
    for task in tasks:
        series = [(p.step, p.task_losses[task]) for p in points if task in p.task_losses]
        loss_axes.plot(*zip(*series), label=task, linewidth=0.9, alpha=0.85)
    loss_axes.set_ylabel("loss")
    loss_axes.grid(True, alpha=0.3)
    if losses or tasks:
        loss_axes.legend(loc="upper right", fontsize="small", ncols=min(4, 1 + len(tasks)))
    if lrs:
        lr_axes.plot(*zip(*lrs), color="tab:purple", linewidth=1.2)
    lr_axes.set_ylabel("lr")
    lr_axes.set_xlabel("step")
    lr_axes.grid(True, alpha=0.3)
    lr_axes.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    last = points[-1]
    figure.suptitle(f"{run.name}: step {last.step}" + (f", loss {last.loss:.4f}" if last.loss is not None else ""))
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=dpi, format="png")
    return output
