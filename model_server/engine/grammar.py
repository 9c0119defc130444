"""Grammar-constrained decoding with llguidance.

Why llguidance: ``bench/grammar_engines.py`` measured the three maintained engines on this CPU
with the embedded model's 49k-token vocabulary (docs/engine.md has the table): llguidance
computes a mask in ~0.1-0.3 ms per token and compiles a JSON schema in ~1 ms; xgrammar needs
~0.7 ms per token here and over a second to compile a nested schema, outlines-core seconds.
llguidance also takes regexes and Lark grammars, so the proto's StructuredOutput comes cheap.

Shape: :class:`Grammars` (one per server) owns the engine's view of the tokenizer (built once,
about a second, on the first constrained request) and checks grammars before a request is
admitted: a schema that does not compile, or uses a feature llguidance cannot enforce, is an
:class:`InvalidArgument` naming the field, so it never reaches the engine. Each request gets its
own :class:`GrammarMatcher`; the engine thread calls ``mask`` on the row's logits before
sampling and ``accept`` with the token sampled. A matcher never raises on the engine thread: a
failure masks every token, so that row alone ends (RowFailedError), and no other row notices.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
from typing import Any

import numpy as np
import torch

from ..models.base import LoadedModel
from ..validation import InvalidArgument

log = logging.getLogger(__name__)

# JSON is generated compactly (", " and ": " aside, no free whitespace): a small model given
# free whitespace can spend its whole budget on newlines.
JSON_DEFAULTS = {"whitespace_flexible": False}
MAX_CACHED = 256
MAX_CACHED_CHARS = 16 * 1024


class GrammarMatcher:
    """One request's grammar state; used only on the engine thread."""

    def __init__(self, matcher: Any, vocab: int) -> None:
        self._matcher = matcher
        self._vocab = vocab
        self._bits = torch.zeros((vocab + 31) // 32, dtype=torch.int32)
        self.error: str | None = None

    def mask(self, row: torch.Tensor) -> None:
        """Forbid (``-inf``) every token the grammar does not allow next."""
        try:
            if self.error is None:
                self._matcher.unsafe_compute_mask_ptr(
                    self._bits.data_ptr(), self._bits.numel() * self._bits.element_size()
                )
                if self._matcher.is_error():
                    self.error = self._matcher.get_error()
        except Exception as exc:  # noqa: BLE001 - this row fails, never the batch
            self.error = f"{type(exc).__name__}: {exc}"
        if self.error is not None:
            log.warning("grammar failed: %s", self.error)
            row.fill_(float("-inf"))
            return
        allowed = np.unpackbits(self._bits.numpy().view(np.uint8), bitorder="little")
        forbidden = allowed[: row.shape[0]] == 0
        if row.device.type == "cpu":
            # numpy, not torch: a [V] torch op costs milliseconds on a loaded CPU (thread pool
            # handoffs), the numpy view microseconds. ``row`` is a contiguous fp32 view.
            row.numpy()[forbidden] = -np.inf
        else:
            row.masked_fill_(torch.from_numpy(forbidden).to(row.device), float("-inf"))

    def accept(self, token: int) -> None:
        if self.error is not None:
            return
        try:
            if not self._matcher.consume_token(token):
                self.error = self._matcher.get_error() or f"token {token} is not allowed"
        except Exception as exc:  # noqa: BLE001
            self.error = f"{type(exc).__name__}: {exc}"

    @property
    def done(self) -> bool:
        """The reply is complete: only end-of-sequence may follow (never after an error: the
        row then fails at its next mask)."""
        return self.error is None and self._matcher.is_stopped()


class Grammars:
    """Compiles constraints for one served model (thread-safe; call off the event loop)."""

    def __init__(self, loaded: LoadedModel, vocab: int) -> None:
        self._loaded = loaded
        self._vocab = vocab
        self._lock = threading.Lock()
        self._tokenizer: Any = None
        self._check = functools.lru_cache(maxsize=MAX_CACHED)(self._check_uncached)

    def _ll_tokenizer(self) -> Any:
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = _ll_tokenizer(self._loaded, self._vocab)
            return self._tokenizer

    def json_schema(self, schema: dict[str, Any] | bool, field: str) -> str:
        import llguidance

        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_DEFAULTS)
        except Exception as exc:  # noqa: BLE001 - what the engine says is the message
            raise InvalidArgument(field, f"the JSON schema cannot be used: {exc}") from None
        return self.check(grammar, field)

    def regex(self, pattern: str, field: str) -> str:
        import llguidance

        return self.check(llguidance.LLMatcher.grammar_from_regex(pattern), field)

    def lark(self, source: str, field: str) -> str:
        import llguidance

        return self.check(llguidance.LLMatcher.grammar_from_lark(source), field)

    def check(self, grammar: str, field: str) -> str:
        """The grammar, or InvalidArgument with llguidance's reason (unsupported features)."""
        # Small grammars (tool sets, schemas: the ones sent again and again) are cached; a
        # huge one is not, so the cache stays a few MiB at most.
        small = len(grammar) <= MAX_CACHED_CHARS
        error = self._check(grammar) if small else self._check_uncached(grammar)
        if error:
            raise InvalidArgument(field, f"cannot be enforced: {error}")
        return grammar

    def _check_uncached(self, grammar: str) -> str:
        import llguidance

        try:
            is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
                grammar, self._ll_tokenizer()
            )
        except Exception as exc:  # noqa: BLE001
            return str(exc)
        return "; ".join(messages) if is_error else ""

    def matcher(self, grammar: str) -> GrammarMatcher:
        import llguidance

        matcher = llguidance.LLMatcher(self._ll_tokenizer(), grammar)
        if matcher.is_error():  # checked already; a limit can still trip here
            raise InvalidArgument("structured_output", matcher.get_error())
        return GrammarMatcher(matcher, self._vocab)


def _ll_tokenizer(loaded: LoadedModel, vocab: int) -> Any:
    """llguidance's tokenizer: from the transformers fast tokenizer when there is one, else
    from the token bytes (any Tokenizer with ``token_bytes``, e.g. ChatGLM2's)."""
    import llguidance
    import llguidance.hf

    eos = sorted(loaded.eos_token_ids)
    hf = getattr(loaded.tokenizer, "hf", None)
    if hf is not None and getattr(hf, "is_fast", False):
        return llguidance.hf.from_tokenizer(hf, n_vocab=vocab, eos_token=eos or None)
    from ..models.base import token_bytes

    tok = loaded.tokenizer

    # A token that spells no text (special, padding row) would match "nothing" anywhere:
    # llguidance's marker for special tokens (a leading 0xFF, never valid UTF-8) keeps the
    # grammar from ever allowing it.
    table = [token_bytes(tok, i) for i in range(tok.vocab_size)]
    table += [b""] * max(0, vocab - len(table))
    table = [b or b"\xff<|special_%d|>" % i for i, b in enumerate(table)]

    class _Wrapper:
        eos_token_id = eos[0] if eos else 0
        bos_token_id = None
        tokens = table

        def __call__(self, text: str | bytes) -> list[int]:
            # The ids must spell the text exactly (SentencePiece's encode adds a space).
            raw = getattr(tok, "encode_raw", None)
            if raw is not None:  # takes bytes too, partial UTF-8 included
                return raw(text)
            return tok.encode(text.decode(errors="replace") if isinstance(text, bytes) else text)

    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Wrapper()), n_vocab=vocab)


def schema_text(text: str, field: str) -> dict[str, Any] | bool:
    """A JSON schema sent as JSON text → the parsed schema, or InvalidArgument."""
    try:
        schema = json.loads(text) if text else {}
    except ValueError as exc:
        raise InvalidArgument(field, f"not valid JSON: {exc}") from None
    if not isinstance(schema, dict | bool):
        raise InvalidArgument(field, "a JSON schema is an object (or true/false)")
    return schema
