"""Property-based fuzz of the bridge's input boundary: never a 5xx, never a dropped connection.

Real processes on loopback: ``model-server`` on the tiny random Llama (a 48-token context, so a
generated request that reaches the engine ends within a few dozen tokens) and ``http-bridge``
under uvicorn. Request bodies come from

- OpenAI's ``CreateChatCompletionRequest`` (``openai_schemas/openai_request_schemas.json``, the
  committed extraction of ``../shared/openai-openapi.yaml``): as generated, projected onto the
  spec's named fields (the spec allows any extra key, which alone is a 400 here), and that with
  plain messages;
- the bridge's own ``/openapi.json``: whole, and narrowed so most bodies reach the model server;
- raw bytes: valid bodies with JSON-hostile tokens spliced in, random bytes, odd headers.

Half of the schema-generated bodies name the served model (``""``), so they generate. Every
answer must pass :func:`test_bridge_boundary.assert_answered` on one keep-alive connection.
Hypothesis runs with a fixed seed, no example database and a fixed budget, so CI replays the
same examples every time.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hypothesis_jsonschema._from_schema as jsonschema_strategies
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema
from procs import Proc, start_bridge, start_model_server
from test_bridge_boundary import CHAT, HI, JSON, Wire, assert_answered
from test_bridge_openapi import _load_extractor

HERE = Path(__file__).resolve().parent
SCHEMAS_DIR = HERE / "openai_schemas"
REQUEST_SCHEMAS = SCHEMAS_DIR / "openai_request_schemas.json"
SPEC = HERE.parent.parent / "shared" / "openai-openapi.yaml"  # repo root's sibling "shared"

SEED = 20240607
FUZZ = settings(
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def _memoize_property_strategies() -> None:
    """hypothesis-jsonschema builds an object property's strategy anew (canonicalising and
    merging its schemas) every time it draws that property: over OpenAI's request schema that
    was ~95 % of this module's time (127 s for 100 bodies on a 2-core box). The strategy
    depends only on its arguments, so one per distinct schema list gives the same bodies in
    a fifth of the time. Its private name is checked: without it the fuzz runs, only slower."""
    build = getattr(jsonschema_strategies, "merged_as_strategies", None)
    if build is None or hasattr(build, "memo"):
        return
    memo: dict[tuple[str, str, str], st.SearchStrategy[Any]] = {}

    def memoized(schemas: list[Any], *, alphabet: Any, custom_formats: Any) -> Any:
        key = (json.dumps(schemas, sort_keys=True), repr(alphabet), repr(custom_formats))
        if key not in memo:
            memo[key] = build(schemas, alphabet=alphabet, custom_formats=custom_formats)
        return memo[key]

    memoized.memo = memo  # type: ignore[attr-defined]
    jsonschema_strategies.merged_as_strategies = memoized


_memoize_property_strategies()


# ---- processes -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path) -> Iterator[Proc]:
    with start_model_server(str(tiny_model_dir), "--max-model-len", "48") as proc:
        yield proc
        proc.stop(signal.SIGKILL)


@pytest.fixture(scope="module")
def bridge(server: Proc) -> Iterator[Proc]:
    with start_bridge("--backend", server.target, "--no-ui", "--log-level", "warning") as proc:
        yield proc


@pytest.fixture(scope="module")
def wire(bridge: Proc) -> Iterator[Wire]:
    w = Wire(bridge.port)
    yield w
    w.close()


def post(wire: Wire, body: bytes, headers: dict[str, str] = JSON) -> None:
    answer = wire.send("POST", CHAT, body, headers)
    assert_answered(answer, body[:300])


# ---- schemas -------------------------------------------------------------------------------


def test_committed_request_schema_matches_the_spec() -> None:
    """``openai_request_schemas.json`` is exactly what extract.py makes of ``../shared``'s YAML."""
    if not SPEC.is_file():
        pytest.skip(f"{SPEC} is absent (not part of this repo): cannot check the extraction")
    extractor = _load_extractor()
    fresh = extractor.render(extractor.extract(SPEC, extractor.REQUEST_ROOTS))
    assert fresh == REQUEST_SCHEMAS.read_text(encoding="utf-8"), (
        "tests/openai_schemas/openai_request_schemas.json is stale: run "
        ".venv/bin/python tests/openai_schemas/extract.py"
    )


def inlined(schemas: dict[str, Any], name: str) -> Any:
    """``schemas[name]`` with every ``#/components/schemas/`` reference replaced by its target.

    Self-contained on purpose: given two schemas whose ``$ref``s share names (the bridge's
    document and its narrowed copy), hypothesis-jsonschema resolved both to the first one's
    targets. Neither document has recursive references."""

    def walk(node: Any) -> Any:
        if isinstance(node, list):
            return [walk(item) for item in node]
        if not isinstance(node, dict):
            return node
        if "$ref" in node:
            rest = {k: v for k, v in node.items() if k != "$ref"}
            target = walk(schemas[node["$ref"].removeprefix("#/components/schemas/")])
            return {"allOf": [target, walk(rest)]} if rest else target
        return {k: v if k in ("enum", "const", "default") else walk(v) for k, v in node.items()}

    return walk(schemas[name])


def openai_bodies() -> st.SearchStrategy[dict[str, Any]]:
    """As generated; projected onto the spec's named fields; and that with plain messages, so the
    spec's values for the other fields reach the bridge's checks and the model server."""
    document = json.loads(REQUEST_SCHEMAS.read_text(encoding="utf-8"))
    schemas = document["components"]["schemas"]
    named = {
        key
        for part in (
            "CreateChatCompletionRequest",
            "CreateModelResponseProperties",
            "ModelResponseProperties",
        )
        for branch in [schemas[part], *schemas[part].get("allOf", [])]
        for key in branch.get("properties", {})
    }
    bodies = from_schema(inlined(schemas, "CreateChatCompletionRequest"))
    projected = bodies.map(lambda body: {k: v for k, v in body.items() if k in named})
    return st.one_of(bodies, projected, projected.map(lambda body: {**body, "messages": HI}))


def bridge_bodies(document: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """From the bridge's schema as published; and without the fields that take only neutral
    values (``{}``: any JSON) and with ``content`` a string or parts (null is for assistants
    only); and that ending with a user turn, as the chat format wants."""
    components = document["components"]["schemas"]
    implemented = {}
    for name, schema in components.items():
        properties = schema.get("properties", {})
        kept = {k: v for k, v in properties.items() if set(v) - {"title", "default"}}
        implemented[name] = {**schema, "properties": kept} if properties else schema
    message = implemented["ChatMessage"]
    content = message["properties"]["content"]
    implemented["ChatMessage"] = {
        **message,
        "properties": {
            **message["properties"],
            "content": {"anyOf": [s for s in content["anyOf"] if s != {"type": "null"}]},
        },
        "required": [*message["required"], "content"],
    }
    lean = from_schema(inlined(implemented, "ChatCompletionRequest"))
    return st.one_of(
        from_schema(inlined(components, "ChatCompletionRequest")),
        lean,
        lean.map(lambda body: {**body, "messages": [*body["messages"], *HI]}),
    )


def served(bodies: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    """``bodies``, and the same bodies addressed to the served model (``""``)."""
    return st.one_of(bodies, bodies.map(lambda body: {**body, "model": ""}))


def encode(body: Any) -> bytes:
    return json.dumps(body).encode()  # ensure_ascii keeps lone surrogates as JSON escapes


# ---- raw bytes -----------------------------------------------------------------------------

VALID = [
    encode({"model": "", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
    encode(
        {
            "model": "",
            "messages": [
                {"role": "system", "content": [{"type": "text", "text": "be brief"}]},
                {"role": "user", "content": "hi", "name": "ann"},
            ],
            "max_completion_tokens": 3,
            "stream": True,
            "stream_options": {"include_usage": True},
            "stop": ["\n", "."],
            "n": 2,
            "seed": -1,
            "temperature": 0.5,
            "top_k": 5,
        }
    ),
]
TOKENS = [
    b"\\ud800",
    b"\\udfff\\ud800",
    b"\\u0000",
    b"NaN",
    b"-Infinity",
    b"1e400",
    b"-0",
    b"4294967296",
    b"18446744073709551616",
    b"9" * 120,
    b"true",
    b"null",
    b"{",
    b"}",
    b"[",
    b"]",
    b"[" * 40,
    b'"',
    b",",
    b":",
    b'"model":"x",',
    b"\x00",
    b"\xff",
    b"\xed\xa0\x80",
    b"\xc0\xaf",
    b"\xef\xbb\xbf",
]
CONTENT_TYPES = [
    "application/json",
    "application/json; charset=utf-8",
    "application/json; charset=latin-1",
    "application/problem+json",
    "text/plain",
    "multipart/form-data; boundary=x",
    "",
]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid body with a few tokens spliced in, bytes flipped or cut out."""
    data = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.sampled_from([1, 1, 1, 2, 3]))):
        at = draw(st.integers(0, len(data)))
        action = draw(st.sampled_from(["insert", "replace", "delete", "flip"]))
        if action == "insert":
            data[at:at] = draw(st.sampled_from(TOKENS))
        elif action == "replace":
            data[at : at + draw(st.integers(1, 8))] = draw(st.sampled_from(TOKENS))
        elif action == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        elif at < len(data):
            data[at] ^= 1 << draw(st.integers(0, 7))
    return bytes(data)


@st.composite
def headers(draw: st.DrawFn) -> dict[str, str]:
    out = {"content-type": draw(st.sampled_from(CONTENT_TYPES))}
    encoding = draw(st.sampled_from([None, None, None, "gzip", "identity", "br"]))
    if encoding is not None:
        out["content-encoding"] = encoding
    return out


raw_bodies = st.one_of(mutated(), mutated(), st.binary(max_size=512))  # mutations 2 to 1


# ---- the properties ------------------------------------------------------------------------


@settings(FUZZ, max_examples=100)
@seed(SEED)
@given(body=served(st.deferred(openai_bodies)))
def test_openai_schema_bodies(wire: Wire, body: dict[str, Any]) -> None:
    post(wire, encode(body))


@pytest.fixture(scope="module")
def own_schema(wire: Wire) -> dict[str, Any]:
    answer = wire.send("GET", "/openapi.json")
    assert answer.status == 200
    return json.loads(answer.body)


def test_bridge_schema_bodies(wire: Wire, own_schema: dict[str, Any]) -> None:
    @settings(FUZZ, max_examples=150)
    @seed(SEED)
    @given(body=served(bridge_bodies(own_schema)))
    def check(body: dict[str, Any]) -> None:
        post(wire, encode(body))

    check()


@settings(FUZZ, max_examples=300)
@seed(SEED)
@given(body=raw_bodies, extra=st.one_of(st.just(JSON), st.just(JSON), headers()))
def test_raw_bytes(wire: Wire, body: bytes, extra: dict[str, str]) -> None:
    post(wire, body, extra)


def test_both_processes_still_serve(wire: Wire, server: Proc, bridge: Proc) -> None:
    post(wire, VALID[1])
    assert wire.send("GET", "/health").status == 200
    assert server.proc.poll() is None and bridge.proc.poll() is None
    assert "Traceback" not in bridge.log_text()
    assert "Traceback" not in server.log_text()
