"""The bridge's channels to the model servers, and where each call goes.

One grpc channel per model-server address (``Endpoint``), so the bridge, not grpc, picks the
backend of every call:
- addresses come from targets.py; DNS names are resolved again every
  ``--backend-resolve-seconds``: a pod that starts later gets traffic, and one that leaves DNS
  takes no new calls and is closed once its calls are done (its own drain finishes them);
- each channel health-checks its server (``healthCheckConfig``, the ``grpc.health.v1`` Watch
  stream), so it is READY only while that server reports SERVING (not loading, not draining);
- ``--backend-routing least-loaded`` (default) sends a call to the READY backend with the
  fewest of this bridge's calls in flight, ``round-robin`` to the next one. With skewed
  request lengths round robin piles long requests onto one server (bench/routing.py);
- a call moves to another backend until its first message (``RoutedCall``): a server that does
  not accept it (send its response headers, which it does before queueing) within
  ``--backend-accept-timeout`` is frozen or cut off, one that answers UNAVAILABLE is draining
  or gone. With no other backend to go to, an UNAVAILABLE call is tried once more on the same
  one (a stream that met the server's GOAWAY at ``--max-connection-age``: gRPC's own
  transparent retry, which would redo it, is off here). After a message it stays: a retry
  could generate twice;
- keepalive pings close the connection to a server that stops answering (SIGSTOP, a dead
  host), so its channel leaves READY; reconnects back off at most
  ``max_reconnect_backoff_seconds``; ``wait_for_ready=False``, so with nothing up a call fails
  fast (503).

Security (``--backend-ca``/``--backend-cert``/``--backend-key``, ``--backend-token-file``): TLS
is a property of the channels, so the health checks run over it too; an address found under a
DNS name is checked against that name's certificate. The token goes as per-call metadata from
the few methods below, every RPC the bridge makes: unlike call credentials it also works on a
plaintext channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from glmserve.v1 import chat_pb2, chat_pb2_grpc
from http_bridge.settings import Settings
from http_bridge.targets import Address, Source, parse_target, resolve

log = logging.getLogger("http_bridge.backend")

SERVICE = "glmserve.v1.ChatService"
# Short RPCs the bridge makes on its own behalf (ListModels, health) never wait this long.
CONTROL_TIMEOUT = 5.0
MODEL_CACHE_SECONDS = 30.0
# One resolution of one --backend name, at most (a failure keeps the addresses it had).
RESOLVE_TIMEOUT = 5.0
# How long a silent connection may take to answer a keepalive ping before it is closed.
KEEPALIVE_TIMEOUT_MS = 5_000
_STATE_RANK = {
    grpc.ChannelConnectivity.READY: 0,
    grpc.ChannelConnectivity.IDLE: 1,
    grpc.ChannelConnectivity.CONNECTING: 1,
}


def parse_targets(targets: Sequence[str]) -> list[Source]:
    """Every ``--backend`` value parsed (ValueError on the first bad one)."""
    sources = [parse_target(t) for t in targets if t.strip()]
    if not sources:
        raise ValueError("no backend target given")
    return sources


def service_config(settings: Settings) -> dict:
    """One address per channel: round_robin over it only for its client-side health checks."""
    return {
        "loadBalancingConfig": [{"round_robin": {}}],
        "healthCheckConfig": {"serviceName": settings.health_service},
    }


# A stream's HTTP/2 receive window: ~25 plain token messages, or ~1 with 20 top logprobs (each
# KiB of it is a token the model server generates for a client that stopped reading). Plenty
# for a token stream: a window update per KiB read, a few MB/s per stream on loopback; a
# megabyte-sized message (prompt logprobs of a long prompt) takes ~1,000 round trips.
STREAM_WINDOW_BYTES = 1024


def channel_options(settings: Settings) -> list[tuple[str, int | str]]:
    backoff_ms = int(settings.max_reconnect_backoff_seconds * 1000)
    options: list[tuple[str, int | str]] = [
        ("grpc.service_config", json.dumps(service_config(settings))),
        # Moving a call to another backend is ours (RoutedCall): grpc retrying on the same
        # address would only delay it.
        ("grpc.enable_retries", 0),
        ("grpc.initial_reconnect_backoff_ms", min(250, backoff_ms)),
        ("grpc.min_reconnect_backoff_ms", min(250, backoff_ms)),
        ("grpc.max_reconnect_backoff_ms", backoff_ms),
        ("grpc.max_receive_message_length", 16 * 1024 * 1024),
        ("grpc.max_send_message_length", 16 * 1024 * 1024),
        # Backpressure reaches the model server: a stream's receive window stays small (with
        # BDP probing it grows to megabytes, which a client that stops reading lets pile up
        # here, generated for nothing) so the server's writes wait and it pauses the request.
        ("grpc.http2.bdp_probe", 0),
        ("grpc.http2.lookahead_bytes", STREAM_WINDOW_BYTES),
    ]
    if settings.keepalive_seconds > 0:
        # The health Watch keeps a call open, so pings flow on idle channels too. The model
        # server accepts a ping every 5 s at most (min_ping_interval_without_data).
        options += [
            ("grpc.keepalive_time_ms", int(settings.keepalive_seconds * 1000)),
            ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
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


def unavailable(details: str) -> grpc.aio.AioRpcError:
    """An UNAVAILABLE error made here (no backend to send to), read like a backend's."""
    return grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), details
    )


class Endpoint:
    """One model server: its channel, stubs, and this bridge's calls in flight there."""

    def __init__(
        self,
        address: Address,
        settings: Settings,
        credentials: grpc.ChannelCredentials | None,
    ) -> None:
        self.address = address
        options = channel_options(settings)
        if credentials is None:
            self.channel = grpc.aio.insecure_channel(address.target, options=options)
        else:
            if address.tls_name:
                options.append(("grpc.ssl_target_name_override", address.tls_name))
            self.channel = grpc.aio.secure_channel(address.target, credentials, options)
        self.chat = chat_pb2_grpc.ChatServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.in_flight = 0
        self.retiring = False  # gone from DNS: no new calls, closed when in_flight is 0
        self.closed = False
        self.channel.get_state(try_to_connect=True)

    @property
    def target(self) -> str:
        return self.address.target

    def rank(self) -> int:
        """0 READY (connected, SERVING), 1 on its way, 2 failing."""
        return _STATE_RANK.get(self.channel.get_state(try_to_connect=True), 2)

    def track(self, call: grpc.aio.Call) -> None:
        self.in_flight += 1
        call.add_done_callback(self._done)

    def _done(self, call: grpc.aio.Call) -> None:
        self.in_flight -= 1

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            await self.channel.close(grace=None)


class RoutedCall:
    """One Chat stream. Until its first message it may move to another backend (see the
    module docstring); each backend is tried at most once."""

    def __init__(
        self,
        backend: Backend,
        request: chat_pb2.ChatRequest,
        metadata: tuple[tuple[str, str], ...],
    ) -> None:
        self._backend = backend
        self._request = request
        self._metadata = metadata
        self._deadline = time.monotonic() + backend.settings.request_timeout
        self._call: grpc.aio.UnaryStreamCall | None = None
        self._tried: list[Endpoint] = []
        self._error: grpc.aio.AioRpcError | None = None
        self._received = False
        self._cancelled = False
        self._retried_same = False
        self.target = ""  # the backend now serving it (logs)

    def cancel(self) -> None:
        self._cancelled = True
        if self._call is not None:
            self._call.cancel()

    async def read(self) -> chat_pb2.ChatResponse | object:
        """The next message, or ``grpc.aio.EOF``; raises the call's AioRpcError."""
        while True:
            if self._call is None:
                await self._place()
            assert self._call is not None
            try:
                msg = await self._call.read()
            except grpc.aio.AioRpcError as err:
                if self._received or self._cancelled or err.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                log.info("moving a call off %s: %s", self.target, err.details())
                if not (self._retried_same or self._backend.others(self._tried)):
                    # Nowhere else to go: once more on the same backend, over a fresh
                    # connection (a stream started on a connection the server was closing,
                    # GOAWAY at --max-connection-age, succeeds there; a draining server
                    # refuses again, and the call fails as before).
                    self._retried_same = True
                    self._tried.pop()
                self._error, self._call = err, None
                continue
            if msg is not grpc.aio.EOF:
                self._received = True
            return msg

    async def _place(self) -> None:
        accept_timeout = self._backend.settings.backend_accept_timeout
        while True:
            endpoint = self._backend.pick(exclude=self._tried)
            remaining = self._deadline - time.monotonic()
            if endpoint is None or remaining <= 0:
                raise self._error or unavailable("no model server is available")
            self._tried.append(endpoint)
            # With nowhere else to go, a slow accept is waited for (the idle timeout bounds it).
            timeout = accept_timeout if self._backend.others(self._tried) else None
            call = endpoint.chat.Chat(
                self._request, timeout=remaining, metadata=self._metadata, wait_for_ready=False
            )
            endpoint.track(call)
            self._call, self.target = call, endpoint.target
            try:
                async with asyncio.timeout(timeout):
                    await call.initial_metadata()  # also returns when the call ends
                return
            except TimeoutError:
                call.cancel()
                self._call = None
                log.warning(
                    "%s did not accept a call within %g s (frozen?); trying another backend",
                    endpoint.target,
                    accept_timeout,
                )
                self._error = unavailable(
                    f"no model server accepted the call in {accept_timeout:g} s"
                )


class Backend:
    """Owns the endpoints (opened in the app's lifespan), picks one per call, and makes the
    few RPCs the routes need."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.sources = parse_targets(settings.backends)
        self.target = ",".join(s.text for s in self.sources)  # for logs
        self._endpoints: dict[str, Endpoint] = {}
        self._resolved: dict[Source, list[Address]] = {}
        self._turn = 0
        self._refresher: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()
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
        """Open the fixed endpoints, resolve the names once, and keep resolving them."""
        await self.refresh()
        if any(s.resolved for s in self.sources):
            self._refresher = asyncio.create_task(self._keep_resolving())
        log.info("backends: %s", ", ".join(self._endpoints) or "none resolved yet")

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
        await asyncio.gather(*(e.close() for e in self._endpoints.values()))
        await asyncio.gather(*self._closing, return_exceptions=True)
        self._endpoints.clear()

    async def _keep_resolving(self) -> None:
        while True:
            await asyncio.sleep(self.settings.backend_resolve_seconds)
            await self.refresh()

    async def refresh(self) -> None:
        """Resolve every name again; a failure or an empty answer keeps what it had."""
        for source in self.sources:
            try:
                # A hung system resolver must not hold the bridge's start or the next round.
                found = await asyncio.wait_for(resolve(source), RESOLVE_TIMEOUT)
            except (OSError, TimeoutError) as err:
                log.warning("cannot resolve backend %s: %s", source.text, err or "timed out")
                continue
            if found:
                self._resolved[source] = found
            elif source not in self._resolved:
                log.warning("backend %s resolves to no address", source.text)
        self._sync()

    def _sync(self) -> None:
        wanted = {a.target: a for found in self._resolved.values() for a in found}
        for target, address in wanted.items():
            endpoint = self._endpoints.get(target)
            if endpoint is None or endpoint.closed:
                self._endpoints[target] = Endpoint(address, self.settings, self._credentials)
                log.info("backend %s added", target)
            elif endpoint.retiring:
                endpoint.retiring = False
        for target, endpoint in list(self._endpoints.items()):
            if target not in wanted and not endpoint.retiring:
                endpoint.retiring = True
                log.info(
                    "backend %s left DNS; closing it after its %d calls", target, endpoint.in_flight
                )
            if endpoint.retiring and endpoint.in_flight == 0:
                del self._endpoints[target]
                task = asyncio.get_running_loop().create_task(endpoint.close())
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)

    def endpoints(self) -> list[Endpoint]:
        """The endpoints that take new calls."""
        return [e for e in self._endpoints.values() if not e.retiring]

    def others(self, exclude: Sequence[Endpoint]) -> bool:
        """Whether some endpoint outside ``exclude`` takes calls."""
        return any(e not in exclude for e in self.endpoints())

    def pick(self, exclude: Sequence[Endpoint] = ()) -> Endpoint | None:
        """Where the next call goes: among the best-connected endpoints (READY first), the one
        with the fewest calls in flight (least-loaded) or the next in turn (round-robin); ties
        go round in turn, so equal loads spread."""
        ranked = [(e.rank(), e) for e in self.endpoints() if e not in exclude]
        if not ranked:
            return None
        best = min(rank for rank, _ in ranked)
        pool = [e for rank, e in ranked if rank == best]
        if self.settings.backend_routing == "least-loaded":
            low = min(e.in_flight for e in pool)
            pool = [e for e in pool if e.in_flight == low]
        self._turn += 1
        return pool[self._turn % len(pool)]

    def calls(self) -> dict[str, tuple[int, bool]]:
        """Each endpoint taking calls: (this bridge's calls in flight there, READY?)."""
        return {e.target: (e.in_flight, e.rank() == 0) for e in self.endpoints()}

    def available(self) -> bool:
        """True when some backend is connected and SERVING (health checks gate READY)."""
        return any(e.rank() == 0 for e in self.endpoints())

    def chat(self, request: chat_pb2.ChatRequest, request_id: str) -> RoutedCall:
        """One Chat stream; the deadline is --request-timeout for the whole stream."""
        return RoutedCall(self, request, self._metadata(request_id))

    async def list_models(self, request_id: str = "") -> list[chat_pb2.ModelInfo]:
        endpoint = self.pick()
        if endpoint is None:
            raise unavailable("no model server is available")
        response = await endpoint.chat.ListModels(
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
        """One grpc.health.v1 Check on the backend a call would go to: SERVING?"""
        endpoint = self.pick()
        if endpoint is None:
            return False
        try:
            response = await endpoint.health.Check(
                health_pb2.HealthCheckRequest(service=self.settings.health_service),
                timeout=min(2.0, self.settings.request_timeout),
                metadata=self._metadata() or None,
                wait_for_ready=False,
            )
        except (TimeoutError, grpc.aio.AioRpcError) as err:
            log.debug("health check failed: %s", err)
            return False
        return response.status == health_pb2.HealthCheckResponse.SERVING
