"""Per-request state inside the engine thread: output so far, text pipeline, timing."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from ..models.base import TextFilter, Tokenizer
from .detokenizer import IncrementalDetokenizer
from .sampling import RowSampling, TokenLogprobs
from .stop import StopStringMatcher
from .types import EngineObserver, FinishReason, GenerationRequest, StepOutput, Usage

log = logging.getLogger("glmserve.requests")


class Sequence:
    """One request's journey: waiting → prefilling → running → finished (a preempted request
    goes back to waiting, keeps what it generated and recomputes its KV later)."""

    def __init__(
        self,
        request: GenerationRequest,
        emit: Callable[[StepOutput], None],
        tokenizer: Tokenizer,
        reply_filter: TextFilter | None,
        device: torch.device,
        observer: EngineObserver,
    ) -> None:
        self._observer = observer
        self.request = request
        self.params = request.params
        self.prompt_ids = request.prompt_ids
        self.output_ids: list[int] = []
        self.emit = emit
        # Scheduler state (see scheduler.SchedSeq).
        self.state = "waiting"
        self.num_computed = 0  # tokens whose KV this request holds
        self.admitted_order = -1
        self.reserved_blocks = 0
        self.block_hashes: list[bytes] = []  # chain hashes of its full blocks, as known so far
        self.prefix_hit: list[object] = []  # cached blocks to load at admission
        self.cached_blocks = 0  # leading blocks known to be in the prefix cache
        # Prompt tokens the first admission found in the prefix cache (None: not admitted yet;
        # a preempted request's recomputation finding its own blocks does not count).
        self.cached_prompt_tokens: int | None = None
        self.arrival = time.perf_counter()
        self.first_token_at: float | None = None
        self.finished = False
        self.failed = False  # ended by an error of its own (its KV is never cached)
        self._detok = IncrementalDetokenizer(tokenizer)
        self._stop = StopStringMatcher(self.params.stop)
        self._filter = reply_filter
        generator = None
        if not self.params.greedy:
            generator = torch.Generator(device=device)
            if self.params.seed is not None:
                generator.manual_seed(self.params.seed)
            else:
                generator.seed()
        self.sampling = RowSampling(self.params, generator, 0, logprobs=self.params.logprobs)
        self.constraint = request.constraint
        if self.constraint is not None:
            self.sampling.logit_masks.append(self.constraint.mask)
        # Prompt log-probabilities gathered chunk by chunk at prefill, until the first output
        # carries them (None: not asked for, or already sent).
        self.prompt_scores: list[TokenLogprobs] | None = (
            [] if self.params.prompt_logprobs is not None else None
        )

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def tokens(self) -> list[int]:
        """Prompt + generated tokens: what a recomputation after preemption covers."""
        return self.prompt_ids + self.output_ids if self.output_ids else self.prompt_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def scores_prompt(self) -> bool:
        """Prompt log-probabilities are still to be computed: every prompt position must be
        prefilled here (the scheduler serves such a request nothing from the prefix cache)."""
        return self.prompt_scores is not None

    def reset_for_recompute(self) -> None:
        """Preempted: the KV is gone; what was generated (and streamed) and the random
        generator's state stay, so the client sees a pause, never a repeated token."""
        self.num_computed = 0
        self.reserved_blocks = 0
        self.prefix_hit = []
        self.cached_blocks = 0
        if self.prompt_scores is not None:  # preempted mid-prompt: scored again from the start
            self.prompt_scores = []

    def finish_scored(self) -> None:
        """max_tokens 0: the prompt is scored, nothing is generated; one output carries the
        prompt log-probabilities and ends the request (``length``, as OpenAI and vLLM)."""
        now = time.perf_counter()
        self.first_token_at = now
        out = StepOutput(prompt_logprobs=self.prompt_scores)
        self.prompt_scores = None
        self._finish(out, FinishReason.LENGTH, now)
        self.emit(out)

    def append_token(
        self,
        token: int,
        eos_token_ids: frozenset[int],
        logprobs: TokenLogprobs | None = None,
    ) -> bool:
        """Adds a sampled token, emits its text; returns True when the request is finished."""
        now = time.perf_counter()
        if self.constraint is not None:
            self.constraint.accept(token)
        if self.first_token_at is None:
            self.first_token_at = now
        self.output_ids.append(token)
        self.sampling.num_generated = len(self.output_ids)
        finish: FinishReason | None = None
        text = ""
        if token in eos_token_ids and not self.params.ignore_eos:
            finish = FinishReason.STOP
        else:
            text = self._stop.feed(self._detok.push(token))
            if self._stop.stopped:
                finish = FinishReason.STOP
        if finish is None and self.constraint is not None and self.constraint.done:
            finish = FinishReason.STOP  # the grammar is complete: only eos could follow
        if finish is None and len(self.output_ids) >= self.params.max_tokens:
            finish = FinishReason.LENGTH
        if finish is not None and not self._stop.stopped:
            text += self._stop.feed(self._detok.flush())
            text += self._stop.flush()
        if self._filter is not None:
            text = self._filter.feed(text)
            if finish is not None:
                text += self._filter.flush()
        out = StepOutput(text=text, token_ids=[token])
        if logprobs is not None:
            out.logprobs.append(logprobs)
        if self.prompt_scores is not None:  # the first output
            out.prompt_logprobs, self.prompt_scores = self.prompt_scores, None
        if finish is not None:
            self._finish(out, finish, now)
        self.emit(out)
        return finish is not None

    def _finish(self, out: StepOutput, reason: FinishReason, now: float) -> None:
        """Marks the end: usage on the last output, one metrics + log record (with timings)."""
        self.finished = True
        out.finish_reason = reason
        out.usage = Usage(
            len(self.prompt_ids), len(self.output_ids), self.cached_prompt_tokens or 0
        )
        ttft = None if self.first_token_at is None else self.first_token_at - self.arrival
        duration = now - self.arrival
        try:  # a metrics or logging failure must never keep the stream from ending
            self._observer.request_finished(
                reason.value,
                out.usage.prompt_tokens,
                out.usage.completion_tokens,
                ttft,
                duration,
            )
            log.info(
                "request done",
                extra={
                    "fields": {
                        "request_id": self.request_id,
                        "prompt_tokens": out.usage.prompt_tokens,
                        "cached_prompt_tokens": out.usage.cached_prompt_tokens,
                        "completion_tokens": out.usage.completion_tokens,
                        "ttft_ms": None if ttft is None else round(ttft * 1e3, 1),
                        "duration_ms": round(duration * 1e3, 1),
                        "finish_reason": reason.value,
                        **({"error": str(out.error)} if out.error is not None else {}),
                    }
                },
            )
        except Exception:  # noqa: BLE001
            log.exception("recording a finished request failed")

    def abort(self, error: BaseException | None = None) -> None:
        """Ends the stream without a reply (caller gone, or a failure). Idempotent."""
        if self.finished:
            return
        out = StepOutput(error=error)
        self._finish(out, FinishReason.ABORTED, time.perf_counter())
        self.emit(out)

    def truncate(self) -> None:
        """Ends a running request with ``length`` before max_tokens: the KV pool cannot hold
        its next token even with everyone else preempted."""
        if self.finished:
            return
        text = self._stop.feed(self._detok.flush()) + self._stop.flush()
        if self._filter is not None:
            text = self._filter.feed(text) + self._filter.flush()
        out = StepOutput(text=text)
        self._finish(out, FinishReason.LENGTH, time.perf_counter())
        self.emit(out)
