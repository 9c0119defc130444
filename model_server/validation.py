"""ChatRequest → engine inputs. Every problem is an InvalidArgument naming the field."""

from __future__ import annotations

import math
from dataclasses import dataclass

from glmserve.v1 import chat_pb2

from .engine.types import SamplingParams
from .models.base import ChatMessage, ToolCall

MAX_STOP_STRINGS = 16
MAX_STOP_BYTES = 256
MAX_REQUEST_ID = 128
MAX_TOP_LOGPROBS = 20
MAX_NAME = 256

_ROLES = {
    chat_pb2.ROLE_SYSTEM: "system",
    chat_pb2.ROLE_USER: "user",
    chat_pb2.ROLE_ASSISTANT: "assistant",
    chat_pb2.ROLE_TOOL: "tool",
}


class InvalidArgument(ValueError):
    """A bad request field (→ INVALID_ARGUMENT). ``field`` is the proto field path."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class Defaults:
    temperature: float
    top_p: float


def messages_of(messages) -> list[ChatMessage]:  # noqa: ANN001 - repeated chat_pb2.Message
    if not messages:
        raise InvalidArgument("messages", "at least one message is required")
    out = []
    for i, m in enumerate(messages):
        role = _ROLES.get(m.role)
        if role is None:
            raise InvalidArgument(
                f"messages[{i}].role",
                "must be ROLE_SYSTEM, ROLE_USER, ROLE_ASSISTANT or ROLE_TOOL"
                + (" (got ROLE_UNSPECIFIED)" if m.role == 0 else f" (got {m.role})"),
            )
        if m.tool_calls and role != "assistant":
            raise InvalidArgument(f"messages[{i}].tool_calls", "only assistant messages have them")
        if m.tool_call_id and role != "tool":
            raise InvalidArgument(f"messages[{i}].tool_call_id", "only tool messages have one")
        if len(m.name) > MAX_NAME:
            raise InvalidArgument(f"messages[{i}].name", f"at most {MAX_NAME} characters")
        calls = []
        for j, c in enumerate(m.tool_calls):
            if not c.name:
                raise InvalidArgument(f"messages[{i}].tool_calls[{j}].name", "is required")
            calls.append(ToolCall(c.id, c.name, c.arguments or "{}"))
        out.append(ChatMessage(role, m.content, tuple(calls), m.tool_call_id, m.name))
    return out


def _check_range(field: str, value: float, lo: float, hi: float, *, lo_open: bool = False) -> None:
    if not math.isfinite(value) or value > hi or value < lo or (lo_open and value == lo):
        left = "(" if lo_open else "["
        raise InvalidArgument(field, f"must be in {left}{lo:g}, {hi:g}] (got {value:g})")


def sampling_params(
    req: chat_pb2.ChatRequest, prompt_tokens: int, max_model_len: int, defaults: Defaults
) -> SamplingParams:
    """Checks the sampling fields against the prompt length and the model's context."""
    scoring = _prompt_scoring(req)
    # Only scoring a prompt (max_tokens 0) needs no room for a reply.
    scoring_only = scoring is not None and req.HasField("max_tokens") and req.max_tokens == 0
    room = max_model_len - prompt_tokens
    if room < (0 if scoring_only else 1):
        raise InvalidArgument(
            "messages",
            f"the prompt is {prompt_tokens} tokens, but the model's context is {max_model_len} "
            "tokens (and at least 1 must be left for the reply)",
        )
    if req.HasField("max_tokens"):
        max_tokens = req.max_tokens
        if max_tokens < 1 and not scoring_only:
            raise InvalidArgument("max_tokens", "must be at least 1 (0 only with prompt_logprobs)")
        if max_tokens > room:
            raise InvalidArgument(
                "max_tokens",
                f"{max_tokens} + the prompt's {prompt_tokens} tokens exceeds the model's context "
                f"of {max_model_len} tokens (at most {room} allowed)",
            )
    else:
        max_tokens = room
    temperature = req.temperature if req.HasField("temperature") else defaults.temperature
    _check_range("temperature", temperature, 0.0, 2.0)
    top_p = req.top_p if req.HasField("top_p") else defaults.top_p
    _check_range("top_p", top_p, 0.0, 1.0, lo_open=True)
    repetition_penalty = req.repetition_penalty if req.HasField("repetition_penalty") else 1.0
    _check_range("repetition_penalty", repetition_penalty, 0.0, 2.0, lo_open=True)
    _check_range("min_p", req.min_p, 0.0, 1.0)
    _check_range("presence_penalty", req.presence_penalty, -2.0, 2.0)
    _check_range("frequency_penalty", req.frequency_penalty, -2.0, 2.0)
    if req.min_tokens > max_tokens:
        raise InvalidArgument("min_tokens", f"{req.min_tokens} exceeds max_tokens ({max_tokens})")
    if len(req.stop) > MAX_STOP_STRINGS:
        raise InvalidArgument(
            "stop", f"at most {MAX_STOP_STRINGS} stop strings (got {len(req.stop)})"
        )
    for i, s in enumerate(req.stop):
        if not s or len(s.encode()) > MAX_STOP_BYTES:
            raise InvalidArgument(f"stop[{i}]", f"must be 1 to {MAX_STOP_BYTES} bytes")
    if len(req.request_id) > MAX_REQUEST_ID:
        raise InvalidArgument("request_id", f"at most {MAX_REQUEST_ID} characters")
    if req.HasField("logprobs") and req.logprobs > MAX_TOP_LOGPROBS:
        raise InvalidArgument("logprobs", f"at most {MAX_TOP_LOGPROBS} (got {req.logprobs})")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=float(temperature),
        top_p=float(top_p),
        top_k=req.top_k if req.HasField("top_k") else 0,
        min_p=float(req.min_p),
        repetition_penalty=float(repetition_penalty),
        presence_penalty=float(req.presence_penalty),
        frequency_penalty=float(req.frequency_penalty),
        min_tokens=req.min_tokens,
        ignore_eos=req.ignore_eos,
        seed=req.seed if req.HasField("seed") else None,
        stop=tuple(req.stop),
        max_tokens_requested=req.HasField("max_tokens"),
        logprobs=req.logprobs if req.HasField("logprobs") else None,
        prompt_logprobs=scoring,
    )


def _prompt_scoring(req: chat_pb2.ChatRequest) -> int | None:
    """prompt_logprobs (and echo): raw completions only, like OpenAI's echo."""
    raw = bool(req.prompt or req.prompt_token_ids)
    asked = req.HasField("prompt_logprobs")
    for name, on in (("prompt_logprobs", asked), ("echo", req.echo)):
        if on and not raw:
            raise InvalidArgument(name, "only with a raw prompt (prompt or prompt_token_ids)")
    if not asked:
        return None
    if req.prompt_logprobs > MAX_TOP_LOGPROBS:
        raise InvalidArgument(
            "prompt_logprobs", f"at most {MAX_TOP_LOGPROBS} (got {req.prompt_logprobs})"
        )
    return req.prompt_logprobs
