"""The bridge's one gRPC channel to the model server(s).

Resilience comes from grpc itself, not from loops of ours:
- ``round_robin`` over all targets, with client-side health checking (``healthCheckConfig``,
  the ``grpc.health.v1`` Watch stream): a backend that is down, loading or draining gets no calls;
- a retry policy for ``UNAVAILABLE`` only. gRPC commits a call once the server answers
  (headers or a message), so a retry can only happen before any token was produced, and the
  round-robin picker sends it to the next healthy backend;
- channel reconnect with a short maximum backoff, so a restarted backend is used again within
  seconds; and ``wait_for_ready=False``, so while nothing is up a call fails fast (→ 503).

Security (``--backend-ca``/``--backend-cert``/``--backend-key``, ``--backend-token-file``): TLS
is a property of the channel, so the health checks run over it too. The token goes as per-call
metadata from the few methods below, every RPC the bridge makes: unlike call credentials it
also works on a plaintext channel, and unlike a client interceptor it leaves the call objects
the routes handle as grpc makes them.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from glmserve.v1 import chat_pb2, chat_pb2_grpc
from http_bridge.settings import Settings

log = logging.getLogger("http_bridge.backend")

SERVICE = "glmserve.v1.ChatService"
# Short RPCs the bridge makes on its own behalf (ListModels, health) never wait this long.
CONTROL_TIMEOUT = 5.0
MODEL_CACHE_SECONDS = 30.0


def channel_target(targets: Sequence[str]) -> str:
    """One grpc target for all backends.

    A single target is used as given (``host:port``, ``dns:///name:port``, ``unix:...``); a DNS
    name that resolves to several addresses is load-balanced too. Several targets must be IP
    literals (or ``localhost``) and become one ``ipv4:``/``ipv6:`` address list, which is the
    form grpc's resolver offers for a static set of addresses.
    """
    targets = [t.strip() for t in targets if t.strip()]
    if not targets:
        raise ValueError("no backend target given")
    if len(targets) == 1:
        return targets[0]
    v4: list[str] = []
    v6: list[str] = []
    for target in targets:
        host, sep, port = target.rpartition(":")
        if not sep or not port.isdigit() or not host:
            raise ValueError(f"backend {target!r}: expected host:port")
        if host == "localhost":
            host = "127.0.0.1"
        bracketed = host.startswith("[") and host.endswith("]")
        try:
            ip = ipaddress.ip_address(host[1:-1] if bracketed else host)
        except ValueError:
            raise ValueError(
                f"backend {target!r}: with several --backend targets each must be an IP address "
                "(or localhost); for DNS-based discovery pass one name that resolves to all "
                "backends, e.g. dns:///model-server:50051"
            ) from None
        if ip.version == 4:
            v4.append(f"{ip}:{port}")
        else:
            v6.append(f"[{ip}]:{port}")
    if v4 and v6:
        raise ValueError("--backend targets must be all IPv4 or all IPv6")
    return "ipv4:" + ",".join(v4) if v4 else "ipv6:" + ",".join(v6)


def service_config(settings: Settings) -> dict:
    """round_robin + client-side health checks + retry on UNAVAILABLE (see module docstring)."""
    attempts = min(5, max(2, len(settings.backends) + 1))
    return {
        "loadBalancingConfig": [{"round_robin": {}}],
        "healthCheckConfig": {"serviceName": settings.health_service},
        "methodConfig": [
            {
                "name": [{"service": SERVICE}],
                "retryPolicy": {
                    "maxAttempts": attempts,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "0.5s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ],
        # Stop retrying when most calls fail (every backend down): no retry storms.
        "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.5},
    }


def channel_options(settings: Settings) -> list[tuple[str, int | str]]:
    backoff_ms = int(settings.max_reconnect_backoff_seconds * 1000)
    options: list[tuple[str, int | str]] = [
        ("grpc.service_config", json.dumps(service_config(settings))),
        ("grpc.enable_retries", 1),
        ("grpc.initial_reconnect_backoff_ms", min(250, backoff_ms)),
        ("grpc.min_reconnect_backoff_ms", min(250, backoff_ms)),
        ("grpc.max_reconnect_backoff_ms", backoff_ms),
        ("grpc.max_receive_message_length", 16 * 1024 * 1024),
        ("grpc.max_send_message_length", 16 * 1024 * 1024),
    ]
    if settings.keepalive_seconds > 0:
        options += [
            ("grpc.keepalive_time_ms", int(settings.keepalive_seconds * 1000)),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.http2.max_pings_without_data", 0),
        ]
    return options


def _read(flag: str, path: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise ValueError(f"{flag}: cannot read {path}: {err.strerror}") from None
    if not data.strip():
        raise ValueError(f"{flag}: {path} is empty")
    return data


def channel_credentials(settings: Settings) -> grpc.ChannelCredentials | None:
    """TLS from --backend-ca (plus --backend-cert/--backend-key: mutual TLS), else None for a
    plaintext channel. A bad combination or file is a ValueError (the CLI's clean exit)."""
    s = settings
    if (s.backend_cert is None) != (s.backend_key is None):
        raise ValueError("--backend-cert and --backend-key go together")
    if s.backend_ca is None:
        if s.backend_cert is not None:
            raise ValueError("--backend-cert needs --backend-ca")
        return None
    root = _read("--backend-ca", s.backend_ca)
    if s.backend_cert is None or s.backend_key is None:
        return grpc.ssl_channel_credentials(root)
    key = _read("--backend-key", s.backend_key)
    return grpc.ssl_channel_credentials(root, key, _read("--backend-cert", s.backend_cert))


def read_token(path: str) -> str:
    """The --backend-token-file token, surrounding whitespace (the trailing newline) removed."""
    return _read("--backend-token-file", path).decode().strip()


class Backend:
    """Owns the channel (opened in the app's lifespan) and the few RPCs the routes need."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.target = channel_target(settings.backends)
        self._channel: grpc.aio.Channel | None = None
        self._stub: chat_pb2_grpc.ChatServiceStub | None = None
        self._health: health_pb2_grpc.HealthStub | None = None
        self._models: list[chat_pb2.ModelInfo] = []
        self._models_at = 0.0
        # Read now, so a bad file stops the bridge at start (create_app), not at the first call.
        self._credentials = channel_credentials(settings)
        token_file = settings.backend_token_file
        self._auth = (("authorization", f"Bearer {read_token(token_file)}"),) if token_file else ()

    def _metadata(self, request_id: str = "") -> tuple[tuple[str, str], ...]:
        """Every call's metadata: the token, if any, and the request id, if any."""
        return self._auth + ((("x-request-id", request_id),) if request_id else ())

    async def start(self) -> None:
        """Create the channel (needs the running loop) and start connecting right away."""
        options = channel_options(self.settings)
        if self._credentials is None:
            self._channel = grpc.aio.insecure_channel(self.target, options=options)
        else:
            self._channel = grpc.aio.secure_channel(self.target, self._credentials, options)
        self._stub = chat_pb2_grpc.ChatServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._channel.get_state(try_to_connect=True)
        log.info("backend channel to %s", self.target)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close(grace=None)
            self._channel = None

    @property
    def stub(self) -> chat_pb2_grpc.ChatServiceStub:
        if self._stub is None:
            raise RuntimeError("Backend.start() was not called")
        return self._stub

    def available(self) -> bool:
        """True when the channel has a healthy backend (health checks gate READY)."""
        if self._channel is None:
            return False
        state = self._channel.get_state(try_to_connect=True)
        return state == grpc.ChannelConnectivity.READY

    def chat(self, request: chat_pb2.ChatRequest, request_id: str) -> grpc.aio.UnaryStreamCall:
        """Open one Chat stream; the deadline is --request-timeout for the whole stream."""
        return self.stub.Chat(
            request,
            timeout=self.settings.request_timeout,
            metadata=self._metadata(request_id),
            wait_for_ready=False,
        )

    async def list_models(self, request_id: str = "") -> list[chat_pb2.ModelInfo]:
        response = await self.stub.ListModels(
            chat_pb2.ListModelsRequest(),
            timeout=min(CONTROL_TIMEOUT, self.settings.request_timeout),
            metadata=self._metadata(request_id) or None,
            wait_for_ready=False,
        )
        self._models = list(response.models)
        self._models_at = time.monotonic()
        return self._models

    async def served_model_id(self, requested: str) -> str:
        """The id to report in responses: the served id that ``requested`` refers to."""
        if requested and any(m.id == requested for m in self._models):
            return requested
        if time.monotonic() - self._models_at > MODEL_CACHE_SECONDS or not self._models:
            try:
                await self.list_models()
            except grpc.aio.AioRpcError:
                return requested
        if not requested and self._models:
            return self._models[0].id
        return requested

    async def check_health(self) -> bool:
        """One grpc.health.v1 Check through the balanced channel: SERVING somewhere?"""
        if self._health is None:
            return False
        try:
            response = await self._health.Check(
                health_pb2.HealthCheckRequest(service=self.settings.health_service),
                timeout=min(2.0, self.settings.request_timeout),
                metadata=self._metadata() or None,
                wait_for_ready=False,
            )
        except (TimeoutError, grpc.aio.AioRpcError) as err:
            log.debug("health check failed: %s", err)
            return False
        return response.status == health_pb2.HealthCheckResponse.SERVING
