"""The process harness the tests and the benchmarks share: real servers on loopback.

Why here: ``tests/`` (imported as plain modules) and ``bench/`` (run as ``python -m bench.X``,
also from a bare checkout on a GPU machine) both need it, and ``glmserve`` is the one package
both can import. It only needs the base dependencies (grpc, health checking, prometheus_client).

- :func:`spawn_model_server` / :func:`spawn_bridge` start the console scripts next to this
  interpreter (``python -m <package>.cli`` when the package is not installed) on free ports,
  with their output in a log file, and wait until they are ready: gRPC health SERVING, or the
  bridge answering HTTP at all. :func:`start_model_server` / :func:`start_bridge` do the same
  as context managers that stop the process on the way out.
- :func:`forkserver` (the test suite's session) starts model servers as forks of one
  interpreter that imported torch and transformers once (:mod:`glmserve.forkserver`), ~6 s
  less per start on a 2-core box; ``fresh=True`` or an ``env`` of its own starts a new one.
- :meth:`Proc.metrics` reads a Prometheus endpoint with ``prometheus_client``'s parser.
- :func:`wait_until` polls a predicate with a deadline.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
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


class Adopted:
    """A forked server this process adopted (see :class:`ForkServer`), with the part of
    ``subprocess.Popen`` the harness and tests use: it is this process's child, so its exit
    status is read the same way."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._lock = threading.Lock()

    def poll(self) -> int | None:
        with self._lock:
            if self.returncode is None:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
            return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(str(self.pid), timeout or 0)
            time.sleep(0.02)
        return int(self.returncode)  # type: ignore[arg-type] - set by poll

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:  # never a reused pid
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


@dataclass
class Proc:
    """A spawned server: its process, port, log file, and the command line it got."""

    name: str
    proc: subprocess.Popen | Adopted
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
    forks: ForkServer | None = None,
) -> Proc:
    """Starts ``cmd`` (as a fork of ``forks`` when given) with its output in a fresh log
    file; does not wait."""
    fd, path = tempfile.mkstemp(prefix=f"glmserve-{name}-", suffix=".log")
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc: subprocess.Popen | Adopted
    if forks is not None:
        os.close(fd)
        proc = forks.launch(cmd, full_env, Path(path))
    else:
        with os.fdopen(fd, "wb") as out:
            proc = subprocess.Popen(list(cmd), stdout=out, stderr=subprocess.STDOUT, env=full_env)
    return Proc(name, proc, port, Path(path), metrics_port, list(cmd))


_PR_SET_CHILD_SUBREAPER = 36


class ForkServer:
    """``python -m glmserve.forkserver``: model servers started as its forks, adopted by this
    process (a child subreaper), so each is waited for like a ``Popen`` child."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
        fd, path = tempfile.mkstemp(prefix="glmserve-forkserver-", suffix=".log")
        self.log = Path(path)
        with os.fdopen(fd, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "glmserve.forkserver"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=out,
                text=True,
            )
        self._lock = threading.Lock()
        self._ready = False

    def _answer(self) -> dict:
        line = self.proc.stdout.readline()  # type: ignore[union-attr] - a pipe
        if not line:
            raise RuntimeError(f"forkserver exited; log:\n{self.log.read_text()[-4000:]}")
        return json.loads(line)

    def launch(self, cmd: Sequence[str], env: dict[str, str], log: Path) -> Adopted:
        """``cmd`` (the model-server console script and its flags) in a fork, output to ``log``."""
        request = {"argv": list(cmd), "env": env, "cwd": os.getcwd(), "log": str(log)}
        with self._lock:
            if not self._ready:
                self._ready = bool(self._answer().get("ready"))
            self.proc.stdin.write(json.dumps(request) + "\n")  # type: ignore[union-attr]
            self.proc.stdin.flush()  # type: ignore[union-attr]
            return Adopted(int(self._answer()["pid"]))

    def close(self) -> None:
        self.proc.stdin.close()  # type: ignore[union-attr] - its loop ends with stdin
        self.proc.wait(30)
        self.proc.stdout.close()  # type: ignore[union-attr]


_forkserver: ForkServer | None = None


@contextlib.contextmanager
def forkserver() -> Iterator[ForkServer]:
    """While open, :func:`spawn_model_server` forks its servers from one preloaded interpreter
    (unless ``fresh=True`` or given an ``env``: those start a new process)."""
    global _forkserver
    _forkserver = ForkServer()
    try:
        yield _forkserver
    finally:
        server, _forkserver = _forkserver, None
        server.close()


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
    fresh: bool = False,
) -> Proc:
    """Starts ``model-server`` (``model`` None: its default model) and by default waits until
    health is SERVING (starting again on other ports when it lost a race for its ports).
    Inside :func:`forkserver` it is a fork of the preloaded interpreter, unless ``fresh`` (what
    is tested is the process's own start) or given an ``env`` (read by libraries at import)."""
    script = (BIN / "model-server").exists()  # a fork runs the console script's main
    forks = _forkserver if script and not fresh and env is None else None

    def launch() -> Proc:
        grpc_port = port or free_port()
        metrics_port = free_port() if metrics else None
        cmd = command("model-server", "model_server.cli")
        cmd += [*(["--model", model] if model else []), "--port", str(grpc_port), *args]
        if metrics_port:
            cmd += ["--metrics-port", str(metrics_port)]
        return spawn("model-server", cmd, grpc_port, metrics_port, env, forks)

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
    fresh: bool = False,
) -> Iterator[Proc]:
    """:func:`spawn_model_server`, stopped on the way out."""
    p = spawn_model_server(
        model, *args, port=port, env=env, metrics=metrics, timeout=timeout, fresh=fresh
    )
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
