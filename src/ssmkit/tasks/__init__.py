"""ssmkit.tasks: synthetic sequence tasks generated on the fly from a seed.

    selective-copying   data tokens at random positions among noise; recite them (Mamba Table 1)
    induction-heads     recall the token after a trigger; length extrapolation (Mamba Table 11)
    copying             data at fixed positions — the control that LTI models solve

Each task yields ``Batch(inputs, targets)`` with ``IGNORE`` at unscored positions; see ``base``.
"""

from __future__ import annotations

from ssmkit.tasks.base import IGNORE, Batch, Task, masked_loss_sums, mix_seed, shard
from ssmkit.tasks.copying import Copying, CopyingConfig, copying_batch
from ssmkit.tasks.induction_heads import InductionHeads, InductionHeadsConfig, induction_heads_batch
from ssmkit.tasks.selective_copying import SelectiveCopying, SelectiveCopyingConfig, selective_copying_batch

TASKS = {
    "selective-copying": (SelectiveCopying, SelectiveCopyingConfig),
    "induction-heads": (InductionHeads, InductionHeadsConfig),
    "copying": (Copying, CopyingConfig),
}


def make_task(name: str, seq_len: int, vocab_size: int, seed: int = 0, n_tokens: int = 16) -> Task:
    """Build a task by its CLI name. ``n_tokens`` applies to the copying tasks only."""
    if name not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {name!r}")
    cls, cfg_cls = TASKS[name]
    if name == "induction-heads":
        return cls(cfg_cls(seq_len=seq_len, vocab_size=vocab_size, seed=seed))
    return cls(cfg_cls(seq_len=seq_len, n_tokens=n_tokens, vocab_size=vocab_size, seed=seed))


__all__ = [
    "IGNORE",
    "TASKS",
    "Batch",
    "Copying",
    "CopyingConfig",
    "InductionHeads",
    "InductionHeadsConfig",
    "SelectiveCopying",
    "SelectiveCopyingConfig",
    "Task",
    "copying_batch",
    "induction_heads_batch",
    "make_task",
    "masked_loss_sums",
    "mix_seed",
    "selective_copying_batch",
    "shard",
]
