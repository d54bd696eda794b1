"""The vLLM engine (GPU): offline generation and the served endpoint.  Skipped on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest

from fm9g.launchers.infer import VLLM_MISSING, vllm_usable

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not vllm_usable(), reason=VLLM_MISSING)]


def test_vllm_generate(hf_model: Path) -> None:
    from fm9g.launchers.infer import generate_vllm
    from fm9g.launchers.prompts import Sampling

    [[output]] = generate_vllm(hf_model, ["<用户>你好<AI>"], Sampling(temperature=0, max_tokens=16))
    assert output["text"].startswith("你好")


def test_vllm_serve(trained_run, tmp_path: Path) -> None:
    from fm9g.orchestrator.cli import main

    from .conftest import check_server

    try:
        assert main(["serve", str(trained_run.run.root), "--engine", "vllm", "--executor", "local"]) == 0
        assert check_server(trained_run.run)["engine"] == "vllm"
    finally:
        main(["serve", str(trained_run.run.root), "--stop"])
