"""Streams under stress, over real processes: slow readers, the write timeout, the connection
limit, the drain deadline and a frozen backend (SIGSTOP).

The slow readers (the bench's slowreaders scenario, scaled down) are raw sockets with a tiny
receive buffer that read a few bytes a second, so the bridge's writes really block. Timings are
compared loosely: these run on shared CPUs.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from procs import Proc, spawn_bridge, start_bridge, start_model_server, wait_until
from test_bridge_e2e import HI, LONG_RAW, finished, running, sse_data

SLOW_READERS = 20  # the bench's 200, scaled down
NORMAL = 4
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def main(tiny_model_dir: Path) -> Iterator[Proc]:
    with start_model_server(str(tiny_model_dir), "--max-num-seqs", "64") as server:
        yield server
        server.stop(signal.SIGKILL)


@pytest.fixture(scope="module")
def model_id(main: Proc) -> str:
    with start_bridge("--backend", main.target, "--no-ui") as b:
        return httpx.get(b.url + "/v1/models").json()["data"][0]["id"]


def open_raw_stream(bridge: Proc, body: dict) -> socket.socket:
    """A streaming request on a socket whose receive buffer is as small as the kernel allows."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    sock.connect(("127.0.0.1", bridge.port))
    data = json.dumps(body).encode()
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: bridge\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    )
    sock.sendall(head.encode() + data)
    return sock


class SlowReaders:
    """Reads 3 bytes a second from each socket, in a thread, until stopped."""

    def __init__(self, socks: list[socket.socket]) -> None:
        self.socks = socks
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopped.wait(1.0):
            for sock in self.socks:
                try:
                    sock.recv(3, socket.MSG_DONTWAIT)
                except OSError:
                    pass

    def close(self) -> None:
        self.stopped.set()
        self.thread.join()
        for sock in self.socks:
            sock.close()


GREEDY = {"temperature": 0, "max_tokens": 64, "ignore_eos": True}


async def normal_streams(
    bridge: Proc, model_id: str, n: int, also: dict | None = None
) -> tuple[float, str, float]:
    """``n`` concurrent long streams and one greedy one (and SLOW_READERS streams of ``also``),
    each read to [DONE] at full speed: seconds for the ``n``, the greedy stream's text and its
    own seconds."""
    body = {"model": model_id, "messages": HI, "stream": True, **LONG_RAW}
    greedy = {"model": model_id, "messages": HI, "stream": True, **GREEDY}

    async def one(client: httpx.AsyncClient, body: dict) -> tuple[str, float]:
        start = time.monotonic()
        async with client.stream("POST", bridge.url + "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            events = [sse_data(line) async for line in r.aiter_lines() if line]
        assert events[-1] == "[DONE]" and "error" not in events[-2]
        chunks = [json.loads(e) for e in events[:-1]]
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
        return text, time.monotonic() - start

    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=64)) as client:
        others = [
            asyncio.ensure_future(one(client, also)) for _ in range(SLOW_READERS * bool(also))
        ]
        start = time.monotonic()
        runs = await asyncio.gather(one(client, greedy), *(one(client, body) for _ in range(n)))
        seconds = time.monotonic() - start
        await asyncio.gather(*others)
    return seconds, *runs[0]


def test_slow_readers_are_bounded_cut_and_do_not_slow_others(main: Proc, model_id: str) -> None:
    # 20 top logprobs make a token ~2 KB of SSE: 200 tokens are ~400 KB per stream, far more
    # than the ~100 KB of buffers on the way (the writes block after ~50 tokens).
    body = {"model": model_id, "messages": HI, "stream": True, "max_tokens": 200}
    body |= {"ignore_eos": True, "logprobs": True, "top_logprobs": 20}
    with start_bridge("--backend", main.target, "--no-ui", "--stream-write-timeout", "3") as b:
        rss = psutil.Process(b.proc.pid).memory_info
        # The baseline: the same streams beside the normal ones, read at full speed (the model
        # server generates their tokens whoever reads them; what slow readers may not add is
        # a delay of their own).
        baseline, text, greedy_s = asyncio.run(normal_streams(b, model_id, NORMAL, body))
        wait_until(lambda: running(main) == 0, 20, "the baseline's generations done")
        rss_before = rss().rss

        pauses = main.metrics().get("glmserve_stream_pauses_total", 0)
        socks = [open_raw_stream(b, body) for _ in range(SLOW_READERS)]
        assert [sock.recv(12) for sock in socks] == [b"HTTP/1.1 200"] * SLOW_READERS
        readers = SlowReaders(socks)
        try:
            peak = 0
            during, text_during, greedy_during = asyncio.run(normal_streams(b, model_id, NORMAL))
            peak = max(peak, rss().rss)
            # The same tokens beside the slow streams, and not held up by them.
            assert text_during == text
            assert greedy_during < 3 * greedy_s + 5, (greedy_s, greedy_during)
            # The slow streams are cut by the write timeout while their clients still read.
            wait_until(
                lambda: b.metrics().get("glmserve_bridge_streams_in_flight") == 0,
                60,
                "slow streams closed by the write timeout",
            )
            peak = max(peak, rss().rss)
            wait_until(lambda: running(main) == 0, 20, "their generations cancelled")
            assert b.log_text().count("the client read nothing for 3 s") == SLOW_READERS
            assert "ERROR" not in b.log_text()  # a cut on purpose is one warning, no more
            # Backpressure reached the model server: each slow stream was paused there (no
            # seat, nothing computed) once its buffers on the way were full.
            paused = main.metrics()["glmserve_stream_pauses_total"] - pauses
            assert paused >= SLOW_READERS, paused
        finally:
            readers.close()
        assert peak - rss_before < 50 * MiB, (rss_before, peak)
        # Loose: the slow streams share the model server's batch, but never block the others.
        assert during < 3 * baseline + 10, (baseline, during)


def test_connection_limit_is_503(main: Proc, model_id: str) -> None:
    with start_bridge("--backend", main.target, "--max-connections", "3") as b:
        idle = [socket.create_connection(("127.0.0.1", b.port)) for _ in range(3)]
        try:
            time.sleep(0.2)  # let uvicorn accept them
            assert httpx.get(b.url + "/v1/models").status_code == 503
        finally:
            for sock in idle:
                sock.close()
        wait_until(lambda: httpx.get(b.url + "/v1/models").status_code == 200, 5, "room again")


def test_drain_deadline_ends_streams_with_an_error_event(main: Proc, model_id: str) -> None:
    b = spawn_bridge("--backend", main.target, "--drain-seconds", "2")
    body = {"model": model_id, "messages": HI, "stream": True, **LONG_RAW}
    try:
        with httpx.stream("POST", b.url + "/v1/chat/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            assert sse_data(next(lines))  # started
            main.proc.send_signal(signal.SIGSTOP)  # the stream now outlives any drain
            try:
                start = time.monotonic()
                b.proc.send_signal(signal.SIGTERM)
                events = [sse_data(line) for line in lines if line]
                took = time.monotonic() - start
            finally:
                main.proc.send_signal(signal.SIGCONT)
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["error"]["code"] == "server_shutting_down"
        assert 1.5 < took < 10, took
        # Gone soon after (uvicorn re-raises the SIGTERM once its graceful shutdown is done).
        assert b.proc.wait(15) == -signal.SIGTERM
    finally:
        b.stop(signal.SIGKILL)


def test_frozen_backend_times_out_and_is_skipped(
    main: Proc, tiny_model_dir: Path, model_id: str
) -> None:
    flags = ("--backend-idle-timeout", "3", "--backend-accept-timeout", "1")
    with (
        start_model_server(str(tiny_model_dir)) as frozen,
        start_bridge("--backend", main.target, "--backend", frozen.target, *flags) as b,
    ):
        body = {"model": model_id, "messages": HI, "stream": True, **LONG_RAW}
        http = httpx.Client(timeout=60)
        opened, readers, victim = [], [], None
        try:
            for _ in range(4):  # long streams until one runs on `frozen`
                cm = http.stream("POST", b.url + "/v1/chat/completions", json=body)
                response = cm.__enter__()
                opened.append(cm)
                lines = response.iter_lines()
                readers.append(lines)
                assert sse_data(next(lines))
                if running(frozen) == 1:
                    victim = lines
                    break
            assert victim is not None, "round robin never picked the second backend"
            frozen.proc.send_signal(signal.SIGSTOP)
            start = time.monotonic()
            rest = [sse_data(line) for line in victim if line]
            took = time.monotonic() - start
            assert rest[-1] == "[DONE]"
            assert json.loads(rest[-2])["error"]["code"] == "backend_timeout"
            assert took < 3 + 5, took
        finally:
            for cm in opened:
                cm.__exit__(None, None, None)
            http.close()

        # New requests all go to `main`: one placed on the frozen backend gets no response
        # headers (a live server sends them before queueing), so after --backend-accept-timeout
        # it moves on; keepalive pings soon take the frozen backend out of the rotation.
        short = {"model": model_id, "messages": HI, "max_tokens": 2}
        before = finished(main)
        try:
            statuses = [
                httpx.post(b.url + "/v1/chat/completions", json=short, timeout=30).status_code
                for _ in range(4)
            ]
        finally:
            frozen.proc.send_signal(signal.SIGKILL)
        assert statuses == [200] * 4, statuses
        assert finished(main) - before == 4
