"""Real processes on loopback for end-to-end tests: the model server and the bridge.

Nothing here is mocked: each helper spawns the installed console script and waits until it is
really ready (gRPC health SERVING, or HTTP /health answering).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health_status(target: str, service: str = "", timeout: float = 1.0) -> int | None:
    """The grpc.health.v1 status of ``target``, or None when it does not answer."""
    try:
        with grpc.insecure_channel(target) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            return stub.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            ).status
    except grpc.RpcError:
        return None


@dataclass
class Proc:
    """A spawned server; ``log`` holds its stderr/stdout."""

    proc: subprocess.Popen
    port: int
    log: Path
    metrics_port: int | None = None
    args: list[str] = field(default_factory=list)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def metrics(self) -> dict[str, float]:
        """Scrapes the Prometheus endpoint into {sample name with labels: value}."""
        import urllib.request

        port = self.metrics_port or self.port
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        out: dict[str, float] = {}
        for line in text.decode().splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out


def _spawn(cmd: Sequence[str], env: dict[str, str] | None) -> tuple[subprocess.Popen, Path]:
    log = Path(tempfile.mkstemp(prefix="glmserve-", suffix=".log")[1])
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.Popen(
        list(cmd), stdout=log.open("wb"), stderr=subprocess.STDOUT, env=full_env
    )
    return proc, log


def _fail(proc: Proc, why: str) -> None:
    proc.stop(signal.SIGKILL)
    raise RuntimeError(f"{why}; log:\n{proc.log_text()[-4000:]}")


def spawn_model_server(
    model: str,
    *args: str,
    port: int | None = None,
    metrics: bool = True,
    env: dict[str, str] | None = None,
    wait: bool = True,
    timeout: float = 180.0,
) -> Proc:
    """Starts ``model-server`` and (by default) waits until health is SERVING."""
    port = port or free_port()
    metrics_port = free_port() if metrics else None
    cmd = [str(BIN / "model-server"), "--model", model, "--port", str(port), *args]
    if metrics_port:
        cmd += ["--metrics-port", str(metrics_port)]
    proc, log = _spawn(cmd, env)
    p = Proc(proc, port, log, metrics_port, cmd)
    if wait:
        wait_serving(p, timeout)
    return p


def wait_serving(p: Proc, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if p.proc.poll() is not None:
            _fail(p, f"model-server exited with {p.proc.returncode}")
        if health_status(p.target) == health_pb2.HealthCheckResponse.SERVING:
            return
        time.sleep(0.2)
    _fail(p, f"model-server not SERVING after {timeout}s")


@contextlib.contextmanager
def start_model_server(
    model: str,
    *args: str,
    port: int | None = None,
    env: dict[str, str] | None = None,
    metrics: bool = True,
    timeout: float = 180.0,
) -> Iterator[Proc]:
    p = spawn_model_server(model, *args, port=port, env=env, metrics=metrics, timeout=timeout)
    try:
        yield p
    finally:
        p.stop()


def spawn_bridge(
    *args: str,
    port: int | None = None,
    env: dict[str, str] | None = None,
    wait: bool = True,
    timeout: float = 60.0,
) -> Proc:
    """Starts ``http-bridge`` and waits until it answers HTTP (any status)."""
    import urllib.error
    import urllib.request

    port = port or free_port()
    cmd = [str(BIN / "http-bridge"), "--port", str(port), *args]
    proc, log = _spawn(cmd, env)
    p = Proc(proc, port, log, None, cmd)
    deadline = time.monotonic() + timeout
    while wait and time.monotonic() < deadline:
        if proc.poll() is not None:
            _fail(p, f"http-bridge exited with {proc.returncode}")
        try:
            urllib.request.urlopen(p.url + "/health", timeout=1)
            return p
        except urllib.error.HTTPError:
            return p  # it answered (e.g. 503 while no backend is up)
        except OSError:
            time.sleep(0.1)
    if wait:
        _fail(p, f"http-bridge not answering after {timeout}s")
    return p


@contextlib.contextmanager
def start_bridge(
    *args: str, port: int | None = None, env: dict[str, str] | None = None
) -> Iterator[Proc]:
    p = spawn_bridge(*args, port=port, env=env)
    try:
        yield p
    finally:
        p.stop()
