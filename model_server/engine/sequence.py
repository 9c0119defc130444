"""Per-request state inside the engine thread: output so far, text pipeline, timing."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from ..models.base import TextFilter, Tokenizer
from .detokenizer import IncrementalDetokenizer
from .sampling import RowSampling
from .stop import StopStringMatcher
from .types import EngineObserver, FinishReason, GenerationRequest, StepOutput, Usage

log = logging.getLogger("glmserve.requests")


class Sequence:
    """One request's journey: waiting → prefilling → running → finished."""

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
        self.prefilled = 0  # prompt tokens already in this sequence's cache
        self.arrival = time.perf_counter()
        self.first_token_at: float | None = None
        self.finished = False
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
        self.sampling = RowSampling(self.params, generator, 0)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def reserved_tokens(self) -> int:
        """KV-cache tokens this request may come to hold (admission reserves them)."""
        return len(self.prompt_ids) + self.params.max_tokens

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def append_token(self, token: int, eos_token_ids: frozenset[int]) -> bool:
        """Adds a sampled token, emits its text; returns True when the request is finished."""
        now = time.perf_counter()
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
        if finish is not None:
            self._finish(out, finish, now)
        self.emit(out)
        return finish is not None

    def _finish(self, out: StepOutput, reason: FinishReason, now: float) -> None:
        """Marks the end: usage and timings on the last output, one metrics + log record."""
        self.finished = True
        out.finish_reason = reason
        out.usage = Usage(len(self.prompt_ids), len(self.output_ids))
        ttft = None if self.first_token_at is None else self.first_token_at - self.arrival
        out.time_to_first_token = ttft
        out.duration = now - self.arrival
        self._observer.request_finished(
            reason.value, out.usage.prompt_tokens, out.usage.completion_tokens, ttft, out.duration
        )
        log.info(
            "request done",
            extra={
                "fields": {
                    "request_id": self.request_id,
                    "prompt_tokens": out.usage.prompt_tokens,
                    "completion_tokens": out.usage.completion_tokens,
                    "ttft_ms": None if ttft is None else round(ttft * 1e3, 1),
                    "duration_ms": round(out.duration * 1e3, 1),
                    "finish_reason": reason.value,
                }
            },
        )

    def abort(self, error: BaseException | None = None) -> None:
        """Ends the stream without a reply (caller gone, or an engine failure)."""
        if self.finished:
            return
        out = StepOutput(error=error)
        self._finish(out, FinishReason.ABORTED, time.perf_counter())
        self.emit(out)
