"""`fm9g-launch plot`: a run's loss and lr curves (overall, and loss per task) from
metrics.jsonl, drawn to a PNG with matplotlib's Agg canvas (no display, no pyplot
global state)."""

from __future__ import annotations

from pathlib import Path

from fm9g.orchestrator.views import MetricPoint, read_points
from fm9g.rundir import RunDir
from fm9g.rundir.atomic import atomic_output

DEFAULT_NAME = "curves.png"


class PlotError(ValueError):
    """Nothing to plot; the message says why and what to check."""


def default_output(run: RunDir) -> Path:
    """Where `plot` writes when no --output is given: inside the run directory, next to
    the metrics it was drawn from, whatever the current directory is."""
    return run.root / DEFAULT_NAME


def load_points(run: RunDir) -> list[MetricPoint]:
    """The run's logged steps; PlotError when metrics.jsonl cannot be read."""
    try:
        return read_points(run.metrics)
    except OSError as exc:
        raise PlotError(f"cannot read {run.metrics}: {exc.strerror}; has the run logged a step yet?") from exc


def plot_run(run: RunDir, output: Path | None = None, *, dpi: int = 120) -> Path:
    """Write the curves of `run` to `output` (PNG; default `runs/NAME/curves.png`),
    atomically, so a viewer that reloads it never sees half an image; returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    points = load_points(run)
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
    output = default_output(run) if output is None else Path(output)
    with atomic_output(output) as handle:
        figure.savefig(handle, dpi=dpi, format="png")
    return output
