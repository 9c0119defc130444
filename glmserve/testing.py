"""The process harness the tests and the benchmarks share: real servers on loopback.

Why here: ``tests/`` (imported as plain modules) and ``bench/`` (run as ``python -m bench.X``,
also from a bare checkout on a GPU machine) both need it, and ``glmserve`` is the one package
both can import. It only needs the base dependencies (grpc, health checking, prometheus_client).

- :func:`spawn_model_server` / :func:`spawn_bridge` start the console scripts next to this
  interpreter (``python -m <package>.cli`` when the package is not installed) on free ports,
  with their output in a log file, and wait until they are ready: gRPC health SERVING, or the
  bridge answering HTTP at all. :func:`start_model_server` / :func:`start_bridge` do the same
  as context managers that stop the process on the way out.
- :meth:`Proc.metrics` reads a Prometheus endpoint with ``prometheus_client``'s parser.
- :func:`wait_until` polls a predicate with a deadline.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

BIN = Path(sys.executable).parent
SERVING = health_pb2.HealthCheckResponse.SERVING


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(
    predicate: Callable[[], object], timeout: float = 10.0, what: str = "", every: float = 0.05
) -> float:
    """Polls ``predicate`` until it is true; returns the seconds that took. AssertionError
    (``what`` not reached) after ``timeout`` seconds."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what or predicate} not reached within {timeout}s")
        time.sleep(every)
    return time.monotonic() - start


def health_status(target: str, service: str = "", timeout: float = 1.0) -> int | None:
    """The grpc.health.v1 status of ``target`` (plaintext), or None when it does not answer."""
    try:
        with grpc.insecure_channel(target) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            return stub.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            ).status
    except grpc.RpcError:
        return None


def http_status(url: str, timeout: float = 1.0) -> int | None:
    """The HTTP status ``url`` answers with, or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return int(r.status)
    except urllib.error.HTTPError as err:
        return int(err.code)
    except OSError:
        return None


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text → {sample name with its labels sorted by name: value}, e.g.
    ``glmserve_bridge_requests_total{method="POST",route="/v1/models",status="200"}``."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[s.name + (f"{{{labels}}}" if labels else "")] = float(s.value)
    return out


def scrape(port: int, timeout: float = 5.0) -> dict[str, float]:
    """The samples of ``http://127.0.0.1:PORT/metrics`` (see :func:`parse_metrics`)."""
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return parse_metrics(r.read().decode())


@dataclass
class Proc:
    """A spawned server: its Popen, port, log file, and the command line it got."""

    name: str
    proc: subprocess.Popen
    port: int
    log: Path
    metrics_port: int | None = None
    args: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_text()[-chars:]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """``sig`` (SIGTERM: the servers drain), then SIGKILL after ``timeout`` seconds."""
        if self.alive():
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def fail(self, why: str) -> RuntimeError:
        """Kills the process; the error to raise, with the tail of its log."""
        self.stop(signal.SIGKILL)
        return RuntimeError(f"{self.name}: {why}; log tail:\n{self.log_tail()}")

    def wait_ready(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        """Polls ``ready`` until true; a :meth:`fail` error if the process exits first or
        ``timeout`` seconds pass."""
        deadline = time.monotonic() + timeout
        while not ready():
            if not self.alive():
                raise self.fail(f"exited with {self.proc.returncode}")
            if time.monotonic() > deadline:
                raise self.fail(f"not {what} after {timeout:.0f}s")
            time.sleep(0.1)

    def metrics(self) -> dict[str, float]:
        """This process's Prometheus samples (its metrics port, else its own port)."""
        return scrape(self.metrics_port or self.port)


def command(script: str, module: str) -> list[str]:
    """The console script next to this interpreter; ``python -m module`` when it is not
    installed (a checkout run with PYTHONPATH, as on a device machine)."""
    path = BIN / script
    return [str(path)] if path.exists() else [sys.executable, "-m", module]


def spawn(
    name: str,
    cmd: Sequence[str],
    port: int,
    metrics_port: int | None = None,
    env: dict[str, str] | None = None,
) -> Proc:
    """Starts ``cmd`` with its output in a fresh log file; does not wait."""
    fd, path = tempfile.mkstemp(prefix=f"glmserve-{name}-", suffix=".log")
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with os.fdopen(fd, "wb") as out:
        proc = subprocess.Popen(list(cmd), stdout=out, stderr=subprocess.STDOUT, env=full_env)
    return Proc(name, proc, port, Path(path), metrics_port, list(cmd))


def wait_serving(p: Proc, timeout: float = 180.0) -> None:
    """Until the server's gRPC health is SERVING."""
    p.wait_ready(lambda: health_status(p.target) == SERVING, timeout, "SERVING")


# A port that free_port() found free can be taken before the server binds it (an outgoing
# connection's ephemeral port, another process): the server then exits saying so.
_PORT_TAKEN = ("address already in use", "failed to bind")
_ATTEMPTS = 3


def _started(launch: Callable[[], Proc], ready: Callable[[Proc], None] | None, retry: bool) -> Proc:
    """``launch()`` then ``ready(proc)``; launched again (on new ports: ``launch`` picks them)
    when the process died of a port taken since it was picked, if ``retry``."""
    for attempt in range(1, _ATTEMPTS + 1):
        p = launch()
        if ready is None:
            return p
        try:
            ready(p)
            return p
        except RuntimeError as err:
            lost_race = any(words in str(err).lower() for words in _PORT_TAKEN)
            if not (retry and lost_race and attempt < _ATTEMPTS):
                raise
    raise AssertionError("unreachable: the last attempt returns or raises")


def spawn_model_server(
    model: str | None,
    *args: str,
    port: int | None = None,
    metrics: bool = True,
    env: dict[str, str] | None = None,
    wait: bool = True,
    timeout: float = 180.0,
) -> Proc:
    """Starts ``model-server`` (``model`` None: its default model) and by default waits until
    health is SERVING (starting again on other ports when it lost a race for its ports)."""

    def launch() -> Proc:
        grpc_port = port or free_port()
        metrics_port = free_port() if metrics else None
        cmd = command("model-server", "model_server.cli")
        cmd += [*(["--model", model] if model else []), "--port", str(grpc_port), *args]
        if metrics_port:
            cmd += ["--metrics-port", str(metrics_port)]
        return spawn("model-server", cmd, grpc_port, metrics_port, env)

    ready = functools.partial(wait_serving, timeout=timeout) if wait else None
    return _started(launch, ready, retry=port is None or metrics)


def spawn_bridge(
    *args: str,
    port: int | None = None,
    env: dict[str, str] | None = None,
    wait: bool = True,
    timeout: float = 60.0,
) -> Proc:
    """Starts ``http-bridge`` and by default waits until it answers HTTP (any status: 503
    while it has not yet seen a backend healthy; starting again on another port when it lost
    a race for its port)."""

    def launch() -> Proc:
        http_port = port or free_port()
        cmd = [*command("http-bridge", "http_bridge.cli"), "--port", str(http_port), *args]
        return spawn("http-bridge", cmd, http_port, env=env)

    def answering(p: Proc) -> None:
        url = p.url + "/health"
        p.wait_ready(lambda: http_status(url) is not None, timeout, "answering")

    return _started(launch, answering if wait else None, retry=port is None)


@contextlib.contextmanager
def start_model_server(
    model: str | None,
    *args: str,
    port: int | None = None,
    env: dict[str, str] | None = None,
    metrics: bool = True,
    timeout: float = 180.0,
) -> Iterator[Proc]:
    """:func:`spawn_model_server`, stopped on the way out."""
    p = spawn_model_server(model, *args, port=port, env=env, metrics=metrics, timeout=timeout)
    try:
        yield p
    finally:
        p.stop()


@contextlib.contextmanager
def start_bridge(
    *args: str, port: int | None = None, env: dict[str, str] | None = None
) -> Iterator[Proc]:
    """:func:`spawn_bridge`, stopped on the way out."""
    p = spawn_bridge(*args, port=port, env=env)
    try:
        yield p
    finally:
        p.stop()
