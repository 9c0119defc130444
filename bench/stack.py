"""A model server (with metrics) and a bridge in front of it, for one benchmark run.

Built on the process harness the tests use (:mod:`glmserve.testing`): the installed console
scripts (or ``python -m`` from a bare checkout) on free loopback ports, logs in temporary
files. :class:`Stack` is a context manager: leaving it (normally, on an error or on Ctrl-C)
stops both, SIGTERM first and SIGKILL after a grace period.
"""

from __future__ import annotations

import os
import re
import time
from types import TracebackType

from glmserve.testing import BIN, Proc, http_status, spawn_bridge, spawn_model_server

__all__ = ["BIN", "Stack"]


class Stack:
    """A model server (with metrics) and, unless ``bridge=False``, a bridge in front of it."""

    def __init__(
        self,
        model: str | None = None,
        server_args: tuple[str, ...] = (),
        bridge: bool = True,
        bridge_args: tuple[str, ...] = (),
    ) -> None:
        self.model = model
        self.server_args = server_args
        self.with_bridge = bridge
        self.bridge_args = bridge_args
        self.server: Proc | None = None
        self.bridge: Proc | None = None
        self.load_seconds: float | None = None

    @property
    def grpc_target(self) -> str:
        assert self.server is not None
        return self.server.target

    @property
    def metrics_port(self) -> int | None:
        return self.server.metrics_port if self.server else None

    @property
    def base_url(self) -> str:
        assert self.bridge is not None
        return self.bridge.url + "/v1"

    def start(self, timeout: float = 600.0) -> None:
        """Starts the server and waits until health is SERVING, then the bridge (unless
        ``bridge=False``) and waits until it routes to the server (/v1/models is 200)."""
        t0 = time.perf_counter()
        self.server = spawn_model_server(self.model, *self.server_args, timeout=timeout)
        self.load_seconds = time.perf_counter() - t0
        if not self.with_bridge:
            return
        args = ("--backend", self.server.target, "--no-ui", "--log-level", "warning")
        bridge = self.bridge = spawn_bridge(*args, *self.bridge_args)
        bridge.wait_ready(
            lambda: http_status(bridge.url + "/v1/models") == 200, 60, "routing to the server"
        )

    def stop(self) -> None:
        """Bridge first (no new traffic), then the server; safe to call twice."""
        for proc in (self.bridge, self.server):
            if proc is not None:
                proc.stop()

    @property
    def pids(self) -> list[int]:
        """The server's and the bridge's pids, and this process's (the load generator)."""
        return [p.pid for p in (self.server, self.bridge) if p is not None] + [os.getpid()]

    def server_rss(self) -> int:
        """Resident set size of the model-server process, bytes."""
        import psutil

        assert self.server is not None
        return int(psutil.Process(self.server.pid).memory_info().rss)

    def metrics(self) -> dict[str, float]:
        """The server's Prometheus samples as {name with sorted labels: value}."""
        assert self.server is not None
        return self.server.metrics()

    def kv_cache_tokens(self) -> int | None:
        """The KV budget the server chose, from its "model ready" log line (best effort)."""
        if self.server is None:
            return None
        match = re.search(r"kv_cache_tokens[=\":\s]+(\d+)", self.server.log_tail(200_000))
        return int(match.group(1)) if match else None

    def __enter__(self) -> Stack:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
