"""Selective Copying: remember the data tokens scattered among noise, then recite them in order.

Reference: Gu & Dao, "Mamba" (2023), §3.1 Figure 2, §4.1.1 and Table 1; the layout follows the S4
repository's ``torch_copying_data(L, M, A, variable=True)`` (which the paper likely used — unverified).

Layout of one example (``seq_len`` = L, ``n_tokens`` = M, ``vocab_size`` = V), model input length L + M:

    positions 0 … L-1     noise token 0, except M positions (uniform, distinct, sorted) holding the data
                          tokens d_1 … d_M, each uniform in {1, …, V-2}
    positions L … L+M-1   the marker token V-1 ("now recite")
    targets               d_k at position L+k-1 (k = 1 … M); IGNORE everywhere else

An LTI model (S4, S4D) cannot solve this in general: *where* the data sit varies per example, so a
fixed convolution kernel cannot fetch them; a selective model (S6) can choose to ignore the noise.

Glossary: L = seq_len (the noise+data region), M = n_tokens, V = vocab_size (noise 0, marker V-1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ssmkit.tasks.base import IGNORE, Batch, SyntheticTask


def selective_copying_batch(
    batch_size: int, seq_len: int, n_tokens: int, vocab_size: int, generator: torch.Generator
) -> Batch:
    """Draw ``batch_size`` selective-copying examples (layout in the module docstring).

    Returns:
        Batch with inputs and targets (batch_size, seq_len + n_tokens) int64.
    """
    b, L, M, V = batch_size, seq_len, n_tokens, vocab_size
    if V < 3:
        raise ValueError(f"vocab_size must be >= 3 (noise, marker, one data token), got {V}")
    if not 1 <= M <= L:
        raise ValueError(f"n_tokens must be in [1, seq_len={L}], got {M}")
    data = torch.randint(1, V - 1, (b, M), generator=generator)  # (b, M) in {1..V-2}
    pos = torch.rand(b, L, generator=generator).argsort(dim=1)[:, :M].sort(dim=1).values  # (b, M)
    inputs = torch.zeros(b, L + M, dtype=torch.long)  # (b, L+M) noise = 0
    inputs.scatter_(1, pos, data)
    inputs[:, L:] = V - 1  # markers
    targets = torch.full((b, L + M), IGNORE, dtype=torch.long)  # (b, L+M)
    targets[:, L:] = data
    return Batch(inputs, targets)


@dataclass
class SelectiveCopyingConfig:
    """Selective Copying task (Mamba paper Table 1). Defaults: the CPU-scale setting."""

    seq_len: int = 256
    """L: length of the noise+data region (the paper uses 4096)."""
    n_tokens: int = 16
    """M: data tokens to memorise and recite."""
    vocab_size: int = 16
    """V: tokens 0 (noise), 1…V-2 (data), V-1 (marker)."""
    seed: int = 0
    """Seed of the training stream and the validation sets."""


class SelectiveCopying(SyntheticTask):
    """Seeded Selective Copying stream; see the module docstring for the layout."""

    name = "selective-copying"

    def __init__(self, config: SelectiveCopyingConfig | None = None):
        super().__init__(config or SelectiveCopyingConfig())

    def make_batch(self, n: int, length: int, generator: torch.Generator) -> Batch:
        c = self.config
        return selective_copying_batch(n, length, c.n_tokens, c.vocab_size, generator)
