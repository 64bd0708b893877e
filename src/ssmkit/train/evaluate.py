"""Evaluation on fixed validation sets, streaming long sequences through the model's recurrent state.

For a sequence longer than ``chunk_size`` we call ``model(x[:, s:e], cache=cache)`` (ssmkit's one state
protocol: ``SequenceModel``, ``MambaLM``, ``TransformerLM``) chunk after chunk,
scoring only the targets inside each chunk, so memory is O(b · chunk) whatever the length (2^20 tokens
on a laptop; a Transformer's KV cache still grows). The result equals one full forward pass up to float
round-off (tested in the models' own tests: chunked forward == full forward).
"""

from __future__ import annotations

import torch

from ssmkit.tasks.base import Batch, masked_loss_sums

# On a CPU a streamed forward runs fastest when its activations stay in the caches: at most this many
# tokens (examples x chunk) per call. benchmarks/bench_stream_eval.py on an AMD EPYC Zen 4, one thread, the
# 2-layer d_model-64 Mamba of the induction-heads task: 4 x 8192 tokens per call 144k tok/s, 16 x 8192 87k.
CPU_STREAM_TOKENS = 1 << 15


def cpu_stream_batch_size(batch_size: int, chunk_size: int) -> int:
    """Examples per streamed forward on a CPU: ``batch_size``, capped so that examples x ``chunk_size`` is
    at most ``CPU_STREAM_TOKENS`` (at least 1). The chunk is the caller's and is never shortened."""
    return max(1, min(batch_size, CPU_STREAM_TOKENS // chunk_size))


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    data: Batch,
    batch_size: int = 64,
    chunk_size: int | None = None,
    device: torch.device | str = "cpu",
    autocast_bf16: bool = False,
) -> dict:
    """Mean loss and accuracy over the scored positions of ``data``.

    Args:
        model: ``model(ids) -> logits (b, l, V)``; with ``chunk_size`` also ``new_cache(batch)`` and
            ``model(ids, cache=cache)`` (the state protocol; the cache is updated in place).
        data: inputs/targets (n, l).
        batch_size: examples per forward pass (on a CPU, when streaming, at most
            ``cpu_stream_batch_size(batch_size, chunk_size)`` of them).
        chunk_size: stream sequences longer than this in chunks of this many tokens (None: never).
    Returns:
        {"loss": float, "acc": float, "n": int (scored positions)}.
    """
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
    was_training = model.training
    model.eval()
    dev = torch.device(device)
    loss_sum, correct, count = 0.0, 0, 0
    n, l = data.inputs.shape
    if dev.type == "cpu" and chunk_size is not None and l > chunk_size:
        batch_size = cpu_stream_batch_size(batch_size, chunk_size)
    try:
        for i in range(0, n, batch_size):
            x = data.inputs[i : i + batch_size]  # (b, l)
            y = data.targets[i : i + batch_size]  # (b, l)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast_bf16):
                cache = None
                if chunk_size is None or l <= chunk_size:
                    spans = [(0, l)]
                else:
                    spans = [(s, min(s + chunk_size, l)) for s in range(0, l, chunk_size)]
                    cache = model.new_cache(x.shape[0])
                for s, e in spans:
                    logits = model(x[:, s:e].to(dev), cache=cache)  # (b, c, V); the cache advances in place
                    ls, c, k = masked_loss_sums(logits, y[:, s:e].to(dev))
                    loss_sum += ls.item()
                    correct += int(c.item())
                    count += int(k.item())
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("data has no scored positions (all targets are IGNORE)")
    return {"loss": loss_sum / count, "acc": correct / count, "n": count}
