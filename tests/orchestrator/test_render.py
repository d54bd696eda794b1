"""Rendered job scripts: quoted, syntactically valid, stable (golden files)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from fm9g.orchestrator.plan import IndexSource, index_specs, node_spec, tokenizer_spec
from fm9g.orchestrator.render import ScriptRenderer
from fm9g.rundir import RunDir
from fm9g.rundir.config import ClusterConfig, ConfigError
from fm9g.rundir.protocol import slug

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
HOSTILE = "evil $(touch PWNED) \"q\" 's' `id`; rm -rf ~ & echo"


def render_node(
    rank: int = 0, cluster: ClusterConfig | None = None, name: str = "demo", run_dir: str = "/shared/runs/demo"
) -> str:
    renderer = ScriptRenderer(
        run_name=name,
        run_dir=run_dir,
        cluster=cluster or ClusterConfig(),
        python="/opt/venv/bin/python",
        config_hash="0123456789ab",
    )
    return renderer.render(node_spec(rank, generation=0), attempt=1)


def full_cluster() -> ClusterConfig:
    return ClusterConfig(
        partition="gpu",
        nodes=4,
        gpus_per_node=8,
        cpus_per_task=64,
        time="2-00:00:00",
        account="proj1",
        qos="high",
        constraint="a100",
        exclude=["g3001", "g3002"],
        extra_sbatch=["--reservation=llm"],
        mem="500G",
        setup=["module load cuda/12.1", "source /opt/venv/bin/activate", "export NCCL_DEBUG=WARN"],
    )


@pytest.mark.parametrize("role,rank", [("master", 0), ("worker", 1)])
def test_golden_scripts(role: str, rank: int, golden: Callable[[Path, str], None]) -> None:
    golden(GOLDEN / f"{role}.sbatch", render_node(rank, full_cluster()))


def test_golden_index_and_tokenizer_scripts(golden: Callable[[Path, str], None]) -> None:
    run = RunDir(Path("/shared/runs/demo"))
    renderer = ScriptRenderer(
        run_name=run.name,
        run_dir=str(run.root),
        cluster=full_cluster(),
        python="/opt/venv/bin/python",
        config_hash="0123456789ab",
    )
    source = IndexSource("wiki", Path("/data/wiki"), run.indexed / "wiki", run.indexed / ".work" / "wiki", "zh", 8)
    shard, merge = index_specs(source, shards=8)
    golden(GOLDEN / "index-shard.sbatch", renderer.render(shard, 1))
    golden(GOLDEN / "index-merge.sbatch", renderer.render(merge, 1))
    text = renderer.render(tokenizer_spec(run, 8000), 1)
    golden(GOLDEN / "tokenizer.sbatch", text)
    # CPU jobs: no GPU asked for, no checkpoint signal; the array size is not in the script
    for script in (renderer.render(shard, 1), text):
        assert "--gres" not in script and "--signal" not in script and "--array" not in script


def test_every_option_reaches_the_script() -> None:
    text = render_node(0, full_cluster())
    for flag in (
        "--partition=gpu",
        "--account=proj1",
        "--qos=high",
        "--gres=gpu:8",
        "--constraint=a100",
        "--exclude=g3001,g3002",
        "--time=2-00:00:00",
        "--cpus-per-task=64",
        "--mem=500G",
        "--reservation=llm",
        "--open-mode=append",
        "--signal=B:USR1@120",
        "--no-requeue",
    ):
        assert f"#SBATCH {flag}\n" in text
    assert "module load cuda/12.1\n" in text and "export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1\n" in text
    sbatch_lines = [line for line in text.splitlines() if line.startswith("#SBATCH")]
    assert sbatch_lines == sorted(sbatch_lines)


def test_hostile_run_name_injects_nothing(tmp_path: Path) -> None:
    run_dir = tmp_path / HOSTILE
    run_dir.mkdir()
    text = render_node(0, ClusterConfig(), name=HOSTILE, run_dir=str(run_dir))
    script = tmp_path / "job.sh"
    # Replace the final exec with a probe that prints what the agent would receive.
    probe = text.replace("exec ", "printf '%s\\n' ", 1)
    script.write_text(probe)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    out = subprocess.run(["bash", str(script)], cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert str(run_dir) in out.splitlines()  # the path arrived as one word, unchanged
    assert not (tmp_path / "PWNED").exists()
    for line in text.splitlines():
        if line.startswith("#SBATCH"):
            assert "$(" not in line and "`" not in line and " " not in line.removeprefix("#SBATCH ")


def test_sbatch_value_with_whitespace_is_refused() -> None:
    with pytest.raises(ConfigError, match="cluster.partition"):
        render_node(0, ClusterConfig(partition="gpu --wrap=x"))


def test_slug_keeps_distinct_names_distinct() -> None:
    assert slug("a b") != slug("a_b")
    assert slug("plain-name_1.0") == "plain-name_1.0"
