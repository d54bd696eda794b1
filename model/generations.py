"""The trainer-side process-group lifecycle for in-process recovery (issue 13).

A rank builds its model, optimizer, loader and RNG once; this module rebuilds only the
process group, once per *generation*, over a long-lived TCPStore reached by host:port.
Each generation's keys live under their own prefix, so a group can be destroyed and a
new one created in the same process (pytorch#55967: re-initialising over the same keys
hangs).  The caller's loop:

    membership = Membership(host, port, uid, config, state, applied=0)
    while state.step < total:
        with membership.step() as guard:          # re-forms first when the last step failed
            loss = forward_backward(guard.generation)
            guard.all_reduce(flat_grads)           # a peer's death raises here: step discarded
            guard.commit()                         # the vote: every member applies, or none does
            optimizer.step(); state.step += 1      # reached only when committed
        zero_grads()

A step is applied only when every member of the generation voted for it, decided by one
compare-and-set in the store that all members read, so no rank applies a step another
discarded.  After a re-form the member holding the most applied steps broadcasts its
state to whoever is behind (a replacement, a rank back from an older generation).
Liveness and hangs are `generation_heartbeats`; who is admitted at which rank is the
pure `generation_rules.decide`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

import torch
import torch.distributed as dist

from fm9g.model.generation_heartbeats import Heartbeat, LostRecord
from fm9g.model.generation_rules import (
    ABORT,
    COMMIT,
    COMMIT_THEN_REFORM,
    POLICIES,
    Decision,
    JoinRecord,
    Keys,
    Policy,
    Rules,
    check_uid,
    decide,
    parse_roster,
)
from fm9g.model.generation_state import PeerState, broadcast_state

Backend = Literal["gloo", "nccl"]
EventSink = Callable[[str, dict[str, Any]], None]
POLL_S = 0.005  # between store polls while a generation forms; a round trip is ~0.2 ms on loopback


class RecoveryFailed(RuntimeError):
    """In-process recovery gave up; the caller falls back to a process restart from its disk
    checkpoint.  The message says why."""


class NoLiveState(RecoveryFailed):
    """No member of the new generation holds training state: load the disk checkpoint."""


class SessionClosed(Exception):
    """The session's training ended while this rank waited to be admitted (a spare, a late
    replacement): there is nothing left to join, and the process exits cleanly."""


class StepDiscarded(Exception):
    """The step in flight is void on every rank; raised inside a step guard, which swallows it."""


@dataclass(frozen=True)
class MembershipConfig:
    """The numbers that shape recovery; `validate` names a bad field."""

    policy: Policy = "wait"
    world_size: int = 1  # the full world: `wait` re-forms only at this size, `shrink` never above it
    min_world_size: int = 1  # `shrink` gives up (RecoveryFailed) below this
    backend: Backend = "gloo"
    namespace: str = "inproc"  # key prefix in the shared store, one per run
    collective_timeout_s: float = 30.0  # gloo/NCCL timeout; hangs are bounded by heartbeats, not by this
    heartbeat_interval_s: float = 0.2
    absent_after_s: float = 1.0  # a silent peer is not waited for while a generation forms
    hang_timeout_s: float = 10.0  # a silent peer is declared lost (and killed by its agent)
    settle_s: float = 2.0  # `shrink`: the longest wait for an expected peer that still beats
    join_timeout_s: float = 120.0  # one formation; under `wait` the budget for a replacement to arrive
    max_attempts: int = 5  # formations in a row without a committed step before giving up

    def validate(self) -> MembershipConfig:
        if self.policy not in POLICIES:
            raise ValueError(f"on_node_loss policy {self.policy!r} is not one of {POLICIES}")
        if self.backend not in ("gloo", "nccl"):
            raise ValueError(f"backend {self.backend!r} must be 'gloo' (CPU) or 'nccl' (GPU)")
        if not 1 <= self.min_world_size <= self.world_size:
            raise ValueError(f"min_world_size {self.min_world_size} must be between 1 and world_size {self.world_size}")
        if not self.heartbeat_interval_s < self.absent_after_s <= self.hang_timeout_s:
            raise ValueError(
                "heartbeat_interval_s < absent_after_s <= hang_timeout_s must hold (got "
                f"{self.heartbeat_interval_s}, {self.absent_after_s}, {self.hang_timeout_s})"
            )
        return self


@dataclass(frozen=True)
class Generation:
    """This rank's place in one process group."""

    number: int
    members: tuple[str, ...]
    rank: int
    source: str | None
    received_state: bool  # this rank's state came from the source in this generation

    @property
    def world_size(self) -> int:
        return len(self.members)


def connect(host: str, port: int, timeout_s: float) -> dist.TCPStore:
    """A client of the run's shared TCPStore (never its host)."""
    return dist.TCPStore(
        host, port, is_master=False, timeout=timedelta(seconds=timeout_s), wait_for_workers=False, use_libuv=True
    )


class Membership:
    """One rank's membership in the run's generations."""

    def __init__(
        self,
        host: str,
        port: int,
        uid: str,
        config: MembershipConfig,
        state: PeerState,
        applied: int | None,
        device: torch.device | None = None,
        on_event: EventSink | None = None,
        on_lost: Callable[[LostRecord], None] | None = None,
        rank_hint: int | None = None,
        regroup: Callable[[Generation], int] | None = None,
    ) -> None:
        """`applied`: the steps this rank's state already holds (0 for a fresh model built
        from the shared seed, the step of a loaded checkpoint), or None for a replacement
        that must receive its state from a peer.  `rank_hint`: the rank this process would
        like in its first generation (torchrun's RANK), granted when free.  `regroup`: for
        state that is sharded over the ranks (FSDP2), a collective every member runs after
        each formation instead of the one-source broadcast; it returns the restored step."""
        self.uid, self.config, self.state = check_uid(uid), config.validate(), state
        self.device = device or torch.device("cpu")
        self.applied = -1 if applied is None else applied
        self.on_event = on_event
        self.regroup = regroup
        self.rules = Rules(config.policy, config.world_size, config.min_world_size, config.settle_s)
        self.endpoint = f"{host}:{port}"
        timeout_s = max(config.join_timeout_s, config.collective_timeout_s)
        self.store = dist.PrefixStore(config.namespace + "/", connect(host, port, timeout_s))
        self.store.compare_set(Keys.GEN, "", "0")  # the first rank of the run creates generation 0
        beat_store = dist.PrefixStore(config.namespace + "/", connect(host, port, timeout_s))
        self.heartbeat = Heartbeat(beat_store, uid, config.heartbeat_interval_s, config.hang_timeout_s, on_lost)
        self.generation: Generation | None = None
        self._last: Generation | None = None  # the generation this rank left, for its join record
        self._seq = 0  # step attempts in the current generation: the vote's key
        self._pending: str | None = "not formed yet"  # why the next step() must re-form first
        self._attempts = 0  # formations since the last committed step
        self._first_step_due = False
        self._rank_hint = -1 if rank_hint is None else rank_hint
        self._reported_gone: set[str] = set()
        self._abandoned: dist.Work | None = None  # a collective this rank stopped waiting for
        self._graveyard: list[tuple[Any, dist.Work]] = []  # groups left with a stuck collective

    # -- the caller's interface --------------------------------------------------------

    def step(self) -> StepGuard:
        """The guard for the next step, re-forming first when needed."""
        if self._pending is not None:
            reason, self._pending = self._pending, None
            try:
                self._reform(reason)
            except dist.DistError as error:  # the store itself is gone or unreachable
                self._emit("recovery_failed", reason=f"store {self.endpoint}: {error}"[:300])
                raise RecoveryFailed(
                    f"the run's store at {self.endpoint} is unreachable ({error}); "
                    "falling back to a process restart from the disk checkpoint"
                ) from error
            except RecoveryFailed as error:
                self._emit("recovery_failed", reason=str(error)[:300])
                raise
        assert self.generation is not None
        self._seq += 1
        return StepGuard(self, self.generation, self._seq)

    @property
    def reform_pending(self) -> bool:
        """True when the next step() re-forms first."""
        return self._pending is not None

    def request_reform(self) -> int:
        """Announce a newer generation (a newcomer, a grow, a test); every member re-forms
        at its next commit.  Returns the announced number."""
        current = int(self.store.get(Keys.GEN))
        return self._announce(current + 1)

    def watch(self, work: dist.Work) -> bool:
        """Between steps, after a commit: wait for a collective the caller started with
        async_op=True (sharded state's peer snapshot).  False when it failed or a peer
        went silent: nothing committed is lost, and the next step() re-forms first."""
        assert self.generation is not None
        try:
            self._await_work(work, self.generation)
            return True
        except StepDiscarded as error:
            self._pending = str(error)
            self._emit("detected", gen=self.generation.number, applied=self.applied, reason=str(error)[:300])
            return False

    def close_session(self) -> None:
        """Tell every rank still waiting to be admitted that training is over."""
        self.store.set(Keys.CLOSED, "1")

    def close(self) -> None:
        """Leave the group and stop beating (peers then see this rank as silent)."""
        self._leave()
        self.heartbeat.close()

    # -- generations -------------------------------------------------------------------

    def _reform(self, reason: str) -> None:
        self._leave()
        if self._attempts >= self.config.max_attempts:
            raise RecoveryFailed(
                f"{self._attempts} formations in a row without a committed step (last: {reason}); "
                "falling back to a process restart from the disk checkpoint"
            )
        self._attempts += 1
        target = int(self.store.get(Keys.GEN))
        if self._last is not None:
            target = self._announce(self._last.number + 1)
        self.generation = self._form(target)
        self._seq = 0
        self._first_step_due = self._last is not None

    def _form(self, target: int) -> Generation:
        started = time.monotonic()
        while True:
            if self.store.check([Keys.CLOSED]):
                raise SessionClosed("the session's training ended before this rank was admitted")
            if time.monotonic() - started > self.config.join_timeout_s:
                raise RecoveryFailed(
                    f"no generation formed within join_timeout_s={self.config.join_timeout_s} "
                    f"(policy {self.config.policy}, world_size {self.config.world_size}); "
                    "falling back to a process restart from the disk checkpoint"
                )
            decision = self._close(target, started)
            if decision is None:  # someone moved on, or this rank came too late
                target = self._announce(target + 1) if int(self.store.get(Keys.GEN)) <= target else self._gen()
                continue
            if self.uid not in decision.members:
                if self._last is None and decision.world_size >= self.config.world_size:
                    target = self._wait_as_spare(target)
                    started = time.monotonic()  # a spare's wait is not part of a formation's budget
                else:
                    target = self._announce(target + 1)
                continue
            generation = self._start(target, decision, started)
            if generation is not None:
                return generation
            target = self._announce(target + 1)

    def _close(self, gen: int, started: float) -> Decision | None:
        """Register for `gen` and return its decision (None: `gen` is out of reach)."""
        key = Keys.decision(gen)
        if self.store.check([key]):
            return Decision.from_json(self.store.get(key))
        prev_gen, prev_rank = (self._last.number, self._last.rank) if self._last else (-1, self._rank_hint)
        record = JoinRecord(self.uid, prev_gen, prev_rank, self.applied)
        self.store.set(Keys.join(gen, self.uid), record.to_json())
        self.store.append(Keys.roster(gen), f"{self.uid},")
        self._emit("arrived", gen=gen, applied=self.applied)
        arrived_at = time.monotonic()
        while not self.store.check([key]):
            if self._gen() > gen:
                return None
            if time.monotonic() - started > self.config.join_timeout_s:
                return None
            roster = parse_roster(self.store.get(Keys.roster(gen)))
            arrivals = [JoinRecord.from_json(raw) for raw in self.store.multi_get([Keys.join(gen, u) for u in roster])]
            previous = self._previous_members(arrivals)
            self.heartbeat.watch(set(roster) | set(previous))
            gone = self.heartbeat.silent(self.config.absent_after_s)
            newly_gone = sorted((set(previous) & gone) - self._reported_gone)
            if newly_gone:  # the supervisor learns of a lost rank from this, not from Slurm
                self._reported_gone.update(newly_gone)
                self._emit("gone", gen=gen, uids=newly_gone)
            decision = decide(self.rules, arrivals, previous, gone, time.monotonic() - arrived_at)
            if decision is not None:
                return Decision.from_json(self.store.compare_set(key, "", decision.to_json()))
            time.sleep(POLL_S)
        return Decision.from_json(self.store.get(key))

    def _previous_members(self, arrivals: list[JoinRecord]) -> tuple[str, ...]:
        newest = max((a.prev_gen for a in arrivals), default=-1)
        if newest < 0 or not self.store.check([Keys.decision(newest)]):
            return ()
        return Decision.from_json(self.store.get(Keys.decision(newest))).members

    def _wait_as_spare(self, gen: int) -> int:
        """The world is full: wait, warm, until a newer generation is announced."""
        self._emit("spare", gen=gen)
        while self._gen() <= gen:
            if self.store.check([Keys.CLOSED]):
                raise SessionClosed("the session's training ended while this rank waited as a spare")
            time.sleep(10 * POLL_S)
        return self._gen()

    def _start(self, gen: int, decision: Decision, started: float) -> Generation | None:
        """Barrier, process group, state: the new generation, or None if a member failed."""
        t0 = time.monotonic()
        members = set(decision.members)
        self.heartbeat.watch(members)
        self.store.set(Keys.ready(gen, self.uid), "1")
        ready_keys = [Keys.ready(gen, u) for u in decision.members]
        # Every member must still beat and have reached this point before anyone enters
        # gloo's connect: a member that died after being admitted would leave the others
        # there until the collective timeout, which nothing can abort.  Go or abort is
        # one compare-and-set, so no member starts while another gave up.
        start_key, outcome = Keys.start(gen), ""
        while not outcome:
            if self.store.check([start_key]):
                outcome = self.store.get(start_key).decode()
            elif self.store.check(ready_keys):
                outcome = self.store.compare_set(start_key, "", "go").decode()
            elif (
                members & self.heartbeat.silent(self.config.absent_after_s)
                or self._gen() > gen
                or time.monotonic() - started > self.config.join_timeout_s
            ):
                outcome = self.store.compare_set(start_key, "", "abort").decode()
            else:
                time.sleep(POLL_S)
        if outcome != "go":
            silent = sorted(members & self.heartbeat.silent(self.config.absent_after_s))
            self._emit("start_failed", gen=gen, reason=f"start aborted (silent members: {silent})")
            return None
        rank = decision.members.index(self.uid)
        t1 = time.monotonic()
        try:
            self._init_group(gen, rank, decision.world_size)
        except Exception as error:  # a member died inside gloo's connect
            self._leave()
            self._emit("start_failed", gen=gen, reason=f"process group init: {error}"[:300])
            return None
        t2 = time.monotonic()
        self._emit(
            "formed",
            gen=gen,
            rank=rank,
            world_size=decision.world_size,
            members=list(decision.members),
            wait_s=round(t0 - started, 4),
            barrier_s=round(t1 - t0, 4),
            init_s=round(t2 - t1, 4),
        )
        if decision.source is None:
            self._leave()
            raise NoLiveState(f"generation {gen}: no member holds training state; load the disk checkpoint")
        if self.regroup is not None:
            return self._regroup(Generation(gen, decision.members, rank, decision.source, True), t2)
        received = self.uid in decision.needs_state
        if decision.needs_state:
            try:
                self._sync_state(decision, received)
            except Exception as error:
                self._leave()
                self._emit("start_failed", gen=gen, reason=f"state sync: {error}"[:300])
                return None
            self._emit(
                "synced", gen=gen, source=decision.source, received=received, sync_s=round(time.monotonic() - t2, 4)
            )
        return Generation(gen, decision.members, rank, decision.source, received)

    def _regroup(self, generation: Generation, started: float) -> Generation | None:
        """Sharded state: every member re-shards (shard_state.ShardedState.regroup)."""
        assert self.regroup is not None
        try:
            self.applied = self.regroup(generation)
        except NoLiveState:
            self._leave()
            raise
        except Exception as error:  # a member lost mid-transfer: form again
            self._leave()
            self._emit("start_failed", gen=generation.number, reason=f"regroup: {error}"[:300])
            return None
        self._emit(
            "synced",
            gen=generation.number,
            source="shards",
            received=True,
            step=self.applied,
            sync_s=round(time.monotonic() - started, 4),
        )
        return generation

    def _sync_state(self, decision: Decision, receive: bool) -> None:
        src = decision.members.index(decision.source or "")
        sending = self.uid == decision.source
        payload = {"applied": self.applied, "state": self.state.state_dict()} if sending else None
        got = broadcast_state(payload, src, None, self.device)
        if receive:
            self.state.load_state_dict(got["state"])
            self.applied = int(got["applied"])

    def _init_group(self, gen: int, rank: int, world_size: int) -> None:
        store = dist.PrefixStore(Keys.group_prefix(gen), self.store)
        timeout = timedelta(seconds=self.config.collective_timeout_s)
        if self.config.backend == "nccl":
            dist.init_process_group(
                "nccl", store=store, rank=rank, world_size=world_size, timeout=timeout, device_id=self.device
            )
            # NCCL connects lazily; a first collective makes a broken member fail here, not mid-step.
            dist.all_reduce(torch.zeros(1, device=self.device))
        else:
            dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=timeout)

    def _leave(self) -> None:
        if self.generation is not None:
            self._last = self.generation
            self.generation = None
        if not dist.is_initialized():
            return
        abandoned, self._abandoned = self._abandoned, None
        if self.config.backend == "nccl":
            # Abort first: destroying a communicator with a dead peer can block on its
            # pending kernels; abort tears it down without waiting (and unregisters it).
            dist.distributed_c10d._abort_process_group()
        elif abandoned is not None and not abandoned.is_completed():
            # gloo has no abort (pytorch#130345), and destroying a group whose collective
            # is stuck mid-transfer waits for that collective's timeout (measured: the
            # whole timeout, with a peer frozen mid-send).  The group is unregistered
            # instead and kept until its stuck collective times out on its own thread.
            self._graveyard.append((dist.group.WORLD, abandoned))
            forget_default_group()
        else:
            dist.destroy_process_group()  # its sockets close here
        # A kept group whose collective has ended can go: its threads are free again.
        self._graveyard = [(group, work) for group, work in self._graveyard if not work.is_completed()]

    def _gen(self) -> int:
        return int(self.store.get(Keys.GEN))

    def _announce(self, number: int) -> int:
        """Make the announced generation at least `number`; returns the announced one."""
        while True:
            current = self._gen()
            if current >= number:
                return current
            self.store.compare_set(Keys.GEN, str(current), str(number))

    # -- the step protocol ------------------------------------------------------------

    def _vote(self, generation: Generation, seq: int) -> None:
        """This member's vote for step `seq`; returns when committed, raises StepDiscarded
        when any member discarded it."""
        outcome_key = Keys.outcome(generation.number, seq)
        votes = self.store.add(Keys.votes(generation.number, seq), 1)
        if votes == generation.world_size:
            newer = self._gen() > generation.number
            result = self.store.compare_set(outcome_key, "", COMMIT_THEN_REFORM if newer else COMMIT).decode()
            if seq > 1:  # every member has read seq-1's outcome (it took part in this step's collective)
                self.store.delete_key(Keys.votes(generation.number, seq - 1))
                self.store.delete_key(Keys.outcome(generation.number, seq - 1))
        else:
            result = self._await_outcome(generation, outcome_key)
        if result == ABORT:
            raise StepDiscarded("another member discarded the step")
        self.applied += 1
        self._attempts = 0
        if result == COMMIT_THEN_REFORM:
            self._pending = "a newer generation was announced"
        if self._first_step_due:
            self._first_step_due = False
            self._emit("first_step", gen=generation.number, applied=self.applied)

    def _await_outcome(self, generation: Generation, key: str) -> str:
        waited = time.monotonic()
        members = set(generation.members)
        while True:
            try:
                self.store.wait([key], timedelta(seconds=self.config.absent_after_s))
                return self.store.get(key).decode()
            except dist.DistStoreError:
                pass  # no outcome yet: is anyone we wait for gone?
            silent = members & self.heartbeat.silent(self.config.absent_after_s)
            if silent or time.monotonic() - waited > self.config.collective_timeout_s:
                return self.store.compare_set(key, "", ABORT).decode()

    def _await_work(self, work: dist.Work, generation: Generation) -> None:
        """Until `work` completes; StepDiscarded when it failed or a member went silent.
        An abandoned gloo work stays blocked on its own thread until its timeout and then
        ends there; leaving the group does not wait for it (checked on torch 2.13)."""
        peers = set(generation.members) - {self.uid}
        delay = 0.0002
        while True:
            try:
                if work.is_completed():
                    work.wait()  # raises the collective's own error, if it failed
                    return
            except Exception as error:
                raise StepDiscarded(f"collective failed: {error}") from error
            silent = peers & self.heartbeat.silent(self.config.hang_timeout_s)
            if silent:
                self._abandoned = work
                self.heartbeat.declare(silent)  # their agents kill them: a hung rank must not linger
                raise StepDiscarded(
                    f"collective abandoned: {sorted(silent)} silent for {self.config.hang_timeout_s:g}s (hang_timeout_s)"
                )
            time.sleep(delay)
            delay = min(2 * delay, 0.005)

    def _discard(self, generation: Generation, seq: int, reason: str) -> None:
        try:  # tell the members still waiting on the vote; the store may be gone too
            self.store.compare_set(Keys.outcome(generation.number, seq), "", ABORT)
        except Exception:
            pass
        self._pending = reason
        self._emit("detected", gen=generation.number, seq=seq, applied=self.applied, reason=reason[:300])

    def _emit(self, name: str, **fields: Any) -> None:
        if self.on_event is not None:
            self.on_event(name, {"t": time.time(), "uid": self.uid, **fields})


def forget_default_group() -> None:
    """Unregister the default process group without shutting it down: what
    `destroy_process_group()` does for the world group, minus the backend shutdown that
    blocks on a stuck gloo collective.  The caller keeps a reference to the group until
    that collective ends.  Private state of torch.distributed (checked on torch 2.13);
    a torch without it gets the blocking destroy."""
    c10d = dist.distributed_c10d
    world = getattr(c10d, "_world", None)
    tables = ("pg_map", "pg_names", "pg_group_ranks", "pg_backend_config", "pg_to_tag", "tags_to_pg")
    if world is None or not all(hasattr(world, name) for name in tables) or not hasattr(c10d, "_update_default_pg"):
        dist.destroy_process_group()
        return
    c10d._update_default_pg(None)
    for name in (*tables, "pg_coalesce_state"):
        table = getattr(world, name, None)
        if table is not None:
            table.clear()
    unregister = getattr(c10d, "_unregister_all_process_groups", None)
    if unregister is not None:
        unregister()
    world.group_count = 0


DISCARDING = (StepDiscarded, dist.DistError)  # gloo reports a dead peer as DistBackendError/DistNetworkError


class StepGuard:
    """One step attempt: collectives through `all_reduce`, then `commit`.  Leaving the block
    on StepDiscarded (or a torch.distributed error raised before `commit`) discards the
    step on this rank and marks the membership for a re-form at the next `step()`."""

    def __init__(self, membership: Membership, generation: Generation, seq: int) -> None:
        self.membership, self.generation, self.seq = membership, generation, seq
        self.committed = False
        self.discarded: str | None = None  # the reason, once discarded

    def all_reduce(self, tensor: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
        """All-reduce in place over this generation's group.  Started asynchronously and
        watched: a member silent for `hang_timeout_s` (a hung process, or a node whose link
        went down, whose sockets never report an error) makes this rank abandon the
        collective instead of waiting for gloo's timeout, which nothing can interrupt."""
        try:
            work = dist.all_reduce(tensor, op=op, async_op=True)
        except Exception as error:
            raise StepDiscarded(f"collective failed: {error}") from error
        self.membership._await_work(work, self.generation)
        return tensor

    def commit(self) -> None:
        """The vote; returns only when every member will apply this step."""
        self.membership._vote(self.generation, self.seq)
        self.committed = True

    def __enter__(self) -> StepGuard:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> bool:
        if exc_type is None:
            if not self.committed:
                raise RuntimeError(
                    "a step guard ended without commit(): call guard.commit() before applying the update"
                )
            return False
        if self.committed or not issubclass(exc_type, DISCARDING):
            return False  # after the commit, or not a peer's fault: the caller's error to see
        self.discarded = str(exc)
        self.membership._discard(self.generation, self.seq, self.discarded)
        return True
