"""The process harness tests and bench share (glmserve/testing.py)."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import psutil
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


def test_a_forked_model_server_is_our_child_with_its_own_flags_and_exit_status(
    tiny_model_dir: Path,
) -> None:
    # The suite's servers are forks of the preloaded interpreter (conftest), adopted by this
    # process: its flags are its own, and its exit status is read as a Popen child's.
    p = testing.spawn_model_server(str(tiny_model_dir), "--drain-seconds", "1")
    try:
        assert isinstance(p.proc, testing.Adopted)
        assert psutil.Process(p.pid).ppid() == os.getpid()
        assert f"address=127.0.0.1:{p.port} " in p.log_text()
        assert p.stop() == 0  # SIGTERM: a drain, then exit 0
    finally:
        p.stop(signal.SIGKILL)
    killed = testing.spawn_model_server(str(tiny_model_dir))
    assert killed.stop(signal.SIGKILL) == -signal.SIGKILL
