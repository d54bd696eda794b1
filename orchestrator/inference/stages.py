"""The `convert` and `infer` stages, and what a RUN_OR_MODEL argument names.

Each stage is one job (templates/convert.sbatch.j2, infer.sbatch.j2) followed to its
end; its row in the state DB says RUNNING, COMPLETED, FAILED or SKIPPED.  A stage that
already finished for the same inputs is skipped; a failed one runs again when asked.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from fm9g.launchers.infer import EngineChoice, check_engine_for_model, check_model_dir
from fm9g.launchers.prompts import InferenceError, Sampling, read_prompts, sampling_per_prompt
from fm9g.orchestrator.inference.jobs import StageContext, submit, wait
from fm9g.orchestrator.jobs import log_excerpt
from fm9g.orchestrator.state import JobState
from fm9g.rundir import RunDir, site
from fm9g.rundir import config as config_mod
from fm9g.rundir.atomic import write_text
from fm9g.rundir.config import RunConfig

# ------------------------------------------------------------------ RUN_OR_MODEL


@dataclass(frozen=True)
class Target:
    """What a RUN_OR_MODEL argument resolved to: the run directory that holds the stage's
    state, its config, and the model folder (None: convert the run's checkpoint first)."""

    run: RunDir
    config: RunConfig
    model: Path | None


def _model_run_name(model: Path) -> str:
    # runs/x/hf/60 -> "hf-60": a bare step number says nothing on its own.
    return f"{model.parent.name}-{model.name}" if model.name.isdigit() else model.name


def resolve_target(
    path: Path, *, name: str | None = None, run_root: str | Path = "runs", overrides: list[str] | None = None
) -> Target:
    """A run directory (runs/NAME, or NAME under ./runs) or a Hugging Face model folder.

    A model folder gets a run directory of its own (runs/<name>/, default: the folder's
    name) for its scripts, logs, state and serve files."""
    from fm9g.orchestrator.launch import check_run_name

    # A folder that is itself a model wins over a run of the same name under run_root:
    # `infer my-model` makes runs/my-model, and a later `serve my-model` means the folder.
    is_model = (path / "config.json").is_file() and not (path / "config.yaml").is_file()
    candidates = [path] if is_model else [path, Path(run_root) / path]
    for candidate in candidates:
        if (candidate / "config.yaml").is_file():
            run = RunDir.of(candidate)
            config = config_mod.load_resolved(run.config)
            if overrides:
                raw = config_mod.apply_overrides(config.model_dump(mode="json"), overrides)
                config = config_mod.validate(raw, "--set")
            return Target(run, config, None)
    _refuse_bmtrain_checkpoint(path)
    if (path / "config.json").is_file():
        model = path.resolve()
        run_name = name or _model_run_name(model)
        check_run_name(run_name)
        run = RunDir.of(Path(run_root) / run_name)
        if run.config.is_file():
            raw = config_mod.read_file(run.config)
        else:
            # A fresh model-folder run takes the site defaults (partition, account, setup
            # lines) as a launched run does; its config.yaml then holds them resolved.
            site_file = site.site_path()
            site_raw = site.read_site(site_file) if site_file else {}
            raw = config_mod.merge_layers(site_raw, {"run_root": str(Path(run_root))})
        config = config_mod.validate(config_mod.apply_overrides(raw, overrides or []), "--set")
        run.make()
        write_text(run.config, config_mod.dump(config))
        return Target(run, config, model)
    raise InferenceError(
        f"{path}: neither a run directory (no config.yaml; runs live under ./runs/<name>) "
        "nor a Hugging Face model folder (no config.json)"
    )


def _refuse_bmtrain_checkpoint(path: Path) -> None:
    """A released BMTrain `.pt` (or its folder, whose config.json is cpm_dragonfly's) is no HF folder."""
    hf_weights = path.is_dir() and (list(path.glob("*.safetensors")) or list(path.glob("pytorch_model*.bin")))
    pt = (path.is_file() and path.suffix == ".pt") or (path.is_dir() and not hf_weights and list(path.glob("*.pt")))
    if pt:
        raise InferenceError(
            f"{path} is a BMTrain checkpoint (.pt), not a Hugging Face folder: convert it first with "
            f"`fm9g-launch convert {path} --output DIR` and pass DIR"
        )


# ------------------------------------------------------------------ convert


def checkpoint_step(run: RunDir, step: int | None = None) -> int:
    """The step to convert: `step` if that checkpoint is complete, else the latest complete one."""
    from fm9g.model.checkpoint import Checkpointer, CheckpointError

    checkpoints = Checkpointer(run.checkpoints, rank=0, world_size=1, barrier=lambda: None)
    if step is not None:
        try:
            return int(checkpoints.resolve(str(step)).name)
        except CheckpointError as exc:
            raise InferenceError(f"{run.root}: {exc}") from None
    latest = checkpoints.latest()
    if latest is None:
        raise InferenceError(
            f"{run.root}: no complete checkpoint under {run.checkpoints} to convert; train the run "
            "first (fm9g-launch pretrain ...), or pass a Hugging Face model folder instead of the run"
        )
    return int(latest.name)


def convert_stage(
    ctx: StageContext, *, step: int | None = None, output: Path | None = None, stage: str = "convert"
) -> Path:
    """Export checkpoint `step` (default: the latest) to an HF folder; skipped when that
    step was already converted to that folder.  Returns the folder."""
    run, store = ctx.run, ctx.store
    step = checkpoint_step(run, step)
    target = (output or run.hf_dir(step)).resolve()
    store.upsert_stage(stage, "convert")
    converted = store.meta("converted", {})
    if (target / "config.json").is_file() and converted.get(str(target)) == step:
        store.set_stage(stage, "SKIPPED", detail=f"step {step} already converted: {target}")
        ctx.say(f"convert: checkpoint step {step} is already converted to {target} (skipped)")
        return target
    store.set_stage(stage, "RUNNING", detail=f"step {step} -> {target}")
    row = submit(
        ctx,
        stage=stage,
        template="convert.sbatch.j2",
        values={"step": step, "output": str(target)},
        why=f"checkpoint step {step} -> {target}",
    )
    ended = wait(ctx, row)
    if ended.state is not JobState.COMPLETED or not (target / "config.json").is_file():
        store.set_stage(stage, "FAILED", detail=f"job {row.job_id} {ended.state.value}")
        raise InferenceError(
            f"convert job {row.job_id} ended {ended.state.value} (exit code {ended.exit_code}); "
            f"log {row.log}:\n{log_excerpt(row.log)}\nfix the cause and run "
            f"`fm9g-launch convert {run.root}` again"
        )
    converted[str(target)] = step
    store.set_meta("converted", converted)
    store.set_stage(stage, "COMPLETED", detail=f"step {step} -> {target}", progress=1.0)
    ctx.say(f"convert: checkpoint step {step} -> {target}")
    return target


# ------------------------------------------------------------------ infer


def _fingerprint(
    model: Path, prompts: Path, sampling: Sampling, chat: bool, engine: str, remote: bool, engine_args: list[str]
) -> str:
    """What makes two infer runs the same: model files, prompt bytes, sampling, format, engine."""
    stamp = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(model.iterdir()) if p.is_file()]
    facts = {
        "model": str(model),
        "files": stamp,
        "prompts": hashlib.sha256(prompts.read_bytes()).hexdigest(),
        "sampling": sampling.to_dict(),
        "chat": chat,
        "engine": engine,
        "trust_remote_code": remote,
        "engine_args": engine_args,
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()


def infer_stage(
    ctx: StageContext,
    *,
    model: Path,
    prompts: Path,
    output: Path,
    sampling: Sampling,
    chat: bool,
    engine: EngineChoice = "auto",
    force: bool = False,
    stage: str = "infer",
    trust_remote_code: bool = False,
    engine_args: list[str] | None = None,
) -> Path:
    """Generate completions for a prompt file as a job; skipped when the same model,
    prompts and sampling already produced `output`.  Returns the output path.

    The model folder, the prompt file and every prompt's sampling (checked against
    `engine`) are validated before the job is queued."""
    from fm9g.orchestrator.inference.serve_stage import check_engine_args

    store = ctx.store
    model, prompts, output = model.resolve(), prompts.resolve(), output.resolve()
    engine_args = list(engine_args or [])
    store.upsert_stage(stage, "infer")
    try:
        check_engine_args(engine, engine_args)
        check_model_dir(model, trust_remote_code=trust_remote_code)
        check_engine_for_model(engine, model)
        lines = read_prompts(prompts)  # a bad prompt file fails here, naming FILE:LINE, before any job
        sampling_per_prompt(prompts, lines, sampling, engine)  # and sampling the engine would refuse
        count = len(lines)
    except InferenceError as exc:
        store.set_stage(stage, "FAILED", detail=str(exc).splitlines()[0])
        raise
    fingerprint = _fingerprint(model, prompts, sampling, chat, engine, trust_remote_code, engine_args)
    done = store.meta(f"{stage}:outputs", {})
    if not force and output.is_file() and done.get(str(output)) == fingerprint:
        store.set_stage(stage, "SKIPPED", detail=f"{output} is up to date")
        ctx.say(f"infer: {output} already holds these completions (skipped; --force runs again)")
        return output
    store.set_stage(stage, "RUNNING", detail=f"{count} prompts -> {output}")
    values = {
        "model": str(model),
        "prompts": str(prompts),
        "output": str(output),
        "chat": chat,
        "engine": engine,
        "sampling_json": sampling.to_json(),
        "trust_remote_code": trust_remote_code,
        "engine_args": engine_args,
    }
    row = submit(ctx, stage=stage, template="infer.sbatch.j2", values=values, why=f"{count} prompts from {prompts}")
    ended = wait(ctx, row)
    if ended.state is not JobState.COMPLETED or not output.is_file():
        store.set_stage(stage, "FAILED", detail=f"job {row.job_id} {ended.state.value}")
        raise InferenceError(
            f"infer job {row.job_id} ended {ended.state.value} (exit code {ended.exit_code}); "
            f"log {row.log}:\n{log_excerpt(row.log)}\nfix the cause and run `fm9g-launch infer` again"
        )
    done[str(output)] = fingerprint
    store.set_meta(f"{stage}:outputs", done)
    store.set_stage(stage, "COMPLETED", detail=f"{count} prompts -> {output}", progress=1.0)
    ctx.say(f"infer: wrote {count} completions to {output}")
    return output
