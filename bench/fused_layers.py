"""``python -m bench.fused_layers``: transformers' RMSNorm and GLM rotary against the engine's.

Times one call of each (host time to issue it, and wall time including the device) at a decode
step's shapes, ChatGLM2-6B's widths (hidden 4096, 32 query / 2 KV heads of 128, rotary on half
of each head), for ``--rows`` batch sizes, and checks the results: the rotary must be identical,
the norm within one unit in the last place (``model_server/models/fused_layers.py`` says why).
On CUDA in bf16 by default, else on the CPU in fp32. Prints a table and one JSON line;
``--json FILE`` also writes it.

    python -m bench.fused_layers [--device cuda] [--dtype bfloat16] [--rows 1,16,64] [--json F]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from transformers import GlmConfig
from transformers.models.glm.modeling_glm import (
    GlmRMSNorm,
    GlmRotaryEmbedding,
    apply_rotary_pos_emb,
)

from model_server.engine.hostmem import keep_freed_pages
from model_server.models.fused_layers import FusedRMSNorm, _RotaryTables, _rotate

from .report import emit_json

HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 4096, 32, 2, 128


def per_call_us(fn: Callable[[], object], device: torch.device, calls: int) -> tuple[float, float]:
    """(host µs to issue one call, wall µs per call once the device has finished)."""
    for _ in range(50):
        fn()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = time.perf_counter() - t0
    sync()
    wall = time.perf_counter() - t0
    return host / calls * 1e6, wall / calls * 1e6


def measure(rows: int, device: torch.device, dtype: torch.dtype, calls: int) -> list[dict]:
    norm = GlmRMSNorm(HIDDEN, eps=1e-5).to(device, dtype)
    norm.weight.data.normal_()
    fused = FusedRMSNorm(norm.weight, norm.variance_epsilon)
    x = torch.randn(rows, 1, HIDDEN, device=device, dtype=dtype)
    cfg = GlmConfig(
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        partial_rotary_factor=0.5,
    )
    rotary = GlmRotaryEmbedding(cfg).to(device)
    q = torch.randn(rows, 1, HEADS, HEAD_DIM, device=device, dtype=dtype).transpose(1, 2)
    k = torch.randn(rows, 1, KV_HEADS, HEAD_DIM, device=device, dtype=dtype).transpose(1, 2)
    with torch.inference_mode():
        a, b = norm(x).float(), fused(x).float()
        ulp = torch.finfo(dtype).eps * a.abs().clamp(min=torch.finfo(dtype).tiny)
        cos, sin = rotary(q, torch.full((rows, 1), 700, device=device))
        c, s = _RotaryTables(HEAD_DIM).get(cos, sin)
        qa, ka = apply_rotary_pos_emb(q, k, cos, sin)
        same = torch.equal(qa, _rotate(q, c, s)) and torch.equal(ka, _rotate(k, c, s))
        norm_t = per_call_us(lambda: norm(x), device, calls)
        fused_t = per_call_us(lambda: fused(x), device, calls)
        rot_t = per_call_us(lambda: apply_rotary_pos_emb(q, k, cos, sin), device, calls)
        ours_t = per_call_us(lambda: (_rotate(q, c, s), _rotate(k, c, s)), device, calls)
    return [
        {
            "op": "rmsnorm",
            "rows": rows,
            "transformers_host_us": norm_t[0],
            "transformers_wall_us": norm_t[1],
            "fused_host_us": fused_t[0],
            "fused_wall_us": fused_t[1],
            "max_abs_diff": float((a - b).abs().max()),
            "within_one_ulp": bool(((a - b).abs() <= ulp).all()),
        },
        {
            "op": "rotary q+k",
            "rows": rows,
            "transformers_host_us": rot_t[0],
            "transformers_wall_us": rot_t[1],
            "fused_host_us": ours_t[0],
            "fused_wall_us": ours_t[1],
            "identical": bool(same),
        },
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cuda = torch.cuda.is_available()
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--dtype", default="bfloat16" if cuda else "float32")
    p.add_argument("--rows", default="1,16,64")
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--json")
    args = p.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cpu":
        # As the engine runs on the CPU: without it, a 1 MiB result is fresh pages every call.
        keep_freed_pages()
    rows = [r for n in args.rows.split(",") for r in measure(int(n), device, dtype, args.calls)]
    print(f"{device} {dtype}: µs per call, host (to issue) / wall")
    print(f"{'op':>11} {'rows':>5} {'transformers':>15} {'fused':>15}  check")
    for r in rows:
        check = "identical" if r.get("identical") else f"max diff {r.get('max_abs_diff', 0):.3g}"
        if r["op"] == "rotary q+k" and not r["identical"]:
            check = "DIFFERENT"
        print(
            f"{r['op']:>11} {r['rows']:>5} "
            f"{r['transformers_host_us']:7.1f}/{r['transformers_wall_us']:<7.1f} "
            f"{r['fused_host_us']:7.1f}/{r['fused_wall_us']:<7.1f}  {check}"
        )
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result = {"device": name, "dtype": args.dtype, "torch": torch.__version__, "rows": rows}
    emit_json(result, args.json)


if __name__ == "__main__":
    main()
