"""The engine: one thread that owns torch and runs continuous batching.

The event loop never touches torch and this thread never awaits. ``submit`` and ``abort`` are
called from the event loop; they only append to thread-safe queues and wake the thread. Every
step the thread (1) applies aborts, (2) admits waiting requests while seats and KV budget last,
(3) prefills admitted prompts under a per-step token budget (long prompts in chunks), and
(4) runs one decode step for the whole running batch. A long prompt therefore delays everyone's
next token by at most one prefill chunk.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import torch

from ..models.base import LoadedModel
from . import kv
from .sampling import PenaltyState, sample
from .sequence import Sequence
from .types import (
    EngineObserver,
    GenerationRequest,
    QueueFullError,
    RequestTooLargeError,
    StepOutput,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    max_num_seqs: int = 64
    max_waiting: int = 512
    # KV-cache budget in tokens: the sum over running requests of prompt + max_tokens.
    kv_cache_tokens: int = 1 << 20
    # Most prompt tokens prefilled per step; longer prompts are prefilled in chunks this size.
    prefill_chunk_tokens: int = 512


class RequestStream:
    """Async iterator over one request's outputs, fed from the engine thread."""

    def __init__(self, engine: Engine, request_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self._engine = engine
        self.request_id = request_id
        self._loop = loop
        self._queue: asyncio.Queue[StepOutput] = asyncio.Queue()
        self.finished = False

    def put_threadsafe(self, out: StepOutput) -> None:
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening any more
            self._loop.call_soon_threadsafe(self._queue.put_nowait, out)

    def __aiter__(self) -> AsyncIterator[StepOutput]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[StepOutput]:
        while not self.finished:
            out = await self._queue.get()
            if out.finish_reason is not None:
                self.finished = True
            yield out

    def abort(self) -> None:
        if not self.finished:
            self._engine.abort(self.request_id)


class _Batch:
    """The running batch: rows, their shared left-padded KV cache and attention mask."""

    def __init__(self) -> None:
        self.rows: list[Sequence] = []
        self.cache = kv.new_cache()
        self.mask = torch.zeros(0, 0, dtype=torch.long)
        self.penalties: PenaltyState | None = None


class Engine:
    def __init__(
        self,
        loaded: LoadedModel,
        config: EngineConfig,
        observer: EngineObserver | None = None,
    ) -> None:
        self.loaded = loaded
        self.config = config
        self.observer = observer or EngineObserver()
        self._model = loaded.model
        self._device = loaded.device
        self._vocab = int(loaded.model.get_output_embeddings().weight.shape[0])
        params = inspect.signature(self._model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._inbox: collections.deque[Sequence] = collections.deque()
        self._aborts: collections.deque[str] = collections.deque()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._num_waiting = 0  # submitted, not yet admitted (guarded by _lock)
        self._num_active = 0  # admitted, not yet finished (guarded by _lock)
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._prefilling: collections.deque[Sequence] = collections.deque()
        self._chunk_cache: kv.GrowableCache | None = None  # for the head of _prefilling
        self._batch = _Batch()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="glmserve-engine", daemon=True)
        self.error: BaseException | None = None

    # ---- event-loop side -------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout)

    def submit(self, request: GenerationRequest) -> RequestStream:
        """Queues a request. Raises QueueFullError or RequestTooLargeError at once."""
        if not request.request_id:
            request.request_id = uuid.uuid4().hex
        reserved = len(request.prompt_ids) + request.params.max_tokens
        if reserved > self.config.kv_cache_tokens:
            raise RequestTooLargeError(
                f"prompt ({len(request.prompt_ids)} tokens) + max_tokens "
                f"({request.params.max_tokens}) = {reserved} tokens exceeds the KV-cache budget "
                f"of {self.config.kv_cache_tokens} tokens; lower max_tokens or the prompt"
            )
        stream = RequestStream(self, request.request_id, asyncio.get_running_loop())
        seq = Sequence(
            request,
            stream.put_threadsafe,
            self.loaded.tokenizer,
            self.loaded.chat_format.reply_filter(),
            self._device,
            self.observer,
        )
        cfg = self.config
        with self._lock:
            # Seats first, then the bounded queue (the running count may lag by one step,
            # which errs on the side of queueing).
            if self._num_waiting + self.num_running >= cfg.max_num_seqs + cfg.max_waiting:
                raise QueueFullError(
                    f"server busy: {self.num_running} requests running and {self._num_waiting} "
                    f"waiting (--max-num-seqs {cfg.max_num_seqs}, --max-waiting "
                    f"{cfg.max_waiting}); retry later"
                )
            self._num_waiting += 1
            self._inbox.append(seq)
        self._publish_queue()
        self._wake.set()
        return stream

    def abort(self, request_id: str) -> None:
        self._aborts.append(request_id)
        self._wake.set()

    @property
    def num_running(self) -> int:
        """Admitted and not finished (prefilling, mid-join, or decoding)."""
        return self._num_active

    @property
    def num_waiting(self) -> int:
        return self._num_waiting

    # ---- engine thread -----------------------------------------------------------------------

    def _run(self) -> None:
        # Everything on this thread, batch surgery included, works on inference tensors.
        with torch.inference_mode():
            self._loop()

    def _loop(self) -> None:
        while not self._stop:
            try:
                self._take_inbox()
                self._apply_aborts()
                if not (self._waiting or self._prefilling or self._batch.rows):
                    self._wake.wait(timeout=1.0)
                    self._wake.clear()
                    continue
                self._admit()
                if self._prefilling:
                    self._prefill_step()
                if self._batch.rows:
                    self._decode_step()
            except Exception as exc:  # noqa: BLE001 - one bad step must not kill the server
                log.exception("engine step failed; failing the requests in it")
                self._fail_all(exc)

    def _take_inbox(self) -> None:
        while self._inbox:
            self._waiting.append(self._inbox.popleft())

    def _apply_aborts(self) -> None:
        if not self._aborts:
            return
        ids = set()
        while self._aborts:
            ids.add(self._aborts.popleft())
        # A request is submitted before it can be aborted: taking the inbox after draining the
        # aborts guarantees every aborted request is visible below (none slips through).
        self._take_inbox()
        for seq in [s for s in self._waiting if s.request_id in ids]:
            self._waiting.remove(seq)
            with self._lock:
                self._num_waiting -= 1
            seq.abort()
        for seq in [s for s in self._prefilling if s.request_id in ids]:
            if seq is self._prefilling[0]:
                self._chunk_cache = None
            self._prefilling.remove(seq)
            self._end(seq)
        gone = [s for s in self._batch.rows if s.request_id in ids]
        for seq in gone:
            self._end(seq)
        if gone:
            self._drop_finished()
        self._publish_queue()

    def _admit(self) -> None:
        cfg = self.config
        admitted = False
        while self._waiting and self.num_running < cfg.max_num_seqs:
            seq = self._waiting[0]
            if self._reserved + seq.reserved_tokens > cfg.kv_cache_tokens:
                break  # first come, first served: the head waits for room
            self._waiting.popleft()
            with self._lock:
                self._num_waiting -= 1
                self._num_active += 1
            self._prefilling.append(seq)
            admitted = True
        if admitted:
            self._publish_queue()

    @property
    def _reserved(self) -> int:
        """KV tokens reserved by admitted requests (derived, so it can never drift)."""
        return sum(s.reserved_tokens for s in self._prefilling) + sum(
            s.reserved_tokens for s in self._batch.rows if not s.finished
        )

    def _forward(
        self,
        input_ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        cache: kv.GrowableCache,
    ) -> torch.Tensor:
        out = self._model(
            input_ids=input_ids.to(self._device),
            attention_mask=mask.to(self._device),
            position_ids=positions.to(self._device),
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_kw: cache},
        )
        return out.logits[:, -1, :]

    def _prefill_step(self) -> None:
        """Prefills under the per-step budget: one chunk of a long prompt, or a group of short
        prompts in one padded forward. Finished prompts get their first token and join."""
        budget = self.config.prefill_chunk_tokens
        head = self._prefilling[0]
        if len(head.prompt_ids) > budget:
            self._prefill_chunk(head, budget)
            return
        group = self._prefill_group(head, budget)
        total = sum(len(s.prompt_ids) for s in group)
        for s in group:
            self._prefilling.remove(s)
        length = max(len(s.prompt_ids) for s in group)
        ids = torch.zeros(len(group), length, dtype=torch.long)
        mask = torch.zeros(len(group), length, dtype=torch.long)
        for i, s in enumerate(group):
            n = len(s.prompt_ids)
            ids[i, length - n :] = torch.tensor(s.prompt_ids)
            mask[i, length - n :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = kv.new_cache()
        t0 = time.perf_counter()
        logits = self._forward(ids, mask, positions, cache)
        self.observer.step("prefill", len(group), total)
        log.debug(
            "prefill %d seqs %d tokens %.1f ms", len(group), total, (time.perf_counter() - t0) * 1e3
        )
        for s in group:
            s.prefilled = len(s.prompt_ids)
        self._start_decoding(group, logits, cache, mask)

    def _prefill_group(self, head: Sequence, budget: int) -> list[Sequence]:
        """The oldest prompt plus admitted prompts of similar length, while the *padded* size
        (rows x longest) stays within the budget: padding is compute too."""
        group, longest = [head], len(head.prompt_ids)
        others = sorted(
            (s for s in self._prefilling if s is not head and len(s.prompt_ids) <= budget),
            key=lambda s: abs(len(s.prompt_ids) - len(head.prompt_ids)),
        )
        for seq in others:
            new_longest = max(longest, len(seq.prompt_ids))
            if new_longest * (len(group) + 1) > budget:
                continue
            group.append(seq)
            longest = new_longest
        return group

    def _prefill_chunk(self, seq: Sequence, budget: int) -> None:
        if self._chunk_cache is None:
            self._chunk_cache = kv.new_cache()
        start = seq.prefilled
        end = min(len(seq.prompt_ids), start + budget)
        ids = torch.tensor([seq.prompt_ids[start:end]])
        mask = torch.ones(1, end, dtype=torch.long)
        positions = torch.arange(start, end).unsqueeze(0)
        logits = self._forward(ids, mask, positions, self._chunk_cache)
        self.observer.step("prefill", 1, end - start)
        seq.prefilled = end
        if end == len(seq.prompt_ids):
            cache, self._chunk_cache = self._chunk_cache, None
            self._prefilling.popleft()
            self._start_decoding([seq], logits, cache, mask)

    def _start_decoding(
        self,
        group: list[Sequence],
        logits: torch.Tensor,
        cache: kv.GrowableCache,
        mask: torch.Tensor,
    ) -> None:
        """Samples each new sequence's first token; the unfinished ones join the batch."""
        penalties = None
        if any(s.params.needs_penalties for s in group):
            penalties = PenaltyState(
                [(s.prompt_ids, s.output_ids) for s in group], self._vocab, logits.device
            )
        tokens = self._sample(logits, group, penalties)
        keep = [i for i, (s, t) in enumerate(zip(group, tokens)) if not self._append(s, t)]
        if not keep:
            return
        if len(keep) < len(group):
            cache, mask = kv.select(cache, mask, torch.tensor(keep))
        joined = [group[i] for i in keep]
        b = self._batch
        if b.rows:
            b.cache, b.mask = kv.concat([b.cache, cache], [b.mask, mask])
        else:
            b.cache, b.mask = cache, mask
        b.rows.extend(joined)
        self._rebuild_penalties()
        self._publish_queue()

    def _decode_step(self) -> None:
        b = self._batch
        rows = b.rows
        ids = torch.tensor([[s.output_ids[-1]] for s in rows])
        positions = torch.tensor([[s.num_tokens - 1] for s in rows])
        b.mask = torch.cat([b.mask, torch.ones(len(rows), 1, dtype=torch.long)], dim=1)
        logits = self._forward(ids, b.mask, positions, b.cache)
        self.observer.step("decode", len(rows), len(rows))
        tokens = self._sample(logits, rows, b.penalties)
        if b.penalties is not None:
            b.penalties.record(torch.tensor(tokens, device=logits.device))
        finished = False
        for s, t in zip(rows, tokens):
            finished |= self._append(s, t)
        if finished:
            self._drop_finished()
        cached = b.mask.shape[0] * b.mask.shape[1]
        self.observer.kv_usage(self._reserved, self.config.kv_cache_tokens, cached)

    def _sample(
        self, logits: torch.Tensor, rows: list[Sequence], penalties: PenaltyState | None
    ) -> list[int]:
        return sample(
            logits,
            [s.sampling for s in rows],
            self.loaded.eos_token_ids,
            penalties,
            self.loaded.nan_guard_token_id,
        )

    def _append(self, seq: Sequence, token: int) -> bool:
        done = seq.append_token(token, self.loaded.eos_token_ids)
        if done:
            with self._lock:
                self._num_active -= 1
        return done

    def _end(self, seq: Sequence, error: BaseException | None = None) -> None:
        """Ends an admitted sequence early (abort or failure); frees its seat."""
        if not seq.finished:
            seq.abort(error)
            with self._lock:
                self._num_active -= 1

    def _drop_finished(self) -> None:
        b = self._batch
        keep = [i for i, s in enumerate(b.rows) if not s.finished]
        if len(keep) == len(b.rows):
            return
        b.rows = [b.rows[i] for i in keep]
        if b.rows:
            b.cache, b.mask = kv.select(b.cache, b.mask, torch.tensor(keep))
        else:
            b.cache, b.mask = kv.new_cache(), torch.zeros(0, 0, dtype=torch.long)
        self._rebuild_penalties()
        self._publish_queue()

    def _rebuild_penalties(self) -> None:
        b = self._batch
        if any(s.params.needs_penalties for s in b.rows):
            b.penalties = PenaltyState(
                [(s.prompt_ids, s.output_ids) for s in b.rows], self._vocab, self._device
            )
        else:
            b.penalties = None

    def _fail_all(self, exc: BaseException) -> None:
        for seq in list(self._prefilling) + self._batch.rows:
            self._end(seq, exc)
        self._prefilling.clear()
        self._chunk_cache = None
        self._batch = _Batch()
        self._publish_queue()

    def _publish_queue(self) -> None:
        self.observer.queue_changed(self.num_running, self._num_waiting)
        b = self._batch
        self.observer.kv_usage(
            self._reserved, self.config.kv_cache_tokens, b.mask.shape[0] * b.mask.shape[1]
        )
