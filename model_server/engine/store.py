"""The KV store: every byte of KV memory, accounted in blocks of one pool sized at start-up.

It holds three things:

- **lanes** of the running batch. A lane is a dense, left-padded batch cache that one decode
  forward computes; usually there is one. A request joins the lane where it adds the fewest
  bytes a decode step must read, or opens a new lane (up to ``max_lanes``) when the padding
  it would add costs more than one more pass over the weights: one 6,000-token prompt next to
  63 short ones then decodes in its own lane instead of padding 63 rows to 6,000 positions;
- **prefill caches** of admitted requests not yet in a lane (a prefix-cache hit, the chunks
  of a long prompt);
- **prefix blocks**: copies of full blocks of finished (and freshly prefilled) requests,
  keyed by their chain hash, and of the partial block a finished request ends with, for
  later requests that share the prefix.

Everything is counted in blocks of ``block_size`` tokens from the real allocation sizes
(padding, spare room and rows kept after a leave included), so the ``MemoryModel`` the
scheduler sees is what the process really holds. See docs/engine.md for why the compute stays
dense on this CPU rather than paged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from . import hostmem, kv
from .blocks import PrefixIndex, chain_hashes, tail_hash
from .sampling import PenaltyState

if TYPE_CHECKING:
    from .sequence import Sequence


@dataclass
class Lane:
    """Rows decoded together: one left-padded cache and mask, penalties aligned with rows."""

    rows: list[Sequence] = field(default_factory=list)
    cache: kv.GrowableCache = field(default_factory=kv.new_cache)
    mask: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0, dtype=torch.long))
    penalties: PenaltyState | None = None

    @property
    def width(self) -> int:
        return self.mask.shape[1]

    def capacity(self) -> int:
        layer = self.cache.layers[0] if self.cache.layers else None
        buf = getattr(layer, "_k", None)
        return 0 if buf is None else buf.shape[-2]


class KVStore:
    def __init__(
        self,
        total_blocks: int,
        block_size: int,
        bytes_per_token: int,
        weight_bytes: int,
        vocab: int,
        device: torch.device,
        prefix: PrefixIndex[torch.Tensor] | None,
        max_lanes: int = 4,
    ) -> None:
        self.total_blocks = total_blocks
        self.block_size = block_size
        self.bytes_per_token = bytes_per_token
        self.block_bytes = block_size * bytes_per_token
        self.weight_bytes = weight_bytes
        self.max_lanes = max_lanes
        self.prefix = prefix
        self._vocab = vocab
        self._device = device
        # Each cache layer's device (several with --device-map), learned from the first cache
        # that fills the prefix cache; None until then.
        self._layer_devices: list[torch.device] | None = None
        self.lanes: list[Lane] = []
        self.pending: dict[int, tuple[kv.GrowableCache, torch.Tensor]] = {}  # id(seq) →
        if device.type == "cpu":  # lanes and prefix hits reuse freed pages (see hostmem)
            hostmem.keep_freed_pages()

    # ---- accounting (the scheduler's MemoryModel) -------------------------------------------

    def _blocks(self, nbytes: int) -> int:
        return math.ceil(nbytes / self.block_bytes) if nbytes > 0 else 0

    def used_blocks(self) -> int:
        held = sum(kv.nbytes(lane.cache) for lane in self.lanes)
        held += sum(kv.nbytes(cache) for cache, _ in self.pending.values())
        return self._blocks(held) + (len(self.prefix) if self.prefix is not None else 0)

    def free_blocks(self) -> int:
        return self.total_blocks - self.used_blocks()

    def pending_blocks(self, seq: Sequence) -> int:
        part = self.pending.get(id(seq))
        return self._blocks(kv.nbytes(part[0])) if part is not None else 0

    def _lane_bytes(self, rows: int, width: int) -> int:
        return rows * (width + kv.GROW_TOKENS) * self.bytes_per_token

    def choose_lane(self, rows: int, width: int) -> tuple[Lane | None, int]:
        """Where ``rows`` new rows of ``width`` positions go, and the bytes that adds.

        A join pads: the lane's rows to the new width, or the new rows to the lane's. Padding
        is read by every decode step like real KV, so it is weighed against what a separate
        lane costs per step: one more pass over the weights.
        """
        best: tuple[float, Lane | None, int] | None = None
        for lane in self.lanes:
            new_width = max(lane.width, width)
            padding = (len(lane.rows) + rows) * new_width - len(lane.rows) * lane.width
            padding -= rows * width
            added = self._lane_bytes(len(lane.rows) + rows, new_width) - kv.nbytes(lane.cache)
            cost = padding * self.bytes_per_token
            if best is None or cost < best[0]:
                best = (cost, lane, added)
        if not self.lanes or (len(self.lanes) < self.max_lanes and best[0] > self.weight_bytes):
            return None, self._lane_bytes(rows, width)
        assert best is not None
        return best[1], best[2]

    def join_cost(self, rows: int, width: int) -> int:
        return self._blocks(self.choose_lane(rows, width)[1])

    def growth_reserve(self) -> int:
        return self._blocks(
            sum(len(lane.rows) * kv.GROW_TOKENS for lane in self.lanes) * self.bytes_per_token
        )

    def decode_growth(self) -> int:
        """Blocks the next decode step adds: lanes whose buffers are full grow by
        ``GROW_TOKENS`` positions (at their current row count)."""
        added = 0
        for lane in self.lanes:
            if lane.width + 1 > lane.capacity():
                added += self._lane_bytes(len(lane.rows), lane.width + 1) - kv.nbytes(lane.cache)
        return self._blocks(added)

    # ---- prefill caches --------------------------------------------------------------------

    def load_prefix(self, seq: Sequence, blocks: list[torch.Tensor]) -> None:
        """A prefix-cache hit becomes the request's prefill cache."""
        n = seq.num_computed  # the blocks' positions (the last block may be partial)
        cache = kv.cache_from_blocks(
            blocks, spare=seq.num_tokens - n + kv.GROW_TOKENS, devices=self._layer_devices
        )
        self.pending[id(seq)] = (cache, torch.ones(1, n, dtype=torch.long))

    def drop_pending(self, seq: Sequence) -> None:
        self.pending.pop(id(seq), None)

    def chunk_cache(self, seq: Sequence) -> tuple[kv.GrowableCache, torch.Tensor]:
        """The request's own prefill cache (a long prompt is prefilled into it chunk by
        chunk); created empty on first use."""
        if id(seq) not in self.pending:
            self.pending[id(seq)] = (kv.new_cache(), torch.zeros(1, 0, dtype=torch.long))
        return self.pending[id(seq)]

    def set_chunk_mask(self, seq: Sequence, mask: torch.Tensor) -> None:
        self.pending[id(seq)] = (self.pending[id(seq)][0], mask)

    def take_group(
        self, group: list[Sequence], spare: int
    ) -> tuple[kv.GrowableCache, torch.Tensor]:
        """The group's prefill caches stacked into one left-padded cache with room for
        ``spare`` more positions; the per-request caches are released."""
        parts = [self.pending.pop(id(s), None) for s in group]
        if len(parts) == 1 and parts[0] is not None:  # one row: its own cache, no copy
            cache, mask = parts[0]
            for layer in cache.layers:
                layer.reserve(mask.shape[1] + spare + kv.GROW_TOKENS)
            return cache, mask
        caches = [p[0] if p else None for p in parts]
        masks = [p[1] if p else torch.zeros(1, 0, dtype=torch.long) for p in parts]
        return kv.concat(caches, masks, spare=spare + kv.GROW_TOKENS)

    # ---- lanes -----------------------------------------------------------------------------

    def join(self, rows: list[Sequence], cache: kv.GrowableCache, mask: torch.Tensor) -> Lane:
        """Freshly prefilled rows join the lane ``choose_lane`` picks (or a new one).

        Joining an existing lane rewrites it anyway, so its rows come out sorted longest
        first (by the first column they use): rows of similar length then sit together and a
        decode step's attention reads little padding (``models/attention.py``). Leaves keep
        the order; a new lane keeps its prefill group's order until its first join."""
        lane, _ = self.choose_lane(len(rows), mask.shape[1])
        if lane is None:
            lane = Lane(cache=cache, mask=mask)
            self.lanes.append(lane)
            lane.rows.extend(rows)
        else:
            width = max(lane.width, mask.shape[1])
            starts = [width - lane.width + s for s in _first_columns(lane.mask)]
            starts += [width - mask.shape[1] + s for s in _first_columns(mask)]
            order = sorted(range(len(starts)), key=starts.__getitem__)
            lane.cache, lane.mask = kv.concat([lane.cache, cache], [lane.mask, mask], order=order)
            stacked = [*lane.rows, *rows]
            lane.rows = [stacked[i] for i in order]
        self.rebuild_penalties(lane)
        return lane

    def lane_of(self, seq: Sequence) -> Lane:
        for lane in self.lanes:
            if any(r is seq for r in lane.rows):
                return lane
        raise KeyError(seq.request_id)

    def leave(self, lane: Lane, gone: list[Sequence], shrink: bool = False) -> None:
        """Rows leave their lane (finished, aborted, failed or preempted). ``shrink`` hands
        their memory back at once (a copy); otherwise rows move down in place."""
        ids = {id(s) for s in gone}
        keep = [i for i, s in enumerate(lane.rows) if id(s) not in ids]
        if len(keep) == len(lane.rows):
            return
        if not keep:
            self.lanes.remove(lane)
            return
        lane.rows = [lane.rows[i] for i in keep]
        lane.cache, lane.mask = kv.select(lane.cache, lane.mask, torch.tensor(keep), shrink)
        self.rebuild_penalties(lane)

    def drop_lane(self, lane: Lane) -> None:
        self.lanes.remove(lane)

    def reset(self) -> None:
        self.lanes.clear()
        self.pending.clear()

    def rebuild_penalties(self, lane: Lane) -> None:
        if any(s.params.needs_penalties for s in lane.rows):
            lane.penalties = PenaltyState(
                [(s.prompt_ids, s.output_ids) for s in lane.rows], self._vocab, self._device
            )
        else:
            lane.penalties = None

    # ---- prefix cache ----------------------------------------------------------------------

    def cache_prefix(
        self,
        seq: Sequence,
        cache: kv.GrowableCache,
        mask: torch.Tensor,
        row: int,
        room: int,
        final: bool = False,
    ) -> None:
        """Copies the request's full blocks that are not cached yet (at most ``room``) out of
        row ``row`` of a batch cache into the prefix cache; when the row is ``final`` (it
        leaves), its last, partial block too, once every full block before it is cached."""
        if self.prefix is None or room <= 0:
            return
        bs = self.block_size
        full = seq.num_computed // bs
        if full > seq.cached_blocks:
            seq.block_hashes = chain_hashes(seq.tokens[: full * bs], bs, seq.block_hashes[:full])
            start = seq.cached_blocks
            while start < full and seq.block_hashes[start] in self.prefix:
                start += 1  # another request cached it meanwhile
            end = min(full, start + room)
            if end > start:
                self._insert(seq.block_hashes[start:end], cache, mask, row, start * bs, bs)
            room -= end - start
            seq.cached_blocks = end
        size = seq.num_computed - full * bs
        if not (final and size and seq.cached_blocks == full and room > 0):
            return
        parent = seq.block_hashes[full - 1] if full else None
        name = tail_hash(parent, seq.tokens[full * bs : seq.num_computed])
        if name not in self.prefix:
            self._insert([name], cache, mask, row, full * bs, size)

    def _insert(
        self,
        names: list[bytes],
        cache: kv.GrowableCache,
        mask: torch.Tensor,
        row: int,
        first: int,
        size: int,
    ) -> None:
        """Copies ``len(names)`` blocks of ``size`` positions, from the row's position
        ``first`` on, into the prefix cache."""
        columns = kv.row_columns(mask[row])[first : first + len(names) * size]
        if self._layer_devices is None:  # fixed for the run: where hits must put each layer
            self._layer_devices = kv.layer_devices(cache)
        for name, block in zip(names, kv.extract_blocks(cache, row, columns, size)):
            self.prefix.insert(name, block)


def _first_columns(mask: torch.Tensor) -> list[int]:
    """Each row's first column that holds a token (rows are left-padded)."""
    if mask.shape[1] == 0:
        return [0] * mask.shape[0]
    return mask.int().argmax(dim=1).tolist()
