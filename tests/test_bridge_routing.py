"""Discovery and routing across model servers, over real processes on loopback addresses.

Model servers on 127.0.0.2, .3 and .4 share one port, like the pods behind a headless Service,
and a stub DNS server (tests/dns_stub.py) plays the cluster's DNS: the bridge, given
``dns://127.0.0.1:PORT/glm.test:PORT``, must follow its answers with no restart and no failed
request. The servers run with ``--max-connection-age``, so connections are recycled under the
load too.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
from dns_stub import StubDNS
from procs import (
    SERVING,
    Proc,
    free_port,
    health_status,
    parse_metrics,
    spawn_bridge,
    spawn_model_server,
    wait_until,
)

from glmserve.v1 import chat_pb2, chat_pb2_grpc
from http_bridge.backend import Backend
from http_bridge.settings import Settings

HI = [{"role": "user", "content": "Hi!"}]
HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
AGE = ("--max-connection-age", "2", "--max-connection-age-grace", "60")


def shared_port() -> int:
    """A port free on every address of HOSTS."""
    for _ in range(50):
        port = free_port()
        try:
            for host in HOSTS:
                with socket.socket() as s:
                    s.bind((host, port))
        except OSError:
            continue
        return port
    raise RuntimeError("no port free on all of " + ", ".join(HOSTS))


@dataclass
class Server:
    """A model server bound to ``host`` (procs' helpers assume 127.0.0.1)."""

    proc: Proc
    host: str

    @property
    def target(self) -> str:
        return f"{self.host}:{self.proc.port}"

    def wait_serving(self) -> None:
        self.proc.wait_ready(lambda: health_status(self.target) == SERVING, 180, "SERVING")

    def finished(self) -> float:
        url = f"http://{self.host}:{self.proc.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as r:
            samples = parse_metrics(r.read().decode())
        return sum(v for k, v in samples.items() if k.startswith("glmserve_requests_total"))


def spawn_server(model: Path, host: str, port: int, *args: str) -> Server:
    proc = spawn_model_server(str(model), "--host", host, *AGE, *args, port=port, wait=False)
    return Server(proc, host)


@pytest.fixture(scope="module")
def port() -> int:
    return shared_port()


@pytest.fixture(scope="module")
def pair(tiny_model_dir: Path, port: int) -> Iterator[list[Server]]:
    """Servers on .2 and .3, started together; killed at the end (a drain costs seconds)."""
    probe = ("--health-port", str(free_port()))  # on the first: tested below
    servers = [spawn_server(tiny_model_dir, HOSTS[0], port, *probe)]
    servers.append(spawn_server(tiny_model_dir, HOSTS[1], port))
    try:
        for s in servers:
            s.wait_serving()
        yield servers
    finally:
        for s in servers:
            s.proc.stop(signal.SIGKILL)


def _request(max_tokens: int) -> chat_pb2.ChatRequest:
    hi = chat_pb2.Message(role=chat_pb2.ROLE_USER, content="Hi!")
    return chat_pb2.ChatRequest(messages=[hi], max_tokens=max_tokens, ignore_eos=True)


async def _route_around_a_held_stream(targets: list[str], routing: str) -> tuple[str, list[str]]:
    """The bridge's Backend (in process, real channels): one long stream held open after its
    first message, then four short calls one after another. Where did each go?"""
    backend = Backend(Settings(backends=tuple(targets), backend_routing=routing))
    await backend.start()
    try:
        await asyncio.to_thread(wait_until, backend.available, 10, "a READY backend")
        held = backend.chat(_request(400), "held")
        assert await held.read() is not grpc.aio.EOF
        went = []
        for i in range(4):
            call = backend.chat(_request(2), f"short-{i}")
            while await call.read() is not grpc.aio.EOF:
                pass
            went.append(call.target)
        held.cancel()
        return held.target, went
    finally:
        await backend.close()


def test_least_loaded_routes_around_a_busy_backend(pair: list[Server]) -> None:
    targets = [f"ipv4:{s.target}" for s in pair]
    busy, went = asyncio.run(_route_around_a_held_stream(targets, "least-loaded"))
    assert busy in targets
    assert set(went) == set(targets) - {busy}, (busy, went)
    # Round robin ignores the held stream: half the short calls queue behind it.
    busy, went = asyncio.run(_route_around_a_held_stream(targets, "round-robin"))
    assert went.count(busy) == 2, (busy, went)


def test_gateway_metric_names(pair: list[Server]) -> None:
    """The gauges an inference gateway's endpoint picker scrapes, beside ours."""
    url = f"http://{pair[0].host}:{pair[0].proc.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as r:
        samples = parse_metrics(r.read().decode())
    assert samples["vllm:num_requests_waiting"] == samples["glmserve_requests_waiting"]
    assert samples["vllm:num_requests_running"] == samples["glmserve_requests_running"]
    assert samples["vllm:gpu_cache_usage_perc"] == samples["glmserve_kv_cache_usage_ratio"]


def test_health_port_serves_only_health(pair: list[Server]) -> None:
    """--health-port: kubelet's gRPC probes (no TLS, no token) get the same status there,
    and nothing else."""
    args = pair[0].proc.args
    probe = f"{pair[0].host}:{args[args.index('--health-port') + 1]}"
    assert health_status(probe) == SERVING
    with grpc.insecure_channel(probe) as channel, pytest.raises(grpc.RpcError) as caught:
        chat_pb2_grpc.ChatServiceStub(channel).ListModels(chat_pb2.ListModelsRequest(), timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_max_connection_age_recycles_connections(pair: list[Server]) -> None:
    """A GOAWAY after ~2 s: an idle client channel drops to IDLE (and would resolve again)."""
    seen: list[grpc.ChannelConnectivity] = []
    with grpc.insecure_channel(pair[0].target) as channel:
        channel.subscribe(seen.append, try_to_connect=True)
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        stub.ListModels(chat_pb2.ListModelsRequest(), timeout=5)
        wait_until(lambda: grpc.ChannelConnectivity.READY in seen, 5, "READY")
        ready_at = seen.index(grpc.ChannelConnectivity.READY)
        wait_until(lambda: grpc.ChannelConnectivity.IDLE in seen[ready_at:], 10, "a GOAWAY (IDLE)")
        stub.ListModels(chat_pb2.ListModelsRequest(), timeout=5)  # reconnects and serves


async def _follow(dns: StubDNS, port: int) -> list[list[str]]:
    """The Backend's endpoints after each DNS answer below (no servers needed)."""
    target = f"dns://127.0.0.1:{dns.port}/glm.test:{port}"
    backend = Backend(Settings(backends=(target,)))
    seen = []
    try:
        for answer in ([HOSTS[0]], [], [HOSTS[1], HOSTS[2]]):
            dns.addresses = answer
            await (backend.start() if not seen else backend.refresh())
            seen.append(sorted(e.target for e in backend.endpoints()))
    finally:
        await backend.close()
    return seen


def test_backend_follows_dns_answers() -> None:
    """Added addresses join, gone ones leave, and an empty answer keeps what was there."""
    dns = StubDNS("glm.test", [])
    try:
        seen = asyncio.run(_follow(dns, 50051))
    finally:
        dns.close()
    first = [f"ipv4:{HOSTS[0]}:50051"]
    assert seen == [first, first, [f"ipv4:{h}:50051" for h in HOSTS[1:]]]
    assert dns.queries >= 6  # A and AAAA per round, asked of this server


class Load:
    """Threads that post short chats to the bridge until stopped; every outcome is kept."""

    def __init__(self, url: str, workers: int = 3) -> None:
        self.url = url + "/v1/chat/completions"
        self.outcomes: list[str] = []
        self.stopped = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(workers)]
        for t in self.threads:
            t.start()

    def _run(self) -> None:
        with httpx.Client(timeout=30) as client:
            model = client.get(self.url.replace("chat/completions", "models")).json()
            body = {"model": model["data"][0]["id"], "messages": HI, "max_tokens": 4}
            while not self.stopped.is_set():
                try:
                    r = client.post(self.url, json=body)
                    self.outcomes.append(str(r.status_code) if r.status_code != 200 else "ok")
                except httpx.HTTPError as err:
                    self.outcomes.append(repr(err))

    def stop(self) -> list[str]:
        self.stopped.set()
        for t in self.threads:
            t.join()
        return self.outcomes


def test_dns_scale_out_then_drain_under_load(
    pair: list[Server], tiny_model_dir: Path, port: int
) -> None:
    dns = StubDNS("glm.test", [HOSTS[0]])
    target = f"dns://127.0.0.1:{dns.port}/glm.test:{port}"
    bridge = spawn_bridge("--backend", target, "--backend-resolve-seconds", "0.5", "--no-ui")
    third = spawn_server(tiny_model_dir, HOSTS[2], port)  # started after the bridge
    load = None
    try:
        wait_until(lambda: httpx.get(bridge.url + "/health").status_code == 200, 20, "healthy")
        load = Load(bridge.url)
        wait_until(lambda: "ok" in load.outcomes, 20, "the first answers")
        third.wait_serving()

        # 1 -> 3: both newcomers get traffic soon after they appear in DNS.
        servers = [*pair, third]
        before = [s.finished() for s in servers]
        dns.addresses = list(HOSTS)
        took = wait_until(
            lambda: all(s.finished() > b for s, b in zip(servers, before, strict=True)),
            30,
            "every server answering",
        )
        assert took < 30
        ready = [k for k, v in bridge.metrics().items() if "backend_ready" in k and v == 1]
        assert sorted(ready) == [
            f'glmserve_bridge_backend_ready{{backend="ipv4:{h}:{port}"}}' for h in HOSTS
        ]
        print(f"every server answering {took:.1f} s after DNS listed them")

        # 3 -> 2: the third leaves DNS and drains at the same moment; nothing fails.
        dns.addresses = list(HOSTS[:2])
        third.proc.proc.send_signal(signal.SIGTERM)
        # Its drain ends with its last Chat stream, not at --drain-seconds (30): the bridge's
        # health watch does not hold it.
        assert third.proc.proc.wait(15) == 0
        count = len(load.outcomes)
        wait_until(lambda: len(load.outcomes) > count + 5, 20, "more answers after the drain")
        gone = f'glmserve_bridge_backend_ready{{backend="ipv4:{HOSTS[2]}:{port}"}}'
        wait_until(lambda: gone not in bridge.metrics(), 10, "the drained server forgotten")
    finally:
        outcomes = load.stop() if load else []
        third.proc.stop(signal.SIGKILL)
        bridge.stop()
        dns.close()
    failures = [o for o in outcomes if o != "ok"]
    unusual = [line for line in bridge.log_text().splitlines() if "status=200" not in line]
    assert not failures and len(outcomes) > 15, (failures[:5], len(outcomes), unusual)
    assert "left DNS" in bridge.log_text()
