"""ChatGLM2's and ChatGLM3's tokenizer, rebuilt on the ``sentencepiece`` package (no remote code).

The checkpoint's ``tokenizer.model`` is a plain SentencePiece BPE model with byte fallback;
ChatGLM2 appends five special tokens after its vocabulary, ChatGLM3 the same five and then its
four role tokens. Plain text is always encoded with SentencePiece alone, so special-token
*names* typed by a user (``<|user|>`` included) stay ordinary text.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import sentencepiece as spm

from model_server.models.base import ModelLoadError
from model_server.models.vocab import sentencepiece_bytes

# Appended after the SentencePiece vocabulary, in this order (ids n .. n+4).
SPECIAL_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")
# ChatGLM3 appends its role tokens after those (ids n+5 .. n+8).
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")


class ChatGLM2Tokenizer:
    """Ids ↔ text for ChatGLM2 (and ChatGLM3 with ``role_tokens``). Implements
    ``base.Tokenizer``.

    ChatGLM3's decode writes role tokens as their names, as the original does (a reply with
    several tool calls separates them with ``<|assistant|>``); the five GLM specials, unk/pad,
    bos and eos are dropped.
    """

    unk_token_id = 0
    pad_token_id = 0
    bos_token_id = 1
    eos_token_id = 2

    def __init__(self, model_file: str | Path, role_tokens: bool = False) -> None:
        model_file = Path(model_file)
        if not model_file.is_file():
            raise ModelLoadError(f"{model_file}: tokenizer.model is missing")
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(model_file))
        except (OSError, RuntimeError) as exc:
            raise ModelLoadError(
                f"{model_file}: not a SentencePiece model ({exc}); only ChatGLM2's "
                "SentencePiece tokenizer is supported"
            ) from exc
        self.sp_vocab_size: int = self._sp.get_piece_size()
        self._raw: spm.SentencePieceProcessor | None = None  # see encode_raw
        n = self.sp_vocab_size
        self._names = SPECIAL_TOKENS + (ROLE_TOKENS if role_tokens else ())
        self.special_tokens: dict[str, int] = {t: n + i for i, t in enumerate(self._names)}
        self.role_token_ids: dict[str, int] = {
            t[2:-2]: self.special_tokens[t] for t in ROLE_TOKENS if t in self.special_tokens
        }
        self.mask_token_id = n
        self.gmask_token_id = n + 1
        self.smask_token_id = n + 2
        self.sop_token_id = n + 3
        self.eop_token_id = n + 4
        # Dropped by decode: the five GLM specials, unk/pad, bos and eos.
        self._skip = frozenset(
            {n + i for i in range(len(SPECIAL_TOKENS))}
            | {self.pad_token_id, self.bos_token_id, self.eos_token_id}
        )

    @property
    def vocab_size(self) -> int:
        """SentencePiece pieces plus the appended specials (not the padded model rows)."""
        return self.sp_vocab_size + len(self._names)

    @property
    def prompt_prefix(self) -> list[int]:
        """What ChatGLM2 puts in front of every prompt: ``[gMASK], sop``."""
        return [self.gmask_token_id, self.sop_token_id]

    def encode(self, text: str) -> list[int]:
        """Plain SentencePiece ids: no prefix, no bos/eos, special names stay text."""
        return list(self._sp.encode(text, out_type=int))

    def decode(self, ids: Sequence[int]) -> str:
        """SentencePiece decode of the non-special ids.

        Ids past the tokenizer's vocabulary (the model's padding rows) are dropped too, so a
        stray sample can never crash decoding. A partial UTF-8 sequence at the end decodes to
        one U+FFFD per byte (SentencePiece's own behaviour), which the engine's incremental
        detokenizer relies on to hold text back.
        """
        n = self.sp_vocab_size
        parts: list[str] = []
        run: list[int] = []
        for raw in ids:
            i = int(raw)
            if 0 <= i < n and i not in self._skip:
                run.append(i)
            elif n + len(SPECIAL_TOKENS) <= i < n + len(self._names):  # a role token
                if run:
                    parts.append(self._sp.decode(run))
                    run = []
                parts.append(self._names[i - n])
        if run:
            parts.append(self._sp.decode(run))
        return "".join(parts)

    def encode_raw(self, text: str | bytes) -> list[int]:
        """Ids that spell exactly ``text``: no dummy-prefix space, no normalization. What a
        grammar engine needs when it turns forced bytes into tokens (``encode`` would put a
        ``▁`` in front of ``{``). Bytes that are not valid UTF-8 (a character cut in two)
        become SentencePiece's byte-fallback pieces ``<0xNN>``."""
        if isinstance(text, bytes):
            try:
                text = text.decode()
            except UnicodeDecodeError as exc:
                head, tail = text[: exc.start], text[exc.start :]
                ids = self.encode_raw(head)
                for i, b in enumerate(tail):
                    try:  # the rest may be valid again after the broken character
                        return ids + self.encode_raw(tail[i:].decode())
                    except UnicodeDecodeError:
                        ids.append(self._sp.piece_to_id(f"<0x{b:02X}>"))
                return ids
        if self._raw is None:
            from sentencepiece import sentencepiece_model_pb2

            proto = sentencepiece_model_pb2.ModelProto()
            proto.ParseFromString(self._sp.serialized_model_proto())
            spec = proto.normalizer_spec
            spec.add_dummy_prefix = False
            spec.remove_extra_whitespaces = False
            spec.name, spec.precompiled_charsmap = "identity", b""
            self._raw = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        return list(self._raw.encode(text, out_type=int))

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes a token spells (``▁`` is a space, ``<0xNN>`` one byte), for grammar
        engines and logprobs; b"" for every special token (GLM specials, role tokens, unk,
        bos, eos, padding rows), which text never produces and a grammar must never allow."""
        plain = 0 <= token_id < self.sp_vocab_size and token_id not in self._skip
        if plain and not (self._sp.is_control(token_id) or self._sp.is_unknown(token_id)):
            return sentencepiece_bytes(self._sp.id_to_piece(token_id))
        return b""

    def id_to_piece(self, token_id: int) -> str:
        """The piece string of one id (specials by name), for debugging and tests."""
        if token_id >= self.sp_vocab_size:
            k = token_id - self.sp_vocab_size
            return self._names[k] if k < len(self._names) else f"<padding:{token_id}>"
        return self._sp.id_to_piece(token_id)
