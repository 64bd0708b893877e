"""What every task provides to the trainer: seeded batches, fixed validation sets, and a masked loss.

A task is "anything that yields (inputs, targets) token batches"; the trainer never looks inside. Targets
use ``IGNORE`` (-100, PyTorch's ``ignore_index``) at every position that is not scored, so loss and
accuracy count the answer positions only. The same contract serves language modelling
(``ssmkit.tasks.lm``: targets = inputs shifted by one, all positions scored).

Besides batches, a task describes itself as a JSON ``spec()`` (stored in checkpoints; ``build_task``
rebuilds the task from it), may derive extra numbers from a validation loss (``eval_metrics``: bits per
byte for language modelling) and may write what a finished run leaves for users (``export``: a
``save_pretrained`` folder with its tokenizer for language modelling).

Determinism: the training batch of step ``s`` is a pure function of ``(seed, s)`` — not of an RNG that
advances — so a resumed run sees exactly the batches it would have seen, and under DDP each rank takes
its own slice of the same global batch (distinct data per rank, identical to one process).

Glossary:
    b            batch size (global = per-rank × world size)
    l            sequence length of the model input
    V            vocab_size
    IGNORE       target value of unscored positions
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE = -100


@dataclass
class Batch:
    """One batch of token sequences and their targets."""

    inputs: Tensor  # (b, l) int64 token ids
    targets: Tensor  # (b, l) int64 target ids, IGNORE where unscored

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.inputs.to(device), self.targets.to(device))


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from several integers (hash, so nearby inputs give unrelated streams)."""
    h = hashlib.blake2b(",".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def make_generator(*parts: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(mix_seed(*parts))
    return g


def shard(batch: Batch, rank: int, world_size: int) -> Batch:
    """Rows ``[rank·b/w, (rank+1)·b/w)`` of a global batch: rank ``r``'s share under DDP."""
    b = batch.inputs.shape[0]
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if b % world_size:
        raise ValueError(f"global batch size {b} must be divisible by world_size {world_size}")
    per = b // world_size
    return Batch(batch.inputs[rank * per : (rank + 1) * per], batch.targets[rank * per : (rank + 1) * per])


class Task(Protocol):
    """The interface the trainer and ``ssmkit eval`` use."""

    name: str
    vocab_size: int
    seq_len: int

    def train_batch(
        self, step: int, batch_size: int, rank: int = 0, world_size: int = 1, length: int | None = None
    ) -> Batch:
        """Rank ``rank``'s share of the global training batch of ``step`` (a pure function of seed, step),
        of sequences of ``length`` (None: the task's ``seq_len``)."""
        ...

    def validation_set(self, length: int, n_examples: int) -> Batch:
        """A fixed, seeded validation set at (region) length ``length``."""
        ...

    def spec(self) -> dict:
        """JSON description from which ``ssmkit.tasks.build_task`` rebuilds this task."""
        ...

    def eval_metrics(self, val_loss: float) -> dict[str, float]:
        """Extra numbers derived from a validation loss, logged beside it ({} when there are none)."""
        ...

    def export(self, model: torch.nn.Module, folder: Path) -> Path | None:
        """Write what a finished run leaves for users into ``folder``; None when the task has nothing."""
        ...


class SyntheticTask:
    """The seeded stream shared by the synthetic tasks. A subclass sets ``name`` and implements
    ``make_batch(n, length, generator)``; its config has ``seq_len``, ``vocab_size`` and ``seed``.

    Training batch of ``step``: drawn from generator (seed, 1, step), the global batch then sharded by rank.
    Validation set: drawn from generator (seed, 2, length, n_examples), so it is fixed per length.
    """

    name: str

    def __init__(self, config):
        self.config = config
        self.make_batch(1, config.seq_len, torch.Generator())  # validates the configuration
        self.vocab_size = config.vocab_size
        self.seq_len = config.seq_len

    def make_batch(self, n: int, length: int, generator: torch.Generator) -> Batch:
        raise NotImplementedError

    def train_batch(
        self, step: int, batch_size: int, rank: int = 0, world_size: int = 1, length: int | None = None
    ) -> Batch:
        g = make_generator(self.config.seed, 1, step)
        n = batch_size * world_size
        return shard(self.make_batch(n, length or self.config.seq_len, g), rank, world_size)

    def validation_set(self, length: int, n_examples: int) -> Batch:
        g = make_generator(self.config.seed, 2, length, n_examples)
        return self.make_batch(n_examples, length, g)

    def spec(self) -> dict:
        """{"task", "seq_len", "vocab_size", "seed", "n_tokens"} (n_tokens 16 where the task has none)."""
        c = self.config
        return {
            "task": self.name,
            "seq_len": c.seq_len,
            "vocab_size": c.vocab_size,
            "seed": c.seed,
            "n_tokens": getattr(c, "n_tokens", 16),
        }

    def eval_metrics(self, val_loss: float) -> dict[str, float]:
        return {}

    def export(self, model: torch.nn.Module, folder: Path) -> Path | None:
        return None  # the checkpoint is the artefact


def masked_loss_sums(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Cross-entropy and accuracy over the scored positions only.

    Args:
        logits: (b, l, V) any float dtype (computed in float32).
        targets: (b, l) int64, IGNORE where unscored.
    Returns:
        (loss_sum, n_correct, n_scored): summed cross-entropy (float32, differentiable), number of scored
        positions whose argmax equals the target, number of scored positions (both int64 scalars).
    """
    if logits.dim() != 3 or logits.shape[:2] != targets.shape:
        raise ValueError(
            f"logits must be (b, l, V) matching targets (b, l), got {tuple(logits.shape)} and "
            f"{tuple(targets.shape)}"
        )
    mask = targets != IGNORE  # (b, l)
    picked = logits[mask].float()  # (k, V)
    tgt = targets[mask]  # (k,)
    loss_sum = F.cross_entropy(picked, tgt, reduction="sum")  # ()
    n_correct = (picked.argmax(-1) == tgt).sum()  # ()
    return loss_sum, n_correct, mask.sum()
