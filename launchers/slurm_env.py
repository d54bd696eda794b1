"""The environment of a node agent started as one step of a multi-node allocation
(cluster.start: together), made to look like a single-node job's.

The guide runs torchrun without srun because launchers read Slurm's step and task
variables: under `srun`, SLURM_PROCID, SLURM_NTASKS and SLURM_NNODES describe the step,
not the training job, and BMTrain and torch's elastic agent would believe them.  A node
of a `together` allocation is started by srun, so before torchrun starts, every step and
task variable goes and the job's geometry is rewritten to one node: what the trainer
then sees is what a separate single-node job would have given it.
"""

from __future__ import annotations

from collections.abc import Mapping

# Variables that only exist because of srun: the step and the task within it.
_STEP_PREFIXES = ("SLURM_STEP", "SLURM_SRUN_COMM", "SLURM_CPU_BIND", "SLURM_TOPOLOGY_ADDR", "PMI_", "PMIX_")
_STEP_NAMES = {
    "SLURM_PROCID",
    "SLURM_LOCALID",
    "SLURM_NODEID",
    "SLURM_GTIDS",
    "SLURM_NTASKS",
    "SLURM_NPROCS",
    "SLURM_NTASKS_PER_NODE",
    "SLURM_TASKS_PER_NODE",
    "SLURM_TASK_PID",
    "SLURM_DISTRIBUTION",
    "SLURM_LAUNCH_NODE_IPADDR",
    "SLURM_PRIO_PROCESS",
    "SLURM_UMASK",
    "SLURM_MPI_TYPE",
    "SLURM_LABELIO",
    "SLURM_CPUS_PER_TASK_STEP",
}
# The allocation's geometry, rewritten to the one node this agent runs on.
_ONE_NODE = {"SLURM_NNODES": "1", "SLURM_JOB_NUM_NODES": "1"}
_NODE_LISTS = ("SLURM_NODELIST", "SLURM_JOB_NODELIST")


def single_node_environment(environ: Mapping[str, str], host: str) -> dict[str, str]:
    """`environ` without srun's step and task variables, its node count and node list
    those of a one-node job on `host`."""
    kept = {
        key: value for key, value in environ.items() if key not in _STEP_NAMES and not key.startswith(_STEP_PREFIXES)
    }
    for key, value in _ONE_NODE.items():
        if key in kept:
            kept[key] = value
    for key in _NODE_LISTS:
        if key in kept:
            kept[key] = host
    if "SLURM_JOB_CPUS_PER_NODE" in kept:  # "8(x4)" or "8,4(x2)": this node's is the first
        kept["SLURM_JOB_CPUS_PER_NODE"] = kept["SLURM_JOB_CPUS_PER_NODE"].split(",")[0].split("(")[0]
    return kept
