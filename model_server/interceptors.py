"""One place that turns exceptions into statuses: domain errors by ``errors.STATUS_OF``,
anything unexpected into INTERNAL (with a logged traceback), and request bytes that are not a
valid message into INVALID_ARGUMENT (grpc.aio itself would answer UNKNOWN)."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable

import grpc

from .errors import status_of

log = logging.getLogger(__name__)


class _Undecodable:
    """Stands in for a request whose bytes did not parse (handed to the handler wrapper)."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _tolerant(deserializer: Callable[[bytes], object] | None) -> Callable[[bytes], object] | None:
    if deserializer is None:
        return None

    def parse(raw: bytes) -> object:
        try:
            return deserializer(raw)
        except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and friends
            return _Undecodable(exc)

    return parse


async def _refuse_undecodable(request: object, context: grpc.aio.ServicerContext) -> None:
    if isinstance(request, _Undecodable):
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            "the request is not a valid protobuf message for this method "
            "(corrupt wire format, or a string field that is not UTF-8)",
        )


class ExceptionInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every handler: a bug in one request becomes INTERNAL for that request only.

    ``context.abort`` raises an exception that grpc itself handles; those pass through.
    ``open_streams`` counts the generator streams (Chat) not finished yet, which the drain
    waits for (health watches never end by themselves). A stream counts until grpc has sent
    its final status (the context's done callback), not until its generator returns: in
    between, the drain's hard stop would cut a stream whose every message went out, and the
    client would see UNAVAILABLE after a complete reply.
    """

    def __init__(self) -> None:
        self.open_streams = 0

    def _stream_done(self, _context: grpc.aio.ServicerContext) -> None:
        self.open_streams -= 1

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        if handler.unary_unary:
            inner_uu = handler.unary_unary

            async def unary_unary(request, context):  # noqa: ANN001
                await _refuse_undecodable(request, context)
                try:
                    return await inner_uu(request, context)
                except Exception as exc:  # noqa: BLE001
                    await _internal(method, context, exc)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary, _tolerant(handler.request_deserializer), handler.response_serializer
            )
        if handler.unary_stream and inspect.isasyncgenfunction(handler.unary_stream):
            inner_us = handler.unary_stream

            async def unary_stream(request, context):  # noqa: ANN001
                await _refuse_undecodable(request, context)
                # Headers now, before any queueing: a client sees the call accepted at once,
                # and can move it elsewhere when a server stays silent (frozen).
                await context.send_initial_metadata(())
                self.open_streams += 1
                context.add_done_callback(self._stream_done)
                try:
                    async for item in inner_us(request, context):
                        yield item
                except Exception as exc:  # noqa: BLE001
                    await _internal(method, context, exc)

            return grpc.unary_stream_rpc_method_handler(
                unary_stream, _tolerant(handler.request_deserializer), handler.response_serializer
            )
        if handler.unary_stream:
            # Coroutine-style streaming handlers (grpc_health's Watch) write with
            # ``context.write()`` and return nothing; iterating them would be a bug.
            inner_uw = handler.unary_stream

            async def unary_stream_writer(request, context):  # noqa: ANN001
                await _refuse_undecodable(request, context)
                try:
                    await inner_uw(request, context)
                except Exception as exc:  # noqa: BLE001
                    await _internal(method, context, exc)

            return grpc.unary_stream_rpc_method_handler(
                unary_stream_writer,
                _tolerant(handler.request_deserializer),
                handler.response_serializer,
            )
        return handler


async def _internal(method: str, context: grpc.aio.ServicerContext, exc: Exception) -> None:
    if context.code() not in (None, grpc.StatusCode.OK) or _is_abort(exc):
        raise exc
    code = status_of(exc)
    if code is not None:
        await context.abort(code, str(exc))
    request_id = dict(context.invocation_metadata() or ()).get("x-request-id", "")
    log.exception("unhandled error in %s", method, extra={"fields": {"request_id": request_id}})
    # The details stay in the log: clients get a generic message they can quote.
    suffix = f" (request id {request_id})" if request_id else ""
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error{suffix}; see the server log")


def _is_abort(exc: Exception) -> bool:
    # grpc.aio raises AbortError from context.abort(); it must reach grpc untouched.
    return isinstance(exc, grpc.aio.AbortError)
