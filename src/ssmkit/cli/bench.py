"""`ssmkit bench`: measurements. ``ssmkit bench decode``: generation cost vs context, Mamba vs Transformer;
``ssmkit bench generate``: prefill and decode tokens/s of a model or a named shape (llama-bench style)."""

import time
from pathlib import Path

from ssmkit.cli._args import check_device, int_at_least, int_list
from ssmkit.utils import parse_list

MODELS = ("mamba", "transformer")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="measurements (decode cost vs context; prefill/decode tokens per second)",
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
    _add_generate(bsub)


def _add_generate(bsub) -> None:
    from ssmkit.bench.generate import DTYPES, SHAPES

    g = bsub.add_parser(
        "generate",
        help="prefill (pp) and decode (tg) tokens/s per dtype, batch and thread count, llama-bench style",
        description="Time prefill (ppP: one call over a (batch, P) prompt) and decode (tgN: N greedy "
        "one-token steps) for MODEL (a folder or Hub id) or --shape (random weights of a published "
        "checkpoint's shape), for every combination of --dtypes, --batch and --threads; medians of "
        "--repeats runs after a warm-up, with the batch-1 decode limit of this machine (read bandwidth / "
        "weight bytes). --compare runs transformers' model of the same weights beside it in this process.",
    )
    g.add_argument("model", nargs="?", default=None, metavar="MODEL", help="model folder or Hub id")
    g.add_argument(
        "--shape",
        choices=sorted(SHAPES),
        default=None,
        help="a named shape with random weights instead of MODEL (default without MODEL: mamba-130m)",
    )
    g.add_argument(
        "--dtypes",
        default="fp32",
        help=f"comma-separated weight precisions among {','.join(DTYPES)} (default fp32)",
    )
    g.add_argument("--batch", type=int_list("--batch", minimum=1), default=[1], help="batch sizes, e.g. 1,16")
    g.add_argument(
        "--threads",
        type=int_list("--threads", minimum=1),
        default=None,
        help="thread counts, e.g. 1,2 (default: torch's)",
    )
    g.add_argument(
        "-p", "--prompt-tokens", type=int_at_least(1), default=512, help="prompt tokens P (default 512)"
    )
    g.add_argument(
        "-n", "--gen-tokens", type=int_at_least(1), default=64, help="generated tokens N (default 64)"
    )
    g.add_argument(
        "-r", "--repeats", type=int_at_least(1), default=3, help="timed runs per figure (default 3)"
    )
    g.add_argument(
        "--compare", action="store_true", help="also time transformers (same weights, same process)"
    )
    g.add_argument("--seed", type=int, default=0, help="seed of the random weights and prompts (default 0)")
    g.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    g.set_defaults(func=_run_generate)


def _run_generate(args) -> int:
    import json
    import sys

    import torch

    from ssmkit.bench.generate import HEADER, SHAPES, BenchGenerateConfig, cpu_model, format_row, run
    from ssmkit.utils import atomic_write_text

    if args.model is not None and args.shape is not None:
        raise ValueError("give MODEL or --shape, not both")
    cfg = BenchGenerateConfig(
        dtypes=tuple(parse_list(args.dtypes, str, "--dtypes")),
        batches=tuple(args.batch),
        threads=tuple(args.threads or [0]),
        prompt_tokens=args.prompt_tokens,
        gen_tokens=args.gen_tokens,
        repeats=args.repeats,
        compare=args.compare,
        seed=args.seed,
    )
    if args.model is not None:
        from ssmkit.models.load import load_model

        model, name = load_model(args.model, dtype="float32").eval(), args.model
    else:
        from ssmkit.models.mamba_lm import MambaLM

        name = args.shape or "mamba-130m"
        torch.manual_seed(args.seed)
        model = MambaLM(SHAPES[name]()).eval()
    if not hasattr(model, "backbone"):
        raise ValueError(f"{name}: bench generate times Mamba language models (MambaLM)")
    n = len(cfg.dtypes) * len(cfg.batches) * len(cfg.threads)
    print(
        f"[bench generate] {name}: {n} configuration(s) × pp{cfg.prompt_tokens} + tg{cfg.gen_tokens}, "
        f"{cfg.repeats} runs each after a warm-up, on {cpu_model()}",
        file=sys.stderr,
    )
    print(HEADER)
    print("|---|---|---|---|---|---|---|---|---|", flush=True)
    rows = run(model, name, cfg, lambda r: print(format_row(r), flush=True))
    if args.json is not None:
        atomic_write_text(args.json, json.dumps({"cpu": cpu_model(), "rows": rows}, indent=2) + "\n")
    return 0


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
