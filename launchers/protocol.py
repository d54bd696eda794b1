"""The contract between the node agent, the trainer and the supervisor: environment
variable names and exit codes.  Constants only, so every side can import it cheaply."""

from __future__ import annotations

# Environment the node agent gives the trainer (on top of torchrun's RANK, WORLD_SIZE, ...).
ENV_RUN_DIR = "FM9G_RUN_DIR"
ENV_NODE_RANK = "FM9G_NODE_RANK"
ENV_GENERATION = "FM9G_GENERATION"
ENV_STAGE = "FM9G_STAGE"

# Exit codes of a node job, read back by the supervisor (sacct ExitCode / local rc).
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_ENDPOINT_TIMEOUT = 3    # a worker never saw the master's endpoint
EXIT_CONTINUE = 75           # checkpointed on request (preemption/walltime): continue the run
EXIT_CONFIG = 78             # config/data error: retrying cannot help (do-not-retry class)

# Heartbeats older than this many seconds mean the node is not making progress.
HEARTBEAT_STALE_S = 120
