"""Tokens per streamed forward: the sweep behind ``CPU_STREAM_TOKENS`` (docs/benchmarks.md).

    python benchmarks/bench_stream_eval.py                     # one thread, the default settings
    python benchmarks/bench_stream_eval.py --threads 2 --length 32768

``ssmkit.train.evaluate`` scores a long sequence by streaming it through the recurrent state, chunk by
chunk: ``model(x[:, s:s+c], cache=cache)``. This script times that loop for several (examples × chunk)
shapes per call on the Table 11 model (``SequenceModel(arch=mamba, layer=s6)``, 2 layers, d_model 64,
vocab 16) and prints each one's tokens/s and its ratio to the shape ``evaluate`` runs on a CPU for
``ssmkit eval --chunk-size CHUNK --batch-size BATCH`` (it caps the examples at ``CPU_STREAM_TOKENS //
CHUNK``; the defaults are what benchmarks/table11.py passes: chunk 8192, batch 32 → 4 × 8192). Medians
over ``--repeats`` passes; the CPU model is printed with them, because the knee depends on its caches.
"""

from __future__ import annotations

import argparse

import torch

from ssmkit.bench.machine import cpu_model, median_time
from ssmkit.train.build import build_model, sequence_model_spec
from ssmkit.train.evaluate import cpu_stream_batch_size
from ssmkit.utils import parse_list

SHAPES = "16x8192,16x4096,64x2048,16x2048,16x1024,64x512,4x8192"


def parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in parse_list(text, str, "--shapes"):
        b, sep, c = item.partition("x")
        if not (sep and b.isdigit() and c.isdigit() and int(b) > 0 and int(c) > 0):
            raise SystemExit(f"--shapes: expected EXAMPLESxCHUNK items such as 16x2048, got {item!r}")
        shapes.append((int(b), int(c)))
    return shapes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    p.add_argument("--length", type=int, default=16384, help="tokens per sequence (default: 16384)")
    p.add_argument("--shapes", default=SHAPES, help=f"EXAMPLESxCHUNK per call (default: {SHAPES})")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per shape (default: 3)")
    p.add_argument("--chunk-size", type=int, default=8192, help="ssmkit eval --chunk-size (default: 8192)")
    p.add_argument("--batch-size", type=int, default=32, help="ssmkit eval --batch-size (default: 32)")
    args = p.parse_args()
    shapes = parse_shapes(args.shapes)
    reference = (cpu_stream_batch_size(args.batch_size, args.chunk_size), args.chunk_size)
    if reference not in shapes:
        shapes.append(reference)
    longest = max(c for _, c in shapes)
    if args.length < longest:
        raise SystemExit(f"--length must be at least the longest chunk ({longest}), got {args.length}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    spec = sequence_model_spec(vocab_size=16, d_model=64, n_layer=2, arch="mamba", layer="s6", d_state=16)
    model = build_model(spec).eval()
    print(f"CPU: {cpu_model()} · {args.threads} thread(s) · sequences of {args.length} tokens", flush=True)

    rates = {}
    for b, c in shapes:
        ids = torch.randint(0, 16, (b, args.length))

        @torch.no_grad()
        def stream(ids=ids, c=c):
            cache = model.new_cache(ids.shape[0])
            for s in range(0, ids.shape[1], c):
                model(ids[:, s : s + c], cache=cache)

        rates[(b, c)] = ids.numel() / median_time(stream, args.repeats, warmup=1)
    print("| examples × chunk per call | tokens per call | tok/s | ratio to evaluate's shape |")
    print("|---|---|---|---|")
    for (b, c), rate in rates.items():
        mark = " (evaluate's)" if (b, c) == reference else ""
        print(f"| {b} × {c}{mark} | {b * c} | {rate:,.0f} | {rate / rates[reference]:.2f} |")


if __name__ == "__main__":
    main()
