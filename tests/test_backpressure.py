"""Backpressure on the model server, over a real gRPC server: a stream whose client stops
reading is paused (seat, compute and KV freed) and resumed, with exactly its tokens, when the
client reads again; what piled up meanwhile is sent merged.

The client's channel keeps its receive window small (as the bridge's does), so the server's
writes really wait; ``--max-num-seqs 1`` shows that the paused request gives its seat away.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_client import chat_request
from procs import Proc, start_model_server, wait_until

from glmserve.v1 import chat_pb2, chat_pb2_grpc

PAUSED = "glmserve_requests_paused"
PAUSES = "glmserve_stream_pauses_total"
DECODED = 'glmserve_step_tokens_total{phase="decode"}'
RUNNING = "glmserve_requests_running"
WAITING = "glmserve_requests_waiting"
# The bridge's settings (http_bridge.backend): no BDP probing, a small stream window.
SMALL_WINDOW = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)]
LONG = {"max_tokens": 400, "ignore_eos": True, "temperature": 0.0}
SHORT = {"max_tokens": 24, "ignore_eos": True, "temperature": 0.0}


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path) -> Iterator[Proc]:
    args = ("--max-num-seqs", "1", "--max-stream-backlog", "4")
    with start_model_server(str(tiny_model_dir), *args) as s:
        yield s


@pytest.fixture()
def stub(server: Proc) -> Iterator[chat_pb2_grpc.ChatServiceStub]:
    with grpc.insecure_channel(server.target, options=SMALL_WINDOW) as channel:
        yield chat_pb2_grpc.ChatServiceStub(channel)


def tokens(msgs: Iterator[chat_pb2.ChatResponse]) -> list[int]:
    return [t for m in msgs for t in m.token_ids]


def metric(server: Proc, name: str) -> float:
    return server.metrics().get(name, 0.0)


def settled_pause(server: Proc, timeout: float = 30.0) -> float:
    """Waits until one request is paused and no decode step ran for half a second; returns
    the decode counter then."""
    last = -1.0

    def settled() -> bool:
        nonlocal last
        now = metric(server, DECODED)
        done = metric(server, PAUSED) == 1 and now == last
        last = now
        return done

    wait_until(settled, timeout, "the stalled stream paused for good", every=0.5)
    return last


def test_a_stalled_stream_is_paused_frees_its_seat_and_resumes_exactly(
    server: Proc, stub: chat_pb2_grpc.ChatServiceStub
) -> None:
    solo_long = tokens(stub.Chat(chat_request("Tell me a long story", **LONG)))
    solo_short = tokens(stub.Chat(chat_request("Hi", **SHORT)))
    assert len(solo_long) == LONG["max_tokens"]
    pauses, decoded_before = metric(server, PAUSES), metric(server, DECODED)

    stalled = stub.Chat(chat_request("Tell me a long story", **LONG))
    first = next(stalled)
    # Once the buffers on the way are full it is paused for good: its seat is free and
    # nothing more is computed for it. (On a loaded box a write that is only slow may pause
    # and resume it before that; such a pause costs a recompute, never a token.)
    decoded = settled_pause(server)
    assert metric(server, PAUSES) >= pauses + 1
    assert metric(server, RUNNING) == 0
    time.sleep(1.0)
    assert metric(server, DECODED) == decoded, "nothing is computed for a paused stream"
    assert metric(server, PAUSED) == 1
    # What it generated is what fits in those buffers, far from its max_tokens.
    assert decoded - decoded_before < LONG["max_tokens"] / 2

    # The only seat (--max-num-seqs 1) serves someone else meanwhile, with their solo tokens.
    assert tokens(stub.Chat(chat_request("Hi", **SHORT))) == solo_short

    # Read on: the stream resumes (pausing again as often as the client lags) and its tokens
    # are exactly the uninterrupted ones, none lost or repeated.
    rest = list(stalled)
    assert [*first.token_ids, *tokens(iter(rest))] == solo_long
    # What piled up while the client did not read went out merged, several tokens a message.
    assert max(len(m.token_ids) for m in rest) > 1
    assert rest[-1].finish_reason == chat_pb2.FINISH_REASON_LENGTH
    wait_until(
        lambda: (
            (metric(server, PAUSED), metric(server, RUNNING), metric(server, WAITING)) == (0, 0, 0)
        ),
        10,
        "gauges back to 0",
    )
    # One seat: every decode step decoded one token, each an ordinary step (the CPU has
    # neither static steps nor CUDA graphs).
    steps = 'glmserve_decode_steps_total{mode="ordinary"}'
    assert metric(server, steps) == metric(server, DECODED) > 0


def test_a_paused_stream_that_is_cancelled_leaves_nothing_behind(
    server: Proc, stub: chat_pb2_grpc.ChatServiceStub
) -> None:
    stalled = stub.Chat(chat_request("Tell me a long story", **LONG))
    next(stalled)
    settled_pause(server)
    stalled.cancel()
    wait_until(lambda: metric(server, PAUSED) == 0, 10, "the paused request gone")
    assert metric(server, RUNNING) == metric(server, WAITING) == 0
    assert len(tokens(stub.Chat(chat_request("Hi", **SHORT)))) == SHORT["max_tokens"]
