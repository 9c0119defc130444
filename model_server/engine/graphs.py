"""Decode steps with static shapes, replayed from CUDA graphs: one launch per step.

Why: on a GPU a decode step of the 6B-shaped ChatGLM2 reads its weights in ~4-7 ms, but the
host takes 14-25 ms to issue the ~800 small kernels of one forward from Python (py-spy: 94 %
of the engine thread inside the model forward at one stream). A CUDA graph records those
launches once and replays them with one call. On an H100 (docs/engine.md, "CUDA graphs"):
122.6 / 977.6 / 2015.8 tok/s at 1 / 16 / 64 streams against 67.8 / 687.4 / 1680.8 without,
inter-token latency 14.2 → 7.3 ms at one stream.

A graph replays fixed addresses and shapes, so a lane's decode step is made static:

- **The KV write** goes to a position held in a device tensor (``GrowableLayer.write_at``),
  and attention reads the buffers' whole capacity, the positions beyond the lane's width
  masked out (zeroed once, so a masked weight of 0 never meets a NaN). A lane's buffers grow
  by ``kv.GROW_TOKENS`` positions at a time, so one shape serves up to 64 steps.
- **The inputs** (token ids, positions, the lane's bool mask, the write position) are device
  tensors of the lane's own, refilled before each step; the step itself turns the bool mask
  into the additive ``[B, 1, 1, capacity]`` one that attention takes.

The step is identified by its *key*: the batch size and every layer's buffer addresses,
shapes and strides. A join, a leave or a growth changes the key. The process's first static
step runs eagerly (on the capture stream: it warms up cuBLAS there, whose lazy set-up cannot
be captured); from then on the first step at a new key captures a graph, which replays until
the key changes. (An eager warm-up at every key, as CUDA graphs are often used, would cost a
step at ~2.5x a replay's time per key, and in ``bench.gpu``'s 16- and 64-stream levels a key
lasts ~17 steps.)

The eager static step and the replay run the same kernels on the same shapes, so a lane's
tokens do not depend on whether its step was captured. They can differ in the last bits from a
dynamic step (attention over masked extra columns), as a row's attention already does
between a solo and a padded batch. A capture that fails (an op that cannot be captured, in
some model) turns static steps off for the process, with a warning: that step runs eagerly,
and the later ones are ordinary steps again (on the same caches: ``_len`` is kept exact),
since an eager static step is slower than an ordinary one at one stream (docs/engine.md).

On the CPU none of this runs (a decode step there is bound by the linears, not launches);
tests drive the static step eagerly on the CPU (``capture=False``) to check its tokens.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import kv

log = logging.getLogger(__name__)

# forward(input_ids, 4-D additive mask, position_ids, cache) -> last position's logits [B, V]
Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, kv.GrowableCache], torch.Tensor]
_Key = tuple[object, ...]


@dataclass
class _LaneState:
    """One lane's static inputs, and its graph once captured."""

    key: _Key
    ids: torch.Tensor  # [B, 1]
    positions: torch.Tensor  # [B, 1]
    valid: torch.Tensor  # [B, capacity] bool: the lane's 2-D mask, beyond its width False
    mask: torch.Tensor  # [B, 1, 1, capacity], 0 / -inf in the model's dtype, made from valid
    write_at: torch.Tensor  # [1]
    steps: int = 0  # steps run at this key
    graph: torch.cuda.CUDAGraph | None = None
    logits: torch.Tensor | None = None  # the graph's output


class StaticDecode:
    """Runs lanes' decode steps with static shapes; captures and replays CUDA graphs when
    ``capture`` (CUDA only)."""

    def __init__(
        self, forward: Forward, device: torch.device, dtype: torch.dtype, capture: bool
    ) -> None:
        self._forward = forward
        self._device = device
        self._dtype = dtype
        self.capture = capture and device.type == "cuda"
        self._stream = torch.cuda.Stream(device) if self.capture else None
        self.captured = 0  # graphs captured (tests)
        self.failed = False  # a capture failed: the runner goes back to ordinary steps

    @staticmethod
    def usable(cache: kv.GrowableCache) -> bool:
        """A cache whose every layer has buffers (a lane always has, after its prefill)."""
        layers = cache.layers
        return bool(layers) and all(
            isinstance(layer, kv.GrowableLayer) and layer._k is not None for layer in layers
        )

    def step(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        cache: kv.GrowableCache,
    ) -> tuple[torch.Tensor, str]:
        """One decode step of a lane: ``ids``/``positions`` ``[B, 1]``, ``mask`` the lane's 2-D
        mask including the new column (host tensors). Appends to ``cache``; returns the
        logits ``[B, V]`` (a graph's output buffer when replayed: read it before the next
        step) and how the step ran: ``"graph"`` (replayed), ``"capture"`` (captured, then
        replayed) or ``"static"`` (eagerly)."""
        layers: list[kv.GrowableLayer] = cache.layers  # type: ignore[assignment]
        width = layers[0].get_seq_length()
        if width + 1 > layers[0]._k.shape[-2]:  # type: ignore[union-attr]
            for layer in layers:
                layer.reserve(width + 1 + kv.GROW_TOKENS)
        state = cache.decode_state
        key = _key(layers)
        if not isinstance(state, _LaneState) or state.key != key:
            state = cache.decode_state = self._new_state(key, layers, width, ids.shape[0])
        self._fill(state, ids, mask, positions, width)
        if state.graph is not None:
            state.graph.replay()
            logits, mode = state.logits, "graph"
        else:
            warm = state.steps >= 1 or self.captured > 0
            logits, mode = self._run(state, cache, self.capture and warm)
        for layer in layers:
            layer._len = width + 1
        state.steps += 1
        assert logits is not None
        return logits, mode

    def _new_state(
        self, key: _Key, layers: list[kv.GrowableLayer], width: int, rows: int
    ) -> _LaneState:
        for layer in layers:  # the masked columns must hold finite numbers (see above)
            layer._k[:, :, width:].zero_()  # type: ignore[index]
            layer._v[:, :, width:].zero_()  # type: ignore[index]
        capacity = layers[0]._k.shape[-2]  # type: ignore[union-attr]
        device = layers[0]._k.device  # type: ignore[union-attr]
        long = dict(dtype=torch.long, device=device)
        return _LaneState(
            key=key,
            ids=torch.zeros(rows, 1, **long),
            positions=torch.zeros(rows, 1, **long),
            valid=torch.zeros(rows, capacity, dtype=torch.bool, device=device),
            mask=torch.zeros(rows, 1, 1, capacity, dtype=self._dtype, device=device),
            write_at=torch.zeros(1, **long),
        )

    def _fill(
        self,
        state: _LaneState,
        ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        width: int,
    ) -> None:
        # Only the lane's own columns travel (a bool each); the step turns them into the
        # additive mask on the device. Building that mask on the host (bf16, rows x capacity)
        # and copying it was 15 % of the engine thread at 64 streams on an H100.
        state.valid[:, : mask.shape[1]].copy_(mask)
        state.ids.copy_(ids)
        state.positions.copy_(positions)
        state.write_at.fill_(width)

    def _run(
        self, state: _LaneState, cache: kv.GrowableCache, capture: bool
    ) -> tuple[torch.Tensor, str]:
        """The step eagerly (``"static"``), or captured and then replayed (``"capture"``).
        Eager steps and captures run on the capture stream (the process's first eager step is
        the warm-up CUDA graphs want); a replay runs on the current stream."""
        layers: list[kv.GrowableLayer] = cache.layers  # type: ignore[assignment]
        for layer in layers:
            layer.write_at = state.write_at
        try:
            if self._stream is None:
                return self._forward_step(state, cache), "static"
            current = torch.cuda.current_stream(self._device)
            self._stream.wait_stream(current)
            graph = None
            with torch.cuda.stream(self._stream):
                if capture:
                    graph = self._capture(state, cache)
                if graph is None:
                    logits = self._forward_step(state, cache)
            current.wait_stream(self._stream)
            if graph is not None:
                graph.replay()
                return state.logits, "capture"  # type: ignore[return-value]
            logits.record_stream(current)  # made on the capture stream, read on this one
            return logits, "static"
        finally:
            for layer in layers:
                layer.write_at = None

    def _forward_step(self, state: _LaneState, cache: kv.GrowableCache) -> torch.Tensor:
        """The additive mask from ``valid``, then the forward: what a graph captures."""
        state.mask.fill_(float("-inf"))
        state.mask.masked_fill_(state.valid[:, None, None, :], 0.0)
        return self._forward(state.ids, state.mask, state.positions, cache)

    def _capture(self, state: _LaneState, cache: kv.GrowableCache) -> torch.cuda.CUDAGraph | None:
        graph = torch.cuda.CUDAGraph()
        try:
            # Each graph gets a memory pool of its own (its intermediates, freed with it). One
            # pool shared by graphs that come and go failed torch 2.11's caching allocator
            # (an internal assert) at the capture after its last graph was freed.
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                logits = self._forward_step(state, cache)
            except BaseException:
                with contextlib.suppress(Exception):  # ends the capture; the cause is below
                    graph.capture_end()
                raise
            graph.capture_end()
        except Exception:  # noqa: BLE001 - eager steps still work
            log.warning("CUDA graph capture failed; decode steps run without graphs", exc_info=True)
            self.capture = False
            self.failed = True
            return None
        if not self.captured:
            log.info("CUDA graphs: decode steps of steady batches now replay a captured graph")
        state.graph, state.logits = graph, logits
        self.captured += 1
        return graph


def _key(layers: list[kv.GrowableLayer]) -> _Key:
    """What a captured step depends on: every buffer's address, shape and strides."""
    parts: list[object] = []
    for layer in layers:
        k, v = layer._k, layer._v
        assert k is not None and v is not None
        parts += (k.data_ptr(), v.data_ptr(), k.shape, k.stride(), v.stride())
    return tuple(parts)
