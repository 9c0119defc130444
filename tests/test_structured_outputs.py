"""Structured outputs on real processes: grammar-constrained decoding (llguidance) makes even a
tiny *random* model produce JSON valid for the schema. model-server → http-bridge → the openai
SDK (``response_format``, ``parse()``), and the gRPC StructuredOutput's regex and Lark kinds."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import grpc
import jsonschema
import openai
import pydantic
import pytest
from procs import Proc

from glmserve.v1 import chat_pb2, chat_pb2_grpc

HI = [{"role": "user", "content": "Describe a person."}]
# Bounded strings and arrays: a random model would otherwise fill max_tokens inside a string.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "score": {"type": "number"},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "tags", "active"],
    "additionalProperties": False,
}


def person_format(schema: dict = PERSON) -> dict:
    return {
        "type": "json_schema",
        "json_schema": {"name": "person", "schema": schema, "strict": True},
    }


@pytest.fixture(scope="module")
def server(api_stack: tuple[Proc, Proc]) -> Proc:
    return api_stack[0]


@pytest.fixture(scope="module")
def bridge(api_stack: tuple[Proc, Proc]) -> Proc:
    return api_stack[1]


@pytest.fixture(scope="module")
def client(bridge: Proc) -> openai.OpenAI:
    return openai.OpenAI(base_url=bridge.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def test_json_schema_replies_validate(client: openai.OpenAI, model: str) -> None:
    def one(seed: int) -> str:
        out = client.chat.completions.create(
            model=model, messages=HI, temperature=0.7, seed=seed, max_tokens=300,
            response_format=person_format(),
        )  # fmt: skip
        assert out.choices[0].finish_reason == "stop", out.choices[0].message.content
        return out.choices[0].message.content

    with ThreadPoolExecutor(8) as pool:  # concurrent: constrained rows batched together
        replies = list(pool.map(one, range(6)))
    for reply in replies:
        jsonschema.validate(json.loads(reply), PERSON)
    assert len(set(replies)) > 1  # sampled, not one canned answer


def test_json_object_and_stream(client: openai.OpenAI, model: str) -> None:
    schema = {"type": "object", "properties": {"k": {"type": "string", "maxLength": 8}},
              "required": ["k"], "additionalProperties": False}  # fmt: skip
    chunks = client.chat.completions.create(
        model=model, messages=HI, max_tokens=100, stream=True, response_format=person_format(schema)
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), schema)
    # json_object: any object; a random model may ramble inside it, so only the start is sure.
    out = client.chat.completions.create(
        model=model, messages=HI, max_tokens=8, response_format={"type": "json_object"}
    )
    assert out.choices[0].message.content.startswith("{")


def test_sdk_parse_with_a_pydantic_model(client: openai.OpenAI, model: str) -> None:
    class Item(pydantic.BaseModel):
        sku: str = pydantic.Field(max_length=8)
        qty: int

    class Order(pydantic.BaseModel):
        items: list[Item] = pydantic.Field(max_length=2)
        paid: bool

    out = client.chat.completions.parse(
        model=model, messages=HI, max_tokens=200, temperature=0.7, seed=3, response_format=Order
    )
    order = out.choices[0].message.parsed
    assert isinstance(order, Order) and len(order.items) <= 2


def test_unenforceable_schema_is_a_400(client: openai.OpenAI, model: str) -> None:
    lookahead = {"type": "string", "pattern": "^(?=a)b"}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=model, messages=HI, response_format=person_format(lookahead)
        )
    assert err.value.param == "response_format"
    assert "look-around" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=model, messages=HI, response_format=person_format({"type": "nonsense"})
        )
    assert err.value.param == "response_format"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=model, messages=HI, response_format={"type": "json_object"},
            extra_body={"ignore_eos": True},
        )  # fmt: skip
    assert err.value.param == "ignore_eos"


def test_constrained_rows_do_not_change_other_rows(client: openai.OpenAI, model: str) -> None:
    """Greedy plain requests give the same tokens alone and beside constrained ones."""
    plain = dict(model=model, messages=HI, max_tokens=24, temperature=0,
                 extra_body={"ignore_eos": True})  # fmt: skip
    alone = client.chat.completions.create(**plain).choices[0].message.content

    def constrained(seed: int) -> str:
        return client.chat.completions.create(
            model=model, messages=HI, max_tokens=300, temperature=1.0, seed=seed,
            response_format=person_format(),
        ).choices[0].message.content  # fmt: skip

    with ThreadPoolExecutor(6) as pool:
        bad = [pool.submit(constrained, s) for s in range(2)]
        beside = [pool.submit(lambda: client.chat.completions.create(**plain)) for _ in range(3)]
        assert all(f.result().choices[0].message.content == alone for f in beside)
        for f in bad:
            jsonschema.validate(json.loads(f.result()), PERSON)


def test_grpc_regex_and_lark(server: Proc) -> None:
    with grpc.insecure_channel(server.target) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        msgs = [chat_pb2.Message(role=chat_pb2.ROLE_USER, content="code?")]

        def reply(so: chat_pb2.StructuredOutput) -> str:
            req = chat_pb2.ChatRequest(messages=msgs, max_tokens=40, temperature=1.0, seed=1,
                                       structured_output=so)  # fmt: skip
            return "".join(r.text for r in stub.Chat(req))

        assert re.fullmatch(r"[A-Z]{3}-[0-9]{4}", reply(chat_pb2.StructuredOutput(
            regex="[A-Z]{3}-[0-9]{4}")))  # fmt: skip
        lark = 'start: "yes" | "no" | "maybe: " NUM\nNUM: /[0-9]{1,3}/'
        assert re.fullmatch(r"yes|no|maybe: [0-9]{1,3}", reply(chat_pb2.StructuredOutput(
            lark_grammar=lark)))  # fmt: skip
        with pytest.raises(grpc.RpcError) as err:
            reply(chat_pb2.StructuredOutput(json_schema="{not json"))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "structured_output.json_schema" in err.value.details()
