"""OpenAI chat-completions wire models (request, response, stream chunk, models list).

Only shapes and field-level rules live here; serving logic is in ``routes/``. The extra-field
policy (docs/bridge.md): every known field is strictly typed and ranged. Unknown top-level
fields (Open WebUI forwards user options like ``num_ctx``) and known OpenAI fields that change
nothing here (``store``, ``metadata``, ``user``...) are accepted and ignored, as vLLM does;
:meth:`ChatCompletionRequest.ignored_params` lists them for the log and the
``x-glmserve-ignored-params`` header. Known fields whose effect glmserve cannot give
(``logit_bias``, ``audio``, ``prediction``...) are 400s naming the field, except at their
neutral value (``null``, ``{}``, ``["text"]``...), which is what SDKs send when a feature is off.
vLLM's extensions follow the same rule (:class:`VLLMParams`): its constraints (``guided_*``,
``structured_outputs``) are mapped onto the proto's StructuredOutput, its fields that change
nothing here are ignored and listed, and the rest pass only at vLLM's default value.
Unknown fields inside messages stay 400s: they are not options, they are content. The keys the
openai SDK's own message objects add (``parsed``, ``parsed_arguments``, a tool call's ``index``)
and DeepSeek-style ``reasoning_content`` are known: accepted and dropped, so that an agent loop
can send a reply back as it got it.

Every field is bounded here, and the bounds are in the published ``/openapi.json``: integers to
the range of the proto field they travel in (uint32, int64), floats to OpenAI's ranges and
finite, strings and arrays to sizes the model server can take. What JSON itself can smuggle in
(lone surrogates, duplicate keys, NaN, deep nesting) is refused earlier, in ``routes/body.py``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Any, Literal, NamedTuple

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

MAX_N = 8
# The model server's limit (MAX_STOP_STRINGS in model_server/validation.py; a test keeps them
# equal). Not imported: the bridge imports nothing of the model server. OpenAI allows 4; agents
# such as Continue send more to other hosts.
MAX_STOP = 16
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


# vLLM's request fields (both endpoints) that glmserve cannot honour, with the values vLLM
# treats as its default: a client that targets vLLM sends them as they are, so they pass, and
# any other value is a 400 (typed fields, so 0 is not false).
VLLM_NEUTRAL_VALUES: dict[str, tuple[Any, ...]] = {
    "stop_token_ids": ([],),
    "include_stop_str_in_output": (False,),
    "skip_special_tokens": (True,),
    "spaces_between_special_tokens": (True,),
    "bad_words": ([],),
    "allowed_token_ids": ([],),
    "use_beam_search": (False,),
    "truncate_prompt_tokens": (),
    "prompt_logprobs": (),
}
# Why each is refused, said in its 400.
NEUTRAL_HINTS = {
    "functions": "Use tools.",
    "function_call": "Use tool_choice.",
    "stop_token_ids": "Use stop (strings).",
    "include_stop_str_in_output": "Only false: the stop string is never part of the reply.",
    "skip_special_tokens": "Only true: special tokens are always left out of the reply.",
    "spaces_between_special_tokens": "Only true (vLLM's default).",
    "allowed_token_ids": "Use guided_choice or guided_regex.",
    "use_beam_search": "Only false: sampling (and greedy) decoding.",
    "truncate_prompt_tokens": "The prompt is never truncated.",
    "prompt_logprobs": "Use /v1/completions with echo: true and logprobs.",
    "continue_final_message": "Only false: the reply is always a new assistant turn.",
    "add_generation_prompt": "Only true: the assistant's turn is always opened.",
    "chat_template": "The model's own chat template is always used.",
    "chat_template_kwargs": "The model's chat template gets no extra variables.",
    "echo": "Only false; use /v1/completions with echo.",
}
# Known OpenAI request fields glmserve does not implement and cannot ignore, with the values
# that mean "off", and the vLLM ones (chat's own last). None (JSON null / absent) is always
# accepted.
_NEUTRAL_VALUES: dict[str, tuple[Any, ...]] = {
    "functions": ([],),
    "function_call": ("none",),
    "logit_bias": ({},),
    "audio": (),
    "modalities": (["text"],),
    "prediction": (),
    "web_search_options": (),
    **VLLM_NEUTRAL_VALUES,
    "continue_final_message": (False,),
    "add_generation_prompt": (True,),
    "chat_template": (),
    "chat_template_kwargs": ({},),
    "echo": (False,),
}
# vLLM fields that change nothing here, accepted (any JSON), ignored, listed: the grammar
# backend (every backend enforces the same constraint) and length_penalty (beam search only,
# which use_beam_search keeps off). guided_whitespace_pattern too, unless JSON is constrained
# (then a 400: JSON is always generated compactly).
VLLM_IGNORED_FIELDS = ("guided_decoding_backend", "length_penalty", "guided_whitespace_pattern")
# vLLM's constraint fields, each mapped onto chat.proto's StructuredOutput (at most one).
GUIDED_FIELDS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
MAX_GUIDED_CHOICES = 1024
# Known OpenAI fields that do not change a reply here: accepted (any JSON), ignored, listed.
IGNORED_FIELDS = (
    "user",
    "store",
    "metadata",
    "service_tier",
    "reasoning_effort",
    "verbosity",
    "moderation",
    "prompt_cache_key",
    "prompt_cache_retention",
    "prompt_cache_options",
    "safety_identifier",
)
MAX_TOOLS = 128
MAX_TOP_LOGPROBS = 20


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
STOP_SCHEMA: dict[str, Any] = {
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


class FunctionCallIn(_Strict):
    name: str = Field(min_length=1, max_length=MAX_NAME_CHARS)
    # JSON text of an object, as the API returned it (not checked: it is history).
    arguments: str = Field(default="{}", max_length=MAX_TEXT_CHARS)
    # The SDK's parse() adds the arguments it parsed (ParsedFunction); dropped.
    parsed_arguments: Any = None


class ToolCallIn(_Strict):
    """An earlier assistant reply's tool call, sent back in the history."""

    id: str = Field(max_length=MAX_NAME_CHARS)
    type: Literal["function"] = "function"
    function: FunctionCallIn
    # The call's place in the stream's deltas, which the SDK's stream helper keeps in the
    # message it assembles (get_final_completion); dropped.
    index: int | None = Field(default=None, ge=0, le=UINT32_MAX)


class ChatMessage(_Strict):
    """One input message. ``developer`` is treated as ``system``; ``name`` is accepted."""

    role: Annotated[
        str, WithJsonSchema({"enum": ["system", "developer", "user", "assistant", "tool"]})
    ]
    # A string, or a list of {"type": "text", "text": ...} parts; validated below.
    content: Annotated[Any, WithJsonSchema(_CONTENT_SCHEMA)] = Field(
        default=None, validate_default=True
    )
    name: str | None = Field(default=None, max_length=MAX_NAME_CHARS)
    # An assistant reply's tool calls; a tool message's call id.
    tool_calls: list[ToolCallIn] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_call_id: str | None = Field(default=None, max_length=MAX_NAME_CHARS)
    # Fields of an earlier assistant reply (SDKs echo them back): accepted only when empty.
    refusal: None = None
    annotations: Any = None
    function_call: Any = None
    audio: Any = None
    # Copies of an earlier reply that clients send back, dropped: the SDK's parse() result
    # (ParsedChatCompletionMessage.parsed, the content as an object) and the reasoning that
    # DeepSeek-style APIs return beside the content (not shown to the model again).
    parsed: Any = None
    reasoning_content: str | None = Field(default=None, max_length=MAX_TEXT_CHARS)

    @field_validator("role", mode="before")
    @classmethod
    def _role(cls, value: Any) -> str:
        if value in ("system", "developer", "user", "assistant", "tool"):
            return value
        if value == "function":
            raise PydanticCustomError(
                "unsupported_parameter",
                "role 'function' (the deprecated functions API) is not supported: use tools "
                "and role 'tool'.",
            )
        raise PydanticCustomError(
            "invalid_role",
            "role must be one of 'system', 'developer', 'user', 'assistant', 'tool', got {role!r}",
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

    @field_validator("annotations", "function_call", "audio")
    @classmethod
    def _assistant_extras(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None or value == []:
            return None
        raise _unsupported(str(info.field_name))

    @field_validator("tool_calls")
    @classmethod
    def _calls_of_assistant(cls, value: list[ToolCallIn] | None, info: ValidationInfo) -> Any:
        if value and info.data.get("role") != "assistant":
            raise PydanticCustomError("invalid_value", "only assistant messages have tool_calls")
        return value or None

    @model_validator(mode="after")
    def _tool_result_has_id(self) -> ChatMessage:
        if self.role == "tool" and not self.tool_call_id:
            raise PydanticCustomError(
                "missing", "a tool message needs tool_call_id (the id of the call it answers)"
            )
        if self.role != "tool" and self.tool_call_id is not None:
            raise PydanticCustomError("invalid_value", "only tool messages have tool_call_id")
        return self

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


class JSONSchemaFormat(_Strict):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = Field(default=None, max_length=MAX_TEXT_CHARS)
    # The JSON Schema (an object); absent: any JSON value.
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormatIn(_Strict):
    """``{"type": "text"}``, ``{"type": "json_object"}`` or ``{"type": "json_schema",
    "json_schema": {...}}`` (one model rather than a tagged union, so a 400 names the field
    as the client wrote it)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_iff_json_schema(self) -> ResponseFormatIn:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise PydanticCustomError(
                "invalid_value", "json_schema is required with type 'json_schema', and only then"
            )
        return self


class StructuredOutputsIn(_Strict):
    """vLLM's ``structured_outputs``: one of json / regex / choice / grammar / json_object."""

    json_: dict[str, Any] | Annotated[str, Field(max_length=MAX_TEXT_CHARS)] | None = Field(
        default=None, alias="json"
    )
    regex: str | None = Field(default=None, max_length=MAX_TEXT_CHARS)
    choice: list[Annotated[str, Field(max_length=MAX_TEXT_CHARS)]] | None = Field(
        default=None, min_length=1, max_length=MAX_GUIDED_CHOICES
    )
    grammar: str | None = Field(default=None, max_length=MAX_TEXT_CHARS)
    json_object: bool | None = None
    # Options that change nothing here: one grammar engine; JSON is always compact. A
    # whitespace_pattern only with a kind other than JSON (where vLLM ignores it too).
    disable_fallback: bool | None = None
    disable_any_whitespace: bool | None = None
    whitespace_pattern: str | None = Field(default=None, max_length=MAX_TEXT_CHARS)
    # Options whose effect glmserve cannot give: only their neutral value.
    disable_additional_properties: bool | None = None
    structural_tag: Any = None

    @field_validator("disable_additional_properties", "structural_tag")
    @classmethod
    def _neutral(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None or value is False:
            return value
        raise _unsupported(f"structured_outputs.{info.field_name}")

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutputsIn:
        if len(self.kinds()) != 1:
            raise PydanticCustomError(
                "invalid_value",
                "structured_outputs needs exactly one of json, regex, choice, grammar, "
                "json_object (got {got})",
                {"got": ", ".join(self.kinds()) or "none"},
            )
        if self.whitespace_pattern is not None and self.kinds()[0] in ("json", "json_object"):
            raise _unsupported(
                "structured_outputs.whitespace_pattern", "JSON is always generated compactly."
            )
        return self

    def kinds(self) -> list[str]:
        values = {"json": self.json_, "regex": self.regex, "choice": self.choice,
                  "grammar": self.grammar, "json_object": self.json_object or None}  # fmt: skip
        return [kind for kind, value in values.items() if value is not None]


class Guided(NamedTuple):
    """The one constraint a request sets: the field as the client wrote it (errors name it),
    its kind (json, json_object, regex, choice, grammar) and its value."""

    param: str
    kind: str
    value: Any


class VLLMParams(_Strict):
    """Rules of the vLLM fields both requests declare (each declares its own, where its field
    order lets the checks see the fields before them): neutral values, one constraint."""

    @field_validator(*VLLM_NEUTRAL_VALUES, check_fields=False)
    @classmethod
    def _vllm_not_implemented(cls, value: Any, info: ValidationInfo) -> Any:
        return neutral_only(value, str(info.field_name))

    @field_validator(*GUIDED_FIELDS, "structured_outputs", check_fields=False)
    @classmethod
    def _one_constraint(cls, value: Any, info: ValidationInfo) -> Any:
        """At most one of response_format (json), tools and the guided fields: each would
        be a grammar of its own, and vLLM refuses two as well."""
        if value is None:
            return value
        fmt = info.data.get("response_format")
        if fmt is not None and fmt.type != "text":
            raise PydanticCustomError(
                "invalid_value",
                "{field} cannot be combined with response_format {kind}",
                {"field": info.field_name, "kind": fmt.type},
            )
        if info.data.get("tools") and info.data.get("tool_choice") != "none":
            raise PydanticCustomError(
                "invalid_value",
                "{field} cannot be combined with tools (unless tool_choice is 'none')",
                {"field": info.field_name},
            )
        for other in GUIDED_FIELDS:
            if other != info.field_name and info.data.get(other) is not None:
                raise PydanticCustomError(
                    "invalid_value",
                    "{field} cannot be combined with {other}: set one constraint",
                    {"field": info.field_name, "other": other},
                )
        return value

    @field_validator("guided_whitespace_pattern", check_fields=False)
    @classmethod
    def _compact_json(cls, value: Any, info: ValidationInfo) -> Any:
        fmt = info.data.get("response_format")
        so = info.data.get("structured_outputs")
        json_constrained = (
            info.data.get("guided_json") is not None
            or (fmt is not None and fmt.type != "text")
            or (so is not None and so.kinds()[0] in ("json", "json_object"))
        )
        if value is not None and json_constrained:
            raise _unsupported(str(info.field_name), "JSON is always generated compactly.")
        return value

    @field_validator("best_of", check_fields=False)
    @classmethod
    def _best_of(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and value != (info.data.get("n") or 1):
            raise _unsupported("best_of", "Only best_of equal to n (or 1) is supported.")
        return value

    @property
    def guided(self) -> Guided | None:
        """The constraint of a guided field or structured_outputs (not response_format)."""
        for name in GUIDED_FIELDS:
            value = getattr(self, name, None)
            if value is not None:
                return Guided(name, name.removeprefix("guided_"), value)
        so: StructuredOutputsIn | None = getattr(self, "structured_outputs", None)
        if so is None:
            return None
        kind = so.kinds()[0]
        value = {"json": so.json_, "regex": so.regex, "choice": so.choice,
                 "grammar": so.grammar, "json_object": True}[kind]  # fmt: skip
        return Guided(f"structured_outputs.{kind}", kind, value)

    def vllm_ignored(self) -> list[str]:
        return [f for f in VLLM_IGNORED_FIELDS if getattr(self, f, None) is not None]


def neutral_only(value: Any, name: str) -> Any:
    """``value`` if it is a neutral value of the not-implemented field ``name``, else a 400."""
    if value is None or value in _NEUTRAL_VALUES[name]:
        return value
    raise _unsupported(name, NEUTRAL_HINTS.get(name, ""))


class FunctionDef(_Strict):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = Field(default=None, max_length=MAX_TEXT_CHARS)
    # JSON Schema of the arguments object; absent: any object.
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(_Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Strict):
    name: str = Field(min_length=1, max_length=64)


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(VLLMParams):
    """CreateChatCompletionRequest, as far as glmserve implements it (plus vLLM extensions).

    Unknown top-level fields are kept aside (``model_extra``) and ignored; see the module
    docstring."""

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)

    model: str = Field(max_length=MAX_NAME_CHARS)
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    # uint32 in chat.proto.
    max_tokens: int | None = Field(default=None, ge=1, le=UINT32_MAX)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=UINT32_MAX)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    n: int | None = Field(default=None, ge=1, le=MAX_N)
    # A string or a list of strings; normalized to a list (validated below).
    stop: Annotated[list[str] | None, WithJsonSchema(STOP_SCHEMA)] = None
    seed: int | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormatIn | None = None
    tools: list[ToolDef] | None = Field(default=None, max_length=MAX_TOOLS)
    # false: at most one call per reply.
    parallel_tool_calls: bool | None = None
    # The object first: a bad one's 400 then names its field (tool_choice.function.name).
    tool_choice: NamedToolChoice | Literal["none", "auto", "required"] | None = None
    # vLLM-style extensions; top_k and min_tokens are uint32 in chat.proto.
    top_k: int | None = Field(default=None, ge=-1, le=UINT32_MAX)
    min_p: float | None = Field(default=None, ge=0, le=1)
    min_tokens: int | None = Field(default=None, ge=0, le=UINT32_MAX)
    ignore_eos: bool | None = None
    repetition_penalty: float | None = Field(default=None, ge=MIN_REPETITION_PENALTY, le=2)
    # vLLM's constraints (after response_format and tools: the checks see them), mapped onto
    # the proto's StructuredOutput. guided_json: a JSON Schema, or its JSON text.
    guided_json: dict[str, Any] | Annotated[str, Field(max_length=MAX_TEXT_CHARS)] | None = None
    guided_regex: str | None = Field(default=None, max_length=MAX_TEXT_CHARS)
    guided_choice: list[Annotated[str, Field(max_length=MAX_TEXT_CHARS)]] | None = Field(
        default=None, min_length=1, max_length=MAX_GUIDED_CHOICES
    )
    guided_grammar: str | None = Field(default=None, max_length=MAX_TEXT_CHARS)  # Lark
    structured_outputs: StructuredOutputsIn | None = None
    # vLLM fields that change nothing here (VLLM_IGNORED_FIELDS).
    guided_decoding_backend: Any = None
    length_penalty: Any = None
    guided_whitespace_pattern: Any = None
    # vLLM fields glmserve cannot honour: only their neutral values (vLLM's defaults) pass.
    best_of: int | None = Field(default=None, ge=1, le=MAX_N)
    use_beam_search: bool | None = None
    stop_token_ids: list[int] | None = Field(default=None, max_length=MAX_STOP)
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    bad_words: list[str] | None = Field(default=None, max_length=MAX_STOP)
    allowed_token_ids: list[int] | None = Field(default=None, max_length=MAX_GUIDED_CHOICES)
    truncate_prompt_tokens: int | None = None
    prompt_logprobs: int | None = None
    continue_final_message: bool | None = None
    add_generation_prompt: bool | None = None
    chat_template: str | None = Field(default=None, max_length=MAX_TEXT_CHARS)
    chat_template_kwargs: dict[str, Any] | None = None
    echo: bool | None = None
    # Known OpenAI fields that cannot be ignored: only their neutral values pass.
    functions: Any = None
    function_call: Any = None
    logit_bias: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    web_search_options: Any = None
    # Known OpenAI fields that change nothing here: ignored (and listed). ``user`` is an id
    # string, or an object (Open WebUI sends one for some models).
    user: str | dict[str, Any] | None = None
    # Any value:
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

    @field_validator(*(f for f in _NEUTRAL_VALUES if f not in VLLM_NEUTRAL_VALUES))
    @classmethod
    def _not_implemented(cls, value: Any, info: ValidationInfo) -> Any:
        return neutral_only(value, str(info.field_name))

    @field_validator("user")
    @classmethod
    def _user(cls, value: str | dict[str, Any] | None) -> Any:
        if isinstance(value, str) and len(value) > MAX_NAME_CHARS:
            raise PydanticCustomError(
                "too_long", "user is at most {n} characters", {"n": MAX_NAME_CHARS}
            )
        return value

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _tool_choice(cls, value: Any) -> Any:
        if isinstance(value, dict) or value in (None, "none", "auto", "required"):
            return value
        raise PydanticCustomError(
            "invalid_value",
            "tool_choice must be 'none', 'auto', 'required' or "
            '{"type": "function", "function": {"name": ...}}',
        )

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value and not info.data.get("logprobs"):
            raise PydanticCustomError("invalid_value", "top_logprobs needs logprobs: true")
        return value

    @model_validator(mode="after")
    def _tools_consistent(self) -> ChatCompletionRequest:
        names = [t.function.name for t in self.tools or ()]
        if len(set(names)) != len(names):
            raise PydanticCustomError("invalid_value", "tools: function names must be unique")
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise PydanticCustomError(
                "invalid_value",
                "tool_choice names function {name!r}, which is not in tools",
                {"name": choice.function.name},
            )
        if choice == "required" and not names:
            raise PydanticCustomError("invalid_value", "tool_choice 'required' needs tools")
        if self.calls_tools and self.structured:
            raise PydanticCustomError(
                "invalid_value",
                "response_format json_object/json_schema cannot be combined with tools "
                "(unless tool_choice is 'none')",
            )
        return self

    def ignored_params(self) -> list[str]:
        """Top-level fields that were sent but change nothing: unknown ones and the known
        IGNORED_FIELDS (for the log and the x-glmserve-ignored-params header)."""
        known = [f for f in IGNORED_FIELDS if getattr(self, f) is not None]
        return sorted({*known, *self.vllm_ignored(), *(self.model_extra or {})})

    @property
    def structured(self) -> bool:
        return self.response_format is not None and self.response_format.type != "text"

    @property
    def calls_tools(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"

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
    def logprob_count(self) -> int | None:
        """The proto's ``logprobs``: top alternatives wanted, or None when off."""
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


# ---- responses -------------------------------------------------------------------------------

FinishReason = Literal["stop", "length", "tool_calls"]


class PromptTokensDetails(BaseModel):
    cached_tokens: int  # served from the model server's prefix cache, not computed


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails

    @classmethod
    def of(cls, prompts: Iterable[tuple[int, int]], completion_tokens: int) -> Usage:
        """One call's usage from each prompt's (tokens, cached tokens), counted once however
        many choices share it, and all choices' completion tokens."""
        counted = list(prompts)
        prompt_tokens = sum(tokens for tokens, _ in counted)
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            prompt_tokens_details=PromptTokensDetails(
                cached_tokens=sum(cached for _, cached in counted)
            ),
        )


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(BaseModel):
    """ChatCompletionTokenLogprob: the raw logits' log-softmax (before sampling settings)."""

    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: None = None


class FunctionCall(BaseModel):
    name: str
    arguments: str  # always a JSON string


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


def _without_none(obj: BaseModel, keep: tuple[str, ...] = ()) -> dict[str, Any]:
    """Fields as a dict, leaving out the optional ones that are None (``keep`` stay)."""
    return {
        k: getattr(obj, k)
        for k in type(obj).model_fields
        if getattr(obj, k) is not None or k in keep
    }


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: None = None
    tool_calls: list[ToolCall] | None = None

    @model_serializer(mode="wrap")
    def _compact(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        if self.tool_calls is None:
            data.pop("tool_calls", None)
        return data


class Choice(BaseModel):
    index: int
    message: ResponseMessage
    finish_reason: FinishReason
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(BaseModel):
    """CreateChatCompletionResponse."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class FunctionDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None

    @model_serializer(mode="plain")
    def _compact(self) -> dict[str, Any]:
        return _without_none(self)


class ToolCallDelta(BaseModel):
    """The first delta of a call has id, type and name (arguments ""); then fragments."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionDelta | None = None

    @model_serializer(mode="wrap")
    def _compact(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class Delta(BaseModel):
    """ChatCompletionStreamResponseDelta: absent keys are left out, not sent as null."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None

    @model_serializer(mode="wrap")
    def _compact(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: FinishReason | None = None
    logprobs: ChoiceLogprobs | None = None


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
