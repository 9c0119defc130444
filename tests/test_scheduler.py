"""The torch-free scheduler and prefix index, with fake requests and a fake memory model."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from model_server.engine.blocks import PrefixIndex, chain_hashes, tail_hash
from model_server.engine.scheduler import Scheduler, SchedulerConfig

BS = 4


@dataclass(eq=False)
class FakeSeq:
    request_id: str
    prompt: list[int]
    output: list[int] = field(default_factory=list)
    state: str = "new"
    num_computed: int = 0
    admitted_order: int = -1
    reserved_blocks: int = 0
    block_hashes: list[bytes] = field(default_factory=list)
    prefix_hit: list[object] = field(default_factory=list)
    scores_prompt: bool = False

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)

    def reset_for_recompute(self) -> None:
        self.num_computed = 0
        self.prefix_hit = []


class FakeMemory:
    """Each admitted request holds ceil(tokens / BS) blocks once it runs; ``pending``: what
    prefilling requests' own caches hold meanwhile."""

    def __init__(self, total: int, prefix: PrefixIndex | None = None) -> None:
        self.total = total
        self.held: dict[int, int] = {}
        self.pending: dict[int, int] = {}
        self.prefix = prefix

    def free_blocks(self) -> int:
        cached = len(self.prefix) if self.prefix is not None else 0
        return self.total - sum(self.held.values()) - sum(self.pending.values()) - cached

    def pending_blocks(self, seq: FakeSeq) -> int:
        return self.pending.get(id(seq), 0)

    def join_cost(self, rows: int, width: int) -> int:
        return rows * math.ceil(width / BS)

    def growth_reserve(self) -> int:
        return 0


def make(total: int = 100, seats: int = 8, chunk: int = 16, prefix: bool = False):
    index = PrefixIndex() if prefix else None
    memory = FakeMemory(total, index)
    return Scheduler(SchedulerConfig(seats, chunk, BS), memory, index), memory


def run(sched: Scheduler, memory: FakeMemory, seqs: list[FakeSeq]) -> None:
    """Prefill everything admitted and join it (what the engine would do)."""
    for s in list(sched.prefilling):
        s.num_computed = s.num_tokens
        memory.held[id(s)] = memory.join_cost(1, s.num_tokens)
    sched.joined(list(sched.prefilling))


def test_admission_is_first_come_first_served_within_seats():
    sched, _ = make(seats=2)
    seqs = [FakeSeq(f"r{i}", [1] * 5) for i in range(4)]
    for s in seqs:
        sched.add(s)
    assert sched.admit() == seqs[:2]
    assert list(sched.waiting) == seqs[2:]
    assert [s.state for s in seqs] == ["prefilling", "prefilling", "waiting", "waiting"]


def test_nothing_is_reserved_for_max_tokens():
    """48 chat requests with no max_tokens: admission costs only what their rows hold."""
    sched, memory = make(total=48 * 13, seats=64)
    seqs = [FakeSeq(f"r{i}", [1] * 50) for i in range(48)]
    for s in seqs:
        sched.add(s)
    assert len(sched.admit()) == 48


def test_a_head_that_does_not_fit_waits_and_so_does_everyone_behind_it():
    sched, memory = make(total=10)
    big, small = FakeSeq("big", [1] * 30), FakeSeq("small", [1] * 2)
    first = FakeSeq("first", [1] * 12)
    for s in (first, big, small):
        sched.add(s)
    assert sched.admit() == [first]  # 3 blocks; big needs 8 of the 7 left
    assert list(sched.waiting) == [big, small]


def test_make_room_evicts_cache_first_then_preempts_the_youngest():
    sched, memory = make(total=20, prefix=True)
    for i in range(3):
        sched.prefix.insert(bytes([i]), object())
    seqs = [FakeSeq(f"r{i}", [1] * 16) for i in range(4)]  # 4 blocks each
    for s in seqs:
        sched.add(s)
    sched.admit()
    run(sched, memory, seqs)
    assert memory.free_blocks() == 20 - 16 - 3
    preempted: list[FakeSeq] = []

    def preempt(s: FakeSeq) -> None:
        preempted.append(s)
        del memory.held[id(s)]

    assert sched.make_room(lambda: 4, preempt)
    assert preempted == [] and len(sched.prefix) == 0  # the cache went first
    seqs[3].output = [7, 8]  # it streamed two tokens before it was preempted
    assert sched.make_room(lambda: 12, preempt)
    assert preempted == [seqs[3], seqs[2]]  # youngest first
    assert list(sched.waiting) == [seqs[2], seqs[3]]  # back at the front, in order
    assert sched.num_preemptions == 2 and seqs[3].num_computed == 0
    assert seqs[3].tokens[-2:] == [7, 8]  # recomputed later with what it already streamed
    # Never the last admitted request.
    assert not sched.make_room(lambda: 100, preempt)
    assert len(sched.running) == 1 and sched.running[0] is seqs[0]


def test_make_room_keeps_the_joining_rows():
    sched, memory = make(total=12)
    a, b = FakeSeq("a", [1] * 16), FakeSeq("b", [1] * 16)
    for s in (a, b):
        sched.add(s)
    sched.admit()
    run(sched, memory, [a, b])
    gone: list[FakeSeq] = []
    assert sched.make_room(lambda: 8, lambda s: (gone.append(s), memory.held.pop(id(s))), keep=[b])
    assert gone == [a]


def test_make_room_asks_for_the_need_again_after_each_victim():
    """What the running requests need (their next growth) shrinks as victims leave: one
    victim that brings the need within reach is enough."""
    sched, memory = make(total=12)
    seqs = [FakeSeq(f"r{i}", [1] * 12) for i in range(4)]  # 3 blocks each: the pool is full
    for s in seqs:
        sched.add(s)
    sched.admit()
    run(sched, memory, seqs)
    gone: list[FakeSeq] = []

    def preempt(s: FakeSeq) -> None:
        gone.append(s)
        del memory.held[id(s)]

    def growth() -> int:  # one block per running request
        return len(memory.held)

    assert sched.make_room(growth, preempt)
    assert gone == [seqs[3]]  # 3 free, 3 needed; a fixed need of 4 took a second victim


def test_prefix_hits_skip_full_cached_blocks_but_always_compute_the_last_token():
    sched, memory = make(prefix=True)
    conversation = list(range(100, 112))  # 3 full blocks
    for h in chain_hashes(conversation, BS):
        sched.prefix.insert(h, f"block-{h.hex()[:4]}")
    follow_up = FakeSeq("next", conversation + [7, 8, 9])
    exact = FakeSeq("same", list(conversation))
    other = FakeSeq("other", [1] + conversation[1:])
    for s in (follow_up, exact, other):
        sched.add(s)
    sched.admit()
    assert len(follow_up.prefix_hit) == 3 and follow_up.num_computed == 12
    assert len(exact.prefix_hit) == 2 and exact.num_computed == 8  # its last token is computed
    assert other.prefix_hit == [] and other.num_computed == 0  # differs in the first block
    assert sched.prefix_queries == 15 + 12 + 12
    assert sched.prefix_hits == 12 + 8
    # Prompt log-probabilities need every position's logits: the cache is not used for them.
    scoring = FakeSeq("scored", conversation + [7], scores_prompt=True)
    sched.add(scoring)
    sched.admit()
    assert scoring.prefix_hit == [] and scoring.num_computed == 0


def test_prefill_plan_groups_similar_lengths_within_the_padded_budget_and_chunks_long_ones():
    sched, _ = make(chunk=256, seats=16, total=10_000)
    head, short, mid, near, long_ = (
        FakeSeq(n, [1] * k)
        for n, k in (("head", 100), ("short", 20), ("mid", 60), ("near", 95), ("long", 300))
    )
    for s in (head, short, long_, mid, near):
        sched.add(s)
    sched.admit()
    plan = sched.next_prefill()
    assert [s for s, _ in plan] == [head, near]  # 2 x 100 fits; a third row pads to 300
    assert len(plan) * max(n for _, n in plan) <= 256
    sched.prefilling.remove(head)
    sched.prefilling.remove(near)
    sched.prefilling.remove(short)
    assert sched.next_prefill() == [(long_, 256)]  # longer than the budget: alone, one chunk
    long_.num_computed = 256
    assert sched.next_prefill() == [(long_, 44), (mid, 60)]


def test_prefill_groups_keep_the_padding_of_their_cached_parts_within_the_budget():
    """Rows of a group share one cache, left-padded to the longest cached part: a new prompt
    beside a long chat's next turn (3,500 tokens found in the cache) would carry 3,500 empty
    positions. Turns with similar histories still go together."""
    sched, _ = make(chunk=256, seats=16, total=10_000)
    turn, fresh, sibling = (
        FakeSeq(n, [1] * k) for n, k in (("turn", 3600), ("new", 90), ("sib", 3590))
    )
    for s in (turn, fresh, sibling):
        sched.add(s)
    sched.admit()
    turn.num_computed, sibling.num_computed = 3500, 3480  # prefix hits
    plan = sched.next_prefill()
    assert [s for s, _ in plan] == [turn, sibling]  # 20 padded positions, not 3,500
    sched.prefilling.remove(turn)
    sched.prefilling.remove(sibling)
    assert sched.next_prefill() == [(fresh, 90)]


def test_aborts_are_by_identity_not_request_id():
    sched, _ = make()
    a, b = FakeSeq("same-id", [1] * 3), FakeSeq("same-id", [1] * 3)
    for s in (a, b):
        sched.add(s)
    assert sched.remove({id(b)}) == [b]
    assert list(sched.waiting) == [a]


def test_the_partial_block_an_earlier_request_ended_with_is_found_after_its_full_blocks():
    """The next turn of a chat starts with the previous turn's whole conversation, which
    rarely ends on a block boundary."""
    sched, memory = make(prefix=True)
    earlier = list(range(100, 110))  # 2 full blocks + 2 tokens
    full = chain_hashes(earlier, BS)
    for h in full:
        sched.prefix.insert(h, "full")
    sched.prefix.insert(tail_hash(full[-1], earlier[8:]), "tail")
    sched.prefix.insert(tail_hash(full[-1], earlier[8:9]), "shorter tail")
    sched.prefix.insert(tail_hash(None, [5, 6]), "root tail")
    next_turn = FakeSeq("next", earlier + [1, 2, 3])
    diverged = FakeSeq("diverged", earlier[:9] + [0, 1, 2])  # only the shorter one holds
    just_it = FakeSeq("same", list(earlier))  # its last token is computed: the tail is too long
    short = FakeSeq("short", [5, 6, 7])
    other_parent = FakeSeq("other", [0] + earlier[1:] + [1])
    for s in (next_turn, diverged, just_it, short, other_parent):
        sched.add(s)
    sched.admit()
    assert (next_turn.prefix_hit, next_turn.num_computed) == (["full", "full", "tail"], 10)
    assert (diverged.prefix_hit, diverged.num_computed) == (["full", "full", "shorter tail"], 9)
    assert (just_it.prefix_hit, just_it.num_computed) == (["full", "full", "shorter tail"], 9)
    assert (short.prefix_hit, short.num_computed) == (["root tail"], 2)
    assert (other_parent.prefix_hit, other_parent.num_computed) == ([], 0)
    assert sched.prefix_hits == 10 + 9 + 9 + 2
    # A tail never stands for a full block of the same tokens.
    assert tail_hash(None, earlier[:BS]) != full[0]


def test_chain_hashes_extend_and_depend_on_everything_before():
    tokens = list(range(40))
    assert chain_hashes(tokens, BS, chain_hashes(tokens[:13], BS)) == chain_hashes(tokens, BS)
    changed = [99] + tokens[1:]
    ours, theirs = chain_hashes(tokens, BS), chain_hashes(changed, BS)
    assert all(a != b for a, b in zip(ours, theirs))  # same block 5, different history
    assert len(ours) == 10 and all(len(h) == 16 for h in ours)


def test_prefix_index_evicts_least_recently_used_first():
    index: PrefixIndex[str] = PrefixIndex()
    for name in "abc":
        index.insert(name.encode(), name)
    assert index.match([b"a"]) == ["a"]  # touched: now the most recent
    assert index.match([b"x", b"b"]) == []  # a miss stops the prefix
    assert index.evict(2) == 2
    assert len(index) == 1 and b"a" in index and b"b" not in index and b"c" not in index


def test_a_paused_request_gives_its_seat_away_and_resumes_at_the_head_of_the_queue():
    sched, memory = make(seats=1)
    a, b, c = (FakeSeq(r, [1] * 5) for r in "abc")
    for s in (a, b, c):
        sched.add(s)
    assert sched.admit() == [a]
    run(sched, memory, [a])
    a.output = [7, 8]
    memory.held.pop(id(a))  # the engine frees its KV first
    sched.park(a)
    assert (a.state, a.num_computed, sched.num_pauses) == ("paused", 0, 1)
    assert not sched.running and sched.paused == [a]
    assert sched.admit() == [b]  # its seat went to the next in line
    run(sched, memory, [b])
    sched.finished(b)
    memory.held.pop(id(b))
    sched.unpark(a)
    assert sched.admit() == [a]  # ahead of c, which arrived after it
    assert a.state == "prefilling" and list(sched.waiting) == [c]


def test_paused_requests_are_not_work_but_can_be_aborted():
    sched, memory = make(seats=2)
    a = FakeSeq("a", [1] * 5)
    sched.add(a)
    sched.admit()
    run(sched, memory, [a])
    sched.park(a)
    assert not sched.has_work()
    assert sched.remove({id(a)}) == [a] and not sched.paused


def test_a_prefilling_request_counts_once_its_reservation_or_what_it_holds():
    """A long prompt's chunks fill the row it reserved: counting both its cache and its whole
    reservation would make the pool look full (and the request itself the next victim)."""
    sched, memory = make(total=20)
    long = FakeSeq("long", [1] * 40)  # reserves 10 blocks
    sched.add(long)
    assert sched.admit() == [long]
    assert sched.available() == 10
    memory.pending[id(long)] = 6  # two chunks computed
    assert sched.available() == 10
    memory.pending[id(long)] = 12  # more than reserved (a wider cache): that is what counts
    assert sched.available() == 8
