"""Training settings: ``TrainConfig``, one dataclass whose fields are ``ssmkit train``'s optimisation and
bookkeeping flags (the field docstrings are the flags' help).

Stored in every checkpoint (``asdict``) and read back with ``TrainConfig.from_dict`` when a run resumes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ssmkit.train.schedule import SCHEDULES


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping settings; every field is a ``ssmkit train`` flag.

    The defaults are the synthetic-task recipe measured in docs/results.md (batch 16, lr 1e-3 after 50
    warmup steps, constant until a linear decay over the last 20 % of 12000 steps: Mamba-S6 reaches ≥ 97 %
    on default-size Selective Copying in about 5 minutes on 2 cores); ``ssmkit train --task lm`` has its
    own defaults (``ssmkit.cli.train.LM_DEFAULTS``).

    Invalid values raise a ValueError whose message starts with the field name and a colon.
    """

    steps: int = 12000
    """Total optimiser steps."""
    batch_size: int = 16
    """Global batch size (split evenly over DDP ranks)."""
    lr: float = 1e-3
    """Peak learning rate."""
    ssm_lr: float | None = None
    """Learning rate of the SSM parameters (A, Δ, …); None: same as lr."""
    weight_decay: float = 0.0
    """AdamW weight decay (never applied to SSM parameters, norms and biases)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    schedule: str = "wsd"
    """'wsd' (warmup, constant, then a linear decay to min_lr_ratio·lr over the last 20 % of the steps),
    'constant' (after warmup) or 'cosine' (warmup then cosine decay to min_lr_ratio·lr)."""
    warmup_steps: int = 50
    """Linear warmup steps."""
    min_lr_ratio: float = 0.1
    """Final learning rate of the cosine and wsd schedules as a fraction of lr."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0: off)."""
    bf16: bool = False
    """Run forward/backward under bfloat16 autocast (state and accumulation stay float32)."""
    final_seq_len: int | None = None
    """Train the last final_steps steps on sequences of this length instead of the task's (a length
    curriculum: on Induction Heads a state that leaks over long sequences then costs loss, which at the
    training length it hardly does); None: off."""
    final_steps: int = 0
    """Steps at the end trained at final_seq_len."""
    eval_every: int = 500
    """Evaluate every this many steps (and at the end); 0: only at the end."""
    eval_lengths: list[int] = field(default_factory=list)
    """Validation lengths (empty: the task's training length)."""
    eval_examples: int = 512
    """Examples per validation set."""
    eval_chunk_size: int | None = None
    """Stream validation sequences longer than this through the recurrent state (None: never)."""
    log_every: int = 10
    """Write a training-metrics line every this many steps."""
    ckpt_every: int = 500
    """Save the checkpoint every this many steps (and at the end); 0: only at the end."""
    time_limit_s: float | None = None
    """Stop after this many seconds of training in this call (save, evaluate, return), e.g. for a budget."""
    device: str = "auto"
    """'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', …"""
    progress: bool = True
    """Show a tqdm progress bar (rank 0)."""

    def __post_init__(self):
        self.betas = tuple(self.betas)
        self.eval_lengths = [int(x) for x in self.eval_lengths]
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule: expected one of {SCHEDULES}, got {self.schedule!r}")
        checks = [
            ("steps", self.steps >= 1, ">= 1"),
            ("batch_size", self.batch_size >= 1, ">= 1"),
            ("log_every", self.log_every >= 1, ">= 1"),
            ("eval_examples", self.eval_examples >= 1, ">= 1"),
            ("lr", self.lr > 0, "> 0"),
            ("ssm_lr", self.ssm_lr is None or self.ssm_lr > 0, "> 0 or None"),
            ("weight_decay", self.weight_decay >= 0, ">= 0"),
            ("betas", len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "two numbers in [0, 1)"),
            ("warmup_steps", self.warmup_steps >= 0, ">= 0"),
            ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "in [0, 1]"),
            ("grad_clip", self.grad_clip >= 0, ">= 0 (0: off)"),
            ("final_seq_len", self.final_seq_len is None or self.final_seq_len >= 1, ">= 1 or None"),
            ("final_steps", 0 <= self.final_steps <= self.steps, f"in [0, steps = {self.steps}]"),
            (
                "final_steps",
                (self.final_steps > 0) == (self.final_seq_len is not None),
                "> 0 exactly when final_seq_len is set",
            ),
            ("eval_every", self.eval_every >= 0, ">= 0 (0: only at the end)"),
            ("eval_lengths", all(n >= 1 for n in self.eval_lengths), "lengths >= 1"),
            ("eval_chunk_size", self.eval_chunk_size is None or self.eval_chunk_size >= 1, ">= 1 or None"),
            ("ckpt_every", self.ckpt_every >= 0, ">= 0 (0: only at the end)"),
            ("time_limit_s", self.time_limit_s is None or self.time_limit_s >= 0, ">= 0 or None"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"{name}: expected {expected}, got {getattr(self, name)!r}")

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        """The config stored in a checkpoint header (``asdict``; older headers call eval_chunk_size
        ``eval_chunk``)."""
        data = dict(data)
        if "eval_chunk" in data:
            data["eval_chunk_size"] = data.pop("eval_chunk")
        return cls(**data)
