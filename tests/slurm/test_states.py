"""The JobState table: every Slurm spelling maps, and terminal/active split the states."""

from __future__ import annotations

import pytest

from fm9g.orchestrator.slurm.states import SLURM_STATE_NAMES, JobState


@pytest.mark.parametrize(
    "text, state",
    [
        ("CANCELLED by 0", JobState.CANCELLED),
        ("CANCELLED by 1234", JobState.CANCELLED),
        ("CANCELLED+", JobState.CANCELLED),
        ("PD", JobState.PENDING),
        ("R", JobState.RUNNING),
        ("CG", JobState.COMPLETING),
        ("CA", JobState.CANCELLED),
        ("F", JobState.FAILED),
        ("TO", JobState.TIMEOUT),
        ("NF", JobState.NODE_FAIL),
        ("BF", JobState.BOOT_FAIL),
        ("PR", JobState.PREEMPTED),
        ("OOM", JobState.OUT_OF_MEMORY),
        ("CD", JobState.COMPLETED),
        (" running ", JobState.RUNNING),
        ("REQUEUE_HOLD", JobState.PENDING),
        ("NOT_A_STATE", JobState.UNKNOWN),
        ("", JobState.UNKNOWN),
    ],
)
def test_from_slurm(text: str, state: JobState) -> None:
    assert JobState.from_slurm(text) is state


def test_every_member_maps_from_its_own_name() -> None:
    for state in JobState:
        if state is JobState.SUBMITTING:  # ours (a row before sbatch), never Slurm's
            assert JobState.from_slurm(state.value) is JobState.UNKNOWN
            continue
        assert JobState.from_slurm(state.value) is state


def test_terminal_and_active_are_disjoint_and_cover_all_but_unknown() -> None:
    for state in JobState:
        if state is JobState.UNKNOWN:
            assert not state.is_terminal and not state.is_active
        else:
            assert state.is_terminal != state.is_active, state


def test_table_values_are_members_and_keys_upper_case() -> None:
    assert all(isinstance(value, JobState) for value in SLURM_STATE_NAMES.values())
    assert all(key == key.upper() for key in SLURM_STATE_NAMES)
    with pytest.raises(TypeError):
        SLURM_STATE_NAMES["X"] = JobState.RUNNING  # type: ignore[index]
