"""The engine: one thread that owns torch and runs continuous batching, and its watchdog.

Rooms: ``scheduler`` (torch-free policy: admission, prefill work, preemption, prefix
matching), ``store`` (every byte of KV memory: lanes of the running batch, prefill caches,
prefix blocks), ``runner`` (forward + sampling). This module is the thread loop that carries
the scheduler's decisions out, plus the event-loop facade.

The event loop never touches engine-thread state: ``submit`` and ``abort`` only append to
thread-safe deques and wake the thread; the queue bound counts the streams the event loop
itself holds; the gauges come from what the engine thread publishes. Outputs go back with
``loop.call_soon_threadsafe``, once per step for all requests. A watchdog task on the event
loop reads the thread's published heartbeat: when the thread dies or a step runs past
``step_timeout``, every open stream ends with ``EngineDeadError`` and ``on_dead`` tells the
server to go NOT_SERVING and exit.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import torch

from ..models.base import LoadedModel
from . import kv
from .blocks import PrefixIndex
from .runner import ModelRunner, kv_bytes_per_token, weight_bytes
from .sampling import PenaltyState, TokenLogprobs, prompt_logprobs
from .scheduler import Scheduler, SchedulerConfig
from .sequence import Sequence
from .store import KVStore, Lane
from .types import (
    EngineDeadError,
    EngineObserver,
    FinishReason,
    GenerationRequest,
    QueueFullError,
    RequestTooLargeError,
    RowFailedError,
    StepFailedError,
    StepOutput,
)

log = logging.getLogger(__name__)

NON_FINITE_PROMPT = "the model produced non-finite logits (NaN/inf) over the prompt"


@dataclass(frozen=True)
class EngineConfig:
    max_num_seqs: int = 64
    max_waiting: int = 512
    # The KV pool in tokens (rounded down to whole blocks): lanes with their padding, prefill
    # caches and cached prefix blocks all come out of it.
    kv_cache_tokens: int = 1 << 16
    block_size: int = 16
    # Most (padded) prompt tokens prefilled per step; longer prompts go in chunks this size.
    # The server passes its per-device default (server.prefill_chunk_for); this one is for
    # engines built in-process (tests, bench.engine_profile).
    prefill_chunk_tokens: int = 512
    prefix_caching: bool = True
    # Watchdog: a step running longer than this declares the engine dead.
    step_timeout: float = 60.0
    max_lanes: int = 4
    # Backpressure: a stream whose consumer leaves this many outputs unread is paused (its
    # seat, compute and KV freed) until it has read all but a quarter of them; 0: never.
    max_stream_backlog: int = 3
    # Decode steps on CUDA replay CUDA graphs (graphs.py); static_decode as ModelRunner's.
    cuda_graphs: bool = True
    static_decode: bool | None = None


class RequestStream:
    """Async iterator over one request's outputs, fed from the engine thread.

    Outputs arrive once per engine step for all streams at once (:meth:`Engine._flush`), and
    the consumer gets what piled up since it last looked as one merged output: one gRPC message
    for several tokens when it fell behind.

    Backpressure: the consumer (the servicer) takes outputs only once gRPC has sent the last
    message, so outputs pile up here when the client does not read. At ``backlog`` unread
    outputs that arrived while the consumer was away sending (not waiting here: then it is
    merely behind on a busy event loop and takes them all at its next turn), the request is
    paused on the engine (seat and KV freed, nothing computed for it); once the consumer is
    down to a quarter of that, it is resumed. Both are messages to the engine thread, like
    aborts: the event loop never touches the engine's structures.
    """

    def __init__(self, engine: Engine, loop: asyncio.AbstractEventLoop, backlog: int) -> None:
        self._engine = engine
        self._loop = loop
        self._queue: asyncio.Queue[StepOutput] = asyncio.Queue()
        self.seq: Sequence | None = None
        self._ended = False  # a final output was delivered (event loop)
        self.finished = False  # the consumer saw it
        self._backlog = backlog
        self._paused = False
        self._held: StepOutput | None = None  # an abort taken from the queue, yielded next
        self._consumer_waiting = False  # the consumer is waiting here for the next output

    def _deliver(self, out: StepOutput) -> None:
        if self._ended:
            return  # already failed by the watchdog; late engine output is dropped
        self._queue.put_nowait(out)
        if out.finish_reason is not None:
            self._ended = True
            self._engine._stream_ended(self)
        elif (
            self._backlog
            and not self._paused
            and not self._consumer_waiting
            and self._queue.qsize() >= self._backlog
            and self.seq is not None
        ):
            self._paused = True
            self._engine.pause(self.seq)

    def fail(self, error: BaseException) -> None:
        """Ends the stream from the event loop (the engine is dead)."""
        self._deliver(StepOutput(finish_reason=FinishReason.ABORTED, error=error))

    def __aiter__(self) -> AsyncIterator[StepOutput]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[StepOutput]:
        while not self.finished:
            if self._held is None:
                self._consumer_waiting = True
                try:
                    out = await self._queue.get()
                finally:
                    self._consumer_waiting = False
            else:
                out, self._held = self._held, None
            outs = [out]
            while outs[-1].finish_reason is None and not self._queue.empty():
                out = self._queue.get_nowait()
                if out.finish_reason is FinishReason.ABORTED:
                    self._held = out  # an error ends the stream after the tokens before it
                    break
                outs.append(out)
            out = merged(outs)
            if out.finish_reason is not None:
                self.finished = True
            elif self._paused and self._queue.qsize() <= self._backlog // 4 and not self._ended:
                self._paused = False
                assert self.seq is not None
                self._engine.resume(self.seq)
            yield out

    def abort(self) -> None:
        if not self._ended and self.seq is not None:
            self._engine.abort(self.seq)


def merged(outs: list[StepOutput]) -> StepOutput:
    """Consecutive outputs of one request as one (the last one's ending and usage)."""
    if len(outs) == 1:
        return outs[0]
    last = outs[-1]
    return StepOutput(
        text="".join(o.text for o in outs),
        token_ids=[t for o in outs for t in o.token_ids],
        logprobs=[lp for o in outs for lp in o.logprobs],
        prompt_logprobs=outs[0].prompt_logprobs,
        finish_reason=last.finish_reason,
        usage=last.usage,
        error=last.error,
    )


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
        self.runner = ModelRunner(loaded, config.cuda_graphs, config.static_decode)
        self._device = self.runner.logits_device  # penalties and grammars meet the logits
        self.prefix: PrefixIndex[torch.Tensor] | None = (
            PrefixIndex() if config.prefix_caching else None
        )
        self.kv = KVStore(
            total_blocks=config.kv_cache_tokens // config.block_size,
            block_size=config.block_size,
            bytes_per_token=kv_bytes_per_token(loaded.model, loaded.dtype),
            weight_bytes=weight_bytes(loaded.model),
            vocab=self.runner.vocab,
            device=self._device,
            prefix=self.prefix,
            max_lanes=config.max_lanes,
        )
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.prefill_chunk_tokens, config.block_size),
            self.kv,
            self.prefix,
        )
        # Handed from the event loop to the thread.
        self._inbox: collections.deque[Sequence] = collections.deque()
        self._aborts: collections.deque[Sequence] = collections.deque()
        # Outputs of this step, per event loop, handed over together (_flush).
        self._outbox: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, StepOutput]]] = {}
        # (request, True: pause / False: resume), in the order the event loop decided them.
        self._pauses: collections.deque[tuple[Sequence, bool]] = collections.deque()
        self._wake = threading.Event()
        # Event-loop side only.
        self._streams: dict[int, RequestStream] = {}
        self._watchdog: asyncio.Task[None] | None = None
        self.dead: str | None = None
        self.on_dead: Callable[[str], None] | None = None
        # Published by the engine thread (plain attribute writes, read by the watchdog).
        self._step_started: float | None = None
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="glmserve-engine", daemon=True)

    # ---- event-loop side -------------------------------------------------------------------

    @property
    def pool_tokens(self) -> int:
        return self.kv.total_blocks * self.config.block_size

    def start(self) -> None:
        self._thread.start()
        with contextlib.suppress(RuntimeError):  # no running loop: no watchdog (tests)
            self._watchdog = asyncio.get_running_loop().create_task(self._watch())

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop = True
        self._wake.set()
        if self._watchdog is not None:
            self._watchdog.cancel()
        self._thread.join(timeout)

    def submit(self, request: GenerationRequest) -> RequestStream:
        """Queues a request. Raises QueueFullError, RequestTooLargeError or EngineDeadError
        at once."""
        if self.dead is not None:
            raise EngineDeadError(f"the engine is down ({self.dead})")
        if not request.request_id:
            request.request_id = uuid.uuid4().hex
        self._check_fits(request)
        cfg = self.config
        if len(self._streams) >= cfg.max_num_seqs + cfg.max_waiting:
            raise QueueFullError(
                f"server busy: {len(self._streams)} requests in flight (--max-num-seqs "
                f"{cfg.max_num_seqs} + --max-waiting {cfg.max_waiting}); retry later"
            )
        stream = RequestStream(self, asyncio.get_running_loop(), cfg.max_stream_backlog)
        seq = Sequence(
            request,
            lambda out: self._post(stream, out),
            self.loaded.tokenizer,
            self.loaded.chat_format.reply_filter(),
            self._device,
            self.observer,
        )
        stream.seq = seq
        self._streams[id(stream)] = stream
        self._inbox.append(seq)
        self._wake.set()
        return stream

    def _check_fits(self, request: GenerationRequest) -> None:
        """A request that could never fit the pool, even alone, is refused at once."""
        prompt, params = len(request.prompt_ids), request.params
        reply = params.max_tokens if params.max_tokens_requested else 1
        usable = self.pool_tokens - kv.GROW_TOKENS  # a row keeps spare room to grow into
        if prompt + reply > usable:
            what = (
                f"prompt ({prompt} tokens) + max_tokens ({reply}) = {prompt + reply} tokens"
                if params.max_tokens_requested
                else f"the prompt ({prompt} tokens)"
            )
            raise RequestTooLargeError(
                f"{what} exceeds the KV-cache pool, which holds {usable} tokens for one "
                "request; lower max_tokens or shorten the prompt"
            )

    def abort(self, seq: Sequence) -> None:
        self._aborts.append(seq)
        self._wake.set()

    def pause(self, seq: Sequence) -> None:
        self._pauses.append((seq, True))
        self._wake.set()

    def resume(self, seq: Sequence) -> None:
        self._pauses.append((seq, False))
        self._wake.set()

    def _stream_ended(self, stream: RequestStream) -> None:
        self._streams.pop(id(stream), None)

    async def _watch(self) -> None:
        interval = min(1.0, self.config.step_timeout / 4)
        while not self._stop:
            await asyncio.sleep(interval)
            if self._stop:
                return
            reason = None
            started = self._step_started
            if not self._thread.is_alive():
                reason = "the engine thread died"
            elif started is not None and time.monotonic() - started > self.config.step_timeout:
                reason = (
                    f"an engine step has run for more than {self.config.step_timeout:g} s "
                    "(--step-timeout-seconds)"
                )
            if reason is not None:
                self._die(reason)
                return

    def _die(self, reason: str) -> None:
        self.dead = reason
        log.error("engine is dead: %s", reason)
        error = EngineDeadError(f"the model server's engine failed ({reason}); retry later")
        for stream in list(self._streams.values()):
            stream.fail(error)
        if self.on_dead is not None:
            self.on_dead(reason)

    # ---- engine thread -----------------------------------------------------------------------

    def _post(self, stream: RequestStream, out: StepOutput) -> None:
        """Engine thread: queues an output for the next :meth:`_flush`."""
        self._outbox.setdefault(stream._loop, []).append((stream, out))

    def _flush(self) -> None:
        """Engine thread: hands the queued outputs to their event loops, one wake-up per loop
        (not one per request and token: at 200 rows that was 200 self-pipe writes a step)."""
        if not self._outbox:
            return
        outbox, self._outbox = self._outbox, {}
        for loop, items in outbox.items():
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening
                loop.call_soon_threadsafe(_deliver_all, items)

    def _run(self) -> None:
        # Everything on this thread, batch surgery included, works on inference tensors.
        with torch.inference_mode():
            while not self._stop:
                try:
                    self._iteration()
                except Exception as exc:  # noqa: BLE001 - one bad step must not kill the server
                    log.exception("engine step failed; failing the requests in it")
                    self._fail_all(StepFailedError(f"generation failed: {type(exc).__name__}"))
                finally:
                    self._step_started = None
                    self._flush()

    def _iteration(self) -> None:
        if self._aborts or self._pauses:  # they free KV (a lane's rows are copied): watched
            self._step_started = time.monotonic()
        self._take_inbox()
        self._apply_aborts()
        self._apply_pauses()
        sched = self.scheduler
        if not sched.has_work():
            self._step_started = None
            self._publish()
            self._flush()  # aborted requests' last outputs
            self._wake.wait(timeout=1.0)
            self._wake.clear()
            return
        self._step_started = time.monotonic()
        admitted = sched.admit()
        for seq in admitted:
            if seq.cached_prompt_tokens is None:
                seq.cached_prompt_tokens = seq.num_computed
            if seq.prefix_hit:
                self.kv.load_prefix(seq, seq.prefix_hit)  # type: ignore[arg-type]
                seq.prefix_hit = []
                # The hit's full blocks are cached already: caching the request's blocks
                # later must not evict other requests' blocks to make room for them again.
                seq.cached_blocks = seq.num_computed // self.config.block_size
        if admitted:  # the gauges count a request as running before its first token is out
            self._publish()
        self._prefill_step()
        self._flush()  # first tokens out before the decode step
        self._decode_step()
        self._publish()

    def _take_inbox(self) -> None:
        while self._inbox:
            self.scheduler.add(self._inbox.popleft())

    def _apply_aborts(self) -> None:
        if not self._aborts:
            return
        # The aborted requests stay referenced until removed: one that just finished may be
        # freed here otherwise, and a request submitted meanwhile could reuse its id().
        aborted = []
        while self._aborts:
            aborted.append(self._aborts.popleft())
        keys = set(map(id, aborted))
        # A request is submitted before it can be aborted: taking the inbox after draining the
        # aborts guarantees every aborted request is visible below (none slips through).
        self._take_inbox()
        for seq in self.scheduler.remove(keys):
            self._release(seq)
            seq.state = "finished"
            seq.abort()
        self._publish()

    def _apply_pauses(self) -> None:
        """Parks the requests whose clients stopped reading and requeues those that caught
        up (in order: a pause and its resume may arrive in one batch)."""
        if not self._pauses:
            return
        self._take_inbox()  # as for aborts: a paused request is always visible below
        leaving: dict[int, tuple[Lane, list[Sequence]]] = {}
        while self._pauses:
            seq, pause = self._pauses.popleft()
            if pause and seq.state in ("waiting", "prefilling", "running"):
                self._park(seq, leaving)
            elif not pause and seq.state == "paused":
                self.scheduler.unpark(seq)
        # Clients tend to stall together (a burst of slow readers): a lane copies its rows
        # once for all of its rows that leave, not once per row.
        for lane, rows in leaving.values():
            self.kv.leave(lane, rows, shrink=True)
        self._publish()

    def _park(self, seq: Sequence, leaving: dict[int, tuple[Lane, list[Sequence]]]) -> None:
        """Frees a paused request's seat and KV. A running row's blocks (its last, partial one
        too) go to the prefix cache first, so resuming recomputes only its last token; the
        row itself is added to ``leaving`` (by lane), for the caller to remove."""
        if seq.state == "running":
            lane = self.kv.lane_of(seq)
            self._cache_prefix(seq, lane.cache, lane.mask, lane.rows.index(seq), final=True)
            leaving.setdefault(id(lane), (lane, []))[1].append(seq)
        elif seq.state == "prefilling":
            self.kv.drop_pending(seq)
        self.scheduler.park(seq)
        log.debug(
            "paused: the client is not reading",
            extra={"fields": {"request_id": seq.request_id, "tokens": seq.num_tokens}},
        )

    def _release(self, seq: Sequence) -> None:
        """Frees the KV of a request that is leaving (its state says where it is)."""
        if seq.state == "prefilling":
            self.kv.drop_pending(seq)
        elif seq.state == "running":
            self.kv.leave(self.kv.lane_of(seq), [seq])

    def _preempt(self, seq: Sequence) -> None:
        if seq.state == "running":
            self.kv.leave(self.kv.lane_of(seq), [seq], shrink=True)
        else:
            self.kv.drop_pending(seq)
        log.info(
            "preempted",
            extra={"fields": {"request_id": seq.request_id, "tokens": seq.num_tokens}},
        )

    def _end(self, seqs: list[Sequence], error: BaseException) -> None:
        """Ends requests that were taken out of the KV store already, with an error."""
        for seq in seqs:
            self.scheduler.finished(seq)
            seq.abort(error)

    # ---- prefill ---------------------------------------------------------------------------

    def _prefill_step(self) -> None:
        plan = self.scheduler.next_prefill()
        if not plan:
            return
        head, n = plan[0]
        if len(plan) == 1 and n < head.num_tokens - head.num_computed:
            self._prefill_chunk(head, n)
        else:
            self._prefill_group([s for s, _ in plan])

    def _prefill_chunk(self, seq: Sequence, n: int) -> None:
        """One chunk of a prompt longer than the per-step budget, into its own cache."""
        cache, mask = self.kv.chunk_cache(seq)
        start = seq.num_computed
        ids = torch.tensor([seq.tokens[start : start + n]])
        mask = torch.cat([mask, torch.ones(1, n, dtype=torch.long)], dim=1)
        positions = torch.arange(start, start + n).unsqueeze(0)
        scoring = seq.scores_prompt
        try:
            logits = self.runner.forward(ids, mask, positions, cache, all_positions=scoring)
        except Exception as exc:  # noqa: BLE001 - pinned on this request alone
            log.exception("prefill chunk failed")
            self.kv.drop_pending(seq)
            self._end([seq], StepFailedError(f"prefill failed: {type(exc).__name__}"))
            return
        if scoring and not self._score_prompt(seq, logits[0], start):
            self.kv.drop_pending(seq)
            self._end([seq], RowFailedError(NON_FINITE_PROMPT))
            return
        for layer in cache.layers:  # room for the whole prompt: one copy, not one per chunk
            layer.reserve(seq.num_tokens + kv.GROW_TOKENS)
        self.kv.set_chunk_mask(seq, mask)
        seq.num_computed += n
        self.observer.step("prefill", 1, n)

    def _prefill_group(self, group: list[Sequence]) -> None:
        """Prefills the rest of each prompt in one left-padded forward, samples each first
        token; the unfinished rows join a lane."""
        todo = [s.num_tokens - s.num_computed for s in group]
        longest = max(todo)
        cache, cached_mask = self.kv.take_group(group, spare=longest)
        ids = torch.zeros(len(group), longest, dtype=torch.long)
        new_mask = torch.zeros(len(group), longest, dtype=torch.long)
        positions = torch.zeros(len(group), longest, dtype=torch.long)
        for i, (s, n) in enumerate(zip(group, todo)):
            ids[i, longest - n :] = torch.tensor(s.tokens[s.num_computed :])
            new_mask[i, longest - n :] = 1
            positions[i, longest - n :] = torch.arange(s.num_computed, s.num_tokens)
        mask = torch.cat([cached_mask, new_mask], dim=1)
        scoring = any(s.scores_prompt for s in group)
        t0 = time.perf_counter()
        try:
            logits = self.runner.forward(ids, mask, positions, cache, all_positions=scoring)
        except Exception as exc:  # noqa: BLE001 - this step's requests fail, nobody else
            log.exception("prefill failed")
            self._end(group, StepFailedError(f"prefill failed: {type(exc).__name__}"))
            return
        unscored: set[int] = set()  # rows whose prompt logits were not finite
        if scoring:
            for i, (s, n) in enumerate(zip(group, todo)):
                # Row i's positions: columns longest - n ..; the last one picks the next token.
                if s.scores_prompt and not self._score_prompt(
                    s, logits[i, longest - n : -1], s.num_computed
                ):
                    unscored.add(i)
            logits = logits[:, -1, :].clone()  # the [B, L, V] logits go now
        self.observer.step("prefill", len(group), sum(todo))
        log.debug(
            "prefill %d seqs %d tokens %.1f ms",
            len(group),
            sum(todo),
            (time.perf_counter() - t0) * 1e3,
        )
        for s in group:
            s.num_computed = s.num_tokens
        if scoring:
            group, cache, mask, logits = self._end_at_prefill(group, unscored, cache, mask, logits)
            if not group:
                return
        penalties = None
        if any(s.params.needs_penalties for s in group):
            penalties = PenaltyState(
                [(s.prompt_ids, s.output_ids) for s in group], self.runner.vocab, logits.device
            )
        try:
            result = self.runner.sample(logits, [s.sampling for s in group], penalties)
        except Exception as exc:  # noqa: BLE001
            log.exception("sampling failed")
            self._end(group, StepFailedError(f"sampling failed: {type(exc).__name__}"))
            return
        joining = []
        for i, s in enumerate(group):
            token = result.tokens[i]
            if token is None:
                self._end([s], RowFailedError(result.failed[i]))
                continue
            # Cached now, not when it finishes: a shared system prompt helps the next request.
            self._cache_prefix(s, cache, mask, i)
            if self._append(s, token, result.logprobs.get(i)):
                if not s.failed:
                    self._cache_prefix(s, cache, mask, i, final=True)
                self.scheduler.finished(s)
            else:
                joining.append(i)
        if not joining:
            return
        if len(joining) < len(group):
            cache, mask = kv.select(cache, mask, torch.tensor(joining))
        rows = [group[i] for i in joining]
        self.scheduler.joined(rows)
        # Admission reserved each row alone: a group's padding (within the prefill budget), or
        # a lane that changed since, can make the join short of room.
        self.scheduler.make_room(
            lambda: self.kv.join_cost(len(rows), mask.shape[1]), self._preempt, rows
        )
        self.kv.join(rows, cache, mask)

    def _score_prompt(self, seq: Sequence, logits: torch.Tensor, start: int) -> bool:
        """Prompt log-probabilities of the tokens after positions ``start ..`` (one row of
        ``logits`` each, this prefill step's only), kept on the request until its first output;
        False when those logits are not finite."""
        if logits.shape[0] == 0:
            return True
        targets = seq.prompt_ids[start + 1 : start + 1 + logits.shape[0]]
        scores = prompt_logprobs(logits, targets, seq.params.prompt_logprobs or 0)
        if scores is None or seq.prompt_scores is None:
            return False
        seq.prompt_scores.extend(scores)
        return True

    def _end_at_prefill(
        self,
        group: list[Sequence],
        unscored: set[int],
        cache: kv.GrowableCache,
        mask: torch.Tensor,
        logits: torch.Tensor,
    ) -> tuple[list[Sequence], kv.GrowableCache, torch.Tensor, torch.Tensor]:
        """Ends the rows that are done once prefilled: a prompt whose logits were not finite,
        and prompt-only requests (max_tokens 0: never sampled, never decoded). Returns the
        rest of the group with its cache rows and last-position logits."""
        keep = []
        for i, s in enumerate(group):
            if i in unscored:
                self._end([s], RowFailedError(NON_FINITE_PROMPT))
            elif s.params.max_tokens == 0:
                self._cache_prefix(s, cache, mask, i, final=True)
                self.scheduler.finished(s)
                s.finish_scored()
            else:
                keep.append(i)
        if len(keep) == len(group) or not keep:
            return [group[i] for i in keep], cache, mask, logits
        rows = torch.tensor(keep)
        cache, mask = kv.select(cache, mask, rows)
        return [group[i] for i in keep], cache, mask, logits[rows.to(logits.device)]

    def _cache_prefix(
        self,
        seq: Sequence,
        cache: kv.GrowableCache,
        mask: torch.Tensor,
        row: int,
        final: bool = False,
    ) -> None:
        """Keeps the request's full blocks for later requests with the same prefix, and when
        the row is ``final`` (it leaves) its last, partial block too, evicting
        least-recently-used blocks for room (never preempting anyone for it)."""
        if self.prefix is None:
            return
        bs = self.config.block_size
        want = seq.num_computed // bs - seq.cached_blocks
        if final and seq.num_computed % bs:
            want += 1
        if want <= 0:
            return
        self.scheduler.free_up(want)
        try:
            self.kv.cache_prefix(
                seq, cache, mask, row, min(want, self.scheduler.available()), final
            )
        except Exception:  # noqa: BLE001 - caching is an optimisation, never a failure
            log.exception("prefix caching failed; continuing without it for this request")

    # ---- decode ----------------------------------------------------------------------------

    def _decode_step(self) -> None:
        if not self.kv.lanes:
            return
        if self.kv.decode_growth() and not self.scheduler.make_room(
            self.kv.decode_growth, self._preempt
        ):
            # Even with everyone else preempted the pool cannot hold one more token.
            for lane in list(self.kv.lanes):
                if lane.width + 1 > lane.capacity():
                    self.kv.drop_lane(lane)
                    for s in lane.rows:
                        self.scheduler.finished(s)
                        s.truncate()
        for lane in list(self.kv.lanes):
            self._decode_lane(lane)

    def _fail_lane(self, lane: Lane, what: str, exc: Exception) -> None:
        log.exception("%s failed for a lane of %d requests", what, len(lane.rows))
        self.kv.drop_lane(lane)
        self._end(list(lane.rows), StepFailedError(f"{what} failed: {type(exc).__name__}"))

    def _decode_lane(self, lane: Lane) -> None:
        rows = lane.rows
        ids = torch.tensor([[s.output_ids[-1]] for s in rows])
        positions = torch.tensor([[s.num_tokens - 1] for s in rows])
        mask = torch.cat([lane.mask, torch.ones(len(rows), 1, dtype=torch.long)], dim=1)
        try:
            logits, mode = self.runner.decode(ids, mask, positions, lane.cache)
        except Exception as exc:  # noqa: BLE001 - the lane's cache is now inconsistent
            self._fail_lane(lane, "decode", exc)
            return
        lane.mask = mask
        self.observer.step("decode", len(rows), len(rows))
        self.observer.decode_step(mode)
        for s in rows:
            s.num_computed += 1
        try:
            result = self.runner.sample(logits, [s.sampling for s in rows], lane.penalties)
        except Exception as exc:  # noqa: BLE001
            self._fail_lane(lane, "sampling", exc)
            return
        if lane.penalties is not None:
            lane.penalties.record(
                torch.tensor([t or 0 for t in result.tokens], device=logits.device)
            )
        done: list[Sequence] = []
        for i, s in enumerate(rows):
            token = result.tokens[i]
            if token is None:
                done.append(s)
                s.abort(RowFailedError(result.failed[i]))
            elif self._append(s, token, result.logprobs.get(i)):
                if not s.failed:
                    self._cache_prefix(s, lane.cache, lane.mask, i, final=True)
                done.append(s)
        if done:
            self.kv.leave(lane, done)
            for s in done:
                self.scheduler.finished(s)

    def _append(self, seq: Sequence, token: int, logprobs: TokenLogprobs | None = None) -> bool:
        """Adds a token; True when the request is done (finished, or failed alone)."""
        try:
            return seq.append_token(token, self.loaded.eos_token_ids, logprobs)
        except Exception as exc:  # noqa: BLE001 - e.g. a detokenizer bug: this request only
            log.exception("appending a token failed")
            seq.failed = True
            seq.abort(StepFailedError(f"generation failed: {type(exc).__name__}"))
            return True

    def _fail_all(self, error: BaseException) -> None:
        """A failure outside any one forward (a bug in the loop, e.g. in admission): every
        request in the engine ends, the queued ones too, since a failure that repeats at
        every iteration would otherwise leave them waiting forever."""
        sched = self.scheduler
        self._take_inbox()
        for seq in [*sched.waiting, *sched.prefilling, *sched.running, *sched.paused]:
            sched.finished(seq)
            seq.abort(error)
        self.kv.reset()
        self._publish()

    def _publish(self) -> None:
        sched = self.scheduler
        self.observer.queue_changed(
            sched.num_admitted, len(sched.waiting) + len(self._inbox), len(sched.paused)
        )
        self.observer.kv_usage(
            self.kv.used_blocks(),
            self.kv.total_blocks,
            self.config.block_size,
            len(self.prefix) if self.prefix is not None else 0,
        )
        self.observer.scheduler_counters(
            sched.num_preemptions, sched.prefix_queries, sched.prefix_hits, sched.num_pauses
        )


def _deliver_all(items: list[tuple[RequestStream, StepOutput]]) -> None:
    for stream, out in items:
        stream._deliver(out)
