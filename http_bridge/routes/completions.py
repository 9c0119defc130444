"""POST /v1/completions: the legacy text-completions API (Continue's autocomplete, lm-eval).

Each prompt × ``n`` is one Chat RPC on the raw-prompt path (ChatRequest.prompt or
prompt_token_ids: no chat template). Choice ``i`` continues prompt ``i // n``, as OpenAI numbers
them. Errors, streaming, backpressure, deadlines, the extra-field policy and the per-key limits
(one budget with chat's, ``limits.py``) are chat's (``routes/chat.py``), reused here; only the
shapes differ.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from fastapi.sse import format_sse_event

from glmserve.v1 import chat_pb2
from http_bridge.backend import Backend
from http_bridge.drain import Drain
from http_bridge.errors import APIError, request_id_for
from http_bridge.limits import lease_of
from http_bridge.metrics import START_KEY, BridgeMetrics
from http_bridge.protocol import Usage
from http_bridge.protocol_completions import (
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
)
from http_bridge.routes.body import JSONBodyRoute
from http_bridge.routes.chat import (
    _ERROR_RESPONSES,
    _FINISH,
    ChatStream,
    ChoiceCalls,
    SSEResponse,
    ignored_header,
    json_logprob,
    sampling_requests,
    set_guided,
)

router = APIRouter(tags=["completions"], route_class=JSONBodyRoute)


def grpc_requests(body: CompletionRequest, completion_id: str) -> list[chat_pb2.ChatRequest]:
    if body.max_tokens == 0 and not body.scores_prompt:
        raise APIError(
            400,
            "max_tokens 0 only scores the prompt: it needs echo: true and logprobs.",
            param="max_tokens",
        )
    requests = []
    for p, prompt in enumerate(body.prompt):
        template = chat_pb2.ChatRequest(model=body.model)
        if isinstance(prompt, str):
            if not prompt:
                raise APIError(400, "prompt must not be empty", param="prompt")
            template.prompt = prompt
        else:
            template.prompt_token_ids.extend(prompt)
            template.echo = bool(body.echo)  # the server decodes the ids for the echo
        set_guided(body.guided, template)
        if body.scores_prompt:
            template.prompt_logprobs = body.logprobs or 0
        requests += sampling_requests(body, template, f"{completion_id}-{p}")
    return requests


def legacy_logprobs(positions: Any, offset: int, prompt: bool = False) -> CompletionLogprobs:
    """Proto PositionLogprobs → the legacy parallel lists; offsets count characters. For the
    prompt (``prompt``), the first token's logprob and alternatives are null."""
    lp = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    for k, p in enumerate(positions):
        token = p.chosen.token.decode("utf-8", errors="replace")
        lp.tokens.append(token)
        lp.text_offset.append(offset)
        offset += len(token)
        if prompt and k == 0:
            lp.token_logprobs.append(None)
            lp.top_logprobs.append(None)
            continue
        chosen = json_logprob(p.chosen.logprob)
        lp.token_logprobs.append(chosen)
        top = {t.token.decode("utf-8", errors="replace"): json_logprob(t.logprob) for t in p.top}
        lp.top_logprobs.append(top or {token: chosen})
    return lp


def choice_logprobs(prompt: Any, generated: Any, offset: int) -> CompletionLogprobs:
    """One choice's logprobs: the echoed prompt's tokens (offsets from 0), then the generated
    ones (offsets from ``offset``, the echo's length)."""
    head = legacy_logprobs(prompt, 0, prompt=True)
    tail = legacy_logprobs(generated, offset)
    return CompletionLogprobs(
        tokens=head.tokens + tail.tokens,
        token_logprobs=head.token_logprobs + tail.token_logprobs,
        top_logprobs=head.top_logprobs + tail.top_logprobs,
        text_offset=head.text_offset + tail.text_offset,
    )


def echo_text(prompt: str | list[int], server_text: str) -> str:
    """What echo prepends: the text prompt as sent, or the server's decoding of the ids
    (ChatResponse.prompt_text)."""
    return prompt if isinstance(prompt, str) else server_text


@router.post(
    "/v1/completions",
    response_model=None,
    responses={
        200: {
            "description": "A Completion, or with stream=true an SSE stream of them",
            "content": {"application/json": {}, "text/event-stream": {}},
        },
        **_ERROR_RESPONSES,
    },
)
async def create_completion(body: CompletionRequest, request: Request) -> Any:
    """Create a text completion (OpenAI CreateCompletionRequest); no chat template."""
    backend: Backend = request.app.state.backend
    metrics: BridgeMetrics = request.app.state.metrics
    completion_id = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    request_id = request_id_for(request.headers, completion_id)
    model = await backend.served_model_id(body.model)
    calls = ChoiceCalls(
        [backend.chat(r, request_id) for r in grpc_requests(body, completion_id)],
        metrics,
        arrived=request.scope.get(START_KEY, time.perf_counter()),
        stream=bool(body.stream),
        idle_timeout=request.app.state.settings.backend_idle_timeout,
        lease=lease_of(request.scope),
        choices_per_prompt=body.choices,
        request_id=request_id,
        target=backend.target,
        prompt_param="prompt",
        structured_param=body.guided.param if body.guided else "response_format",
    )
    headers = {"x-request-id": request_id, **ignored_header(body.ignored_params(), request_id)}
    firsts, results = await calls.start(request, headers)
    n = body.choices
    prompts = [p for p in body.prompt for _ in range(n)]  # choice i continues prompts[i]

    if body.stream:
        stream = CompletionStream(
            calls=calls,
            firsts=firsts,
            metrics=metrics,
            completion_id=completion_id,
            created=created,
            model=model,
            include_usage=body.include_usage,
            logprobs=body.logprobs is not None,
            request_id=request_id,
            drain=getattr(request.app.state, "drain", None) or Drain(),
            n=n,
            echoes=[
                echo_text(p, f.prompt_text) if body.echo else ""
                for p, f in zip(prompts, firsts, strict=True)
            ],
        )
        write_timeout = request.app.state.settings.stream_write_timeout
        return SSEResponse(stream.events(), headers, write_timeout, request_id)

    choices = []
    prompt_tokens: dict[int, tuple[int, int]] = {}  # each prompt counted once
    completion_tokens = 0
    for i, got in enumerate(results):
        echo = echo_text(prompts[i], got.prompt_text) if body.echo else ""
        choices.append(
            CompletionChoice(
                index=i,
                text=echo + got.text,
                finish_reason=_FINISH[got.last.finish_reason],  # type: ignore[arg-type]
                logprobs=(
                    choice_logprobs(got.prompt_logprobs, got.logprobs, len(echo))
                    if body.logprobs is not None
                    else None
                ),
            )
        )
        usage = got.last.usage
        prompt_tokens.setdefault(i // n, (usage.prompt_tokens, usage.cached_prompt_tokens))
        completion_tokens += usage.completion_tokens
    completion = Completion(
        id=completion_id,
        created=created,
        model=model,
        choices=choices,
        usage=Usage.of(prompt_tokens.values(), completion_tokens),
    )
    return JSONResponse(completion.model_dump(mode="json"), headers=headers)


@dataclass
class CompletionStream(ChatStream):
    """Chat's stream machinery with text_completion chunks (no role chunk; echo first, with
    the prompt's logprobs when asked for).

    Mid-stream chunks carry ``finish_reason: null``, as OpenAI and vLLM send them (the spec's
    CreateCompletionResponse, the only schema it gives for these chunks, requires a string)."""

    n: int = 1
    echoes: list[str] = field(default_factory=list)
    _offsets: dict[int, int] = field(default_factory=dict)

    def prompt_of(self, i: int) -> int:
        return i // self.n

    def _completion_chunk(self, choices: list[CompletionChoice], usage: Usage | None) -> bytes:
        chunk = Completion(
            id=self.completion_id,
            created=self.created,
            model=self.model,
            choices=choices,
            usage=usage,
        )
        # usage only on the last chunk (the spec's field is optional, not nullable).
        data = chunk.model_dump_json(exclude=None if usage is not None else {"usage"})
        return format_sse_event(data_str=data)

    def _chunk(self, choices: list, usage: Usage | None = None) -> bytes:
        return self._completion_chunk(choices, usage)  # only the usage chunk comes here

    def _opening(self, i: int) -> bytes | None:
        echo = self.echoes[i] if self.echoes else ""
        self._offsets[i] = len(echo)
        scored = self.firsts[i].prompt_logprobs if self.logprobs else None
        lp = legacy_logprobs(scored, 0, prompt=True) if scored else None
        if not echo and lp is None:
            return None
        choice = CompletionChoice(index=i, text=echo, logprobs=lp, finish_reason=None)
        return self._completion_chunk([choice], None)

    def _message_chunks(self, i: int, item: chat_pb2.ChatResponse) -> list[bytes]:
        if not item.text and not (self.logprobs and item.logprobs):
            return []
        lp = legacy_logprobs(item.logprobs, self._offsets[i]) if self.logprobs else None
        self._offsets[i] += len(item.text)
        choice = CompletionChoice(index=i, text=item.text, logprobs=lp, finish_reason=None)
        return [self._completion_chunk([choice], None)]

    def _finish_chunk(self, i: int, reason: str) -> bytes:
        choice = CompletionChoice(index=i, text="", finish_reason=reason)  # type: ignore[arg-type]
        return self._completion_chunk([choice], None)
