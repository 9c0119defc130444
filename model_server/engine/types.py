"""Plain data passed between the servicer and the engine thread (no gRPC, no torch)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class FinishReason(str, Enum):
    STOP = "stop"  # end-of-sequence or a stop string
    LENGTH = "length"  # max_tokens or the context window
    ABORTED = "aborted"  # the caller went away (never sent to a client)


@dataclass(frozen=True)
class SamplingParams:
    """Validated per-request generation settings (see chat.proto for meanings and ranges)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_tokens: int = 0
    ignore_eos: bool = False
    seed: int | None = None
    stop: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )


@dataclass
class GenerationRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass
class StepOutput:
    """What one request got from one engine step. ``finish_reason`` is set on the last one."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    # Set on the last output, for logs and metrics.
    time_to_first_token: float | None = None
    duration: float | None = None
    error: BaseException | None = None


class QueueFullError(RuntimeError):
    """The waiting queue is at --max-waiting (→ RESOURCE_EXHAUSTED)."""


class RequestTooLargeError(ValueError):
    """The request could never fit the KV-cache budget (→ INVALID_ARGUMENT)."""


class EngineObserver:
    """Hooks for metrics; the default does nothing (the engine knows nothing of Prometheus)."""

    def queue_changed(self, running: int, waiting: int) -> None: ...

    def step(self, kind: str, batch_size: int, tokens: int) -> None: ...

    def kv_usage(self, reserved: int, budget: int, cached: int) -> None: ...

    def request_finished(
        self,
        finish_reason: str,
        prompt_tokens: int,
        completion_tokens: int,
        ttft: float | None,
        duration: float,
    ) -> None: ...
