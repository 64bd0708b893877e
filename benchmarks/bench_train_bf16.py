"""Training step in float32 against bfloat16 autocast, and the machine's bf16 : fp32 matmul ratio.

    python benchmarks/bench_train_bf16.py                        # mamba-130m shape, l = 2048, batch 1
    python benchmarks/bench_train_bf16.py --layers 4 --profile   # where the bf16 step spends its time

One step = forward, next-token cross-entropy, backward, AdamW (fused) and zero_grad, as ``ssmkit train``
does it: the float32 step, then the same step under ``torch.autocast("cpu", torch.bfloat16)`` (what
``ssmkit train --bf16`` runs: float32 master weights and optimiser, bf16 matmuls, the scan's state and
accumulation float32). Random weights, the mamba-130m shape (d_model 768, vocabulary 50280, d_state 16;
--layers of 24). Printed: tokens/s of both (medians of --repeats after a warm-up), their ratio, and the
ratio of the bf16 and fp32 matmul rates in the same process on the LM head's product (l × 768 × 50280),
which bounds what bf16 can gain here (about 2× on AVX512-BF16 without AMX; more with AMX).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from ssmkit import MambaConfig, MambaLM
from ssmkit.bench.machine import cpu_model, median_time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--profile", action="store_true", help="print the top operators of one bf16 step")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = MambaLM(MambaConfig(d_model=768, n_layer=args.layers, vocab_size=50280))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, 50280, (1, args.length + 1))

    def step(bf16: bool):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(ids[:, :-1])  # (1, l, V)
            loss = F.cross_entropy(logits.flatten(0, 1), ids[0, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    shape = f"mamba-130m shape with {args.layers} layers, l = {args.length}"
    print(f"{cpu_model()}, {args.threads} threads, {shape}")
    t32 = median_time(lambda: step(False), args.repeats)
    t16 = median_time(lambda: step(True), args.repeats)
    a32, w32 = torch.randn(args.length, 768), torch.randn(50280, 768)
    a16, w16 = a32.bfloat16(), w32.bfloat16()
    g32 = median_time(lambda: a32 @ w32.t(), 5)
    g16 = median_time(lambda: a16 @ w16.t(), 5)
    print(f"training step float32 : {args.length / t32:8.1f} tokens/s ({t32:.2f} s)")
    print(f"training step bf16    : {args.length / t16:8.1f} tokens/s ({t16:.2f} s)")
    print(f"bf16 / fp32 step      : {t32 / t16:.2f}x   (the LM-head matmul: {g32 / g16:.2f}x)")
    if args.profile:
        from torch.profiler import profile

        with profile() as prof:
            step(True)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))


if __name__ == "__main__":
    main()
