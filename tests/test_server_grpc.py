"""End-to-end tests of the model server over real gRPC on loopback (tiny models)."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from conftest import SCRIPT
from grpc_client import chat_request, collect
from procs import spawn_model_server, wait_until

from glmserve.v1 import chat_pb2, chat_pb2_grpc


@pytest.fixture(scope="module")
def scripted(scripted_model_dir):
    p = spawn_model_server(str(scripted_model_dir), "--served-model-name", "scripted")
    yield p
    p.stop()


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    p = spawn_model_server(str(tiny_model_dir), "--served-model-name", "tiny")
    yield p
    p.stop()


def stub_for(proc) -> chat_pb2_grpc.ChatServiceStub:  # noqa: ANN001
    return chat_pb2_grpc.ChatServiceStub(grpc.insecure_channel(proc.target))


def test_stream_has_many_messages_and_a_final_one(scripted):
    text, msgs = collect(stub_for(scripted).Chat(chat_request("anything", temperature=0)))
    assert text == SCRIPT
    assert len(msgs) > 5
    assert all(m.finish_reason == chat_pb2.FINISH_REASON_UNSPECIFIED for m in msgs[:-1])
    assert not any(m.HasField("usage") for m in msgs[:-1])
    last = msgs[-1]
    assert last.finish_reason == chat_pb2.FINISH_REASON_STOP
    assert last.usage.prompt_tokens > 10
    # every generated token is reported once: the script's tokens + eos
    assert last.usage.completion_tokens == sum(len(m.token_ids) for m in msgs)


def test_cjk_never_split(scripted):
    _, msgs = collect(stub_for(scripted).Chat(chat_request("x", temperature=0)))
    assert all("\ufffd" not in m.text for m in msgs)
    # the CJK characters span several byte tokens: some messages carry tokens but no text yet
    assert any(m.token_ids and not m.text for m in msgs)
    assert "你好世界" in "".join(m.text for m in msgs)


@pytest.mark.parametrize(
    ("stop", "expected"),
    [
        (["o th"], "Hell"),  # across the "Hello" | " there" token boundary
        (["世界"], "Hello there! 你好"),  # inside multi-byte tokens
        (["zzz", "! 你"], "Hello there"),  # the earliest of several
        (["Done!"], SCRIPT),  # a prefix that never completes is released at the end
    ],
)
def test_stop_strings(scripted, stop, expected):
    text, msgs = collect(stub_for(scripted).Chat(chat_request("x", temperature=0, stop=stop)))
    assert text == expected
    assert msgs[-1].finish_reason == chat_pb2.FINISH_REASON_STOP


def test_max_tokens_gives_length_with_exact_count(scripted):
    text, msgs = collect(stub_for(scripted).Chat(chat_request("x", temperature=0, max_tokens=2)))
    assert text == "Hello there"
    assert msgs[-1].finish_reason == chat_pb2.FINISH_REASON_LENGTH
    assert msgs[-1].usage.completion_tokens == 2


def test_context_limit_stops_with_length(tiny):
    stub = stub_for(tiny)
    count = stub.Tokenize(
        chat_pb2.TokenizeRequest(messages=[chat_pb2.Message(role=chat_pb2.ROLE_USER, content="Hi")])
    ).count
    _, msgs = collect(stub.Chat(chat_request("Hi", temperature=0, ignore_eos=True)))
    assert msgs[-1].finish_reason == chat_pb2.FINISH_REASON_LENGTH
    assert msgs[-1].usage.completion_tokens == 512 - count


def test_greedy_is_deterministic_and_seed_reproducible(tiny):
    stub = stub_for(tiny)

    def run(**kw: object) -> list[int]:
        _, msgs = collect(
            stub.Chat(chat_request("Tell me a story", max_tokens=24, ignore_eos=True, **kw))
        )
        return [t for m in msgs for t in m.token_ids]

    assert run(temperature=0) == run(temperature=0)
    a = run(temperature=1.0, seed=1234)
    assert a == run(temperature=1.0, seed=1234)
    assert a != run(temperature=1.0, seed=4321)


def test_usage_counts_the_prompt_tokens_found_in_the_prefix_cache(tiny):
    stub = stub_for(tiny)
    conversation = [("system", "You count cached tokens."), ("user", "Cache test: a colour?")]

    def usage(messages: list[tuple[str, str]]) -> chat_pb2.Usage:
        request = chat_request(messages=messages, max_tokens=9, temperature=0, ignore_eos=True)
        return collect(stub.Chat(request))[1][-1].usage

    first, again = usage(conversation), usage(conversation)
    assert first.cached_prompt_tokens == 0  # nobody sent this prompt before
    # The same prompt again: its full blocks (16 tokens each), short of the last token, which
    # is always computed.
    assert first.prompt_tokens > 16
    assert again.cached_prompt_tokens == (again.prompt_tokens - 1) // 16 * 16


def test_concurrent_requests_match_solo_greedy(tiny):
    """Different prompts and lengths in one batch: each gets exactly its solo output."""
    stub = stub_for(tiny)
    prompts = [("Hi", 30), ("What is two plus two? " * 5, 12), ("Write a poem", 45), ("x", 7)]
    solo = {}
    for p, n in prompts:
        _, msgs = collect(stub.Chat(chat_request(p, temperature=0, max_tokens=n, ignore_eos=True)))
        solo[p] = [t for m in msgs for t in m.token_ids]
    results: dict[str, list[int]] = {}

    def worker(p: str, n: int, delay: float) -> None:
        time.sleep(delay)
        _, msgs = collect(stub.Chat(chat_request(p, temperature=0, max_tokens=n, ignore_eos=True)))
        results[p] = [t for m in msgs for t in m.token_ids]

    threads = [
        threading.Thread(target=worker, args=(p, n, i * 0.05)) for i, (p, n) in enumerate(prompts)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == solo


def test_cancel_frees_the_slot(tiny):
    stub = stub_for(tiny)
    call = stub.Chat(chat_request("Go on forever", temperature=0, max_tokens=400, ignore_eos=True))
    next(call)
    next(call)
    assert tiny.metrics()["glmserve_requests_running"] == 1
    call.cancel()
    wait_until(lambda: tiny.metrics()["glmserve_requests_running"] == 0, 5, "running at 0")
    m = tiny.metrics()
    assert m["glmserve_requests_waiting"] == 0
    assert m['glmserve_requests_total{finish_reason="aborted"}'] >= 1


def test_deadline_cancels_generation(tiny):
    stub = stub_for(tiny)
    with pytest.raises(grpc.RpcError) as err:
        collect(
            stub.Chat(
                chat_request("Go", temperature=0, max_tokens=450, ignore_eos=True), timeout=0.3
            )
        )
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until(lambda: tiny.metrics()["glmserve_requests_running"] == 0, 5, "running at 0")


def _msgs(*pairs: tuple[int, str]) -> list[chat_pb2.Message]:
    return [chat_pb2.Message(role=r, content=c) for r, c in pairs]


U = chat_pb2.ROLE_USER
A = chat_pb2.ROLE_ASSISTANT


@pytest.mark.parametrize(
    ("request_", "code", "needle"),
    [
        (chat_pb2.ChatRequest(), "INVALID_ARGUMENT", "messages"),
        (chat_pb2.ChatRequest(messages=_msgs((0, "hi"))), "INVALID_ARGUMENT", "messages[0].role"),
        (
            chat_pb2.ChatRequest(messages=_msgs((U, "hi"), (A, "yo"))),
            "INVALID_ARGUMENT",
            "last message",
        ),
        (chat_request("hi", max_tokens=0), "INVALID_ARGUMENT", "max_tokens"),
        (chat_request("hi", max_tokens=100000), "INVALID_ARGUMENT", "512"),
        (chat_request("hi", temperature=2.5), "INVALID_ARGUMENT", "temperature"),
        (chat_request("hi", temperature=-0.1), "INVALID_ARGUMENT", "temperature"),
        (chat_request("hi", top_p=0), "INVALID_ARGUMENT", "top_p"),
        (chat_request("hi", top_p=1.5), "INVALID_ARGUMENT", "top_p"),
        (chat_request("hi", presence_penalty=3), "INVALID_ARGUMENT", "presence_penalty"),
        (chat_request("hi", max_tokens=3, min_tokens=5), "INVALID_ARGUMENT", "min_tokens"),
        (chat_request("hi", stop=[""]), "INVALID_ARGUMENT", "stop[0]"),
        (chat_request("hi", model="gpt-4"), "NOT_FOUND", "gpt-4"),
    ],
)
def test_bad_input_gets_a_clear_status(tiny, request_, code, needle):
    with pytest.raises(grpc.RpcError) as err:
        collect(stub_for(tiny).Chat(request_))
    assert err.value.code() == getattr(grpc.StatusCode, code)
    assert needle in err.value.details()


def test_prompt_longer_than_context_names_both_numbers(tiny):
    with pytest.raises(grpc.RpcError) as err:
        collect(stub_for(tiny).Chat(chat_request("hello " * 600)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = err.value.details()
    assert "512" in details and "tokens" in details
    # ...and the server keeps serving everyone else
    text, _ = collect(stub_for(tiny).Chat(chat_request("hi", max_tokens=3)))
    assert isinstance(text, str)


def test_list_models_and_tokenize(tiny):
    stub = stub_for(tiny)
    models = stub.ListModels(chat_pb2.ListModelsRequest()).models
    assert [m.id for m in models] == ["tiny"]
    assert models[0].max_model_len == 512 and models[0].architecture == "llama"
    tok = stub.Tokenize(chat_pb2.TokenizeRequest(messages=_msgs((U, "Hello"))))
    assert tok.count == len(tok.token_ids) > 3 and tok.max_model_len == 512
    _, msgs = collect(stub.Chat(chat_request("Hello", max_tokens=1)))
    assert msgs[-1].usage.prompt_tokens == tok.count


def test_queue_full_is_resource_exhausted(tiny_model_dir):
    p = spawn_model_server(
        str(tiny_model_dir), "--max-num-seqs", "1", "--max-waiting", "0", metrics=False
    )
    try:
        stub = stub_for(p)
        first = stub.Chat(chat_request("a", max_tokens=400, ignore_eos=True, temperature=0))
        next(first)
        with pytest.raises(grpc.RpcError) as err:
            collect(stub.Chat(chat_request("b", max_tokens=5)))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        first.cancel()
    finally:
        p.stop()
