"""The bytes each token id stands for: what logprobs report (``bytes``) and what grammar
engines match against.

Decoding one id at a time is wrong for both: a byte-level BPE token can hold half of a UTF-8
character (decode gives U+FFFD), and SentencePiece drops a token's leading space. So the table
is built from the vocabulary's own spelling: GPT-2 byte-level (``Ġ`` = space, every character
one byte) or SentencePiece (``▁`` = space, ``<0xNN>`` = one raw byte).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's reversible bytes → printable characters map, inverted."""
    bs = list(range(ord("!"), ord("~") + 1))
    bs += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def byte_level_bytes(piece: str) -> bytes:
    table = _byte_decoder()
    try:
        return bytes(table[c] for c in piece)
    except KeyError:  # an added token spelled as plain text
        return piece.encode()


def sentencepiece_bytes(piece: str) -> bytes:
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        try:
            return bytes([int(piece[3:5], 16)])
        except ValueError:
            pass
    return piece.replace("\u2581", " ").encode()


def token_bytes_table(
    pieces: Sequence[str | None], byte_level: bool, special: Callable[[int], bool]
) -> list[bytes]:
    """One entry per id: the raw bytes of the token; a special token's name as UTF-8."""
    convert = byte_level_bytes if byte_level else sentencepiece_bytes
    return [
        b"" if p is None else p.encode() if special(i) else convert(p) for i, p in enumerate(pieces)
    ]
