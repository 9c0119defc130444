"""Start and stop the real processes under test: ``model-server`` and ``http-bridge``.

Both are the installed console scripts next to this interpreter, on free loopback ports, with
their output in temporary log files. :class:`Stack` is a context manager: leaving it (normally,
on an error or on Ctrl-C) stops both, SIGTERM first and SIGKILL after a grace period.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

BIN = Path(sys.executable).parent


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Process:
    """One spawned server: its Popen, port and log file."""

    def __init__(self, name: str, cmd: list[str], port: int) -> None:
        self.name = name
        self.cmd = cmd
        self.port = port
        fd, path = tempfile.mkstemp(prefix=f"glmserve-bench-{name}-", suffix=".log")
        os.close(fd)
        self.log = Path(path)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (the servers drain), then SIGKILL after ``timeout`` seconds."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def fail(self, why: str) -> RuntimeError:
        self.stop(timeout=5)
        return RuntimeError(f"{self.name}: {why}; log tail:\n{self.log_tail()}")


def _serving(target: str) -> bool:
    try:
        with grpc.insecure_channel(target) as ch:
            status = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(), timeout=1.0
            )
        return status.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


class Stack:
    """A model server (with metrics) and a bridge in front of it."""

    def __init__(
        self, model: str | None = None, server_args: tuple[str, ...] = (), bridge: bool = True
    ) -> None:
        self.model = model
        self.server_args = server_args
        self.with_bridge = bridge
        self.server: Process | None = None
        self.bridge: Process | None = None
        self.grpc_port = free_port()
        self.metrics_port = free_port()
        self.http_port = free_port()
        self.load_seconds: float | None = None

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/v1"

    def start(self, timeout: float = 600.0) -> None:
        """Starts both processes (the bridge unless ``bridge=False``) and waits until health is
        SERVING and the bridge answers."""
        script = BIN / "model-server"
        # Not installed (a checkout run with PYTHONPATH, as on a device machine): the module.
        cmd = [str(script)] if script.exists() else [sys.executable, "-m", "model_server.cli"]
        cmd += ["--port", str(self.grpc_port)]
        cmd += ["--metrics-port", str(self.metrics_port), *self.server_args]
        if self.model:
            cmd += ["--model", self.model]
        t0 = time.perf_counter()
        self.server = Process("model-server", cmd, self.grpc_port)
        deadline = time.monotonic() + timeout
        while not _serving(self.grpc_target):
            if not self.server.alive():
                raise self.server.fail(f"exited with {self.server.proc.returncode}")
            if time.monotonic() > deadline:
                raise self.server.fail(f"not SERVING after {timeout:.0f}s")
            time.sleep(0.25)
        self.load_seconds = time.perf_counter() - t0
        if not self.with_bridge:
            return
        bridge_cmd = [str(BIN / "http-bridge"), "--port", str(self.http_port)]
        bridge_cmd += ["--backend", self.grpc_target, "--no-ui", "--log-level", "warning"]
        self.bridge = Process("http-bridge", bridge_cmd, self.http_port)
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/health", timeout=1)
                break
            except urllib.error.HTTPError:
                break  # it answers (a 503 while it has not seen the backend healthy yet)
            except OSError:
                if not self.bridge.alive():
                    raise self.bridge.fail(f"exited with {self.bridge.proc.returncode}") from None
                if time.monotonic() > deadline:
                    raise self.bridge.fail("not answering after 60s") from None
                time.sleep(0.1)

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
        """The server's Prometheus samples as {name with labels: value}."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

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
