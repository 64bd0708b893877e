"""``ssmkit serve``: load a Mamba model folder, start the decode engine, serve HTTP with uvicorn.

Only models whose state per stream is constant are served: Mamba (``model_type`` "mamba"). A Transformer
keeps every past token in its KV cache, so its memory per conversation grows with the context — the
thing this server exists not to do — and its folder is refused with one line saying so.

The process: check the folder's model type, load the model (``ssmkit.models.load.load_model``) in
``dtype``, the tokenizer (``ssmkit.data.tokenizer.load_tokenizer``: tokenizer.json, else bytes) and the
chat template (``ssmkit.serve.chat``); bind the socket (``port`` 0: a free one), print where it listens,
start the engine thread and run uvicorn on the bound socket. SIGTERM / Ctrl-C: uvicorn stops accepting
connections, the engine ends every open stream (with an error event saying the server is shutting down)
and its thread stops, then uvicorn exits (by re-raising the signal, the conventional exit status).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

DTYPES = ("float32", "bfloat16")


@dataclass
class ServeConfig:
    """Settings of ``ssmkit serve``."""

    model_dir: Path
    """Model folder (config.json + weights; tokenizer.json and tokenizer_config.json optional)."""
    host: str = "127.0.0.1"
    """Address to listen on."""
    port: int = 8000
    """TCP port (0: any free port; the one chosen is printed)."""
    dtype: str = "float32"
    """Weight dtype (the SSM state stays float32)."""
    threads: int | None = None
    """torch.set_num_threads (None: torch's default)."""
    max_batch: int = 32
    """Most streams decoded together in one step."""
    max_streams: int = 128
    """Most live streams (decoding + waiting); beyond, requests get 503."""
    max_prompt_tokens: int | None = None
    """Longest prompt accepted (None: no limit; the state does not grow with it)."""
    model_name: str | None = None
    """Model id clients must send (None: the folder's name)."""

    def __post_init__(self) -> None:
        self.model_dir = Path(self.model_dir)
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        for name in ("max_batch", "max_streams", "threads", "max_prompt_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.max_streams < self.max_batch:
            raise ValueError(f"max_streams ({self.max_streams}) must be >= max_batch ({self.max_batch})")


def load(config: ServeConfig):
    """(model, tokenizer, chat template or None, model id) for ``config``; one-line errors."""
    import torch

    from ssmkit.data.tokenizer import load_tokenizer
    from ssmkit.models.checkpoint import MODEL_TYPES
    from ssmkit.models.hub import resolve
    from ssmkit.models.load import load_model, model_type_of
    from ssmkit.serve.chat import ChatTemplate

    try:
        folder = resolve(config.model_dir)  # a folder as it is; an org/name Hub id through the HF cache
    except FileNotFoundError as err:
        raise FileNotFoundError(f"MODEL_DIR: {err}") from None
    found = model_type_of(folder)
    if found not in MODEL_TYPES:
        raise ValueError(
            f"{folder / 'config.json'}: model type {found!r} is not served: ssmkit serve serves Mamba "
            "models (Mamba, Mamba-2, Falcon-Mamba), whose state per stream is constant; a Transformer's KV "
            "cache grows with every token of context"
        )
    model = load_model(folder).eval().to(getattr(torch, config.dtype))
    if model.config.attn_layer_idx:
        raise ValueError(
            f"{folder / 'config.json'}: a hybrid with attention layers {model.config.attn_layer_idx} is not "
            "served: its KV caches grow with the context and cannot join a batch at different lengths"
        )
    tokenizer = load_tokenizer(folder)
    if tokenizer.vocab_size > model.config.padded_vocab_size:
        raise ValueError(
            f"{folder}: the tokenizer has {tokenizer.vocab_size} tokens but the model only "
            f"{model.config.padded_vocab_size}"
        )
    template = ChatTemplate.from_folder(folder)
    name = config.model_name or folder.resolve().name
    return model, tokenizer, template, name


def run(config: ServeConfig) -> int:
    """Serve until SIGTERM / SIGINT."""
    import torch
    import uvicorn

    from ssmkit.serve.app import build_app
    from ssmkit.serve.engine import Engine

    if config.threads is not None:
        torch.set_num_threads(config.threads)
    model, tokenizer, template, name = load(config)
    # ids the tokenizer cannot decode (a byte tokenizer on a larger vocabulary) are never sampled
    vocab = min(model.config.vocab_size, tokenizer.vocab_size)
    engine = Engine(model, tokenizer, config.max_batch, config.max_streams, vocab)
    app = build_app(engine, tokenizer, template, name, config.max_prompt_tokens)

    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((config.host, config.port))
    except OSError as err:
        sock.close()
        raise OSError(
            f"--host {config.host} --port {config.port}: cannot listen there ({err.strerror})"
        ) from None
    sock.listen(2048)
    port = sock.getsockname()[1]
    host = f"[{config.host}]" if family == socket.AF_INET6 else config.host

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            engine.shutdown()  # end the open streams first, so their connections close now
            await super().shutdown(sockets=sockets)

    server = Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5, lifespan="off"))
    engine.start()
    print(
        f"ssmkit serve: model {name!r} at http://{host}:{port}/v1 "
        f"(max batch {config.max_batch}, max streams {config.max_streams}, "
        f"{engine.state_bytes_per_stream} bytes of state per stream)",
        flush=True,
    )
    try:
        server.run(sockets=[sock])
    finally:
        engine.shutdown()
        sock.close()
    return 0
