"""`ssmkit generate MODEL --prompt ...`: continue a prompt with a saved language model.

Thin: checks the sampling flags, resolves MODEL — a local folder, or a Hugging Face Hub id such as
``state-spaces/mamba-130m-hf`` fetched into (or, offline, read from) the Hub cache
(``ssmkit.models.hub.resolve``) — loads the model (``ssmkit.models.load.load_model``: a Mamba folder in
Hugging Face or mamba-ssm format, or a TransformerLM folder, told apart by config.json's model type) and
the tokenizer (``ssmkit.data.tokenizer.load_tokenizer``: tokenizer.json if present, else bytes), and
calls ``model.generate``. Prints the prompt followed by the continuation; ``--stream`` prints text as it
comes. Several ``--prompt`` flags are generated together (``generate`` on a list of prompts: each row
prefilled on its own tokens, then decoded as one batch) and printed in order, separated by a blank line.
``--stop`` ends a continuation at a string (OpenAI's ``stop``: the printed text ends before it).
``--dtype`` casts (bfloat16) or quantizes (int8, ``ssmkit.quantize``) the loaded weights; ``--threads``
and ``--device`` choose where it runs. ``--interactive`` reads prompts with readline (editing, history).

Decoding settings, each taken from the first that sets it: the flag; the folder's generation_config.json
(read as transformers reads it, ``ssmkit.models.folder.generation_defaults``: greedy unless do_sample is
true); ssmkit's defaults — greedy decoding (temperature 0, as transformers and mamba-ssm), 50 new tokens,
the tokenizer's end-of-sequence token.
"""

from __future__ import annotations

import math
import sys

from ssmkit.cli._args import int_at_least

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
    p.add_argument(
        "--prompt",
        action="append",
        default=None,
        help="text to continue (required unless --interactive); repeat for several prompts, generated "
        "as one batch and printed in order",
    )
    p.add_argument(
        "--stop",
        action="append",
        default=None,
        metavar="TEXT",
        help="end a continuation where TEXT appears (not printed; \\n for a newline); repeatable",
    )
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "int8"],
        default=None,
        help="weights to decode with: float32, bfloat16, or int8 (weight-only, one scale per row — "
        "ssmkit.quantize; Mamba and Mamba-2 models); default: the folder's dtype",
    )
    p.add_argument(
        "--threads", type=int_at_least(1), default=None, help="torch CPU threads (default: torch's)"
    )
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
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
    from ssmkit.cli._args import check_device
    from ssmkit.data.tokenizer import ByteTokenizer, load_tokenizer
    from ssmkit.models.hub import resolve, resolve_tokenizer
    from ssmkit.models.load import load_model

    if args.prompt is None and not args.interactive:
        raise ValueError("give --prompt TEXT or --interactive")
    if args.interactive and args.prompt is not None:
        raise ValueError("--interactive reads its prompts from the terminal; leave out --prompt")
    if args.prompt is not None and len(args.prompt) > 1 and args.stream:
        raise ValueError(
            f"--stream prints one continuation as it comes; got {len(args.prompt)} --prompt flags"
        )
    args.stop = [x.replace("\\n", "\n") for x in args.stop or []]
    if any(not x for x in args.stop):
        raise ValueError("--stop must be a non-empty string")
    check_sampling(args)
    check_device("--device", args.device)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        folder = resolve(args.model, revision=args.revision)
        tok_path = None if args.tokenizer is None else resolve_tokenizer(args.tokenizer)
    except ImportError as err:  # huggingface_hub missing: a user's setup, one line like other user errors
        raise ValueError(str(err)) from None
    model = to_dtype(load_model(folder), args.dtype, args.model).to(args.device).eval()
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
    if len(args.prompt) > 1:
        return _generate_many(model, tokenizer, args.prompt, args)
    return _generate_one(model, tokenizer, args.prompt[0], args)


def to_dtype(model, dtype: str | None, name: str):
    """The loaded model in the weights ``--dtype`` asks for (None: as loaded)."""
    import torch

    from ssmkit.engine.quant import is_quantized, quantize

    if dtype is None:
        return model
    if is_quantized(model):
        if dtype != "int8":
            raise ValueError(f"--dtype {dtype}: {name} holds int8 weights; load the float model instead")
        return model
    if dtype == "int8":
        return quantize(model.float(), "int8")  # scales in float32, from float32 weights
    return model.to(getattr(torch, dtype))


def _generate_many(model, tokenizer, prompts: list[str], args) -> int:
    """Several prompts as one batch (``generate`` on a list); each printed with its continuation."""
    import torch

    from ssmkit.serve.text import StopMatcher

    ids = [tokenizer.encode(p) for p in prompts]
    for i, x in enumerate(ids):
        if not x:
            raise ValueError(f"--prompt number {i + 1} encodes to no tokens")
    gens = [torch.Generator().manual_seed(args.seed + i) for i in range(len(ids))]
    settings = dict(args.settings)
    outs = model.generate(
        ids,
        settings.pop("max_new_tokens"),
        **settings,
        generator=gens,
        stop_strings=args.stop or None,
        tokenizer=tokenizer,
    )
    for i, (prompt, x, out) in enumerate(zip(prompts, ids, outs, strict=True)):
        text, _ = StopMatcher(tuple(args.stop)).push(tokenizer.decode(out[len(x) :].tolist()), final=True)
        sys.stdout.write(("\n" if i else "") + prompt + text + "\n")
    sys.stdout.flush()
    return 0


def _interactive(model, tokenizer, args) -> int:
    """Read prompts from stdin until an empty line or EOF; stream each continuation."""
    try:
        import readline  # noqa: F401  (line editing and history for input(), where the platform has it)
    except ImportError:
        pass
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

    from ssmkit.serve.text import StopMatcher

    new_ids: list[int] = []
    decoded = [0]  # characters of the continuation already handed to the stop matcher
    printed = [0]  # characters of the continuation printed (streaming)
    matcher = StopMatcher(tuple(args.stop))  # holds back text that may be the start of a stop string

    def stream(token):
        new_ids.append(int(token[0]))
        text = tokenizer.decode(new_ids)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            piece, _ = matcher.push(text[decoded[0] :])
            decoded[0] = len(text)
            sys.stdout.write(piece)
            sys.stdout.flush()
            printed[0] += len(piece)

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
        stop_strings=args.stop or None,
        tokenizer=tokenizer,
    )
    continuation, _ = StopMatcher(tuple(args.stop)).push(
        tokenizer.decode(out[0, len(prompt_ids) :].tolist()), final=True
    )  # the text before the first stop string
    if args.stream:
        sys.stdout.write(continuation[printed[0] :] + "\n")
    else:
        sys.stdout.write(args.prompt + continuation + "\n")
    sys.stdout.flush()
    return 0
