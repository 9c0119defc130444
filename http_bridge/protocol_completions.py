"""OpenAI legacy completions wire models (``POST /v1/completions``): request, response, chunk.

Same field rules and extra-field policy as chat (``protocol.py``): known fields strict and
ranged, unknown top-level fields accepted, ignored and named. No chat template is applied: the
prompt goes to the model as it is.
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
)
from pydantic_core import PydanticCustomError

from http_bridge.protocol import (
    INT64_MAX,
    INT64_MIN,
    MAX_GUIDED_CHOICES,
    MAX_N,
    MAX_NAME_CHARS,
    MAX_STOP,
    MAX_STOP_BYTES,
    MAX_TEXT_CHARS,
    MAX_TOP_LOGPROBS,
    MIN_REPETITION_PENALTY,
    STOP_SCHEMA,
    UINT32_MAX,
    StreamOptions,
    StructuredOutputsIn,
    Usage,
    VLLMParams,
    _unsupported,
)

MAX_PROMPTS = 64  # prompts in one request (each runs n choices)
MAX_PROMPT_TOKENS = 1 << 20


class CompletionRequest(VLLMParams):
    """CreateCompletionRequest, as far as glmserve implements it (plus vLLM extensions)."""

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)

    model: str = Field(max_length=MAX_NAME_CHARS)
    # A string, a list of strings, a list of token ids, or a list of such lists (checked below).
    prompt: Any = Field(json_schema_extra={"description": "string | string[] | int[] | int[][]"})
    suffix: Any = None
    # 0 only scores the prompt (with echo and logprobs; checked in routes/completions.py).
    max_tokens: int | None = Field(default=16, ge=0, le=UINT32_MAX)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    n: int | None = Field(default=None, ge=1, le=MAX_N)
    best_of: int | None = Field(default=None, ge=1, le=MAX_N)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool | None = None
    # A string or a list of strings, as in chat; normalized to a list (validated below).
    stop: Annotated[list[str] | None, WithJsonSchema(STOP_SCHEMA)] = None
    seed: int | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: Any = None
    user: str | dict[str, Any] | None = None
    # vLLM-style extensions.
    top_k: int | None = Field(default=None, ge=-1, le=UINT32_MAX)
    min_p: float | None = Field(default=None, ge=0, le=1)
    min_tokens: int | None = Field(default=None, ge=0, le=UINT32_MAX)
    ignore_eos: bool | None = None
    repetition_penalty: float | None = Field(default=None, ge=MIN_REPETITION_PENALTY, le=2)
    # vLLM's constraints and fields, as in chat (protocol.py's VLLMParams has their rules).
    guided_json: dict[str, Any] | Annotated[str, Field(max_length=MAX_TEXT_CHARS)] | None = None
    guided_regex: str | None = Field(default=None, max_length=MAX_TEXT_CHARS)
    guided_choice: list[Annotated[str, Field(max_length=MAX_TEXT_CHARS)]] | None = Field(
        default=None, min_length=1, max_length=MAX_GUIDED_CHOICES
    )
    guided_grammar: str | None = Field(default=None, max_length=MAX_TEXT_CHARS)  # Lark
    structured_outputs: StructuredOutputsIn | None = None
    guided_decoding_backend: Any = None
    length_penalty: Any = None
    guided_whitespace_pattern: Any = None
    use_beam_search: bool | None = None
    stop_token_ids: list[int] | None = Field(default=None, max_length=MAX_STOP)
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    bad_words: list[str] | None = Field(default=None, max_length=MAX_STOP)
    allowed_token_ids: list[int] | None = Field(default=None, max_length=MAX_GUIDED_CHOICES)
    truncate_prompt_tokens: int | None = None
    prompt_logprobs: int | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: Any) -> list[str] | list[list[int]]:
        """Normalized to a list of prompts: all text, or all token-id lists."""
        one_ids = isinstance(value, list) and value and all(_is_id(v) for v in value)
        if isinstance(value, str) or one_ids:
            value = [value]
        if not isinstance(value, list) or not value:
            raise PydanticCustomError(
                "invalid_value", "prompt must be a string, strings, token ids or lists of them"
            )
        if len(value) > MAX_PROMPTS:
            raise PydanticCustomError(
                "too_long", "at most {n} prompts per request", {"n": MAX_PROMPTS}
            )
        if all(isinstance(p, str) for p in value):
            if any(len(p) > MAX_TEXT_CHARS for p in value):
                raise PydanticCustomError("too_long", "a prompt is longer than the limit")
            return value
        if all(isinstance(p, list) and p and all(_is_id(t) for t in p) for p in value):
            if any(len(p) > MAX_PROMPT_TOKENS for p in value):
                raise PydanticCustomError("too_long", "a prompt has too many tokens")
            return value
        raise PydanticCustomError(
            "invalid_value",
            "prompt must be a string, a list of strings, a list of token ids (integers >= 0) "
            "or a list of such lists, not a mix",
        )

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: Any) -> Any:
        if value is None or value == "":
            return None
        raise _unsupported("suffix", "Insertion (fill-in-the-middle) is not available.")

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, value: Any) -> Any:
        if value is None or value == {}:
            return None
        raise _unsupported("logit_bias")

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
        if any(not s or len(s.encode()) > MAX_STOP_BYTES for s in items):
            raise PydanticCustomError(
                "stop_length", "each stop must be 1 to {n} UTF-8 bytes", {"n": MAX_STOP_BYTES}
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

    def ignored_params(self) -> list[str]:
        known = [f for f in ("user",) if getattr(self, f) is not None]
        return sorted({*known, *self.vllm_ignored(), *(self.model_extra or {})})

    # What routes/chat.py's sampling_requests reads.
    @property
    def choices(self) -> int:
        return self.n or 1

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens

    @property
    def stop_list(self) -> list[str]:
        return self.stop or []

    @property
    def logprob_count(self) -> int | None:
        return self.logprobs

    @property
    def scores_prompt(self) -> bool:
        """echo with logprobs: the prompt's tokens get log-probabilities too."""
        return bool(self.echo) and self.logprobs is not None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= UINT32_MAX


class CompletionLogprobs(BaseModel):
    """The legacy shape: parallel lists, ``top_logprobs`` as token → logprob maps. With echo,
    the prompt's first token has ``null`` in ``token_logprobs`` and ``top_logprobs`` (nothing
    precedes it), as OpenAI and vLLM send it."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None


class Completion(BaseModel):
    """CreateCompletionResponse (also each stream chunk, as the spec has it)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
