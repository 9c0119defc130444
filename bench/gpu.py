"""``python -m bench.gpu``: the model server on a GPU against the HBM bound (issue 9).

Writes a ChatGLM2-6B-shaped checkpoint with random fp16 weights (``bench/chatglm2_load_memory``;
or serves ``--model DIR``), starts the real ``model-server`` on CUDA (no bridge: this measures
the engine through gRPC), and drives ``glmserve.v1 ChatService.Chat`` at each concurrency with
fixed-length greedy replies. The bound for a decode step of B rows is reading every weight
once: ``B * bandwidth / weight_bytes`` tok/s, with the bandwidth measured here (a device copy,
bytes read + written). Prints a table and one JSON line; ``--json FILE`` also writes it.

    python -m bench.gpu [--dir /tmp/glm6b] [--levels 1,16,64] [--max-tokens 128] [--structured]
                        [--json F]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc

from glmserve.v1 import chat_pb2, chat_pb2_grpc

from .load import grpc_request_fn, run_level, summarize
from .prompts import prompts
from .report import emit_json
from .stack import Stack


def log(msg: str) -> None:
    print(f"[bench.gpu {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def bandwidth_bytes_per_s(gib: float = 2.0) -> float:
    """Device-to-device copy rate, counting bytes read and written (best of 5)."""
    import torch

    n = int(gib * 2**30)
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n / best


def gpu_memory_mib(pid: int) -> int | None:
    """GPU memory nvidia-smi attributes to ``pid`` (None when it cannot tell)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0] == str(pid):
            return int(parts[1])
    return None


def cuda_context_mib() -> int | None:
    """GPU memory of a process that only initialises CUDA (what every process pays)."""
    code = (
        "import torch, time; torch.zeros(1, device='cuda'); print('up', flush=True); time.sleep(30)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        proc.stdout.readline()  # type: ignore[union-attr]
        return gpu_memory_mib(proc.pid)
    finally:
        proc.kill()
        proc.wait()


def weight_bytes(model_dir: Path) -> int:
    """Bytes of the checkpoint's weight files (int4/int8: the packed size)."""
    files = [*model_dir.glob("pytorch_model*.bin"), *model_dir.glob("*.safetensors")]
    return sum(f.stat().st_size for f in files)


# An array of at least 50 small objects: longer than any --max-tokens reply here, so
# constrained replies run to max_tokens like the plain ones (ignore_eos is not allowed with a
# grammar), while every token's mask comes from a JSON schema (llguidance on the host).
LONG_SCHEMA = {
    "type": "array",
    "minItems": 50,
    "items": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "age": {"type": "integer", "minimum": 0, "maximum": 130},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    },
}


async def drive(
    target: str, levels: list[int], max_tokens: int, structured: bool
) -> list[dict[str, Any]]:
    """Each level once; with ``structured``, each level plain and under LONG_SCHEMA, in
    alternating order (what runs second meets shapes and memory the first one warmed: under
    torch's default SDPA that was cuDNN's plan cache, docs/engine.md "GPU"), each mode on its
    own prompts (a tag in front: no prefix-cache hits across modes)."""
    rows = []
    schema = chat_pb2.StructuredOutput(json_schema=json.dumps(LONG_SCHEMA))
    async with grpc.aio.insecure_channel(target) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        modes = {"": grpc_request_fn(stub, "", max_tokens)}
        if structured:
            modes[" schema"] = grpc_request_fn(stub, "", max_tokens, structured=schema)
        for send in modes.values():
            await run_level(send, prompts(2), 1)  # warm-up: allocator, kernels, grammar
        for i, c in enumerate(levels):
            for suffix, send in list(modes.items())[:: -1 if i % 2 else 1]:
                texts = prompts(max(2 * c, 4))
                if structured:
                    texts = [f"({suffix.strip() or 'plain'}) {t}" for t in texts]
                results, wall = await run_level(send, texts, c, ramp=0.5)
                rows.append(summarize(f"grpc c={c}{suffix}", "grpc", c, results, wall))
                row = rows[-1]
                log(f"{row['name']}: {row['tok_s']:.1f} tok/s, {row['errors']} errors")
    return rows


def decode_steps(metrics: dict[str, float]) -> dict[str, float]:
    """``glmserve_decode_steps_total`` by mode: how many steps replayed a CUDA graph."""
    prefix = 'glmserve_decode_steps_total{mode="'
    return {k[len(prefix) : -2]: v for k, v in metrics.items() if k.startswith(prefix)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="serve this checkpoint instead of writing one")
    p.add_argument("--dir", type=Path, help="where to write it (default under /tmp)")
    p.add_argument("--quantization-bit", type=int, choices=[4, 8], help="write int4/int8")
    p.add_argument("--levels", default="1,16,64")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--server-arg", action="append", default=[], help="extra model-server flag")
    p.add_argument("--structured", action="store_true", help="each level also under a JSON schema")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    levels = [int(x) for x in args.levels.split(",")]

    import torch

    if not torch.cuda.is_available():
        sys.exit("bench.gpu needs a CUDA device")
    gpu = torch.cuda.get_device_name(0)
    bw = bandwidth_bytes_per_s()
    context = cuda_context_mib()
    log(f"{gpu}: copy bandwidth {bw / 1e12:.2f} TB/s, CUDA context {context} MiB")
    model_dir = args.model
    if model_dir is None:
        from .chatglm2_load_memory import write_checkpoint

        bits = args.quantization_bit
        model_dir = args.dir or Path(
            f"/tmp/glmserve-chatglm2-6b-random{f'-int{bits}' if bits else ''}"
        )
        if not (model_dir / "config.json").exists():
            t0 = time.perf_counter()
            write_checkpoint(model_dir, quantization_bit=bits)
            log(f"wrote {model_dir} in {time.perf_counter() - t0:.0f} s")
    wbytes = weight_bytes(model_dir)
    server_args = ("--device", "cuda", "--max-num-seqs", str(max(levels)), *args.server_arg)
    with Stack(str(model_dir), server_args=server_args, bridge=False) as stack:
        log(f"model server SERVING after {stack.load_seconds:.0f} s")
        mem = gpu_memory_mib(stack.server.pid)  # type: ignore[union-attr]
        rows = asyncio.run(drive(stack.grpc_target, levels, args.max_tokens, args.structured))
        mem_after = gpu_memory_mib(stack.server.pid)  # type: ignore[union-attr]
        steps = decode_steps(stack.metrics())
    for row in rows:
        row["hbm_bound_tok_s"] = row["concurrency"] * bw / wbytes
        row["of_bound"] = row["tok_s"] / row["hbm_bound_tok_s"]
    print(f"\n{gpu}, {wbytes / 2**30:.2f} GiB weights, copy {bw / 1e12:.2f} TB/s")
    print(f"GPU memory (nvidia-smi): {mem} MiB loaded, {mem_after} MiB after the run, of which")
    print(f"{context} MiB is the CUDA context any process has")
    print("decode steps by how they ran:", ", ".join(f"{k} {v:.0f}" for k, v in steps.items()))
    head = ("row", "tok/s", "bound", "of bound", "ttft p50", "itl p50")
    print("{:>17} {:>8} {:>8} {:>8} {:>9} {:>8}".format(*head))
    for r in rows:
        print(
            f"{r['name']:>17} {r['tok_s']:8.1f} {r['hbm_bound_tok_s']:8.0f} "
            f"{r['of_bound']:8.1%} {r['ttft_p50'] or 0:9.3f} {r['itl_p50'] or 0:8.4f}"
        )
    result = {
        "gpu": gpu,
        "torch": torch.__version__,
        "weight_bytes": wbytes,
        "copy_bandwidth_bytes_s": bw,
        "load_s": stack.load_seconds,
        "cuda_context_mib": context,
        "gpu_memory_mib_loaded": mem,
        "gpu_memory_mib_after": mem_after,
        "decode_steps": steps,
        "rows": rows,
    }
    emit_json(result, args.json)


if __name__ == "__main__":
    main()
