"""`ssmkit bench`: measurements. ``ssmkit bench decode``: generation cost vs context, Mamba vs Transformer."""

import time
from pathlib import Path

from ssmkit.cli._args import check_device, int_at_least, int_list
from ssmkit.utils import parse_list

MODELS = ("mamba", "transformer")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="measurements (decode cost vs context)",
        description="Benchmarks. `decode`: time per generated token and state held per sequence after "
        "contexts of growing length, for a Mamba LM and a Transformer LM of the same width, depth and "
        "parameter count (random weights).",
    )
    bsub = p.add_subparsers(dest="bench", metavar="BENCH", required=True)
    d = bsub.add_parser(
        "decode",
        help="ms/token and state bytes vs context: Mamba (flat) vs Transformer (growing)",
        description="Prefill each context in chunks, then time DECODE_STEPS greedy decode steps (median "
        "ms/token) and report the cache bytes held per sequence. Writes decode.csv, decode.json and "
        "decode.png to OUT.",
    )
    d.add_argument(
        "--contexts",
        type=int_list("--contexts", minimum=1),
        default=[1024, 4096, 16384, 65536],
        help="comma-separated context lengths (default: 1024,4096,16384,65536)",
    )
    d.add_argument(
        "--d-model", type=int_at_least(1), default=256, help="width D of both models (default: 256)"
    )
    d.add_argument("--n-layer", type=int_at_least(1), default=4, help="depth of both models (default: 4)")
    d.add_argument(
        "--n-head", type=int_at_least(1), default=4, help="Transformer attention heads (default: 4)"
    )
    d.add_argument("--d-state", type=int_at_least(1), default=16, help="Mamba state size N (default: 16)")
    d.add_argument("--vocab-size", type=int_at_least(1), default=256, help="vocabulary size (default: 256)")
    d.add_argument(
        "--decode-steps", type=int_at_least(1), default=64, help="timed decode steps (default: 64)"
    )
    d.add_argument(
        "--chunk-size", type=int_at_least(1), default=1024, help="tokens per prefill call (default: 1024)"
    )
    d.add_argument(
        "--models",
        default="mamba,transformer",
        help="comma-separated subset of mamba,transformer (default: both)",
    )
    d.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    d.add_argument(
        "--threads", type=int_at_least(1), default=None, help="torch.set_num_threads (default: torch's)"
    )
    d.add_argument("--seed", type=int, default=0, help="seed of weights and context tokens (default: 0)")
    d.add_argument(
        "--out", type=Path, default=None, help="output folder (default: ./ssmkit-out/bench-decode-<time>)"
    )
    d.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    d.set_defaults(func=_run_decode)


def _run_decode(args) -> int:
    import torch

    from ssmkit.bench.decode import DecodeBenchConfig, run_decode_bench

    check_device("--device", args.device)
    models = parse_list(args.models, str, "--models")
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        raise ValueError(f"--models: unknown models {unknown}; expected a subset of {','.join(MODELS)}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cfg = DecodeBenchConfig(
        contexts=args.contexts,
        d_model=args.d_model,
        n_layer=args.n_layer,
        n_head=args.n_head,
        d_state=args.d_state,
        vocab_size=args.vocab_size,
        decode_steps=args.decode_steps,
        chunk_size=args.chunk_size,
        models=models,
        device=args.device,
        seed=args.seed,
    )
    out = args.out or Path("ssmkit-out") / time.strftime("bench-decode-%Y%m%d-%H%M%S")
    _, files = run_decode_bench(cfg, out, show_progress=not args.no_progress)
    print(f"\nWrote {len(files)} files to {out.resolve()}:")
    for f in files:
        print(f"  {f}")
    return 0
