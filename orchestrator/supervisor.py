"""The train stage's supervisor, as its parts: kept so older imports keep working.

What used to live here is now where it belongs:
- `train_policy.TrainPolicy`: the repair policy (budgets, exclusions, watchdogs, stops)
  and the tick loop; its class docstring states the state machine;
- `recovery`: the timeline of each repair (`RecoveryPhase`, `Recovery`, heartbeats);
- `jobs.JobTracker` and `jobs.log_tail`: submission, polling and job logs.
"""

from __future__ import annotations

from fm9g.orchestrator.train_policy import TrainPolicy

TrainSupervisor = TrainPolicy

__all__ = ["TrainSupervisor"]
