"""In-band liveness: each rank beats a counter in the store and watches its peers' counters.

A counter, not a timestamp: a peer's age is measured on the watcher's own monotonic clock
from the moment it last saw the counter move, so nodes need no synchronised clocks.  The
beating and watching run on a thread with a store connection of its own: a TCPStore
client serialises its calls, and the main thread's blocking waits would otherwise stall
the beats and make a healthy rank look silent.

Two thresholds use the same ages: a peer silent for `absent_after_s` is not waited for
when a generation forms (a wrong guess costs one more re-form, nothing else); a peer
silent for `hang_timeout_s` is declared lost in the store, first writer wins, so that an
agent on its host kills it and the survivors blocked in a collective with it fail fast.
gloo cannot abort a collective (pytorch#130345), so this kill is what bounds a hang.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch.distributed as dist

from fm9g.model.generation_rules import Keys, parse_roster


@dataclass(frozen=True)
class LostRecord:
    """A peer declared lost: who, by whom, after how long a silence, and where it runs."""

    uid: str
    by: str
    silent_s: float
    pid: int
    host: str

    def to_json(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def from_json(cls, raw: bytes | str) -> LostRecord:
        return cls(**json.loads(raw))


class Heartbeat:
    """Beats this rank's counter and tracks the silence of the peers it is told to watch."""

    def __init__(
        self,
        store: dist.Store,
        uid: str,
        interval_s: float,
        hang_timeout_s: float,
        on_lost: Callable[[LostRecord], None] | None = None,
    ) -> None:
        self.store, self.uid = store, uid
        self.interval_s, self.hang_timeout_s = interval_s, hang_timeout_s
        self.on_lost = on_lost
        self._lock = threading.Lock()
        self._watched: frozenset[str] = frozenset()
        self._seen: dict[str, tuple[bytes, float]] = {}  # uid -> (last counter, when it last moved)
        self._lost: set[str] = set()
        self._to_declare: set[str] = set()  # asked by the main thread (declare)
        self._stop = threading.Event()
        store.set(Keys.identity(uid), json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
        store.add(Keys.heartbeat(uid), 1)  # exists before any roster names this uid
        store.append(Keys.UIDS, f"{uid},")
        store.append(Keys.LOST, "")  # exists from the start, so one multi_get reads it with the beats
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{uid}", daemon=True)
        self._thread.start()

    def watch(self, uids: set[str] | frozenset[str]) -> None:
        """Track these peers from now on (others are forgotten)."""
        with self._lock:
            self._watched = frozenset(uids) - {self.uid}
            self._seen = {u: seen for u, seen in self._seen.items() if u in self._watched}

    def silent_for(self, uid: str) -> float:
        """Seconds since `uid`'s counter last moved (0 for a peer seen only just now)."""
        with self._lock:
            seen = self._seen.get(uid)
        return 0.0 if seen is None else time.monotonic() - seen[1]

    def silent(self, threshold_s: float) -> set[str]:
        """Watched peers silent for at least `threshold_s`, plus any declared lost."""
        now = time.monotonic()
        with self._lock:
            quiet = {u for u, (_, moved) in self._seen.items() if now - moved >= threshold_s}
            return quiet | self._lost

    def declare(self, uids: set[str]) -> None:
        """Have the beat thread declare these peers lost at its next beat (the main thread
        gave up waiting on them; their agents must kill them), even if no longer watched."""
        with self._lock:
            self._to_declare |= uids - self._lost

    def lost(self) -> set[str]:
        with self._lock:
            return set(self._lost)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5 * self.interval_s + 1)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._beat_and_watch()
            except Exception:  # the store is gone or slow: stop beating, which peers read as silence
                if self._stop.is_set():
                    return
                time.sleep(self.interval_s)

    def _beat_and_watch(self) -> None:
        self.store.add(Keys.heartbeat(self.uid), 1)
        with self._lock:
            watched = sorted(self._watched)
            asked, self._to_declare = self._to_declare - self._lost, set()
        for uid in sorted(asked):  # silent at least hang_timeout_s: that is why they were asked
            self._declare(uid, self.hang_timeout_s)
        if not watched:
            return
        values = self.store.multi_get([*(Keys.heartbeat(u) for u in watched), Keys.LOST])
        declared = set(parse_roster(values[-1]))
        now = time.monotonic()
        newly_silent: list[tuple[str, float]] = []
        with self._lock:
            self._lost |= declared & set(watched)
            for uid, counter in zip(watched, values[:-1]):
                last = self._seen.get(uid)
                if last is None or last[0] != counter:
                    self._seen[uid] = (counter, now)
                elif now - last[1] >= self.hang_timeout_s and uid not in self._lost:
                    newly_silent.append((uid, now - last[1]))
        for uid, silent_s in newly_silent:
            self._declare(uid, silent_s)

    def _declare(self, uid: str, silent_s: float) -> None:
        who = json.loads(self.store.get(Keys.identity(uid)))
        record = LostRecord(uid, self.uid, round(silent_s, 3), who["pid"], who["host"])
        winner = LostRecord.from_json(self.store.compare_set(Keys.lost(uid), "", record.to_json()))
        if winner.by == self.uid:
            self.store.append(Keys.LOST, f"{uid},")
        with self._lock:
            self._lost.add(uid)
        if winner.by == self.uid and self.on_lost is not None:
            self.on_lost(winner)


def lost_members(store: dist.Store) -> list[LostRecord]:
    """Every rank declared lost so far (for an agent or a supervisor reading the store)."""
    uids = parse_roster(store.get(Keys.LOST)) if store.check([Keys.LOST]) else []
    return [LostRecord.from_json(store.get(Keys.lost(u))) for u in uids]


def kill_lost_here(store: dist.Store, already: set[str], host: str | None = None) -> list[LostRecord]:
    """An agent's duty: SIGKILL every lost rank running on this host that it has not
    killed yet (`already` is updated).  Returns the ones killed now."""
    here = host or socket.gethostname()
    killed = []
    for record in lost_members(store):
        if record.uid in already or record.host != here:
            continue
        already.add(record.uid)
        try:
            os.kill(record.pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
        killed.append(record)
    return killed
