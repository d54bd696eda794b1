"""The `serve` stage: an OpenAI-compatible server as a job, its API key, its readiness,
and `--stop`.

The key is the user's (`--api-key`, or `--api-key-file`, as the guide's users pass
vLLM theirs) or, by default, generated once per run (secrets.token_urlsafe); either way
it is kept in serve/api_key with mode 0600 and the job reads it from there, so it never
appears in a script, a job's command line or a log.  The served model id is the run's
name (the folder's path is accepted too).  The job publishes serve/endpoint.json itself; the server is ready when GET
/health answers 200, and we keep asking only while the job is alive (PENDING or
RUNNING): a job that ends first is reported with its log, there is no fixed deadline.
"""

from __future__ import annotations

import secrets
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from fm9g.launchers.engine_args import parse_engine_arg
from fm9g.launchers.infer import EngineChoice, check_engine_for_model, check_model_dir
from fm9g.launchers.prompts import InferenceError
from fm9g.orchestrator.inference.jobs import StageContext, refresh, seen, stop_on_interrupt, submit
from fm9g.orchestrator.jobs import UnknownTooLong, UnseenClock, log_excerpt
from fm9g.orchestrator.state import JobRow
from fm9g.rundir.atomic import read_json, write_text

STAGE = "serve"
EXECUTOR_META = "serve:executor"


def ensure_api_key(path: Path) -> str:
    """The run's API key, generated on first use and stored with mode 0600."""
    try:
        key = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        key = ""
    if not key:
        key = secrets.token_urlsafe(32)
        write_text(path, key + "\n", mode=0o600)
    elif path.stat().st_mode & 0o077:
        path.chmod(0o600)  # a key file someone copied in readable by others
    return key


def api_key_of(*, api_key: str | None, api_key_file: Path | None) -> str | None:
    """The key the user gave (`--api-key` or `--api-key-file`), or None for the run's own."""
    if api_key is not None:
        key = api_key.strip()
        if not key:
            raise InferenceError("--api-key is empty: an empty key would let every request in")
        return key
    if api_key_file is None:
        return None
    try:
        key = api_key_file.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise InferenceError(f"--api-key-file {api_key_file}: cannot read it ({exc.strerror})") from None
    if not key:
        raise InferenceError(f"--api-key-file {api_key_file}: the file is empty; write the key in it")
    return key


def set_api_key(path: Path, key: str | None) -> str:
    """Keep `key` (the user's) in the run's key file, mode 0600; None: the run's own key."""
    if key is None:
        return ensure_api_key(path)
    try:
        current = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        current = ""
    if current != key:
        write_text(path, key + "\n", mode=0o600)
    return ensure_api_key(path)


def check_engine_args(engine: EngineChoice, engine_args: list[str]) -> None:
    """Engine arguments are vLLM's: well formed, not ones fm9g sets, and not for transformers."""
    for text in engine_args:
        try:
            parse_engine_arg(text)
        except ValueError as exc:
            raise InferenceError(str(exc)) from None
    if engine_args and engine == "transformers":
        raise InferenceError(
            "--engine-arg passes vLLM engine arguments, and --engine transformers takes none; "
            "drop them, or use --engine auto|vllm on a GPU node with vLLM"
        )


def healthy(endpoint: dict[str, Any], timeout: float = 2.0) -> bool:
    """GET http://host:port/health answers 200.  Proxies are bypassed: the server is on
    the cluster network (or loopback), never behind the login node's HTTP proxy."""
    url = f"http://{endpoint['host']}:{endpoint['port']}/health"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as response:
            return int(response.status) == 200
    except (OSError, urllib.error.URLError, ValueError):
        return False


def wait_ready(ctx: StageContext, row: JobRow, timeout: float | None = None) -> dict[str, Any]:
    """Poll /health of the endpoint `row`'s job publishes, for as long as that job lives."""
    started = time.monotonic()
    clock = UnseenClock(ctx.unknown_grace, ctx.executor.name)
    with stop_on_interrupt(ctx, row):
        return _poll_until_ready(ctx, row, clock, started, timeout)


def _poll_until_ready(
    ctx: StageContext, row: JobRow, clock: UnseenClock, started: float, timeout: float | None
) -> dict[str, Any]:
    path = ctx.run.serve_endpoint
    while True:
        refresh(ctx, STAGE)
        current = seen(ctx, row)
        try:
            clock.check([] if current is not None else [str(row.job_id)])
        except UnknownTooLong as exc:
            raise InferenceError(str(exc)) from None
        status = current or row
        if status.state.is_terminal:
            ctx.store.set_stage(STAGE, "FAILED", detail=f"job {row.job_id} {status.state.value} before it was ready")
            raise InferenceError(
                f"serve job {row.job_id} ended {status.state.value} (exit code {status.exit_code}) before "
                f"its server answered /health; log {row.log}:\n{log_excerpt(row.log)}"
            )
        endpoint = read_json(path)
        if endpoint and str(endpoint.get("job_id")) == str(row.job_id) and healthy(endpoint):
            return endpoint
        if timeout is not None and time.monotonic() - started > timeout:
            raise InferenceError(
                f"serve job {row.job_id} is {status.state.value} but not ready after {timeout:g}s; it keeps "
                f"running: watch {row.log}, or stop it with `fm9g-launch serve {ctx.run.root} --stop`"
            )
        time.sleep(ctx.poll_interval)


def _current_job(ctx: StageContext) -> JobRow | None:
    """The newest serve job of the run that is still alive, if any."""
    rows = [row for row in ctx.store.jobs(STAGE) if row.job_id and row.live]
    if not rows:
        return None
    owner = ctx.store.meta(EXECUTOR_META)
    if owner not in (None, ctx.executor.name):
        raise InferenceError(
            f"{ctx.run.root}: the {owner} executor may still be serving this run (job "
            f"{rows[-1].job_id}); stop it first: fm9g-launch serve {ctx.run.root} --stop"
        )
    row = rows[-1]
    ctx.tracker.adopt([row])
    refresh(ctx, STAGE)
    current = seen(ctx, row)
    return None if current is not None and current.state.is_terminal else row


def serve_stage(
    ctx: StageContext,
    *,
    model: Path,
    port: int = 0,
    engine: EngineChoice = "auto",
    wait: bool = True,
    timeout: float | None = None,
    api_key: str | None = None,
    trust_remote_code: bool = False,
    engine_args: list[str] | None = None,
) -> dict[str, Any] | None:
    """Start (or find) the run's server; with `wait`, return its endpoint once /health answers.

    `api_key`: the user's key (None: the run's own, generated once).  `engine_args`:
    vLLM engine arguments as KEY=VALUE.  Everything is checked before a job is queued."""
    run, store = ctx.run, ctx.store
    model = model.resolve()
    engine_args = list(engine_args or [])
    check_model_dir(model, trust_remote_code=trust_remote_code)
    check_engine_for_model(engine, model)
    check_engine_args(engine, engine_args)
    store.upsert_stage(STAGE, "serve")
    endpoint_path = run.serve_endpoint
    live = _current_job(ctx)
    if live is not None:
        if api_key is not None and api_key != ensure_api_key(run.api_key_file):
            raise InferenceError(
                f"job {live.job_id} already serves this run with another API key; stop it first "
                f"(fm9g-launch serve {run.root} --stop), then serve again with the new key"
            )
        ctx.say(f"serve: job {live.job_id} already serves this run (stop it first with --stop to change it)")
        row = live
    else:
        endpoint_path.unlink(missing_ok=True)  # a stale endpoint of a job that has ended
        set_api_key(run.api_key_file, api_key)
        store.set_stage(STAGE, "RUNNING", detail=f"starting: {model}")
        values = {
            "model": str(model),
            "served_name": run.name,
            "endpoint": str(endpoint_path),
            "api_key_file": str(run.api_key_file),
            "engine": engine,
            "port": port,
            "trust_remote_code": trust_remote_code,
            "engine_args": engine_args,
        }
        row = submit(ctx, stage=STAGE, template="serve.sbatch.j2", values=values, why=f"serving {model}")
        store.set_meta(EXECUTOR_META, ctx.executor.name)  # --stop must cancel through the same executor
    if not wait:
        return None
    endpoint = wait_ready(ctx, row, timeout)
    store.set_stage(STAGE, "RUNNING", detail=endpoint["url"])
    store.event(
        "serve",
        f"ready at {endpoint['url']} (job {row.job_id}, {endpoint.get('engine')})",
        stage=STAGE,
        job=row.id,
        **{k: endpoint.get(k) for k in ("host", "port", "engine")},
    )
    ctx.say(
        f"serve: ready at {endpoint['url']} (job {row.job_id}, engine {endpoint.get('engine')}); "
        f"model id {endpoint.get('model')!r}; API key in {run.api_key_file}"
    )
    return endpoint


def stop_serve(ctx: StageContext, grace: float = 60.0) -> list[str]:
    """Cancel the run's serve jobs and remove the endpoint; returns the job ids cancelled."""
    run, store = ctx.run, ctx.store
    endpoint_path = run.serve_endpoint
    ctx.tracker.adopt(ctx.tracker.live_rows(STAGE))
    # Asked afresh: a local job id is a pid, and an ended job's pid may belong to someone else now.
    refresh(ctx, STAGE)
    rows = ctx.tracker.live_rows(STAGE)
    ids = [str(row.job_id) for row in rows]
    if ids:
        ctx.executor.cancel(ids)
    # Bounded: a job that takes longer to end is still cancelled, just not seen ending here.
    deadline = time.monotonic() + grace
    pending = list(rows)
    while pending and time.monotonic() < deadline:
        refresh(ctx, STAGE)
        pending = [row for row in pending if not (store.job(row.id) or row).state.is_terminal]
        if pending:
            time.sleep(ctx.poll_interval)
    endpoint_path.unlink(missing_ok=True)
    if store.stage(STAGE) is not None:
        store.set_stage(STAGE, "COMPLETED", detail="stopped (fm9g-launch serve --stop)")
    store.event("serve", f"stopped: cancelled {' '.join(ids) or 'no live jobs'}", stage=STAGE)
    if pending:
        ctx.say(f"serve: job(s) {' '.join(str(r.job_id) for r in pending)} cancelled but still ending")
    return ids
