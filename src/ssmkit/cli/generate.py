"""`ssmkit generate MODEL_DIR --prompt ...`: sample a continuation from a saved language model.

Thin: checks the sampling flags, loads the model (``ssmkit.models.load.load_model``: a Mamba folder in
Hugging Face or mamba-ssm format, or a TransformerLM folder, told apart by config.json's model type) and
the tokenizer (``ssmkit.data.tokenizer.load_tokenizer``: tokenizer.json if present, else bytes), and
calls ``model.generate``. Prints the prompt followed by the continuation; ``--stream`` prints text as it
comes.
"""

from __future__ import annotations

import sys
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="generate text from a saved language model (Mamba in Hugging Face or mamba-ssm format, "
        "or ssmkit's Transformer)",
        description="Load MODEL_DIR (config.json + weights; for a run of `ssmkit train --task lm`, its "
        "model/ folder) and continue PROMPT. Uses the folder's tokenizer.json when present, else a "
        "byte-level tokenizer (ids 0..255).",
    )
    p.add_argument(
        "model_dir", type=Path, metavar="MODEL_DIR", help="local model folder (config.json + weights)"
    )
    p.add_argument("--prompt", default=None, help="text to continue (required unless --interactive)")
    p.add_argument("--max-new-tokens", type=int, default=50, help="tokens to generate (default 50)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass; 1 = off")
    p.add_argument("--min-p", type=float, default=0.0, help="keep p >= min_p * max p; 0 = off")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="CTRL penalty; 1 = off")
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
    """ValueError naming the flag for a sampling value ``generate`` would refuse (checked before loading)."""
    from ssmkit.cli._args import check_range

    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.top_k < 0:
        raise ValueError(f"--top-k must be >= 0, got {args.top_k}")
    check_range("--temperature", args.temperature, 0.0)
    check_range("--top-p", args.top_p, 0.0, 1.0, lo_open=True)
    check_range("--min-p", args.min_p, 0.0, 1.0)
    check_range("--repetition-penalty", args.repetition_penalty, 0.0, lo_open=True)


def _run(args) -> int:
    from ssmkit.data.tokenizer import load_tokenizer
    from ssmkit.models.load import load_model

    if args.prompt is None and not args.interactive:
        raise ValueError("give --prompt TEXT or --interactive")
    check_sampling(args)
    model = load_model(args.model_dir).eval()
    tokenizer = load_tokenizer(args.model_dir)
    if tokenizer.vocab_size > model.config.padded_vocab_size:
        raise ValueError(
            f"{args.model_dir}: the tokenizer has {tokenizer.vocab_size} tokens but the model only "
            f"{model.config.padded_vocab_size}"
        )
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
    out = model.generate(
        input_ids,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        eos_token_id=tokenizer.eos_token_id,
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
