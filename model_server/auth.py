"""Who may call: TLS credentials for the port and the shared-token interceptor.

The gRPC port is a private interface (the bridge is the public one). When it crosses a
network, TLS keeps the traffic private (mutual TLS also says who the client is) and the token
keeps other callers out; health stays open so load balancers and probes need neither.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

from .settings import Settings

# Health probes (kubelet, load balancers, the bridge's client-side health checks) carry no token.
OPEN_SERVICE_PREFIX = "/grpc.health.v1."


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials from --tls-cert/--tls-key (and --tls-client-ca: mutual TLS), or None
    for a plaintext port."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    chain = Path(settings.tls_cert).read_bytes()
    key = Path(settings.tls_key).read_bytes()
    client_ca = Path(settings.tls_client_ca).read_bytes() if settings.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def read_token(path: str) -> str:
    """The token in ``path``, surrounding whitespace (the trailing newline) removed."""
    return Path(path).read_text().strip()


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Every call except grpc.health.v1 needs ``authorization: Bearer <token>``; a wrong or
    missing one ends it with UNAUTHENTICATED before the handler runs."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_SERVICE_PREFIX):
            return handler
        if self._authorized(handler_call_details.invocation_metadata or ()):
            return handler
        return _denied(handler)

    def _authorized(self, metadata: Any) -> bool:
        for key, value in metadata:
            if key == "authorization":
                given = value if isinstance(value, bytes) else value.encode()
                # Constant time: the comparison must not tell how much of a guess was right.
                return hmac.compare_digest(given, self._expected)
        return False


async def _deny(_request: Any, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong authorization token")


def _denied(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of ``handler``'s kind that only refuses. A coroutine serves every kind: the
    aio server awaits it, and it aborts before reading or writing anything."""
    serde = (handler.request_deserializer, handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(_deny, *serde)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(_deny, *serde)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(_deny, *serde)
    return grpc.stream_stream_rpc_method_handler(_deny, *serde)
