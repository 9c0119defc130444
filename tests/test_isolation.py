"""One request never hurts another: poisoned sampling parameters and a model whose logits go
NaN for one row, next to four normal greedy requests, on a real model server over gRPC."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_client import chat_request
from procs import Proc, start_model_server, wait_until
from tiny_models import make_poisoned_llama, script_tokens

from glmserve.v1 import chat_pb2, chat_pb2_grpc

POISON = " Quetzalcoatl"
NORMAL = [
    "Hi",
    "Tell me about the sea",
    "一二三四五六七八九十 count on please",
    "A much longer prompt that goes on about many things " * 4,
]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def poisoned_server(
    tmp_path_factory: pytest.TempPathFactory, smollm_tokenizer: Path
) -> Iterator[Proc]:
    model = make_poisoned_llama(tmp_path_factory.mktemp("poison") / "m", smollm_tokenizer, POISON)
    with start_model_server(str(model)) as server:
        yield server


async def _run(
    stub: chat_pb2_grpc.ChatServiceStub, prompt: str, **fields: object
) -> tuple[list[int], grpc.StatusCode, str]:
    """Token ids, final status and details (the deadline turns a hang into a failure)."""
    call = stub.Chat(
        chat_request(prompt, max_tokens=MAX_TOKENS, ignore_eos=True, **fields), timeout=30
    )
    ids: list[int] = []
    try:
        async for msg in call:
            ids += msg.token_ids
    except grpc.aio.AioRpcError:
        pass
    return ids, await call.code(), await call.details() or ""


@pytest.mark.parametrize(
    "poison",
    [
        {"temperature": 1e-40},
        {"temperature": 0.7, "repetition_penalty": 1e-40, "seed": 1},
        {"temperature": 0.0, "nan": True},
    ],
    ids=["temperature-1e-40", "repetition-penalty-1e-40", "nan-logits"],
)
def test_poisoned_request_beside_four_normal_ones(poisoned_server, poison):
    poison = dict(poison)
    nan = poison.pop("nan", False)
    prompt = f"Say{POISON} now" if nan else "Be poisoned"

    async def scenario() -> None:
        async with grpc.aio.insecure_channel(poisoned_server.target) as ch:
            stub = chat_pb2_grpc.ChatServiceStub(ch)
            poison_ids = set(script_tokens_of(POISON))
            for p in NORMAL:  # the normal prompts never touch the poisoned embedding rows
                tok = await stub.Tokenize(
                    chat_pb2.TokenizeRequest(messages=chat_request(p).messages)
                )
                assert not poison_ids & set(tok.token_ids)
            solo = [(await _run(stub, p, temperature=0.0))[0] for p in NORMAL]
            results = await asyncio.gather(
                *(_run(stub, p, temperature=0.0) for p in NORMAL), _run(stub, prompt, **poison)
            )
            for (ids, code, details), alone in zip(results[:4], solo, strict=True):
                assert code == grpc.StatusCode.OK, details
                assert ids == alone, "a normal request's tokens changed next to the poisoned one"
            ids, code, details = results[4]
            if nan:  # ends alone at its very first token, with a clear status
                assert code == grpc.StatusCode.INVALID_ARGUMENT
                assert "non-finite" in details and ids == []
            else:  # clamped: a normal, finite result
                assert code == grpc.StatusCode.OK, details
                assert len(ids) == MAX_TOKENS

    script_tokens_of = lambda text: script_tokens(  # noqa: E731
        Path(poisoned_server.args[poisoned_server.args.index("--model") + 1]), text
    )
    asyncio.run(scenario())
    wait_until(
        lambda: poisoned_server.metrics()["glmserve_requests_running"] == 0, 10, "running at 0"
    )
    assert poisoned_server.proc.poll() is None
