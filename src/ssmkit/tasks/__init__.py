"""ssmkit.tasks: every task behind one interface (``base.Task``).

    selective-copying   data tokens at random positions among noise; recite them (Mamba Table 1)
    induction-heads     recall the token after a trigger; length extrapolation (Mamba Table 11)
    copying             data at fixed positions — the control that LTI models solve
    lm                  next-token prediction on text (``lm``: tokenizer, cached token file, bits per byte)

Each task yields ``Batch(inputs, targets)`` with ``IGNORE`` at unscored positions; see ``base``. The
synthetic ones are generated on the fly from a seed. ``build_task(spec)`` rebuilds a task from the JSON
``spec()`` a checkpoint stores.
"""

from __future__ import annotations

from ssmkit.tasks.base import IGNORE, Batch, Task, masked_loss_sums, mix_seed, shard
from ssmkit.tasks.copying import Copying, CopyingConfig, copying_batch
from ssmkit.tasks.induction_heads import InductionHeads, InductionHeadsConfig, induction_heads_batch
from ssmkit.tasks.lm import LMTask, LMTaskConfig
from ssmkit.tasks.selective_copying import SelectiveCopying, SelectiveCopyingConfig, selective_copying_batch
from ssmkit.utils import config_from_dict

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


def task_from_config(config, verbose: bool = False) -> Task:
    """The task a config dataclass describes (one of ``TASKS``' configs, or ``LMTaskConfig``)."""
    if isinstance(config, LMTaskConfig):
        return LMTask.from_config(config, verbose)
    for cls, cfg_cls in TASKS.values():
        if type(config) is cfg_cls:
            return cls(config)
    known = [c.__name__ for _, c in TASKS.values()] + ["LMTaskConfig"]
    raise ValueError(f"task config: expected one of {known}, got {type(config).__name__}")


def build_task(spec: dict, verbose: bool = False) -> Task:
    """The task a JSON spec (``task.spec()``, stored in checkpoints) describes; for ``lm`` the tokenizer and
    the (cached) token file are rebuilt."""
    name = spec.get("task")
    if name == "lm":
        return LMTask.from_config(
            config_from_dict(LMTaskConfig, spec, "task spec", ignore=("task",)), verbose
        )
    return make_task(name, spec["seq_len"], spec["vocab_size"], spec.get("seed", 0), spec.get("n_tokens", 16))


__all__ = [
    "IGNORE",
    "TASKS",
    "Batch",
    "Copying",
    "CopyingConfig",
    "InductionHeads",
    "InductionHeadsConfig",
    "LMTask",
    "LMTaskConfig",
    "SelectiveCopying",
    "SelectiveCopyingConfig",
    "Task",
    "build_task",
    "copying_batch",
    "induction_heads_batch",
    "make_task",
    "masked_loss_sums",
    "mix_seed",
    "selective_copying_batch",
    "shard",
    "task_from_config",
]
