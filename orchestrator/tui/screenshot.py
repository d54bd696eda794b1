"""An SVG screenshot of the TUI on a run, for the README and bug reports:

    python -m fm9g.orchestrator.tui.screenshot runs/NAME docs/tui.svg [--size 120x36] [--keys t]

The app runs headless at the given size, refreshes until its reads settle, optionally
gets some key presses, and writes what the screen shows."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from fm9g.orchestrator.tui.app import make_app


async def capture(target: Path, size: tuple[int, int], keys: list[str] | None = None) -> str:
    """The SVG of the main screen on `target` (a run or a directory of runs)."""
    app = make_app(target, interval=3600)  # the refreshes below are explicit
    async with app.run_test(size=size) as pilot:
        for _ in range(4):  # the first read, then the log and the messages it causes
            await app.workers.wait_for_complete()
            await pilot.pause()
        if keys:
            await pilot.press(*keys)
            for _ in range(2):
                await app.workers.wait_for_complete()
                await pilot.pause()
        return app.export_screenshot(title=f"fm9g-launch tui {Path(target).resolve().name}")


def parse_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: give COLUMNSxROWS, e.g. 120x36") from exc
    if width < 40 or height < 12:
        raise argparse.ArgumentTypeError(f"{text}: at least 40x12")
    return width, height


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fm9g.orchestrator.tui.screenshot",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run", type=Path, help="a run directory (or a directory of runs)")
    parser.add_argument("output", type=Path, help="the SVG file to write")
    parser.add_argument("--size", type=parse_size, default=(120, 36), help="COLUMNSxROWS (default 120x36)")
    parser.add_argument("--keys", nargs="*", default=[], help="keys to press first, e.g. t (failures) or down")
    args = parser.parse_args(argv)
    if not args.run.is_dir():
        parser.error(f"{args.run} is not a directory")
    svg = asyncio.run(capture(args.run, args.size, args.keys))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(svg, encoding="utf-8")
    print(f"wrote {args.output} ({args.size[0]}x{args.size[1]})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
