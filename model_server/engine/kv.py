"""Batch surgery on a transformers KV cache: the rows of the running batch.

A lane of the running batch is one left-padded cache ``[B, heads, T, head_dim]`` per layer plus
a 2-D attention mask. Requests join (rows appended after left-padding to a common length) and
leave (rows selected away, then the all-padding columns on the left trimmed). transformers'
attention masks handle the padding, so the model forward is unchanged. Prefix-cache blocks are
copied out of a row (``extract_blocks``) and back into a new request's cache
(``cache_from_blocks``).

The layers are :class:`GrowableLayer`: a ``DynamicLayer`` whose keys/values live in a buffer
with spare room, so a decode step writes one position in place. transformers' ``DynamicLayer``
instead ``torch.cat``s the whole cache every step, a copy that grows with the context.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

# Spare positions allocated per growth: one copy of the cache every GROW_TOKENS decode steps.
GROW_TOKENS = 64


class GrowableLayer(DynamicLayer):
    """``keys``/``values`` are views ``[:, :, :length]`` of buffers with spare capacity.

    Assigning ``keys``/``values`` (as the batch surgery below does) replaces the buffers; the
    next update that does not fit grows them once by ``GROW_TOKENS``.
    """

    def __init__(self) -> None:
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._len = 0
        # Set for a static-shape decode step (graphs.py): the position to write, on the device.
        self.write_at: torch.Tensor | None = None
        super().__init__()

    @property
    def keys(self) -> torch.Tensor | None:  # type: ignore[override]
        return None if self._k is None else self._k[:, :, : self._len]

    @keys.setter
    def keys(self, t: torch.Tensor | None) -> None:
        self._k = t if t is not None and t.dim() == 4 else None
        self._len = 0 if self._k is None else self._k.shape[-2]

    @property
    def values(self) -> torch.Tensor | None:  # type: ignore[override]
        return None if self._v is None else self._v[:, :, : self._len]

    @values.setter
    def values(self, t: torch.Tensor | None) -> None:
        self._v = t if t is not None and t.dim() == 4 else None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def set_buffers(self, keys: torch.Tensor, values: torch.Tensor, length: int) -> None:
        """Adopts buffers whose first ``length`` positions hold the cache."""
        self._k, self._v, self._len = keys, values, length

    def release(self) -> None:
        """Lets go of the buffers (their memory returns once nothing else views them)."""
        self._k = self._v = None
        self._len = 0

    def compact_rows(self, keep: list[int]) -> None:
        """Keeps rows ``keep`` (ascending) by moving them down inside the same buffers: no
        allocation, and only rows after the first removed one are copied."""
        assert self._k is not None and self._v is not None
        for i, j in enumerate(keep):
            if i != j:
                self._k[i] = self._k[j]
                self._v[i] = self._v[j]
        self._k, self._v = self._k[: len(keep)], self._v[: len(keep)]

    def get_seq_length(self) -> int:
        return self._len

    def reserve(self, capacity: int) -> None:
        """Grows the buffers once to ``capacity`` positions (a long prompt prefilled chunk by
        chunk would otherwise copy its whole cache at every chunk)."""
        if self._k is not None and self._v is not None and capacity > self._k.shape[-2]:
            self._grow(self._k, self._v, capacity)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.write_at is not None:
            # A static-shape decode step: the position comes from a device tensor and the
            # whole capacity is returned (the mask hides what lies beyond), so the step's
            # shapes and addresses stay the same until the buffers change; ``_len`` is the
            # caller's to advance (a replayed CUDA graph never runs this method).
            assert self._k is not None and self._v is not None
            self._k.index_copy_(2, self.write_at, key_states)
            self._v.index_copy_(2, self.write_at, value_states)
            return self._k, self._v
        start, end = self._len, self._len + key_states.shape[-2]
        if self._k is None or self._v is None or end > self._k.shape[-2]:
            self._grow(key_states, value_states, end + GROW_TOKENS)
        assert self._k is not None and self._v is not None
        self._k[:, :, start:end] = key_states
        self._v[:, :, start:end] = value_states
        self._len = end
        return self._k[:, :, :end], self._v[:, :, :end]

    def _grow(self, key_states: torch.Tensor, value_states: torch.Tensor, capacity: int) -> None:
        b, h, _, d = key_states.shape
        k = key_states.new_empty(b, h, capacity, d)
        v = value_states.new_empty(b, value_states.shape[1], capacity, value_states.shape[-1])
        if self._len and self._k is not None and self._v is not None:
            k[:, :, : self._len] = self._k[:, :, : self._len]
            v[:, :, : self._len] = self._v[:, :, : self._len]
        self._k, self._v = k, v


class GrowableCache(DynamicCache):
    """A ``DynamicCache`` made of :class:`GrowableLayer`: created lazily, one per model layer,
    or given (``concat`` builds them directly)."""

    def __init__(self, layers: list[GrowableLayer] | None = None) -> None:
        if layers is None:
            Cache.__init__(self, layer_class_to_replicate=GrowableLayer)
        else:
            Cache.__init__(self, layers=layers)
        # The static decode state of the lane this cache belongs to (graphs.py): its inputs
        # and CUDA graph live and die with the cache.
        self.decode_state: object | None = None


def new_cache() -> GrowableCache:
    return GrowableCache()


def nbytes(cache: GrowableCache | None) -> int:
    """Bytes the cache's buffers really hold (spare room and rows kept after a leave too);
    a storage shared by several layers (a slab of ``cache_from_blocks``) counts once."""
    if cache is None:
        return 0
    storages = {}
    for layer in cache.layers:
        for t in (getattr(layer, "_k", None), getattr(layer, "_v", None)):
            if t is not None:
                storage = t.untyped_storage()
                storages[(t.device, storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


def concat(
    caches: Sequence[GrowableCache | None],
    masks: Sequence[torch.Tensor],
    spare: int = GROW_TOKENS,
    order: Sequence[int] | None = None,
) -> tuple[GrowableCache, torch.Tensor]:
    """Stacks several batches into one, left-padding each to the longest; the parts are
    consumed (emptied).

    Each layer is written once, straight into a buffer with ``spare`` free positions (no
    second copy when the next forward appends), and the parts' copies of that layer are let
    go right after it, so a join holds one layer twice at most, not the whole lane (a lane
    can be most of the KV pool). A part may be ``None`` when its mask has no columns (a prompt
    with nothing cached yet). ``order`` puts the stacked rows in that order (``order[i]``: the
    stacked row that becomes row ``i``) in the same single write, one copy per run of rows
    that stay together.
    """
    length = max(m.shape[1] for m in masks)
    rows = [m.shape[0] for m in masks]
    pads = [length - m.shape[1] for m in masks]
    mask = torch.cat([F.pad(m, (p, 0)) for m, p in zip(masks, pads)])
    present = [c for c, m in zip(caches, masks) if c is not None and m.shape[1]]
    if order is not None:
        mask = mask[torch.tensor(order)]
    if not present:
        return new_cache(), mask
    moves = _moves(rows, order)
    layers = []
    for li, template in enumerate(present[0].layers):
        layer = GrowableLayer()
        layer.lazy_initialization(template.keys, template.keys)
        bufs = []
        for attr in ("keys", "values"):
            like = getattr(template, attr)
            h, d = like.shape[1], like.shape[3]
            buf = like.new_empty(sum(rows), h, length + spare, d)
            for dst, part, src, n in moves:
                cache, pad = caches[part], pads[part]
                if pad:  # padding must be finite: a masked weight of 0 times NaN is still NaN
                    buf[dst : dst + n, :, :pad].zero_()
                if cache is not None and masks[part].shape[1]:
                    part_rows = getattr(cache.layers[li], attr)
                    buf[dst : dst + n, :, pad:length] = part_rows[src : src + n]
            bufs.append(buf)
        layer.set_buffers(bufs[0], bufs[1], length)
        layers.append(layer)
        for cache in present:
            cache.layers[li].release()
    return GrowableCache(layers), mask


def _moves(rows: Sequence[int], order: Sequence[int] | None) -> list[tuple[int, int, int, int]]:
    """``(first output row, part, first row in the part, rows)`` copies that build the
    stacked rows in ``order`` (the parts one after another when None)."""
    owner = [(p, r) for p, n in enumerate(rows) for r in range(n)]
    moves: list[tuple[int, int, int, int]] = []
    for dst, stacked in enumerate(range(len(owner)) if order is None else order):
        part, src = owner[stacked]
        if moves:
            d0, p0, s0, n0 = moves[-1]
            if p0 == part and s0 + n0 == src:
                moves[-1] = (d0, p0, s0, n0 + 1)
                continue
        moves.append((dst, part, src, 1))
    return moves


# Leading all-padding columns are only trimmed (a full copy) once there are this many.
TRIM_MIN_COLUMNS = 64


def select(
    cache: GrowableCache, mask: torch.Tensor, keep: torch.Tensor, shrink: bool = False
) -> tuple[GrowableCache, torch.Tensor]:
    """Keeps rows ``keep`` (ascending). Rows move down in place inside the same buffers; the
    leading columns that are padding in every kept row are trimmed when there are enough of
    them to be worth a copy. ``shrink`` copies the kept rows into new buffers (spare room
    kept), so the memory of the rows that left goes back (a preemption needs it)."""
    mask = mask[keep]
    real = mask.any(dim=0).nonzero()
    start = int(real[0]) if real.numel() else mask.shape[1]
    if start < TRIM_MIN_COLUMNS and not shrink:
        order = keep.tolist()
        for layer in cache.layers:
            layer.compact_rows(order)
        return cache, mask
    for layer in cache.layers:  # new buffers for the kept rows, spare room kept
        assert layer._k is not None and layer._v is not None
        length = layer.get_seq_length()
        bufs = []
        for old in (layer._k, layer._v):
            buf = old.new_empty(len(keep), old.shape[1], old.shape[2] - start, old.shape[3])
            buf[:, :, : length - start] = old[keep, :, start:length]
            bufs.append(buf)
        layer.set_buffers(bufs[0], bufs[1], length - start)
    return cache, mask[:, start:]


def row_columns(mask_row: torch.Tensor) -> torch.Tensor:
    """Columns of one row's tokens, in order (rows are left-padded and may have holes where
    a cached prefix met a shorter new segment)."""
    return mask_row.nonzero().squeeze(1)


def extract_blocks(
    cache: GrowableCache, row: int, columns: torch.Tensor, block_size: int
) -> list[torch.Tensor]:
    """Copies whole blocks of one row out of a batch cache: one ``[layers, 2, heads,
    block_size, head_dim]`` tensor per block (each its own allocation, so evicting a block
    frees exactly its memory), on the first layer's device. A partial block is one block
    of its own size."""
    n = columns.numel() // block_size
    if n == 0:
        return []
    first = cache.layers[0].keys
    h, d = first.shape[1], first.shape[3]
    out = first.new_empty(n, len(cache.layers), 2, h, block_size, d)
    for li, layer in enumerate(cache.layers):
        for kv_i, t in enumerate((layer.keys, layer.values)):
            part = t[row][:, columns[: n * block_size]]  # [h, n*bs, d]
            out[:, li, kv_i] = part.view(h, n, block_size, d).transpose(0, 1)
    return [b.clone() for b in out]


def layer_devices(cache: GrowableCache) -> list[torch.device]:
    """Where each layer's keys live: with a model split over several GPUs (``--device-map``)
    each layer's cache sits on that layer's GPU (transformers hands ``update`` the layer's own
    key states)."""
    return [layer.keys.device for layer in cache.layers]


# Layers of a prefix hit share allocations of at most this many bytes (at least one layer each).
SLAB_BYTES = 16 * 2**20


def cache_from_blocks(
    blocks: list[torch.Tensor],
    spare: int = GROW_TOKENS,
    devices: Sequence[torch.device] | None = None,
) -> GrowableCache:
    """A one-row cache holding the given consecutive blocks (a prefix-cache hit; the last
    may be a partial block, with fewer positions), with room for ``spare`` more positions
    (the rest of the prompt: no growth copy when it is computed), on ``devices[layer]`` when
    given (blocks live on the first layer's device), else on the blocks' device.

    Consecutive layers share one allocation (a slab ``[layers, 2, 1, heads, capacity,
    head_dim]`` of at most ``SLAB_BYTES``) and each block is copied into a slab in one strided
    copy: a few thousand copies instead of one per block, layer, keys and values (13,000 for
    3.5k tokens of a 30-layer model, where the per-copy overhead cost more than the bytes).
    Slabs stay small so that freed ones go back to the allocator's heap and the next hit
    reuses their pages (see ``hostmem``) instead of faulting in fresh ones. A layer that grows
    later moves to buffers of its own; its slab goes when its last layer has moved."""
    sizes = [b.shape[3] for b in blocks]  # block_size each, a partial last block fewer
    filled_to = sum(sizes)
    num_layers, _, h, _, d = blocks[0].shape
    capacity = filled_to + spare
    layer_bytes = 2 * h * capacity * d * blocks[0].element_size()
    per_slab = max(1, SLAB_BYTES // layer_bytes)
    placed = [blocks[0].device if devices is None else devices[li] for li in range(num_layers)]
    layers = []
    start = 0
    while start < num_layers:
        end = start + 1
        while end < num_layers and end - start < per_slab and placed[end] == placed[start]:
            end += 1
        slab = blocks[0].new_empty(end - start, 2, 1, h, capacity, d, device=placed[start])
        filled = slab[:, :, 0, :, :filled_to].split(sizes, dim=3)
        whole = start == 0 and end == num_layers
        torch._foreach_copy_(list(filled), blocks if whole else [b[start:end] for b in blocks])
        for j in range(end - start):
            # Detached: plain tensors over the slab's memory, not autograd views, so writing
            # into them in place is allowed in any grad mode (as into a buffer of their own).
            keys, values = slab[j, 0].detach(), slab[j, 1].detach()
            layer = GrowableLayer()
            layer.lazy_initialization(keys, values)
            layer.set_buffers(keys, values, filled_to)
            layers.append(layer)
        start = end
    return GrowableCache(layers)
