"""The stages after training, chained afterok: convert -> infer (the eval prompt set) ->
serve, as listed in the config's `pipeline.after_train`.

The lead's supervisor calls `run_post_train_stages` once the train stage completed.  A
stage that already finished for the same inputs is skipped, so calling it again is
safe; a failed stage stops the chain, and can be re-run alone with `fm9g-launch
convert|infer|serve RUN`.
"""

from __future__ import annotations

from pathlib import Path

from fm9g.launchers.prompts import InferenceError, Sampling
from fm9g.orchestrator.executors.base import Executor
from fm9g.orchestrator.inference.jobs import Say, stage_context
from fm9g.orchestrator.inference.serve_stage import serve_stage
from fm9g.orchestrator.inference.stages import convert_stage, infer_stage
from fm9g.orchestrator.state import StateStore
from fm9g.rundir import RunDir
from fm9g.rundir.config import RunConfig

ORDER = ("convert", "infer", "serve")


def eval_sampling(config: RunConfig) -> Sampling:
    pipeline = config.pipeline
    return Sampling(
        temperature=pipeline.eval_temperature,
        top_p=pipeline.eval_top_p,
        max_tokens=pipeline.eval_max_tokens,
        n=1,
        seed=pipeline.eval_seed,
    )


def run_post_train_stages(run: RunDir, config: RunConfig, store: StateStore, executor: Executor, say: Say) -> int:
    """Run the configured post-training stages in order; 0 when all completed or were skipped."""
    wanted = set(config.pipeline.after_train)
    if not wanted:
        return 0
    ctx = stage_context(run, config, store, executor, say)
    pipeline = config.pipeline
    done: list[str] = []
    try:
        model = convert_stage(ctx)  # infer and serve need the HF folder too
        done.append("convert")
        if "infer" in wanted:
            assert pipeline.eval_prompts is not None  # the config validator guarantees it
            output = Path(pipeline.eval_output) if pipeline.eval_output else run.infer_output()
            infer_stage(
                ctx,
                model=model,
                prompts=Path(pipeline.eval_prompts),
                output=output,
                sampling=eval_sampling(config),
                chat=config.data.sft,
                engine=pipeline.engine,
                trust_remote_code=pipeline.trust_remote_code,
            )
            done.append("infer")
        if "serve" in wanted:
            serve_stage(
                ctx,
                model=model,
                port=pipeline.serve_port,
                engine=pipeline.engine,
                trust_remote_code=pipeline.trust_remote_code,
                engine_args=pipeline.serve_engine_args,
            )
            done.append("serve")
    except InferenceError as exc:
        left = [stage for stage in ORDER if stage in wanted | {"convert"} and stage not in done]
        say(f"error: {exc}")
        say(
            f"post-training stages not done: {', '.join(left)}; re-run the failed one alone with "
            f"`fm9g-launch {left[0]} {run.root} ...`"
        )
        return 1
    return 0
