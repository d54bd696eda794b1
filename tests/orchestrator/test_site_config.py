"""Site defaults (issue 15 #5): default < site file < run config < --set, the provenance
`config show` reports, a bad site file named with its field and fix, and a run that
never reads the site file again once its config.yaml is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fm9g.orchestrator.cli import main
from fm9g.rundir import RunDir, site
from fm9g.rundir import config as config_mod
from tests.helpers.runs import TINY

SITE = """\
cluster:
  partition: site-part
  account: site-acct
  qos: site-qos
  setup: ["module load site-cuda"]
supervise:
  poll_interval: 7.5
"""

RUN = """\
cluster:
  account: run-acct
  qos: run-qos
  setup: ["source /run/env/bin/activate"]
"""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def site_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = write(tmp_path / "site" / "site.yaml", SITE)
    monkeypatch.setenv(site.SITE_ENV, str(path))
    return path


def show_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, dict[str, object]]:
    assert main(["config", "show", "--json", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_each_layer_wins_over_the_one_below(tmp_path: Path, site_file: Path) -> None:
    run = write(tmp_path / "run.yaml", RUN)
    layered = site.load(run, ["cluster.qos=cli-qos"])
    cluster = layered.config.cluster
    assert cluster.mem is None  # default: no layer sets it
    assert cluster.partition == "site-part"  # site file over the default
    assert cluster.account == "run-acct"  # run config over the site file
    assert cluster.qos == "cli-qos"  # --set over the run config
    assert cluster.setup == ["source /run/env/bin/activate"]  # a list replaces, never appends
    assert layered.config.supervise.poll_interval == 7.5  # sections merge key by key
    assert layered.site == site_file and str(site_file) in layered.site_note


def test_config_show_json_names_the_source_of_every_value(
    tmp_path: Path, site_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = write(tmp_path / "run.yaml", RUN)
    shown = show_json(capsys, "--config", str(run), "--set", "cluster.qos=cli-qos")
    assert shown["cluster.mem"] == {"value": None, "source": "default", "path": None}
    assert shown["cluster.partition"] == {"value": "site-part", "source": "site file", "path": str(site_file)}
    assert shown["supervise.poll_interval"]["source"] == "site file"
    assert shown["cluster.account"] == {"value": "run-acct", "source": "run config", "path": str(run)}
    assert shown["cluster.qos"] == {"value": "cli-qos", "source": "--set", "path": None}
    assert shown["train.lr"]["source"] == "default"
    # every field of the schema has a row, and --changed keeps only those a layer sets
    assert set(shown) == set(config_mod._all_field_paths())
    changed = show_json(capsys, "--config", str(run), "--changed")
    assert {name for name, row in changed.items()} == {
        "cluster.partition",
        "cluster.account",
        "cluster.qos",
        "cluster.setup",
        "supervise.poll_interval",
    }


def test_an_empty_variable_means_no_site_file_and_unset_means_the_user_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    user_file = write(tmp_path / "xdg" / "fm9g-launch" / "site.yaml", SITE)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv(site.SITE_ENV, "")
    assert show_json(capsys)["cluster.partition"]["source"] == "default"
    monkeypatch.delenv(site.SITE_ENV)
    assert show_json(capsys)["cluster.partition"] == {
        "value": "site-part",
        "source": "site file",
        "path": str(user_file),
    }


def test_a_variable_naming_a_missing_file_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(site.SITE_ENV, str(tmp_path / "nowhere.yaml"))
    assert main(["config", "show"]) == 2
    error = capsys.readouterr().err
    assert site.SITE_ENV in error and "nowhere.yaml" in error and "empty" in error


@pytest.mark.parametrize(
    ("text", "names"),
    [
        pytest.param(
            "cluster:\n  partition: a\n  partition: b\n",
            [":3", "'partition' appears twice", "keep one"],
            id="duplicate",
        ),
        pytest.param("cluster:\n  partion: a\n", ["cluster.partion", "did you mean 'cluster.partition'"], id="unknown"),
        pytest.param(
            "supervise:\n  poll_interval: fast\n",
            ["supervise.poll_interval", "valid number", '"fast"'],
            id="wrong-type",
        ),
        pytest.param("train:\n  lr: 0.1\n", ["section 'train'", "move it to the run config"], id="run-section"),
    ],
)
def test_a_bad_site_file_is_named_with_its_field_and_fix(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    text: str,
    names: list[str],
) -> None:
    path = write(tmp_path / "site.yaml", text)
    monkeypatch.setenv(site.SITE_ENV, str(path))
    # The run config sets the same fields right: the site file is still checked on its own.
    run = write(tmp_path / "run.yaml", "cluster:\n  partition: ok\nsupervise:\n  poll_interval: 1\n")
    assert main(["config", "show", "--config", str(run)]) == 2
    error = capsys.readouterr().err
    assert f"site file {path}" in error
    for name in names:
        assert name in error


def launch_argv(root: Path, name: str, *extra: str) -> list[str]:
    # Local: the site file's partition is made up, so a Slurm preflight would refuse it.
    head = ["pretrain", "--config", str(TINY), "--name", name, "--no-progress", "--executor", "local", "--yes"]
    return [*head, "--set", f"run_root={root}", *extra]


def test_the_dry_run_plan_names_the_site_file_and_its_config_holds_the_site_values(
    tmp_path: Path, site_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "runs"
    assert main(launch_argv(root, "d", "--dry-run")) == 0
    run = RunDir.of(root / "d")
    assert f"site defaults: {site_file}" in (run.dry_run / "plan.txt").read_text()
    assert f"site defaults: {site_file}" in capsys.readouterr().out


def test_a_run_keeps_its_resolved_config_when_the_site_file_changes(
    tmp_path: Path, site_file: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The launch writes config.yaml, then stops at an unreadable state.db (before any job):
    the real write path, with no training.  `resume` then reads only that config.yaml."""
    root = tmp_path / "runs"
    run = RunDir.of(root / "r")
    run.make()
    run.state_db.write_bytes(b"not a database" * 100)
    assert main(launch_argv(root, "r", "--set", "cluster.qos=cli-qos")) == 2
    assert str(run.state_db) in capsys.readouterr().err
    written = run.config.read_bytes()
    # The resolved values, every layer's, with no pointer back to the site file.
    monkeypatch.setenv(site.SITE_ENV, "")
    resolved = config_mod.load_resolved(run.config)
    assert (resolved.cluster.partition, resolved.cluster.account) == ("site-part", "site-acct")
    assert resolved.cluster.setup == ["module load site-cuda"] and resolved.supervise.poll_interval == 7.5
    assert resolved.cluster.qos == "cli-qos" and resolved.cluster.nodes == 2  # --set and the run config
    # The site file changes, even into one that no longer validates: resume does not read it.
    monkeypatch.setenv(site.SITE_ENV, str(site_file))
    site_file.write_text("cluster:\n  partition: other\n  partion: typo\n")
    assert main(["resume", str(run.root), "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert str(run.state_db) in error and "site file" not in error
    assert run.config.read_bytes() == written


def test_a_model_folder_run_takes_the_site_defaults(tmp_path: Path, site_file: Path) -> None:
    """`serve FOLDER` makes a run of its own: its jobs need the site's partition too."""
    from fm9g.orchestrator.inference.stages import resolve_target

    folder = write(tmp_path / "my-model" / "config.json", "{}").parent
    target = resolve_target(folder, run_root=tmp_path / "runs", overrides=["cluster.qos=cli-qos"])
    written = config_mod.load_resolved(target.run.config)
    assert (written.cluster.partition, written.cluster.account) == ("site-part", "site-acct")
    assert written.cluster.qos == "cli-qos"
