"""`ssmkit convert SRC DST [--to hf|mamba-ssm] [--force]`: convert a Mamba LM folder between formats.

Thin: resolves SRC (a folder, or a Hugging Face Hub id read through the Hub cache:
``ssmkit.models.hub.resolve``), checks its model type (``ssmkit.models.load.model_type_of``), then calls
``ssmkit.models.checkpoint.convert_checkpoint`` (reads SRC in either format, checks every key and shape,
writes DST atomically, copies the tokenizer files). DST must be empty or new; ``--force`` writes into a
non-empty DST and removes the weight files of the other format (and stale shards and indexes) there, so
that DST can only load as the converted model. No model is built; only a Hub id is downloaded.
"""

from __future__ import annotations

from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a Mamba / Mamba-2 LM checkpoint between Hugging Face and mamba-ssm formats",
        description="Read SRC (Hugging Face or mamba-ssm folder, detected from config.json) and write DST "
        "in the format given by --to, with SRC's tokenizer files.",
    )
    p.add_argument(
        "src",
        metavar="SRC",
        help="source model folder, or Hub id (org/name; needs pip install 'ssmkit[hub]')",
    )
    p.add_argument("--revision", default=None, help="branch, tag or commit of a Hub id SRC (default: main)")
    p.add_argument("dst", type=Path, metavar="DST", help="destination folder (new or empty unless --force)")
    p.add_argument(
        "--to",
        choices=["hf", "mamba-ssm"],
        default="hf",
        help="hf: config.json + model.safetensors (transformers MambaForCausalLM / Mamba2ForCausalLM); "
        "mamba-ssm: config.json + pytorch_model.bin (MambaLMHeadModel). Default hf.",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="write into a non-empty DST: replace its config.json and weights, and delete the other "
        "format's weight files, shards and index there",
    )
    p.set_defaults(func=_run)


def _run(args) -> int:
    from ssmkit.models.checkpoint import MODEL_TYPES, convert_checkpoint
    from ssmkit.models.hub import resolve
    from ssmkit.models.load import model_type_of

    try:
        src = resolve(args.src, revision=args.revision)
    except ImportError as err:  # huggingface_hub missing: a user's setup, one line like other user errors
        raise ValueError(str(err)) from None
    found = model_type_of(src)
    if found not in MODEL_TYPES:
        raise ValueError(
            f"{args.src} holds a model of type {found!r}; `ssmkit convert` converts Mamba-1 and Mamba-2 "
            f"checkpoints (model types {list(MODEL_TYPES)}) between the Hugging Face and mamba-ssm formats"
        )
    config = convert_checkpoint(src, args.dst, to=args.to, force=args.force)
    print(
        f"Wrote {args.to} checkpoint (d_model={config.d_model}, n_layer={config.n_layer}, "
        f"vocab={config.padded_vocab_size}) to {args.dst.resolve()}"
    )
    return 0
