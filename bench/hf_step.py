"""Where a GPU decode step goes: the bare transformers forward, without the engine.

Builds ChatGLM2-6B's shape as transformers' ``GlmForCausalLM`` with random weights straight on
the GPU (no checkpoint), prefills ``--prompt`` tokens per row, then times decode steps at each
batch size with ``DynamicCache``: wall ms per step, GPU busy ms per step (CUDA kernel time
from the profiler) and kernels launched per step. Wall far above GPU time means the step is
bound by Python and launch overhead, not by memory bandwidth. Compare with the engine's
inter-token latency from ``python -m bench.gpu`` on the same machine. Each batch runs twice:
with torch's own choice of SDPA backend (cuDNN first on Hopper) and with the engine's
(``model_server.models.attention.sdpa_backends``: no cuDNN, which plans each new key length).

    python -m bench.hf_step [--batches 1,16,64] [--steps 20] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import time
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import DynamicCache

from model_server.models.attention import sdpa_backends
from model_server.models.chatglm2.config import ChatGLM2Config

from .chatglm2_load_memory import REAL_6B
from .report import emit_json


def six_b_config(num_layers: int) -> ChatGLM2Config:
    raw = {
        "model_type": "chatglm",
        "num_layers": num_layers,
        "hidden_size": REAL_6B["hidden"],
        "num_attention_heads": REAL_6B["heads"],
        "kv_channels": REAL_6B["kv_channels"],
        "multi_query_attention": True,
        "multi_query_group_num": REAL_6B["kv_groups"],
        "ffn_hidden_size": REAL_6B["ffn"],
        "padded_vocab_size": REAL_6B["padded_vocab_size"],
        "seq_length": 32768,
    }
    return ChatGLM2Config.from_dict(raw)


ACTIVITY = ProfilerActivity.CUDA if torch.cuda.is_available() else ProfilerActivity.CPU


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def step_times(
    model: Any, batch: int, prompt: int, steps: int, engine_sdpa: bool
) -> dict[str, Any]:
    device = next(model.parameters()).device
    with sdpa_backends(device)() if engine_sdpa else contextlib.nullcontext():
        return {
            "sdpa": "engine" if engine_sdpa else "torch",
            **_step_times(model, device, batch, prompt, steps),
        }


def _step_times(
    model: Any, device: torch.device, batch: int, prompt: int, steps: int
) -> dict[str, float]:
    ids = torch.randint(100, 60000, (batch, prompt), device=device)
    cache = DynamicCache()
    # transformers renamed past_key_values to cache; the GPU image may be older than ours.
    kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def model(input_ids, cache, use_cache, logits_to_keep=0, _m=model):  # noqa: ANN001
        return _m(
            input_ids=input_ids, use_cache=use_cache, logits_to_keep=logits_to_keep, **{kw: cache}
        )

    with torch.inference_mode():
        out = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(3):  # warm-up
            nxt = model(input_ids=nxt, cache=cache, use_cache=True).logits[:, -1].argmax(-1, True)
        _sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            nxt = model(input_ids=nxt, cache=cache, use_cache=True).logits[:, -1].argmax(-1, True)
        _sync()
        wall = (time.perf_counter() - t0) / steps
        with profile(activities=[ACTIVITY]) as prof:
            for _ in range(3):
                nxt = model(input_ids=nxt, cache=cache, use_cache=True).logits[:, -1]
                nxt = nxt.argmax(-1, True)
            _sync()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_us = sum(getattr(e, "device_time", None) or e.cuda_time for e in kernels) / 3
    return {
        "batch": batch,
        "wall_ms": wall * 1e3,
        "gpu_busy_ms": gpu_us / 1e3,
        "kernels_per_step": len(kernels) / 3,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--num-layers", type=int, default=28)
    p.add_argument("--device", default="cuda")
    p.add_argument("--json")
    args = p.parse_args()
    cfg = six_b_config(args.num_layers)
    from transformers import GlmForCausalLM

    torch.set_default_dtype(torch.bfloat16)
    with torch.device(args.device):
        model = GlmForCausalLM(cfg.to_glm_config()).eval()
    torch.set_default_dtype(torch.float32)
    rows = [
        step_times(model, int(b), args.prompt, args.steps, engine_sdpa)
        for b in args.batches.split(",")
        for engine_sdpa in (False, True)
    ]
    print(f"{'batch':>5} {'sdpa':>6} {'wall ms':>8} {'GPU ms':>7} {'kernels':>8}")
    for r in rows:
        print(
            f"{r['batch']:>5} {r['sdpa']:>6} {r['wall_ms']:8.1f} {r['gpu_busy_ms']:7.1f} "
            f"{r['kernels_per_step']:8.0f}"
        )
    gpu = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    result = {"gpu": gpu, "torch": torch.__version__, "rows": rows}
    emit_json(result, args.json)


if __name__ == "__main__":
    main()
