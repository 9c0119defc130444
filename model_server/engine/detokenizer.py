"""Incremental detokenization that never emits half a character.

Decoding token by token is wrong for byte-level and SentencePiece tokenizers: a character may
span tokens, and a token's leading space depends on what came before. We decode a short window
(the previous token(s) plus the new ones) and emit only the part past the previous window's text,
and only once the text no longer ends in U+FFFD, i.e. an incomplete UTF-8 sequence.
"""

from __future__ import annotations

from ..models.base import Tokenizer

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix_offset = 0  # start of the context window
        self._read_offset = 0  # tokens before this have been emitted

    def push(self, token_id: int) -> str:
        """Adds one token; returns the text that became final (possibly "")."""
        self._ids.append(token_id)
        prefix_text = self._tok.decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._tok.decode(self._ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return new_text[len(prefix_text) :]

    def flush(self) -> str:
        """Whatever is still held at the end (an incomplete character shows as U+FFFD)."""
        if self._read_offset == len(self._ids):
            return ""
        prefix_text = self._tok.decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._tok.decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return new_text[len(prefix_text) :]
