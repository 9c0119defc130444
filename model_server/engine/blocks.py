"""Prefix caching by full KV blocks, named by a hash of every token before and in them.

Torch-free: the index maps a block's chain hash to an opaque value (the KV store keeps the
tensors there). A block's hash covers its own tokens *and* its parent's hash, so a hit on
block ``k`` means the whole prefix up to block ``k`` is identical (as in vLLM). The digest is
BLAKE2b-128 over the parent digest and the token ids: an accidental collision would hand one
user another user's KV, so Python's 64-bit ``hash`` is not enough.

A request that ends mid-block (a chat reply rarely ends on a block boundary) also leaves
its last, partial block, named by ``tail_hash``: the parent's hash and the partial block's
own tokens, in a domain of its own so it never equals a full block's name. The next turn of
that chat starts with those tokens, so it finds the whole conversation so far, not only its
full blocks.

Unreferenced blocks are evicted least-recently-used first. In this engine a cached block is
never referenced by a running request (its KV is copied into the request's row when it is
admitted), so every cached block can be evicted at any time.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from typing import Generic, TypeVar

V = TypeVar("V")


def chain_hashes(
    tokens: Sequence[int], block_size: int, parents: Sequence[bytes] = ()
) -> list[bytes]:
    """Hashes of every *full* block of ``tokens``; ``parents`` are already known hashes of the
    leading blocks (extended, not recomputed: a conversation grows one turn at a time)."""
    out = list(parents)
    for start in range(len(out) * block_size, len(tokens) - block_size + 1, block_size):
        h = hashlib.blake2b(out[-1] if out else b"glmserve", digest_size=16)
        h.update(array("q", tokens[start : start + block_size]).tobytes())
        out.append(h.digest())
    return out


def tail_hash(parent: bytes | None, tokens: Sequence[int]) -> bytes:
    """Name of a partial block (fewer than ``block_size`` tokens) after the chain of full
    blocks that ends at ``parent`` (None: at the start)."""
    h = hashlib.blake2b(parent or b"glmserve", digest_size=16, person=b"glmserve-tail")
    h.update(array("q", tokens).tobytes())
    return h.digest()


class PrefixIndex(Generic[V]):
    """Chain hash → cached block, in least-recently-used order."""

    def __init__(self) -> None:
        self._blocks: OrderedDict[bytes, V] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, block_hash: bytes) -> bool:
        return block_hash in self._blocks

    def match(self, hashes: Sequence[bytes]) -> list[V]:
        """The cached blocks of the longest cached prefix of ``hashes`` (marked as used)."""
        found = []
        for h in hashes:
            value = self._blocks.get(h)
            if value is None:
                break
            self._blocks.move_to_end(h)
            found.append(value)
        return found

    def get(self, block_hash: bytes) -> V | None:
        """One cached block (marked as used), or None."""
        value = self._blocks.get(block_hash)
        if value is not None:
            self._blocks.move_to_end(block_hash)
        return value

    def insert(self, block_hash: bytes, value: V) -> None:
        self._blocks[block_hash] = value
        self._blocks.move_to_end(block_hash)

    def evict(self, count: int) -> int:
        """Drops up to ``count`` least-recently-used blocks; returns how many went."""
        dropped = 0
        while dropped < count and self._blocks:
            self._blocks.popitem(last=False)  # the block's tensor is freed with it
            dropped += 1
        return dropped
