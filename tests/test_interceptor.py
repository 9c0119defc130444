"""The one interceptor: domain errors map through errors.STATUS_OF, unexpected exceptions
become INTERNAL (details in the log only), aborts pass through untouched."""

from __future__ import annotations

import grpc
import pytest

from glmserve.v1 import chat_pb2, chat_pb2_grpc
from model_server.engine.types import QueueFullError
from model_server.interceptors import ExceptionInterceptor


class Flaky(chat_pb2_grpc.ChatServiceServicer):
    """Fails on purpose depending on the request, to exercise the interceptor."""

    async def ListModels(self, request, context):
        raise RuntimeError("boom in a unary handler")

    async def Tokenize(self, request, context):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "messages: bad on purpose")

    async def Chat(self, request, context):
        if request.model == "busy":
            raise QueueFullError("queue full on purpose")
        yield chat_pb2.ChatResponse(text="partial")
        if request.model == "explode":
            raise KeyError("boom mid-stream")
        yield chat_pb2.ChatResponse(text="!", finish_reason=chat_pb2.FINISH_REASON_STOP)


@pytest.fixture
async def stub():
    server = grpc.aio.server(interceptors=[ExceptionInterceptor()])
    chat_pb2_grpc.add_ChatServiceServicer_to_server(Flaky(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        yield chat_pb2_grpc.ChatServiceStub(ch)
    await server.stop(0)


async def test_unary_exception_is_internal(stub, caplog):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ListModels(chat_pb2.ListModelsRequest())
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert "boom" not in err.value.details()  # internals stay in the log
    assert "see the server log" in err.value.details()
    assert "Traceback" in caplog.text or any(r.exc_info for r in caplog.records)
    assert "boom in a unary handler" in caplog.text


async def test_domain_errors_map_through_the_one_table(stub):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in stub.Chat(chat_pb2.ChatRequest(model="busy")):
            pass
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert err.value.details() == "queue full on purpose"


async def test_abort_passes_through(stub):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Tokenize(chat_pb2.TokenizeRequest())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == "messages: bad on purpose"


async def test_stream_exception_is_internal_and_others_keep_working(stub):
    got = []
    with pytest.raises(grpc.aio.AioRpcError) as err:
        request = chat_pb2.ChatRequest(model="explode")
        async for msg in stub.Chat(request, metadata=(("x-request-id", "req-42"),)):
            got.append(msg.text)
    assert got == ["partial"]
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert "req-42" in err.value.details()  # something the client can quote to the operator
    texts = [m.text async for m in stub.Chat(chat_pb2.ChatRequest())]
    assert texts == ["partial", "!"]


async def test_coroutine_streaming_handler_works_through_interceptor():
    """grpc_health's Watch writes with context.write(); the interceptor must not iterate it."""
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.aio.server(interceptors=[ExceptionInterceptor()])
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            call = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest())
            first = await call.read()
            assert first.status == health_pb2.HealthCheckResponse.SERVING
            await servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
            second = await call.read()
            assert second.status == health_pb2.HealthCheckResponse.NOT_SERVING
            call.cancel()
    finally:
        await server.stop(0)
