"""Talk to a model served by `fm9g-launch serve RUN` with the `openai` package.

    fm9g-launch serve runs/tiny-sft            # prints the URL once /health answers
    python examples/client.py runs/tiny-sft "你好"

    # a pretrained (not fine-tuned) model knows no chat format: send the text as it is
    python examples/client.py runs/tiny-pretrain "The capital of France is" --plain

The base URL comes from runs/NAME/serve/endpoint.json (written by the serve job), the
API key from runs/NAME/serve/api_key, and the model id is the run's name (NAME: what
`fm9g-launch serve` publishes; the model folder's path is accepted too).  Prints one
completion and one chat completion (with --plain: one completion of the bare text).

Any OpenAI client works the same way, e.g. for the run tiny-sft:

    client = OpenAI(base_url=endpoint["url"], api_key=open("runs/tiny-sft/serve/api_key").read().strip())
    client.completions.create(model="tiny-sft", prompt="<用户>你好<AI>", max_tokens=32)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from openai import OpenAI


def connect(run_dir: Path) -> tuple[OpenAI, str]:
    """An OpenAI client for the run's server, and the model id to send: the run's name."""
    serve = run_dir / "serve"
    try:
        endpoint = json.loads((serve / "endpoint.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        sys.exit(f"{serve / 'endpoint.json'}: no server published; start one with `fm9g-launch serve {run_dir}`")
    api_key = (serve / "api_key").read_text(encoding="utf-8").strip()
    client = OpenAI(base_url=endpoint["url"], api_key=api_key, max_retries=0, timeout=120)
    return client, run_dir.resolve().name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="completion + chat completion against `fm9g-launch serve`")
    parser.add_argument("run", type=Path, help="the run directory (runs/NAME)")
    parser.add_argument("prompt", nargs="?", default="你好", help="what to ask (default: 你好)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument(
        "--plain", action="store_true", help="a pretrained model: complete the bare text, no chat format, no chat call"
    )
    args = parser.parse_args(argv)
    client, model = connect(args.run)

    # /v1/completions sends the text as it is, so a chat (sft) model gets its markers here.
    prompt = args.prompt if args.plain else f"<用户>{args.prompt}<AI>"
    completion = client.completions.create(model=model, prompt=prompt, max_tokens=args.max_tokens, temperature=0)
    print("completion:", completion.choices[0].text)
    if args.plain:
        return 0

    # Chat completion: the server applies the FM9G chat template (<用户>{content}<AI>).
    chat = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": args.prompt}], max_tokens=args.max_tokens, temperature=0
    )
    print("chat:", chat.choices[0].message.content)
    return 0


if __name__ == "__main__":
    sys.exit(main())
