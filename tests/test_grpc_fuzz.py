"""Property-based fuzz of the model server's gRPC edge: only clean statuses, never a hang.

A real ``model-server`` on loopback (the tiny random Llama with a 64-token context, so anything
that generates ends within a few dozen tokens). ``ChatRequest``s are generated over every
field's whole wire range (uint32/uint64 extremes, NaN, infinities, denormals, negative zero,
unknown role numbers, control characters, long stop lists), and raw bytes (mutated valid
messages, invalid UTF-8 in string fields) are sent straight to the method. Every call must end
within its deadline with OK, INVALID_ARGUMENT, NOT_FOUND or RESOURCE_EXHAUSTED: never INTERNAL,
UNKNOWN or DEADLINE_EXCEEDED; afterwards the server still answers and its gauges are back to 0.
Hypothesis runs with a fixed seed, no example database and a fixed budget.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from procs import Proc, start_model_server, wait_until

from glmserve.v1 import chat_pb2, chat_pb2_grpc

SEED = 20261126
FUZZ = settings(
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
CLEAN = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
DEADLINE = 30.0
CHAT = "/glmserve.v1.ChatService/Chat"


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path) -> Iterator[Proc]:
    with start_model_server(str(tiny_model_dir), "--max-model-len", "64") as proc:
        yield proc


@pytest.fixture(scope="module")
def channel(server: Proc) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.target) as ch:
        yield ch


def _check(call) -> None:  # noqa: ANN001 - a response iterator of either kind
    try:
        for _ in call:
            pass
        code = grpc.StatusCode.OK
    except grpc.RpcError as err:
        code = err.code()
        details = err.details() or ""
        assert code in CLEAN, f"{code}: {details}"
        return
    assert code in CLEAN


u32 = st.one_of(st.integers(0, 2**32 - 1), st.sampled_from([0, 1, 2**31, 2**32 - 1]))
u64 = st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 2**63, 2**64 - 1]))
f32 = st.one_of(
    st.floats(width=32, allow_nan=True, allow_infinity=True),
    st.sampled_from([1e-40, -1e-40, 1e-45, -0.0, 0.0, 1e-5, 2.0, 2.0000002, 3.4e38, math.nan]),
)
text = st.text(
    st.characters(blacklist_categories=("Cs",)), max_size=40
)  # protobuf strings are valid UTF-8: lone surrogates are sent as raw bytes below
roles = st.one_of(st.sampled_from([0, 1, 2, 3]), st.integers(-(2**31), 2**31 - 1))


@st.composite
def chat_requests(draw: st.DrawFn) -> chat_pb2.ChatRequest:
    req = chat_pb2.ChatRequest(
        model=draw(st.sampled_from(["", "", "tiny-llama", "nope"]) | text),
        messages=[
            chat_pb2.Message(role=draw(roles), content=draw(text))
            for _ in range(draw(st.integers(0, 4)))
        ],
        stop=draw(st.lists(text, max_size=20)),
        min_tokens=draw(u32),
        ignore_eos=draw(st.booleans()),
        request_id=draw(st.sampled_from(["", "same-id"]) | text),
        presence_penalty=draw(f32),
        frequency_penalty=draw(f32),
    )
    for name, strategy in (
        ("max_tokens", st.one_of(st.integers(1, 8), u32)),
        ("temperature", f32),
        ("top_p", f32),
        ("top_k", u32),
        ("seed", u64),
        ("repetition_penalty", f32),
    ):
        if draw(st.booleans()):
            setattr(req, name, draw(strategy))
    return req


@seed(SEED)
@FUZZ
@given(req=chat_requests())
def test_generated_chat_requests_get_clean_statuses(channel: grpc.Channel, req) -> None:
    stub = chat_pb2_grpc.ChatServiceStub(channel)
    _check(stub.Chat(req, timeout=DEADLINE))


VALID = chat_pb2.ChatRequest(
    messages=[chat_pb2.Message(role=chat_pb2.ROLE_USER, content="hi")], max_tokens=4
).SerializeToString()


@st.composite
def raw_messages(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["flip", "splice", "random", "bad-utf8"]))
    data = bytearray(VALID)
    if kind == "flip":
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.integers(0, 255))
    elif kind == "splice":
        i = draw(st.integers(0, len(data)))
        data[i:i] = draw(st.binary(max_size=16))
    elif kind == "random":
        return draw(st.binary(max_size=64))
    else:  # content / stop / model with a lone surrogate or invalid UTF-8
        bad = draw(st.sampled_from([b"\xed\xa0\x80", b"\xff", b"\xc3", b"a\x00b"]))
        field = draw(st.sampled_from([b"\x0a", b"\x3a", b"\x72"]))  # model, stop, request_id
        if field == b"\x0a":
            return VALID + b"\x0a" + bytes([len(bad)]) + bad
        return VALID + field + bytes([len(bad)]) + bad
    return bytes(data)


@seed(SEED)
@FUZZ
@given(payload=raw_messages())
def test_raw_bytes_get_clean_statuses(channel: grpc.Channel, payload: bytes) -> None:
    call = channel.unary_stream(CHAT, request_serializer=None, response_deserializer=None)
    _check(call(payload, timeout=DEADLINE))


def test_server_still_serves_after_the_fuzz(server: Proc, channel: grpc.Channel) -> None:
    stub = chat_pb2_grpc.ChatServiceStub(channel)
    msgs = list(
        stub.Chat(
            chat_pb2.ChatRequest(
                messages=[chat_pb2.Message(role=chat_pb2.ROLE_USER, content="still there?")],
                max_tokens=3,
                temperature=0.0,
                ignore_eos=True,
            ),
            timeout=DEADLINE,
        )
    )
    assert msgs[-1].usage.completion_tokens == 3
    wait_until(lambda: server.metrics()["glmserve_requests_running"] == 0, 10, "running at 0")
    assert "Traceback" not in server.log_text()
