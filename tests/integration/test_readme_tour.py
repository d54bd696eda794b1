"""The README's "first ten minutes" tour, run as written.

The commands come from README.md itself: every ```bash block between `<!-- tour:NAME -->`
and `<!-- /tour -->`, run in order by bash (-e -u -o pipefail) in a fresh directory that
holds the repository's `examples/`, with this interpreter's environment first on PATH
(what `. .venv/bin/activate` gives).  Then it checks what a newcomer looks at: the run
completed (state.db), `status` shows it, the TUI renders it, the plot file exists in the
run directory, the generations of the summary and of `infer` are readable text, and so is
the served completion; `serve --stop` leaves no server.  Neither tour names an executor:
the local one runs with Slurm hidden (SLURM_CONF naming no file, as on a machine without
Slurm) and its run records that `auto` chose local; the cluster one records slurm."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fm9g.orchestrator.executors.choose import EVENT as EXECUTOR_CHOICE
from fm9g.orchestrator.state import StageStatus
from tests.helpers import runs

README = runs.REPO / "README.md"
FENCE = re.compile(r"^```bash\n(.*?)^```", re.S | re.M)
# Control characters (NUL runs are what byte-fallback soup decodes to), U+FFFD from a
# broken UTF-8 sequence, or a byte-fallback piece spelled out.
NOT_TEXT = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\ufffd]|<0x[0-9A-F]{2}>")


def tour(name: str) -> list[str]:
    """The bash blocks of README.md's tour `name`, in order."""
    text = README.read_text(encoding="utf-8")
    start, end = f"<!-- tour:{name} -->", "<!-- /tour -->"
    if start not in text:
        pytest.fail(f"{README}: no {start} ... {end} section: the tour test reads its commands from there")
    blocks = FENCE.findall(text.split(start, 1)[1].split(end, 1)[0])
    assert blocks, f"{README}: the {start} section has no ```bash blocks"
    return blocks


def readable(text: str) -> bool:
    """Text a person can read: no control characters or byte pieces, and some letters."""
    return not NOT_TEXT.search(text) and any(char.isalpha() for char in text)


def walk(blocks: list[str], cwd: Path, **extra_env: str) -> list[str]:
    """Run each block in `cwd`; their outputs.  A failing block fails the test with its output."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    env.update(extra_env)
    (cwd / "examples").symlink_to(runs.REPO / "examples")
    outputs = []
    for block in blocks:
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", block], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
        )
        assert result.returncode == 0, (
            f"README block failed:\n{block}\n--- output\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
        )
        outputs.append(result.stdout)
    return outputs


def output_of(blocks: list[str], outputs: list[str], command: str) -> str:
    """The output of the block that runs `command`."""
    found = [out for block, out in zip(blocks, outputs) if command in block]
    assert found, f"the tour has no block running {command!r}"
    return found[0]


def check_tour(blocks: list[str], outputs: list[str], cwd: Path, executor: str) -> None:
    script = "\n".join(blocks)
    name = re.search(r"runs/([\w.-]+)", script).group(1)  # type: ignore[union-attr]
    run = cwd / "runs" / name
    # No executor is named: `auto` chose this one, once, and the run keeps it.
    assert "--executor" not in script.split("fm9g-launch pretrain", 1)[1].split("\n", 1)[0]
    [choice] = runs.events(run, EXECUTOR_CHOICE)
    assert (choice.data["requested"], choice.data["chosen"]) == ("auto", executor), choice.data
    with runs.state(run) as store:
        assert store.meta("executor") == executor
    # The run completed.
    stage = runs.stage(run)
    assert stage is not None and stage.status is StageStatus.COMPLETED, stage
    # `status` names it and its state.
    status = output_of(blocks, outputs, "fm9g-launch status")
    assert re.search(rf"^{re.escape(name)}\s+COMPLETED\b", status, re.M), status[-2000:]
    # The TUI's screen, rendered headless, shows the run.
    if "tui.screenshot" in script:
        assert name in (cwd / "tui.svg").read_text(encoding="utf-8")
    # The plot is in the run directory, where `plot` says it wrote it.
    [wrote] = re.findall(r"^wrote (\S+\.png)$", output_of(blocks, outputs, "fm9g-launch plot"), re.M)
    assert Path(wrote).is_file() and Path(wrote).resolve().parent == run.resolve()
    # The summary ends with generations (a tiny model is sampled on the login node's CPU).
    summary = output_of(blocks, outputs, "fm9g-launch pretrain")
    samples = re.findall(r"^    '.*' -> '(.*)'$", summary, re.M)
    assert samples and all(readable(sample) for sample in samples), summary[-1500:]
    # infer's generations.
    out = cwd / re.search(r"--output (\S+)", script).group(1)  # type: ignore[union-attr]
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert records and all(readable(record["text"]) for record in records), [r["text"] for r in records]
    # The served completion (the python block prints it), and no server after --stop.
    served = output_of(blocks, outputs, "completions.create").strip()
    assert readable(served), repr(served)
    assert not (run / "serve" / "endpoint.json").exists()
    with runs.state(run) as store:
        assert not store.jobs("serve", live_only=True)


@pytest.mark.slow
def test_local_tour(tmp_path: Path) -> None:
    """On a machine without Slurm (hidden here: SLURM_CONF names no file), auto picks local."""
    blocks = tour("local")
    outputs = walk(blocks, tmp_path, SLURM_CONF=str(tmp_path / "no-slurm.conf"))
    check_tour(blocks, outputs, tmp_path, executor="local")


@pytest.mark.cluster
def test_cluster_tour(shared_tmp: Path) -> None:
    blocks = tour("cluster")
    try:
        check_tour(blocks, walk(blocks, shared_tmp), shared_tmp, executor="slurm")
    finally:
        for run in (shared_tmp / "runs").glob("*"):  # never leave jobs on the shared cluster
            subprocess.run(runs.cli("serve", str(run), "--stop"), capture_output=True, timeout=120, check=False)
            subprocess.run(runs.cli("cancel", str(run)), capture_output=True, timeout=120, check=False)
