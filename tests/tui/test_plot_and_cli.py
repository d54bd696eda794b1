"""`fm9g-launch plot` and the CLI wiring of `tui`/`plot`: lazy imports, arguments, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fm9g.orchestrator.cli import build_parser, main
from fm9g.orchestrator.plot import PlotError, plot_run
from fm9g.orchestrator.views import read_points
from fm9g.rundir import RunDir

from .conftest import STEPS, DemoRun

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_plot_writes_a_png(demo_run: DemoRun, tmp_path: Path) -> None:
    output = plot_run(demo_run.run, tmp_path / "out" / "curves.png")
    assert output.read_bytes()[:8] == PNG_MAGIC


def test_plot_command(demo_run: DemoRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "c.png"
    assert main(["plot", str(demo_run.run.root), "--output", str(output)]) == 0
    assert output.read_bytes()[:8] == PNG_MAGIC and "wrote" in capsys.readouterr().out


def test_plot_writes_into_the_run_directory_by_default(
    demo_run: DemoRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the current directory gets nothing
    assert main(["plot", str(demo_run.run.root)]) == 0
    assert (demo_run.run.root / "curves.png").read_bytes()[:8] == PNG_MAGIC
    assert list(elsewhere.iterdir()) == []


def test_read_points_keeps_the_latest_of_a_replayed_step(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    lines = [
        {"step": 1, "loss": 3.0},
        {"step": 2, "loss": 2.0},
        {"step": 2, "loss": 2.5},
        {"step": 3, "task_loss": {"x": 1.0}},
    ]
    path.write_text("\n".join(json.dumps(line) for line in lines) + '\n{"step": 4, "lo')
    points = read_points(path)
    assert [(p.step, p.loss) for p in points] == [(1, 3.0), (2, 2.5), (3, None)]
    assert points[-1].task_losses == {"x": 1.0}


def test_plot_errors_say_why(tmp_path: Path) -> None:
    run = RunDir.of(tmp_path / "empty")
    with pytest.raises(PlotError, match="has the run logged a step"):
        plot_run(run, tmp_path / "x.png")
    run.root.mkdir()
    run.metrics.write_text('{"step": 1}\n')
    with pytest.raises(PlotError, match="no step with a loss or an lr"):
        plot_run(run, tmp_path / "x.png")


def test_parser_knows_tui_and_plot(demo_run: DemoRun) -> None:
    args = build_parser().parse_args(["tui", str(demo_run.run.root), "--interval", "0.5"])
    assert args.command == "tui" and args.run == demo_run.run.root and args.interval == 0.5
    args = build_parser().parse_args(["tui"])
    assert args.run is None
    args = build_parser().parse_args(["plot", "runs/x", "-o", "a.png"])
    assert args.command == "plot" and args.output == Path("a.png")


def test_tui_rejects_a_missing_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tui", str(tmp_path / "nope")]) == 2
    assert "neither a run directory nor a directory of runs" in capsys.readouterr().err


def test_help_imports_neither_textual_nor_matplotlib() -> None:
    code = (
        "import sys\nfrom fm9g.orchestrator.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('textual', 'matplotlib'))\n"
        "print('HEAVY', heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "tui" in result.stdout and "plot" in result.stdout
    assert "HEAVY []" in result.stdout, result.stdout[-500:]


def test_status_step_matches_the_fixture(demo_run: DemoRun, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", str(demo_run.run.root), "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)["runs"][0]
    assert facts["progress"]["step"] == STEPS


def test_screenshot_module_writes_an_svg(demo_run: DemoRun, tmp_path: Path) -> None:
    from fm9g.orchestrator.tui.screenshot import main as screenshot

    output = tmp_path / "shot" / "tui.svg"
    assert screenshot([str(demo_run.run.root), str(output), "--size", "100x30", "--keys", "t"]) == 0
    svg = output.read_text(encoding="utf-8")
    assert svg.startswith("<svg") and "fm9g-launch&#160;tui&#160;demo" in svg and "recovery" in svg
