"""Induction Heads: after a trigger token, recall the token that followed the trigger's first occurrence.

Reference: Gu & Dao, "Mamba" (2023), §4.1.2, Table 2 / Table 11 (trained at 256, tested 2^6 … 2^20);
Olsson et al. (2022). The layout is our reading of "comparable to prior work" (Dao, Fu, Saab et al.
2023, H3) with exactly one trigger occurrence before the query.

Layout of one example (``seq_len`` = L, ``vocab_size`` = V), input length L:

    every position        uniform in {0, …, V-2} (the "ordinary" tokens), except:
    position p            the trigger token V-1, p uniform in {0, …, L-3}
    position p+1          the key k (an ordinary token)
    position L-1          the trigger V-1 again (the query)
    targets               k at position L-1; IGNORE elsewhere

The trigger appears exactly twice, so the answer is well defined; chance accuracy is 1/(V-1).
Solving it at any length needs content-based recall ("what came after the trigger?"), which a selective
state space model can store in its state for as long as needed.

Long validation sequences (2^20 tokens) are generated in one piece as int64 (8 MiB per example);
evaluation streams them through the model's recurrent state in chunks (``ssmkit.train.evaluate``).

Glossary: L = seq_len, V = vocab_size (trigger V-1), p = trigger position, k = key.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ssmkit.tasks.base import IGNORE, Batch, SyntheticTask


def induction_heads_batch(
    batch_size: int, seq_len: int, vocab_size: int, generator: torch.Generator
) -> Batch:
    """Draw ``batch_size`` induction-heads examples (layout in the module docstring); (b, L) int64."""
    b, L, V = batch_size, seq_len, vocab_size
    if V < 3:
        raise ValueError(f"vocab_size must be >= 3 (two ordinary tokens and the trigger), got {V}")
    if L < 3:
        raise ValueError(f"seq_len must be >= 3 (trigger, key, query), got {L}")
    inputs = torch.randint(0, V - 1, (b, L), generator=generator)  # (b, L) ordinary tokens
    p = torch.randint(0, L - 2, (b,), generator=generator)  # (b,) trigger positions in [0, L-3]
    rows = torch.arange(b)
    inputs[rows, p] = V - 1
    inputs[:, L - 1] = V - 1
    key = inputs[rows, p + 1]  # (b,)
    targets = torch.full((b, L), IGNORE, dtype=torch.long)  # (b, L)
    targets[:, L - 1] = key
    return Batch(inputs, targets)


@dataclass
class InductionHeadsConfig:
    """Induction Heads task (Mamba paper Table 11)."""

    seq_len: int = 256
    """L: training sequence length (the paper: 256; tested up to 2^20)."""
    vocab_size: int = 16
    """V: ordinary tokens 0…V-2 and the trigger V-1."""
    seed: int = 0
    """Seed of the training stream and the validation sets."""


class InductionHeads(SyntheticTask):
    """Seeded Induction Heads stream; see the module docstring for the layout."""

    name = "induction-heads"

    def __init__(self, config: InductionHeadsConfig | None = None):
        super().__init__(config or InductionHeadsConfig())

    def make_batch(self, n: int, length: int, generator: torch.Generator) -> Batch:
        c = self.config
        return induction_heads_batch(n, length, c.vocab_size, generator)
