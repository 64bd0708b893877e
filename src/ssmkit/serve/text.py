"""Text out of a token stream, in bounded memory: incremental detokenization and stop strings.

* :class:`IncrementalDecoder` turns one token id at a time into new text. A token may be part of a
  character (byte-level tokenizers split UTF-8 sequences) or change how its neighbour decodes (a
  SentencePiece-style decoder strips the first token's leading space), so each step decodes a short window
  — the ids since the last emitted text plus one token of context before them — and emits only the part
  that is new and does not end in an incomplete character (U+FFFD). This is the prefix/read-offset scheme
  of Hugging Face's text-generation-inference and vLLM. The window is trimmed after each emission, so a
  stream holds a few ids, never its whole completion.
* :class:`StopMatcher` implements OpenAI's ``stop`` semantics: generation stops as soon as the text
  contains one of the stop strings, and the stop string itself is not returned. Text that could be the
  start of a stop string is held back until it either completes one (then dropped) or cannot (then
  emitted); at most ``max(len(stop)) - 1`` characters are held.

Glossary: prefix — the start of the decode window (context only, already emitted); read — the end of the
emitted part of the window.
"""

from __future__ import annotations

from ssmkit.data.tokenizer import Tokenizer

MAX_HELD_TOKENS = 16
"""A window that has not produced complete text after this many tokens is emitted as it decodes (with
replacement characters): no real character needs more tokens than that."""


class IncrementalDecoder:
    """New text for each pushed token id; ``flush()`` returns whatever is still held at the end."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._ids: list[int] = []  # the window: context ids [0, read) are emitted, [read, ...) are not
        self._read = 0

    def push(self, token: int) -> str:
        """The text that ``token`` completes ("" while a character is still incomplete)."""
        self._ids.append(token)
        emitted = self._tokenizer.decode(self._ids[: self._read])
        text = self._tokenizer.decode(self._ids)
        complete = len(text) > len(emitted) and not text.endswith("\ufffd")
        if not complete and len(self._ids) - self._read < MAX_HELD_TOKENS:
            return ""
        self._ids = self._ids[self._read :]  # keep the newly emitted ids as the next window's context
        self._read = len(self._ids)
        return text[len(emitted) :]

    def flush(self) -> str:
        """The text of the ids not yet emitted (incomplete characters become U+FFFD)."""
        emitted = self._tokenizer.decode(self._ids[: self._read])
        text = self._tokenizer.decode(self._ids)
        self._ids, self._read = [], 0
        return text[len(emitted) :]


class StopMatcher:
    """OpenAI stop strings over a stream of text pieces.

    Args:
        stops: the stop strings (non-empty); none means every piece passes through unchanged.
    """

    def __init__(self, stops: tuple[str, ...] = ()):
        if any(not s for s in stops):
            raise ValueError(f"stop strings must be non-empty, got {list(stops)!r}")
        self.stops = tuple(stops)
        self._longest = max((len(s) for s in self.stops), default=0)
        self._held = ""

    def push(self, piece: str, final: bool = False) -> tuple[str, bool]:
        """``(text to emit, stopped)`` after ``piece``; with ``final`` nothing is held back."""
        if not self.stops:
            return piece, False
        text = self._held + piece
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if found:
            self._held = ""
            return text[: min(found)], True
        keep = 0 if final else self._held_suffix(text)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], False

    def _held_suffix(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is the start of some stop string."""
        for k in range(min(len(text), self._longest - 1), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0
