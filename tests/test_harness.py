"""The process harness tests and bench share (glmserve/testing.py)."""

from __future__ import annotations

import socket

import pytest

from glmserve import testing


def test_a_server_that_loses_the_race_for_its_port_starts_again_on_another(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # free_port() said free, then something else bound it first (an outgoing connection's
    # ephemeral port, another process): the first start fails on it, the second gets a new one.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        ports = iter([busy])
        real = testing.free_port
        monkeypatch.setattr(testing, "free_port", lambda: next(ports, None) or real())
        bridge = testing.spawn_bridge("--backend", "127.0.0.1:9", "--no-ui")
        try:
            assert bridge.port != busy
            assert testing.http_status(bridge.url + "/health") is not None
        finally:
            bridge.stop()
