"""Tokenizers: text <-> token ids. A byte-level tokenizer and a wrapper around ``tokenizer.json``.

* :class:`ByteTokenizer` — UTF-8 bytes are the tokens: ids 0..255, vocab 256, no special tokens. Needs
  no file, so any model with vocab_size >= 256 can be driven from text (the CLI's default).
* :class:`JsonTokenizer` — the Hugging Face ``tokenizers`` library's ``tokenizer.json`` (e.g. the
  GPT-NeoX-20B tokenizer shipped with ``state-spaces/mamba-*-hf``); the end-of-sequence token is read
  from ``tokenizer_config.json``'s ``eos_token`` when present.

``load_tokenizer(path)`` takes a ``tokenizer.json`` file, or a folder: its ``tokenizer.json`` when it has
one, else bytes.

Glossary: id — an integer token index in [0, vocab_size).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol


class Tokenizer(Protocol):
    """What the rest of ssmkit needs from a tokenizer."""

    vocab_size: int
    eos_token_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens (ids 0..255). Decoding replaces invalid byte sequences with U+FFFD."""

    vocab_size = 256
    eos_token_id: int | None = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        bad = [i for i in ids if not 0 <= int(i) < 256]
        if bad:
            raise ValueError(f"byte token ids must be in [0, 256), got {bad[:5]}")
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class JsonTokenizer:
    """A ``tokenizers.Tokenizer`` loaded from a local ``tokenizer.json``."""

    def __init__(self, path: str | Path, eos_token: str | None = None):
        from tokenizers import Tokenizer as _HFTokenizer

        self.path = Path(path)
        self._tok = _HFTokenizer.from_file(str(self.path))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eos_token_id = None
        if eos_token is not None:
            self.eos_token_id = self._tok.token_to_id(eos_token)
            if self.eos_token_id is None:
                raise ValueError(f"eos_token {eos_token!r} is not in {self.path}")

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def load_tokenizer(path: str | Path, required: bool = False) -> ByteTokenizer | JsonTokenizer:
    """The tokenizer at ``path``: a ``tokenizer.json``-format file itself (any name), or a folder.

    A folder gives its ``tokenizer.json`` when it has one, else bytes — or, with ``required``,
    FileNotFoundError (for a user who asked for a tokenizer by path). The end-of-sequence token is read
    from the ``tokenizer_config.json`` beside the file, when there is one.
    """
    p = Path(path)
    if p.is_file():
        file = p
    elif (p / "tokenizer.json").is_file():
        file = p / "tokenizer.json"
    elif required:
        what = "folder holds no tokenizer.json" if p.is_dir() else "does not exist"
        raise FileNotFoundError(
            f"tokenizer: expected a tokenizer.json file or a folder holding one, got {p} ({what})"
        )
    else:
        return ByteTokenizer()
    eos = None
    cfg = file.parent / "tokenizer_config.json"
    if cfg.is_file():
        value = json.loads(cfg.read_text()).get("eos_token")
        eos = value.get("content") if isinstance(value, dict) else value
    return JsonTokenizer(file, eos_token=eos)
