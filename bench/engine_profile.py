"""``python -m bench.engine_profile``: where the engine thread's time goes, in-process.

Two parts, on the embedded model (or ``--model``), with no gRPC or HTTP in the way:

- **levels**: the bench prompts, greedy, fixed-length replies, at c=1 and c=16 (closed-loop
  workers); tok/s of each and the engine thread's time split by component (forwards, sampling,
  joins, leaves, ``append_token``, prefix-cache copies, publishing). Says whether the c=16 / c=1
  ratio is lost to host overhead inside the engine or to the forward itself.
- **turns**: the multiturn scenario's conversation up to turn 15, then a turn-1-like and a
  turn-16-like request alternated ``--reps`` times (fresh text each time, so turn 16 hits the
  cache for the history and computes ~180 tokens); TTFT of each, turn 16's split into
  prefix-cache copy-in, forward and copy-out, and the page faults the engine thread took
  during turn 16 (fresh memory costs more than the copy itself). Alternating puts both under
  the same machine load.
- **shortturns**: an agent-like chat of short turns (a one-line request, a 24-token reply),
  on fresh engines alternated with and without the partial-block hits of the prefix cache
  (``blocks.tail_hash``; without them a turn recomputes the part of the previous reply that
  ends mid-block); tokens computed and TTFT per turn.

Prints tables and a ``BENCH_JSON`` line. Run it under ``flock -x /tmp/bench.lock`` on a shared box.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from bench.prompts import prompts
from bench.scenarios import TURN_REPLY_TOKENS, TURNS, turn_text
from model_server.engine import engine as engine_mod
from model_server.engine import runner as runner_mod
from model_server.engine import scheduler as scheduler_mod
from model_server.engine import store as store_mod
from model_server.engine.engine import Engine, EngineConfig
from model_server.engine.types import GenerationRequest, SamplingParams
from model_server.models import DEFAULT_MODEL
from model_server.models.base import ChatMessage, LoadedModel
from model_server.models.registry import load_model

# (class, method, label): the engine-thread work timed, each call's wall time summed.
TIMED = (
    (runner_mod.ModelRunner, "forward", "forward"),
    (runner_mod.ModelRunner, "sample", "sampling"),
    (store_mod.KVStore, "join", "join"),
    (store_mod.KVStore, "leave", "leave"),
    (store_mod.KVStore, "take_group", "stack prefill caches"),
    (store_mod.KVStore, "load_prefix", "prefix copy-in"),
    (store_mod.KVStore, "cache_prefix", "prefix copy-out"),
    (engine_mod.Engine, "_append", "append_token"),
    (engine_mod.Engine, "_publish", "publish"),
    (engine_mod.Engine, "_iteration", "engine iterations"),
)


class Timers:
    """Wraps the TIMED methods (class attributes, so every instance) while active."""

    def __init__(self) -> None:
        self.seconds: collections.Counter[str] = collections.Counter()
        self.calls: collections.Counter[str] = collections.Counter()

    def _wrap(self, fn: Callable[..., Any], label: str) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - t0
                self.calls[label] += 1

        return timed

    @contextmanager
    def active(self) -> Iterator[None]:
        saved = [(cls, name, getattr(cls, name)) for cls, name, _ in TIMED]
        for (cls, name, label), (_, _, fn) in zip(TIMED, saved):
            setattr(cls, name, self._wrap(fn, label))
        try:
            yield
        finally:
            for cls, name, fn in saved:
                setattr(cls, name, fn)

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()


async def _generate(engine: Engine, ids: list[int], n: int, rid: str) -> tuple[float, list[int]]:
    """TTFT (submit to first token) and the tokens of one greedy request."""
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    ttft, out = 0.0, []
    async for step in engine.submit(GenerationRequest(rid, ids, params)):
        if not out and step.token_ids:
            ttft = time.perf_counter() - t0
        out += step.token_ids
    return ttft, out


async def _closed_loop(engine: Engine, texts: list[str], conc: int, max_tokens: int) -> int:
    """``conc`` workers take the texts in order until none is left; returns the tokens made."""
    fmt = engine.loaded.chat_format
    todo = collections.deque(range(len(texts)))
    made = []

    async def worker() -> None:
        while todo:
            i = todo.popleft()
            ids = fmt.render([ChatMessage("user", texts[i])])
            made.append(len((await _generate(engine, ids, max_tokens, f"c{conc}-{i}"))[1]))

    await asyncio.gather(*(worker() for _ in range(conc)))
    return sum(made)


async def levels(
    engine: Engine, timers: Timers, max_tokens: int, ones: int
) -> list[dict[str, Any]]:
    rows = []
    for conc, n in ((1, ones), (16, 32)):
        timers.reset()
        t0 = time.perf_counter()
        tokens = await _closed_loop(engine, prompts(n), conc, max_tokens)
        wall = time.perf_counter() - t0
        rows.append(
            {
                "concurrency": conc,
                "tokens": tokens,
                "wall_s": round(wall, 2),
                "tok_s": round(tokens / wall, 1),
                "engine_seconds": {k: round(v, 3) for k, v in timers.seconds.most_common()},
                "calls": dict(timers.calls),
            }
        )
    return rows


def _minor_faults(tid: int) -> int:
    """Minor page faults of one thread so far (Linux; 0 elsewhere)."""
    try:
        with open(f"/proc/self/task/{tid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[7])
    except (OSError, IndexError, ValueError):
        return 0


async def turns(engine: Engine, timers: Timers, reps: int) -> dict[str, Any]:
    fmt, tok = engine.loaded.chat_format, engine.loaded.tokenizer
    history: list[ChatMessage] = []
    for k in range(TURNS - 1):
        history.append(ChatMessage("user", turn_text(k)))
        _, out = await _generate(engine, fmt.render(history), TURN_REPLY_TOKENS, f"h{k}")
        history.append(ChatMessage("assistant", tok.decode(out)))
    first, last, parts, faults = [], [], [], []
    tid = engine._thread.native_id or 0
    for j in range(reps):
        one = fmt.render([ChatMessage("user", f"Variant {j}. " + turn_text(0))])
        sixteen = fmt.render(
            [*history, ChatMessage("user", f"Variant {j}. " + turn_text(TURNS - 1))]
        )
        first.append((await _generate(engine, one, 1, f"a{j}"))[0])
        timers.reset()
        before = _minor_faults(tid)
        last.append((await _generate(engine, sixteen, 1, f"b{j}"))[0])
        faults.append(_minor_faults(tid) - before)
        parts.append({k: round(v, 4) for k, v in timers.seconds.items()})
    return {
        "prompt_tokens": [len(one), len(sixteen)],
        "ttft_turn1_s": first,
        "ttft_turn16_s": last,
        "turn16_parts_s": parts,
        "turn16_engine_page_faults": faults,
        "median_ratio": statistics.median(last) / statistics.median(first),
    }


SHORT_TURNS, SHORT_REPLY_TOKENS = 20, 24


async def _short_chat(loaded: LoadedModel, partial_blocks: bool) -> list[tuple[int, float]]:
    """(tokens computed, TTFT) of each turn of one short-turn chat on a fresh engine."""
    real = scheduler_mod.tail_hash
    if not partial_blocks:  # lookups name no block the store caches
        scheduler_mod.tail_hash = lambda parent, tokens: b"no partial blocks"
    try:
        engine = await _started(loaded)
        try:
            fmt, tok = loaded.chat_format, loaded.tokenizer
            history: list[ChatMessage] = []
            rows = []
            for k in range(SHORT_TURNS):
                history.append(ChatMessage("user", f"Step {k}: run the tool on file {k * 13}.txt"))
                ids = fmt.render(history)
                found = engine.scheduler.prefix_hits
                ttft, out = await _generate(engine, ids, SHORT_REPLY_TOKENS, f"s{k}")
                rows.append((len(ids) - (engine.scheduler.prefix_hits - found), ttft))
                history.append(ChatMessage("assistant", tok.decode(out)))
            return rows
        finally:
            engine.shutdown()
    finally:
        scheduler_mod.tail_hash = real


async def short_turns(loaded: LoadedModel, reps: int) -> dict[str, Any]:
    runs: dict[str, list[list[tuple[int, float]]]] = {"without": [], "with": []}
    for _ in range(reps):
        for variant in runs:
            runs[variant].append(await _short_chat(loaded, variant == "with"))

    def summary(rows: list[tuple[int, float]]) -> dict[str, float]:
        later = rows[1:]  # turn 1 finds nothing either way
        return {
            "computed_per_turn": statistics.mean(n for n, _ in later),
            "ttft_median_s": statistics.median(t for _, t in later),
        }

    return {v: [summary(r) for r in rs] for v, rs in runs.items()}


def _print_short_turns(t: dict[str, Any]) -> None:
    print(f"short turns ({SHORT_TURNS} turns, {SHORT_REPLY_TOKENS}-token replies; turns 2..)")
    print("| partial-block hits | rep | tokens computed per turn | median TTFT ms |")
    print("|---|---:|---:|---:|")
    for variant, runs in t.items():
        for i, r in enumerate(runs):
            print(
                f"| {variant} | {i} | {r['computed_per_turn']:.1f} | "
                f"{r['ttft_median_s'] * 1e3:.0f} |"
            )


def _print_levels(rows: list[dict[str, Any]]) -> None:
    print("| c | tokens | tok/s | " + " | ".join(label for *_, label in TIMED) + " |")
    print("|---:" * (3 + len(TIMED)) + "|")
    for r in rows:
        cells = [f"{r['engine_seconds'].get(label, 0.0):.2f}" for *_, label in TIMED]
        print(f"| {r['concurrency']} | {r['tokens']} | {r['tok_s']} | " + " | ".join(cells) + " |")
    print(
        f"(engine-thread seconds per component; c=16 / c=1 = "
        f"{rows[1]['tok_s'] / rows[0]['tok_s']:.2f})"
    )


def _print_turns(t: dict[str, Any]) -> None:
    print(f"turn 1 ({t['prompt_tokens'][0]} tokens) vs turn 16 ({t['prompt_tokens'][1]} tokens)")
    print(
        "| rep | turn 1 TTFT ms | turn 16 TTFT ms | turn 16 forward ms | prefix copy-in ms "
        "| prefix copy-out ms | turn 16 page faults |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    rows = zip(t["ttft_turn1_s"], t["ttft_turn16_s"], t["turn16_parts_s"])
    for i, (a, b, p) in enumerate(rows):
        print(
            f"| {i} | {a * 1e3:.0f} | {b * 1e3:.0f} | {p.get('forward', 0) * 1e3:.0f} | "
            f"{p.get('prefix copy-in', 0) * 1e3:.0f} | {p.get('prefix copy-out', 0) * 1e3:.0f} | "
            f"{t['turn16_engine_page_faults'][i]} |"
        )
    print(f"median turn 16 / turn 1 = {t['median_ratio']:.2f}")


def _load_as_the_server_does(model: str) -> LoadedModel:
    """Loads in a thread that then exits, as ``model-server`` does. Loading runs OpenMP work
    (packing the linears); a thread that did stays alive with its own OpenMP pool, and on a
    2-core box libgomp then stops spinning between the engine thread's parallel regions:
    decode steps at c=1 took 30 instead of 21 ms when this loaded on the main thread."""
    box: list[LoadedModel] = []
    loader = threading.Thread(
        target=lambda: box.append(load_model(model, torch.device("cpu"), "float32", None))
    )
    loader.start()
    loader.join()
    if not box:
        raise RuntimeError(f"loading {model} failed (the traceback is above)")
    return box[0]


async def _started(loaded: LoadedModel) -> Engine:
    """A started, warmed-up engine with the same settings for every part."""
    engine = Engine(loaded, EngineConfig(prefill_chunk_tokens=256, kv_cache_tokens=65536))
    engine.start()
    await _generate(engine, loaded.chat_format.render([ChatMessage("user", "hi")]), 8, "w")
    return engine


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    loaded = _load_as_the_server_does(args.model)
    result: dict[str, Any] = {}
    if args.parts & {"levels", "turns"}:
        engine, timers = await _started(loaded), Timers()
        try:
            with timers.active():
                if "levels" in args.parts:
                    result["levels"] = await levels(
                        engine, timers, args.max_tokens, args.c1_requests
                    )
                    _print_levels(result["levels"])
                if "turns" in args.parts:
                    result["turns"] = await turns(engine, timers, args.reps)
                    _print_turns(result["turns"])
        finally:
            engine.shutdown()
    if "shortturns" in args.parts:
        result["shortturns"] = await short_turns(loaded, args.reps)
        _print_short_turns(result["shortturns"])
    return result


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument(
        "--parts", default="levels,turns", help="comma-separated: levels, turns, shortturns"
    )
    p.add_argument("--max-tokens", type=int, default=128, help="levels: reply length")
    p.add_argument("--c1-requests", type=int, default=4, help="levels: requests at c=1")
    p.add_argument("--reps", type=int, default=5, help="turns, shortturns: alternations")
    args = p.parse_args(argv)
    args.parts = set(args.parts.split(","))
    torch.set_grad_enabled(False)
    print("BENCH_JSON " + json.dumps({"engine_profile": asyncio.run(_run(args))}))


if __name__ == "__main__":
    main()
