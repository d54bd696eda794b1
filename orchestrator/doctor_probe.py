"""What `fm9g-launch doctor` runs on the compute nodes: the Python environment probe
and the two ends of the port probe.

This file imports nothing from fm9g on purpose: the doctor copies its text into the
doctor's folder under the runs root and runs it by path, so it still reports (torch
version, which imports fail) when fm9g itself is not importable on the node, which is
one of the things it is there to find out.  Standard library only.  Results are JSON
files, each written to a temporary name and renamed (the login node reads them).

    python doctor_probe.py env OUT.json [--import MODULE ...]
    python doctor_probe.py port DIR PORT TIMEOUT_S     # under srun: rank 0 listens, rank 1 connects
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import socket
import sys
import time
from pathlib import Path
from typing import Any

OPTIONAL_PACKAGES = ("bmtrain", "flash_attn", "vllm")
# What the training job imports first (the node agent): importing it checks fm9g and its
# dependencies the way the real job will.
FM9G_MODULE = "fm9g.launchers.node_agent"


def _write_json(path: Path, record: dict[str, Any]) -> None:
    # Not fm9g.rundir.atomic (fm9g may not import here): the same temp-and-rename.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".strip()


def probe_torch() -> dict[str, Any]:
    """torch's version, the CUDA it was built with, NCCL's version when built with it."""
    try:
        torch = importlib.import_module("torch")
    except BaseException as exc:  # noqa: BLE001 - a broken install raises anything
        return {"present": False, "error": _error(exc)}
    record: dict[str, Any] = {"present": True, "version": str(torch.__version__)}
    record["cuda"] = getattr(torch.version, "cuda", None)
    record["cuda_available"] = bool(torch.cuda.is_available())
    record["device_count"] = int(torch.cuda.device_count()) if record["cuda_available"] else 0
    record["nccl"] = None
    if record["cuda"]:
        try:
            version = torch.cuda.nccl.version()
            record["nccl"] = ".".join(str(part) for part in version) if isinstance(version, tuple) else str(version)
        except BaseException as exc:  # noqa: BLE001 - no libnccl: reported, not fatal here
            record["nccl_error"] = _error(exc)
    return record


def probe_package(name: str) -> dict[str, Any]:
    """Whether `name` can be found, and its version; found is not imported (vllm takes seconds)."""
    try:
        spec = importlib.util.find_spec(name)
    except BaseException as exc:  # noqa: BLE001
        return {"present": False, "error": _error(exc)}
    if spec is None:
        return {"present": False}
    record: dict[str, Any] = {"present": True, "origin": spec.origin}
    try:
        record["version"] = importlib.metadata.version(name.replace("_", "-"))
    except importlib.metadata.PackageNotFoundError:
        record["version"] = None
    return record


def probe_import(module: str) -> dict[str, Any]:
    """Import `module` for real; its file or the error."""
    try:
        imported = importlib.import_module(module)
    except BaseException as exc:  # noqa: BLE001
        return {"ok": False, "error": _error(exc)}
    return {"ok": True, "file": getattr(imported, "__file__", None)}


def run_env(out: Path) -> int:
    """Probe this node's Python environment into `out`."""
    record: dict[str, Any] = {
        "host": socket.gethostname(),
        "python": sys.executable,
        "python_version": platform.python_version(),
        "torch": probe_torch(),
        "packages": {name: probe_package(name) for name in OPTIONAL_PACKAGES},
        "fm9g": probe_import(FM9G_MODULE),
    }
    _write_json(out, record)
    return 0


def run_port(folder: Path, port: int, timeout_s: float) -> int:
    """Rank 0 listens on `port` (0: any free port, as the rendezvous store does) and
    publishes it; rank 1 connects to it.  Each writes what it saw."""
    rank = int(os.environ.get("SLURM_PROCID", "0"))
    host = os.environ.get("FM9G_HOST") or socket.gethostname()
    endpoint = folder / "port-endpoint.json"
    if rank == 0:
        record: dict[str, Any] = {"host": host, "port": port, "accepted": False}
        try:
            server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            server.bind(("", port))
            server.listen(1)
        except OSError as exc:
            record["error"] = f"cannot listen on port {port}: {_error(exc)}"
            _write_json(folder / "port-listener.json", record)
            return 1
        record["port"] = server.getsockname()[1]
        _write_json(endpoint, {"host": host, "port": record["port"]})
        server.settimeout(timeout_s + 2.0)  # outlive the connector's own timeout
        try:
            peer, address = server.accept()
            peer.close()
            record["accepted"] = True
            record["peer"] = address[0]
        except OSError as exc:
            record["error"] = _error(exc)
        finally:
            server.close()
        _write_json(folder / "port-listener.json", record)
        return 0
    result: dict[str, Any] = {"host": host, "connected": False}
    deadline = time.monotonic() + timeout_s + 10.0
    published = None
    while time.monotonic() < deadline:
        try:
            published = json.loads(endpoint.read_text(encoding="utf-8"))
            break
        except (OSError, ValueError):
            time.sleep(0.2)
    if published is None:
        result["error"] = "the listener never published its port"
        _write_json(folder / "port-connector.json", result)
        return 1
    result["target"] = published
    try:
        socket.create_connection((published["host"], int(published["port"])), timeout=timeout_s).close()
        result["connected"] = True
    except OSError as exc:
        result["error"] = _error(exc)
    _write_json(folder / "port-connector.json", result)
    return 0


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "env":
        return run_env(Path(argv[1]))
    if len(argv) >= 4 and argv[0] == "port":
        return run_port(Path(argv[1]), int(argv[2]), float(argv[3]))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
