"""Scenarios the load levels do not cover: what chat UIs really send, and memory pressure.

Each scenario starts its own ``model-server`` + ``http-bridge`` (:class:`bench.stack.Stack`), so
its counters start at zero and its server flags are its own, and drives the bridge with the
official ``openai`` SDK (streaming). ``run_scenarios`` returns one dict per scenario; that dict
goes into ``latest.json`` under ``scenarios`` and ``bench.report`` checks its target.

- **multiturn**: one 16-turn conversation resent in full every turn (as chat UIs do). Without
  prefix caching every turn prefills the whole history again, so TTFT grows with the turn.
- **nomax**: 48 concurrent streams with no ``max_tokens`` (what chat UIs send). An engine that
  reserves the whole context per request runs only a few of them at once.
- **longprompt**: one ~6,000-token prompt next to 63 short ones under an explicit, small KV
  budget: memory runs out, so the engine has to preempt (or queue) without blowing up RSS.
- **slowreaders**: 200 SSE clients that read one byte per second for 60 s beside a c=16 closed
  loop of normal streams, against the same c=16 loop alone: the bridge's memory, the normal
  streams' tok/s, and whether ``--stream-write-timeout`` closes the slow streams. It measures
  the bridge, so by default its model server runs a tiny random checkpoint (on a CPU a real
  model's batch of 216 rows would be the bottleneck instead); ``slow_model`` picks another.

Server metrics are read with ``prometheus_client``'s parser (:mod:`glmserve.testing`); counters
the engine does not have yet (prefix cache, preemptions) are recorded as ``None``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import psutil
from openai import AsyncOpenAI

from glmserve.testing import command, scrape
from glmserve.v1 import chat_pb2, chat_pb2_grpc

from .load import percentile
from .machine import CpuWatch
from .prompts import PASSAGES, QUESTIONS, prompts
from .stack import Stack

NAMES: tuple[str, ...] = ("multiturn", "nomax", "longprompt", "slowreaders")

# multiturn
TURNS = 16
TURN_REPLY_TOKENS = 48
# nomax
NOMAX_STREAMS = 48
NOMAX_CHUNKS = 24  # each client closes its stream after this many content chunks
# longprompt
LONG_PROMPT_TOKENS = 6000
LONG_REPLY_TOKENS = 64
SHORT_REQUESTS = 63
# 12,288 tokens: the long prompt (+ reply, ~6,100) fits alone; the 64 prompts together need
# ~9,300 at admission and grow by 63 tokens a step towards ~15,300 (every prompt + max_tokens),
# so the pool fills before the short replies end: the engine must preempt or queue. (16,384
# would hold all of it at once with these lengths.) Engine v2 queues here: admission reserves
# prompt + one 64-position growth per row, and a reply of <= 128 tokens needs no second one.
LONG_KV_TOKENS = 12288
# The RSS allowance over "before + configured KV bytes" (see report.py, longprompt target).
OVERHEAD_KV_FRACTION = 0.25
OVERHEAD_BYTES = 256 * 2**20

# slowreaders
SLOW_READERS = 200
SLOW_SECONDS = 60.0  # the slow clients read this long; the normal loop runs this long too
SLOW_NORMAL_CONCURRENCY = 16
SLOW_WRITE_TIMEOUT = 20.0  # the bridge's --stream-write-timeout in this scenario
# With 20 top logprobs a token is ~2 KB of SSE, so a slow stream outgrows the buffers between
# the engine and the client (1 KiB unsent in the bridge's socket, its 4 KiB write buffer, 1
# message read ahead, a 1 KiB gRPC stream window, the server's 3-output backlog) after ~12
# tokens: then the model server pauses it.
SLOW_MAX_TOKENS = 128
SLOW_TOP_LOGPROBS = 20
SLOW_RCVBUF = 1024  # the slow clients' SO_RCVBUF (the kernel's minimum applies)
NORMAL_MAX_TOKENS = 128
WRITE_TIMEOUT_LOG = "the client read nothing for"  # the bridge's line for a stream it cut
IN_FLIGHT = "glmserve_bridge_streams_in_flight"
PAUSES = "glmserve_stream_pauses_total"  # the model server's backpressure

TIMED_OUT = "not done within the scenario's time box"
SAMPLE_S = 0.2
MIN_AVAILABLE = 1 * 2**30  # kill the server below this much free host memory (shared box)

PREFIX_QUERIES = "glmserve_prefix_cache_queries_total"
PREFIX_HITS = "glmserve_prefix_cache_hits_total"
PREEMPTIONS = "glmserve_num_preemptions_total"
RUNNING = "glmserve_requests_running"
WAITING = "glmserve_requests_waiting"
KV_POSITIONS = "glmserve_kv_cache_tokens"


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- deterministic text ------------------------------------------------------------------------


def _sentences(text: str, n: int) -> str:
    return ". ".join(text.split(". ")[:n]).rstrip(".") + "."


def turn_text(k: int) -> str:
    """User turn ``k`` (0-based) of the multiturn conversation: ~170 tokens, distinct per turn
    (a passage, two sentences of another one, a question; numbered)."""
    a, b = k % len(PASSAGES), (k + 1 + k // len(PASSAGES)) % len(PASSAGES)
    return (
        f"Part {k + 1}.\n\n{PASSAGES[a]}\n\nAlso recall: {_sentences(PASSAGES[b], 2)}\n\n"
        f"{QUESTIONS[k % len(QUESTIONS)]}"
    )


def short_prompt(i: int) -> str:
    """Short request ``i`` of longprompt: ~50 prompt tokens with the chat template."""
    return f"Question {i + 1}: {QUESTIONS[i % len(QUESTIONS)]}"


def short_reply_tokens(i: int) -> int:
    """64..128 output tokens, spread deterministically over the short requests."""
    return 64 + (i * 37) % 65


def long_paragraph(j: int) -> str:
    return f"Note {j + 1}. {PASSAGES[j % len(PASSAGES)]}"


LONG_TASK = "Summarize the notes above in order, one sentence per note."


def long_prompt(paragraphs: int) -> str:
    """The long prompt with ``paragraphs`` numbered passages (~100 tokens each) and a task."""
    return "\n\n".join(long_paragraph(j) for j in range(paragraphs)) + f"\n\n{LONG_TASK}"


async def fit_long_prompt(
    count: Callable[[str], Awaitable[int]], target: int = LONG_PROMPT_TOKENS
) -> str:
    """The shortest long prompt of at least ``target`` tokens as the server tokenizes it (so
    it stays ~6,000 tokens whatever the model's tokenizer)."""
    n = max(1, target // 120)
    while await count(long_prompt(n)) < target:
        n += 1
    return long_prompt(n)


# ---- server metrics and memory -------------------------------------------------------------


def metric(samples: dict[str, float], name: str) -> float | None:
    """One unlabelled sample, with or without the counter's ``_total`` suffix; None if absent."""
    for key in (name, name.removesuffix("_total"), name + "_total"):
        if key in samples:
            return samples[key]
    return None


def read_metrics(stack: Stack) -> dict[str, float]:
    """The model server's /metrics now ({} when it does not answer)."""
    if stack.metrics_port is None:
        return {}
    try:
        return scrape(stack.metrics_port)
    except (OSError, ValueError):
        return {}


def delta(before: dict[str, float], after: dict[str, float], name: str) -> float | None:
    a, b = metric(before, name), metric(after, name)
    return None if a is None or b is None else b - a


def _vm_data(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmData:"):
            return int(line.split()[1]) * 1024
    raise OSError("no VmData")


def limit_data(pid: int, extra: int) -> int | None:
    """Caps the server's data segment (RLIMIT_DATA) at its current size + ``extra`` bytes.

    Why: the longprompt scenario is built to exhaust the KV budget, and an engine whose memory
    does not follow its budget can ask for tens of GiB on this shared machine. Under the cap a
    runaway allocation fails inside the server (its requests end with an error, which the
    scenario counts) instead of the kernel's OOM killer picking some process on the box.
    Returns the limit set, or None when it could not be set (then only the sampler's
    low-memory kill protects the machine)."""
    try:
        limit = _vm_data(pid) + extra
        psutil.Process(pid).rlimit(psutil.RLIMIT_DATA, (limit, limit))
        return limit
    except (OSError, psutil.Error, AttributeError):
        return None


@dataclass
class Peaks:
    """What the sampler saw: maxima, and whether it had to kill the server."""

    samples: int = 0
    rss: int = 0
    running: float | None = None
    waiting: float | None = None
    kv_positions: float | None = None
    running_max_at_s: float | None = None
    killed: str | None = None


def _max(old: float | None, new: float | None) -> float | None:
    if new is None:
        return old
    return new if old is None else max(old, new)


async def sample(stack: Stack, peaks: Peaks, stop: asyncio.Event, every: float = SAMPLE_S) -> None:
    """Every ``every`` s: the server's RSS (psutil) and its queue / KV gauges (/metrics).

    Kills the server (SIGKILL, by pid) when the host has less than MIN_AVAILABLE memory left:
    other people's work runs on this machine too."""
    assert stack.server is not None
    proc = psutil.Process(stack.server.pid)
    t0 = time.perf_counter()
    while not stop.is_set():
        with contextlib.suppress(psutil.Error):
            peaks.rss = max(peaks.rss, int(proc.memory_info().rss))
        if psutil.virtual_memory().available < MIN_AVAILABLE and stack.server.alive():
            peaks.killed = "host memory nearly exhausted: model-server killed by the benchmark"
            log(peaks.killed)
            with contextlib.suppress(OSError):
                os.kill(stack.server.pid, signal.SIGKILL)
        m = await asyncio.to_thread(read_metrics, stack)
        running = metric(m, RUNNING)
        if running is not None and (peaks.running is None or running > peaks.running):
            peaks.running_max_at_s = time.perf_counter() - t0
        peaks.running = _max(peaks.running, running)
        peaks.waiting = _max(peaks.waiting, metric(m, WAITING))
        peaks.kv_positions = _max(peaks.kv_positions, metric(m, KV_POSITIONS))
        peaks.samples += 1
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), every)


async def gauges_settle(stack: Stack, wait: float = 15.0) -> dict[str, Any]:
    """Running / waiting once the load is gone (cancelled streams must free their seats)."""
    t0 = time.perf_counter()
    while True:
        m = await asyncio.to_thread(read_metrics, stack)
        running, waiting = metric(m, RUNNING), metric(m, WAITING)
        settled = running == 0 and waiting == 0
        if settled or time.perf_counter() - t0 > wait:
            return {
                "running_end": running,
                "waiting_end": waiting,
                "settle_s": time.perf_counter() - t0 if settled else None,
            }
        await asyncio.sleep(SAMPLE_S)


# ---- one streaming chat completion ---------------------------------------------------------


@dataclass
class Chat:
    """One streaming request through the bridge: its text and timings."""

    ok: bool = True
    error: str | None = None
    text: str = ""
    ttft: float | None = None
    seconds: float = 0.0
    chunks: int = 0  # chunks with content
    closed_early: bool = False
    timed_out: bool = False
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


async def stream_chat(
    client: AsyncOpenAI,
    model: str,
    messages: list[dict[str, str]],
    *,
    max_tokens: int | None = None,
    ignore_eos: bool = False,
    close_after: int | None = None,
) -> Chat:
    """Streams one chat completion (temperature 0). With ``close_after`` the client closes the
    stream after that many content chunks, as a user pressing "stop" does; the bridge then
    cancels the RPC and the server aborts the request."""
    out = Chat()
    kwargs: dict[str, Any] = {"stream_options": {"include_usage": True}}
    if max_tokens is not None:
        kwargs["max_tokens"] = max_tokens
    if ignore_eos:
        kwargs["extra_body"] = {"ignore_eos": True}
    t0 = time.perf_counter()
    try:
        stream = await client.chat.completions.create(
            model=model, messages=messages, temperature=0, stream=True, **kwargs
        )
        try:
            async for chunk in stream:
                if chunk.usage is not None:
                    out.prompt_tokens = chunk.usage.prompt_tokens
                    out.completion_tokens = chunk.usage.completion_tokens
                text = "".join(c.delta.content or "" for c in chunk.choices)
                if text:
                    if out.ttft is None:
                        out.ttft = time.perf_counter() - t0
                    out.text += text
                    out.chunks += 1
                    if close_after is not None and out.chunks >= close_after:
                        out.closed_early = True
                        break
        finally:
            await stream.close()
    except Exception as exc:  # noqa: BLE001 - every failure is recorded, none stops the scenario
        out.ok, out.error = False, f"{type(exc).__name__}: {exc}"[:300]
    out.seconds = time.perf_counter() - t0
    return out


async def gather_boxed(jobs: Sequence[Awaitable[Chat]], time_box: float) -> list[Chat]:
    """Runs ``jobs`` at once; those not done after ``time_box`` s are cancelled (the client
    closes them) and count as errors, so a slow engine still yields a partial result."""
    tasks = [asyncio.ensure_future(j) for j in jobs]
    _, pending = await asyncio.wait(tasks, timeout=time_box)
    for t in pending:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return [
        Chat(ok=False, error=f"{TIMED_OUT} ({time_box:.0f} s)", timed_out=True)
        if t in pending or t.cancelled()
        else t.result()
        for t in tasks
    ]


def _errors(chats: Sequence[Chat]) -> dict[str, Any]:
    errors = [c.error or "" for c in chats if not c.ok]
    return {
        "errors": len(errors),
        "timed_out": sum(1 for c in chats if c.timed_out),
        "error_samples": sorted(set(errors))[:5],
    }


# ---- the scenarios -------------------------------------------------------------------------


@dataclass
class Options:
    """What ``bench.run`` passes down (flags), with the scenario defaults."""

    model: str | None = None
    long_kv_tokens: int = LONG_KV_TOKENS
    long_server_args: list[str] | None = None  # None: the KV flag the server lists, N tokens
    rss_guard_mib: int = 3072  # 0: no RLIMIT_DATA on the longprompt server
    time_box_s: float = 180.0  # the load of one scenario (a conversation, a burst) at most
    slow_model: str | None = "tiny"  # slowreaders' model: "tiny", None (the bench's), or a dir
    slow_readers: int = SLOW_READERS
    slow_seconds: float = SLOW_SECONDS
    slow_write_timeout: float = SLOW_WRITE_TIMEOUT


class Context:
    """A running stack plus the clients and model facts every scenario needs."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.channel = grpc.aio.insecure_channel(stack.grpc_target)
        self.stub = chat_pb2_grpc.ChatServiceStub(self.channel)
        self.client = AsyncOpenAI(
            base_url=stack.base_url, api_key="unused", max_retries=0, timeout=600
        )
        self.model = ""
        self.dtype = ""
        self.device = ""

    async def open(self) -> None:
        info = (await self.stub.ListModels(chat_pb2.ListModelsRequest())).models[0]
        self.model, self.dtype, self.device = info.id, info.dtype, info.device

    async def count(self, messages: list[dict[str, str]]) -> int:
        """Prompt tokens of ``messages`` with the chat template (the server's Tokenize RPC)."""
        roles = {"user": chat_pb2.ROLE_USER, "assistant": chat_pb2.ROLE_ASSISTANT}
        req = chat_pb2.TokenizeRequest(
            model=self.model,
            messages=[
                chat_pb2.Message(role=roles[m["role"]], content=m["content"]) for m in messages
            ],
        )
        return int((await self.stub.Tokenize(req)).count)

    async def warm_up(self) -> None:
        """One short request, so the first measured one pays no first-call costs."""
        await stream_chat(
            self.client, self.model, [{"role": "user", "content": QUESTIONS[0]}], max_tokens=4
        )

    async def close(self) -> None:
        await self.client.close()
        await self.channel.close()


def _user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


async def multiturn(ctx: Context, time_box: float, turns: int = TURNS) -> dict[str, Any]:
    """A ``turns``-turn conversation resent in full each turn; TTFT per turn (request sent →
    first content chunk). Replies: greedy, exactly TURN_REPLY_TOKENS (ignore_eos), and the
    next turn carries them verbatim, as a chat UI resends its history."""
    await ctx.warm_up()
    messages: list[dict[str, str]] = []
    rows: list[dict[str, Any]] = []
    first = before = read_metrics(ctx.stack)
    t0 = time.perf_counter()
    for k in range(turns):
        if time.perf_counter() - t0 > time_box:
            log(f"  time box of {time_box:.0f} s passed after {k} turns")
            break
        messages.append(_user(turn_text(k)))
        chat = await stream_chat(
            ctx.client, ctx.model, messages, max_tokens=TURN_REPLY_TOKENS, ignore_eos=True
        )
        after = read_metrics(ctx.stack)
        rows.append(
            {
                "turn": k + 1,
                "ok": chat.ok,
                "error": chat.error,
                "prompt_tokens": chat.prompt_tokens,
                "completion_tokens": chat.completion_tokens,
                "ttft": chat.ttft,
                "seconds": chat.seconds,
                "prefix_queries": delta(before, after, PREFIX_QUERIES),
                "prefix_hits": delta(before, after, PREFIX_HITS),
            }
        )
        before = after
        log(
            f"  turn {k + 1}: {chat.prompt_tokens} prompt tokens, TTFT "
            f"{'-' if chat.ttft is None else f'{chat.ttft * 1e3:.0f} ms'}"
            + ("" if chat.ok else f", {chat.error}")
        )
        if not chat.ok:
            break
        messages.append({"role": "assistant", "content": chat.text})
    last = read_metrics(ctx.stack)
    t1, tn = rows[0]["ttft"], rows[-1]["ttft"]
    return {
        "turns": rows,
        "turns_planned": turns,
        "reply_tokens": TURN_REPLY_TOKENS,
        "errors": sum(1 for r in rows if not r["ok"]),
        "wrong_length": sum(
            1 for r in rows if r["ok"] and r["completion_tokens"] != TURN_REPLY_TOKENS
        ),
        "ttft_first": t1,
        "ttft_last": tn,
        "ttft_ratio": tn / t1 if t1 and tn is not None and len(rows) == turns else None,
        "prefix_cache": {
            "queries_before": metric(first, PREFIX_QUERIES),
            "queries_after": metric(last, PREFIX_QUERIES),
            "hits_before": metric(first, PREFIX_HITS),
            "hits_after": metric(last, PREFIX_HITS),
        },
    }


async def nomax(
    ctx: Context, time_box: float, streams: int = NOMAX_STREAMS, chunks: int = NOMAX_CHUNKS
) -> dict[str, Any]:
    """``streams`` concurrent streams without max_tokens, default server flags; each closes
    after ``chunks`` content chunks (closing cancels it server-side). Samples the running gauge
    every SAMPLE_S: its max says how many such requests the engine really runs at once."""
    await ctx.warm_up()
    peaks, stop = Peaks(), asyncio.Event()
    sampler = asyncio.ensure_future(sample(ctx.stack, peaks, stop))
    t0 = time.perf_counter()
    jobs = [
        stream_chat(ctx.client, ctx.model, [_user(p)], close_after=chunks) for p in prompts(streams)
    ]
    chats = await gather_boxed(jobs, time_box)
    wall = time.perf_counter() - t0
    stop.set()
    await sampler
    ttfts = [c.ttft for c in chats if c.ok and c.ttft is not None]
    return {
        "streams": streams,
        "close_after_chunks": chunks,
        "kv_cache_tokens": ctx.stack.kv_cache_tokens(),
        "running_max": peaks.running,
        "running_max_at_s": peaks.running_max_at_s,
        "waiting_max": peaks.waiting,
        "samples": peaks.samples,
        "closed_early": sum(1 for c in chats if c.closed_early),
        "ended_by_server": sum(1 for c in chats if c.ok and not c.closed_early),
        **_errors(chats),
        "ttft_p50": percentile(ttfts, 50),
        "ttft_p95": percentile(ttfts, 95),
        "wall_s": wall,
        **await gauges_settle(ctx.stack),
    }


def weights_bytes(model: str | None, dtype: str) -> int | None:
    """Parameter bytes at the serving dtype, from the checkpoint's safetensors headers."""
    try:
        if model is None:
            from model_server.models.gguf import cache_root, embedded_gguf_path
            from model_server.settings import CLI

            # The directory the bench's model server (same environment) converted into.
            root = cache_root(CLI.parse([]).cache_dir)
            folders = sorted(root.glob(embedded_gguf_path().stem + "-*"))
            folder = folders[-1]
        else:
            folder = Path(model).expanduser()
        numel = 0
        files = sorted(folder.glob("*.safetensors"))
        for f in files:
            with f.open("rb") as fh:
                header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
            numel += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    except (OSError, ValueError, KeyError, IndexError, ImportError):
        return None
    if not files:
        return None
    itemsize = 4 if "32" in dtype else 2
    return numel * itemsize


_KV_FLAGS = ("--kv-cache-tokens", "--max-num-batched-tokens")


def kv_flag() -> str:
    """The KV-budget flag this ``model-server`` lists in --help: ``--kv-cache-tokens`` (the
    engine rewrite) or ``--max-num-batched-tokens`` (before it)."""
    try:
        text = subprocess.run(
            [*command("model-server", "model_server.cli"), "--help"],
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        text = ""
    return next((f for f in _KV_FLAGS if f in text), _KV_FLAGS[0])


def long_server_args(opts: Options) -> list[str]:
    """longprompt's model-server flags: the override, or the KV flag with N tokens."""
    if opts.long_server_args is not None:
        return list(opts.long_server_args)
    return [kv_flag(), str(opts.long_kv_tokens)]


def kv_tokens_in(args: Sequence[str]) -> int | None:
    """N from ``--kv-cache-tokens N`` / ``--max-num-batched-tokens N`` (or ``=N``)."""
    for i, a in enumerate(args):
        for f in _KV_FLAGS:
            if a == f and i + 1 < len(args):
                return int(args[i + 1])
            if a.startswith(f + "="):
                return int(a.split("=", 1)[1])
    return None


async def longprompt(ctx: Context, opts: Options, server_args: list[str]) -> dict[str, Any]:
    """One ~6,000-token prompt and 63 short ones at once, under a KV budget that holds the long
    one alone but not everything: peak RSS against the configured KV bytes, errors, and the
    engine's preemption counter."""
    from .run import kv_bytes_per_token

    stack = ctx.stack
    assert stack.server is not None
    long_text = await fit_long_prompt(lambda text: ctx.count([_user(text)]))
    long_tokens = await ctx.count([_user(long_text)])
    shorts = [short_prompt(i) for i in range(SHORT_REQUESTS)]
    short_tokens = [await ctx.count([_user(s)]) for s in shorts]
    demand = long_tokens + LONG_REPLY_TOKENS
    demand += sum(t + short_reply_tokens(i) for i, t in enumerate(short_tokens))
    await ctx.warm_up()
    per_token = kv_bytes_per_token(opts.model, ctx.dtype)
    kv_tokens = kv_tokens_in(server_args)
    rss_before = stack.server_rss()
    guard = None
    if opts.rss_guard_mib > 0:
        guard = limit_data(stack.server.pid, opts.rss_guard_mib * 2**20)
    before = read_metrics(stack)
    peaks, stop = Peaks(), asyncio.Event()
    sampler = asyncio.ensure_future(sample(stack, peaks, stop))
    t0 = time.perf_counter()
    # The long prompt first, the short ones right behind it (all within milliseconds): the long
    # prefill's transients and the short rows land on the pool together, the harder case for
    # memory (sent after the short ones, the long one simply waits for room).
    jobs = [
        stream_chat(
            ctx.client, ctx.model, [_user(long_text)], max_tokens=LONG_REPLY_TOKENS, ignore_eos=True
        )
    ]
    jobs += [
        stream_chat(
            ctx.client, ctx.model, [_user(s)], max_tokens=short_reply_tokens(i), ignore_eos=True
        )
        for i, s in enumerate(shorts)
    ]
    chats = await gather_boxed(jobs, opts.time_box_s)
    wall = time.perf_counter() - t0
    stop.set()
    await sampler
    after = read_metrics(stack)
    rss_after = stack.server_rss() if stack.server.alive() else None
    wanted = [LONG_REPLY_TOKENS] + [short_reply_tokens(i) for i in range(SHORT_REQUESTS)]
    completed = sum(1 for c, w in zip(chats, wanted) if c.ok and c.completion_tokens == w)
    short_ttfts = [c.ttft for c in chats[1:] if c.ok and c.ttft is not None]
    kv_bytes = kv_tokens * per_token if kv_tokens and per_token else None
    peak = max(peaks.rss, rss_after or 0)
    return {
        "server_args": server_args,
        "kv_cache_tokens": kv_tokens,
        "kv_bytes_per_token": per_token,
        "kv_bytes": kv_bytes,
        "weights_bytes": weights_bytes(opts.model, ctx.dtype),
        "long_prompt_tokens": long_tokens,
        "short_prompt_tokens_mean": sum(short_tokens) / len(short_tokens),
        "demand_tokens": demand,  # every prompt + max_tokens: what "everything at once" needs
        "requests": len(chats),
        "completed": completed,
        **_errors(chats),
        "long_ttft": chats[0].ttft,
        "long_seconds": chats[0].seconds,
        "short_ttft_p50": percentile(short_ttfts, 50),
        "short_ttft_p95": percentile(short_ttfts, 95),
        "wall_s": wall,
        "rss_before": rss_before,
        "rss_peak": peak,
        "rss_after": rss_after,
        "rss_samples": peaks.samples,
        "peak_kv_positions": peaks.kv_positions,  # glmserve_kv_cache_tokens gauge, max
        "running_max": peaks.running,
        "waiting_max": peaks.waiting,
        "preemptions": delta(before, after, PREEMPTIONS),
        "overhead_kv_fraction": OVERHEAD_KV_FRACTION,
        "overhead_bytes": OVERHEAD_BYTES,
        "rss_guard_data_limit": guard,
        "server_killed": peaks.killed,
        "server_alive_after": stack.server.alive(),
        **(await gauges_settle(stack, wait=5.0) if stack.server.alive() else {}),
    }


class SlowReaders:
    """Streaming requests on raw sockets with a minimal receive buffer, each read one byte per
    second (in a thread) until :meth:`close`. The first 12 bytes read are the status line."""

    def __init__(self, port: int, body: dict[str, Any], count: int) -> None:
        data = json.dumps(body).encode()
        head = (
            "POST /v1/chat/completions HTTP/1.1\r\nHost: bridge\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
        ).encode()
        self.socks: list[socket.socket] = []
        for _ in range(count):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SLOW_RCVBUF)
            sock.connect(("127.0.0.1", port))
            sock.sendall(head + data)
            self.socks.append(sock)
        self.read = [b""] * count
        self.eof = [False] * count
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            for i, sock in enumerate(self.socks):
                if self.eof[i]:
                    continue
                try:
                    got = sock.recv(1, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    continue
                except OSError:
                    got = b""
                if got:
                    self.read[i] += got
                else:
                    self.eof[i] = True

    def statuses(self) -> dict[str, int]:
        """Status lines seen so far (an empty key: fewer than 12 bytes read)."""
        out: dict[str, int] = {}
        for r in self.read:
            key = r[9:12].decode(errors="replace") if len(r) >= 12 else ""
            out[key] = out.get(key, 0) + 1
        return out

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        for sock in self.socks:
            sock.close()


@dataclass
class Load:
    """What a closed loop of normal streams got."""

    tokens: int = 0
    requests: int = 0
    seconds: float = 0.0
    chats: list[Chat] | None = None


async def closed_loop(ctx: Context, concurrency: int, seconds: float) -> Load:
    """``concurrency`` workers, each sending its next stream (greedy, NORMAL_MAX_TOKENS tokens)
    as soon as the last one ended, for ``seconds``; the streams open then are finished.
    Tokens are the usage of the finished streams; seconds run until the last one ended."""
    texts = prompts(concurrency * 64)
    chats: list[Chat] = []
    t0 = time.perf_counter()

    async def worker(w: int) -> None:
        k = 0
        while time.perf_counter() - t0 < seconds:
            text = texts[(w + k * concurrency) % len(texts)]
            chats.append(
                await stream_chat(
                    ctx.client,
                    ctx.model,
                    [_user(text)],
                    max_tokens=NORMAL_MAX_TOKENS,
                    ignore_eos=True,
                )
            )
            k += 1

    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    tokens = sum(c.completion_tokens or 0 for c in chats if c.ok)
    return Load(tokens, len(chats), time.perf_counter() - t0, chats)


DECODE_ROWS = 'glmserve_batch_size_sum{phase="decode"}'
DECODE_STEPS = 'glmserve_batch_size_count{phase="decode"}'


def cpu_seconds(stack: Stack) -> dict[str, float]:
    """CPU seconds (user + system) used so far by the server, the bridge and this process."""
    out: dict[str, float] = {}
    for name, pid in (
        ("server", stack.server.pid if stack.server else None),
        ("bridge", stack.bridge.pid if stack.bridge else None),
        ("client", os.getpid()),
    ):
        with contextlib.suppress(psutil.Error, TypeError):
            t = psutil.Process(pid).cpu_times()
            out[name] = t.user + t.system
    return out


async def measured(stack: Stack, load: Awaitable[Load]) -> tuple[Load, dict[str, float | None]]:
    """``load`` plus what it cost: CPU seconds per process, and the model server's mean decode
    batch (rows per step) while it ran."""
    cpu0, m0 = cpu_seconds(stack), read_metrics(stack)
    out = await load
    cpu1, m1 = cpu_seconds(stack), read_metrics(stack)
    rows, steps = delta(m0, m1, DECODE_ROWS), delta(m0, m1, DECODE_STEPS)
    cost: dict[str, float | None] = {f"{k}_cpu_s": cpu1[k] - cpu0[k] for k in cpu1 if k in cpu0}
    cost["mean_decode_batch"] = rows / steps if rows is not None and steps else None
    cost["decoded_tokens"] = rows  # every stream's, the normal loop's and the others'
    cost["stream_pauses"] = delta(m0, m1, PAUSES)
    return out, cost


def _load_row(load: Load, cost: dict[str, float | None]) -> dict[str, Any]:
    chats = load.chats or []
    ttfts = [c.ttft for c in chats if c.ok and c.ttft is not None]
    return {
        **cost,
        "requests": load.requests,
        "tokens": load.tokens,
        "seconds": load.seconds,
        "tok_s": load.tokens / load.seconds if load.seconds else None,
        "ttft_p50": percentile(ttfts, 50),
        "ttft_p95": percentile(ttfts, 95),
        **_errors(chats),
    }


@dataclass
class BridgeWatch:
    """The bridge's RSS and its streams-in-flight gauge, sampled while slow readers run."""

    rss_peak: int = 0
    in_flight_max: float = 0.0
    # When the gauge first fell back to the normal loop's streams or fewer after its peak:
    # the slow streams are gone.
    slow_gone_at_s: float | None = None
    # The same for the model server's running gauge (a call counts until it ends, so this is
    # when the server had ended the slow streams' calls: done, or cancelled by the cut).
    slow_calls_ended_at_s: float | None = None
    running_max: float = 0.0
    samples: int = 0


async def watch_bridge(
    stack: Stack, watch: BridgeWatch, stop: asyncio.Event, normal: int, every: float = 0.25
) -> None:
    assert stack.bridge is not None
    bridge = stack.bridge
    proc = psutil.Process(bridge.pid)
    t0 = time.perf_counter()
    while not stop.is_set():
        with contextlib.suppress(psutil.Error):
            watch.rss_peak = max(watch.rss_peak, int(proc.memory_info().rss))
        with contextlib.suppress(OSError, ValueError):
            in_flight = (await asyncio.to_thread(bridge.metrics)).get(IN_FLIGHT, 0.0)
            watch.in_flight_max = max(watch.in_flight_max, in_flight)
            if watch.slow_gone_at_s is None and watch.in_flight_max > normal >= in_flight:
                watch.slow_gone_at_s = time.perf_counter() - t0
        running = metric(await asyncio.to_thread(read_metrics, stack), RUNNING)
        if running is not None:
            watch.running_max = max(watch.running_max, running)
            if watch.slow_calls_ended_at_s is None and watch.running_max > normal >= running:
                watch.slow_calls_ended_at_s = time.perf_counter() - t0
        watch.samples += 1
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), every)


async def watched(stack: Stack, normal: int, work: Awaitable[Load]) -> Load:
    """``work`` under the same :func:`watch_bridge` sampling as the run beside slow readers."""
    stop = asyncio.Event()
    watcher = asyncio.ensure_future(watch_bridge(stack, BridgeWatch(), stop, normal))
    try:
        return await work
    finally:
        stop.set()
        await watcher


async def fast_readers(url: str, body: dict[str, Any], count: int) -> int:
    """``count`` streams of ``body`` read as fast as they come (raw bytes, unparsed); bytes."""
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=3600, limits=limits) as client:

        async def one() -> int:
            n = 0
            async with client.stream("POST", url, json=body) as r:
                async for part in r.aiter_raw():
                    n += len(part)
            return n

        return sum(await asyncio.gather(*(one() for _ in range(count))))


async def slowreaders(ctx: Context, opts: Options) -> dict[str, Any]:
    """The c=16 loop for ``slow_seconds`` three times: alone; beside ``slow_readers`` streams of
    the slow request read at full speed (the same generation on the model server, which does
    not wait for readers); and beside as many slow clients reading 1 B/s until it ends. The
    last two differ only in how fast the clients read: the bridge's own share."""
    stack, c = ctx.stack, SLOW_NORMAL_CONCURRENCY
    assert stack.bridge is not None
    await ctx.warm_up()
    log(f"  c={c} alone for {opts.slow_seconds:.0f} s")
    # Every run is watched the same way: the sampling (a metrics scrape of each process four
    # times a second) costs the server and the bridge CPU, so an unwatched "alone" would be
    # faster for that reason alone.
    alone, alone_cost = await measured(
        stack, watched(stack, c, closed_loop(ctx, c, opts.slow_seconds))
    )
    log(f"  alone: {alone.requests} requests, {alone.tokens / alone.seconds:.1f} tok/s")
    settled_alone = await gauges_settle(stack)
    bridge = stack.bridge
    body = {
        "model": ctx.model,
        "messages": [_user(QUESTIONS[1])],
        "stream": True,
        "max_tokens": SLOW_MAX_TOKENS,
        "ignore_eos": True,
        "logprobs": True,
        "top_logprobs": SLOW_TOP_LOGPROBS,
    }
    log(f"  c={c} beside {opts.slow_readers} streams read at full speed")
    fast_job = asyncio.ensure_future(
        fast_readers(stack.base_url + "/chat/completions", body, opts.slow_readers)
    )
    fast, fast_cost = await measured(
        stack, watched(stack, c, closed_loop(ctx, c, opts.slow_seconds))
    )
    fast_bytes = await fast_job
    log(f"  fast: {fast.requests} requests, {fast.tokens / fast.seconds:.1f} tok/s")
    await gauges_settle(stack)
    rss_before = int(psutil.Process(bridge.pid).memory_info().rss)
    cut_before = bridge.log_text().count(WRITE_TIMEOUT_LOG)
    watch, stop = BridgeWatch(), asyncio.Event()
    watcher = asyncio.ensure_future(watch_bridge(stack, watch, stop, c))
    readers = await asyncio.to_thread(SlowReaders, bridge.port, body, opts.slow_readers)
    log(f"  {opts.slow_readers} slow readers sent; c={c} beside them")
    try:
        beside, beside_cost = await measured(stack, closed_loop(ctx, c, opts.slow_seconds))
        log(f"  beside: {beside.requests} requests, {beside.tokens / beside.seconds:.1f} tok/s")
        statuses = readers.statuses()
        cut = bridge.log_text().count(WRITE_TIMEOUT_LOG) - cut_before
        eof = sum(readers.eof)
        bytes_read = [len(r) for r in readers.read]
    finally:
        readers.close()
    stop.set()
    await watcher
    settled = await gauges_settle(stack)
    in_flight_end = None
    with contextlib.suppress(OSError, ValueError):
        in_flight_end = bridge.metrics().get(IN_FLIGHT)
    a, b = _load_row(alone, alone_cost), _load_row(beside, beside_cost)
    f = _load_row(fast, fast_cost)
    return {
        "slow_readers": opts.slow_readers,
        "seconds": opts.slow_seconds,
        "normal_concurrency": c,
        "normal_max_tokens": NORMAL_MAX_TOKENS,
        "write_timeout_s": opts.slow_write_timeout,
        "slow_request": {k: v for k, v in body.items() if k not in ("model", "messages")},
        "alone": a,
        "beside_fast": {**f, "stream_bytes": fast_bytes},
        "beside": b,
        "tok_s_ratio": b["tok_s"] / a["tok_s"] if a["tok_s"] and b["tok_s"] else None,
        "tok_s_ratio_vs_fast": b["tok_s"] / f["tok_s"] if f["tok_s"] and b["tok_s"] else None,
        "slow_statuses": statuses,
        "slow_closed_by_timeout": cut,
        "slow_eof_seen": eof,  # few: a client reading 1 B/s rarely gets to the close
        "slow_bytes_read_max": max(bytes_read, default=0),
        "slow_gone_at_s": watch.slow_gone_at_s,
        "slow_calls_ended_at_s": watch.slow_calls_ended_at_s,
        "server_running_max": watch.running_max,
        "bridge_in_flight_max": watch.in_flight_max,
        "bridge_in_flight_end": in_flight_end,
        "bridge_rss_before": rss_before,
        "bridge_rss_peak": max(watch.rss_peak, rss_before),
        "bridge_rss_growth": max(watch.rss_peak, rss_before) - rss_before,
        "bridge_samples": watch.samples,
        "settle_alone": settled_alone,
        **settled,
    }


def tiny_checkpoint(out: Path) -> str:
    """A tiny random Llama with SmolLM2's tokenizer (``tests/tiny_models.py``), built in
    seconds: a model server that is never the bottleneck on a CPU."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny_models import make_tiny_llama, smollm_tokenizer_dir

    tokenizer = smollm_tokenizer_dir(out)
    return str(make_tiny_llama(out / "tiny-llama", tokenizer, max_position_embeddings=1024))


async def _run_one(
    name: str, stack: Stack, opts: Options, server_args: list[str]
) -> dict[str, Any]:
    ctx = Context(stack)
    watch = CpuWatch(stack.pids)
    try:
        await ctx.open()
        if name == "multiturn":
            out = await multiturn(ctx, opts.time_box_s)
        elif name == "nomax":
            out = await nomax(ctx, opts.time_box_s)
        elif name == "slowreaders":
            out = await slowreaders(ctx, opts)
        else:
            out = await longprompt(ctx, opts, server_args)
        # Share of the cores busy with processes outside the benchmark (noise, as for levels).
        out["foreign_cpu"] = watch.foreign_share()
        out.update(model=ctx.model, device=ctx.device, load_s=stack.load_seconds)
    finally:
        await ctx.close()
    return out


def run_scenario(name: str, opts: Options) -> dict[str, Any]:
    """One scenario on its own fresh stack; failures are recorded, not raised."""
    server_args = long_server_args(opts) if name == "longprompt" else []
    if name == "slowreaders":  # every slow stream and normal one generates at once
        server_args = ["--max-num-seqs", str(opts.slow_readers + SLOW_NORMAL_CONCURRENCY + 16)]
    t0 = time.perf_counter()
    result: dict[str, Any]
    log(
        f"scenario {name}: starting model-server {shlex.join(server_args) or '(defaults)'} + bridge"
    )
    model, bridge_args, limit = opts.model, (), opts.time_box_s + 300
    try:
        with tempfile.TemporaryDirectory(prefix="glmserve-bench-") as tmp:
            if name == "slowreaders":
                model = opts.slow_model
                if model == "tiny":
                    model = tiny_checkpoint(Path(tmp))
                bridge_args = ("--stream-write-timeout", f"{opts.slow_write_timeout:g}")
                limit = 3 * opts.slow_seconds + 900
            with Stack(model, tuple(server_args), bridge_args=bridge_args) as stack:
                log(f"  model server SERVING after {stack.load_seconds:.1f} s")
                result = asyncio.run(
                    asyncio.wait_for(_run_one(name, stack, opts, server_args), limit)
                )
    except (TimeoutError, Exception) as exc:  # noqa: BLE001 - record and go on
        result = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
        log(f"  scenario {name} failed: {result['error'][:300]}")
    result["elapsed_s"] = time.perf_counter() - t0
    return result


def run_scenarios(names: Sequence[str], opts: Options) -> dict[str, Any]:
    """Every named scenario in order, each on its own stack."""
    unknown = [n for n in names if n not in NAMES]
    if unknown:
        raise ValueError(f"unknown scenario(s) {unknown}; known: {', '.join(NAMES)}")
    return {name: run_scenario(name, opts) for name in names}
