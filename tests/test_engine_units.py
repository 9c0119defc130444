"""Unit tests for the engine's text pipeline and sampler (no server)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from model_server.engine.detokenizer import MAX_HELD_TOKENS, IncrementalDetokenizer
from model_server.engine.sampling import PenaltyState, RowSampling, exponential_race, sample
from model_server.engine.stop import StopStringMatcher
from model_server.engine.types import SamplingParams


def feed_all(m: StopStringMatcher, pieces: list[str]) -> str:
    out = "".join(m.feed(p) for p in pieces)
    return out + m.flush()


@pytest.mark.parametrize("seed", range(20))
def test_stop_matcher_any_split(seed):
    rng = random.Random(seed)
    text = "The answer is 42. ### END ### and more"
    cuts = sorted(rng.sample(range(1, len(text)), rng.randint(1, 10)))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    m = StopStringMatcher(["###", "never"])
    assert feed_all(m, pieces) == "The answer is 42. "
    assert m.stopped


def test_stop_matcher_holds_back_only_possible_prefixes():
    m = StopStringMatcher(["</s>"])
    assert m.feed("abc<") == "abc"
    assert m.feed("/x") == "</x"  # not a stop after all: released
    assert m.feed("<") == ""
    assert m.flush() == "<"  # end of generation: held text is plain text
    assert not m.stopped


def test_stop_matcher_without_stops_is_a_passthrough():
    m = StopStringMatcher([])
    assert m.feed("a<") == "a<" and m.flush() == ""


@pytest.fixture(scope="module")
def hf_tokenizer(smollm_tokenizer):
    from transformers import AutoTokenizer

    from model_server.models.hf import HFTokenizer

    return HFTokenizer(AutoTokenizer.from_pretrained(smollm_tokenizer))


@pytest.mark.parametrize(
    "text", ["你好，世界！今天天气很好。", "Hello  world\n\n  indented", "mixé 日本語 🎉 done"]
)
def test_detokenizer_streams_whole_characters(hf_tokenizer, text):
    ids = hf_tokenizer.encode(text)
    d = IncrementalDetokenizer(hf_tokenizer)
    pieces = [d.push(i) for i in ids]
    pieces.append(d.flush())
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == hf_tokenizer.decode(ids) == text
    if not text.isascii():  # some tokens were partial characters, held back
        assert any(p == "" for p in pieces[:-1])


@pytest.fixture(scope="module")
def glm_tokenizer(tiny_chatglm2_dir):
    from model_server.models.chatglm2 import ChatGLM2Tokenizer

    return ChatGLM2Tokenizer(tiny_chatglm2_dir / "tokenizer.model")


@pytest.mark.parametrize("which", ["hf", "glm"])
@pytest.mark.parametrize("junk", ["lone byte", "decodes to nothing"])
def test_detokenizer_lets_out_text_that_can_never_finish(which, junk, request):
    """Tokens a broken or random model emits: a lone UTF-8 continuation byte (never a whole
    character) or an id that decodes to nothing. The held window stays bounded (each push
    decoded all of it: quadratic), and the text around them still comes out whole."""
    tok = request.getfixturevalue(f"{which}_tokenizer")
    if junk == "lone byte":
        bad = next(i for i in range(1000) if tok.decode([i]) == "\ufffd")
    else:
        bad = next(i for i in range(tok.vocab_size) if tok.decode([i]) == "")
    ids = tok.encode("héllo 日本") + [bad] * 300 + tok.encode(" wörld 🎉 done")
    d = IncrementalDetokenizer(tok)
    pieces, widest = [], 0
    for i in ids:
        pieces.append(d.push(i))
        widest = max(widest, len(d._ids) - d._prefix_offset)
    pieces.append(d.flush())
    assert widest <= 2 * MAX_HELD_TOKENS
    text = "".join(pieces)
    assert text == tok.decode(ids)
    assert text.startswith("héllo 日本") and text.endswith(" wörld 🎉 done")


def pick(*args, **kwargs) -> list[int | None]:
    """The sampled tokens (None for a row that failed)."""
    return sample(*args, **kwargs).tokens


def rows(*params: SamplingParams, seed: int = 0) -> list[RowSampling]:
    out = []
    for p in params:
        g = torch.Generator().manual_seed(seed)
        out.append(RowSampling(p, None if p.greedy else g, 0))
    return out


def test_greedy_and_top_k_one_agree():
    logits = torch.randn(3, 50)
    greedy = pick(logits, rows(*[SamplingParams(max_tokens=1, temperature=0)] * 3), frozenset())
    topk1 = pick(
        logits.clone(),  # sample() edits its logits in place
        rows(*[SamplingParams(max_tokens=1, temperature=1.0, top_k=1)] * 3),
        frozenset(),
    )
    assert greedy == topk1 == logits.argmax(-1).tolist()


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    p = SamplingParams(max_tokens=1, temperature=1.0, top_p=0.7)
    seen = {pick(logits.clone(), rows(p, seed=s), frozenset())[0] for s in range(200)}
    assert seen == {0, 1}


def test_exponential_race_follows_the_distribution_and_never_picks_a_zero():
    weights = torch.tensor([0.0, 5.0, 0.0, 3.0, 2.0, 0.0])  # any positive sum
    n = 4000  # seeded: the counts are the same every run
    gens = [torch.Generator().manual_seed(s) for s in range(n)]
    drawn = exponential_race(weights.expand(n, -1).clone(), gens)
    counts = torch.bincount(drawn, minlength=6).tolist()
    assert counts[0] == counts[2] == counts[5] == 0
    for token, p in ((1, 0.5), (3, 0.3), (4, 0.2)):  # within 4 standard deviations
        assert abs(counts[token] - p * n) < 4 * (n * p * (1 - p)) ** 0.5, counts
    again = exponential_race(
        weights.expand(n, -1).clone(), [torch.Generator().manual_seed(s) for s in range(n)]
    )
    assert torch.equal(again, drawn)


def test_seeded_rows_are_independent_of_batch_neighbours():
    logits = torch.randn(1, 100)
    p = SamplingParams(max_tokens=1, temperature=1.0, seed=7)
    alone = [pick(logits.clone(), rows(p, seed=7), frozenset())[0]]
    other = SamplingParams(max_tokens=1, temperature=1.0)
    batched = pick(
        torch.cat([torch.randn(1, 100), logits]),
        [rows(other, seed=99)[0], rows(p, seed=7)[0]],
        frozenset(),
    )
    assert batched[1] == alone[0]


def test_min_tokens_and_ignore_eos_suppress_eos():
    logits = torch.full((2, 10), -5.0)
    logits[:, 2] = 10.0  # eos is by far the best
    params = [
        SamplingParams(max_tokens=5, temperature=0, min_tokens=3),
        SamplingParams(max_tokens=5, temperature=0, ignore_eos=True),
    ]
    assert 2 not in pick(logits.clone(), rows(*params), frozenset({2}))
    done = rows(SamplingParams(max_tokens=5, temperature=0, min_tokens=3))
    done[0].num_generated = 3
    assert pick(logits[:1], done, frozenset({2})) == [2]


def test_penalties():
    logits = torch.tensor([[2.0, 1.9, 0.0, -1.0]])
    state = PenaltyState([([], [0, 0])], 4, torch.device("cpu"))
    freq = rows(SamplingParams(max_tokens=1, temperature=0, frequency_penalty=0.1))
    assert pick(logits.clone(), freq, frozenset(), state) == [1]  # 2.0 - 0.2 < 1.9
    rep = rows(SamplingParams(max_tokens=1, temperature=0, repetition_penalty=1.5))
    assert pick(logits.clone(), rep, frozenset(), state) == [1]  # 2.0 / 1.5 < 1.9
    state2 = PenaltyState([([1], [])], 4, torch.device("cpu"))  # prompt tokens count too
    assert pick(torch.tensor([[1.0, 1.2, 0.0, 0.0]]), rep, frozenset(), state2) == [0]


def test_nan_guard_picks_the_guard_token():
    logits = torch.tensor([[float("nan"), 1.0, 2.0, 0.0, 0.0, 0.0, 0.0]])
    out = pick(
        logits, rows(SamplingParams(max_tokens=1, temperature=0)), frozenset(), nan_guard_token_id=5
    )
    assert out == [5]


def test_a_guarded_row_reports_finite_logprobs():
    """The guard's row has no raw distribution; its logprobs are those of the forced token,
    finite, so a response can carry them (NaN made the bridge's JSON fail)."""
    logits = torch.tensor([[float("nan"), 1.0, 2.0, 0.0, 0.0, 0.0, 0.0], [0.0] * 7])
    both = rows(*[SamplingParams(max_tokens=1, temperature=0)] * 2)
    for r in both:
        r.logprobs = 2
    result = sample(logits, both, frozenset(), nan_guard_token_id=5)
    assert result.tokens[0] == 5 and result.failed == {}
    guarded = result.logprobs[0]
    assert guarded.logprob == pytest.approx(0.0) and guarded.top[0][0] == 5
    assert all(math.isfinite(v) for _, v in guarded.top)
    assert result.logprobs[1].logprob == pytest.approx(-math.log(7))


def test_poisoned_rows_are_clamped_or_fail_alone():
    """temperature 1e-40 is greedy, repetition_penalty 1e-40 is clamped, and a row whose
    logits are NaN fails alone: every other row gets exactly its solo token."""
    torch.manual_seed(0)
    logits = torch.randn(4, 64)
    normal = SamplingParams(max_tokens=1, temperature=0.8, seed=3)
    solo = pick(logits[:1].clone(), rows(normal, seed=3), frozenset())
    tiny_t = SamplingParams(max_tokens=1, temperature=1e-40, seed=1)
    tiny_rep = SamplingParams(max_tokens=1, temperature=0.8, repetition_penalty=1e-40, seed=2)
    batch = logits.clone()
    batch[3] = float("nan")
    state = PenaltyState([([], [])] * 2 + [([5, 6], [7])] + [([], [])], 64, torch.device("cpu"))
    params = rows(normal, tiny_t, tiny_rep, normal, seed=3)
    result = sample(batch, params, frozenset(), state)
    assert result.tokens[0] == solo[0]
    assert result.tokens[1] == int(logits[1].argmax())  # below SAMPLING_EPS: greedy
    assert result.tokens[2] is not None  # clamped penalty: finite, sampled
    assert result.tokens[3] is None and "non-finite" in result.failed[3]
    assert set(result.failed) == {3}


def test_logprobs_hook_uses_raw_logits_and_masks_apply_per_row():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0], [0.0, 1.0, 2.0, 3.0]])
    raw = logits.log_softmax(-1)
    params = rows(
        SamplingParams(max_tokens=1, temperature=0, repetition_penalty=2.0),
        SamplingParams(max_tokens=1, temperature=0),
    )
    params[0].logprobs = 2
    params[1].logit_masks.append(lambda row: row.__setitem__(3, float("-inf")))
    state = PenaltyState([([3], []), ([], [])], 4, torch.device("cpu"))
    result = sample(logits.clone(), params, frozenset(), state)
    assert result.tokens == [2, 2]  # row 0: 3 penalised (3/2 < 2); row 1: 3 masked out
    lp = result.logprobs[0]
    assert abs(lp.logprob - float(raw[0, 2])) < 1e-6  # before the penalty
    assert [t for t, _ in lp.top] == [3, 2] and abs(lp.top[0][1] - float(raw[0, 3])) < 1e-6
    assert 1 not in result.logprobs  # rows that did not ask pay nothing


def test_growable_layer_matches_concatenation():
    """The engine's KV layer writes in place into spare room yet reads like torch.cat."""
    from model_server.engine import kv

    torch.manual_seed(0)
    cache = kv.new_cache()
    ref_k = torch.zeros(2, 3, 0, 4)
    for step, n in enumerate([5, 1, 1, kv.GROW_TOKENS + 3, 1]):
        k, v = torch.randn(2, 3, n, 4), torch.randn(2, 3, n, 4)
        keys, values = cache.update(k, v, 0)
        ref_k = torch.cat([ref_k, k], dim=2)
        assert torch.equal(keys, ref_k) and torch.equal(values[:, :, -n:], v), step
        assert cache.get_seq_length() == ref_k.shape[2]
    layer = cache.layers[0]
    before = layer._k.data_ptr()
    cache.update(torch.randn(2, 3, 1, 4), torch.randn(2, 3, 1, 4), 0)
    assert layer._k.data_ptr() == before, "a decode step within capacity must not reallocate"
    # Batch surgery: keep row 1. Two all-padding columns are not worth a copy: rows move
    # down in place, the buffer (and its spare room) is kept.
    mask = torch.ones(2, cache.get_seq_length(), dtype=torch.long)
    mask[1, :2] = 0
    mask[0, :1] = 0
    row1 = layer.keys[1].clone()
    sel, sel_mask = kv.select(cache, mask, torch.tensor([1]))
    assert sel_mask.shape[1] == mask.shape[1] and layer._k.data_ptr() == before
    assert torch.equal(sel.layers[0].keys[0], row1)
    other = kv.new_cache()
    other.update(torch.randn(1, 3, 3, 4), torch.randn(1, 3, 3, 4), 0)
    both, both_mask = kv.concat([sel, other], [sel_mask, torch.ones(1, 3, dtype=torch.long)])
    assert both.layers[0].keys.shape == (2, 3, sel_mask.shape[1], 4)
    assert torch.equal(both.layers[0].keys[0], row1)
    assert sel.layers[0].keys is None and other.layers[0].keys is None  # the parts are consumed
    assert both_mask[1, : sel_mask.shape[1] - 3].sum() == 0
    assert both.layers[0].keys[1, :, : sel_mask.shape[1] - 3].abs().sum() == 0  # finite padding
    keys, _ = both.update(torch.randn(2, 3, 1, 4), torch.randn(2, 3, 1, 4), 0)
    assert keys.shape[2] == sel_mask.shape[1] + 1
    # Many all-padding columns are trimmed (a copy).
    wide = torch.zeros(2, keys.shape[2], dtype=torch.long)
    wide[0, kv.TRIM_MIN_COLUMNS :] = 1
    wide[1, -5:] = 1
    trimmed, trimmed_mask = kv.select(both, wide, torch.tensor([0, 1]))
    assert trimmed_mask.shape[1] == keys.shape[2] - kv.TRIM_MIN_COLUMNS
    assert torch.equal(trimmed.layers[0].keys, keys[:, :, kv.TRIM_MIN_COLUMNS :])


def test_lanes_long_rows_get_their_own_lane_when_padding_costs_more_than_the_weights():
    """A join pads; a separate lane costs one more pass over the weights per step. The store
    picks what a decode step reads less of, and its accounting counts real allocations."""
    from types import SimpleNamespace

    from model_server.engine import kv
    from model_server.engine.store import KVStore, Lane

    bpt = 64  # KV bytes per token
    store = KVStore(
        1000,
        16,
        bpt,
        weight_bytes=64 * 1000,
        vocab=8,
        device=torch.device("cpu"),
        prefix=None,
        max_lanes=2,
    )
    short = torch.ones(3, 40, dtype=torch.long)
    cache = kv.new_cache()
    cache.update(torch.zeros(3, 2, 40, 4), torch.zeros(3, 2, 40, 4), 0)
    rows = [SimpleNamespace(params=SamplingParams(max_tokens=1)) for _ in range(3)]
    store.lanes.append(Lane(rows=rows, cache=cache, mask=short))
    assert store.used_blocks() == store._blocks(kv.nbytes(cache))
    lane, added = store.choose_lane(1, 44)  # 3 x 4 padding columns: cheap, join
    assert lane is store.lanes[0] and added > 0
    lane, added = store.choose_lane(1, 6000)  # 3 x 5960 padding columns: its own lane
    assert lane is None and added == (6000 + kv.GROW_TOKENS) * bpt
    store.lanes.append(Lane(rows=[rows[0]]))
    lane, _ = store.choose_lane(1, 6000)  # max_lanes reached: the cheapest join
    assert lane is not None


@pytest.mark.parametrize("who", ["all", "some"])
@pytest.mark.parametrize("penalized", [False, True])
def test_logprobs_are_the_raw_log_softmax_on_every_path(who: str, penalized: bool):
    """Rows that asked (all or some; with or without penalties, eos suppression, a mask,
    greedy or sampled) get the log-softmax of their raw logits at the chosen token and the
    top k, whichever copies sample() made or skipped."""
    torch.manual_seed(1)
    logits = torch.randn(4, 300) * 3
    logits[0, 120] = logits[0].max() + 1.0  # row 0's best, by a margin
    raw = logits.log_softmax(-1)
    kinds = [
        SamplingParams(max_tokens=4, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=4, temperature=0.9, seed=5, min_tokens=2),
        SamplingParams(max_tokens=4, temperature=0.7, top_p=0.8, seed=6),
        SamplingParams(max_tokens=4, temperature=0),
    ]
    params = rows(*kinds, seed=5)
    params[3].logit_masks.append(lambda row: row.__setitem__(slice(0, 150), float("-inf")))
    asked = [0, 1, 2, 3] if who == "all" else [1, 3]
    for i in asked:
        params[i].logprobs = 3
    state = None
    if penalized:  # the chosen token itself is penalised (a little: it stays the best)
        top = 120
        params[0].params = SamplingParams(max_tokens=4, temperature=0, frequency_penalty=0.01)
        state = PenaltyState([([top], [top])] + [([], [])] * 3, 300, torch.device("cpu"))
    result = sample(logits.clone(), params, frozenset({7}), state)
    assert not result.failed and set(result.logprobs) == set(asked)
    if penalized:
        assert result.tokens[0] == top
    assert result.tokens[3] >= 150 and result.tokens[0] != 7 and result.tokens[1] != 7
    for i in asked:
        lp, token = result.logprobs[i], result.tokens[i]
        assert abs(lp.logprob - float(raw[i, token])) < 1e-5
        want = raw[i].topk(3)
        assert [t for t, _ in lp.top] == want.indices.tolist()
        assert all(abs(v - w) < 1e-5 for (_, v), w in zip(lp.top, want.values.tolist()))


def test_join_sorts_a_lanes_rows_longest_first_in_the_same_write():
    """A join rewrites the lane: its rows come out ordered by the first column they use
    (longest first), each row's KV, mask and penalties moved with it."""
    from types import SimpleNamespace

    from model_server.engine import kv
    from model_server.engine.store import KVStore, Lane

    store = KVStore(
        1000, 16, 64, weight_bytes=10**9, vocab=8, device=torch.device("cpu"), prefix=None
    )
    torch.manual_seed(0)
    lengths = [10, 30, 20]  # the lane's rows, left-padded to 30
    mask = torch.zeros(3, 30, dtype=torch.long)
    for r, n in enumerate(lengths):
        mask[r, 30 - n :] = 1
    cache = kv.new_cache()
    keys = torch.randn(3, 2, 30, 4)
    cache.update(keys, -keys, 0)
    rows = [SimpleNamespace(name=f"old{n}", params=SamplingParams(max_tokens=1)) for n in lengths]
    store.lanes.append(Lane(rows=list(rows), cache=cache, mask=mask))
    new_mask = torch.ones(2, 25, dtype=torch.long)
    new_mask[1, :10] = 0  # 25 and 15 tokens
    new_cache = kv.new_cache()
    new_keys = torch.randn(2, 2, 25, 4)
    new_cache.update(new_keys, -new_keys, 0)
    new_rows = [
        SimpleNamespace(name=n, params=SamplingParams(max_tokens=1)) for n in ["n25", "n15"]
    ]
    lane = store.join(new_rows, new_cache, new_mask)
    assert [r.name for r in lane.rows] == ["old30", "n25", "old20", "n15", "old10"]
    assert lane.mask.sum(dim=1).tolist() == [30, 25, 20, 15, 10]
    source = {"old30": keys[1], "old20": keys[2], "old10": keys[0], "n25": new_keys[0]}
    source["n15"] = new_keys[1]
    for i, row in enumerate(lane.rows):
        n = int(lane.mask[i].sum())
        want = source[row.name][:, -n:]
        assert torch.equal(lane.cache.layers[0].keys[i, :, -n:], want), row.name
        assert torch.equal(lane.cache.layers[0].values[i, :, -n:], -want), row.name
        if row.name.startswith("n"):  # the padding the join added is zeros (finite)
            assert lane.cache.layers[0].keys[i, :, :5].abs().sum() == 0


def test_decode_runs_read_the_fewest_positions():
    """The split of a decode step's rows into runs is the cheapest one (checked against every
    split of small batches) and covers every row once, each run from its first column."""
    import itertools
    import random

    from model_server.models.attention import RUN_CALL_POSITIONS, decode_runs

    def cost(runs: list[tuple[int, int, int]], width: int) -> int:
        return sum((b - a) * (width - first) + RUN_CALL_POSITIONS for a, b, first in runs)

    rng = random.Random(0)
    for _ in range(200):
        n, width = rng.randint(1, 7), rng.randint(1, 900)
        starts = [rng.randrange(width) for _ in range(n)]
        if rng.random() < 0.5:
            starts.sort()
        runs = decode_runs(starts, width)
        assert [a for a, _, _ in runs] == [0] + [b for _, b, _ in runs[:-1]]
        assert runs[-1][1] == n
        assert all(first == min(starts[a:b]) for a, b, first in runs)
        best = min(
            cost([(a, b, min(starts[a:b])) for a, b in zip((0, *cuts), (*cuts, n))], width)
            for k in range(n)
            for cuts in itertools.combinations(range(1, n), k)
        )
        assert cost(runs, width) == best, (starts, width)
    # Beyond RUN_CANDIDATES rows the split uses evenly spaced boundaries: still a cover, and
    # a sorted lane of two lengths still splits where the length changes.
    wide = [0] * 100 + [450] * 116
    runs = decode_runs(wide, 500)
    assert [a for a, _, _ in runs] == [0] + [b for _, b, _ in runs[:-1]] and runs[-1][1] == 216
    assert all(first == min(wide[a:b]) for a, b, first in runs)
    assert cost(runs, 500) < 1.05 * cost([(0, 100, 0), (100, 216, 450)], 500)
    assert decode_runs([0, 0, 1, 2], 500) == [(0, 4, 0)]  # alike rows: one batched call
    assert len(decode_runs([0, 0, 400, 400], 500)) == 2
