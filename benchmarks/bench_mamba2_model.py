"""Whole Mamba-2 language model on the CPU: ssmkit's MambaLM(Mamba2Config) against transformers'
Mamba2ForCausalLM (its torch path), side by side in one process, the same random weights.

    python benchmarks/bench_mamba2_model.py [--threads 2] [--length 2048] [--repeats 3]

Shape: mamba2-130m (d_model 768, 24 layers, d_state 128, headdim 64, expand 2, vocab 50288). Measured:
prefill of ``--length`` tokens (no autograd; tokens/s), one-token decode (ms/token, 32 steps after a
short prefill), and a training step (forward + backward of ``--length`` tokens, batch 1; tokens/s, and the
peak resident memory it adds above the model's), each the median of ``--repeats``. Also printed: the
machine's float32 GEMM rate in the same process (the limit the prefill and the training step are bounded
by). Both models have the checkpoints' chunk_size 256, which ssmkit's CPU backend caps at
``cpu_chunk_size`` (64 here; the same outputs, faster on a CPU).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from ssmkit.bench.machine import median_time


def gemm_gflops(n: int = 1024, reps: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


def peak_rss_mib_during(fn) -> float:
    """Peak resident memory (MiB) above the level before, while ``fn`` runs (Linux: VmHWM after a reset)."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # resets VmHWM to the current RSS
    before = _status_mib("VmRSS")
    fn()
    return _status_mib("VmHWM") - before


def _status_mib(key: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(key)


def measure(model, is_ours: bool, ids, repeats: int) -> tuple[float, float, float, float]:
    """(prefill tokens/s, decode ms/token, training-step tokens/s, its peak extra MiB) of one model."""

    def call(x):
        return model(x) if is_ours else model(x, use_cache=False).logits

    with torch.no_grad():
        prefill = median_time(lambda: call(ids), repeats)

    def decode() -> float:
        with torch.no_grad():
            if is_ours:
                cache = model.new_cache(1)
                model(ids[:, :16], cache=cache)
                t = time.perf_counter()
                for i in range(32):
                    model(ids[:, 16 + i : 17 + i], cache=cache)
                return (time.perf_counter() - t) / 32
            out = model(ids[:, :16], use_cache=True)
            t = time.perf_counter()
            for i in range(32):
                pos = torch.tensor([16 + i])
                out = model(
                    ids[:, 16 + i : 17 + i], cache_params=out.cache_params, use_cache=True, cache_position=pos
                )
            return (time.perf_counter() - t) / 32

    step = statistics.median(decode() for _ in range(repeats))

    def train() -> None:
        model.zero_grad(set_to_none=True)
        call(ids).float().logsumexp(-1).mean().backward()

    model.train()
    train_s = median_time(train, repeats)
    model.zero_grad(set_to_none=True)
    peak = peak_rss_mib_during(train)
    model.zero_grad(set_to_none=True)
    model.eval()
    return ids.shape[1] / prefill, step * 1e3, ids.shape[1] / train_s, peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--layers", type=int, default=24)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    import transformers

    from ssmkit import Mamba2Config, MambaLM

    cfg = Mamba2Config(d_model=768, n_layer=args.layers, vocab_size=50288, d_state=128, headdim=64)
    ours = MambaLM(cfg).eval()
    with tempfile.TemporaryDirectory() as folder:
        ours.save_pretrained(folder)
        theirs = transformers.Mamba2ForCausalLM.from_pretrained(folder).eval()
    n_params = sum(p.numel() for p in ours.parameters())
    ids = torch.randint(0, cfg.vocab_size, (1, args.length))
    print(
        f"mamba2-130m shape, {args.layers} layers, {n_params / 1e6:.1f} M parameters, {args.threads} threads"
    )
    print(f"float32 GEMM rate in this process: {gemm_gflops():.0f} GFLOP/s")

    rows = [(name, *measure(model, model is ours, ids, args.repeats)) for name, model in (
        ("ssmkit", ours), ("transformers", theirs))]  # fmt: skip
    header = f"{'prefill tok/s':>14s} {'decode ms/token':>16s} {'train step tok/s':>17s} {'peak MiB':>9s}"
    print(f"\n{'':18s} {header}")
    for name, pf, dec, tr, mib in rows:
        print(f"{name:18s} {pf:14.0f} {dec:16.1f} {tr:17.0f} {mib:9.0f}")
    base = rows[-1]
    for name, pf, dec, tr, _ in rows[:-1]:
        ratios = f"prefill {pf / base[1]:.2f}x, decode {base[2] / dec:.2f}x, train {tr / base[3]:.2f}x"
        print(f"{name}: {ratios} transformers")


if __name__ == "__main__":
    main()
