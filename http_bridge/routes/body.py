"""Strict JSON request bodies: what the bytes may be before pydantic sees a single field.

Python's ``json`` is lenient where a public API must not be: it accepts ``NaN``/``Infinity``,
keeps the last of duplicate keys (another parser in front of us may keep the first, and check
a different value), decodes ``"\\ud800"`` into a lone surrogate that protobuf cannot encode (a 500
at the gRPC call), guesses UTF-16/32 from the bytes, and recurses until ``RecursionError``. The
chat and completions routes use :class:`JSONBodyRoute`, which reads the body and refuses all of
that with a 4xx in the OpenAI envelope (``param`` names the place), then lets FastAPI validate
the parsed value.

Policies: the body must be ``Content-Type: application/json`` (or ``+json``; a ``charset``, if
any, ``utf-8``) without a ``Content-Encoding``, else 415; UTF-8 only; duplicate keys, lone
surrogates and nesting deeper than :data:`MAX_DEPTH` are 400s. NUL (``\\u0000``) is ordinary
text: the model server takes it (a test sends it end to end).
"""

from __future__ import annotations

import email.message
import json
import re
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from starlette.datastructures import Headers

from http_bridge.errors import APIError, loc_to_param

# The deepest request glmserve accepts is 5 levels (body → messages → message → content →
# part); 32 leaves room for the neutral values of unimplemented fields.
MAX_DEPTH = 32
# No field takes more than 20 digits (uint64); Python would refuse past 4300 with a ValueError.
MAX_INT_DIGITS = 100
_SURROGATE = re.compile("[\ud800-\udfff]")


class JSONBodyRoute(APIRoute):
    """An APIRoute whose JSON body is parsed by :func:`parse_json_body`, not ``json.loads``."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict_handler(request: Request) -> Response:
            raw = await request.body()  # within the router's max_body_size (else 413)
            if not raw:
                return await handler(request)  # FastAPI's "body required" 400
            check_content_headers(request.headers)
            return await handler(_ParsedRequest(request, raw, parse_json_body(raw)))

        return strict_handler


class _ParsedRequest(Request):
    """The same request, with the body FastAPI will read already parsed (strictly)."""

    def __init__(self, request: Request, raw: bytes, parsed: Any) -> None:
        super().__init__(request.scope, request.receive)
        self._raw = raw
        self._parsed = parsed

    async def body(self) -> bytes:
        return self._raw

    async def json(self) -> Any:
        return self._parsed


def check_content_headers(headers: Headers) -> None:
    """415 unless the body is declared as plain (unencoded) UTF-8 JSON."""
    encoding = headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise APIError(
            415,
            f"Content-Encoding {encoding!r} is not supported: send the body uncompressed.",
            code="unsupported_content_encoding",
        )
    declared = headers.get("content-type")
    message = email.message.Message()
    message["content-type"] = declared or ""
    subtype = message.get_content_subtype()
    charset = message.get_param("charset")
    is_json = message.get_content_maintype() == "application" and (
        subtype == "json" or subtype.endswith("+json")
    )
    if not declared or not is_json:
        raise APIError(
            415,
            f"Content-Type must be application/json (got {declared!r}).",
            code="unsupported_media_type",
        )
    if charset is not None and str(charset).lower() not in ("utf-8", "utf8"):
        raise APIError(
            415,
            f"JSON bodies must be UTF-8 (got charset={charset!r}).",
            code="unsupported_media_type",
        )


class _DuplicateKeys(dict):
    """A JSON object that repeated a key; :func:`_check` reports it with its path."""

    def __init__(self, pairs: list[tuple[str, Any]], duplicate: str) -> None:
        super().__init__(pairs)
        self.duplicate = duplicate


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook``: a plain dict, or a marked one when a key came twice."""
    obj = dict(pairs)
    if len(obj) == len(pairs):
        return obj
    counts = Counter(key for key, _ in pairs)
    return _DuplicateKeys(pairs, next(key for key, n in counts.items() if n > 1))


def _constant(name: str) -> Any:
    raise APIError(400, f"{name} is not valid JSON: numbers must be finite.", code="invalid_json")


def _int(literal: str) -> int:
    if len(literal.lstrip("-")) > MAX_INT_DIGITS:
        raise APIError(
            400,
            f"An integer in the request body has more than {MAX_INT_DIGITS} digits.",
            code="invalid_value",
        )
    return int(literal)


def parse_json_body(raw: bytes) -> Any:
    """UTF-8 JSON → Python, or a 400 that says what is wrong and where."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise APIError(
            400,
            f"The request body is not valid UTF-8 (byte {err.start}): {err.reason}.",
            code="invalid_encoding",
        ) from err
    try:
        value = json.loads(
            text, object_pairs_hook=_object, parse_constant=_constant, parse_int=_int
        )
    except RecursionError as err:
        raise _too_deep(None) from err
    except json.JSONDecodeError as err:
        raise APIError(
            400, f"The request body is not valid JSON: {err}", code="invalid_json"
        ) from err
    _check(value)
    return value


def _too_deep(param: str | None) -> APIError:
    return APIError(
        400,
        f"The request body is nested deeper than {MAX_DEPTH} levels.",
        param=param,
        code="invalid_json",
    )


def _check(value: Any) -> None:
    """Walk the parsed body (no recursion): depth, duplicate keys, lone surrogates."""
    todo: list[tuple[Any, tuple[str | int, ...]]] = [(value, ())]
    while todo:
        node, loc = todo.pop()
        if isinstance(node, str):
            _check_text(node, loc)
        elif isinstance(node, (dict, list)):
            if len(loc) >= MAX_DEPTH:
                raise _too_deep(loc_to_param(loc))
            if isinstance(node, _DuplicateKeys):
                param = loc_to_param((*loc, node.duplicate))
                raise APIError(
                    400,
                    f"Duplicate key {node.duplicate!r} in a JSON object: send each key once.",
                    param=param,
                    code="duplicate_key",
                )
            if isinstance(node, dict):
                for key, item in node.items():
                    _check_text(key, (*loc, key))
                    todo.append((item, (*loc, key)))
            else:
                todo.extend((item, (*loc, i)) for i, item in enumerate(node))


def _check_text(text: str, loc: tuple[str | int, ...]) -> None:
    if _SURROGATE.search(text):
        raise APIError(
            400,
            "A string contains a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape): "
            "it is not Unicode text.",
            param=loc_to_param(loc),
            code="invalid_encoding",
        )
