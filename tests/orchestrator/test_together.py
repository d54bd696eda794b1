"""cluster.start: together, below the cluster: the allocation's script, the node agent's
single-node environment, and the policy following the nodes of one job one by one.

The policy cases reuse test_train_policy's scripted executor (a fake of the project's
Executor protocol, not of Slurm); the real allocation runs on the test cluster in
tests/integration/test_faults.py."""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fm9g.launchers.slurm_env import single_node_environment
from fm9g.orchestrator.executors.base import JobStatus
from fm9g.orchestrator.plan import together_spec
from fm9g.orchestrator.render import ScriptRenderer
from fm9g.orchestrator.state import JobState
from fm9g.rundir import RunDir, protocol
from fm9g.rundir.atomic import write_json
from fm9g.rundir.config import ClusterConfig
from tests.orchestrator.test_render import GOLDEN, HOSTILE, full_cluster
from tests.orchestrator.test_train_policy import APP, INFRA, Case, ScriptedExecutor, last, make_case


@dataclass
class AllocationExecutor(ScriptedExecutor):
    """The scripted executor, with the two calls only allocations have."""

    node_cancels: list[tuple[str, str]] = field(default_factory=list)
    releases: list[tuple[str, str]] = field(default_factory=list)

    def cancel_node(self, job_id: str, step: str) -> None:
        self.node_cancels.append((job_id, step))

    def release_node(self, job_id: str, node: str) -> bool:
        self.releases.append((job_id, node))
        return True


def together_case(tmp_path: Path, *settings: str, nodes: int = 3) -> Case:
    case = make_case(tmp_path, "cluster.start=together", *settings, nodes=nodes, start=False)
    executor = AllocationExecutor()
    case.executor = executor
    case.policy.tracker.executor = executor
    case.policy.executor = executor
    case.policy.start()
    return case


def started(case: Case, hosts: Sequence[str] = ("n0", "n1", "n2")) -> str:
    """The allocation RUNNING, each node's step record written as its agent would; its id."""
    job_id = str(case.row(0).job_id)
    for rank, host in enumerate(hosts):
        write_json(case.run.step_record(job_id, rank), {"host": host, "step": str(10 + rank)})
    case.executor.statuses[job_id] = JobStatus(JobState.RUNNING, node=hosts[0], held=",".join(hosts))
    case.tick()
    return job_id


# ------------------------------------------------------------------------- the policy


def test_together_submits_one_job_for_every_node(tmp_path: Path) -> None:
    case = together_case(tmp_path)
    assert len(case.executor.submitted) == 1
    rows = case.store.jobs("train")
    assert [(row.role, row.node_rank) for row in rows] == [("master", 0), ("worker", 1), ("worker", 2)]
    assert len({row.job_id for row in rows}) == 1
    assert all(event.data["together"] for event in case.events("submitted"))
    script = case.executor.submitted[0][1].read_text()
    assert "#SBATCH --nodes=3" in script and "#SBATCH --no-kill" in script
    job_id = started(case)
    # Each row takes its own host from its step record, never the job's batch host.
    assert [row.node for row in case.store.jobs("train")] == ["n0", "n1", "n2"]
    assert case.executor.statuses[job_id].state is JobState.RUNNING


def test_a_node_whose_step_ended_is_replaced_by_a_single_node_job_and_released(tmp_path: Path) -> None:
    case = together_case(tmp_path)
    job_id = started(case)
    write_json(case.run.exit_record(job_id, 2), {"code": 1, "time": case.clock()})
    case.tick()
    failure = last(case.events("failure"))
    assert (failure.data["node_rank"], failure.data["klass"], failure.data["node"]) == (2, APP, "n2")
    rows = case.policy.latest_rows()
    assert rows[2].job_id != job_id and rows[2].attempt == 2
    assert rows[0].job_id == rows[1].job_id == job_id and rows[0].live and rows[1].live
    replacement = case.executor.submitted[-1][1].read_text()
    assert "#SBATCH --nodes=1" in replacement and "node_agent worker" in replacement
    assert case.executor.releases == [(job_id, "n2")]
    assert last(case.events("release_node")).data["released"] is True


def test_a_step_that_ended_without_its_agents_record_is_a_node_failure(tmp_path: Path) -> None:
    case = together_case(tmp_path)
    job_id = started(case)
    # What the allocation's script writes when srun returns (even 0: "Node failure on n1").
    write_json(case.run.exit_record(job_id, 1), {"code": 0, "time": case.clock(), "by": "allocation"})
    case.tick()
    failure = last(case.events("failure"))
    assert (failure.data["node_rank"], failure.data["klass"], failure.data["state"]) == (1, INFRA, "NODE_FAIL")
    assert case.policy.latest_rows()[1].attempt == 2


def test_a_node_that_left_the_allocation_is_a_node_failure(tmp_path: Path) -> None:
    case = together_case(tmp_path)
    job_id = started(case)
    case.executor.statuses[job_id] = JobStatus(JobState.RUNNING, node="n0", held="n0,n2")  # n1 went down
    case.tick()
    failure = last(case.events("failure"))
    assert (failure.data["node_rank"], failure.data["klass"], failure.data["state"]) == (1, INFRA, "NODE_FAIL")
    assert [s[0] for s in case.submissions()][-1] == 1
    assert case.store.meta("retries_used") == {INFRA: 1}


def test_the_whole_allocation_ending_is_one_failure_not_one_per_node(tmp_path: Path) -> None:
    case = together_case(tmp_path)
    job_id = started(case)
    case.executor.statuses[job_id] = JobStatus(JobState.NODE_FAIL, node="n0")
    case.tick()
    assert sorted(event.data["node_rank"] for event in case.events("failure")) == [0, 1, 2]
    assert case.store.meta("retries_used") == {INFRA: 1}
    repairs = [s for s in case.submissions() if s[1] == 2]
    assert sorted(s[0] for s in repairs) == [0, 1, 2]  # each node alone, as a single-node job


def test_a_nodes_own_exit_code_beats_the_allocations(tmp_path: Path) -> None:
    case = together_case(tmp_path)
    job_id = started(case)
    for rank in range(3):
        write_json(case.run.exit_record(job_id, rank), {"code": protocol.EXIT_CONTINUE, "time": case.clock()})
    case.executor.statuses[job_id] = JobStatus(JobState.COMPLETED, exit_code=0, node="n0")
    case.tick()
    assert [event.data["klass"] for event in case.events("failure")] == ["continue"] * 3
    assert last(case.events("continue"))
    assert len(case.executor.submitted) == 2  # the continue is one new allocation
    assert "#SBATCH --nodes=3" in case.executor.submitted[-1][1].read_text()


def test_hang_cancels_only_the_masters_step(tmp_path: Path) -> None:
    case = together_case(tmp_path, "supervise.hang_timeout=60")
    job_id = started(case)
    case.clock.advance(120)
    case.tick()
    assert case.events("hang")
    assert case.executor.node_cancels == [(job_id, "10")] and not case.executor.cancelled


# ------------------------------------------------------------------------- the script


def render_together(cluster: ClusterConfig, run: RunDir, nodes: int = 3) -> str:
    renderer = ScriptRenderer(
        run_name=run.name, run_dir=str(run.root), cluster=cluster, python="/opt/venv/bin/python", config_hash="0" * 12
    )
    return renderer.render(together_spec(run, nodes, 0), 1)


def test_golden_together_script(golden: Callable[[Path, str], None]) -> None:
    golden(GOLDEN / "together.sbatch", render_together(full_cluster(), RunDir(Path("/shared/runs/demo"))))


def fake_commands(bin_dir: Path, hosts: list[str], failing_host: str) -> None:
    """`scontrol show hostnames` and `srun` stand-ins, to run the script's own shell logic
    (host mapping, exit records, quoting) without an allocation: srun prints its
    arguments, one per line, and fails on `failing_host` as a dead node's step does."""
    bin_dir.mkdir()
    scripts = {
        "scontrol": "#!/bin/bash\nprintf '%s\\n' " + " ".join(hosts) + "\n",
        "srun": (
            '#!/bin/bash\nout=; host=\nfor a in "$@"; do case $a in --output=*) out=${a#--output=};; '
            '--nodelist=*) host=${a#--nodelist=};; esac; done\nprintf \'%s\\n\' "$@" > "$out"\n'
            f'[ "$host" != {failing_host} ]\n'
        ),
    }
    for name, text in scripts.items():
        path = bin_dir / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_the_script_maps_nodes_and_records_a_dead_nodes_end(tmp_path: Path) -> None:
    run = RunDir.of(tmp_path / HOSTILE).make()
    run.stage_logs("train").mkdir(parents=True)
    text = render_together(ClusterConfig(), run)
    script = tmp_path / "job.sh"
    script.write_text(text)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    fake_commands(tmp_path / "bin", ["h0", "h1", "h2"], failing_host="h2")
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "SLURM_JOB_ID": "77"}
    write_json(run.exit_record("77", 0), {"code": protocol.EXIT_CONTINUE, "time": 1.0})  # rank 0's agent wrote one
    subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, check=True, capture_output=True)
    assert not (tmp_path / "PWNED").exists()
    for rank, role in enumerate(["master", "worker", "worker"]):
        argv = (run.stage_logs("train") / f"{role}{rank}-a1.out").read_text().splitlines()
        assert f"--nodelist=h{rank}" in argv and str(run.root) in argv  # the path arrived as one word
        assert argv[argv.index("--node-rank") + 1] == str(rank) and "--in-allocation" in argv
    # An agent's own record stands; a step that ended without one gets srun's status.
    codes = [protocol.read_exit_code(run.exit_record("77", rank)) for rank in range(3)]
    assert [code[0] if code else None for code in codes] == [protocol.EXIT_CONTINUE, 0, 1]


# ------------------------------------------------------------------- the environment


def test_a_step_of_an_allocation_looks_like_a_single_node_job() -> None:
    environ = {
        "SLURM_JOB_ID": "77",
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "1",
        "SLURM_STEP_ID": "2",
        "SLURM_STEP_NODELIST": "h1",
        "SLURM_NNODES": "3",
        "SLURM_JOB_NUM_NODES": "3",
        "SLURM_NODELIST": "h[0-2]",
        "SLURM_JOB_NODELIST": "h[0-2]",
        "SLURM_JOB_CPUS_PER_NODE": "8(x3)",
        "SLURM_CPUS_ON_NODE": "8",
        "PMI_RANK": "0",
        "PATH": "/usr/bin",
    }
    clean = single_node_environment(environ, "h1")
    assert clean == {
        "SLURM_JOB_ID": "77",
        "SLURM_NNODES": "1",
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_NODELIST": "h1",
        "SLURM_JOB_NODELIST": "h1",
        "SLURM_JOB_CPUS_PER_NODE": "8",
        "SLURM_CPUS_ON_NODE": "8",
        "PATH": "/usr/bin",
    }


def test_together_with_the_local_executor_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    from fm9g.orchestrator.plan import plan_run
    from fm9g.rundir import config as cfg
    from fm9g.rundir.config import ConfigError
    from tests.helpers.runs import TINY

    config, _ = cfg.load(TINY, ["executor=local", "cluster.nodes=2", "cluster.start=together"])
    run = RunDir.of(tmp_path / "run")
    with pytest.raises(ConfigError, match="cluster.start: together .* set executor: slurm"):
        plan_run(config, run)
    assert not run.root.exists()
