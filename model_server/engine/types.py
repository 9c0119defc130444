"""Plain data passed between the servicer and the engine thread (no gRPC, no torch)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class FinishReason(StrEnum):
    STOP = "stop"  # end-of-sequence or a stop string
    LENGTH = "length"  # max_tokens or the context window
    ABORTED = "aborted"  # the caller went away, or the request failed: see StepOutput.error


# Below this temperature a request is greedy (as vLLM does): dividing logits by 1e-40 gives
# inf, and the softmax of inf is NaN.
SAMPLING_EPS = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """Validated per-request generation settings (see chat.proto for meanings and ranges)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_tokens: int = 0
    ignore_eos: bool = False
    seed: int | None = None
    stop: tuple[str, ...] = ()
    # False when the client set no max_tokens (max_tokens is then the rest of the context):
    # such a request is refused only when its prompt alone can never fit the KV pool.
    max_tokens_requested: bool = True
    # Log-probabilities of each generated token plus this many top alternatives; None: off.
    logprobs: int | None = None
    # The same for every prompt token after the first (computed at prefill; no prefix-cache
    # reuse). With it max_tokens may be 0: the prompt is scored and nothing is generated.
    prompt_logprobs: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

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
    # Grammar-constrained decoding: a fresh per-request matcher (grammar.GrammarMatcher), made
    # from a grammar compiled before admission; it is advanced on the engine thread only.
    constraint: object | None = None


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int = 0  # of prompt_tokens, found in the prefix cache


@dataclass
class StepOutput:
    """What one request got from one engine step. ``finish_reason`` is set on the last one."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    # With SamplingParams.logprobs: one sampling.TokenLogprobs per id in token_ids.
    logprobs: list = field(default_factory=list)
    # With SamplingParams.prompt_logprobs, on the first output only: one TokenLogprobs per
    # prompt token after the first (the first has none), in order.
    prompt_logprobs: list | None = None
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    error: BaseException | None = None


class QueueFullError(RuntimeError):
    """--max-num-seqs + --max-waiting streams are in flight already (→ RESOURCE_EXHAUSTED)."""


class RequestTooLargeError(ValueError):
    """The request could never fit the KV-cache pool (→ INVALID_ARGUMENT)."""


class RowFailedError(RuntimeError):
    """This request's own logits were not finite: it ends alone (→ INVALID_ARGUMENT, since
    retrying the same input cannot help; the other rows of the batch are untouched)."""


class StepFailedError(RuntimeError):
    """Generation failed for a reason that is not the request's input: a forward step
    (its requests end), a bug in the loop (every request ends), or one request's own
    output handling, e.g. the detokenizer (that request ends) (→ INTERNAL)."""


class EngineDeadError(RuntimeError):
    """The engine thread died or a step ran past --step-timeout-seconds (→ UNAVAILABLE; the
    process exits non-zero so its supervisor restarts it)."""


class EngineObserver:
    """Hooks for metrics; the default does nothing (the engine knows nothing of Prometheus)."""

    def queue_changed(self, running: int, waiting: int, paused: int) -> None:
        """Requests admitted, queued, and paused because their clients are not reading."""

    def step(self, kind: str, batch_size: int, tokens: int) -> None: ...

    def decode_step(self, mode: str) -> None:
        """How a decode step ran: ``ordinary``, ``static`` (CUDA, eager), ``capture`` (a CUDA
        graph captured, then replayed) or ``graph`` (a replayed one; engine/graphs.py)."""

    def kv_usage(
        self, used_blocks: int, total_blocks: int, block_size: int, cached_blocks: int
    ) -> None:
        """Blocks held (lanes with their padding and spare room, prefill caches, cached
        prefix blocks) out of the pool; ``cached_blocks`` of them are prefix-cache copies."""

    def scheduler_counters(
        self, preemptions: int, prefix_queries: int, prefix_hits: int, pauses: int
    ) -> None:
        """Totals since start (monotonic): preemptions, prefix-cache tokens queried / hit,
        pauses of streams whose clients stopped reading."""

    def request_finished(
        self,
        finish_reason: str,
        prompt_tokens: int,
        completion_tokens: int,
        ttft: float | None,
        duration: float,
    ) -> None: ...
