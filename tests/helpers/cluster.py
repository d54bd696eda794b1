"""The one "is the test Slurm cluster up?" probe.

It runs `scontrol ping` itself rather than through `SlurmClient`: a broken client must
fail the cluster tests, not skip them."""

from __future__ import annotations

import functools
import shutil
import subprocess

PROBE_TIMEOUT_S = 10.0
NOT_UP = "the test Slurm cluster is not up (`scontrol ping` failed): start it with `make cluster-up` (as root)"


@functools.cache
def cluster_up() -> bool:
    """True when a Slurm controller answers `scontrol ping` within PROBE_TIMEOUT_S (asked once per process)."""
    if shutil.which("scontrol") is None:
        return False
    try:
        result = subprocess.run(
            ["scontrol", "ping"], capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0 and "UP" in result.stdout
