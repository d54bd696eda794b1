"""`fm9g-launch`: the command line.  Each command reads its input, calls the library and
returns an exit code.  Only argparse is imported up front: login nodes have slow shared
filesystems, so torch, textual and the rest load inside the commands that need them."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DESCRIPTION = """\
Prepare data for, pretrain, fine-tune, convert and serve FM9G (九格) models on a Slurm
cluster, or on this machine, with one command.

typical session:
  fm9g-launch pretrain --config examples/tiny/pretrain.yaml  # 2 nodes: Slurm if it answers, else here
  fm9g-launch doctor --config examples/fm9g_2b/pretrain.yaml # check the cluster first
  fm9g-launch pretrain --nodes 4 --executor slurm --config examples/fm9g_2b/pretrain.yaml
  fm9g-launch status                       # every run under ./runs, or one: status runs/NAME
  fm9g-launch logs runs/NAME --role worker --node 2 -f
  fm9g-launch cancel runs/NAME
  fm9g-launch import 2b_sft_model/ --output models/fm9g-2b    # start from a released model
  fm9g-launch serve runs/NAME --port 8000                      # OpenAI API; model id = NAME

A run lives in runs/<name>/ (config.yaml, state.db, scripts/, logs/, checkpoints/,
tensorboard/, metrics.jsonl).  Running the same command again resumes the run from its
latest checkpoint, or reports that it is complete; it never silently starts over.
"""

RUN_EPILOG = """\
config:
  A YAML or JSON file with the sections cluster, model, data, train, rendezvous,
  supervise (see examples/).  The train section takes every argument of the FM9G usage
  guide under its original name (lr, warmup_iters, lr_scheduler, save_iters, ...).
  --set overrides any field:  --set train.lr=3e-4 --set cluster.partition=gpu

examples:
  fm9g-launch pretrain --config examples/tiny/pretrain.yaml --nodes 2
  fm9g-launch pretrain --config examples/fm9g_2b/pretrain.yaml --nodes 4 --executor slurm --dry-run
  fm9g-launch sft --config examples/tiny/sft.yaml --set train.train_iters=50
"""


def _add_set_option(parser: argparse.ArgumentParser, text: str) -> None:
    """--set KEY=VALUE (repeatable): the one way every command overrides a config field."""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=text)


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", type=Path, help="run config (YAML or JSON)")
    _add_set_option(parser, "override a config field, e.g. --set train.lr=3e-4 (repeatable)")
    parser.add_argument("--nodes", "-N", type=int, help="nodes for the training stage (cluster.nodes)")
    parser.add_argument(
        "--executor",
        choices=["auto", "local", "slurm"],
        help="auto (default): slurm where sbatch is on the PATH and `scontrol ping` answers, else local; "
        "chosen once when the run is created and kept in its config.yaml. local: processes on this "
        "machine; slurm: sbatch jobs",
    )
    parser.add_argument(
        "--yes",
        "-y",
        action="store_true",
        help=(
            "run several nodes on this machine without asking, where Slurm is installed: "
            "with --executor local while Slurm answers, or with auto while its controller is silent"
        ),
    )
    parser.add_argument("--name", help="run name (default: train.model_unique, else the config file name)")
    parser.add_argument(
        "--dry-run", action="store_true", help="render every script into the run directory, print where, submit nothing"
    )
    parser.add_argument("--detach", action="store_true", help="run the supervisor in the background and return at once")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fm9g-launch", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    for name, text in (
        ("pretrain", "pretrain a model on a dataset mixture"),
        ("sft", "fine-tune with the chat format (<用户>…<AI>…), loss on answers only"),
    ):
        command = sub.add_parser(
            name, help=text, description=text, epilog=RUN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        _add_run_options(command)

    resume = sub.add_parser(
        "resume",
        help="re-adopt a run after the supervisor or the login session died",
        description="Re-adopt the jobs of a run by their ids and supervise it to the end.",
    )
    resume.add_argument("run", type=Path, help="the run directory (runs/NAME)")
    resume.add_argument("--detach", action="store_true", help="supervise in the background")
    resume.add_argument("--no-progress", dest="progress", action="store_false")

    index = sub.add_parser(
        "index",
        help="turn txt/jsonl data into an FM9G index directory",
        description="txt or jsonl (a file or a directory) -> data.jsonl, index, index.h5, meta.json, "
        "the format of the guide's convert_json2index.py.",
    )
    index.add_argument("path", type=Path, help="a .jsonl/.txt file or a directory of them")
    index.add_argument(
        "--output", "-o", type=Path, required=True, help="index directory to create (not the input directory)"
    )
    index.add_argument(
        "--language",
        choices=["zh", "en", "code"],
        default="zh",
        help="token estimate rule when no tokenizer is given (zh: 0.7/char, en: 1.5/word)",
    )
    index.add_argument("--tokenizer", type=Path, help="count tokens with this tokenizer.model / vocab.txt")
    index.add_argument("--processes", "-j", type=int, default=1, help="worker processes (default 1)")
    index.add_argument(
        "--on-error",
        choices=["fail", "skip"],
        default="fail",
        help="fail (default): stop at the first bad line, naming file:line; skip: drop bad lines and count them",
    )
    index.add_argument("--no-progress", dest="progress", action="store_false")

    status = sub.add_parser(
        "status", help="show runs, their jobs, and training progress (reads state, never polls Slurm)"
    )
    status.add_argument("run", nargs="?", type=Path, help="a run directory (default: every run under ./runs)")
    status.add_argument("--json", action="store_true", help="machine-readable output (schema: docs/status-schema.md)")
    status.add_argument("--failures", action="store_true", help="the recovery timeline of every failure")
    status.add_argument("--runs-root", type=Path, default=Path("runs"), help="where runs live (default ./runs)")

    logs = sub.add_parser("logs", help="print or follow a job's log")
    logs.add_argument("run", type=Path)
    logs.add_argument(
        "--role",
        choices=["master", "worker", "supervisor"],
        default="master",
        help="whose log: a training node's, or the supervisor's (supervisor.log: --detach or supervise.where: job)",
    )
    logs.add_argument("--node", type=int, help="node rank (default: 0 for the master, 1 for workers)")
    logs.add_argument("--stage", default="train")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing as the log grows")

    cancel = sub.add_parser("cancel", help="cancel a run's jobs (or one job)")
    cancel.add_argument("run", type=Path)
    cancel.add_argument("--job", help="cancel only this job id")

    tui = sub.add_parser(
        "tui",
        help="watch runs in a terminal UI: jobs, progress, logs, failures (reads files, never polls Slurm)",
        description="A terminal UI over the run directories: stages, attempts and node jobs, training "
        "progress, the selected job's log, the failure timeline.  It reads only the run "
        "directories, never Slurm.  Cancelling the run raises control/cancel: a supervisor "
        "holding the run's lock cancels the jobs itself; only when none does, the TUI calls "
        "the executor (scancel).  Cancelling one job always calls the executor.  Keys: l logs, "
        "t failures, c cancel, r resubmit failed nodes, / filter, ? help, q quit.",
    )
    tui.add_argument("run", nargs="?", type=Path, help="a run directory, or a directory of runs (default: ./runs)")
    tui.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes (default 1)")

    plot = sub.add_parser("plot", help="plot a run's loss and lr curves (overall and per task) to a PNG")
    plot.add_argument("run", type=Path, help="the run directory (runs/NAME)")
    plot.add_argument("--output", "-o", type=Path, help="PNG to write (default: curves.png in the run directory)")
    _add_config_command(sub)
    _add_doctor_command(sub)
    _add_inference_commands(sub)
    return parser


def _add_config_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    config = sub.add_parser(
        "config",
        help="show the resolved config and where each value came from (site file, run config, --set)",
        description="Inspect configs.  Precedence, lowest first: default < site file < run config < --set. "
        "The site file is $FM9G_LAUNCH_SITE (empty: none), else ~/.config/fm9g-launch/site.yaml; it may "
        "set executor, run_root, cluster, rendezvous and supervise.",
    )
    actions = config.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    show = actions.add_parser(
        "show",
        help="print every resolved field with its source",
        description="Print the resolved config and, for each value, where it came from: default, "
        "site file PATH, run config PATH or --set.",
    )
    show.add_argument("--config", "-c", type=Path, help="run config (YAML or JSON); none: the site file and defaults")
    _add_set_option(show, "override a config field, as pretrain/sft take it (repeatable)")
    show.add_argument("--json", action="store_true", help='{"field": {"value": ..., "source": ..., "path": ...}}')
    show.add_argument("--changed", action="store_true", help="only the fields a layer sets (hide the defaults)")


def _add_doctor_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    doctor = sub.add_parser(
        "doctor",
        help="check the cluster before a first run: partition, GPUs, shared run dir, environment, ports",
        description="Submit two small probe jobs (1 CPU, named fm9g-doctor-*) to the partition the config "
        "names and check: the partition and its node count, GPU gres, the run directory written on a "
        "compute node and read back here, the setup lines' Python environment on a compute node (torch, "
        "CUDA, NCCL, bmtrain, flash_attn, vllm, fm9g), and a TCP port between two compute nodes.  Exit "
        "status 1 when a check fails.  The jobs are cancelled when it ends, whatever happens.",
    )
    doctor.add_argument("--config", "-c", type=Path, help="run config (YAML or JSON); none: site file and defaults")
    _add_set_option(doctor, "override a config field, as pretrain/sft take it (repeatable)")
    doctor.add_argument(
        "--timeout", type=float, default=120.0, help="seconds to wait for the probe jobs in all (default 120)"
    )
    doctor.add_argument("--json", action="store_true", help="print the checks as JSON instead of a table")


INFER_EPILOG = """\
prompt file: one JSON object per line with "prompt" (or "input", as in training data), and
any of vLLM's sampling parameters for that prompt alone:
  {"prompt": "中国的首都是"}
  {"prompt": "Write a list:", "top_k": 20, "repetition_penalty": 1.1, "stop": ["\\n\\n"]}
Every prompt's sampling is checked against the engine before the job is queued (vLLM's
ranges; temperature above 2 and n > 1 with temperature 0 are refused where vLLM may run).
Runs fine-tuned with the chat format (data.sft) get <用户>{prompt}<AI>.  Output: one line per
prompt, same order: {"line", "prompt", "input", "text", "outputs": [{"text", "finish_reason",
"tokens"}], "sampling", "model", "engine"}.  Engine: vLLM's LLM.generate on a GPU node with
vllm installed, else transformers generate.

examples:
  fm9g-launch infer runs/tiny-sft --prompts examples/tiny/prompts.jsonl --output out.jsonl
  fm9g-launch infer runs/tiny-sft/hf/60 --prompts p.jsonl --output o.jsonl --executor slurm --temperature 0
"""

SERVE_EPILOG = """\
The server is OpenAI-compatible (/v1/completions, /v1/chat/completions, /v1/models,
/health): vLLM's server on a GPU node with vllm, else transformers serve's app behind an
API-key gate.  The model id is the run's name (tiny-sft below; the folder's path works
too).  The API key is yours (--api-key / --api-key-file) or generated; either way it is
kept in runs/NAME/serve/api_key (mode 0600) and never put in a script.  The job publishes
runs/NAME/serve/endpoint.json {host, port, url, job_id, engine, model, model_path}; the
command returns once GET /health answers.  examples/client.py talks to it.

examples:
  fm9g-launch serve runs/tiny-sft --executor slurm
  fm9g-launch serve runs/tiny-sft --port 8000 --api-key-file ~/.fm9g-key \\
      --engine-arg max-model-len=4096 --engine-arg gpu-memory-utilization=0.85
  fm9g-launch serve released/FM9G-2B-AWQ --name fm9g-2b --engine-arg quantization=awq
  fm9g-launch serve runs/tiny-sft --stop
"""


def _add_target_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "target",
        type=Path,
        metavar="RUN_OR_MODEL",
        help="a run directory (its latest checkpoint is converted first) or a Hugging Face model folder",
    )
    parser.add_argument(
        "--executor",
        choices=["auto", "local", "slurm"],
        help="where the job runs (default: the run's executor; for a model folder, auto: slurm where "
        "sbatch is on the PATH and `scontrol ping` answers, else local)",
    )
    parser.add_argument(
        "--engine",
        choices=["auto", "vllm", "transformers"],
        default="auto",
        help="auto (default): vLLM on a GPU node that has it, else transformers",
    )
    parser.add_argument(
        "--name",
        help="run directory name for a model folder (default: the folder's name); also the served model id",
    )
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="load a custom architecture (config.json auto_map) with the folder's own Python code; "
        "the alternative is `fm9g-launch convert` to a native architecture",
    )
    _add_set_option(parser, "override a config field for this stage, e.g. --set cluster.partition=gpu (repeatable)")


def _add_released_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        help="released model: 2.4b, 8b or a model config JSON; checked against what the source states "
        "(needed for a .pt without config.json)",
    )
    parser.add_argument(
        "--tokenizer", type=Path, help="released model: tokenizer.model / vocab.txt when none lies beside the weights"
    )


def _add_inference_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from fm9g.launchers.prompts import add_sampling_options

    convert = sub.add_parser(
        "convert",
        help="export a run's checkpoint to a Hugging Face folder (stage convert)",
        description="Export checkpoint STEP (default: the latest) of a run to a Hugging Face "
        "folder (safetensors, config, tokenizer, FM9G chat template), as a job. "
        "Skipped when that step was already converted.",
    )
    convert.add_argument(
        "run", type=Path, metavar="RUN_OR_RELEASED", help="the run directory (runs/NAME), or a released model"
    )
    convert.add_argument("--step", type=int, help="checkpoint step (default: the latest complete one)")
    convert.add_argument("--output", type=Path, help="output folder (default: runs/NAME/hf/STEP)")
    convert.add_argument("--executor", choices=["local", "slurm"], help="default: the run's executor")
    _add_released_options(convert)
    convert.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    convert.epilog = (
        "A released model (a BMTrain .pt, its folder, or an HF folder with .bin or safetensors) is\n"
        "converted here, not as a job: the 2B to GraniteForCausalLM, the 8B to LlamaForCausalLM,\n"
        "with a tokenizer.json (the 8B's cpm vocabulary included); stock transformers and vLLM\n"
        "load the folder without remote code.\n\n"
        "  fm9g-launch convert 2b_sft_model/ --output models/fm9g-2b-hf\n"
        "  fm9g-launch convert sft_8b_v2/ --model 8b --output models/fm9g-8b-hf"
    )
    convert.formatter_class = argparse.RawDescriptionHelpFormatter

    imp = sub.add_parser(
        "import",
        help="turn a released FM9G model into a checkpoint that pretrain and sft start from",
        description="Read a released FM9G model (BMTrain .pt with the dragonfly keys, or a Hugging Face "
        "folder: the MiniCPM-shaped 2B or the Llama-shaped 8B, pytorch_model*.bin or safetensors) and write "
        "a checkpoint folder with its config.json and tokenizer; prints the --set options that start a run "
        "from it.  The model shape comes from the source and is checked against --model.",
        epilog="examples:\n  fm9g-launch import 2b_sft_model/ --output models/fm9g-2b --model 2.4b\n"
        "  fm9g-launch import sft_8b_v2/fm9g_8b.pt --output models/fm9g-8b --model 8b",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    imp.add_argument("source", type=Path, metavar="SRC", help="a released .pt file (or its folder), or an HF folder")
    imp.add_argument("--output", "-o", type=Path, required=True, help="checkpoint folder to create")
    _add_released_options(imp)
    imp.add_argument("--force", action="store_true", help="replace --output if it exists (once the new one is done)")
    imp.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")

    infer = sub.add_parser(
        "infer",
        help="offline batch generation over a jsonl prompt file (stage infer)",
        description="Generate completions for every prompt of a jsonl file, as a job.",
        epilog=INFER_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_target_options(infer)
    infer.add_argument("--prompts", type=Path, required=True, help="jsonl prompt file")
    infer.add_argument("--output", type=Path, required=True, help="jsonl of completions to write")
    infer.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="wrap prompts in <用户>…<AI> (default: the run's data.sft; off for a model folder)",
    )
    infer.add_argument("--force", action="store_true", help="run again even if OUTPUT is up to date")
    infer.add_argument(
        "--engine-arg",
        dest="engine_args",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a vLLM engine argument for the offline LLM, repeatable: max-model-len=4096, "
        "gpu-memory-utilization=0.85, quantization=awq (refused with --engine transformers)",
    )
    add_sampling_options(infer)

    serve = sub.add_parser(
        "serve",
        help="an OpenAI-compatible server for a run or model, as a job (stage serve)",
        description="Start an OpenAI-compatible server as a job and wait until /health answers; --stop cancels it.",
        epilog=SERVE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_target_options(serve)
    serve.add_argument(
        "--port",
        type=int,
        default=0,
        help="server port, e.g. 8000 as in the FM9G guide (default 0: any free port, published)",
    )
    key = serve.add_mutually_exclusive_group()
    key.add_argument("--api-key", help="the API key clients must send (default: one generated per run)")
    key.add_argument("--api-key-file", type=Path, help="a file holding the API key (kept out of your shell history)")
    serve.add_argument(
        "--engine-arg",
        dest="engine_args",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a vLLM engine argument, repeatable: max-model-len=4096, gpu-memory-utilization=0.85, "
        "quantization=awq|gptq|gguf, tensor-parallel-size=2, enforce-eager (a bare KEY is an on flag)",
    )
    serve.add_argument("--stop", action="store_true", help="cancel the run's server job and remove its endpoint")
    serve.add_argument("--no-wait", dest="wait", action="store_false", help="return once submitted")
    serve.add_argument(
        "--wait-timeout",
        type=float,
        default=None,
        help="give up waiting after this many seconds (default: wait while the job lives)",
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from fm9g.orchestrator.commands import dispatch

    return dispatch(args)


if __name__ == "__main__":
    sys.exit(main())
