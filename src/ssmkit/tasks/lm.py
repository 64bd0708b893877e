"""Language modelling as a task: random windows of a token corpus, next-token targets.

The trainer only asks a task for ``train_batch(step, b, rank, world)`` and ``validation_set(length, n)``
(see ``ssmkit.tasks.base``). For language modelling

    inputs  = t[i : i + l],   targets = t[i + 1 : i + l + 1]     (every position scored)

with ``i`` uniform over the training split for training batches — drawn from a generator seeded by
(seed, step), so batch ``s`` is a pure function of the seed and ``s`` and a resumed run sees exactly the
batches it would have seen — and the first ``n`` consecutive windows of the validation split for the
validation set (fixed, so every evaluation scores the same tokens).

Reported metrics: the mean cross-entropy in nats per token (the trainer's ``val_loss``) and

    bits per byte = val_loss / ln 2 × (validation tokens) / (validation bytes),

the tokenizer-independent number (for the byte-level tokenizer the ratio is exactly 1). The
tokens/bytes ratio is that of the whole validation split; the validation set scores its first windows.

A finished run exports the model with ``save_pretrained``, the tokenizer files beside it (for bytes a
byte-level ``tokenizer.json``) and a ``generation_config.json``, so that ``ssmkit generate FOLDER`` and
``transformers`` (``AutoTokenizer``, the text-generation pipeline) load the folder as it is.

Glossary: b batch size (per rank), l ``seq_len``, s step, bpb bits per byte.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from ssmkit.data.text import DEFAULT_MAX_BYTES, TokenCorpus
from ssmkit.data.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer, save_byte_tokenizer
from ssmkit.models.hub import TOKENIZER_FILES
from ssmkit.tasks.base import Batch, make_generator, shard
from ssmkit.utils import atomic_write_bytes, atomic_write_text


@dataclass
class LMTaskConfig:
    """Where the text comes from and how it is cut; every field is a ``ssmkit train --task lm`` flag."""

    data: str | None = None
    """A text file, a folder, or a glob; None: the Python standard library's sources."""
    tokenizer: str | None = None
    """A tokenizer.json file (or a folder holding one); None: bytes (vocabulary 256)."""
    seq_len: int = 256
    """Tokens per training window."""
    val_fraction: float = 0.02
    """Fraction of the text (bytes, cut at a line) held out for validation."""
    max_bytes: int = DEFAULT_MAX_BYTES
    """Read at most this many bytes of text."""
    seed: int = 0
    """Seed of the window sampler."""
    token_cache: str | None = None
    """Folder of tokenised corpora; None: token-cache beside the run's output folder."""

    def __post_init__(self) -> None:
        if not isinstance(self.seq_len, int) or self.seq_len < 1:
            raise ValueError(f"seq_len: expected a positive int, got {self.seq_len!r}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction: expected a number in (0, 1), got {self.val_fraction!r}")
        if not isinstance(self.max_bytes, int) or self.max_bytes < 1:
            raise ValueError(f"max_bytes: expected a positive int, got {self.max_bytes!r}")

    def resolved(self, out_dir: str | os.PathLike) -> LMTaskConfig:
        """Paths made absolute (so a resumed run finds them from anywhere) and the token cache placed beside
        ``out_dir`` when not given; globs and None stay as given."""
        data = self.data
        if data is not None and Path(data).expanduser().exists():
            data = str(Path(data).expanduser().resolve())
        tokenizer = None if self.tokenizer is None else str(Path(self.tokenizer).expanduser().resolve())
        cache = (
            Path(self.token_cache)
            if self.token_cache is not None
            else Path(out_dir).resolve().parent / "token-cache"
        )
        return replace(self, data=data, tokenizer=tokenizer, token_cache=str(cache.resolve()))


def lm_tokenizer(path: str | os.PathLike | None) -> Tokenizer:
    """Bytes when ``path`` is None, else the tokenizer at ``path`` (a tokenizer.json file, or a folder
    holding one; FileNotFoundError otherwise)."""
    if path is None:
        return ByteTokenizer()
    return load_tokenizer(path, required=True)


class LMTask:
    """Next-token prediction on a :class:`~ssmkit.data.text.TokenCorpus` (the trainer's task interface).

    Build it from its config with :meth:`from_config`, or wrap a corpus directly.

    Args:
        corpus: the tokenised corpus.
        seq_len: window length l.
        seed: sampler seed.
        tokenizer: the tokenizer that made ``corpus`` (exported with the trained model).
        config: the config it was built from (its ``spec()``); None for a corpus wrapped directly.
    """

    name = "lm"

    def __init__(
        self,
        corpus: TokenCorpus,
        seq_len: int,
        seed: int = 0,
        tokenizer: Tokenizer | None = None,
        config: LMTaskConfig | None = None,
    ):
        corpus._check_len("train", seq_len)  # ValueError naming seq_len when the split is too short
        self.corpus = corpus
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.seed = seed
        self.config = config
        self.vocab_size = corpus.meta.vocab_size

    @classmethod
    def from_config(cls, config: LMTaskConfig, verbose: bool = False) -> LMTask:
        """Load the tokenizer, tokenise (or reuse the cached token file of) the text, and wrap it."""
        if config.token_cache is None:
            raise ValueError(
                "token_cache: expected a folder (LMTaskConfig.resolved(out_dir) sets one), got None"
            )
        tokenizer = lm_tokenizer(config.tokenizer)
        corpus = TokenCorpus.build(
            tokenizer,
            Path(config.token_cache),
            config.data,
            val_fraction=config.val_fraction,
            max_bytes=config.max_bytes,
            verbose=verbose,
        )
        return cls(corpus, config.seq_len, config.seed, tokenizer, config)

    def train_batch(
        self, step: int, batch_size: int, rank: int = 0, world_size: int = 1, length: int | None = None
    ) -> Batch:
        """Rank ``rank``'s rows of the global batch of ``step`` (``batch_size`` per rank), windows of
        ``length`` tokens (None: ``seq_len``)."""
        g = make_generator(self.seed, 1, step)
        x, y = self.corpus.sample("train", batch_size * world_size, length or self.seq_len, g)  # (b·w, l) ×2
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

    def eval_metrics(self, val_loss: float) -> dict[str, float]:
        return {"val_bpb": self.bits_per_byte(val_loss)}

    def spec(self) -> dict:
        """{"task": "lm", LMTaskConfig fields}: what ``ssmkit.tasks.build_task`` rebuilds the task from."""
        if self.config is None:
            raise ValueError("spec: this LMTask wraps a corpus directly; build it with LMTask.from_config")
        return {"task": "lm", **asdict(self.config)}

    def export(self, model: torch.nn.Module, folder: Path) -> Path:
        """``save_pretrained`` the model into ``folder`` with its tokenizer files and a
        ``generation_config.json``, so that ``ssmkit generate``, ``transformers.AutoTokenizer`` and
        transformers' text-generation pipeline load the folder as it is.

        A ``tokenizer.json`` tokenizer is copied with the ``tokenizer_config.json``,
        ``special_tokens_map.json`` and ``chat_template.jinja`` found beside it (a minimal
        ``tokenizer_config.json`` when there is none). Bytes are written as a byte-level ``tokenizer.json``
        (``save_byte_tokenizer``: ids 0..255 are the bytes, no special tokens). ``generation_config.json``
        states greedy decoding and the tokenizer's bos / eos / pad ids — all null for bytes, so that
        transformers neither stops at nor pads with a byte (its Mamba config defaults them to id 0).
        Tokenizer files of an earlier export that this one does not write are removed. A task that wraps
        a corpus directly (no tokenizer) saves the model only."""
        folder = Path(folder)
        model.save_pretrained(folder)
        tok = self.tokenizer
        if tok is None:  # a corpus wrapped directly: its tokenizer is not known
            return folder
        src = getattr(tok, "path", None)  # JsonTokenizer keeps its file; bytes have none
        if src is None:
            written = {p.name for p in save_byte_tokenizer(folder)}
        else:
            atomic_write_bytes(folder / "tokenizer.json", Path(src).read_bytes())
            written = {"tokenizer.json"}
            for name in ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
                beside = Path(src).parent / name
                if beside.is_file():
                    atomic_write_bytes(folder / name, beside.read_bytes())
                    written.add(name)
            if "tokenizer_config.json" not in written:
                minimal = {
                    "tokenizer_class": "PreTrainedTokenizerFast",
                    "clean_up_tokenization_spaces": False,
                }
                atomic_write_text(folder / "tokenizer_config.json", json.dumps(minimal, indent=2) + "\n")
                written.add("tokenizer_config.json")
        generation = {
            "do_sample": False,
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
        }
        atomic_write_text(folder / "generation_config.json", json.dumps(generation, indent=2) + "\n")
        for name in TOKENIZER_FILES:
            if name not in written and (folder / name).is_file():
                (folder / name).unlink()
        return folder
