"""`ssmkit convert SRC DST [--to hf|mamba-ssm]`: convert a Mamba LM checkpoint folder between formats.

Thin: calls ``ssmkit.models.checkpoint.convert_checkpoint`` (reads SRC in either format, checks every key
and shape, writes DST atomically). No model is built and nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a Mamba LM checkpoint between Hugging Face and mamba-ssm formats",
        description="Read SRC (Hugging Face or mamba-ssm folder, detected from config.json) and write DST "
        "in the format given by --to.",
    )
    p.add_argument("src", type=Path, metavar="SRC", help="source model folder")
    p.add_argument("dst", type=Path, metavar="DST", help="destination folder (created if needed)")
    p.add_argument(
        "--to",
        choices=["hf", "mamba-ssm"],
        default="hf",
        help="hf: config.json + model.safetensors (transformers MambaForCausalLM); "
        "mamba-ssm: config.json + pytorch_model.bin (MambaLMHeadModel). Default hf.",
    )
    p.set_defaults(func=_run)


def _run(args) -> int:
    from ssmkit.models.checkpoint import convert_checkpoint

    config = convert_checkpoint(args.src, args.dst, to=args.to)
    print(
        f"Wrote {args.to} checkpoint (d_model={config.d_model}, n_layer={config.n_layer}, "
        f"vocab={config.padded_vocab_size}) to {args.dst.resolve()}"
    )
    return 0
