"""Plain Copying: the control task — data at *fixed* positions, solvable without selection.

Reference: Gu & Dao, "Mamba" (2023), §3.1 Figure 2 (left): "the standard version of the Copying task
involves constant spacing between input and output elements and is easily solved by time-invariant
models such as linear recurrences and global convolutions".

Layout of one example (``seq_len`` = L, ``n_tokens`` = M, ``vocab_size`` = V), input length L + M:

    positions 0 … M-1     data tokens d_1 … d_M, each uniform in {1, …, V-2}
    positions M … L-1     noise token 0
    positions L … L+M-1   marker token V-1
    targets               d_k at position L+k-1; IGNORE elsewhere

Each answer sits exactly L positions after its data token, so one fixed kernel (a delay by L) solves it.
Glossary: as in ``selective_copying``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ssmkit.tasks.base import IGNORE, Batch, SyntheticTask


def copying_batch(
    batch_size: int, seq_len: int, n_tokens: int, vocab_size: int, generator: torch.Generator
) -> Batch:
    """Draw ``batch_size`` copying examples (layout in the module docstring); (b, L + M) int64 tensors."""
    b, L, M, V = batch_size, seq_len, n_tokens, vocab_size
    if V < 3:
        raise ValueError(f"vocab_size must be >= 3 (noise, marker, one data token), got {V}")
    if not 1 <= M <= L:
        raise ValueError(f"n_tokens must be in [1, seq_len={L}], got {M}")
    data = torch.randint(1, V - 1, (b, M), generator=generator)  # (b, M)
    inputs = torch.zeros(b, L + M, dtype=torch.long)  # (b, L+M)
    inputs[:, :M] = data
    inputs[:, L:] = V - 1
    targets = torch.full((b, L + M), IGNORE, dtype=torch.long)  # (b, L+M)
    targets[:, L:] = data
    return Batch(inputs, targets)


@dataclass
class CopyingConfig:
    """Plain Copying task (the non-selective control)."""

    seq_len: int = 256
    """L: data + noise region length; each answer is L positions after its token."""
    n_tokens: int = 16
    """M: data tokens to copy."""
    vocab_size: int = 16
    """V: tokens 0 (noise), 1…V-2 (data), V-1 (marker)."""
    seed: int = 0
    """Seed of the training stream and the validation sets."""


class Copying(SyntheticTask):
    """Seeded Copying stream; see the module docstring for the layout."""

    name = "copying"

    def __init__(self, config: CopyingConfig | None = None):
        super().__init__(config or CopyingConfig())

    def make_batch(self, n: int, length: int, generator: torch.Generator) -> Batch:
        c = self.config
        return copying_batch(n, length, c.n_tokens, c.vocab_size, generator)
