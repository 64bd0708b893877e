"""`ssmkit generate MODEL --prompt ...`: continue a prompt with a saved language model.

Thin: checks the sampling flags, resolves MODEL — a local folder, or a Hugging Face Hub id such as
``state-spaces/mamba-130m-hf`` fetched into (or, offline, read from) the Hub cache
(``ssmkit.models.hub.resolve``) — loads the model (``ssmkit.models.load.load_model``: a Mamba folder in
Hugging Face or mamba-ssm format, or a TransformerLM folder, told apart by config.json's model type) and
the tokenizer (``ssmkit.data.tokenizer.load_tokenizer``: tokenizer.json if present, else bytes), and
calls ``model.generate``. Prints the prompt followed by the continuation; ``--stream`` prints text as it
comes.

Decoding settings, each taken from the first that sets it: the flag; the folder's generation_config.json
(read as transformers reads it, ``ssmkit.models.folder.generation_defaults``: greedy unless do_sample is
true); ssmkit's defaults — greedy decoding (temperature 0, as transformers and mamba-ssm), 50 new tokens,
the tokenizer's end-of-sequence token.
"""

from __future__ import annotations

import math
import sys

# ssmkit's decoding defaults, used when neither a flag nor generation_config.json sets a value
DEFAULTS = {
    "max_new_tokens": 50,
    "temperature": 0.0,
    "top_k": 0,
    "top_p": 1.0,
    "min_p": 0.0,
    "repetition_penalty": 1.0,
}
SETTINGS = (*DEFAULTS, "eos_token_id")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="generate text from a saved language model or a Hub id (Mamba in Hugging Face or mamba-ssm "
        "format, or ssmkit's Transformer)",
        description="Load MODEL (a folder with config.json + weights — for a run of `ssmkit train --task "
        "lm`, its model/ folder — or a Hugging Face Hub id such as state-spaces/mamba-130m-hf, downloaded "
        "into the Hub cache, or read from it when HF_HUB_OFFLINE=1) and continue PROMPT. Uses the "
        "model's tokenizer.json when present, else a byte-level tokenizer (ids 0..255). Each decoding "
        "setting comes from its flag, else the model's generation_config.json, else the default shown: "
        "greedy decoding unless a temperature > 0 is given.",
    )
    p.add_argument(
        "model",
        metavar="MODEL",
        help="local model folder (config.json + weights) or Hub id (org/name; needs pip install "
        "'ssmkit[hub]')",
    )
    p.add_argument("--revision", default=None, help="branch, tag or commit of a Hub id (default: main)")
    p.add_argument(
        "--tokenizer",
        default=None,
        metavar="NAME_OR_PATH",
        help="tokenizer.json file, folder or Hub id to use instead of MODEL's own (e.g. "
        "EleutherAI/gpt-neox-20b for the state-spaces/mamba-* repos, which ship none)",
    )
    p.add_argument("--prompt", default=None, help="text to continue (required unless --interactive)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="tokens to generate (default 50)")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default 0: greedy)")
    p.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens; 0 = off (default)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass; 1 = off (default)")
    p.add_argument("--min-p", type=float, default=None, help="keep p >= min_p * max p; 0 = off (default)")
    p.add_argument("--repetition-penalty", type=float, default=None, help="CTRL penalty; 1 = off (default)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling generator (default 0)")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.add_argument(
        "--interactive",
        action="store_true",
        help="prompt loop: read a prompt per line from the terminal (type \\n for a newline), "
        "stream the continuation; an empty line or Ctrl-D ends (each prompt starts afresh)",
    )
    p.set_defaults(func=_run)


def check_sampling(args) -> None:
    """ValueError naming the flag for a sampling value ``generate`` would refuse (checked before loading;
    a flag left out is None and not checked)."""
    from ssmkit.cli._args import check_range

    if args.max_new_tokens is not None and args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.top_k is not None and args.top_k < 0:
        raise ValueError(f"--top-k must be >= 0, got {args.top_k}")
    for flag, value, lo, hi, lo_open in (
        ("--temperature", args.temperature, 0.0, math.inf, False),
        ("--top-p", args.top_p, 0.0, 1.0, True),
        ("--min-p", args.min_p, 0.0, 1.0, False),
        ("--repetition-penalty", args.repetition_penalty, 0.0, math.inf, True),
    ):
        if value is not None:
            check_range(flag, value, lo, hi, lo_open=lo_open)


def decoding_settings(args, folder, tokenizer) -> dict:
    """Each decoding setting from its flag, else the folder's generation_config.json, else
    :data:`DEFAULTS` (and the tokenizer's end-of-sequence token)."""
    from ssmkit.models.folder import generation_defaults

    settings = {**DEFAULTS, "eos_token_id": tokenizer.eos_token_id, **generation_defaults(folder)}
    for name in SETTINGS:
        if getattr(args, name, None) is not None:
            settings[name] = getattr(args, name)
    unused = [f"--{n.replace('_', '-')}" for n in ("top_k", "top_p", "min_p") if getattr(args, n) is not None]
    if settings["temperature"] == 0 and unused:
        print(
            f"note: greedy decoding (temperature 0) ignores {', '.join(unused)}; give --temperature > 0 "
            "to sample",
            file=sys.stderr,
        )
    return settings


def _run(args) -> int:
    from ssmkit.data.tokenizer import ByteTokenizer, load_tokenizer
    from ssmkit.models.hub import resolve, resolve_tokenizer
    from ssmkit.models.load import load_model

    if args.prompt is None and not args.interactive:
        raise ValueError("give --prompt TEXT or --interactive")
    check_sampling(args)
    try:
        folder = resolve(args.model, revision=args.revision)
        tok_path = None if args.tokenizer is None else resolve_tokenizer(args.tokenizer)
    except ImportError as err:  # huggingface_hub missing: a user's setup, one line like other user errors
        raise ValueError(str(err)) from None
    model = load_model(folder).eval()
    tokenizer = load_tokenizer(folder) if tok_path is None else load_tokenizer(tok_path, required=True)
    if tokenizer.vocab_size > model.config.padded_vocab_size:
        raise ValueError(
            f"{args.tokenizer or args.model}: the tokenizer has {tokenizer.vocab_size} tokens but the model "
            f"only {model.config.padded_vocab_size}"
        )
    if isinstance(tokenizer, ByteTokenizer) and model.config.vocab_size > ByteTokenizer.vocab_size:
        print(
            f"note: {args.model} has no tokenizer.json, so text is read as bytes (ids 0..255) although the "
            f"model has {model.config.vocab_size} tokens; pass --tokenizer NAME_OR_PATH for its own",
            file=sys.stderr,
        )
    args.settings = decoding_settings(args, folder, tokenizer)
    if args.interactive:
        return _interactive(model, tokenizer, args)
    return _generate_one(model, tokenizer, args.prompt, args)


def _interactive(model, tokenizer, args) -> int:
    """Read prompts from stdin until an empty line or EOF; stream each continuation."""
    print("[generate] interactive: type a prompt and press Enter; an empty line or Ctrl-D quits.", flush=True)
    args.stream = True
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return 0
        if not line:
            return 0
        _generate_one(model, tokenizer, line.replace("\\n", "\n"), args)  # "\n" typed = a newline


def _generate_one(model, tokenizer, prompt: str, args) -> int:
    import torch

    args.prompt = prompt
    prompt_ids = tokenizer.encode(args.prompt)
    if not prompt_ids:
        raise ValueError("--prompt encodes to no tokens")
    input_ids = torch.tensor([prompt_ids], dtype=torch.long)
    generator = torch.Generator().manual_seed(args.seed)

    new_ids: list[int] = []
    printed = [0]  # characters of the continuation already printed (streaming)

    def stream(token):
        new_ids.append(int(token[0]))
        text = tokenizer.decode(new_ids)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(text[printed[0] :])
            sys.stdout.flush()
            printed[0] = len(text)

    if args.stream:
        sys.stdout.write(args.prompt)
        sys.stdout.flush()
    settings = dict(args.settings)
    out = model.generate(
        input_ids,
        settings.pop("max_new_tokens"),
        **settings,
        generator=generator,
        streamer=stream if args.stream else None,
    )
    continuation = tokenizer.decode(out[0, len(prompt_ids) :].tolist())
    if args.stream:
        sys.stdout.write(continuation[printed[0] :] + "\n")
    else:
        sys.stdout.write(args.prompt + continuation + "\n")
    sys.stdout.flush()
    return 0
