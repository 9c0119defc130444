"""``python -m bench.sdpa_backends``: one decode step's SDPA calls on a GPU, per backend set.

A decode step's key length is one more than the last step's. torch's default SDPA choice on
Hopper is cuDNN's attention, which builds an execution plan per new shape; this times a step's
calls (``--layers`` of them: 16 rows, 32 query heads, a boolean mask with left padding, bf16)
at key lengths that grow by one per step and at one fixed length, for torch's default, the
engine's set (``model_server.models.attention.CUDA_BACKENDS``: no cuDNN) and each backend
alone. Each set's growing lengths start past the last set's, so every set meets lengths no
plan exists for, as the engine does; the fixed length is shared (planned after the first set).
Prints a table and one JSON line; ``--json FILE`` also writes it.

    python -m bench.sdpa_backends [--layers 28] [--keys 600] [--steps 24] [--json F]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from model_server.models.attention import CUDA_BACKENDS

from .report import emit_json

SETS: dict[str, list[SDPBackend] | None] = {
    "default": None,
    "engine": list(CUDA_BACKENDS),
    "cudnn": [SDPBackend.CUDNN_ATTENTION],
    "efficient": [SDPBackend.EFFICIENT_ATTENTION],
    "math": [SDPBackend.MATH],
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_ms(
    backends: list[SDPBackend] | None,
    q: torch.Tensor,
    k: torch.Tensor,
    mask: torch.Tensor,
    lengths: list[int],
    layers: int,
) -> dict[str, float]:
    """Median and max wall ms of one step (``layers`` SDPA calls) over ``lengths``."""
    times = []
    for n in lengths:
        keys, m = k[:, :, :n].contiguous(), mask[..., :n]
        _sync(q.device)
        t0 = time.perf_counter()
        for _ in range(layers):
            with sdpa_kernel(backends) if backends else contextlib.nullcontext():
                F.scaled_dot_product_attention(q, keys, keys, attn_mask=m)
        _sync(q.device)
        times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "max_ms": max(times)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--keys", type=int, default=600)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--device", default="cuda", help="cpu: a smoke run of this script only")
    p.add_argument("--json")
    args = p.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench.sdpa_backends needs a CUDA device")
    rows, heads, dim = 16, 32, 128
    total = args.keys + len(SETS) * args.steps
    k = torch.randn(rows, heads, total, dim, device=dev, dtype=torch.bfloat16)
    q = torch.randn(rows, heads, 1, dim, device=dev, dtype=torch.bfloat16)
    mask = torch.ones(rows, 1, 1, total, dtype=torch.bool, device=dev)
    mask[::2, ..., :7] = False  # left padding on every other row
    results = []
    for i, (name, backends) in enumerate(SETS.items()):
        start = args.keys + i * args.steps
        grow = list(range(start, start + args.steps))
        fixed = [args.keys] * args.steps
        for kind, lengths in (("grow", grow), ("fixed", fixed)):
            try:
                r = step_ms(backends, q, k, mask, lengths, args.layers)
            except RuntimeError as exc:  # no backend of the set takes these inputs here
                r = {"median_ms": None, "max_ms": None, "error": str(exc)[:200]}
            results.append({"backends": name, "lengths": kind, **r})
    print(f"{'backends':>10} {'lengths':>7} {'median ms':>10} {'max ms':>8}")
    for r in results:
        if r["median_ms"] is None:
            print(f"{r['backends']:>10} {r['lengths']:>7} {'no backend for these inputs':>19}")
        else:
            print(
                f"{r['backends']:>10} {r['lengths']:>7} {r['median_ms']:10.2f} {r['max_ms']:8.2f}"
            )
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    out = {"gpu": gpu, "torch": torch.__version__, "rows": results}
    emit_json(out, args.json)


if __name__ == "__main__":
    main()
