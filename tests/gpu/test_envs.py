"""The two GPU environments (issue 17) as the job scripts use them: training jobs activate
cluster.train_env and run its python, infer and serve jobs cluster.serve_env's; neither
changes a script when unset (the golden files of tests/golden/ stay as they were)."""

from __future__ import annotations

import shlex
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from fm9g.orchestrator.inference.jobs import stage_spec
from fm9g.orchestrator.plan import node_spec
from fm9g.orchestrator.render import ScriptRenderer
from fm9g.rundir.config import ClusterConfig
from tests.inference.test_render import VALUES

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
TRAIN_ENV = "/shared/envs/fm9g-train"
SERVE_ENV = "/shared/envs/fm9g-serve"
HOSTILE = "/shared/envs/x $(touch PWNED) 'q'; rm -rf ~"

# The serving tests' own values, so this file follows their templates as they change.
STAGE_VALUES = {stage: VALUES[stage] for stage in ("infer", "serve")}


def renderer(train_env: str | None = TRAIN_ENV, serve_env: str | None = SERVE_ENV) -> ScriptRenderer:
    cluster = ClusterConfig(
        partition="gpu", gpus_per_node=8, setup=["module load cuda/12.4"], train_env=train_env, serve_env=serve_env
    )
    return ScriptRenderer(
        run_name="demo",
        run_dir="/shared/runs/demo",
        cluster=cluster,
        python="/opt/login/bin/python",
        config_hash="0123456789ab",
    )


def exec_line(script: str) -> list[str]:
    return shlex.split(next(line for line in script.splitlines() if line.startswith("exec ")))


def test_training_jobs_activate_the_train_env_and_run_its_python(golden: Callable[[Path, str], None]) -> None:
    for rank in (0, 1):
        script = renderer().render(node_spec(rank, generation=0), attempt=1)
        assert f"source {TRAIN_ENV}/bin/activate" in script and SERVE_ENV not in script
        assert exec_line(script)[1] == f"{TRAIN_ENV}/bin/python"
        subprocess.run(["bash", "-n"], input=script, text=True, check=True)
    golden(GOLDEN / "master-train-env.sbatch", renderer().render(node_spec(0, generation=0), attempt=1))


@pytest.mark.parametrize("stage", sorted(STAGE_VALUES))
def test_infer_and_serve_jobs_activate_the_serve_env(stage: str) -> None:
    # No golden file here: the rest of these two templates is the serving code's, and changes with it.
    script = renderer().render(stage_spec(stage, f"{stage}.sbatch.j2", STAGE_VALUES[stage]), attempt=1)
    assert f"source {SERVE_ENV}/bin/activate" in script and TRAIN_ENV not in script
    assert exec_line(script)[1] == f"{SERVE_ENV}/bin/python"
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)


def test_unset_envs_keep_the_configured_python() -> None:
    script = renderer(None, None).render(node_spec(0, generation=0), attempt=1)
    assert "bin/activate" not in script.replace("module load", "") and exec_line(script)[1] == "/opt/login/bin/python"


def test_an_env_path_is_one_quoted_word(tmp_path: Path) -> None:
    script = renderer(HOSTILE, HOSTILE).render(node_spec(0, generation=0), attempt=1)
    assert exec_line(script)[1] == f"{HOSTILE}/bin/python"
    activate = next(line for line in script.splitlines() if line.startswith("source "))
    assert shlex.split(activate) == ["source", f"{HOSTILE}/bin/activate"]
    # Run the activation line for real: the quoting holds, nothing is executed from the path.
    subprocess.run(["bash", "-c", activate + " || true"], cwd=tmp_path, check=True, capture_output=True)
    assert not (tmp_path / "PWNED").exists()


def test_a_relative_or_unexpanded_env_path_is_refused_with_the_fix() -> None:
    for path in ("$HOME/envs/train", "~/envs/train", "envs/train"):
        with pytest.raises(ValueError, match="must be an absolute path") as info:
            ClusterConfig(train_env=path)
        assert "/shared/envs/fm9g-train" in str(info.value)
    with pytest.raises(ValueError, match="serve_env"):
        ClusterConfig(serve_env="venv")
