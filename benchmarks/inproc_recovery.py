"""In-process recovery on this machine (issue 13, fm9g.model.generations): what a fault
costs the survivors when only the process group is rebuilt.

Scenarios, each on 3 gloo ranks of the toy trainer (tests/helpers/generations_worker.py)
with a TCPStore hosted by a tiny process of its own:
  kill9-shrink   kill -9 of a rank; survivors continue at world 2
  kill9-wait     kill -9 of a rank; survivors wait warm; a replacement joins and receives
                 ~50 MB of state from a survivor
  sigstop        a rank frozen; declared lost by heartbeat, killed by the "agent" (this script)
  store-loss     the store's host process killed
Figures are printed beside references measured in the same run: one plain gloo
all_reduce round at world 3, and a cold `python -c "import torch"`.

    .venv/bin/python benchmarks/inproc_recovery.py [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.helpers.generations_worker import Ranks, read_log, serve_store, wait_for  # noqa: E402

CONFIG = {
    "heartbeat_interval_s": 0.1,
    "absent_after_s": 0.6,
    "hang_timeout_s": 1.5,
    "settle_s": 1.5,
    "collective_timeout_s": 60.0,
    "join_timeout_s": 60.0,
}


def time_allreduce(spec: dict[str, Any]) -> None:
    """A rank of the reference: plain gloo, world `world`, median of 200 small all_reduce rounds."""
    import datetime

    import torch
    import torch.distributed as dist

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    store = dist.TCPStore("127.0.0.1", spec["port"], is_master=False, timeout=datetime.timedelta(seconds=60))
    dist.init_process_group("gloo", store=dist.PrefixStore("ref/", store), rank=spec["rank"], world_size=spec["world"])
    tensor = torch.ones(1024)
    times = []
    for _ in range(200):
        t0 = time.perf_counter()
        dist.all_reduce(tensor)
        times.append(time.perf_counter() - t0)
    Path(spec["out"]).write_text(str(statistics.median(times)))
    dist.destroy_process_group()


def start_store(ranks: Ranks, tmp: Path) -> tuple[Any, int]:
    port_file = tmp / "store.port"
    host = ranks.start(str(port_file), target=serve_store)  # type: ignore[arg-type]
    while not port_file.exists():
        time.sleep(0.02)
    return host, int(port_file.read_text())


def spec(port: int, tmp: Path, uid: str, policy: str, **extra: Any) -> dict[str, Any]:
    return {
        "host": "127.0.0.1",
        "port": port,
        "uid": uid,
        "log": str(tmp / f"{uid}.jsonl"),
        "steps": extra.pop("steps", 60),
        "config": {**CONFIG, "policy": policy, "world_size": 3},
        "step_sleep": 0.03,
        "rank_hint": int(uid[1:]) if extra.get("fresh", True) else None,
        **extra,
    }


def records(tmp: Path, uid: str, kind: str, event: str | None = None) -> list[dict[str, Any]]:
    return [r for r in read_log(tmp / f"{uid}.jsonl") if r["kind"] == kind and (event is None or r["event"] == event)]


def reached(step: int) -> Any:
    return lambda rs: any(r["kind"] == "applied" and r["step"] >= step for r in rs)


def done(rs: list[dict[str, Any]]) -> bool:
    return any(r["kind"] in ("done", "recovery_failed") for r in rs)


def first_step_after(tmp: Path, uid: str, t: float) -> float:
    return min(r["t"] for r in records(tmp, uid, "applied") if r["t"] > t) - t


def kill9(ranks: Ranks, policy: str, payload_mb: float = 0.0) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        store_host, port = start_store(ranks, tmp)
        procs = [ranks.start(spec(port, tmp, f"r{i}", policy, payload_mb=payload_mb)) for i in range(3)]
        wait_for(tmp / "r2.jsonl", reached(8))
        os.kill(procs[2].pid or 0, signal.SIGKILL)
        killed = time.time()
        out: dict[str, float] = {}
        if policy == "wait":
            for uid in ("r0", "r1"):
                wait_for(
                    tmp / f"{uid}.jsonl", lambda rs: any(r.get("event") == "arrived" and r["gen"] == 1 for r in rs)
                )
            started = time.time()
            ranks.start(spec(port, tmp, "r3", policy, payload_mb=payload_mb, fresh=False))
            wait_for(tmp / "r3.jsonl", lambda rs: any(r.get("event") == "arrived" for r in rs))
            arrived = records(tmp, "r3", "event", "arrived")[0]["t"]
            [begun] = records(tmp, "r3", "started")
            out["wait: replacement: forkserver start -> its code runs"] = begun["entered"] - started
            out["wait: replacement: its code runs -> asks to join"] = arrived - begun["entered"]
        for uid in ("r0", "r1"):
            wait_for(tmp / f"{uid}.jsonl", done)
        if policy == "wait":
            out["wait: survivors' pause from the replacement's arrival"] = max(
                first_step_after(tmp, u, arrived) for u in ("r0", "r1")
            )
        detected = min(r["t"] for u in ("r0", "r1") for r in records(tmp, u, "event", "detected"))
        reformed = [r for u in ("r0", "r1") for r in records(tmp, u, "event", "formed") if r["gen"] >= 1]
        formed = max(reformed, key=lambda r: r["t"])
        out[f"{policy}: detection after kill -9"] = detected - killed
        out[f"{policy}: re-form (detected -> group formed)"] = formed["t"] - detected
        what = "the lost rank's silence" if policy == "shrink" else "the replacement"
        out[f"{policy}:   of which waiting for {what}"] = formed["wait_s"]
        out[f"{policy}:   of which gloo init"] = formed["init_s"]
        synced = [r for u in ("r0", "r3") for r in records(tmp, u, "event", "synced")]
        if synced:
            out[f"{policy}: state sync ({payload_mb:.0f} MB payload)"] = max(r["sync_s"] for r in synced)
        # Under `wait` this includes this script noticing the survivors wait and starting
        # the replacement from the preloaded starter, as a node agent would.
        out[f"{policy}: survivors' pause (kill -> next step)"] = max(
            first_step_after(tmp, u, killed) for u in ("r0", "r1")
        )
        os.kill(store_host.pid or 0, signal.SIGKILL)
        ranks.close()
        return out


def sigstop(ranks: Ranks) -> dict[str, float]:
    import torch.distributed as dist

    from fm9g.model.generation_heartbeats import kill_lost_here, lost_members

    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        store_host, port = start_store(ranks, tmp)
        procs = [ranks.start(spec(port, tmp, f"r{i}", "shrink")) for i in range(3)]
        wait_for(tmp / "r1.jsonl", reached(8))
        os.kill(procs[1].pid or 0, signal.SIGSTOP)
        stopped = time.time()
        view = dist.PrefixStore("inproc/", dist.TCPStore("127.0.0.1", port, is_master=False))
        killed: set[str] = set()
        while "r1" not in killed:
            kill_lost_here(view, killed, host=os.uname().nodename)
            time.sleep(0.02)
        killed_at = time.time()
        for uid in ("r0", "r2"):
            wait_for(tmp / f"{uid}.jsonl", done)
        [lost] = lost_members(view)
        out = {
            "SIGSTOP -> declared lost and killed": killed_at - stopped,
            "  silence when declared (hang_timeout_s 1.5)": lost.silent_s,
            "SIGSTOP -> survivors' next step": max(first_step_after(tmp, u, stopped) for u in ("r0", "r2")),
        }
        os.kill(store_host.pid or 0, signal.SIGKILL)
        ranks.close()
        return out


def store_loss(ranks: Ranks) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        store_host, port = start_store(ranks, tmp)
        for i in range(3):
            ranks.start(spec(port, tmp, f"r{i}", "shrink", steps=100000))
        wait_for(tmp / "r0.jsonl", reached(8))
        os.kill(store_host.pid or 0, signal.SIGKILL)
        lost = time.time()
        failed = []
        for i in range(3):
            rs = wait_for(tmp / f"r{i}.jsonl", done)
            failed += [r["t"] - lost for r in rs if r["kind"] == "recovery_failed"]
        ranks.close()
        return {"store host killed -> every rank raised RecoveryFailed (slowest)": max(failed)}


def references(ranks: Ranks) -> dict[str, float]:
    import torch.distributed as dist

    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
        outs = [tmp / f"ar{r}" for r in range(3)]
        procs = [
            ranks.start({"port": server.port, "rank": r, "world": 3, "out": str(outs[r])}, target=time_allreduce)
            for r in range(3)
        ]
        for p in procs:
            p.join(120)
        allreduce = statistics.median(float(o.read_text()) for o in outs)
        ranks.close()
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch"], check=True)
    return {"gloo all_reduce round (world 3, 4 KB)": allreduce, "cold start + import torch": time.perf_counter() - t0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    ranks = Ranks()
    runs: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        for part in (
            references(ranks),
            kill9(ranks, "shrink"),
            kill9(ranks, "wait", payload_mb=50),
            sigstop(ranks),
            store_loss(ranks),
        ):
            for key, value in part.items():
                runs.setdefault(key, []).append(value)
    ref = {k: statistics.median(v) for k, v in runs.items() if k.startswith(("gloo", "cold"))}
    allreduce, cold = ref["gloo all_reduce round (world 3, 4 KB)"], ref["cold start + import torch"]
    print(f"median of {args.repeats}; references: all_reduce {allreduce * 1e3:.2f} ms, cold start {cold:.2f} s")
    for key, values in runs.items():
        value = statistics.median(values)
        print(
            f"{key:70s} {value:8.3f} s   x{value / allreduce:9.0f} all_reduce   {value / cold:6.3f} of a cold start"
            f"   (runs: {', '.join(f'{v:.3f}' for v in values)})"
        )


if __name__ == "__main__":
    main()
