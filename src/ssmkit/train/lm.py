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
        tokenizer: the tokenizer that made ``corpus`` (kept so the trained model can be saved with it).
    """

    name = "lm"

    def __init__(self, corpus: TokenCorpus, seq_len: int, seed: int = 0, tokenizer: Tokenizer | None = None):
        corpus._check_len("train", seq_len)  # ValueError naming seq_len when the split is too short
        self.corpus = corpus
        self.tokenizer = tokenizer
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
    return LMTask(corpus, cfg.seq_len, cfg.seed, tokenizer)


def bpb_curve(metrics_path: str | os.PathLike, task: LMTask) -> list[dict]:
    """The validation curve of a run: one {step, val_loss, val_bpb} per eval event of ``metrics.jsonl``."""
    from ssmkit.train.metrics import read_metrics

    return [
        {"step": r["step"], "val_loss": r["val_loss"], "val_bpb": task.bits_per_byte(r["val_loss"])}
        for r in read_metrics(metrics_path)
        if r.get("event") == "eval"
    ]


# ------------------------------------------------------------------------------------- `ssmkit train`
# The language-modelling branch of ``ssmkit train`` (``--task lm``). The synthetic tasks' defaults of the
# shared size/optimisation flags suit tiny models; a language model on 2 CPU cores wants others. So the
# shared flags' defaults are *tagged* (an int/float subclass that behaves exactly like the number) and a
# tagged value — one the user did not give — is replaced by the LM default below.

LM_DEFAULTS = {
    "d_model": 256,
    "n_layer": 4,
    "steps": 400,
    "batch_size": 16,
    "lr": 2e-3,
    "schedule": "cosine",
    "warmup_steps": 30,
    "weight_decay": 0.1,
    "eval_every": 50,
    "eval_examples": 32,
    "ckpt_every": 100,
}
"""Defaults of ``ssmkit train --task lm`` (Mamba, byte tokens, stdlib corpus): 1.8 M parameters,
400 steps × 16 × 256 = 1.6 M tokens — about 2 min 40 s (≈ 10,000 tokens/s) on a quiet 2-core machine
(docs/lm.md)."""


class _DefaultInt(int):
    unset = True


class _DefaultFloat(float):
    unset = True


class _DefaultStr(str):
    unset = True


def _tag(value):
    if isinstance(value, bool) or value is None:
        raise ValueError(f"cannot tag default {value!r}")
    if isinstance(value, str):
        return _DefaultStr(value)
    return _DefaultInt(value) if isinstance(value, int) else _DefaultFloat(value)


def add_lm_args(parser) -> None:
    """Add the ``--task lm`` flags to ``ssmkit train``'s parser and tag the shared defaults (call last)."""
    g = parser.add_argument_group(
        "language modelling (--task lm)",
        "With --task lm, the shared flags you do not give take these defaults instead: "
        + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in LM_DEFAULTS.items())
        + "; the vocabulary comes from the tokenizer. The trained model is saved with save_pretrained, "
        "with its tokenizer, in OUT/model.",
    )
    g.add_argument(
        "--data",
        default=None,
        help="text file, folder or glob (default: the Python standard library's .py sources)",
    )
    g.add_argument(
        "--model", choices=["mamba", "transformer"], default="mamba", help="LM kind (default: mamba)"
    )
    g.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help="a tokenizer.json (or a folder holding one); default: bytes (vocab 256)",
    )
    g.add_argument(
        "--val-fraction", type=float, default=0.02, help="validation share of the text (default: 0.02)"
    )
    g.add_argument(
        "--max-bytes",
        type=int,
        default=DEFAULT_MAX_BYTES,
        help=f"read at most this many bytes of text (default: {DEFAULT_MAX_BYTES})",
    )
    g.add_argument("--n-head", type=int, default=4, help="transformer attention heads (default: 4)")
    g.add_argument("--d-mlp", type=int, default=None, help="transformer MLP width (default: 4·d_model)")
    g.add_argument(
        "--token-cache",
        type=Path,
        default=None,
        help="folder of tokenised corpora (default: OUT/../token-cache)",
    )
    parser.set_defaults(**{k: _tag(parser.get_default(k)) for k in [*LM_DEFAULTS, "vocab_size"]})


def is_lm_run(args) -> bool:
    """Whether ``ssmkit train`` was asked for language modelling (``--task lm``, or resuming an LM run)."""
    if args.resume is not None:
        from ssmkit.train.checkpoint import read_checkpoint

        return read_checkpoint(args.resume)[1].get("task", {}).get("task") == "lm"
    return args.task == "lm"


def _resolved(args, name: str):
    value = getattr(args, name)
    if getattr(value, "unset", False):
        return LM_DEFAULTS[name]
    return value


def load_lm_tokenizer(path: str | os.PathLike | None):
    """Bytes when ``path`` is None, else the tokenizer.json at ``path`` (a file or a folder)."""
    from ssmkit.data.tokenizer import ByteTokenizer, load_tokenizer

    if path is None:
        return ByteTokenizer()
    p = Path(path)
    folder = p.parent if p.is_file() else p
    if not (folder / "tokenizer.json").is_file():
        raise ValueError(f"--tokenizer: no tokenizer.json at {p}")
    return load_tokenizer(folder)


def save_lm(model, tokenizer, folder: Path) -> Path:
    """``save_pretrained`` the model into ``folder`` and put the tokenizer beside it (tokenizer.json and
    tokenizer_config.json copied; nothing for bytes, which ``load_tokenizer`` assumes when absent)."""
    import shutil

    model.save_pretrained(folder)
    src = getattr(tokenizer, "path", None)
    if src is not None:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if (Path(src).parent / name).is_file():
                tmp = folder / f".{name}.tmp"
                shutil.copyfile(Path(src).parent / name, tmp)
                os.replace(tmp, folder / name)
    return folder


def run_lm(args) -> int:
    """``ssmkit train --task lm``: build tokenizer, corpus, model; train; save model + tokenizer; print the
    validation bits-per-byte curve. Resuming rebuilds everything from the checkpoint's specs."""
    import json
    import time

    from ssmkit.cli._dataclass_args import dataclass_from_args
    from ssmkit.train.build import build_model, build_task
    from ssmkit.train.checkpoint import read_checkpoint
    from ssmkit.train.trainer import TrainConfig, train

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.resume is not None:
        header = read_checkpoint(args.resume)[1]
        model_spec, tspec = header["model"], header["task"]
        cfg = TrainConfig(**header["train"])
        cfg.progress = args.progress
        out = Path(args.out or args.resume.parent)
    else:
        if not getattr(args.vocab_size, "unset", False):
            raise ValueError("--vocab-size does not apply to --task lm: the tokenizer sets the vocabulary")
        for name in LM_DEFAULTS:
            setattr(args, name, _resolved(args, name))
        out = Path(args.out or Path("ssmkit-out") / time.strftime("train-lm-%Y%m%d-%H%M%S"))
        tspec = {
            "task": "lm",
            "data": _absolute_data(args.data),
            "tokenizer": None if args.tokenizer is None else str(Path(args.tokenizer).resolve()),
            "seq_len": args.seq_len,
            "val_fraction": args.val_fraction,
            "max_bytes": args.max_bytes,
            "seed": args.seed,
            "token_cache": str((args.token_cache or out.resolve().parent / "token-cache").resolve()),
        }
        cfg = dataclass_from_args(TrainConfig, args)
        model_spec = None  # set below, once the tokenizer's vocabulary is known
    is_main = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 prints and saves
    task = build_task(tspec, verbose=is_main)  # loads the tokenizer and the (cached) token file
    tokenizer = task.tokenizer
    if model_spec is None:
        model_spec = _model_spec(args, tokenizer.vocab_size)
    torch.manual_seed(tspec["seed"])
    model = build_model(model_spec)
    n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    say = print if is_main else (lambda *a, **k: None)
    say(
        f"[train] lm · {model_spec['kind']} · {n_params:,} parameters · {tokenizer.vocab_size} tokens · "
        f"{task.corpus.meta.n_train:,} training tokens · out {out.resolve()}",
        flush=True,
    )
    res = train(model, task, cfg, out, resume=args.resume, meta={"model": model_spec, "task": tspec})
    if not is_main:
        return 130 if res.interrupted else 0
    curve = bpb_curve(out / "metrics.jsonl", task)
    for c in curve:
        say(
            f"[train] step {c['step']:>6}: val loss {c['val_loss']:.4f} nats/token, "
            f"{c['val_bpb']:.4f} bits/byte"
        )
    tmp = out / "val_bpb.json.tmp"
    tmp.write_text(json.dumps(curve, indent=1))
    os.replace(tmp, out / "val_bpb.json")
    if not res.interrupted:
        folder = save_lm(model, tokenizer, out / "model")
        say(f"[train] saved model + tokenizer to {folder.resolve()} (ssmkit generate {folder} --prompt …)")
    say(f"[train] wrote {out.resolve()}")
    return 130 if res.interrupted else 0


def _absolute_data(data: str | None) -> str | None:
    """An existing path made absolute (so a resumed run finds it from anywhere); globs and None as given."""
    if data is None:
        return None
    p = Path(data).expanduser()
    return str(p.resolve()) if p.exists() else data


def _model_spec(args, vocab_size: int) -> dict:
    if args.model == "mamba":
        from ssmkit.models.config import MambaConfig

        cfg = MambaConfig(
            d_model=args.d_model, n_layer=args.n_layer, vocab_size=vocab_size, d_state=args.d_state
        )
        return {"kind": "mamba_lm", "config": cfg.to_dict()}
    from ssmkit.models.transformer_lm import TransformerConfig

    cfg = TransformerConfig(
        d_model=args.d_model,
        n_layer=args.n_layer,
        vocab_size=vocab_size,
        n_head=args.n_head,
        d_mlp=args.d_mlp,
    )
    return {"kind": "transformer_lm", "config": cfg.to_dict()}
