"""SSD (Mamba-2 scan) benchmark: ssmkit's chunked backend against the CPU Mamba-2 scans people use today.

One layer-call of the mamba2-130m shape: b=1, h=24 heads of p=64, n=128, one group, float32,
softplus(Δ + dt_bias), the D skip, at l ∈ {512, 2048, 8192}, forward and forward+backward (a loss on y
back to x, Δ, A, B, C, D and dt_bias). All implementations run side by side in one process with the
same thread count (2 by default); each number is the median of the timed runs after one warm-up:

    ours (chunk L)        ssmkit's chunked backend at chunk length L             pure PyTorch, block form
    transformers          transformers' ``mamba2_chunk_scan`` torch path (Mamba2Mixer's CPU path), L=256
    Listing 1             Dao & Gu (2024) Listing 1, the literal transcription tests/test_ssd.py checks
                          against, on pre-discretised inputs (Δ, softplus and D done outside), L=256

The "GEMM" line is the machine's float32 matmul rate (a 2048³ product, best of 5); "% GEMM" in the table
is the useful flops of the block decomposition at that chunk length (C Bᵀ, the diagonal blocks, the chunk
states, the state-to-output products; 2 flops per multiply-add) over the time, against that rate.

    python benchmarks/bench_ssd.py                              # l = 512 2048 8192, fwd and fwd+bwd
    python benchmarks/bench_ssd.py --lengths 2048 --repeats 3   # a short check
    python benchmarks/bench_ssd.py --threads 1 --clock cpu      # steadier on a shared machine
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ssmkit.bench.machine import cpu_model, median_time

H, P, N, G = 24, 64, 128, 1


def listing1():
    """The test suite's literal Listing-1 transcription (so exactly the checked code is timed)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_ssd import listing1_ssd

    return listing1_ssd


def make_inputs(l: int, requires_grad: bool, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    kw = dict(
        x=torch.randn(1, l, H, P, generator=gen),
        dt=torch.randn(1, l, H, generator=gen) - 2.0,
        A=-torch.empty(H).uniform_(1, 16, generator=gen),
        B=torch.randn(1, l, G, N, generator=gen),
        C=torch.randn(1, l, G, N, generator=gen),
        D=torch.randn(H, generator=gen),
        dt_bias=torch.randn(H, generator=gen) * 0.1,
    )
    for v in kw.values():
        v.requires_grad_(requires_grad)
    return kw


def run_ours(kw: dict, chunk: int) -> torch.Tensor:
    """ssmkit's chunked backend at exactly ``chunk`` (``ssd`` itself would cap it at cpu_chunk_size)."""
    from ssmkit.scan.ssd import process_dt
    from ssmkit.scan.ssd_chunked import ssd_chunked

    delta = process_dt(kw["dt"], kw["dt_bias"], True, (0.0, float("inf")), torch.float32)
    return ssd_chunked(kw["x"], delta, kw["A"], kw["B"], kw["C"], chunk, kw["D"])[0]


def run_transformers(kw: dict, chunk: int) -> torch.Tensor:
    from transformers.models.mamba2.modeling_mamba2 import mamba2_chunk_scan

    return mamba2_chunk_scan(
        kw["x"], kw["dt"], kw["A"], kw["B"], kw["C"], chunk_size=chunk, D=kw["D"], dt_bias=kw["dt_bias"],
        dt_softplus=True,
    )  # fmt: skip


def run_listing1(kw: dict, chunk: int) -> torch.Tensor:
    fn = listing1()
    x = kw["x"]
    b, l, h, p = x.shape
    delta = F.softplus(kw["dt"] + kw["dt_bias"])  # (b, l, h)
    pad = (-l) % chunk
    X = F.pad(x * delta[..., None], (0, 0, 0, 0, 0, pad))
    A = F.pad(kw["A"] * delta, (0, 0, 0, pad))
    B = F.pad(kw["B"].repeat_interleave(h // G, dim=2), (0, 0, 0, 0, 0, pad))
    C = F.pad(kw["C"].repeat_interleave(h // G, dim=2), (0, 0, 0, 0, 0, pad))
    Y, _ = fn(X, A, B, C, chunk)
    return Y[:, :l] + x * kw["D"][:, None]


def useful_gflop(l: int, chunk: int) -> float:
    L = min(chunk, l)
    return 2 * (l * L * N * G + l * L * H * P + 2 * l * H * P * N) / 1e9


def time_call(fn, kw: dict, chunk: int, backward: bool, repeats: int, clock) -> float:
    def once():
        y = fn(kw, chunk)
        if backward:
            y.sum().backward()
            for v in kw.values():
                v.grad = None

    return median_time(once, repeats, clock=clock)  # after one warm-up call


def gemm_gflops(clock) -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    best = min(_timed(lambda: a @ b, clock) for _ in range(5))
    return 2 * 2048**3 / best / 1e9


def _timed(fn, clock) -> float:
    t0 = clock()
    fn()
    return clock() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--chunks", type=int, nargs="+", default=[64, 256], help="ssmkit chunk lengths")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    parser.add_argument(
        "--clock", choices=["wall", "cpu"], default="wall",
        help="wall time, or process CPU time (summed over threads; steadier on a shared machine)",
    )  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    print(f"CPU: {cpu_model()}; torch {torch.__version__}; {args.threads} threads; load average "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}")  # fmt: skip
    rate = gemm_gflops(clock)
    print(f"GEMM: float32 2048³ matmul {rate:.1f} GFLOP/s ({args.clock} clock)")
    print(f"shape: b=1 h={H} p={P} n={N} g={G}, float32, softplus(dt + dt_bias), D; median of {args.repeats}")
    impls = [(f"ours (chunk {c})", run_ours, c) for c in args.chunks]
    impls += [
        ("transformers (chunk 256)", run_transformers, 256),
        ("Listing 1 (chunk 256)", run_listing1, 256),
    ]
    header = (
        f"{'mode':8} {'l':>6}  {'implementation':26} {'ms':>10} {'tok/s':>10} {'% GEMM':>7} {'vs ours':>8}"
    )
    print(header)
    print("-" * len(header))
    for mode in args.modes:
        backward = mode == "fwd+bwd"
        for l in args.lengths:
            kw = make_inputs(l, requires_grad=backward)
            first = None
            for name, fn, chunk in impls:
                t = time_call(fn, kw, chunk, backward, args.repeats, clock)
                first = first or t
                flop = useful_gflop(l, chunk) * (3 if backward else 1)  # backward ≈ twice the forward GEMMs
                share, rel = 100 * flop / t / rate, t / first
                row = (
                    f"{mode:8} {l:>6}  {name:26} {t * 1e3:>10.1f} {l / t:>10.0f} {share:>6.0f}% {rel:>7.2f}x"
                )
                print(row, flush=True)


if __name__ == "__main__":
    main()
