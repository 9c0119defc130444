"""Bridge building blocks without any server: THE status table, targets, flags, imports."""

from __future__ import annotations

import json
import subprocess
import sys
import types
import typing
from pathlib import Path

import grpc
import pytest
from pydantic import ValidationError

from glmserve.v1 import chat_pb2
from http_bridge.backend import channel_options, service_config
from http_bridge.cli import parse_settings
from http_bridge.errors import (
    GRPC_TO_HTTP,
    field_path,
    from_grpc,
    loc_to_param,
    param_from_grpc_message,
)
from http_bridge.protocol import MAX_STOP, MAX_STOP_BYTES, ChatCompletionRequest
from http_bridge.protocol_completions import CompletionRequest
from http_bridge.routes.chat import grpc_requests
from http_bridge.settings import Settings
from http_bridge.targets import Address, parse_target

ROOT = Path(__file__).resolve().parents[1]


class FakeRpcError(grpc.RpcError):
    """Just the two accessors from_grpc reads (a real AioRpcError needs a live call)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def test_bridge_imports_no_torch_or_transformers() -> None:
    code = (
        "import sys, http_bridge.app, http_bridge.cli;"
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_status_table_is_the_issue_table() -> None:
    assert {code.name: m.http_status for code, m in GRPC_TO_HTTP.items()} == {
        "INVALID_ARGUMENT": 400,
        "NOT_FOUND": 404,
        "RESOURCE_EXHAUSTED": 429,
        "UNAVAILABLE": 503,
        "DEADLINE_EXCEEDED": 504,
        "INTERNAL": 500,
        # The backend refused the bridge's own credentials: our misconfiguration, not a 4xx.
        "UNAUTHENTICATED": 503,
        "PERMISSION_DENIED": 503,
    }


@pytest.mark.parametrize(
    ("code", "started", "status", "retry_header"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, False, 400, None),
        (grpc.StatusCode.NOT_FOUND, False, 404, None),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, False, 429, "true"),
        (grpc.StatusCode.UNAVAILABLE, False, 503, "true"),
        # Tokens were already produced: a retry would generate a second time.
        (grpc.StatusCode.UNAVAILABLE, True, 503, "false"),
        (grpc.StatusCode.DEADLINE_EXCEEDED, False, 504, "false"),
        (grpc.StatusCode.INTERNAL, False, 500, "false"),
        (grpc.StatusCode.UNKNOWN, False, 500, "false"),
        (grpc.StatusCode.UNAUTHENTICATED, False, 503, "false"),
    ],
)
def test_from_grpc(code: grpc.StatusCode, started: bool, status: int, retry_header: str) -> None:
    err = from_grpc(FakeRpcError(code, "boom"), generation_started=started)
    assert err.status_code == status
    assert err.headers().get("x-should-retry") == retry_header
    assert set(err.body()["error"]) == {"message", "type", "param", "code"}


def test_invalid_argument_names_the_param() -> None:
    err = from_grpc(
        FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, "max_tokens: 9999 + the prompt ..."),
        generation_started=False,
    )
    assert err.param == "max_tokens"
    assert param_from_grpc_message("messages[2].role: must be ...") == "messages[2].role"
    assert param_from_grpc_message("stop[0]: must be 1 to 256 bytes") == "stop[0]"
    assert param_from_grpc_message("something else: no") is None
    nf = from_grpc(FakeRpcError(grpc.StatusCode.NOT_FOUND, "nope"), generation_started=False)
    assert (nf.code, nf.param) == ("model_not_found", "model")


def test_loc_to_param() -> None:
    assert loc_to_param(("body", "messages", 0, "content")) == "messages[0].content"
    assert loc_to_param(("body", "n")) == "n"
    assert loc_to_param(("body",)) is None


def test_field_path_drops_union_labels() -> None:
    """pydantic labels each union branch in an error's location; the client wrote the field."""
    assert field_path(ChatCompletionRequest, ("user", "str")) == ["user"]
    assert field_path(CompletionRequest, ("user", "dict[str,any]")) == ["user"]
    named = ("tool_choice", "NamedToolChoice", "function", "name")
    assert field_path(ChatCompletionRequest, named) == ["tool_choice", "function", "name"]
    # Keys the client wrote stay, even one spelled like a label; so do aliases.
    assert field_path(ChatCompletionRequest, ("messages", 0, "str")) == ["messages", 0, "str"]
    fmt = ("response_format", "json_schema", "schema")
    assert field_path(ChatCompletionRequest, fmt) == list(fmt)


@pytest.mark.parametrize("model", [ChatCompletionRequest, CompletionRequest])
def test_every_union_field_fails_under_its_own_name(model: type) -> None:
    """A value no branch takes, for each union field there is (new ones included)."""
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "prompt": "x"}
    unions = [
        name
        for name, f in model.model_fields.items()
        if typing.get_origin(f.annotation) in (typing.Union, types.UnionType)
        and len([a for a in typing.get_args(f.annotation) if a is not type(None)]) > 1
    ]
    assert "user" in unions
    for name in unions:
        with pytest.raises(ValidationError) as info:
            model.model_validate({**body, name: 0.5})
        for error in info.value.errors():
            assert field_path(model, error["loc"]) == [name], error


def test_stop_limits_are_the_model_servers() -> None:
    """Imported here, not in the bridge (which imports nothing of the model server)."""
    from model_server.validation import MAX_STOP_BYTES as SERVER_STOP_BYTES
    from model_server.validation import MAX_STOP_STRINGS

    assert (MAX_STOP, MAX_STOP_BYTES) == (MAX_STOP_STRINGS, SERVER_STOP_BYTES)


def test_parse_target() -> None:
    fixed = parse_target("10.0.0.1:50051")
    assert fixed.fixed == (Address("ipv4:10.0.0.1:50051"),) and not fixed.resolved
    assert parse_target("[::1]:2").fixed == (Address("ipv6:[::1]:2"),)
    assert parse_target("localhost:2").fixed == (Address("ipv4:127.0.0.1:2", "localhost"),)
    both = parse_target("ipv4:127.0.0.1:1,127.0.0.2:2").fixed
    assert both == (Address("ipv4:127.0.0.1:1"), Address("ipv4:127.0.0.2:2"))
    assert parse_target("unix:/run/ms.sock").fixed == (Address("unix:/run/ms.sock"),)
    for text in ("ms:50051", "dns:///ms:50051"):
        s = parse_target(text)
        assert (s.resolved, s.host, s.port, s.dns_server) == (True, "ms", 50051, None)
    named = parse_target("dns://10.0.0.10:5353/ms.ns.svc:50051")
    assert (named.host, named.dns_server) == ("ms.ns.svc", ("10.0.0.10", 5353))
    assert parse_target("dns://[::1]/ms:1").dns_server == ("::1", 53)
    for bad in ("ms", "ms:http", "ms:0", "dns://ns.example/ms:1", "ipv4:ms:1", "dns://1.2.3.4"):
        with pytest.raises(ValueError, match="backend"):
            parse_target(bad)


def test_service_config_health_checks_without_grpc_retries() -> None:
    settings = Settings(backends=("127.0.0.1:1", "127.0.0.1:2"))
    config = service_config(settings)
    assert config["healthCheckConfig"] == {"serviceName": ""}
    assert "methodConfig" not in config  # RoutedCall moves calls, across backends
    assert ("grpc.enable_retries", 0) in channel_options(settings)
    json.dumps(config)  # grpc takes it as JSON


def test_flags_and_env_fallbacks() -> None:
    env = {
        "GLMSERVE_BACKEND": "127.0.0.1:1,127.0.0.1:2",
        "GLMSERVE_API_KEYS": "k1, k2",
        "GLMSERVE_CORS_ORIGINS": "http://a.test",
        "GLMSERVE_BRIDGE_PORT": "9001",
        "GLMSERVE_PORT": "50099",  # the model server's: not ours
        "GLMSERVE_REQUEST_TIMEOUT": "12.5",
        "GLMSERVE_MAX_REQUEST_BYTES": "1234",
        "GLMSERVE_NO_UI": "1",
    }
    s = parse_settings([], env)
    assert s.backends == ("127.0.0.1:1", "127.0.0.1:2")
    assert s.api_keys == ("k1", "k2")
    assert s.cors_origins == ("http://a.test",)
    assert (s.port, s.request_timeout, s.max_request_bytes, s.ui) == (9001, 12.5, 1234, False)
    # Flags win over the environment; repeatable flags accumulate.
    s = parse_settings(
        ["--backend", "127.0.0.1:7", "--backend", "127.0.0.1:8", "--api-key", "x", "--port", "1"],
        env,
    )
    assert s.backends == ("127.0.0.1:7", "127.0.0.1:8")
    assert (s.api_keys, s.port) == (("x",), 1)
    d = parse_settings([], {})
    assert (d.backends, d.host, d.port, d.api_keys, d.cors_origins, d.ui) == (
        ("127.0.0.1:50051",),
        "127.0.0.1",
        8000,
        (),
        (),
        True,
    )


def test_request_mapping() -> None:
    body = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "user", "name": "ann", "content": [{"type": "text", "text": "hi"}]},
            ],
            "max_completion_tokens": 5,
            "temperature": 0,
            "top_p": 0.5,
            "n": 2,
            "stop": "END",
            "seed": -1,
            "top_k": -1,
            "min_tokens": 1,
            "ignore_eos": True,
            "repetition_penalty": 1.1,
            "presence_penalty": 0.5,
            "user": "someone",
        }
    )
    first, second = grpc_requests(body, "rid")
    assert [m.role for m in first.messages] == [chat_pb2.ROLE_SYSTEM, chat_pb2.ROLE_USER]
    assert first.messages[1].content == "hi"
    assert (first.max_tokens, first.temperature, list(first.stop)) == (5, 0.0, ["END"])
    assert not first.HasField("top_k")  # vLLM's -1 = no limit = unset
    assert (first.seed, second.seed) == (2**64 - 1, 0)  # per-choice seeds, uint64 wrap
    assert (first.request_id, second.request_id) == ("rid-0", "rid-1")
    assert first.ignore_eos and first.min_tokens == 1
