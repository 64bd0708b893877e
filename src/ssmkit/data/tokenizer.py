"""Tokenizers: text <-> token ids. One protocol, a byte-level tokenizer, ``tokenizer.json``, and the loader.

* :class:`ByteTokenizer` — UTF-8 bytes are the tokens: ids 0..255, vocab 256, no special tokens (no
  bos, eos or pad: all 256 ids are bytes). Needs no file, so any model with vocab_size >= 256 can be
  driven from text (the CLI's default).
* :class:`JsonTokenizer` — the Hugging Face ``tokenizers`` library's ``tokenizer.json`` (e.g. the
  GPT-NeoX-20B tokenizer shipped with ``state-spaces/mamba-*-hf``), with the special tokens (bos, eos,
  pad) and the chat template of the ``tokenizer_config.json`` / ``special_tokens_map.json`` beside it.
* :func:`save_byte_tokenizer` — writes :class:`ByteTokenizer` as a real ``tokenizer.json`` (+
  ``tokenizer_config.json``) that ``tokenizers`` and ``transformers.AutoTokenizer`` load, giving exactly
  the ids and the text of :class:`ByteTokenizer`.

``load_tokenizer(path)`` takes a ``tokenizer.json`` file, or a folder: its ``tokenizer.json`` when it has
one; a folder holding another tokenizer format only (``tokenizer.model``, ``vocab.json`` +
``merges.txt``) is one error saying how to convert it; a folder holding no tokenizer file is bytes.

Reference: transformers' ``PreTrainedTokenizerFast`` file layout — ``tokenizer.json`` (the tokenizer
itself), ``tokenizer_config.json`` (``bos_token`` / ``eos_token`` / ``pad_token`` as a string or an
``{"content": ...}`` object, ``chat_template``), ``special_tokens_map.json`` (special tokens, used where
``tokenizer_config.json`` gives none), ``chat_template.jinja`` (the template as a file). The byte-level
``tokenizer.json`` uses GPT-2's byte-to-unicode map (``tokenizers.pre_tokenizers.ByteLevel``): each
byte b becomes one printable character, which is the vocabulary entry of id b; there are no merges, so
every byte is one token, and the ByteLevel decoder turns ids back into bytes and decodes them as UTF-8,
replacing invalid sequences with U+FFFD as Python's ``errors="replace"`` does.

Glossary: id — an integer token index in [0, vocab_size); bos / eos / pad — beginning-of-sequence,
end-of-sequence and padding tokens; chat template — Jinja text that turns chat messages into a prompt.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

from ssmkit.utils import atomic_write_text

# tokenizer files that other formats than tokenizer.json consist of, and what each is
_OTHER_FORMATS = {
    "tokenizer.model": "a sentencepiece tokenizer.model",
    "vocab.json": "a vocab.json (+ merges.txt) BPE tokenizer",
    "merges.txt": "a merges.txt (+ vocab.json) BPE tokenizer",
    "vocab.txt": "a WordPiece vocab.txt",
}
_SPECIAL = ("bos_token", "eos_token", "pad_token")
# tokenizer_config.json of the byte-level tokenizer: no special tokens (every id is a byte), no clean-up
# of spaces before punctuation on decoding (bytes decode as they are), no length limit of its own.
BYTE_TOKENIZER_CONFIG = {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "bos_token": None,
    "eos_token": None,
    "pad_token": None,
    "unk_token": None,
    "clean_up_tokenization_spaces": False,
    "model_max_length": 1_000_000_000,
}


class Tokenizer(Protocol):
    """What the rest of ssmkit needs from a tokenizer. Special-token ids are None when it has none."""

    vocab_size: int
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None
    chat_template: str | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens (ids 0..255). Decoding replaces invalid byte sequences with U+FFFD."""

    vocab_size = 256
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    chat_template: str | None = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        bad = [i for i in ids if not 0 <= int(i) < 256]
        if bad:
            raise ValueError(f"byte token ids must be in [0, 256), got {bad[:5]}")
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class JsonTokenizer:
    """A ``tokenizers.Tokenizer`` loaded from a local ``tokenizer.json``.

    Args:
        path: the tokenizer.json file.
        eos_token, bos_token, pad_token: the special tokens' text (each must be in the vocabulary), or
            None for none.
        chat_template: Jinja source of the chat template, or None.
    """

    def __init__(
        self,
        path: str | Path,
        eos_token: str | None = None,
        bos_token: str | None = None,
        pad_token: str | None = None,
        chat_template: str | None = None,
    ):
        from tokenizers import Tokenizer as _HFTokenizer

        self.path = Path(path)
        try:
            self._tok = _HFTokenizer.from_file(str(self.path))
        except Exception as err:  # tokenizers raises a bare Exception for a malformed file
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ValueError(f"{self.path} is not a readable tokenizer.json ({first})") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eos_token_id = self._token_id("eos_token", eos_token)
        self.bos_token_id = self._token_id("bos_token", bos_token)
        self.pad_token_id = self._token_id("pad_token", pad_token)
        self.chat_template = chat_template

    def _token_id(self, key: str, token: str | None) -> int | None:
        if token is None:
            return None
        found = self._tok.token_to_id(token)
        if found is None:
            raise ValueError(f"{key} {token!r} is not in {self.path}")
        return found

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def _token_text(file: Path, key: str, value: Any) -> str | None:
    """A special token as written in a tokenizer config: a string, ``{"content": str, ...}`` or null."""
    if isinstance(value, dict):
        value = value.get("content")
    if value is None or isinstance(value, str):
        return value
    raise ValueError(f"{file}: {key} must be a string or an object with a 'content' string, got {value!r}")


def _chat_template(folder: Path, config: dict[str, Any], file: Path) -> str | None:
    """tokenizer_config.json's chat_template (a string, or the entry named "default" of a list of
    {"name", "template"}), else the folder's chat_template.jinja, else None."""
    source = config.get("chat_template")
    if isinstance(source, list):
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default")
    if source is None and (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if source is not None and not isinstance(source, str):
        raise ValueError(f"{file}: chat_template must be a string, got {type(source).__name__}")
    return source


def tokenizer_settings(folder: str | Path) -> dict[str, str | None]:
    """The special tokens (``bos_token``, ``eos_token``, ``pad_token``: text or None) and the
    ``chat_template`` of the tokenizer files in ``folder``, as :class:`JsonTokenizer`'s keyword arguments.

    ``tokenizer_config.json`` gives them; ``special_tokens_map.json`` fills in a token the config does not
    set. A file that is not a JSON object, or a token that is not text, is one ValueError naming the file.
    """
    from ssmkit.models.folder import read_json

    folder = Path(folder)
    config_file, map_file = folder / "tokenizer_config.json", folder / "special_tokens_map.json"
    config = read_json(config_file, "a JSON object (tokenizer settings)") if config_file.is_file() else {}
    tokens = read_json(map_file, "a JSON object (special tokens)") if map_file.is_file() else {}
    out: dict[str, str | None] = {}
    for key in _SPECIAL:
        value = _token_text(config_file, key, config.get(key))
        out[key] = value if value is not None else _token_text(map_file, key, tokens.get(key))
    out["chat_template"] = _chat_template(folder, config, config_file)
    return out


def load_tokenizer(path: str | Path, required: bool = False) -> ByteTokenizer | JsonTokenizer:
    """The tokenizer at ``path``: a ``tokenizer.json``-format file itself (any name), or a folder.

    A folder gives its ``tokenizer.json`` when it has one. A folder holding only another tokenizer
    format (``tokenizer.model``, ``vocab.json`` / ``merges.txt``) is one FileNotFoundError saying how to
    convert it. A folder without tokenizer files gives bytes — or, with ``required``, FileNotFoundError
    (for a user who asked for a tokenizer by path). Special tokens and the chat template are read from the
    ``tokenizer_config.json`` / ``special_tokens_map.json`` beside the file (:func:`tokenizer_settings`).
    """
    p = Path(path)
    if p.is_file():
        file = p
    elif (p / "tokenizer.json").is_file():
        file = p / "tokenizer.json"
    else:
        others = [what for name, what in _OTHER_FORMATS.items() if p.is_dir() and (p / name).is_file()]
        if others:
            raise FileNotFoundError(
                f"tokenizer: {p} holds {others[0]} but no tokenizer.json, the format ssmkit reads; convert "
                "it once with transformers: AutoTokenizer.from_pretrained(folder).save_pretrained(folder)"
            )
        if required:
            what = "folder holds no tokenizer.json" if p.is_dir() else "does not exist"
            raise FileNotFoundError(
                f"tokenizer: expected a tokenizer.json file or a folder holding one, got {p} ({what})"
            )
        return ByteTokenizer()
    return JsonTokenizer(file, **tokenizer_settings(file.parent))


def byte_tokenizer_json() -> str:
    """The text of a ``tokenizer.json`` that encodes and decodes exactly as :class:`ByteTokenizer`:
    a BPE model without merges whose vocabulary maps the ByteLevel character of byte b to id b."""
    from tokenizers import Tokenizer as _HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    # GPT-2's byte -> character map, as tokenizers' ByteLevel pre-tokenizer applies it: the printable
    # bytes stand for themselves, the others (0..32, 127..160, 173) are shifted to U+0100 onwards in order
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = {b: chr(b) for b in printable}
    for shift, b in enumerate(b for b in range(256) if b not in chars):
        chars[b] = chr(256 + shift)
    vocab = {chars[b]: b for b in range(256)}  # 256 entries, id = byte value
    if set(vocab) != set(pre_tokenizers.ByteLevel.alphabet()):
        raise RuntimeError("the installed tokenizers library uses a different ByteLevel alphabet")
    tok = _HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    # no regex split (a split changes nothing without merges, but would cost time), no prefix space
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok.to_str(pretty=True)


def save_byte_tokenizer(folder: str | Path) -> list[Path]:
    """Write :class:`ByteTokenizer` into ``folder`` as ``tokenizer.json`` and ``tokenizer_config.json``
    (:data:`BYTE_TOKENIZER_CONFIG`: no special tokens); returns the files written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return [
        atomic_write_text(folder / "tokenizer.json", byte_tokenizer_json()),
        atomic_write_text(
            folder / "tokenizer_config.json", json.dumps(BYTE_TOKENIZER_CONFIG, indent=2) + "\n"
        ),
    ]
