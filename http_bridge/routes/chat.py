"""POST /v1/chat/completions: OpenAI request → n parallel Chat RPCs → JSON or SSE.

Errors that happen before the first token (bad field, unknown model, queue full, no backend,
deadline) are real HTTP statuses: for a stream the route waits for every choice's first message
before it sends the 200 headers. After that, a failure becomes an SSE error chunk followed by
``data: [DONE]``. The client going away cancels the RPCs (and so the generation on the server).

Streams under stress: each choice reads at most :data:`STREAM_BUFFER` messages ahead of the
client, so a slow reader stops the reads and grpc's HTTP/2 flow control holds the model server
back; a client that reads nothing for ``--stream-write-timeout`` is cut, a backend that sends
nothing for ``--backend-idle-timeout`` is abandoned, and the drain deadline ends streams in-band.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from fastapi.sse import EventSourceResponse, format_sse_event
from starlette.types import Message, Receive, Scope, Send

from glmserve.v1 import chat_pb2
from http_bridge.backend import Backend
from http_bridge.drain import Drain
from http_bridge.errors import (
    APIError,
    error_body,
    from_grpc,
    internal_error,
    request_id_for,
)
from http_bridge.limits import Lease, lease_of
from http_bridge.metrics import START_KEY, BridgeMetrics
from http_bridge.protocol import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatMessage,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    Delta,
    ErrorResponse,
    FunctionCall,
    FunctionDelta,
    Guided,
    ResponseMessage,
    TokenLogprob,
    ToolCall,
    ToolCallDelta,
    TopLogprob,
    Usage,
)
from http_bridge.routes.body import JSONBodyRoute

log = logging.getLogger("http_bridge.chat")
router = APIRouter(tags=["chat"], route_class=JSONBodyRoute)

T = TypeVar("T")

_ROLES = {
    "system": chat_pb2.ROLE_SYSTEM,
    "developer": chat_pb2.ROLE_SYSTEM,
    "user": chat_pb2.ROLE_USER,
    "assistant": chat_pb2.ROLE_ASSISTANT,
    "tool": chat_pb2.ROLE_TOOL,
}
_FINISH = {
    chat_pb2.FINISH_REASON_STOP: "stop",
    chat_pb2.FINISH_REASON_LENGTH: "length",
    chat_pb2.FINISH_REASON_TOOL_CALLS: "tool_calls",
}
_TOOL_CHOICE = {
    "none": chat_pb2.TOOL_CHOICE_MODE_NONE,
    "auto": chat_pb2.TOOL_CHOICE_MODE_AUTO,
    "required": chat_pb2.TOOL_CHOICE_MODE_REQUIRED,
}
IGNORED_HEADER = "x-glmserve-ignored-params"
_DONE = format_sse_event(data_str="[DONE]")
# Below this a temperature (or top_p) is greedy decoding in all but name, and dividing logits by
# it can overflow float32; it is sent as temperature 0, as vLLM does (its _SAMPLING_EPS).
SAMPLING_EPS = 1e-5
# The model server's gRPC receive limit (grpc's default): a larger ChatRequest never arrives, and
# grpc would report it as RESOURCE_EXHAUSTED, which reads as a retryable 429.
MAX_GRPC_REQUEST_BYTES = 4 * 1024 * 1024
# A log-probability of -inf as JSON can hold it (vLLM's floor).
MIN_LOGPROB = -9999.0
# Messages per choice read from the backend ahead of the client (one: the next one is read
# while the last is written): the bound of the bridge's buffering per stream, so that a stalled
# client stalls the reads at once.
STREAM_BUFFER = 1

_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in {
        400: "A field is invalid or not implemented (param names it)",
        401: "Missing or wrong API key",
        404: "Unknown model",
        413: "Body larger than --max-request-bytes",
        415: "Body not declared as uncompressed UTF-8 JSON (Content-Type, Content-Encoding)",
        429: "The model server's queue is full, or a per-key limit was reached",
        503: "No model server is available",
        504: "--request-timeout passed",
    }.items()
}


_HEADER_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
MAX_IGNORED_LISTED = 32


# The model server names proto fields; these are the OpenAI fields they came from.
_FEATURE_PARAMS = (
    (re.compile(r"^structured_output\b"), "response_format"),
    (re.compile(r"^tools\[(\d+)\]\.parameters\b"), r"tools[\1].function.parameters"),
    (re.compile(r"^tools\b"), "tools"),
    (re.compile(r"^tool_choice(_function)?\b"), "tool_choice"),
    (re.compile(r"^logprobs\b"), "top_logprobs"),
    (re.compile(r"^min_p\b"), "min_p"),
    (re.compile(r"^prompt(_token_ids)?\b"), "prompt"),
)


def feature_param(details: str) -> str | None:
    """The OpenAI param for a model-server INVALID_ARGUMENT about a feature's proto field."""
    for pattern, param in _FEATURE_PARAMS:
        match = pattern.match(details)
        if match:
            return match.expand(param)
    return None


def code_is_invalid(err: grpc.aio.AioRpcError) -> bool:
    return err.code() == grpc.StatusCode.INVALID_ARGUMENT


def ignored_header(ignored: list[str], request_id: str) -> dict[str, str]:
    """The extra-field policy's answer: ignored fields are logged and named in a header.

    Field names are client text: only plain names (``[A-Za-z0-9_.-]``, at most 64) go into
    the header, at most :data:`MAX_IGNORED_LISTED` of them; the rest are counted."""
    if not ignored:
        return {}
    log.info(
        "request %s: ignored parameters: %s",
        request_id,
        ", ".join(repr(name[:64]) for name in ignored[:MAX_IGNORED_LISTED]),
    )
    plain = [name for name in ignored if _HEADER_NAME.match(name)][:MAX_IGNORED_LISTED]
    others = len(ignored) - len(plain)
    return {IGNORED_HEADER: ", ".join([*plain, *([f"+{others} more"] if others else [])])}


class ClientGone(APIError):
    """The HTTP client disconnected; nobody will read this (499, as nginx logs it)."""

    def __init__(self) -> None:
        super().__init__(499, "client closed request", code="client_closed_request")


def grpc_requests(body: ChatCompletionRequest, completion_id: str) -> list[chat_pb2.ChatRequest]:
    """One ChatRequest per choice; choice i samples with seed + i so choices differ.

    A 400 when the request would be larger than the model server accepts."""
    template = chat_pb2.ChatRequest(model=body.model, messages=[_message(m) for m in body.messages])
    _features(body, template)
    return sampling_requests(body, template, completion_id)


# The characters that mean something outside a class in the grammar engine's regex dialect
# (Rust's regex-syntax, in llguidance); ``# & - ~`` do only inside classes or verbose mode.
_REGEX_META = frozenset("\\.+*?()|[]{}^$")


def regex_literal(text: str) -> str:
    """A regex matching exactly ``text`` in the grammar engine's dialect (Python's re.escape
    also escapes spaces and newlines, which that dialect may refuse)."""
    return "".join("\\" + c if c in _REGEX_META else c for c in text)


def set_guided(guided: Guided | None, req: chat_pb2.ChatRequest) -> None:
    """A vLLM constraint (guided_*, structured_outputs) → the proto's structured_output; a
    guided_choice is the regex alternation of its choices, matched exactly."""
    if guided is None:
        return
    out, value = req.structured_output, guided.value
    if guided.kind == "json":
        out.json_schema = value if isinstance(value, str) else json.dumps(value)
    elif guided.kind == "json_object":
        out.json_object = True
    elif guided.kind == "regex":
        out.regex = value
    elif guided.kind == "choice":
        out.regex = "|".join(regex_literal(choice) for choice in value)
    else:  # grammar: Lark, the dialect vLLM's guidance backend reads too
        out.lark_grammar = value


def _features(body: ChatCompletionRequest, req: chat_pb2.ChatRequest) -> None:
    """response_format (or a vLLM constraint) and tools → the proto's structured_output, tools,
    tool_choice."""
    fmt = body.response_format
    if fmt is not None and fmt.type == "json_object":
        req.structured_output.json_object = True
    elif fmt is not None and fmt.type == "json_schema":
        schema = fmt.json_schema.schema_
        req.structured_output.json_schema = json.dumps({} if schema is None else schema)
    set_guided(body.guided, req)
    for tool in body.tools or ():
        f = tool.function
        req.tools.append(
            chat_pb2.Tool(
                name=f.name,
                description=f.description or "",
                parameters="" if f.parameters is None else json.dumps(f.parameters),
                strict=bool(f.strict),
            )
        )
    if body.parallel_tool_calls is not None and body.tools:
        req.parallel_tool_calls = body.parallel_tool_calls
    choice = body.tool_choice
    if isinstance(choice, str):
        req.tool_choice = _TOOL_CHOICE[choice]
    elif choice is not None:
        req.tool_choice = chat_pb2.TOOL_CHOICE_MODE_FUNCTION
        req.tool_choice_function = choice.function.name


def sampling_requests(
    body: Any, template: chat_pb2.ChatRequest, completion_id: str
) -> list[chat_pb2.ChatRequest]:
    """``template`` (prompt and features set) with the sampling fields, once per choice."""
    requests = []
    for i in range(body.choices):
        req = chat_pb2.ChatRequest()
        req.CopyFrom(template)
        req.MergeFrom(
            chat_pb2.ChatRequest(
                stop=body.stop_list,
                presence_penalty=body.presence_penalty or 0.0,
                frequency_penalty=body.frequency_penalty or 0.0,
                min_tokens=body.min_tokens or 0,
                ignore_eos=bool(body.ignore_eos),
                request_id=completion_id if body.choices == 1 else f"{completion_id}-{i}",
                min_p=body.min_p or 0.0,
            )
        )
        if body.logprob_count is not None:
            req.logprobs = body.logprob_count
        if body.token_limit is not None:
            req.max_tokens = body.token_limit
        if body.temperature is not None:
            req.temperature = body.temperature if body.temperature >= SAMPLING_EPS else 0.0
        if body.top_p is not None:
            if body.top_p >= SAMPLING_EPS:
                req.top_p = body.top_p
            else:  # a nucleus of (almost) nothing keeps only the likeliest token: greedy
                req.temperature = 0.0
        if body.top_k is not None and body.top_k > 0:  # vLLM's -1 and 0 both mean "no limit"
            req.top_k = body.top_k
        if body.repetition_penalty is not None:
            req.repetition_penalty = body.repetition_penalty
        if body.seed is not None:
            req.seed = (body.seed + i) % 2**64  # the proto's uint64; negative seeds wrap
        requests.append(req)
    size = requests[0].ByteSize()
    if size > MAX_GRPC_REQUEST_BYTES:
        raise APIError(
            400,
            f"The conversation is {size} bytes as a gRPC request; the model server accepts at "
            f"most {MAX_GRPC_REQUEST_BYTES}.",
            param="messages",
            code="request_too_large",
        )
    return requests


def _message(m: ChatMessage) -> chat_pb2.Message:
    return chat_pb2.Message(
        role=_ROLES[m.role],
        content=m.text,
        name=m.name or "",
        tool_call_id=m.tool_call_id or "",
        tool_calls=[
            chat_pb2.ToolCall(id=c.id, name=c.function.name, arguments=c.function.arguments)
            for c in m.tool_calls or ()
        ],
    )


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await ``work`` unless the client disconnects first; then cancel it (→ cancel RPCs)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request.receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise ClientGone()
    return task.result()


@dataclass
class ChoiceCalls:
    """The n Chat calls of one completion, with what a caller must know about them."""

    calls: list[grpc.aio.UnaryStreamCall]
    metrics: BridgeMetrics
    arrived: float
    stream: bool
    idle_timeout: float | None = None  # --backend-idle-timeout, per read
    used_max_completion_tokens: bool = False
    lease: Lease | None = None  # per-key limits: each finished choice charges its tokens
    choices_per_prompt: int = 0  # call i continues prompt i // this (completions); 0: one prompt
    started: bool = False  # some backend answered: a retry could generate twice
    first_text_at: float | None = None
    request_id: str = ""  # names the failure in the client's message and in the log
    target: str = ""  # the backend target, for the log only
    prompt_param: str = "messages"  # the field a context overflow names (completions: prompt)
    # The field that set structured_output (response_format, guided_json...), which the model
    # server's errors about it name.
    structured_param: str = "response_format"

    def cancel(self) -> None:
        for call in self.calls:
            call.cancel()

    async def read(self, i: int) -> chat_pb2.ChatResponse | None:
        """The next message of choice ``i``; None at the end of its stream.

        A backend silent for ``idle_timeout`` (frozen, or its host gone without a reset) is a
        504; the timeout cancels the read, and grpc cancels the call with it."""
        try:
            async with asyncio.timeout(self.idle_timeout):
                msg = await self.calls[i].read()
        except TimeoutError:
            raise APIError(
                504,
                f"The model server sent nothing for {self.idle_timeout:g} s.",
                type="timeout_error",
                code="backend_timeout",
                retry_safe=not self.started,
            ) from None
        if msg is grpc.aio.EOF:
            return None
        self.started = True
        if msg.text and self.first_text_at is None:
            self.first_text_at = time.perf_counter()
            self.metrics.ttft.labels("true" if self.stream else "false").observe(
                self.first_text_at - self.arrived
            )
        if self.lease is not None and msg.finish_reason in _FINISH:
            prompt = i // self.choices_per_prompt if self.choices_per_prompt else 0
            self.lease.charge(msg.usage.prompt_tokens, msg.usage.completion_tokens, prompt)
        return msg

    def error(self, err: BaseException) -> APIError:
        """Any failure of a call → APIError via THE table (or a 500 for our own bugs)."""
        if isinstance(err, APIError):
            return err
        if isinstance(err, grpc.aio.AioRpcError):
            self.metrics.backend_rpc_errors.labels(err.code().name).inc()
            api_error = from_grpc(
                err,
                generation_started=self.started,
                request_id=self.request_id,
                target=self.target,
                prompt_param=self.prompt_param,
            )
            if self.used_max_completion_tokens and api_error.param == "max_tokens":
                api_error.param = "max_completion_tokens"
            if api_error.param is None and code_is_invalid(err):
                api_error.param = feature_param(err.details() or "")
            if api_error.param == "response_format":
                api_error.param = self.structured_param
            return api_error
        log.exception("unexpected error in chat request %s", self.request_id, exc_info=err)
        return internal_error(self.request_id)

    async def all_first(self) -> list[chat_pb2.ChatResponse]:
        """Every choice's first message, concurrently; any failure cancels them all."""

        async def first(i: int) -> chat_pb2.ChatResponse:
            msg = await self.read(i)
            if msg is None:
                raise APIError(
                    502,
                    "the model server ended the stream without a reply",
                    type="server_error",
                    code="bad_backend_response",
                    retry_safe=False,
                )
            return msg

        return await _all_or_cancel([first(i) for i in range(len(self.calls))])

    async def start(
        self, request: Request, headers: dict[str, str]
    ) -> tuple[list[chat_pb2.ChatResponse], list[Collected]]:
        """Streaming: every choice's first message (the status is decided before the 200).
        Otherwise: every choice read to the end. A client that goes away cancels the calls;
        any failure cancels them all and becomes the APIError, with ``headers`` on it."""
        try:
            if self.stream:
                return await until_disconnect(request, self.all_first()), []
            collected = _all_or_cancel([self.collect(i) for i in range(len(self.calls))])
            return [], await until_disconnect(request, collected)
        except BaseException as err:
            self.cancel()
            if isinstance(err, Exception):
                api_error = self.error(err)
                api_error.extra_headers.update(headers)
                raise api_error from err
            raise

    async def collect(self, i: int) -> Collected:
        """Read choice ``i`` to the end."""
        got = Collected()
        parts: list[str] = []
        last: chat_pb2.ChatResponse | None = None
        while (msg := await self.read(i)) is not None:
            parts.append(msg.text)
            got.logprobs.extend(msg.logprobs)
            got.prompt_logprobs.extend(msg.prompt_logprobs)  # first message only (completions)
            got.prompt_text += msg.prompt_text
            last = msg
        if last is None or last.finish_reason not in _FINISH:
            raise APIError(
                502,
                "the model server ended the stream without a finish reason",
                type="server_error",
                code="bad_backend_response",
                retry_safe=False,
            )
        got.text = "".join(parts)
        got.last = last
        return got


@dataclass
class Collected:
    """One choice read to the end: its text, its last message, every position's logprobs."""

    text: str = ""
    last: chat_pb2.ChatResponse = field(default_factory=chat_pb2.ChatResponse)
    logprobs: list[chat_pb2.PositionLogprobs] = field(default_factory=list)
    # Completions with echo: the prompt as the server decoded it and its log-probabilities.
    prompt_text: str = ""
    prompt_logprobs: list[chat_pb2.PositionLogprobs] = field(default_factory=list)


def json_logprob(logprob: float) -> float:
    """``logprob`` floored at :data:`MIN_LOGPROB`: -inf (a token the model rules out) is no
    JSON number, and the JSON response would fail on it. Chat and completions both use this.
    NaN (the model's numbers broke down) has no honest value: it stays NaN, and a JSON
    response then fails as an internal error."""
    return max(logprob, MIN_LOGPROB)


def token_logprobs(positions: Any) -> list[TokenLogprob]:
    """Proto PositionLogprobs → OpenAI ChatCompletionTokenLogprob items."""
    out = []
    for p in positions:
        out.append(
            TokenLogprob(
                token=p.chosen.token.decode("utf-8", errors="replace"),
                logprob=json_logprob(p.chosen.logprob),
                bytes=list(p.chosen.token),
                top_logprobs=[
                    TopLogprob(
                        token=t.token.decode("utf-8", errors="replace"),
                        logprob=json_logprob(t.logprob),
                        bytes=list(t.token),
                    )
                    for t in p.top
                ],
            )
        )
    return out


def tool_calls_of(msg: chat_pb2.ChatResponse) -> list[ToolCall] | None:
    calls = [
        ToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments))
        for c in msg.tool_calls
    ]
    return calls or None


async def _all_or_cancel(aws: list[Awaitable[T]]) -> list[T]:
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


@router.post(
    "/v1/chat/completions",
    response_model=None,
    responses={
        200: {
            "description": "A ChatCompletion, or with stream=true an SSE stream of chunks",
            "content": {"application/json": {}, "text/event-stream": {}},
        },
        **_ERROR_RESPONSES,
    },
)
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Any:
    """Create a chat completion (OpenAI CreateChatCompletionRequest)."""
    backend: Backend = request.app.state.backend
    metrics: BridgeMetrics = request.app.state.metrics
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    # The caller's id (else the completion id) travels as gRPC metadata and comes back as a
    # header, for log correlation. ChatRequest.request_id is always our own unique completion
    # id: callers may reuse their ids, and the server keys its work (and aborts) by it.
    request_id = request_id_for(request.headers, completion_id)
    model = await backend.served_model_id(body.model)
    calls = ChoiceCalls(
        [backend.chat(r, request_id) for r in grpc_requests(body, completion_id)],
        metrics,
        arrived=request.scope.get(START_KEY, time.perf_counter()),
        stream=bool(body.stream),
        idle_timeout=request.app.state.settings.backend_idle_timeout,
        used_max_completion_tokens=body.max_completion_tokens is not None,
        lease=lease_of(request.scope),
        request_id=request_id,
        target=backend.target,
        structured_param=body.guided.param if body.guided else "response_format",
    )
    headers = {"x-request-id": request_id, **ignored_header(body.ignored_params(), request_id)}
    firsts, results = await calls.start(request, headers)

    if body.stream:
        stream = ChatStream(
            calls=calls,
            firsts=firsts,
            metrics=metrics,
            completion_id=completion_id,
            created=created,
            model=model,
            include_usage=body.include_usage,
            logprobs=bool(body.logprobs),
            request_id=request_id,
            drain=getattr(request.app.state, "drain", None) or Drain(),
        )
        write_timeout = request.app.state.settings.stream_write_timeout
        return SSEResponse(stream.events(), headers, write_timeout, request_id)

    choices = []
    prompt: tuple[int, int] | None = None  # the choices share it: counted once
    completion_tokens = 0
    for i, got in enumerate(results):
        last = got.last
        calls = tool_calls_of(last)
        choices.append(
            Choice(
                index=i,
                message=ResponseMessage(
                    content=None if calls and not got.text else got.text, tool_calls=calls
                ),
                finish_reason=_FINISH[last.finish_reason],
                logprobs=(
                    ChoiceLogprobs(content=token_logprobs(got.logprobs)) if body.logprobs else None
                ),
            )
        )
        prompt = prompt or (last.usage.prompt_tokens, last.usage.cached_prompt_tokens)
        completion_tokens += last.usage.completion_tokens
    completion = ChatCompletion(
        id=completion_id,
        created=created,
        model=model,
        choices=choices,
        usage=Usage.of([prompt] if prompt else [], completion_tokens),
    )
    return JSONResponse(completion.model_dump(mode="json"), headers=headers)


class WriteTimeout(Exception):
    """A chunk could not be handed to the client's connection within --stream-write-timeout."""


# Set in the request's task when the bridge cut its stream on purpose (already logged).
_CUT_ON_PURPOSE: ContextVar[bool] = ContextVar("glmserve_stream_cut", default=False)
_UNFINISHED = "ASGI callable returned without completing response"


class CutStreamLogFilter(logging.Filter):
    """Drops uvicorn's ERROR for a response that returns unfinished when the bridge cut it
    itself (write timeout: one warning is logged for it); any other such response still logs.
    uvicorn logs it from the task that ran the app, so the context variable is visible."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (_CUT_ON_PURPOSE.get() and record.getMessage().startswith(_UNFINISHED))


class SSEResponse(EventSourceResponse):
    """FastAPI's SSE response, plus a write timeout and a guaranteed close of the generator.

    uvicorn's ``send`` waits while the connection's write buffer is full (the client is not
    reading); past ``write_timeout`` the response gives up, and uvicorn closes the connection of
    a response that returns unfinished. Starlette cancels the response when the client
    disconnects; closing the generator here runs its ``finally`` (cancel the RPCs) even if the
    cancel landed outside the generator's frame.
    """

    def __init__(
        self,
        content: AsyncIterator[bytes],
        headers: dict[str, str],
        write_timeout: float,
        request_id: str,
    ) -> None:
        super().__init__(
            content, headers={**headers, "cache-control": "no-cache", "x-accel-buffering": "no"}
        )
        self._events = content
        self._write_timeout = write_timeout
        self._request_id = request_id

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def timed_send(message: Message) -> None:
            try:
                async with asyncio.timeout(self._write_timeout):
                    await send(message)
            except TimeoutError:
                raise WriteTimeout() from None

        try:
            await super().__call__(scope, receive, timed_send)
        except WriteTimeout:
            _CUT_ON_PURPOSE.set(True)
            log.warning(
                "stream %s: the client read nothing for %g s; closing it",
                self._request_id,
                self._write_timeout,
            )
        finally:
            aclose = getattr(self._events, "aclose", None)
            if aclose is not None:
                await aclose()


@dataclass
class ChatStream:
    """Turns n Chat streams into OpenAI chunks, in the order the spec gives."""

    calls: ChoiceCalls
    firsts: list[chat_pb2.ChatResponse]
    metrics: BridgeMetrics
    completion_id: str
    created: int
    model: str
    include_usage: bool
    request_id: str
    logprobs: bool = False
    drain: Drain = field(default_factory=Drain)  # the CLI's; in-process tests never drain
    # Arguments already streamed, per (choice, call index): the final call sends the rest.
    _call_args: dict[tuple[int, int], str] = field(default_factory=dict)

    def _chunk(self, choices: list[ChunkChoice], usage: Usage | None = None) -> bytes:
        chunk = ChatCompletionChunk(
            id=self.completion_id,
            created=self.created,
            model=self.model,
            choices=choices,
            usage=usage,
        )
        data = chunk.model_dump_json(exclude=None if self.include_usage else {"usage"})
        return format_sse_event(data_str=data)

    def prompt_of(self, i: int) -> int:
        """Which prompt choice ``i`` continues (chat: all share one)."""
        return 0

    def _opening(self, i: int) -> bytes | None:
        return self._chunk([ChunkChoice(index=i, delta=Delta(role="assistant", content=""))])

    def _message_chunks(self, i: int, item: chat_pb2.ChatResponse) -> list[bytes]:
        out = []
        if item.text or (self.logprobs and item.logprobs):
            lp = ChoiceLogprobs(content=token_logprobs(item.logprobs)) if self.logprobs else None
            out.append(self._chunk([ChunkChoice(index=i, delta=Delta(content=item.text),
                                                logprobs=lp)]))  # fmt: skip
        # The spec's order: id, type and name first; then argument fragments as generated.
        for d in item.tool_call_deltas:
            if d.id:
                out.append(self._call_head(i, d.index, d.id, d.name))
                self._call_args[(i, d.index)] = ""
            out += self._call_arguments(i, d.index, d.arguments)
        for k, call in enumerate(item.tool_calls):  # whole on the last message
            sent = self._call_args.get((i, k))
            if sent is None:
                out.append(self._call_head(i, k, call.id, call.name))
                sent = ""
            elif not call.arguments.startswith(sent):  # the contract rules this out
                log.warning("stream %s: tool call %d's final arguments do not continue its "
                            "streamed ones", self.request_id, k)  # fmt: skip
                continue
            out += self._call_arguments(i, k, call.arguments[len(sent) :])
        return out

    def _call_head(self, i: int, k: int, call_id: str, name: str) -> bytes:
        head = ToolCallDelta(
            index=k, id=call_id, type="function", function=FunctionDelta(name=name, arguments="")
        )
        return self._chunk([ChunkChoice(index=i, delta=Delta(tool_calls=[head]))])

    def _call_arguments(self, i: int, k: int, fragment: str) -> list[bytes]:
        if not fragment:
            return []
        self._call_args[(i, k)] = self._call_args.get((i, k), "") + fragment
        body = ToolCallDelta(index=k, function=FunctionDelta(arguments=fragment))
        return [self._chunk([ChunkChoice(index=i, delta=Delta(tool_calls=[body]))])]

    def _finish_chunk(self, i: int, reason: str) -> bytes:
        return self._chunk([ChunkChoice(index=i, delta=Delta(), finish_reason=reason)])

    async def _pump(self, i: int, queue: asyncio.Queue, room: asyncio.Semaphore) -> None:
        """Forward choice i's messages (already-read first one included) to the merge queue,
        no more than ``room`` ahead of the consumer: the reads wait for the client."""
        msg: chat_pb2.ChatResponse | None = self.firsts[i]
        try:
            while msg is not None:
                await room.acquire()
                queue.put_nowait((i, msg))
                msg = await self.calls.read(i)
            queue.put_nowait((i, None))
        except asyncio.CancelledError:
            raise
        except Exception as err:  # noqa: BLE001 - handed to the consumer, which reports it
            queue.put_nowait((i, err))

    async def events(self) -> AsyncIterator[bytes]:
        n = len(self.calls.calls)
        # Unbounded only for the few end/error items; messages are bounded by the rooms.
        queue: asyncio.Queue = asyncio.Queue()
        rooms = [asyncio.Semaphore(STREAM_BUFFER) for _ in range(n)]
        pumps = [asyncio.ensure_future(self._pump(i, queue, rooms[i])) for i in range(n)]
        self.metrics.streams_in_flight.inc()
        finished = [False] * n
        completion_tokens = 0

        def stop() -> None:
            queue.put_nowait((0, _shutting_down()))

        self.drain.add(stop)
        # Per distinct prompt, counted once: (tokens, cached tokens) of its first choice to end.
        prompts: dict[int, tuple[int, int]] = {}
        try:
            for i in range(n):
                opening = self._opening(i)
                if opening:
                    yield opening
            open_streams = n
            while open_streams:
                i, item = await queue.get()
                if item is None:
                    open_streams -= 1
                    if not finished[i]:
                        raise APIError(
                            502,
                            "the model server ended the stream without a finish reason",
                            type="server_error",
                            code="bad_backend_response",
                        )
                    continue
                if isinstance(item, BaseException):
                    raise item
                rooms[i].release()
                for chunk in self._message_chunks(i, item):
                    yield chunk
                if item.finish_reason in _FINISH:
                    finished[i] = True
                    prompts.setdefault(
                        self.prompt_of(i),
                        (item.usage.prompt_tokens, item.usage.cached_prompt_tokens),
                    )
                    completion_tokens += item.usage.completion_tokens
                    yield self._finish_chunk(i, _FINISH[item.finish_reason])
            if self.include_usage:
                yield self._chunk([], Usage.of(prompts.values(), completion_tokens))
            yield _DONE
        except Exception as err:  # noqa: BLE001 - after the 200, errors travel in-band
            api_error = self.calls.error(err)
            log.warning(
                "stream %s failed after start: %s %s",
                self.request_id,
                api_error.status_code,
                api_error.message,
            )
            payload = error_body(api_error.message, api_error.type, api_error.param, api_error.code)
            yield format_sse_event(data_str=json.dumps(payload))
            yield _DONE
        finally:
            self.drain.discard(stop)
            for pump in pumps:
                pump.cancel()
            self.calls.cancel()
            self.metrics.streams_in_flight.dec()


def _shutting_down() -> APIError:
    return APIError(
        503,
        "The HTTP bridge is shutting down and its drain time ran out; the reply is incomplete.",
        type="server_error",
        code="server_shutting_down",
        retry_safe=False,
    )
