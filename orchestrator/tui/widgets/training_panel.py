"""`TrainingPanel`: step/train_iters with a bar and ETA, loss and lr sparklines,
tokens/s and grad norm, and the latest loss of every task, fitted to its width."""

from __future__ import annotations

from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

from fm9g.orchestrator.tui.format import (
    format_eta,
    format_loss,
    format_lr,
    format_rate,
    progress_bar,
    sparkline,
    truncate,
)
from fm9g.orchestrator.views import MetricsView


class TrainingPanel(Widget):
    DEFAULT_CSS = """
    TrainingPanel { height: 5; padding: 0 1; }
    """

    metrics: reactive[MetricsView | None] = reactive(None, always_update=True)

    def render(self) -> Text:
        width = max(20, self.content_size.width)
        metrics = self.metrics
        if metrics is None or metrics.last is None:
            return Text("no metrics yet (metrics.jsonl appears with the first logged step)", style="dim")
        last = metrics.last
        total = metrics.train_iters
        head = f"step {last.step:,}" + (f"/{total:,}" if total else "")
        tail = f" ETA {format_eta(metrics.eta_s)}"
        percent = f" {100 * last.step / total:3.0f}%" if total else ""
        bar_width = width - len(head) - len(tail) - len(percent) - 1
        lines = [Text(head, style="bold")]
        if total and bar_width >= 4:
            lines[0].append(" " + progress_bar(last.step, total, bar_width), style="green")
        lines[0].append(percent + tail)
        for label, value, series, style in (
            ("loss", format_loss(last.loss), metrics.losses, "cyan"),
            ("lr  ", format_lr(last.lr), metrics.lrs, "magenta"),
        ):
            line = Text(f"{label} {value:>9} ")
            line.append(sparkline(series, width - line.cell_len), style=style)
            lines.append(line)
        rate = f"tok/s {format_rate(last.tokens_per_s)}   grad {format_loss(last.grad_norm)}"
        lines.append(Text(rate))
        if metrics.tasks:
            tasks = "  ".join(f"{task} {loss:.3f}" for task, loss in sorted(metrics.tasks.items()))
            lines.append(Text(truncate("tasks " + tasks, width)))
        return Text("\n").join(lines)
