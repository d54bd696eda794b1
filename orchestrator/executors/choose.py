"""What `executor: auto` means on this host: Slurm when `sbatch` is on the PATH and the
controller answers `scontrol ping`, this machine otherwise.  One probe, one line of why.

A run is resolved once, when it is launched: its config.yaml then names `local` or
`slurm`, so `resume`, `status` and `cancel` never probe again (the answer could change
while the run's jobs live on, and they must be polled where they were started)."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from fm9g.orchestrator.state import StateStore

Kind = Literal["local", "slurm"]

# `scontrol ping` answers in milliseconds when the controller is up; a controller that
# is down makes it wait for Slurm's MessageTimeout (10 s by default) first.
PING_TIMEOUT_S = 5.0

EVENT = "executor_choice"  # state.db event kind; data: chosen, requested, why


@dataclass(frozen=True)
class SlurmProbe:
    """Whether Slurm answers here, and the one-line reason."""

    answers: bool
    why: str
    installed: bool = False  # sbatch and a Slurm config are here, whether or not the controller answers


@dataclass(frozen=True)
class ExecutorChoice:
    """The concrete executor of a run or a stage job, and why it is that one."""

    kind: Kind
    why: str
    requested: str = "auto"
    confirmed: str = ""  # local with several nodes where Slurm answers: "--yes" or "terminal"
    slurm_silent: bool = False  # auto chose local because an installed Slurm did not answer

    def describe(self) -> str:
        """`executor: slurm (why); --executor local runs it here`, for the command's output."""
        other = (
            "--executor local runs it on this machine"
            if self.kind == "slurm"
            else "--executor slurm submits it to a cluster"
        )
        return f"executor: {self.kind} ({self.why}); {other}"


def probe_slurm(timeout_s: float = PING_TIMEOUT_S) -> SlurmProbe:
    """Is `sbatch` on the PATH and does slurmctld answer `scontrol ping`?"""
    if shutil.which("sbatch") is None:
        return SlurmProbe(False, "no sbatch on PATH")
    # With SLURM_CONF naming no file, Slurm's commands retry reading it for a minute;
    # without SLURM_CONF a configless login node has no file, so only an explicit one is checked.
    conf = os.environ.get("SLURM_CONF")
    if conf and not Path(conf).is_file():
        return SlurmProbe(False, f"sbatch on PATH, but SLURM_CONF={conf} names no file")
    from fm9g.orchestrator.slurm.commands import SlurmClient

    up, said = SlurmClient(timeout_s=timeout_s).ping_report()
    if up:
        return SlurmProbe(True, f"sbatch on PATH; scontrol ping: {said}", installed=True)
    return SlurmProbe(
        False, f"sbatch on PATH, but the controller does not answer (scontrol ping: {said})", installed=True
    )


def choose_auto(timeout_s: float = PING_TIMEOUT_S) -> ExecutorChoice:
    """`auto` made concrete: slurm where Slurm answers, else local."""
    probe = probe_slurm(timeout_s)
    return ExecutorChoice(
        "slurm" if probe.answers else "local", probe.why, slurm_silent=probe.installed and not probe.answers
    )


def record(store: StateStore, choice: ExecutorChoice) -> None:
    """The choice as an `executor_choice` event in a run's state.db."""
    store.event(
        EVENT,
        choice.describe(),
        chosen=choice.kind,
        requested=choice.requested,
        why=choice.why,
        confirmed=choice.confirmed,
    )
