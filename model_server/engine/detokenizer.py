"""Incremental detokenization that never emits half a character.

Decoding token by token is wrong for byte-level and SentencePiece tokenizers: a character may
span tokens, and a token's leading space depends on what came before. We decode a short window
(the previous token(s) plus the new ones) and emit only the part past the previous window's text,
and only once the text no longer ends in U+FFFD, i.e. an incomplete UTF-8 sequence (or once
``MAX_HELD_TOKENS`` tokens have gone by without finishing it: it never will).
"""

from __future__ import annotations

from ..models.base import Tokenizer

_REPLACEMENT = "\ufffd"
# A character is at most 4 bytes, so at most 4 tokens: text still unfinished this many tokens
# after the last emitted one never will be (stray bytes, say), and is let out as it decodes,
# all but its last 3 tokens (a character starting there may still finish; one starting
# earlier would span more than 4). Without the bound each push decoded the whole held window:
# a model emitting lone bytes (a broken fine-tune, bench.gpu's random weights) cost the engine
# thread 1.6 ms a push after 4,000 tokens, and growing (an H100's step at 64 streams is
# ~20 ms).
MAX_HELD_TOKENS = 8
_CHAR_TOKENS = 4


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
        end = len(self._ids)
        if new_text == prefix_text and self._read_offset == end - 1:
            # Adds nothing, here or later (a special that decoding skips): kept out of the
            # window, so it neither grows the window nor splits the text around it.
            self._ids.pop()
            return ""
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT):
            if end - self._read_offset < MAX_HELD_TOKENS:
                return ""
            end -= _CHAR_TOKENS - 1  # never finishing: out with all but the last 3 tokens
            new_text = self._tok.decode(self._ids[self._prefix_offset : end])
        self._prefix_offset = self._read_offset
        self._read_offset = end
        return new_text[len(prefix_text) :]

    def flush(self) -> str:
        """Whatever is still held at the end (an incomplete character shows as U+FFFD)."""
        if self._read_offset == len(self._ids):
            return ""
        prefix_text = self._tok.decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._tok.decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return new_text[len(prefix_text) :]
