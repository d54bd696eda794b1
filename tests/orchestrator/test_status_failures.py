"""`fm9g-launch status --failures`: the recovery timeline, from the state database."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from fm9g.orchestrator.inproc_import import import_inproc_events
from fm9g.orchestrator.state import StateStore
from fm9g.rundir import RunDir
from fm9g.rundir import config as cfg
from fm9g.rundir.atomic import write_text


def test_failures_table_shows_each_phase(tmp_path: Path) -> None:
    run = RunDir.of(tmp_path / "runs" / "r").make()
    write_text(run.config, cfg.dump(cfg.RunConfig()))
    store = StateStore(run.state_db)
    store.upsert_stage("train", "train")
    phases = {"detected": 100.0, "resubmitted": 100.2, "allocated": 100.7, "rendezvous": 104.0, "first_step": 106.5}
    store.event("recovery", "node 2 recovered in 6.5s", stage="train", node_rank=2, phases=phases)
    store.close()
    out = subprocess.run(
        [sys.executable, "-m", "fm9g.orchestrator.cli", "status", str(run.root), "--failures"],
        capture_output=True,
        text=True,
        check=True,
        env={"COLUMNS": "160", "PATH": "/usr/bin:/bin"},
    ).stdout
    row = next(line for line in out.splitlines() if line.strip().startswith("2"))
    assert row.split()[1:] == ["0.2", "0.7", "4.0", "6.5", "6.5s"]


SURVIVORS = ["n0r0p10", "n1r0p11", "n2r0p12"]


def write_inproc(run: RunDir, records: list[dict]) -> None:
    """Append records to each writer's events/inproc/<uid>.jsonl, as EventWriter does."""
    run.inproc_events.mkdir(parents=True, exist_ok=True)
    for record in records:
        with open(run.inproc_events / f"{record['uid']}.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")


def trainer(event: str, t: float, uid: str, **fields: object) -> dict:
    return {"event": event, "t": t, "uid": uid, "node_rank": int(uid[1]), **fields}


def status_json(run: RunDir) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "fm9g.orchestrator.cli", "status", str(run.root), "--json"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    [facts] = json.loads(out)["runs"]
    return facts


def test_inproc_recoveries_in_status_json_and_failures(tmp_path: Path) -> None:
    run = RunDir.of(tmp_path / "runs" / "r").make()
    config = cfg.RunConfig()
    write_text(
        run.config,
        cfg.dump(
            config.model_copy(update={"supervise": config.supervise.model_copy(update={"on_node_loss": "shrink"})})
        ),
    )
    store = StateStore(run.state_db)
    store.upsert_stage("train", "train")
    everyone = [*SURVIVORS, "n3r0p13"]
    write_inproc(
        run,
        [
            *(
                trainer("formed", 10.0, uid, gen=1, rank=i, world_size=4, members=everyone)
                for i, uid in enumerate(everyone)
            ),
            *(trainer("detected", 100.0, uid, gen=1, seq=41, applied=40, reason="peer") for uid in SURVIVORS),
            *(trainer("gone", 100.8, uid, gen=2, uids=["n3r0p13"]) for uid in SURVIVORS),
            *(
                trainer("formed", 101.7, uid, gen=2, rank=i, world_size=3, members=SURVIVORS)
                for i, uid in enumerate(SURVIVORS)
            ),
        ],
    )
    assert import_inproc_events(run, store) == 13
    [recovery] = status_json(run)["inproc_recoveries"]
    assert (recovery["policy"], recovery["path"], recovery["finished"]) == ("shrink", "fast", False)
    assert recovery["phases"] == {"detected": 0.0, "re_formed": 1.7, "state_synced": None, "first_step": None}

    write_inproc(run, [trainer("first_step", 103.0, uid, gen=2, applied=41) for uid in SURVIVORS])
    import_inproc_events(run, store)
    store.close()
    facts = status_json(run)
    assert facts["recoveries"] == []  # the restart path's timeline is not involved
    [recovery] = facts["inproc_recoveries"]
    assert {key: recovery[key] for key in ("finished", "total_s", "steps_lost", "world_before", "world_after")} == {
        "finished": True,
        "total_s": 3.0,
        "steps_lost": 1,
        "world_before": 4,
        "world_after": 3,
    }
    assert (recovery["generation_before"], recovery["generation_after"], recovery["lost"]) == (1, 2, ["n3r0p13"])
    failures = subprocess.run(
        [sys.executable, "-m", "fm9g.orchestrator.cli", "status", str(run.root), "--failures"],
        capture_output=True,
        text=True,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )
    assert failures.returncode == 0, failures.stderr
