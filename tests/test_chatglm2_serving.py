"""The tiny ChatGLM2 checkpoint served end to end: real model-server → real bridge → openai SDK.

The checkpoint folder carries the original's remote-code files, replaced by tripwires that
leave a marker file and raise if anything ever imports them, and its config names them in
``auto_map``. Serving must still work, and the marker must never appear.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import openai
import pytest
from grpc_client import chat_request, collect
from procs import Proc, start_bridge, start_model_server

from glmserve.v1 import chat_pb2, chat_pb2_grpc
from model_server.models.chatglm2 import ChatGLM2Tokenizer
from model_server.models.chatglm2.chat_format import process_response

TRIPWIRE = '''"""Remote code must never run."""
import pathlib
pathlib.Path({marker!r}).write_text("imported {name}")
raise RuntimeError("remote code imported: {name}")
'''

QUESTIONS = [
    "hi",
    "你好，请问现在几点了？",
    "tell me a story about the world and the time 123",
    "问 答 你好 world",
]


@pytest.fixture(scope="module")
def glm_dir(tiny_chatglm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("served") / "tiny-chatglm2"
    shutil.copytree(tiny_chatglm2_dir, d)
    marker = d.parent / "REMOTE_CODE_RAN"
    for name in (
        "configuration_chatglm.py",
        "modeling_chatglm.py",
        "tokenization_chatglm.py",
        "quantization.py",
    ):
        (d / name).write_text(TRIPWIRE.format(marker=str(marker), name=name), encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def server(glm_dir: Path) -> Iterator[Proc]:
    with start_model_server(str(glm_dir), "--served-model-name", "chatglm2-tiny") as p:
        yield p


@pytest.fixture(scope="module")
def stub(server: Proc) -> Iterator[chat_pb2_grpc.ChatServiceStub]:
    with grpc.insecure_channel(server.target) as ch:
        yield chat_pb2_grpc.ChatServiceStub(ch)


@pytest.fixture(scope="module")
def client(server: Proc) -> Iterator[openai.OpenAI]:
    with start_bridge("--backend", server.target, "--no-ui") as bridge:
        yield openai.OpenAI(base_url=bridge.url + "/v1", api_key="unused", max_retries=0)


def greedy(stub: chat_pb2_grpc.ChatServiceStub, question: str, max_tokens: int = 12):
    req = chat_request(question, max_tokens=max_tokens, temperature=0.0)
    text, msgs = collect(stub.Chat(req, timeout=60))
    return text, [t for m in msgs for t in m.token_ids], msgs[-1]


def test_served_over_grpc_with_chatglm2_format(stub, glm_dir: Path):
    models = stub.ListModels(chat_pb2.ListModelsRequest(), timeout=10).models
    assert [m.id for m in models] == ["chatglm2-tiny"]
    tok = stub.Tokenize(chat_pb2.TokenizeRequest(messages=chat_request("你好").messages))
    # prefix tokens [gMASK] sop, then "[Round 1]\n\n问：你好\n\n答：".
    assert tok.count == len(tok.token_ids) > 4
    text, ids, last = greedy(stub, "你好")
    assert last.finish_reason in (chat_pb2.FINISH_REASON_STOP, chat_pb2.FINISH_REASON_LENGTH)
    assert last.usage.prompt_tokens == tok.count
    assert last.usage.completion_tokens == len(ids) > 0
    # Random weights pick arbitrary byte pieces, so U+FFFD can be a real decode; what matters
    # is that the streamed pieces add up to the original's decode + post-processing.
    tokenizer = ChatGLM2Tokenizer(glm_dir / "tokenizer.model")
    assert text == process_response(tokenizer.decode(ids))


def test_greedy_is_deterministic(stub):
    first = [greedy(stub, q)[:2] for q in QUESTIONS]
    second = [greedy(stub, q)[:2] for q in QUESTIONS]
    assert first == second
    assert len({tuple(ids) for _, ids in first}) > 1, "different prompts, different replies"


def test_batched_equals_solo(stub):
    solo = [greedy(stub, q, 16)[1] for q in QUESTIONS]
    with ThreadPoolExecutor(len(QUESTIONS) * 2) as pool:
        # Every prompt twice, with different lengths joining and leaving mid-way.
        futures = [pool.submit(greedy, stub, q, n) for q in QUESTIONS for n in (16, 5)]
        batched = [f.result()[1] for f in futures]
    for i, ids in enumerate(solo):
        assert batched[2 * i] == ids
        assert batched[2 * i + 1] == ids[:5]


def test_served_through_the_bridge(client, stub):
    _, ids, _ = greedy(stub, QUESTIONS[1], 12)
    reply = client.chat.completions.create(
        model="chatglm2-tiny",
        messages=[{"role": "user", "content": QUESTIONS[1]}],
        max_tokens=12,
        temperature=0,
    )
    assert reply.model == "chatglm2-tiny"
    assert reply.usage.completion_tokens == len(ids)
    chunks = client.chat.completions.create(
        model="chatglm2-tiny",
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": QUESTIONS[1]},
        ],
        max_tokens=12,
        temperature=0,
        stream=True,
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed
    assert [m.id for m in client.models.list().data] == ["chatglm2-tiny"]


def test_inexpressible_history_is_a_clear_400(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model="chatglm2-tiny",
            messages=[{"role": "assistant", "content": "I speak first"}],
            max_tokens=4,
        )
    assert err.value.status_code == 400
    assert err.value.body["message"]


def test_remote_code_never_ran(glm_dir: Path, server: Proc, client):
    assert not (glm_dir.parent / "REMOTE_CODE_RAN").exists()
    assert "remote code imported" not in server.log_text()
    assert server.proc.poll() is None


def test_no_fused_layers_serves_the_same_tokens(stub, server: Proc, glm_dir: Path):
    """``--no-fused-layers`` loads transformers' own rotary: in fp32 the replies are the same
    tokens as the default server's (which runs the fused one)."""
    fused = [greedy(stub, q, 16)[1] for q in QUESTIONS]
    assert "fused layers: 0 RMSNorms, 2 GLM rotary attentions" in server.log_text()  # CPU
    with (
        start_model_server(str(glm_dir), "--no-fused-layers") as plain,
        grpc.insecure_channel(plain.target) as ch,
    ):
        stock = [greedy(chat_pb2_grpc.ChatServiceStub(ch), q, 16)[1] for q in QUESTIONS]
        assert "fused layers" not in plain.log_text()
    assert stock == fused
