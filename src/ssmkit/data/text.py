"""Text corpora for language modelling: sources -> one memory-mapped token file -> random windows.

A corpus is a list of text documents (a file, every file under a folder, the matches of a glob, or — by
default, so that nothing needs downloading — the Python standard library's own ``.py`` sources, found at
run time with ``sysconfig``). It is tokenised ONCE into a flat token file (numpy ``uint16`` when the
vocabulary fits, else ``uint32``) plus a JSON sidecar, cached under a folder of the caller's choice and
keyed by a hash of the sources, the split and the tokenizer; later runs memory-map it and start at once.

The split is made on the text, not on the tokens: the first ``1 - val_fraction`` of the bytes (cut at a
line boundary, or inside a line when that would leave a split empty, as for one file without line
breaks) is the training split, the rest the validation split, and each is tokenised on its own.
So the byte count of each split is exact, and bits per byte is

    bpb = (mean loss in nats per token) / ln 2 × (tokens in the split) / (bytes in the split).

Training windows are drawn uniformly at random from the training split with a caller-supplied
``torch.Generator``; validation windows tile the validation split in order. A window of ``seq_len``
inputs needs ``seq_len + 1`` tokens (inputs ``x = t[i : i+l]``, targets ``y = t[i+1 : i+l+1]``) and lies
entirely inside one split — windows never cross the split.

Glossary:
    b            batch size (windows per batch)
    l            window length ``seq_len`` (tokens fed to the model)
    n_train      tokens in the training split (positions [0, n_train) of the token file)
    n_val        tokens in the validation split (positions [n_train, n_train + n_val))

The tokenizer is any object with ``encode(text: str) -> list[int]`` and an integer ``vocab_size`` (the
``Tokenizer`` protocol of ``ssmkit.data.tokenizer``, whose byte-level and ``tokenizer.json`` tokenizers
both qualify).
"""

from __future__ import annotations

import glob as globlib
import hashlib
import json
import math
import os
import stat
import sysconfig
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ssmkit.data.tokenizer import Tokenizer
from ssmkit.utils import atomic_write, atomic_write_text

FORMAT_VERSION = 1
DEFAULT_MAX_BYTES = 20_000_000
# Folders of the standard library left out of the default corpus: test suites hold deliberately broken
# encodings and huge generated data; site-packages is not the standard library.
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
# A fixed text whose encoding fingerprints a tokenizer for the cache key.
_PROBE = "def f(x):\n    return x ** 2  # Ünïcödé, 数字, emoji 🙂\n\tSpaces   and\r\nnewlines.\n"


@dataclass
class SourceReport:
    """What went into a corpus."""

    files: list[str]
    """The files read, in order."""
    n_bytes: int
    """UTF-8 bytes taken (after the size cap)."""
    skipped: list[str]
    """Files skipped because they are not valid UTF-8 text."""
    truncated: bool
    """True when the size cap cut the corpus short."""


@dataclass
class CorpusMeta:
    """The JSON sidecar of a token file."""

    version: int
    dtype: str
    """'uint16' or 'uint32'."""
    vocab_size: int
    n_train: int
    """Tokens in the training split."""
    n_val: int
    """Tokens in the validation split."""
    train_bytes: int
    """UTF-8 bytes of text behind the training split."""
    val_bytes: int
    """UTF-8 bytes of text behind the validation split."""
    source: str
    """Human-readable description of the source (path, glob or 'stdlib:<path>')."""
    files: list[str]
    skipped: list[str]
    truncated: bool


# ---------------------------------------------------------------------------------------------- sources


def stdlib_root() -> Path:
    """The running interpreter's standard-library folder (``sysconfig.get_paths()["stdlib"]``)."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[Path]:
    """Every ``.py`` file of the standard library, test suites and site-packages excluded, sorted by
    relative path (a deterministic order on every machine with the same Python)."""
    root = stdlib_root() if root is None else Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"standard library folder not found: {root}")
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS and not d.startswith(".")]
        found += [Path(dirpath) / f for f in filenames if f.endswith(".py")]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def resolve_sources(data: str | os.PathLike | None) -> tuple[list[Path], str]:
    """Turn ``data`` (a file, a folder, a glob pattern, or None for the standard library) into a sorted
    list of files and a description. A folder means every non-hidden file below it."""
    if data is None:
        root = stdlib_root()
        return stdlib_files(root), f"stdlib:{root}"
    text = str(data)
    path = Path(text).expanduser()
    if path.is_file():
        return [path], str(path)
    if path.is_dir():
        files = [
            p
            for p in path.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        ]
        if not files:
            raise ValueError(f"data: folder {path} holds no files")
        return sorted(files, key=lambda p: p.relative_to(path).as_posix()), str(path)
    if any(ch in text for ch in "*?["):
        files = sorted(Path(p) for p in globlib.glob(os.path.expanduser(text), recursive=True))
        files = [p for p in files if p.is_file()]
        if not files:
            raise ValueError(f"data: glob {text!r} matches no files")
        return files, text
    if path.exists():  # a device, a FIFO, a socket: nothing to read text from
        raise ValueError(
            f"data: expected a regular file, a folder or a glob pattern, got {text!r} ({_kind(path)})"
        )
    raise ValueError(f"data: expected a file, a folder or a glob pattern, got {text!r} (does not exist)")


def _kind(path: Path) -> str:
    """What a path that is neither a regular file nor a folder is, in words."""
    mode = path.stat().st_mode
    for test, name in (
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a named pipe"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def read_documents(files: list[Path], max_bytes: int) -> tuple[list[str], SourceReport]:
    """Read files as UTF-8 text, in order, until ``max_bytes`` bytes; the file that crosses the cap is
    cut at a line boundary. Files that are not valid UTF-8 are skipped and listed in the report."""
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    docs: list[str] = []
    used: list[str] = []
    skipped: list[str] = []
    total = 0
    truncated = False
    for f in files:
        try:
            text = f.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            skipped.append(str(f))
            continue
        size = len(text.encode("utf-8"))
        if total + size > max_bytes:
            text = _cut_lines(text, max_bytes - total)
            size = len(text.encode("utf-8"))
            truncated = True
        if text:
            docs.append(text)
            used.append(str(f))
            total += size
        if truncated:
            break
    if total == 0:
        raise ValueError(f"no UTF-8 text found in {len(files)} file(s) (skipped: {skipped[:5]})")
    return docs, SourceReport(files=used, n_bytes=total, skipped=skipped, truncated=truncated)


def _cut_lines(text: str, n_bytes: int) -> str:
    """The longest prefix of whole lines of ``text`` with at most ``n_bytes`` UTF-8 bytes."""
    out, size = [], 0
    for line in text.splitlines(keepends=True):
        b = len(line.encode("utf-8"))
        if size + b > n_bytes:
            break
        out.append(line)
        size += b
    return "".join(out)


def split_documents(docs: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """Split the concatenated documents at byte ``(1 - val_fraction) × total``, moved back to the start of
    the line that holds it. Returns (train documents, validation documents).

    When that leaves a split empty — one document whose lines are long, e.g. a single text file written
    without line breaks — the cut is made inside the line instead, at the character that holds the byte
    (at least one byte on each side)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    total = sum(len(d.encode("utf-8")) for d in docs)
    cut = round((1.0 - val_fraction) * total)
    train, val = _split_at(docs, cut, _cut_lines)
    if not train or not val:
        train, val = _split_at(docs, min(max(cut, 1), total - 1), _cut_chars)
    if not train or not val:
        raise ValueError(f"val_fraction={val_fraction} leaves an empty split of a {total}-byte corpus")
    return train, val


def _split_at(docs: list[str], cut: int, head_of) -> tuple[list[str], list[str]]:
    """Documents before byte ``cut`` and after it; the document holding it is cut by ``head_of``."""
    train: list[str] = []
    val: list[str] = []
    offset = 0
    for doc in docs:
        size = len(doc.encode("utf-8"))
        if offset + size <= cut:
            train.append(doc)
        elif offset >= cut:
            val.append(doc)
        else:
            head = head_of(doc, cut - offset)
            train.append(head)
            val.append(doc[len(head) :])
        offset += size
    return [d for d in train if d], [d for d in val if d]


def _cut_chars(text: str, n_bytes: int) -> str:
    """The longest prefix of whole characters of ``text`` with at most ``n_bytes`` UTF-8 bytes."""
    return text.encode("utf-8")[:n_bytes].decode("utf-8", errors="ignore")


# ------------------------------------------------------------------------------------------- token file


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """A short hash of the tokenizer's class, vocabulary size and the encoding of a fixed probe text."""
    ids = tokenizer.encode(_PROBE)
    blob = json.dumps([type(tokenizer).__qualname__, int(tokenizer.vocab_size), list(map(int, ids))])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size ≤ 65536), else uint32."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def _cache_key(files: list[Path], source: str, max_bytes: int, val_fraction: float, tok_fp: str) -> str:
    stats = []
    for f in files:
        st = f.stat()
        stats.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    blob = json.dumps([FORMAT_VERSION, source, max_bytes, val_fraction, tok_fp, stats])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _encode_into(fh, docs: list[str], tokenizer: Tokenizer, dtype: np.dtype) -> int:
    """Encode each document and append its ids to the open binary file; returns the token count."""
    n = 0
    for doc in docs:
        ids = np.asarray(tokenizer.encode(doc), dtype=np.int64)  # (tokens,)
        if ids.size and (ids.min() < 0 or ids.max() >= tokenizer.vocab_size):
            raise ValueError(
                f"tokenizer produced ids outside [0, {tokenizer.vocab_size}): "
                f"min {ids.min()}, max {ids.max()}"
            )
        ids.astype(dtype).tofile(fh)
        n += int(ids.size)
    return n


class TokenCorpus:
    """A tokenised corpus on disk, memory-mapped, with a train and a validation split.

    Build or reopen with :meth:`build`; draw training batches with :meth:`sample`; walk the validation
    split with :meth:`iter_windows`.
    """

    def __init__(self, bin_path: Path, meta: CorpusMeta):
        self.bin_path = Path(bin_path)
        self.meta = meta
        n = meta.n_train + meta.n_val
        self.tokens = np.memmap(self.bin_path, dtype=np.dtype(meta.dtype), mode="r", shape=(n,))  # (n,)

    # ---- construction
    @classmethod
    def build(
        cls,
        tokenizer: Tokenizer,
        cache_dir: str | os.PathLike,
        data: str | os.PathLike | None = None,
        val_fraction: float = 0.02,
        max_bytes: int = DEFAULT_MAX_BYTES,
        verbose: bool = True,
    ) -> TokenCorpus:
        """Tokenise ``data`` (see :func:`resolve_sources`) into ``cache_dir/tokens-<key>.bin`` unless that
        file already exists for the same sources, size cap, split and tokenizer; then open it.

        The ``.bin`` is written to a temporary file and renamed, then the ``.json`` sidecar likewise, so a
        sidecar's presence means a complete token file."""
        files, source = resolve_sources(data)
        cache_dir = Path(cache_dir)
        cache_dir.mkdir(parents=True, exist_ok=True)
        cache_abs = cache_dir.resolve()
        files = [f for f in files if cache_abs not in f.resolve().parents]  # never read our own cache
        if not files:
            raise ValueError(f"data: {source} holds no files outside the token cache {cache_dir}")
        key = _cache_key(files, source, max_bytes, val_fraction, tokenizer_fingerprint(tokenizer))
        bin_path = cache_dir / f"tokens-{key}.bin"
        meta_path = cache_dir / f"tokens-{key}.json"
        if meta_path.exists() and bin_path.exists():
            meta = CorpusMeta(**json.loads(meta_path.read_text()))
            if verbose:
                print(f"[data] reusing {bin_path} ({meta.n_train:,} train + {meta.n_val:,} val tokens)")
            return cls(bin_path, meta)

        docs, report = read_documents(files, max_bytes)
        train_docs, val_docs = split_documents(docs, val_fraction)
        dtype = token_dtype(tokenizer.vocab_size)
        if verbose:
            print(f"[data] tokenising {len(report.files)} file(s), {report.n_bytes:,} bytes from {source}")
        with atomic_write(bin_path, "wb") as fh:
            n_train = _encode_into(fh, train_docs, tokenizer, dtype)
            n_val = _encode_into(fh, val_docs, tokenizer, dtype)
        meta = CorpusMeta(
            version=FORMAT_VERSION,
            dtype=dtype.name,
            vocab_size=int(tokenizer.vocab_size),
            n_train=n_train,
            n_val=n_val,
            train_bytes=sum(len(d.encode("utf-8")) for d in train_docs),
            val_bytes=sum(len(d.encode("utf-8")) for d in val_docs),
            source=source,
            files=report.files,
            skipped=report.skipped,
            truncated=report.truncated,
        )
        atomic_write_text(meta_path, json.dumps(asdict(meta), indent=1))
        if verbose:
            note = f", {len(report.skipped)} non-UTF-8 file(s) skipped" if report.skipped else ""
            print(f"[data] wrote {bin_path} ({n_train:,} train + {n_val:,} val tokens{note})")
        return cls(bin_path, meta)

    # ---- splits
    def split_range(self, split: str) -> tuple[int, int]:
        """(start, stop) token positions of ``split`` ('train' or 'val') in the token file."""
        if split == "train":
            return 0, self.meta.n_train
        if split == "val":
            return self.meta.n_train, self.meta.n_train + self.meta.n_val
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")

    def bytes_per_token(self, split: str) -> float:
        """UTF-8 bytes of text per token in ``split`` (1.0 for the byte-level tokenizer)."""
        n_tok = self.meta.n_train if split == "train" else self.meta.n_val
        n_bytes = self.meta.train_bytes if split == "train" else self.meta.val_bytes
        self.split_range(split)  # validates the name
        return n_bytes / n_tok

    def bits_per_byte(self, loss_nats: float, split: str = "val") -> float:
        """Convert a mean loss in nats per token over ``split`` to bits per byte of text."""
        return loss_nats / math.log(2) / self.bytes_per_token(split)

    def _check_len(self, split: str, seq_len: int) -> tuple[int, int]:
        start, stop = self.split_range(split)
        if seq_len < 1 or stop - start < seq_len + 1:
            raise ValueError(
                f"seq_len: expected 1 ≤ seq_len ≤ {stop - start - 1} (the {split} split holds "
                f"{stop - start} tokens), got {seq_len}"
            )
        return start, stop

    def window(self, start: int, seq_len: int) -> tuple[Tensor, Tensor]:
        """Inputs and targets of the window starting at absolute token position ``start``."""
        chunk = torch.from_numpy(self.tokens[start : start + seq_len + 1].astype(np.int64))  # (l+1,)
        return chunk[:-1], chunk[1:]

    def sample(
        self, split: str, batch_size: int, seq_len: int, generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        """``batch_size`` windows at uniformly random starts inside ``split``.

        Returns (x, y), int64 tensors of shape (b, l), with y the next token of each x."""
        start, stop = self._check_len(split, seq_len)
        starts = torch.randint(start, stop - seq_len, (batch_size,), generator=generator)  # (b,)
        pairs = [self.window(int(s), seq_len) for s in starts]
        x = torch.stack([p[0] for p in pairs])  # (b, l)
        y = torch.stack([p[1] for p in pairs])  # (b, l)
        return x, y

    def iter_windows(
        self, split: str, batch_size: int, seq_len: int, max_windows: int | None = None
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Consecutive non-overlapping windows of ``split`` in order (each token predicted once), in
        batches of at most ``batch_size``; at most ``max_windows`` windows (None: the whole split)."""
        start, stop = self._check_len(split, seq_len)
        starts = list(range(start, stop - seq_len, seq_len))
        if max_windows is not None:
            starts = starts[:max_windows]
        for i in range(0, len(starts), batch_size):
            pairs = [self.window(s, seq_len) for s in starts[i : i + batch_size]]
            yield torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])  # (b, l) ×2
