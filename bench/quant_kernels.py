"""Per-matmul cost of the ways to run ChatGLM2's int4/int8 weights (issue 12's decision).

For each linear of ChatGLM2-6B and a few batch sizes (rows of ``x``), times:

- ``dense``: the full-precision weight (what "expand at load" costs at run time; its memory is
  the full model's);
- ``dequant``: packed weights kept, expanded to the compute dtype inside every matmul;
- ``int8pack`` / ``int4pack``: torch's fused weight-only kernels (``_weight_int8pack_mm``,
  ``_weight_int4pack_mm`` = tinygemm on CUDA, the kernel torchao's int4 weight-only uses;
  ``_weight_int4pack_mm_for_cpu`` on the CPU). ChatGLM's per-row scales become one group
  scale per 128 inputs, and its signed nibbles an unsigned code with zero point 0: exact.

Each method's output is checked against an fp32 reference dequantization (``max_err``).

    python -m bench.quant_kernels [--device cuda] [--rows 1,16,64] [--json FILE]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from .report import emit_json

# (name, out_features, in_features) of ChatGLM2-6B's linears.
SHAPES = [
    ("query_key_value", 4608, 4096),
    ("dense", 4096, 4096),
    ("dense_h_to_4h", 27392, 4096),
    ("dense_4h_to_h", 4096, 13696),
]
GROUP = 128


def quantize(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ChatGLM's symmetric per-row quantization: signed codes and fp scales."""
    top = 2 ** (bits - 1) - 1
    scale = w.abs().amax(dim=1) / top
    q = torch.round(w / scale[:, None]).clamp(-top - 1, top).to(torch.int8)
    return q, scale


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """Signed int4 codes [N, K] -> uint8 [N, K/2], even column in the high nibble."""
    u = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return (u[:, 0::2] << 4) | u[:, 1::2]


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: int8 codes in [-8, 7]."""
    hi = (packed >> 4).to(torch.int8)
    lo = (packed & 0xF).to(torch.int8)
    q = torch.stack([hi, lo], dim=-1).reshape(packed.shape[0], -1)
    return torch.where(q > 7, q - 16, q)


def tinygemm_pack(
    q: torch.Tensor, scale: torch.Tensor, device: torch.device, dtype: torch.dtype
) -> tuple[Any, Any]:
    """Signed codes + per-row scales -> (packed weight, scales_and_zeros) for int4pack_mm."""
    n, k = q.shape
    unsigned = (q.to(torch.int32) + 8).to(device)
    sz = torch.zeros(k // GROUP, n, 2, dtype=dtype, device=device)
    sz[..., 0] = scale.to(dtype).to(device)[None, :]
    # zero point in the float domain: w = (u - 8) * scale + zero, so zero = 0 is exact.
    if device.type == "cuda":
        u8 = ((unsigned[:, 0::2] << 4) | unsigned[:, 1::2]).to(torch.uint8)
        return torch._convert_weight_to_int4pack(u8, 8), sz
    return torch._convert_weight_to_int4pack_for_cpu(unsigned, 8), sz


def timed(fn: Callable[[], torch.Tensor], device: torch.device, budget_s: float) -> float:
    """Median-free mean microseconds per call over ~budget_s after warm-up."""
    for _ in range(3):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        if n % 10 == 0:
            if device.type == "cuda":
                torch.cuda.synchronize()
            if time.perf_counter() - t0 > budget_s:
                break
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e6


Method = tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor, int]


def methods_for(w: torch.Tensor, device: torch.device, dtype: torch.dtype) -> dict[str, Method]:
    """Each method as (matmul of x, fp32 reference weight, weight bytes at rest)."""
    q8, s8 = quantize(w, 8)
    q4, s4 = quantize(w, 4)
    ref8 = (q8.float() * s8[:, None]).to(device)
    ref4 = (q4.float() * s4[:, None]).to(device)
    dense = w.to(device, dtype)
    q8d, s8d = q8.to(device), s8.to(device, dtype)
    p4d, s4d = pack_nibbles(q4).to(device), s4.to(device, dtype)
    int8_bytes = q8d.numel() + s8d.numel() * 2
    methods: dict[str, Method] = {
        "dense": (lambda x: F.linear(x, dense), w.to(device), dense.numel() * dense.itemsize),
        # The per-row scale commutes with the matmul: scale the output, not the weight.
        "int8 dequant": (lambda x: F.linear(x, q8d.to(dtype)) * s8d, ref8, int8_bytes),
        "int4 dequant": (
            lambda x: F.linear(x, unpack_nibbles(p4d).to(dtype)) * s4d,
            ref4,
            p4d.numel() + s4d.numel() * 2,
        ),
    }
    if hasattr(torch, "_weight_int8pack_mm"):
        methods["int8pack"] = (lambda x: torch._weight_int8pack_mm(x, q8d, s8d), ref8, int8_bytes)
    try:
        packed, sz = tinygemm_pack(q4, s4, device, dtype)
    except (RuntimeError, AttributeError):
        return methods
    mm4 = torch._weight_int4pack_mm if device.type == "cuda" else torch._weight_int4pack_mm_for_cpu
    nbytes = packed.numel() * packed.element_size() + sz.numel() * sz.element_size()
    methods["int4pack"] = (lambda x: mm4(x, packed, GROUP, sz), ref4, nbytes)
    return methods


def run(device: torch.device, rows: list[int], budget_s: float) -> list[dict[str, Any]]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(0)
    out: list[dict[str, Any]] = []
    for name, n, k in SHAPES:
        methods = methods_for(torch.randn(n, k, generator=gen) * 0.02, device, dtype)
        for m in rows:
            x = torch.randn(m, k, generator=gen).to(device, dtype)
            for method, (fn, ref, nbytes) in methods.items():
                row: dict[str, Any] = {"shape": name, "n": n, "k": k, "rows": m, "method": method}
                try:
                    got = fn(x).float()
                    want = x.float() @ ref.float().T
                    row["max_rel_err"] = float((got - want).abs().max() / want.abs().max())
                    row["us"] = round(timed(lambda fn=fn, x=x: fn(x), device, budget_s), 1)
                    row["weight_bytes"] = int(nbytes)
                except (RuntimeError, NotImplementedError) as e:
                    row["error"] = str(e)[:200]
                out.append(row)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rows", default="1,16,64")
    p.add_argument("--budget", type=float, default=0.3, help="seconds timed per cell")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args()
    device = torch.device(args.device)
    rows = run(device, [int(r) for r in args.rows.split(",")], args.budget)
    print(f"{'shape':16} {'rows':>4} {'method':13} {'us':>9} {'MiB':>7} {'max_rel_err':>11}")
    for r in rows:
        if "error" in r:
            print(f"{r['shape']:16} {r['rows']:>4} {r['method']:13} error: {r['error']}")
            continue
        mib = r["weight_bytes"] / 2**20
        print(
            f"{r['shape']:16} {r['rows']:>4} {r['method']:13} {r['us']:9.1f} {mib:7.1f} "
            f"{r['max_rel_err']:11.2e}"
        )
    result = {"device": str(device), "torch": torch.__version__, "rows": rows}
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(device)
    emit_json(result, args.json)


if __name__ == "__main__":
    main()
