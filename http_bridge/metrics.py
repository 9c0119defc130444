"""The bridge's Prometheus instruments, in one place, on a registry owned by one app.

A registry per app (not the process-global default) lets tests build several apps in one process.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Generation latencies span milliseconds (tiny models) to minutes (long CPU replies).
# perf_counter() at arrival, stored in the ASGI scope for routes (TTFT is measured from it).
START_KEY = "glmserve.start"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class BridgeMetrics:
    """Requests by route and status, latency, TTFT, streams in flight, backend availability."""

    def __init__(
        self,
        backend_available: Callable[[], bool],
        backend_calls: Callable[[], dict[str, tuple[int, bool]]] | None = None,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.requests = Counter(
            "glmserve_bridge_requests",
            "HTTP requests answered, by route template, method and status code.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "glmserve_bridge_request_duration_seconds",
            "Time from request arrival to the last byte of the response (whole stream).",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.ttft = Histogram(
            "glmserve_bridge_time_to_first_token_seconds",
            "Chat completions: time from request arrival to the first generated text.",
            ["stream"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.streams_in_flight = Gauge(
            "glmserve_bridge_streams_in_flight",
            "SSE chat streams currently open.",
            registry=self.registry,
        )
        self.backend_rpc_errors = Counter(
            "glmserve_bridge_backend_errors",
            "Chat RPCs that ended with a gRPC error, by status code.",
            ["code"],
            registry=self.registry,
        )
        self.backend_available = Gauge(
            "glmserve_bridge_backend_available",
            "1 when at least one backend is connected and reports SERVING, else 0.",
            registry=self.registry,
        )
        self.backend_available.set_function(lambda: 1.0 if backend_available() else 0.0)
        if backend_calls is not None:
            self.registry.register(_BackendCollector(backend_calls))


class _BackendCollector(Collector):
    """Per model server (as the bridge found it): its calls in flight and whether it is READY;
    read at scrape time, so servers that left DNS leave the metrics too."""

    def __init__(self, backend_calls: Callable[[], dict[str, tuple[int, bool]]]) -> None:
        self.backend_calls = backend_calls

    def collect(self) -> Iterator[GaugeMetricFamily]:
        calls = GaugeMetricFamily(
            "glmserve_bridge_backend_calls_in_flight",
            "Chat calls this bridge has open on each model server (what least-loaded compares).",
            labels=["backend"],
        )
        ready = GaugeMetricFamily(
            "glmserve_bridge_backend_ready",
            "1 while the model server is connected and SERVING, else 0.",
            labels=["backend"],
        )
        for target, (in_flight, is_ready) in sorted(self.backend_calls().items()):
            calls.add_metric([target], in_flight)
            ready.add_metric([target], 1.0 if is_ready else 0.0)
        yield calls
        yield ready


access_log = logging.getLogger("http_bridge.access")


class MetricsMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware, which would break streaming cancellation).

    The route label is the matched route's template (``/v1/models/{model_id:path}``), or
    ``unmatched`` for unknown paths, so the label set stays bounded. Requests that middleware
    answered before routing (401, 413, CORS preflights) are matched against ``routes`` here
    (the flat list of routes: FastAPI's included routers do not expose theirs to ``matches``).
    """

    def __init__(
        self, app: ASGIApp, metrics: BridgeMetrics, routes: list[BaseRoute] | None = None
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes or []

    def _route_label(self, scope: Scope) -> str:
        route = scope.get("route")
        if route is None:
            path = scope.get("path", "")
            route = next(
                (
                    r
                    for r in self.routes
                    if getattr(r, "path_regex", None) and r.path_regex.match(path)
                ),
                None,
            )
        return getattr(route, "path", None) or "unmatched"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        scope[START_KEY] = start
        status = 500
        done = False

        def finish() -> None:
            nonlocal done
            if done:
                return
            done = True
            route = self._route_label(scope)
            method = scope.get("method", "")
            elapsed = time.perf_counter() - start
            self.metrics.requests.labels(route, method, str(status)).inc()
            self.metrics.latency.labels(route, method).observe(elapsed)
            # One line per API request at info; probes, metrics scrapes and the page at debug.
            level = logging.INFO if route.startswith("/v1") else logging.DEBUG
            if access_log.isEnabledFor(level):
                fields = {
                    "method": method,
                    "path": scope.get("path", ""),
                    "status": status,
                    "duration_ms": round(elapsed * 1e3, 1),
                }
                if request_id:
                    fields["request_id"] = request_id
                access_log.log(level, "request", extra={"fields": fields})

        request_id = ""

        async def send_wrapper(message: Message) -> None:
            nonlocal status, request_id
            if message["type"] == "http.response.start":
                status = int(message["status"])
                for name, value in message.get("headers", []):
                    if name.lower() == b"x-request-id":
                        request_id = value.decode("latin-1")
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                finish()

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            # Client disconnects and crashes end here without a final body message.
            finish()
