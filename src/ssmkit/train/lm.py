"""Language modelling as a trainer task: random windows of a token corpus, next-token targets.

The trainer (``ssmkit.train.trainer``) only asks a task for ``train_batch(step, b, rank, world)`` and
``validation_set(length, n)`` (see ``ssmkit.tasks.base``). For language modelling

    inputs  = t[i : i + l],   targets = t[i + 1 : i + l + 1]     (every position scored)

with ``i`` uniform over the training split for training batches — drawn from a generator seeded by
(seed, step), so batch ``s`` is a pure function of the seed and ``s`` and a resumed run sees exactly the
batches it would have seen — and the first ``n`` consecutive windows of the validation split for the
validation set (fixed, so every evaluation scores the same tokens).

Reported metrics: the mean cross-entropy in nats per token (the trainer's ``val_loss``) and

    bits per byte = val_loss / ln 2 × (validation tokens) / (validation bytes),

the tokenizer-independent number (for the byte-level tokenizer the ratio is exactly 1). The
tokens/bytes ratio is that of the whole validation split; the validation set scores its first windows.

Glossary: b batch size (per rank), l ``seq_len``, s step, bpb bits per byte.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ssmkit.data.text import DEFAULT_MAX_BYTES, TokenCorpus, Tokenizer
from ssmkit.tasks.base import Batch, make_generator, shard


@dataclass
class LMDataConfig:
    """Where the text comes from and how it is cut; every field is a ``ssmkit train --task lm`` flag."""

    data: str | None = None
    """A text file, a folder, or a glob; None: the Python standard library's sources."""
    seq_len: int = 256
    """Tokens per training window."""
    val_fraction: float = 0.02
    """Fraction of the text (bytes, cut at a line) held out for validation."""
    max_bytes: int = DEFAULT_MAX_BYTES
    """Read at most this many bytes of text."""
    seed: int = 0
    """Seed of the window sampler."""

    def __post_init__(self) -> None:
        if not isinstance(self.seq_len, int) or self.seq_len < 1:
            raise ValueError(f"seq_len must be a positive int, got {self.seq_len!r}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must lie in (0, 1), got {self.val_fraction!r}")
        if not isinstance(self.max_bytes, int) or self.max_bytes < 1:
            raise ValueError(f"max_bytes must be a positive int, got {self.max_bytes!r}")


class LMTask:
    """Next-token prediction on a :class:`~ssmkit.data.text.TokenCorpus` (the trainer's task protocol).

    Args:
        corpus: the tokenised corpus.
        seq_len: window length l.
        seed: sampler seed.
    """

    name = "lm"

    def __init__(self, corpus: TokenCorpus, seq_len: int, seed: int = 0):
        corpus._check_len("train", seq_len)  # ValueError naming seq_len when the split is too short
        self.corpus = corpus
        self.seq_len = seq_len
        self.seed = seed
        self.vocab_size = corpus.meta.vocab_size

    def train_batch(self, step: int, batch_size: int, rank: int = 0, world_size: int = 1) -> Batch:
        """Rank ``rank``'s rows of the global batch of ``step`` (``batch_size`` per rank)."""
        g = make_generator(self.seed, 1, step)
        x, y = self.corpus.sample("train", batch_size * world_size, self.seq_len, g)  # (b·w, l) ×2
        return shard(Batch(x, y), rank, world_size)

    def validation_set(self, length: int, n_examples: int) -> Batch:
        """The first ``n_examples`` consecutive windows of length ``length`` of the validation split (fewer
        when the split is shorter; ValueError when it holds not even one)."""
        pairs = list(self.corpus.iter_windows("val", n_examples, length, max_windows=n_examples))
        x = torch.cat([p[0] for p in pairs])  # (n, l)
        y = torch.cat([p[1] for p in pairs])  # (n, l)
        return Batch(x, y)

    def bits_per_byte(self, loss_nats: float) -> float:
        """Validation loss (nats per token) → bits per byte of validation text."""
        return self.corpus.bits_per_byte(loss_nats, "val")

    def spec(self) -> dict:
        """JSON description stored in checkpoints and the saved model folder."""
        m = self.corpus.meta
        return {
            "task": "lm",
            "source": m.source,
            "token_file": str(self.corpus.bin_path),
            "seq_len": self.seq_len,
            "seed": self.seed,
            "vocab_size": m.vocab_size,
            "n_train": m.n_train,
            "n_val": m.n_val,
            "val_bytes_per_token": self.corpus.bytes_per_token("val"),
        }


def make_lm_task(
    tokenizer: Tokenizer, cfg: LMDataConfig, cache_dir: str | os.PathLike, verbose: bool = True
) -> LMTask:
    """Tokenise (or reuse the cached token file of) ``cfg.data`` under ``cache_dir`` and wrap it."""
    corpus = TokenCorpus.build(
        tokenizer,
        Path(cache_dir),
        cfg.data,
        val_fraction=cfg.val_fraction,
        max_bytes=cfg.max_bytes,
        verbose=verbose,
    )
    return LMTask(corpus, cfg.seq_len, cfg.seed)


def bpb_curve(metrics_path: str | os.PathLike, task: LMTask) -> list[dict]:
    """The validation curve of a run: one {step, val_loss, val_bpb} per eval event of ``metrics.jsonl``."""
    from ssmkit.train.metrics import read_metrics

    return [
        {"step": r["step"], "val_loss": r["val_loss"], "val_bpb": task.bits_per_byte(r["val_loss"])}
        for r in read_metrics(metrics_path)
        if r.get("event") == "eval"
    ]
