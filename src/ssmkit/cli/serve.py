"""`ssmkit serve MODEL_DIR`: an OpenAI-compatible HTTP server over a Mamba model (``ssmkit.serve``).

Thin: parses the flags into a :class:`ssmkit.serve.server.ServeConfig` and runs it. Needs the ``serve``
extra (fastapi, uvicorn).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ssmkit.cli._args import int_at_least


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port in [0, 65535], got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port in [0, 65535], got {value}")
    return value


def add_parser(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server over a Mamba model (constant memory per conversation)",
        description="Serve MODEL_DIR (a Mamba folder in Hugging Face or mamba-ssm format, with its "
        "tokenizer.json, else bytes) at /v1/completions, /v1/chat/completions (when tokenizer_config.json "
        "has a chat_template), /v1/models and /health. Concurrent requests are decoded together in one "
        "batch (continuous batching); each stream holds only its fixed-size recurrent state. Stop with "
        "Ctrl-C or SIGTERM.",
    )
    p.add_argument(
        "model_dir",
        type=Path,
        metavar="MODEL_DIR",
        help="model folder (config.json + weights) or org/name Hub id (hub extra)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=_port, default=8000, help="TCP port; 0 = any free port (default: 8000)")
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="weight dtype; the SSM state stays float32 (default: float32)",
    )
    p.add_argument(
        "--threads", type=int_at_least(1), default=None, help="torch.set_num_threads (default: torch's)"
    )
    p.add_argument(
        "--max-batch", type=int_at_least(1), default=32, help="most streams decoded together (default: 32)"
    )
    p.add_argument(
        "--max-streams",
        type=int_at_least(1),
        default=128,
        help="most live streams, decoding + waiting; beyond, requests get 503 (default: 128)",
    )
    p.add_argument(
        "--max-prompt-tokens",
        type=int_at_least(1),
        default=None,
        help="refuse longer prompts with a 400 (default: no limit; the state does not grow)",
    )
    p.add_argument("--model-name", default=None, help="model id clients send (default: the folder's name)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    if args.max_streams < args.max_batch:
        raise ValueError(f"--max-streams ({args.max_streams}) must be >= --max-batch ({args.max_batch})")
    try:
        from ssmkit.serve.server import ServeConfig, run
    except ImportError as err:
        raise ValueError(
            f"ssmkit serve needs fastapi and uvicorn: pip install 'ssmkit[serve]' ({err})"
        ) from None
    config = ServeConfig(
        model_dir=args.model_dir,
        host=args.host,
        port=args.port,
        dtype=args.dtype,
        threads=args.threads,
        max_batch=args.max_batch,
        max_streams=args.max_streams,
        max_prompt_tokens=args.max_prompt_tokens,
        model_name=args.model_name,
    )
    return run(config)
