"""The body of an infer job (node side), what templates/infer.sbatch.j2 runs:

    python -m fm9g.launchers.infer --model HF_DIR --prompts IN.jsonl --output OUT.jsonl
        [--chat] [--engine auto|vllm|transformers] [--trust-remote-code] [--engine-arg KEY=VALUE ...]
        [--sampling-json '{"temperature": 0, ...}' | --temperature T --top-k K --stop TEXT ...]

It writes OUT.jsonl in one atomic step: one line per prompt, in the prompt file's order.
Each prompt's sampling is the command line's, with the line's own parameters on top
(fm9g.launchers.sampling), checked against the engine before the model loads.

The engines: vLLM's `LLM.generate` when vllm is importable and a CUDA GPU is present,
else transformers' `generate` on whatever device torch has.  torch, transformers and
vllm are imported only inside the functions that use them, so the login side can import
`check_model_dir` and a CPU install never needs vllm.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from fm9g.launchers.engine_args import llm_kwargs, parse_engine_arg
from fm9g.launchers.prompts import (
    InferenceError,
    Sampling,
    add_sampling_options,
    completion_record,
    dump_jsonl,
    format_prompt,
    read_prompts,
    sampling_from,
    sampling_per_prompt,
)
from fm9g.launchers.sampling import from_json as sampling_from_json
from fm9g.rundir.atomic import write_text

Engine = Literal["vllm", "transformers"]
EngineChoice = Literal["auto", "vllm", "transformers"]
VLLM_MISSING = "vllm not installed / no CUDA GPU"
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def vllm_usable() -> bool:
    """True when vllm can be imported and torch sees a CUDA GPU."""
    if importlib.util.find_spec("vllm") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


def has_hf_tokenizer(model_dir: Path) -> bool:
    """The folder has a tokenizer transformers and vLLM load (an 8B exported before the cpm
    vocabulary got its tokenizer.json has only vocab.txt, which neither loads)."""
    return any((model_dir / name).is_file() for name in HF_TOKENIZER_FILES)


def choose_engine(requested: EngineChoice, model_dir: Path | None = None) -> Engine:
    """The engine to run: `auto` picks vLLM on a GPU node with vllm, transformers otherwise.

    Upstream vLLM has no tokenizer for a folder with only the cpm vocab.txt (FM9G's fork
    had tokenizer_mode="cpm", upstream's modes are auto|hf|slow|mistral|custom), so such a
    folder runs on transformers with FM9G's own tokenizer, or is refused for --engine vllm."""
    if requested == "transformers":
        return "transformers"
    usable = vllm_usable()
    if requested == "vllm" and not usable:
        raise InferenceError(
            f"--engine vllm asked for, but {VLLM_MISSING} on this node; "
            "install the serving environment (make gpu-serve-env) on a GPU node, or use --engine auto"
        )
    if model_dir is not None and not has_hf_tokenizer(model_dir):
        check_engine_for_model(requested, model_dir)
        if usable:
            print(f"engine: {model_dir} has no tokenizer.json; using transformers, not vLLM", flush=True)
        return "transformers"
    return "vllm" if usable else "transformers"


def check_engine_for_model(engine: EngineChoice, model_dir: Path) -> None:
    """Login-side half of `choose_engine`: what is wrong whatever node the job lands on."""
    if engine == "vllm" and not has_hf_tokenizer(model_dir):
        raise InferenceError(
            f"{model_dir}: no tokenizer.json (only the cpm vocab.txt), which vLLM cannot load; "
            "convert the checkpoint again (fm9g-launch convert writes tokenizer.json), or use --engine transformers"
        )


def read_config(model_dir: Path) -> dict[str, Any]:
    """config.json of a model folder; InferenceError when it is missing or not JSON."""
    path = model_dir / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InferenceError(
            f"{model_dir}: not a Hugging Face model folder (no config.json); "
            "convert a run first (fm9g-launch convert RUN) or pass the run itself"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InferenceError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise InferenceError(f"{path}: expected a JSON object")
    return config


def custom_architecture(config: dict[str, Any]) -> str | None:
    """What makes a config need remote code, or None: an `auto_map` whose model_type stock
    transformers does not know (the released 2B is "fm9g"/"minicpm" with modeling_*.py)."""
    auto_map = config.get("auto_map")
    if not auto_map:
        return None
    model_type = config.get("model_type")
    try:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    except ImportError:  # no transformers on this side: the auto_map alone decides
        CONFIG_MAPPING_NAMES = {}
    if model_type in CONFIG_MAPPING_NAMES:
        return None
    target = auto_map.get("AutoModelForCausalLM") if isinstance(auto_map, dict) else None
    return f"model_type {model_type!r}" + (f", auto_map AutoModelForCausalLM -> {target}" if target else "")


def check_model_dir(model_dir: Path, *, trust_remote_code: bool = False) -> None:
    """A model folder the engines can load: config.json, and remote code only when allowed."""
    custom = custom_architecture(read_config(model_dir))
    if custom and not trust_remote_code:
        raise InferenceError(
            f"{model_dir}: config.json names a custom architecture ({custom}) that loads only with the "
            "folder's own Python code. Either pass --trust-remote-code to run that code (read it first), "
            f"or convert the folder to a native architecture stock transformers and vLLM load: "
            f"fm9g-launch convert {model_dir} --output DIR (2B -> GraniteForCausalLM, 8B -> LlamaForCausalLM)"
        )


def serving_dtype(model_dir: Path, *, gpu: bool) -> str:
    """The dtype to load weights in: an fp32 export runs in bf16 on a GPU, said explicitly.

    vLLM's dtype="auto" turns fp32 into fp16 on vLLM 0.6.x (bf16 only on newer), and the
    muP-scaled activations of FM9G (scale_emb 12) can overflow fp16.  On a CPU fp32 stays."""
    config = read_config(model_dir)
    declared = config.get("torch_dtype") or config.get("dtype")
    if gpu and declared in (None, "float32"):
        return "bfloat16"
    return "auto"


class _Tokenizer:
    """encode (with BOS) / decode / eos over an HF tokenizer, or FM9G's own for a cpm vocab."""

    def __init__(self, model_dir: Path, *, trust_remote_code: bool = False) -> None:
        from transformers import AutoTokenizer

        try:
            self.hf: Any = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
            self.ours: Any = None
            self.eos_id = self.hf.eos_token_id
        except (OSError, ValueError, TypeError, KeyError):
            # An 8B folder with only the "cpm" vocab.txt has no HF tokenizer class; FM9G's loader reads it.
            from fm9g.data.tokenizer import load_tokenizer

            self.hf = None
            self.ours = load_tokenizer(model_dir)
            self.eos_id = self.ours.eos_id

    def encode(self, text: str) -> list[int]:
        if self.hf is not None:
            return list(self.hf(text)["input_ids"])
        return [self.ours.bos_id, *self.ours.encode(text)]

    def encode_plain(self, text: str) -> list[int]:
        """Ids of `text` alone, no BOS (bad words)."""
        if self.hf is not None:
            return list(self.hf(text, add_special_tokens=False)["input_ids"])
        return list(self.ours.encode(text))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if self.hf is not None:
            return str(self.hf.decode(ids, skip_special_tokens=skip_special_tokens))
        return str(self.ours.decode(ids))


def _per_prompt(sampling: Sampling | list[Sampling], count: int) -> list[Sampling]:
    return list(sampling) if isinstance(sampling, list) else [sampling] * count


def generate_transformers(
    model_dir: Path,
    texts: list[str],
    sampling: Sampling | list[Sampling],
    progress: Callable[[int, int], None] = lambda done, total: None,
    *,
    trust_remote_code: bool = False,
) -> list[list[dict[str, Any]]]:
    """Completions of each text with transformers `generate`, one prompt at a time.

    `sampling` is one for all prompts or one per prompt.  The RNG is seeded with
    `seed + index` before each prompt, so a prompt's completions do not depend on the
    other prompts of the file or on their order."""
    import torch
    from transformers import AutoModelForCausalLM

    from fm9g.launchers.hf_sampling import finish, generate_options

    check_model_dir(model_dir, trust_remote_code=trust_remote_code)
    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    dtype = serving_dtype(model_dir, gpu=gpu)
    tokenizer = _Tokenizer(model_dir, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, trust_remote_code=trust_remote_code)
    model = model.to(device).eval()
    eos = tokenizer.eos_id
    results = []
    for index, (text, params) in enumerate(zip(texts, _per_prompt(sampling, len(texts)))):
        ids = torch.tensor([tokenizer.encode(text)], device=device)  # (1, prompt_len)

        def decode(row: list[int], params: Sampling = params) -> str:
            return tokenizer.decode(row, skip_special_tokens=params.skip_special_tokens)

        options = generate_options(
            params, prompt_length=ids.shape[1], eos_id=eos, encode_plain=tokenizer.encode_plain, decode=decode
        )
        torch.manual_seed(params.seed + index)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **options)  # (n, prompt_len + new)
        results.append([finish(row, params, eos_id=eos, decode=decode) for row in out[:, ids.shape[1] :].tolist()])
        progress(index + 1, len(texts))
    return results


def shutdown_vllm(llm: Any) -> None:
    """Release the engine and its GPU memory, so a second LLM (or a server) in the same
    process or on the same GPU passes its free-memory check.  Each step is guarded by
    what the installed vLLM has: the API moved between 0.6 and current."""
    import gc

    engine = getattr(llm, "llm_engine", None)
    core = getattr(engine, "engine_core", None)  # V1: the engine-core client owns the worker process
    for target in (llm, engine, core):
        stop = getattr(target, "shutdown", None)
        if callable(stop):
            stop()
            break
    try:
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

        destroy_model_parallel()
        destroy_distributed_environment()
    except (ImportError, AssertionError, RuntimeError):
        pass
    del llm, engine, core
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def generate_vllm(
    model_dir: Path,
    texts: list[str],
    sampling: Sampling | list[Sampling],
    progress: Callable[[int, int], None] = lambda done, total: None,
    *,
    trust_remote_code: bool = False,
    engine_args: dict[str, Any] | None = None,
) -> list[list[dict[str, Any]]]:
    """Completions of each text with vLLM's offline `LLM.generate` (GPU), then the LLM shut down."""
    from vllm import LLM, SamplingParams

    check_model_dir(model_dir, trust_remote_code=trust_remote_code)
    per_prompt = _per_prompt(sampling, len(texts))
    # tokenizer_mode stays vLLM's default "auto": the folder has tokenizer.json (choose_engine checked).
    llm = LLM(
        model=str(model_dir),
        dtype=serving_dtype(model_dir, gpu=True),
        seed=per_prompt[0].seed if per_prompt else 0,
        trust_remote_code=trust_remote_code,
        **(engine_args or {}),
    )
    try:
        # One SamplingParams per prompt, seeded like the transformers engine (seed + index).
        params = [SamplingParams(**{**p.vllm_kwargs(), "seed": p.seed + i}) for i, p in enumerate(per_prompt)]
        results = []
        for request in llm.generate(texts, params):
            results.append(
                [
                    {
                        "text": choice.text,
                        "finish_reason": choice.finish_reason or "length",
                        "tokens": len(choice.token_ids),
                    }
                    for choice in request.outputs
                ]
            )
    finally:
        shutdown_vllm(llm)
    progress(len(texts), len(texts))
    return results


def refuse_engine_args(engine_args: dict[str, Any] | None) -> None:
    """Engine arguments are vLLM's: on transformers they would be dropped, so they are refused."""
    if engine_args:
        raise InferenceError(
            f"--engine-arg {', '.join(engine_args)}: engine arguments are vLLM's, and this job runs "
            f"transformers ({VLLM_MISSING} here, or --engine transformers); drop them, or run on a GPU node with vLLM"
        )


def generate(
    engine: Engine,
    model_dir: Path,
    texts: list[str],
    sampling: Sampling | list[Sampling],
    progress: Callable[[int, int], None] = lambda done, total: None,
    *,
    trust_remote_code: bool = False,
    engine_args: dict[str, Any] | None = None,
) -> list[list[dict[str, Any]]]:
    if engine == "vllm":
        return generate_vllm(
            model_dir, texts, sampling, progress, trust_remote_code=trust_remote_code, engine_args=engine_args
        )
    refuse_engine_args(engine_args)
    return generate_transformers(model_dir, texts, sampling, progress, trust_remote_code=trust_remote_code)


def run(
    model: Path,
    prompts_path: Path,
    output: Path,
    sampling: Sampling,
    *,
    chat: bool,
    engine_choice: str,
    trust_remote_code: bool = False,
    engine_args: dict[str, Any] | None = None,
) -> int:
    """Generate completions for every prompt and write them; returns the number written."""
    prompts = read_prompts(prompts_path)
    texts = [format_prompt(p.text, chat) for p in prompts]
    check_model_dir(model, trust_remote_code=trust_remote_code)
    engine = choose_engine(engine_choice, model)  # type: ignore[arg-type]
    per_prompt = sampling_per_prompt(prompts_path, prompts, sampling, engine)
    if engine != "vllm":
        refuse_engine_args(engine_args)  # before the model loads
    print(
        f"infer: {len(prompts)} prompts from {prompts_path}, model {model}, engine {engine}, "
        f"sampling {sampling.to_dict()}, chat format {'on' if chat else 'off'}",
        flush=True,
    )
    started = time.monotonic()

    def progress(done: int, total: int) -> None:
        if done == total or done % 10 == 0:
            print(f"infer: {done}/{total} prompts ({time.monotonic() - started:.1f}s)", flush=True)

    results = generate(
        engine, model, texts, per_prompt, progress, trust_remote_code=trust_remote_code, engine_args=engine_args
    )
    records = [
        completion_record(p, text, outputs, sampling=params, model=str(model), engine=engine)
        for p, text, outputs, params in zip(prompts, texts, results, per_prompt)
    ]
    write_text(output, dump_jsonl(records))
    print(f"infer: wrote {len(records)} lines to {output}", flush=True)
    return len(records)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fm9g.launchers.infer", description="Offline batch generation over a jsonl prompt file."
    )
    parser.add_argument("--model", type=Path, required=True, help="Hugging Face model folder")
    parser.add_argument("--prompts", type=Path, required=True, help='jsonl, one {"prompt": ...} per line')
    parser.add_argument("--output", type=Path, required=True, help="jsonl of completions, same order")
    parser.add_argument("--chat", action="store_true", help="wrap prompts in the chat format <用户>…<AI>")
    parser.add_argument("--engine", choices=["auto", "vllm", "transformers"], default="auto")
    parser.add_argument("--trust-remote-code", action="store_true", help="run a custom architecture's own code")
    parser.add_argument(
        "--sampling-json", help="every sampling parameter as one JSON object (what the job script passes)"
    )
    parser.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE", help="a vLLM engine argument")
    add_sampling_options(parser)
    args = parser.parse_args(argv)
    try:
        sampling = sampling_from_json(args.sampling_json) if args.sampling_json else sampling_from(args)
        try:
            engine_args = llm_kwargs([parse_engine_arg(text) for text in args.engine_arg])
        except ValueError as exc:
            raise InferenceError(str(exc)) from None
        run(
            args.model,
            args.prompts,
            args.output,
            sampling,
            chat=args.chat,
            engine_choice=args.engine,
            trust_remote_code=args.trust_remote_code,
            engine_args=engine_args,
        )
    except InferenceError as exc:
        print(f"infer: error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
