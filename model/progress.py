"""The trainer's resumable counters and the random-number-generator states of a rank.

Both go into a checkpoint's trainer_state.pt, so a resumed run continues bit-for-bit:
the counters give the step and token totals, the RNG states (python, numpy, torch and
CUDA) make dropout and any other sampling repeat exactly.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass
class Progress:
    """Step and token counters, and which resume_ckpt this line of checkpoints started from."""

    step: int = 0
    tokens_passed: int = 0
    task_tokens: dict[str, int] = field(default_factory=dict)
    origin: str = ""  # train.resume_ckpt when this line began; a restart with the same value continues it

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """This process's RNG states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
