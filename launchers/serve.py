"""The body of a serve job (node side), what templates/serve.sbatch.j2 runs:

    python -m fm9g.launchers.serve --model HF_DIR --endpoint FILE --api-key-file FILE
        [--served-model-name NAME] [--engine auto|vllm|transformers] [--port P]
        [--trust-remote-code] [--engine-arg KEY=VALUE ...]

It picks the engine (vLLM on a GPU node that has it, else transformers serve's app, see
below), binds the port (0: any free one), publishes {host, port, url, job_id, engine,
model, model_path, pid} to the endpoint file atomically, serves until SIGTERM (scancel,
or the USR1 Slurm sends before the walltime), and removes the endpoint if it still names
this job.  Readiness is not announced here: clients poll /health.

The model id clients send is NAME (the run's name), and the folder's path is accepted
too: vLLM gets `--served-model-name NAME PATH` (the first name is the one it reports),
and the transformers app sits behind `ModelAlias`, which does the same.  `--engine-arg`
passes any vLLM engine argument through (`max-model-len=4096`, `quantization=awq`,
`enforce-eager`); the transformers engine has no such arguments and refuses them.

The API key is read from its file by this process and handed to vLLM through the
VLLM_API_KEY environment variable, so it is in neither the script nor the command line.

The CPU engine is `transformers serve`'s own OpenAI-compatible FastAPI app
(/v1/completions, /v1/chat/completions with streaming, /v1/models, /health), pinned to
one model folder, behind an API-key gate, on a socket we bind ourselves.  Why not the
`transformers serve` command as is: it has no API key option, it exposes /load_model and
/reset (load any model, drop the pinned one), and it cannot report the port of
`--port 0`.  So `build_app` builds the same app through the command's own class
(`transformers.cli.serve.Serve` with the server start left out), `ApiKeyGate` wraps it
and uvicorn runs it on a socket already bound.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fm9g.launchers.engine_args import parse_engine_arg
from fm9g.launchers.infer import (
    check_model_dir,
    choose_engine,
    custom_architecture,
    read_config,
    refuse_engine_args,
    serving_dtype,
)
from fm9g.launchers.prompts import InferenceError
from fm9g.launchers.serve_asgi import ApiKeyGate, App, ModelAlias
from fm9g.rundir.atomic import read_json, write_json

__all__ = ["ApiKeyGate", "ModelAlias", "build_app", "main", "parse_engine_arg", "vllm_argv"]


@contextmanager
def _remote_code_loading(enabled: bool) -> Iterator[None]:
    """While `Serve` builds its model manager: one that can load a custom architecture.

    transformers serve (5.24) loads `getattr(transformers, config.architectures[0])`, which
    a remote-code class is not, so --trust-remote-code alone still fails there.  This
    subclass sends a config with `auto_map` through AutoModelForCausalLM, which runs the
    folder's code.  `Serve.__init__` imports ModelManager when it runs, so the class is
    swapped in for that call only and put back after."""
    if not enabled:
        yield
        return
    from transformers.cli.serving import model_manager as module

    original = module.ModelManager

    class RemoteCodeModelManager(original):  # type: ignore[misc, valid-type]
        def _load_model(self, model_id_and_revision: str, *args: Any, **kwargs: Any) -> Any:
            folder = Path(model_id_and_revision)
            if not (folder / "config.json").is_file() or not custom_architecture(read_config(folder)):
                return super()._load_model(model_id_and_revision, *args, **kwargs)
            from transformers import AutoModelForCausalLM

            return AutoModelForCausalLM.from_pretrained(
                folder, dtype=self.dtype, device_map=self.device, trust_remote_code=True
            )

    module.ModelManager = RemoteCodeModelManager
    try:
        yield
    finally:
        module.ModelManager = original


def build_app(
    model_dir: Path,
    *,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    log_level: str = "info",
) -> App:
    """`transformers serve MODEL`'s FastAPI app, with the model loaded (pinned), not started."""
    try:
        from transformers.cli.serve import Serve
    except ImportError as exc:
        raise RuntimeError(
            f"transformers serve is not available ({exc}); install the serve extra: "
            "pip install 'fm9g-launch[serve]' (transformers>=5.24, fastapi, uvicorn, accelerate)"
        ) from None

    class _AppOnly(Serve):  # type: ignore[misc]
        def start_server(self) -> None:  # the app is run by `run_app` below, on our socket
            pass

    with _remote_code_loading(trust_remote_code):
        command = _AppOnly(
            str(model_dir),
            device=device,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            host="127.0.0.1",
            port=0,
            log_level=log_level,
            non_blocking=True,
        )
    return command.server.config.app  # type: ignore[no-any-return]


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    return sock


def run_app(
    model_dir: Path,
    api_key: str,
    sock: socket.socket,
    *,
    name: str,
    trust_remote_code: bool = False,
    log_level: str = "info",
) -> None:
    """Load the model, then answer on `sock` until SIGTERM/SIGINT (uvicorn's own handlers)."""
    import torch
    import uvicorn

    dtype = serving_dtype(model_dir, gpu=torch.cuda.is_available())
    app = build_app(model_dir, dtype=dtype, trust_remote_code=trust_remote_code, log_level=log_level)
    app = ApiKeyGate(ModelAlias(app, name, str(model_dir)), api_key)
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])


def read_api_key(path: Path) -> str:
    """The API key held in `path`; an empty file is an error, never an open server."""
    key = path.read_text(encoding="utf-8").strip()
    if not key:
        raise ValueError(f"{path}: the API key file is empty")
    return key


def node_address() -> str:
    """The address clients reach this node at: FM9G_HOST (the local executor sets 127.0.0.1),
    else what the node's hostname resolves to (its cluster address, as torchrun uses)."""
    explicit = os.environ.get("FM9G_HOST")
    if explicit:
        return explicit
    name = socket.gethostname()
    try:
        return socket.gethostbyname(name)
    except OSError:
        return name


def job_id() -> str:
    return os.environ.get("FM9G_JOB_ID") or os.environ.get("SLURM_JOB_ID") or str(os.getpid())


def publish(path: Path, *, host: str, port: int, engine: str, name: str, model: Path, job: str) -> dict[str, Any]:
    """Write the endpoint file atomically (another process reads it).  `model` is the id
    clients send (the run's name); `model_path` the folder, which is accepted too."""
    endpoint = {
        "host": host,
        "port": port,
        "url": f"http://{host}:{port}/v1",
        "job_id": job,
        "engine": engine,
        "model": name,
        "model_path": str(model),
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "published_at": time.time(),
    }
    write_json(path, endpoint)
    return endpoint


def unpublish(path: Path, job: str) -> None:
    """Remove the endpoint file if it is still ours (a newer job may own it by now)."""
    current = read_json(path)
    if current is not None and str(current.get("job_id")) == job:
        path.unlink(missing_ok=True)


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


@dataclass(frozen=True)
class Serving:
    """What one serve job serves, and how."""

    model: Path
    name: str
    key_file: Path
    endpoint: Path
    host: str
    port: int
    job: str
    trust_remote_code: bool = False
    engine_args: tuple[tuple[str, str | None], ...] = ()


def vllm_argv(serving: Serving) -> list[str]:
    """The command line of vLLM's OpenAI server for `serving` (the API key goes by environment)."""
    argv = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(serving.model),
        # The first name is the id vLLM reports; the path stays accepted in requests.
        "--served-model-name",
        serving.name,
        str(serving.model),
        "--host",
        serving.host,
        "--port",
        str(serving.port),
    ]
    given = {key for key, _ in serving.engine_args}
    if "dtype" not in given:  # fp32 exports in bf16, said explicitly (serving_dtype)
        argv += ["--dtype", serving_dtype(serving.model, gpu=True)]
    if serving.trust_remote_code:
        argv.append("--trust-remote-code")
    for key, value in serving.engine_args:
        argv += [f"--{key}"] if value is None else [f"--{key}", value]
    return argv


def serve_transformers(serving: Serving) -> int:
    sock = bind(serving.host, serving.port)
    port = sock.getsockname()[1]
    publish(
        serving.endpoint,
        host=serving.host,
        port=port,
        engine="transformers",
        name=serving.name,
        model=serving.model,
        job=serving.job,
    )
    # Slurm's USR1 before the walltime (--signal=B:USR1@lead) becomes uvicorn's graceful SIGTERM;
    # a SIGTERM while the model still loads (before uvicorn's own handlers) still unpublishes.
    signal.signal(signal.SIGUSR1, lambda *_: os.kill(os.getpid(), signal.SIGTERM))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        run_app(
            serving.model,
            read_api_key(serving.key_file),
            sock,
            name=serving.name,
            trust_remote_code=serving.trust_remote_code,
        )
    finally:
        unpublish(serving.endpoint, serving.job)
    return 0


def serve_vllm(serving: Serving) -> int:
    serving = replace(serving, port=serving.port or free_port(serving.host))
    env = {**os.environ, "VLLM_API_KEY": read_api_key(serving.key_file)}
    child = subprocess.Popen(vllm_argv(serving), env=env)
    publish(
        serving.endpoint,
        host=serving.host,
        port=serving.port,
        engine="vllm",
        name=serving.name,
        model=serving.model,
        job=serving.job,
    )

    def forward(signum: int, _frame: object) -> None:
        child.send_signal(signal.SIGTERM if signum == signal.SIGUSR1 else signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(signum, forward)
    try:
        return child.wait()
    finally:
        unpublish(serving.endpoint, serving.job)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fm9g.launchers.serve",
        description="Run an OpenAI-compatible server for one model and publish its endpoint.",
    )
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--served-model-name", help="the model id clients send (default: the folder's name)")
    parser.add_argument("--endpoint", type=Path, required=True, help="endpoint.json to publish")
    parser.add_argument("--api-key-file", type=Path, required=True)
    parser.add_argument("--engine", choices=["auto", "vllm", "transformers"], default="auto")
    parser.add_argument("--port", type=int, default=0, help="0 = any free port")
    parser.add_argument("--trust-remote-code", action="store_true", help="run a custom architecture's own code")
    parser.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE", help="a vLLM engine argument")
    args = parser.parse_args(argv)
    try:
        engine_args = tuple(parse_engine_arg(text) for text in args.engine_arg)
        check_model_dir(args.model, trust_remote_code=args.trust_remote_code)
        engine = choose_engine(args.engine, args.model)
        serving = Serving(
            model=args.model,
            name=args.served_model_name or args.model.name,
            key_file=args.api_key_file,
            endpoint=args.endpoint,
            host=node_address(),
            port=args.port,
            job=job_id(),
            trust_remote_code=args.trust_remote_code,
            engine_args=engine_args,
        )
        if engine != "vllm":
            refuse_engine_args(dict(engine_args))
    except (InferenceError, ValueError) as exc:
        print(f"serve: error: {exc}", file=sys.stderr, flush=True)
        return 2
    print(
        f"serve: engine {engine}, model {serving.name!r} ({args.model}), job {serving.job}, host {serving.host}",
        flush=True,
    )
    runner = serve_vllm if engine == "vllm" else serve_transformers
    return runner(serving)


if __name__ == "__main__":
    sys.exit(main())
