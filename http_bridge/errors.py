"""Every error the bridge returns is built here: the OpenAI envelope and THE gRPC→HTTP table.

Routes raise :class:`APIError`; the app's exception handlers (validation errors, unknown routes,
oversize bodies, unexpected exceptions) and the SSE error chunk all end in :func:`error_body`,
so clients see one shape: ``{"error": {"message", "type", "param", "code"}}``.

No internals reach clients: a failure that is the client's doing (bad field, unknown model, queue
full) keeps its helpful message; a server-side one gets a generic message with the request id,
and its details (status, backend details, target) go to the log under that id.
"""

from __future__ import annotations

import logging
import re
import types
import typing
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import grpc
from fastapi.responses import JSONResponse
from pydantic import BaseModel

log = logging.getLogger("http_bridge.errors")


class GrpcMapping(NamedTuple):
    """How one gRPC status looks to an HTTP client."""

    http_status: int
    type: str
    code: str | None


# THE table (docs/bridge.md and the README repeat it; keep them in sync).
GRPC_TO_HTTP: dict[grpc.StatusCode, GrpcMapping] = {
    grpc.StatusCode.INVALID_ARGUMENT: GrpcMapping(400, "invalid_request_error", "invalid_value"),
    grpc.StatusCode.NOT_FOUND: GrpcMapping(404, "invalid_request_error", "model_not_found"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: GrpcMapping(429, "rate_limit_error", "rate_limit_exceeded"),
    grpc.StatusCode.UNAVAILABLE: GrpcMapping(503, "server_error", "backend_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: GrpcMapping(504, "timeout_error", "timeout"),
    grpc.StatusCode.INTERNAL: GrpcMapping(500, "server_error", "internal_error"),
    # The backend refused the bridge's own credentials (--backend-token-file, mTLS): our
    # misconfiguration, not the client's, and no model server is usable until it is fixed.
    grpc.StatusCode.UNAUTHENTICATED: GrpcMapping(503, "server_error", "backend_unavailable"),
    grpc.StatusCode.PERMISSION_DENIED: GrpcMapping(503, "server_error", "backend_unavailable"),
}
# Any status not in the table (UNKNOWN, UNIMPLEMENTED, ...) is the bridge's or backend's fault.
GRPC_FALLBACK = GrpcMapping(500, "server_error", "internal_error")

# Statuses that mean "nothing was generated": the queue was full or no backend took the call.
# A client may retry these; anything else may have run the generation already.
_RETRY_SAFE = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE})

# Request fields a backend INVALID_ARGUMENT message may start with ("max_tokens: ...").
_KNOWN_PARAMS = frozenset(
    {
        "model",
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "top_k",
        "stop",
        "seed",
        "repetition_penalty",
        "presence_penalty",
        "frequency_penalty",
        "min_tokens",
        "ignore_eos",
        "n",
    }
)
# The model server's words for a request that does not fit (model_server/validation.py: the
# prompt alone, or prompt + max_tokens, past the context; engine.py: past the KV-cache pool that
# one request may use). Searched for separately, so a rewording loses a number, not the code.
_OVERFLOW = re.compile(
    r"\bexceeds the (?:model's context|KV-cache pool)\b|\bbut the model's context is\b"
)
_CONTEXT_LEN = re.compile(
    r"model's context (?:is|of) (\d+) tokens|KV-cache pool, which holds (\d+)"
)
_PROMPT_LEN = re.compile(r"\bprompt(?: is|'s| \() ?(\d+) tokens")
_COMPLETION_LEN = re.compile(r"^max_tokens: (\d+) \+|\bmax_tokens \((\d+)\)")
_PARAM_PREFIX = re.compile(r"^\s*([a-z_]+)((?:\[\d+\])*(?:\.[a-z_]+(?:\[\d+\])*)*)\s*:")
# A caller's x-request-id travels as gRPC metadata (where anything but printable ASCII fails
# the call) and comes back as a response header and in log lines: only plain ids are kept.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,100}")


def _encodable(text: str) -> str:
    """``text`` with any lone surrogate spelled as ``\\udxxx``: the envelope must encode as UTF-8
    even when it quotes a client's malformed key or value."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_body(
    message: str,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    """The OpenAI error envelope (``Error`` in the spec), the only error shape we emit."""
    if param is not None:
        param = _encodable(param)
    return {"error": {"message": _encodable(message), "type": type, "param": param, "code": code}}


class APIError(Exception):
    """An error with its HTTP status, raised anywhere and rendered by one handler.

    ``retry_safe``: True when no generation can have run (the SDK may retry), False when a retry
    could run it a second time (we send ``x-should-retry: false``), None to leave it to the
    client's defaults (4xx the SDK does not retry anyway).
    """

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        retry_safe: bool | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.retry_safe = retry_safe
        self.extra_headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def headers(self) -> dict[str, str]:
        headers = dict(self.extra_headers)
        if self.retry_safe is not None:
            headers["x-should-retry"] = "true" if self.retry_safe else "false"
        return headers

    def to_response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status_code, headers=self.headers())


def param_from_grpc_message(message: str) -> str | None:
    """The request field a backend INVALID_ARGUMENT names, if it leads with ``field:``."""
    match = _PARAM_PREFIX.match(message)
    if match and match.group(1) in _KNOWN_PARAMS:
        return match.group(1) + match.group(2)
    return None


def _number(pattern: re.Pattern[str], text: str) -> int | None:
    match = pattern.search(text)
    return int(next(g for g in match.groups() if g is not None)) if match else None


def context_overflow(details: str, prompt_param: str = "messages") -> APIError | None:
    """A model-server INVALID_ARGUMENT about a request too long for the context, in OpenAI's
    shape (code ``context_length_exceeded``, OpenAI's wording, which vLLM copies and LangChain,
    LiteLLM and agents look for); None for any other message.

    ``param`` is the field that went past the context: ``max_tokens`` when the prompt fits on
    its own (the chat route renames it ``max_completion_tokens`` when that is what the client
    sent), else the prompt's (``messages``; ``prompt`` on completions). Only numbers the server
    gave are used: without them its own text follows OpenAI's first sentence."""
    if not _OVERFLOW.search(details):
        return None
    what = "messages" if prompt_param == "messages" else "prompt"
    context = _number(_CONTEXT_LEN, details)
    prompt = _number(_PROMPT_LEN, details)
    completion = _number(_COMPLETION_LEN, details)
    if context is None:
        message = f"This model's maximum context length is exceeded: {details}"
    elif prompt is not None and completion is not None:
        message = (
            f"This model's maximum context length is {context} tokens. However, you requested "
            f"{prompt + completion} tokens ({prompt} in the {what}, {completion} in the "
            f"completion). Please reduce the length of the {what} or completion."
        )
    elif prompt is not None:
        message = (
            f"This model's maximum context length is {context} tokens. However, your {what} "
            f"resulted in {prompt} tokens. Please reduce the length of the {what}."
        )
    else:
        message = f"This model's maximum context length is {context} tokens. {details}"
    if "KV-cache pool" in details and context is not None:
        message += f" (The model server's KV-cache pool holds {context} tokens for one request.)"
    param = "max_tokens" if completion is not None else prompt_param
    return APIError(400, message, param=param, code="context_length_exceeded")


def request_id_for(headers: Mapping[str, str], fallback: str = "") -> str:
    """The caller's ``x-request-id`` when it is plain, else ``fallback`` (our own id; a new
    ``req-…`` one when empty). Every route that forwards it to a backend, and echoes it, uses
    this: any other header value stays out of gRPC metadata, headers and logs."""
    incoming = headers.get("x-request-id", "")
    if _REQUEST_ID.fullmatch(incoming):
        return incoming
    return fallback or f"req-{uuid.uuid4().hex}"


def see_logs(what: str, request_id: str) -> str:
    """The generic client message of a server-side failure: what failed and where to look."""
    rid = f" (request id {request_id})" if request_id else ""
    return f"{what}{rid}; see the server logs."


def internal_error(request_id: str = "") -> APIError:
    """The bridge's own failure (a bug): a generic message naming the request id, which the
    answer also carries as ``x-request-id``, and no retry (it may have run a generation)."""
    return APIError(
        500,
        see_logs("Internal error in the HTTP bridge", request_id),
        type="server_error",
        code="internal_error",
        retry_safe=False,
        headers={"x-request-id": request_id} if request_id else None,
    )


def from_grpc(
    err: grpc.RpcError,
    *,
    generation_started: bool,
    request_id: str = "",
    target: str = "",
    prompt_param: str = "messages",
) -> APIError:
    """Map a failed RPC through THE table (a context overflow: :func:`context_overflow`, whose
    ``param`` is ``prompt_param``).

    ``generation_started``: the backend already sent a response for this request, so a retry
    could generate twice even if the status alone (UNAVAILABLE) would say otherwise. Server-side
    statuses are logged with ``request_id`` and ``target`` and answered without their details.
    """
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = (err.details() if hasattr(err, "details") else None) or ""
    mapping = GRPC_TO_HTTP.get(code, GRPC_FALLBACK)
    param = None
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        overflow = context_overflow(details, prompt_param)
        if overflow is not None:
            return overflow
        param = param_from_grpc_message(details)
        message = details or "invalid request"
    elif code == grpc.StatusCode.NOT_FOUND:
        param = "model"
        message = details or "model not found"
    elif code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        message = f"The server is at capacity; retry later. ({details})"
    elif code == grpc.StatusCode.UNAVAILABLE:
        message = see_logs("No model server is available right now; retry later", request_id)
    elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
        message = see_logs("The request took longer than the bridge's timeout", request_id)
    elif mapping.code == "backend_unavailable":
        message = see_logs("The bridge is not allowed to use the model server", request_id)
    else:
        message = see_logs("The model server failed to process the request", request_id)
    retry_safe: bool | None
    if mapping.http_status < 500 and mapping.http_status != 429:
        retry_safe = None
    else:
        retry_safe = code in _RETRY_SAFE and not generation_started
    if mapping.http_status >= 500:
        log.warning(
            "backend call failed: request_id=%s status=%s target=%s details=%r",
            request_id or "-",
            code.name,
            target or "-",
            details,
        )
    return APIError(
        mapping.http_status,
        message,
        type=mapping.type,
        param=param,
        code=mapping.code,
        retry_safe=retry_safe,
    )


def loc_to_param(loc: Sequence[str | int]) -> str | None:
    """Pydantic location ``("body", "messages", 0, "content")`` → ``messages[0].content``."""
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or None


def _unwrap(tp: Any) -> Any:
    """``Annotated[X, ...]`` → X; ``X | None`` → X (pydantic labels neither)."""
    while typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(members) == 1:
            return _unwrap(members[0])
    return tp


def _member(tp: Any, part: str | int) -> Any:
    """The type at ``part`` inside ``tp`` (a model's field, a list's item), None if unknown."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is None and isinstance(tp, type) and issubclass(tp, BaseModel):
        for name, field in tp.model_fields.items():
            if part in (name, field.alias):
                return field.annotation
    elif origin is list and isinstance(part, int) and args:
        return args[0]
    elif origin is dict and isinstance(part, str) and len(args) == 2:
        return args[1]
    return None


def field_path(model: type[BaseModel], loc: Sequence[str | int]) -> list[str | int]:
    """A pydantic location inside ``model`` without its union-branch labels: ``user: 5`` fails
    at ``("user", "str")`` and ``("user", "dict[str,any]")``, but the client sent ``user``.

    Labels and keys are told apart by walking ``model``'s types along ``loc`` (a label comes
    right after a union; a model branch's label is its class name, and the walk goes on in it);
    where the type is lost (inside ``Any``), the rest is kept as it is."""
    tp: Any = model
    path: list[str | int] = []
    for part in loc:
        tp = _unwrap(tp)
        if typing.get_origin(tp) in (typing.Union, types.UnionType) and isinstance(part, str):
            members = [_unwrap(a) for a in typing.get_args(tp)]
            tp = next((m for m in members if getattr(m, "__name__", None) == part), None)
            continue
        path.append(part)
        tp = _member(tp, part)
    return path


def validation_error(
    errors: Sequence[dict[str, Any]], model: type[BaseModel] | None = None
) -> APIError:
    """FastAPI/pydantic validation errors → one 400 naming the first bad field. With the body's
    ``model``, ``param`` is the field's path as the client wrote it (:func:`field_path`)."""
    if not errors:
        return APIError(400, "Invalid request body.")
    first = errors[0]
    kind = first.get("type", "")
    loc = tuple(first.get("loc", ()))
    if model is not None and loc[:1] == ("body",):
        loc = ("body", *field_path(model, loc[1:]))
    if kind == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return APIError(400, f"The request body is not valid JSON: {detail}", code="invalid_json")
    if loc in (("body",), ()) and kind == "missing":
        return APIError(400, "The request body is required (a JSON object).", code="missing_body")
    param = loc_to_param(loc)
    if kind == "extra_forbidden":
        return APIError(
            400,
            f"Unrecognized request argument supplied: {param}",
            param=param,
            code="unknown_parameter",
        )
    if kind == "unsupported_parameter":
        return APIError(400, str(first.get("msg")), param=param, code="unsupported_parameter")
    if kind == "missing":
        return APIError(
            400, f"Missing required parameter: '{param}'.", param=param, code="missing_required"
        )
    msg = str(first.get("msg", "invalid value"))
    if loc in (("body",), ()):
        return APIError(400, f"Invalid request body: {msg}", code="invalid_value")
    return APIError(400, f"Invalid value for '{param}': {msg}", param=param, code="invalid_value")


# Statuses the HTTP layer itself produces (unknown route, wrong method, oversize body...).
HTTP_ERROR_TYPES: dict[int, tuple[str, str | None]] = {
    401: ("invalid_request_error", "invalid_api_key"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "request_too_large"),
}


def http_error(status_code: int, message: str) -> APIError:
    """An error for a plain HTTP status (used by the Starlette HTTPException handler)."""
    type_, code = HTTP_ERROR_TYPES.get(
        status_code, ("server_error" if status_code >= 500 else "invalid_request_error", None)
    )
    return APIError(status_code, message, type=type_, code=code)
