"""Decode benchmark: ssmkit's fused decode step (fp32 / bf16 / int8 weights) against its module path and
transformers' ``MambaForCausalLM.generate``, on the mamba-130m shape, in one process.

Shape: d_model 768, 24 layers, vocabulary 50280 (padded to 50280), d_state 16, random weights (seed 0),
tied embeddings. Greedy decoding (argmax of each step's logits fed back), batch 1 and 16, 2 threads by
default. Each row is the MEDIAN over ``--repeats`` runs of ``--steps`` tokens after a warm-up (the machine
may be shared: medians, with the best run beside them):

    module        MambaLM.forward(token, cache=cache) layer by layer (inside engine.disabled());
                  ``--module-steps`` tokens per run (it is slow: an int8 model dequantizes every weight)
    fused         ssmkit.engine.decode_step — what MambaLM.forward does for one token without autograd
    transformers  MambaForCausalLM.generate(max_new_tokens = k + 2·steps) minus generate(k), back to back:
                  decode only (its prefill and set-up cancel); float32 and bfloat16 (it has no int8)

The weight-bandwidth limit: the machine's read bandwidth is measured as the best rate of 21 ``torch.sum``
calls over a 256 MiB float32 tensor (same threads; the median is printed too); reading every weight
once per step at that rate takes ``weight bytes / bandwidth`` — the floor of a batch-1 step. (The fused
matrix-vector product can read faster than ``torch.sum`` does; then "% limit" exceeds 100.) The LM head
alone is also timed through the fused kernel's matrix-vector product and through torch (``F.linear``).

    python benchmarks/bench_decode_engine.py                       # everything, ~5 minutes (quiet machine)
    python benchmarks/bench_decode_engine.py --batch 1 --paths fused --dtypes bf16,int8
    python benchmarks/bench_decode_engine.py --json out.json       # also write the rows
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from ssmkit import engine
from ssmkit.bench.machine import cpu_model, median_time, read_bandwidth, weight_bytes
from ssmkit.engine import decode as decode_mod
from ssmkit.models.config import MambaConfig
from ssmkit.models.mamba_lm import MambaLM
from ssmkit.utils import atomic_write_text, parse_list

PATHS = ("module", "fused", "transformers")
DTYPES = ("fp32", "bf16", "int8")
VOCAB = 50280


def ssmkit_model(dtype: str) -> MambaLM:
    torch.manual_seed(0)
    model = MambaLM(MambaConfig(d_model=768, n_layer=24, vocab_size=VOCAB)).eval()
    if dtype == "bf16":
        model.to(torch.bfloat16)
    elif dtype == "int8":
        engine.quantize(model, "int8")
    return model


def time_greedy(step, new_cache, b: int, steps: int, repeats: int) -> list[float]:
    """ms per token of each run of ``steps`` greedy steps (after 4 warm-up steps)."""
    cache = new_cache(b)
    tok = torch.zeros(b, 1, dtype=torch.long)  # (b, 1)
    runs = []
    with torch.no_grad():
        for _ in range(4):
            tok = step(tok, cache)[:, -1, :VOCAB].argmax(-1, keepdim=True)
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(steps):
                tok = step(tok, cache)[:, -1, :VOCAB].argmax(-1, keepdim=True)  # (b, 1)
            runs.append((time.perf_counter() - t0) / steps * 1e3)
    return runs


def time_module(model: MambaLM, b: int, steps: int, repeats: int) -> list[float]:
    def step(tok, cache):
        with engine.disabled():
            return model(tok, cache=cache)

    return time_greedy(step, model.new_cache, b, steps, repeats)


def time_fused(model: MambaLM, b: int, steps: int, repeats: int) -> list[float]:
    return time_greedy(
        lambda tok, cache: engine.decode_step(model, tok, cache), model.new_cache, b, steps, repeats
    )


def transformers_model(dtype: str):
    from transformers import MambaConfig as HFConfig
    from transformers import MambaForCausalLM

    torch.manual_seed(0)
    cfg = HFConfig(hidden_size=768, num_hidden_layers=24, vocab_size=VOCAB, state_size=16, expand=2)
    model = MambaForCausalLM(cfg).eval()
    return model.to(torch.bfloat16) if dtype == "bf16" else model


def time_transformers(model, b: int, steps: int, repeats: int) -> list[float]:
    """ms per decoded token: (generate(base + 2·steps) − generate(base)) / (2·steps), the two timed back
    to back ``repeats`` times; returns [median of the differences, smallest difference]."""
    ids = torch.zeros(b, 4, dtype=torch.long)
    base, n = 4, 2 * steps

    def gen(k: int) -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=k, min_new_tokens=k, do_sample=False, pad_token_id=0)
        return time.perf_counter() - t0

    gen(base)  # warm-up
    diffs = []
    for _ in range(repeats):
        short = gen(base)
        diffs.append((gen(base + n) - short) / n * 1e3)
    return [statistics.median(diffs), min(diffs)]


def time_head(dtype: str, repeats: int = 9) -> dict:
    """GB/s of the LM head (50280 × 768) for one row: the fused kernel's GEMV and torch's F.linear."""
    torch.manual_seed(0)
    w = torch.randn(VOCAB, 768) * 0.02
    x = torch.randn(1, 768)
    ext = decode_mod.extension()
    if dtype == "int8":
        q, s = engine.quantize_rows(w)
        ours = lambda: ext.gemv(q, s, x, "auto")  # noqa: E731
        theirs = lambda: F.linear(x, q.float() * s[:, None])  # noqa: E731  (torch has no int8 GEMV)
        nbytes = q.nbytes + s.nbytes
    else:
        wt = w.to(torch.bfloat16) if dtype == "bf16" else w
        xt = x.to(wt.dtype)
        ours = lambda: ext.gemv(wt, torch.empty(0), x, "auto")  # noqa: E731
        theirs = lambda: F.linear(xt, wt)  # noqa: E731
        nbytes = wt.nbytes
    result = {}
    for name, fn in (("fused gemv", ours), ("torch F.linear", theirs)):
        result[name] = nbytes / median_time(fn, repeats) / 1e9
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", default="1,16", help="batch sizes, comma-separated")
    ap.add_argument("--dtypes", default=",".join(DTYPES), help=f"weight precisions among {DTYPES}")
    ap.add_argument("--paths", default=",".join(PATHS), help=f"implementations among {PATHS}")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--steps", type=int, default=16, help="tokens per timed run")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per row (the median is reported)")
    ap.add_argument("--module-steps", type=int, default=4, help="tokens per timed run of the module path")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = ap.parse_args(argv)
    batches = parse_list(args.batch, int, "--batch")
    dtypes = parse_list(args.dtypes, str, "--dtypes")
    paths = parse_list(args.paths, str, "--paths")
    for name, values, allowed in (("--dtypes", dtypes, DTYPES), ("--paths", paths, PATHS)):
        bad = [v for v in values if v not in allowed]
        if bad:
            raise SystemExit(f"error: {name}: expected values among {allowed}, got {bad}")
    if min(args.threads, args.steps, args.repeats, args.module_steps) < 1:
        raise SystemExit("error: --threads, --steps, --module-steps and --repeats must be >= 1")
    torch.set_num_threads(args.threads)

    cpu = cpu_model()
    bw_median, bw_best = read_bandwidth()
    isa = engine.available_isas()[0]
    print(f"CPU: {cpu}; {args.threads} threads; torch {torch.__version__}; kernel variant {isa}")
    print(f"read bandwidth (torch.sum of 256 MiB): median {bw_median:.1f} GB/s, best {bw_best:.1f} GB/s")
    print(f"medians over {args.repeats} runs of {args.steps} greedy tokens (best run in brackets)\n")
    rows = []
    names = ("path", "weights", "batch", "ms/token", "tok/s", "limit ms", "% limit")
    header = "{:<13} {:<7} {:>5} {:>18} {:>8} {:>9} {:>8}".format(*names)
    print(header)
    print("-" * len(header))
    for dtype in dtypes:
        model = ssmkit_model(dtype)
        nbytes = weight_bytes(model)
        limit_ms = nbytes / (bw_best * 1e9) * 1e3  # the best rate: what the memory can give
        hf = None
        for b in batches:
            for path in paths:
                if path == "transformers":
                    if dtype == "int8":
                        continue
                    try:
                        hf = hf or transformers_model(dtype)
                    except ImportError:
                        print(f"{path:<13} {dtype:<7} {b:>5}  (transformers is not installed)")
                        continue
                    runs = time_transformers(hf, b, args.steps, args.repeats)
                    med, best = runs
                elif path == "module":
                    runs = time_module(model, b, args.module_steps, args.repeats)
                else:
                    runs = time_fused(model, b, args.steps, args.repeats)
                if path != "transformers":
                    med, best = statistics.median(runs), min(runs)
                share = 100 * limit_ms / med
                row = dict(path=path, weights=dtype, batch=b, ms_per_token=med, best_ms=best)
                row.update(tok_s=b * 1e3 / med, limit_ms=limit_ms, pct_limit=share, weight_bytes=nbytes)
                rows.append(row)
                print(
                    f"{path:<13} {dtype:<7} {b:>5} {med:>9.2f} [{best:>6.2f}] {row['tok_s']:>8.1f} "
                    f"{limit_ms:>9.2f} {share:>7.0f}%"
                )
        del model, hf
    print("\nLM head (50280 x 768), one row, GB/s (median of 9):")
    heads = {}
    for dtype in dtypes:
        heads[dtype] = time_head(dtype)
        print("  " + dtype + ": " + ", ".join(f"{k} {v:.1f}" for k, v in heads[dtype].items()))
    if args.json:
        meta = dict(cpu=cpu, threads=args.threads, bandwidth_gb_s=bw_median, bandwidth_best_gb_s=bw_best,
                    steps=args.steps, repeats=args.repeats, torch=torch.__version__)  # fmt: skip
        atomic_write_text(args.json, json.dumps({"meta": meta, "rows": rows, "head_gb_s": heads}, indent=1))


if __name__ == "__main__":
    main()
