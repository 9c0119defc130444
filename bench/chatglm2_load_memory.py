"""Peak host RAM of ``load_chatglm2`` on a full-size (6B) ChatGLM2 checkpoint.

Writes a checkpoint with the real ChatGLM2-6B config and layout (7 ``pytorch_model-*.bin``
shards + index, random fp16 weights, generated one shard at a time), then loads it with
``load_chatglm2`` on the CPU in a child process and reports the child's peak RSS
(``ru_maxrss``, which also counts memory-mapped shard pages while they are resident)
against the model's size in the target dtype. The target is peak < 1.3x model bytes.
``--quantization-bit 4`` (or 8) writes the published int4/int8 layout instead (random codes
and per-row scales) and reports the same figures for the quantized model.

    .venv/bin/python bench/chatglm2_load_memory.py [--dir DIR] [--dtype float16] [--keep]
        [--quantization-bit 4]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

TARGET_RATIO = 1.3
REAL_6B = {
    "num_layers": 28,
    "hidden": 4096,
    "heads": 32,
    "kv_groups": 2,
    "kv_channels": 128,
    "ffn": 13696,
    "padded_vocab_size": 65024,
}
GIB = 1024**3


def write_checkpoint(
    directory: Path,
    shards: int = 7,
    seed: int = 0,
    num_layers: int = 28,
    quantization_bit: int | None = None,
) -> int:
    """Write the 6B checkpoint shard by shard (RAM ~ one shard); returns bytes of weights."""
    import torch
    from chatglm2_fixture import (
        QUANTIZED_LINEARS,
        chatglm2_config,
        random_tensor,
        tensor_specs,
        train_tokenizer,
        write_remote_code,
    )

    directory.mkdir(parents=True, exist_ok=True)
    cfg = chatglm2_config(**{**REAL_6B, "num_layers": num_layers})
    if quantization_bit:
        cfg["quantization_bit"] = quantization_bit
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    # A small SentencePiece model: the loader only needs n + 5 <= padded_vocab_size.
    (directory / "tokenizer.model").write_bytes(train_tokenizer())
    write_remote_code(directory)

    specs = tensor_specs(cfg)
    sizes = [2 * _numel(shape) for _, shape in specs]
    total = sum(sizes)
    per_shard = total / shards
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    filled = 0
    for spec, size in zip(specs, sizes, strict=True):
        if filled + size / 2 > per_shard * len(groups) and len(groups) < shards:
            groups.append([])
        groups[-1].append(spec)
        filled += size
    gen = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    for k, group in enumerate(groups, start=1):
        file = f"pytorch_model-{k:05d}-of-{len(groups):05d}.bin"
        t0 = time.perf_counter()
        state = {}
        for name, shape in group:
            if quantization_bit and name.endswith(QUANTIZED_LINEARS):
                state.update(random_quantized(name, shape, gen, quantization_bit))
            else:
                state[name] = random_tensor(name, shape, gen, torch.float16)
        torch.save(state, directory / file)
        del state
        weight_map.update(dict.fromkeys((n for n, _ in group), file))
        size = (directory / file).stat().st_size
        print(f"  wrote {file}: {size / GIB:.2f} GiB in {time.perf_counter() - t0:.1f} s")
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))
    return total


def random_quantized(name: str, shape: tuple[int, ...], gen, bits: int) -> dict:
    """Random codes (int8, or packed nibbles) and per-row fp16 scales giving weights of about
    1/sqrt(fan_in), in the published layout."""
    import torch

    top = 2 ** (bits - 1) - 1
    codes = torch.randint(-top, top + 1, shape, generator=gen, dtype=torch.int8)
    if bits == 4:
        codes = ((codes[:, 0::2] << 4) | (codes[:, 1::2] & 0x0F)).to(torch.int8)
    scale = torch.full((shape[0],), 1.0 / (0.58 * top * shape[1] ** 0.5), dtype=torch.float16)
    return {name: codes, name + "_scale": scale}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def child(directory: str, dtype_name: str, forward: bool, no_release: bool) -> None:
    """Runs in the child: load, then print one JSON line with timings and RSS figures."""
    import psutil
    import torch

    from model_server.models.chatglm2 import load_chatglm2, pages

    if no_release:  # for comparison: keep each shard's mmap'd pages until the shard is done
        pages.release = lambda tensor, mappings: 0

    proc = psutil.Process()
    baseline = proc.memory_info().rss
    peak_sampled = [baseline]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak_sampled[0] = max(peak_sampled[0], proc.memory_info().rss)
            stop.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    loaded = load_chatglm2(directory, torch.device("cpu"), getattr(torch, dtype_name), None)
    load_s = time.perf_counter() - t0
    stop.set()
    sampler.join()
    tensors = [*loaded.model.parameters(), *loaded.model.buffers()]  # int4/int8: buffers
    model_bytes = sum(t.numel() * t.element_size() for t in tensors)
    result = {
        "load_s": round(load_s, 2),
        "model_bytes": model_bytes,
        "baseline_rss": baseline,
        "rss_after_load": proc.memory_info().rss,
        "peak_rss_sampled": peak_sampled[0],
        "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "dtype": str(loaded.dtype),
        "params": sum(p.numel() for p in loaded.model.parameters()),
        "page_release": not no_release,
        "quantization": loaded.quantization,
    }
    if forward:
        t1 = time.perf_counter()
        with torch.inference_mode():
            ids = [*loaded.tokenizer.prompt_prefix, *loaded.tokenizer.encode("hi")]
            logits = loaded.model(torch.tensor([ids])).logits
        result["forward_s"] = round(time.perf_counter() - t1, 2)
        result["logits_finite"] = bool(torch.isfinite(logits).all())
    print("RESULT " + json.dumps(result), flush=True)


def try_drop_page_cache() -> bool:
    """Cold-cache loads when we may (root, not in a locked-down container)."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dir", type=Path, help="checkpoint folder (default: a new temp dir)")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint afterwards")
    ap.add_argument("--reuse", action="store_true", help="load an already written --dir")
    ap.add_argument("--forward", action="store_true", help="also run one 3-token forward")
    ap.add_argument("--num-layers", type=int, default=28, help="fewer for a quick dry run")
    ap.add_argument("--quantization-bit", type=int, choices=[4, 8], help="the int4/int8 layout")
    ap.add_argument(
        "--no-release", action="store_true", help="disable pages.release (for comparison)"
    )
    ap.add_argument("--json", type=Path, help="also write the result JSON here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.dtype, args.forward, args.no_release)
        return

    directory = args.dir or Path(tempfile.mkdtemp(prefix="chatglm2-6b-random-"))
    if args.reuse and not (directory / "pytorch_model.bin.index.json").is_file():
        sys.exit(f"--reuse: no checkpoint in {directory}")
    try:
        if not args.reuse:
            print(f"writing a random ChatGLM2-6B checkpoint to {directory} ...")
            t0 = time.perf_counter()
            write_checkpoint(
                directory, num_layers=args.num_layers, quantization_bit=args.quantization_bit
            )
            print(f"  done in {time.perf_counter() - t0:.0f} s")
        ckpt_bytes = sum(p.stat().st_size for p in directory.glob("pytorch_model-*.bin"))
        cold = try_drop_page_cache()
        cmd = [sys.executable, __file__, "--child", str(directory), "--dtype", args.dtype]
        if args.forward:
            cmd.append("--forward")
        if args.no_release:
            cmd.append("--no-release")
        t0 = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - t0
        child_maxrss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        if out.returncode != 0:
            sys.exit(f"child failed ({out.returncode}):\n{out.stderr[-4000:]}")
        line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
        res = json.loads(line[len("RESULT ") :])
        peak = max(child_maxrss, res["ru_maxrss"])
        res.update(
            {
                "checkpoint_bytes": ckpt_bytes,
                "child_wall_s": round(wall, 1),
                "peak_rss": peak,
                "ratio_peak_vs_model": round(peak / res["model_bytes"], 3),
                "ratio_load_increment_vs_model": round(
                    (peak - res["baseline_rss"]) / res["model_bytes"], 3
                ),
                "target_ratio": TARGET_RATIO,
                "ok": peak < TARGET_RATIO * res["model_bytes"],
                "page_cache_dropped": cold,
                "machine": {"cpus": os.cpu_count(), "ram_bytes": _total_ram()},
            }
        )
    finally:
        if not args.keep and not args.reuse:
            shutil.rmtree(directory, ignore_errors=True)

    rows = [
        ("dtype", res["dtype"]),
        ("quantization", str(res["quantization"])),
        ("parameters", f"{res['params'] / 1e9:.3f} B"),
        ("checkpoint on disk", f"{ckpt_bytes / GIB:.2f} GiB"),
        ("model bytes (target dtype)", f"{res['model_bytes'] / GIB:.2f} GiB"),
        ("load time", f"{res['load_s']:.1f} s (child wall {res['child_wall_s']:.1f} s)"),
        ("RSS before load (imports)", f"{res['baseline_rss'] / GIB:.2f} GiB"),
        ("peak RSS (ru_maxrss)", f"{peak / GIB:.2f} GiB"),
        ("RSS after load", f"{res['rss_after_load'] / GIB:.2f} GiB"),
        ("peak / model bytes", f"{res['ratio_peak_vs_model']:.3f} (target < {TARGET_RATIO})"),
        ("(peak - before) / model", f"{res['ratio_load_increment_vs_model']:.3f}"),
        ("page cache dropped first", str(cold)),
        ("mmap pages given back", str(res["page_release"])),
    ]
    if "forward_s" in res:
        rows.append(("3-token forward", f"{res['forward_s']} s, finite={res['logits_finite']}"))
    width = max(len(k) for k, _ in rows)
    print()
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    print()
    print(json.dumps(res, indent=2))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    if not res["ok"]:
        sys.exit(1)


def _total_ram() -> int:
    try:
        import psutil

        return psutil.virtual_memory().total
    except ImportError:  # pragma: no cover
        return 0


if __name__ == "__main__":
    main()
