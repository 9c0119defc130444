"""Static-shape decode steps (engine/graphs.py), the form a CUDA graph replays: on the CPU they
run eagerly and must give the tokens of the ordinary decode step; on a GPU the captured and
replayed steps must give exactly the eager static step's tokens."""

from __future__ import annotations

import asyncio
import collections
from pathlib import Path

import pytest
import torch

from model_server.engine import kv
from model_server.engine.engine import Engine, EngineConfig
from model_server.engine.runner import ModelRunner
from model_server.engine.types import EngineObserver, GenerationRequest, SamplingParams
from model_server.models.registry import load_model

# Replies long enough to outgrow a lane's spare room (kv.GROW_TOKENS) at least once.
LONG = kv.GROW_TOKENS + 20


def _requests(vocab: int) -> list[GenerationRequest]:
    """Prompts of several lengths, replies of several lengths (some past a capacity growth)."""
    out = []
    for i, n in enumerate([LONG, 12, 30, LONG, 5, 47]):
        prompt = [(7 * i + 3 * j) % (vocab - 10) + 5 for j in range(5 + 9 * i)]
        params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        out.append(GenerationRequest(f"r{i}", prompt, params))
    return out


async def _tokens(stream) -> list[int]:  # noqa: ANN001
    ids: list[int] = []
    async for out in stream:
        assert out.error is None, out.error
        ids += out.token_ids
    return ids


class _Modes(EngineObserver):
    """Counts decode steps by how they ran (what the metrics count)."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()

    def decode_step(self, mode: str) -> None:
        self.counts[mode] += 1


async def _run(  # noqa: ANN001
    loaded, at_once: bool = False, prepare=None, modes: _Modes | None = None, **config
) -> tuple[list[list[int]], ModelRunner]:
    """The requests with starts staggered (rows join and leave a running lane at times the
    clock decides), or ``at_once``: all queued before the engine starts, so every run
    schedules the same steps (what a bf16 comparison needs: there a row's last bits, and
    so a near-tie, depend on the batch it runs in)."""
    if at_once:  # and never paused for a slow reader, which the clock would decide
        config.setdefault("max_stream_backlog", 0)
    engine = Engine(loaded, EngineConfig(prefix_caching=False, **config), modes)
    if prepare is not None:
        prepare(engine)
    requests = _requests(engine.runner.vocab)

    async def staggered(i: int) -> list[int]:
        await asyncio.sleep(0.02 * i)
        return await _tokens(engine.submit(requests[i]))

    if at_once:
        streams = [engine.submit(r) for r in requests]
    engine.start()
    try:
        if at_once:
            work = asyncio.gather(*(_tokens(s) for s in streams))
        else:
            work = asyncio.gather(*(staggered(i) for i in range(len(requests))))
        return list(await asyncio.wait_for(work, 120)), engine.runner
    finally:
        engine.shutdown()


@pytest.mark.parametrize("model", ["llama", "chatglm2"])
async def test_static_decode_steps_give_the_tokens_of_ordinary_ones(
    model: str, tiny_model_dir: Path, tiny_chatglm2_dir: Path
) -> None:
    path = tiny_model_dir if model == "llama" else tiny_chatglm2_dir
    loaded = load_model(str(path), torch.device("cpu"), "float32", None)
    at_once = model == "chatglm2"  # both ways of starting the requests run on the CPU
    modes = _Modes(), _Modes()
    ordinary, runner = await _run(loaded, at_once, modes=modes[0])
    assert runner.static is None  # never on the CPU by default
    static, runner = await _run(loaded, at_once, modes=modes[1], static_decode=True)
    assert runner.static is not None
    assert set(modes[0].counts) == {"ordinary"}
    assert set(modes[1].counts) == {"static"} and modes[1].counts["static"] >= LONG - 1
    assert static == ordinary
    assert len(static[0]) == LONG


async def test_after_a_failed_capture_ordinary_steps_go_on_over_the_same_caches(
    tiny_model_dir: Path,
) -> None:
    """A model whose capture fails gets ordinary decode steps from then on, mid-lane: the
    static steps must leave every cache exactly as an ordinary step expects it."""
    loaded = load_model(str(tiny_model_dir), torch.device("cpu"), "float32", None)

    def fail_after_ten_steps(engine: Engine) -> None:
        static = engine.runner.static
        step = static.step
        steps = 0

        def counted(*args):  # noqa: ANN002, ANN202
            nonlocal steps
            steps += 1
            static.failed = steps >= 10  # what a failed capture sets
            return step(*args)

        static.step = counted

    ordinary, _ = await _run(loaded, True)
    modes = _Modes()
    switched, runner = await _run(loaded, True, fail_after_ten_steps, modes, static_decode=True)
    assert runner.static is None  # the runner went back to ordinary steps
    assert modes.counts["static"] == 10 and modes.counts["ordinary"] > 10
    assert switched == ordinary


def test_the_masked_capacity_never_leaks_into_a_step(tiny_model_dir: Path) -> None:
    """Positions beyond a lane's width are masked, and zeroed when a step first meets the
    buffers: NaN left there (never-written memory can hold anything) changes nothing."""
    loaded = load_model(str(tiny_model_dir), torch.device("cpu"), "float32", None)
    runner = ModelRunner(loaded, static_decode=True)
    assert runner.static is not None
    prompts = torch.tensor([[0, 0, 11, 12, 13], [21, 22, 23, 24, 25]])
    mask = (prompts != 0).long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = {}
    with torch.inference_mode():
        for static in (False, True):
            cache = kv.new_cache()
            runner.forward(prompts, mask, positions, cache)
            for layer in cache.layers:
                assert layer._k.shape[-2] > 5  # spare room follows the width
                layer._k[:, :, 5:] = float("nan")
                layer._v[:, :, 5:] = float("nan")
            step = (
                torch.tensor([[31], [32]]),
                torch.cat([mask, torch.ones(2, 1).long()], 1),
                positions[:, -1:] + 1,
                cache,
            )
            out = runner.decode(*step)[0] if static else runner.forward(*step)
            logits[static] = out.clone()
            assert cache.get_seq_length() == 6
    assert torch.isfinite(logits[True]).all()
    torch.testing.assert_close(logits[True], logits[False])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
async def test_replayed_cuda_graphs_give_the_tokens_of_eager_static_steps(
    dtype: str, tiny_chatglm2_dir: Path
) -> None:
    loaded = load_model(str(tiny_chatglm2_dir), torch.device("cuda"), dtype, None)
    eager, runner = await _run(loaded, True, cuda_graphs=False, static_decode=True)
    assert runner.static is not None and not runner.static.capture
    modes = _Modes()
    graphs, runner = await _run(loaded, True, modes=modes)
    assert runner.static is not None and runner.static.capture, "a capture failed"
    # The first step runs eagerly (the warm-up); each join, leave and capacity growth changes
    # the key, and the first step at a key is captured; all the other steps replay.
    assert modes.counts["static"] == 1 and modes.counts["capture"] == runner.static.captured > 1
    assert modes.counts["graph"] > sum(modes.counts.values()) // 2
    assert set(modes.counts) == {"static", "capture", "graph"}
    assert graphs == eager
    if dtype == "float32":
        ordinary, runner = await _run(loaded, True, cuda_graphs=False)
        assert runner.static is None
        assert graphs == ordinary


def test_models_with_a_sliding_window_keep_the_ordinary_step() -> None:
    """The static step's one 4-D mask would drop a sliding window: such models never get it."""
    from transformers import Gemma2Config, GlmConfig, LlamaConfig, MistralConfig, Qwen2Config

    from model_server.engine.runner import full_attention_only

    def model(config: object) -> torch.nn.Module:
        m = torch.nn.Module()
        m.config = config
        return m

    assert full_attention_only(model(LlamaConfig()))
    assert full_attention_only(model(GlmConfig()))
    assert full_attention_only(model(Qwen2Config()))  # a window it does not use
    assert not full_attention_only(model(MistralConfig(sliding_window=4096)))
    assert not full_attention_only(model(Gemma2Config()))
