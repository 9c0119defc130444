"""The scheduler: who waits, who is admitted, what is prefilled next, who is preempted.

Torch-free, so it is unit-tested with fake requests and a fake memory model in milliseconds.
It decides; the engine loop carries the decisions out on the KV store and the model.

- **Admission** is first come, first served, while seats (``max_num_seqs``) and KV memory
  last. Nothing is reserved for ``max_tokens``: a request reserves the blocks its row will
  take when it joins the running batch (prompt + spare room), until it has joined. Admission
  also keeps the running lanes' next growth free, so a newcomer does not immediately force a
  preemption.
- **Prefix caching**: at admission the request's full prompt blocks are looked up in the
  prefix index, then the partial block an earlier request may have ended with right after
  them (the previous turn of a chat); the hit is loaded instead of recomputed (at least one
  token is always computed, so there are logits to sample from).
- **Prefill** runs under a per-step token budget: the oldest admitted prompt plus prompts of
  similar remaining length, while ``rows x longest`` (padding is compute too) fits; a longer
  prompt is prefilled alone in chunks.
- **Pausing** (backpressure): a request whose client stopped reading is parked: it leaves
  its seat and KV (like a preemption) and is not scheduled until it is resumed, then it goes
  back to the front of the queue.
- **Preemption**: when memory runs out, cached prefix blocks go first (least recently used),
  then the most recently admitted request: it loses its KV, goes back to the front of the
  queue and is later recomputed from its prompt plus the tokens it already streamed.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from .blocks import PrefixIndex, chain_hashes, tail_hash


class SchedSeq(Protocol):
    """What the scheduler needs of a request (the engine's ``Sequence``; fakes in tests)."""

    request_id: str
    state: str  # waiting | prefilling | running | paused | finished
    num_computed: int  # tokens whose KV the request holds
    admitted_order: int
    reserved_blocks: int
    block_hashes: list[bytes]
    prefix_hit: list[Any]  # cached blocks to load at admission (the last may be partial)
    scores_prompt: bool  # needs every prompt position's logits: nothing from the prefix cache

    @property
    def tokens(self) -> list[int]:
        """Prompt + generated tokens: what a (re)computation must cover."""
        ...

    @property
    def num_tokens(self) -> int: ...

    def reset_for_recompute(self) -> None:
        """Forget the KV (preempted); generated tokens and sampling state are kept."""
        ...


class MemoryModel(Protocol):
    """KV memory in blocks, as the KV store sees it (padding and spare room included)."""

    def free_blocks(self) -> int:
        """Blocks not held by the running lanes, prefill caches or the prefix cache."""
        ...

    def join_cost(self, rows: int, width: int) -> int:
        """Blocks that ``rows`` new rows of ``width`` tokens add when they join."""
        ...

    def growth_reserve(self) -> int:
        """Blocks the running lanes take at their next growth."""
        ...

    def pending_blocks(self, seq: Any) -> int:
        """Blocks a prefilling request's own cache holds already (a prefix hit, chunks)."""
        ...


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    prefill_chunk_tokens: int = 256
    block_size: int = 16


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        memory: MemoryModel,
        prefix: PrefixIndex[Any] | None = None,
    ) -> None:
        self.config = config
        self.memory = memory
        self.prefix = prefix
        self.waiting: deque[SchedSeq] = deque()
        self.prefilling: list[SchedSeq] = []
        self.running: list[SchedSeq] = []  # in a lane of the running batch
        self.paused: list[SchedSeq] = []  # parked until their clients read again (no KV)
        self._order = itertools.count()
        # Published as metrics by the engine (tokens for the prefix cache, as vLLM counts).
        self.num_preemptions = 0
        self.num_pauses = 0
        self.prefix_queries = 0
        self.prefix_hits = 0

    # ---- queues ----------------------------------------------------------------------------

    @property
    def num_admitted(self) -> int:
        return len(self.prefilling) + len(self.running)

    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running)

    def add(self, seq: SchedSeq) -> None:
        seq.state = "waiting"
        self.waiting.append(seq)

    def remove(self, keys: set[int]) -> list[SchedSeq]:
        """Takes the requests whose ``id()`` is in ``keys`` out of every queue (aborted);
        returns them with their state unchanged, so the engine knows what to free. Requests
        are named by identity: two clients may send the same request id."""
        queues = (*self.waiting, *self.prefilling, *self.running, *self.paused)
        gone = [s for s in queues if id(s) in keys]
        for seq in gone:
            self._unlink(seq)
        return gone

    def joined(self, seqs: Iterable[SchedSeq]) -> None:
        """Prefilled rows that joined the running batch: their reservation is now real memory."""
        for seq in seqs:
            self.prefilling.remove(seq)
            seq.reserved_blocks = 0
            seq.state = "running"
            self.running.append(seq)

    def finished(self, seq: SchedSeq) -> None:
        self._unlink(seq)
        seq.state = "finished"

    def _unlink(self, seq: SchedSeq) -> None:
        if seq.state == "waiting":
            self.waiting.remove(seq)
        elif seq.state == "prefilling":
            self.prefilling.remove(seq)
            seq.reserved_blocks = 0
        elif seq.state == "running":
            self.running.remove(seq)
        elif seq.state == "paused":
            self.paused.remove(seq)

    def park(self, seq: SchedSeq) -> None:
        """Pauses a request whose KV the engine has just freed (or that held none)."""
        self._unlink(seq)
        seq.reset_for_recompute()
        seq.state = "paused"
        self.paused.append(seq)
        self.num_pauses += 1

    def unpark(self, seq: SchedSeq) -> None:
        """Resumes a paused request: first in the queue, as it was admitted before the rest."""
        self.paused.remove(seq)
        seq.state = "waiting"
        self.waiting.appendleft(seq)

    # ---- memory ----------------------------------------------------------------------------

    def _reserved(self) -> int:
        # A prefilling request's cache grows into the row it reserved: what it holds already
        # is counted as used by the memory, so only the rest of its reservation is added.
        return sum(
            max(0, s.reserved_blocks - self.memory.pending_blocks(s)) for s in self.prefilling
        )

    def available(self) -> int:
        """Free blocks after the prefilling requests' reservations (cache not evicted)."""
        return self.memory.free_blocks() - self._reserved()

    def free_up(self, need: int) -> bool:
        """Evicts cached prefix blocks until ``need`` blocks are available."""
        short = need - self.available()
        if short > 0 and self.prefix is not None:
            self.prefix.evict(short)
        return self.available() >= need

    def make_room(
        self,
        need: Callable[[], int],
        preempt: Callable[[SchedSeq], None],
        keep: Iterable[SchedSeq] = (),
    ) -> bool:
        """Frees ``need()`` blocks: cached prefix blocks first, then the most recently
        admitted requests (never one in ``keep``, never the only one left). ``preempt`` frees
        a victim's KV; it is then requeued at the front. ``need`` is asked again after each
        victim, whose leaving may shrink it (a lane that no longer grows, or grows by fewer
        rows). False when even that is not enough."""
        kept = set(map(id, keep))
        while not self.free_up(need()):
            victims = [s for s in (*self.prefilling, *self.running) if id(s) not in kept]
            if not victims or self.num_admitted <= 1:
                return False
            victim = max(victims, key=lambda s: s.admitted_order)
            preempt(victim)
            self._unlink(victim)
            victim.reset_for_recompute()
            victim.state = "waiting"
            self.waiting.appendleft(victim)
            self.num_preemptions += 1
        return True

    # ---- admission and prefill ------------------------------------------------------------

    def admit(self) -> list[SchedSeq]:
        """Admits from the head of the queue while seats and memory last (first come, first
        served: when the head does not fit, everyone behind it waits too)."""
        admitted: list[SchedSeq] = []
        while self.waiting and self.num_admitted < self.config.max_num_seqs:
            seq = self.waiting[0]
            cost = self.memory.join_cost(1, seq.num_tokens)
            if not self.free_up(cost + self.memory.growth_reserve()):
                break
            self.waiting.popleft()
            seq.prefix_hit, seq.num_computed = self._lookup(seq)
            seq.reserved_blocks = cost
            seq.admitted_order = next(self._order)
            seq.state = "prefilling"
            self.prefilling.append(seq)
            admitted.append(seq)
        return admitted

    def _lookup(self, seq: SchedSeq) -> tuple[list[Any], int]:
        """The cached blocks of the request's longest cached prefix, and the tokens they
        hold: full blocks, then possibly the partial block an earlier request ended with."""
        tokens = seq.tokens
        if self.prefix is None or seq.scores_prompt:
            return [], 0
        bs = self.config.block_size
        # The last token is always computed: its logits pick the next token.
        last = len(tokens) - 1
        seq.block_hashes = chain_hashes(tokens[:last], bs, seq.block_hashes)
        hit = self.prefix.match(seq.block_hashes)
        found = len(hit) * bs
        parent = seq.block_hashes[len(hit) - 1] if hit else None
        for size in range(min(bs - 1, last - found), 0, -1):  # the longest partial block
            tail = self.prefix.get(tail_hash(parent, tokens[found : found + size]))
            if tail is not None:
                hit.append(tail)
                found += size
                break
        self.prefix_queries += len(tokens)
        self.prefix_hits += found
        return hit, found

    def next_prefill(self) -> list[tuple[SchedSeq, int]]:
        """This step's prefill work as (request, tokens to compute now).

        The oldest admitted request first. When its remaining tokens exceed the budget it is
        prefilled alone, one chunk; otherwise it is grouped with the requests closest to it in
        remaining length while the padded size (rows x longest) stays within the budget, and
        so does the padding of their cached parts: a group's rows share one cache, each
        left-padded to the longest cached part (a prefix hit, earlier chunks), so a short
        new prompt beside a long conversation's turn would carry thousands of empty
        positions, in memory its admission never reserved and in every step's attention.
        """
        if not self.prefilling:
            return []
        budget = self.config.prefill_chunk_tokens
        head = self.prefilling[0]

        def todo(s: SchedSeq) -> int:
            return s.num_tokens - s.num_computed

        if todo(head) > budget:
            return [(head, budget)]
        group, longest = [head], todo(head)
        others = sorted(
            (s for s in self.prefilling[1:] if todo(s) <= budget),
            key=lambda s: abs(todo(s) - todo(head)),
        )
        for seq in others:
            new_longest = max(longest, todo(seq))
            if new_longest * (len(group) + 1) > budget:
                continue
            cached = [s.num_computed for s in (*group, seq)]
            if sum(max(cached) - c for c in cached) > budget:
                continue
            group.append(seq)
            longest = new_longest
        return [(s, todo(s)) for s in group]
