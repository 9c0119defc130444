"""OpenAI chat-completions wire models (request, response, stream chunk, models list).

Only shapes and field-level rules live here; serving logic is in ``routes/``. Requests are
strict: unknown fields, and known OpenAI fields glmserve does not implement (tools, logprobs,
response_format other than text, ...), are 400s naming the field instead of being silently
ignored. A known-but-unimplemented field is accepted only at its neutral value (``null``,
``false``, ``{"type": "text"}``...), which is what SDKs send when the feature is off.

Every field is bounded here, and the bounds are in the published ``/openapi.json``: integers to
the range of the proto field they travel in (uint32, int64), floats to OpenAI's ranges and
finite, strings and arrays to sizes the model server can take. What JSON itself can smuggle in
(lone surrogates, duplicate keys, NaN, deep nesting) is refused earlier, in ``routes/body.py``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_serializer,
)
from pydantic_core import PydanticCustomError

MAX_N = 8
MAX_STOP = 4
MAX_STOP_BYTES = 256  # the model server's limit per stop string (chat.proto)
UINT32_MAX = 2**32 - 1
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
# The model server takes gRPC messages of at most 4 MiB (grpc's default), so no longer text could
# ever reach it: every character is at least one byte.
MAX_TEXT_CHARS = 4 * 1024 * 1024
# Far above any conversation a context window holds; bounds the work one request can cause.
MAX_MESSAGES = 4096
MAX_CONTENT_PARTS = 256
MAX_NAME_CHARS = 256  # model, message name, user
# A sane floor: below it the penalty only rewards repetition absurdly, and near 0 it divides
# logits past float32's range (the engine then samples from NaN). OpenAI's spec has no such
# field; vLLM asks only for > 0.
MIN_REPETITION_PENALTY = 0.01


def _unsupported(field: str, why: str = "") -> PydanticCustomError:
    suffix = f" {why}" if why else ""
    return PydanticCustomError(
        "unsupported_parameter",
        "'{field}' is not supported by this server.{suffix}",
        {"field": field, "suffix": suffix},
    )


# Known OpenAI request fields glmserve does not implement, with the values that mean "off".
# None (JSON null / absent) is always accepted.
_NEUTRAL_VALUES: dict[str, tuple[Any, ...]] = {
    "tools": ([],),
    "tool_choice": ("none",),
    "parallel_tool_calls": (True, False),  # only meaningful with tools, which are rejected
    "functions": ([],),
    "function_call": ("none",),
    "response_format": ({"type": "text"},),
    "logprobs": (False,),
    "top_logprobs": (0,),
    "logit_bias": ({},),
    "audio": (),
    "modalities": (["text"],),
    "prediction": (),
    "web_search_options": (),
    "store": (False,),
    "metadata": ({},),
    "service_tier": ("auto", "default"),
    "reasoning_effort": (),
    "verbosity": (),
    "moderation": (),
    "prompt_cache_key": (),
    "prompt_cache_retention": (),
    "prompt_cache_options": (),
    "safety_identifier": (),
}


class _Strict(BaseModel):
    """Strict JSON typing ("1" is not a number, true is not 1), no unknown fields, finite floats."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


# What the hand-written validators below accept, stated for /openapi.json.
_TEXT_SCHEMA: dict[str, Any] = {"type": "string", "maxLength": MAX_TEXT_CHARS}
_CONTENT_SCHEMA: dict[str, Any] = {
    "anyOf": [
        _TEXT_SCHEMA,
        {
            "type": "array",
            "minItems": 1,
            "maxItems": MAX_CONTENT_PARTS,
            "items": {
                "type": "object",
                "properties": {"type": {"const": "text"}, "text": _TEXT_SCHEMA},
                "required": ["type", "text"],
                "additionalProperties": False,
            },
        },
        {"type": "null"},
    ],
    "description": "A string or text parts (joined with newlines); null only for 'assistant'.",
}
_STOP_ITEM_SCHEMA: dict[str, Any] = {
    "type": "string",
    "minLength": 1,
    "maxLength": MAX_STOP_BYTES,
    "description": f"1 to {MAX_STOP_BYTES} UTF-8 bytes",
}
_STOP_SCHEMA: dict[str, Any] = {
    "anyOf": [
        _STOP_ITEM_SCHEMA,
        {"type": "array", "maxItems": MAX_STOP, "items": _STOP_ITEM_SCHEMA},
        {"type": "null"},
    ]
}


class StreamOptions(_Strict):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None

    @field_validator("include_obfuscation")
    @classmethod
    def _no_obfuscation(cls, value: bool | None) -> bool | None:
        if value:
            raise _unsupported("stream_options.include_obfuscation", "Set it to false or omit it.")
        return value


class ChatMessage(_Strict):
    """One input message. ``developer`` is treated as ``system``; ``name`` is accepted."""

    role: Annotated[str, WithJsonSchema({"enum": ["system", "developer", "user", "assistant"]})]
    # A string, or a list of {"type": "text", "text": ...} parts; validated below.
    content: Annotated[Any, WithJsonSchema(_CONTENT_SCHEMA)] = Field(
        default=None, validate_default=True
    )
    name: str | None = Field(default=None, max_length=MAX_NAME_CHARS)
    # Fields of an earlier assistant reply (SDKs echo them back): accepted only when empty.
    refusal: None = None
    annotations: Any = None
    tool_calls: Any = None
    function_call: Any = None
    audio: Any = None

    @field_validator("role", mode="before")
    @classmethod
    def _role(cls, value: Any) -> str:
        if value in ("system", "developer", "user", "assistant"):
            return value
        if value in ("tool", "function"):
            raise PydanticCustomError(
                "unsupported_parameter",
                "role '{role}' is not supported: this server does not implement tools.",
                {"role": value},
            )
        raise PydanticCustomError(
            "invalid_role",
            "role must be one of 'system', 'developer', 'user', 'assistant', got {role!r}",
            {"role": value},
        )

    @field_validator("content")
    @classmethod
    def _content(cls, value: Any, info: ValidationInfo) -> str:
        role = info.data.get("role")
        if value is None:
            if role == "assistant":
                return ""
            raise PydanticCustomError("missing", "content is required")
        if isinstance(value, str):
            return _bounded_text(value, "content")
        if not isinstance(value, list) or not value:
            raise PydanticCustomError(
                "invalid_content",
                "content must be a string or a non-empty array of text parts",
            )
        if len(value) > MAX_CONTENT_PARTS:
            raise PydanticCustomError(
                "too_long", "content has at most {n} parts", {"n": MAX_CONTENT_PARTS}
            )
        texts: list[str] = []
        for j, part in enumerate(value):
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise PydanticCustomError(
                    "invalid_content", "content[{j}] must be an object with a 'type'", {"j": j}
                )
            if part["type"] != "text":
                raise PydanticCustomError(
                    "unsupported_parameter",
                    "content[{j}] has type '{type}': only 'text' parts are supported.",
                    {"j": j, "type": part["type"]},
                )
            extra = sorted(set(part) - {"type", "text"})
            if extra:
                raise PydanticCustomError(
                    "unsupported_parameter",
                    "content[{j}].{key} is not supported by this server.",
                    {"j": j, "key": extra[0]},
                )
            if not isinstance(part.get("text"), str):
                raise PydanticCustomError(
                    "invalid_content", "content[{j}].text must be a string", {"j": j}
                )
            texts.append(_bounded_text(part["text"], f"content[{j}].text"))
        # Same joining rule as vLLM: parts are separate paragraphs of one message.
        return "\n".join(texts)

    @field_validator("annotations", "tool_calls", "function_call", "audio")
    @classmethod
    def _assistant_extras(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None or value == []:
            return None
        raise _unsupported(str(info.field_name))

    @property
    def text(self) -> str:
        return self.content  # a str after validation


def _bounded_text(text: str, where: str) -> str:
    if len(text) > MAX_TEXT_CHARS:
        raise PydanticCustomError(
            "too_long",
            "{where} is longer than {n} characters",
            {"where": where, "n": MAX_TEXT_CHARS},
        )
    return text


class ChatCompletionRequest(_Strict):
    """CreateChatCompletionRequest, as far as glmserve implements it (plus vLLM extensions)."""

    model: str = Field(max_length=MAX_NAME_CHARS)
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    # uint32 in chat.proto.
    max_tokens: int | None = Field(default=None, ge=1, le=UINT32_MAX)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=UINT32_MAX)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    n: int | None = Field(default=None, ge=1, le=MAX_N)
    # A string or a list of strings; normalized to a list (validated below).
    stop: Annotated[list[str] | None, WithJsonSchema(_STOP_SCHEMA)] = None
    seed: int | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = Field(default=None, max_length=MAX_NAME_CHARS)
    # vLLM-style extensions; top_k and min_tokens are uint32 in chat.proto.
    top_k: int | None = Field(default=None, ge=-1, le=UINT32_MAX)
    min_tokens: int | None = Field(default=None, ge=0, le=UINT32_MAX)
    ignore_eos: bool | None = None
    repetition_penalty: float | None = Field(default=None, ge=MIN_REPETITION_PENALTY, le=2)
    # Known OpenAI fields that are not implemented: only their neutral values pass.
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    logprobs: Any = None
    top_logprobs: Any = None
    logit_bias: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    web_search_options: Any = None
    store: Any = None
    metadata: Any = None
    service_tier: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    moderation: Any = None
    prompt_cache_key: Any = None
    prompt_cache_retention: Any = None
    prompt_cache_options: Any = None
    safety_identifier: Any = None

    @field_validator(*_NEUTRAL_VALUES)
    @classmethod
    def _not_implemented(cls, value: Any, info: ValidationInfo) -> Any:
        name = str(info.field_name)
        if value is None or value in _NEUTRAL_VALUES[name]:
            return value
        hints = {
            "response_format": 'Only {"type": "text"} is supported.',
            "logprobs": "Log probabilities are not returned.",
        }
        raise _unsupported(name, hints.get(name, ""))

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: list[str] | None) -> list[str] | None:
        items = value or []
        if len(items) > MAX_STOP:
            raise PydanticCustomError(
                "too_many_stop", "at most {n} stop sequences are allowed", {"n": MAX_STOP}
            )
        for i, item in enumerate(items):
            if not item or len(item.encode()) > MAX_STOP_BYTES:
                raise PydanticCustomError(
                    "stop_length",
                    "stop[{i}] must be 1 to {n} UTF-8 bytes",
                    {"i": i, "n": MAX_STOP_BYTES},
                )
        return value

    @field_validator("max_completion_tokens")
    @classmethod
    def _one_max(cls, value: int | None, info: ValidationInfo) -> int | None:
        other = info.data.get("max_tokens")
        if value is not None and other is not None and value != other:
            raise PydanticCustomError(
                "conflict",
                "max_tokens ({a}) and max_completion_tokens ({b}) disagree; set only one",
                {"a": other, "b": value},
            )
        return value

    @field_validator("stream_options")
    @classmethod
    def _options_need_stream(
        cls, value: StreamOptions | None, info: ValidationInfo
    ) -> StreamOptions | None:
        if value is not None and not info.data.get("stream"):
            raise PydanticCustomError(
                "invalid_value", "stream_options is only allowed when stream is true"
            )
        return value

    # Derived values the route maps onto the gRPC request.
    @property
    def choices(self) -> int:
        return self.n or 1

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def stop_list(self) -> list[str]:
        return self.stop or []

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


# ---- responses -------------------------------------------------------------------------------

FinishReason = Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


class Choice(BaseModel):
    index: int
    message: ResponseMessage
    finish_reason: FinishReason
    logprobs: None = None


class ChatCompletion(BaseModel):
    """CreateChatCompletionResponse."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    """ChatCompletionStreamResponseDelta: absent keys are left out, not sent as null."""

    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="plain")
    def _compact(self) -> dict[str, Any]:
        return {k: v for k, v in (("role", self.role), ("content", self.content)) if v is not None}


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: FinishReason | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    """CreateChatCompletionStreamResponse. ``usage`` is emitted only with include_usage."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    """Model (the OpenAI ``/v1/models`` item)."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "glmserve"


class ModelList(BaseModel):
    """ListModelsResponse."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """The envelope every error uses (documented in the OpenAPI schema of each route)."""

    error: ErrorDetail
