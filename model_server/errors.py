"""One table: the model server's domain exceptions → gRPC status codes.

Handlers raise these; ``interceptors.ExceptionInterceptor`` turns them into their status with
the exception's message (no traceback: they are the client's or the load's doing). Anything
not in the table is a bug: ``INTERNAL``, with the traceback in the log.
"""

from __future__ import annotations

import grpc

from .engine.types import (
    EngineDeadError,
    QueueFullError,
    RequestTooLargeError,
    RowFailedError,
    StepFailedError,
)
from .models.base import ConversationError
from .validation import InvalidArgument

STATUS_OF: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),  # a bad field, named
    (ConversationError, grpc.StatusCode.INVALID_ARGUMENT),  # the chat format cannot say it
    (RequestTooLargeError, grpc.StatusCode.INVALID_ARGUMENT),  # never fits the KV pool
    # The request's own logits went NaN: a retry of the same input cannot help (not a 5xx).
    (RowFailedError, grpc.StatusCode.INVALID_ARGUMENT),
    (QueueFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),  # back off and retry
    (EngineDeadError, grpc.StatusCode.UNAVAILABLE),  # the process restarts: retry elsewhere
    (StepFailedError, grpc.StatusCode.INTERNAL),  # a forward failed (logged by the engine)
)


def status_of(exc: BaseException) -> grpc.StatusCode | None:
    """The status for a domain exception, or None for an unexpected one."""
    for kind, code in STATUS_OF:
        if isinstance(exc, kind):
            return code
    return None
