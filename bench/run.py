"""``python -m bench.run`` (``make bench``): the serving benchmark, end to end.

1. Starts a real ``model-server`` (with ``--metrics-port``) and ``http-bridge`` on free ports.
2. Drives the bridge with the openai SDK (streaming) at each concurrency level, and gRPC
   directly at concurrency 1; samples the server's RSS around the c=64 level and reads its
   queue gauges at the end.
3. Stops both, then runs the scenarios (``bench/scenarios.py``: multiturn, nomax,
   longprompt, slowreaders), each on its own fresh stack (``--only-scenarios``: just these).
4. Runs the transformers baselines in a separate process (``python -m bench.baselines``) on
   the same prompts, lengths and weights.
5. Prints the table and the target checks, and writes ``latest.json`` plus a timestamped copy.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
from openai import AsyncOpenAI

from glmserve.v1 import chat_pb2, chat_pb2_grpc

from . import report, scenarios
from .load import bridge_request_fn, grpc_request_fn, run_interleaved, run_level, summarize
from .machine import CpuWatch, loadavg, machine_info
from .prompts import longest, prompts
from .stack import Stack

ROOT = Path(__file__).resolve().parents[1]
RSS_LEVEL = 64


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def requests_for(concurrency: int, quick: bool) -> int:
    """Requests sent at one level: two full waves (at least 8); quick: one (at least 2)."""
    return max(concurrency, 2) if quick else max(2 * concurrency, 8)


def kv_bytes_per_token(model: str | None, dtype: str) -> int | None:
    """KV-cache bytes per token from the checkpoint's config.json (best effort)."""
    try:
        if model is None:
            from model_server.models.gguf import cache_root, embedded_gguf_path
            from model_server.settings import CLI

            # The directory the bench's model server (same environment) converted into.
            root = cache_root(CLI.parse([]).cache_dir)
            found = sorted(root.glob(embedded_gguf_path().stem + "-*/config.json"))
            config_file = found[-1]
        else:
            config_file = Path(model).expanduser() / "config.json"
        cfg = json.loads(config_file.read_text())
        cfg = cfg.get("text_config", cfg)
        layers = cfg.get("num_hidden_layers") or cfg["num_layers"]
        heads = cfg["num_attention_heads"]
        kv_heads = cfg.get("num_key_value_heads") or cfg.get("multi_query_group_num") or heads
        head_dim = cfg.get("head_dim") or cfg.get("kv_channels") or cfg["hidden_size"] // heads
    except (OSError, KeyError, IndexError, ValueError, ImportError):
        return None
    itemsize = 4 if "32" in dtype else 2
    return int(layers) * 2 * int(kv_heads) * int(head_dim) * itemsize


_COUNTERS = {
    "decode_rows": 'glmserve_batch_size_sum{phase="decode"}',
    "decode_steps": 'glmserve_batch_size_count{phase="decode"}',
    "prefill_rows": 'glmserve_batch_size_sum{phase="prefill"}',
    "prefill_steps": 'glmserve_batch_size_count{phase="prefill"}',
    "prefill_tokens": 'glmserve_step_tokens_total{phase="prefill"}',
}


def engine_counters(stack: Stack) -> dict[str, float]:
    """The engine's step counters from /metrics (to diff around a level)."""
    try:
        m = stack.metrics()
    except OSError:
        return {}
    return {k: m.get(name, 0.0) for k, name in _COUNTERS.items()}


def step_stats(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """Mean decode batch, prefill steps and prefill tokens per step during one level."""
    if not before or not after:
        return {}
    d = {k: after[k] - before[k] for k in _COUNTERS}
    return {
        "decode_steps": int(d["decode_steps"]),
        "mean_decode_batch": d["decode_rows"] / d["decode_steps"] if d["decode_steps"] else None,
        "prefill_steps": int(d["prefill_steps"]),
        "mean_prefill_tokens": (
            d["prefill_tokens"] / d["prefill_steps"] if d["prefill_steps"] else None
        ),
    }


async def _sampler(stack: Stack, peak: dict[str, float], stop: asyncio.Event) -> None:
    """Peaks of the server's RSS and KV gauges while a level runs (every 0.5 s)."""
    while not stop.is_set():
        with contextlib.suppress(Exception):
            rss = await asyncio.to_thread(stack.server_rss)
            m = await asyncio.to_thread(stack.metrics)
            peak["rss"] = max(peak.get("rss", 0), rss)
            for key in ("glmserve_kv_cache_tokens", "glmserve_kv_cache_usage_ratio"):
                peak[key] = max(peak.get(key, 0.0), m.get(key, 0.0))
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.5)


async def drive(stack: Stack, args: argparse.Namespace, result: dict[str, Any]) -> None:
    """All load levels against the running stack; fills result rows and server figures."""
    channel = grpc.aio.insecure_channel(stack.grpc_target)
    stub = chat_pb2_grpc.ChatServiceStub(channel)
    info = (await stub.ListModels(chat_pb2.ListModelsRequest())).models[0]
    result["machine"]["device"] = info.device
    result["model"] = {"id": info.id, "source": info.source, "dtype": info.dtype}
    client = AsyncOpenAI(base_url=stack.base_url, api_key="unused", max_retries=0, timeout=900)
    bridge = bridge_request_fn(client, info.id, args.max_tokens)
    server: dict[str, Any] = {"load_s": stack.load_seconds, "kv_cache_tokens": None}
    result["server"] = server
    rows: list[dict[str, Any]] = []
    try:
        log("warm-up: 2 requests")
        await run_level(bridge, prompts(2), 2)
        for c in args.levels:
            n = requests_for(c, args.quick)
            stop, peak = asyncio.Event(), {}
            if c == RSS_LEVEL:
                server["rss_before_c64"] = stack.server_rss()
            sampler = asyncio.ensure_future(_sampler(stack, peak, stop))
            log(f"bridge c={c}: {n} requests x {args.max_tokens} tokens")
            before = engine_counters(stack)
            watch = CpuWatch(stack.pids)
            ramp = 0.0 if args.burst or c == 1 else result.get("ramp_s", 0.0)
            if c == 1:
                # Bridge and direct gRPC alternate request by request: their ratio is a target.
                grpc_send = grpc_request_fn(stub, info.id, args.max_tokens)
                (results, wall), (g_results, g_wall) = await run_interleaved(
                    [bridge, grpc_send], prompts(n), args.time_box
                )
            else:
                results, wall = await run_level(bridge, prompts(n), c, args.time_box, ramp)
            rows.append(summarize(f"bridge c={c}", "bridge", c, results, wall))
            rows[-1]["foreign_cpu"] = watch.foreign_share()
            stop.set()
            await sampler
            rows[-1].update(step_stats(before, engine_counters(stack)))
            rows[-1]["peak_kv_cache_tokens"] = peak.get("glmserve_kv_cache_tokens")
            rows[-1]["peak_kv_cache_usage_ratio"] = peak.get("glmserve_kv_cache_usage_ratio")
            rows[-1]["peak_rss"] = peak.get("rss")
            log(f"  {rows[-1]['tok_s']:.1f} tok/s, {rows[-1]['errors']} errors, {wall:.1f} s")
            if c == RSS_LEVEL:
                server["rss_after_c64"] = stack.server_rss()
                server["rss_peak_c64"] = max(peak.get("rss", 0), server["rss_after_c64"])
            if c == 1:
                # Later levels spread their users' arrivals over one single-stream request.
                result["ramp_s"] = wall / max(len(results), 1)
                g_row = summarize("grpc c=1", "grpc", 1, g_results, g_wall)
                g_row["foreign_cpu"] = rows[-1]["foreign_cpu"]
                log(f"  grpc c=1: {g_row['tok_s']:.1f} tok/s, {g_row['errors']} errors")
                rows.append(g_row)
                result["prefill_probe_bridge"] = await _longest_probe(client, info.id)
        server["kv_cache_tokens"] = stack.kv_cache_tokens()
        per_token = kv_bytes_per_token(args.model, info.dtype)
        server["kv_bytes_per_token"] = per_token
        server.update(await _queue_gauges(stack))
    finally:
        result["rows"] = rows
        await client.close()
        await channel.close()


async def _longest_probe(client: AsyncOpenAI, model: str, repeats: int = 3) -> dict[str, Any]:
    """TTFT of the longest prompt alone (1 output token) through the bridge, median of 3: a
    full prefill, so each starts with words of its own (the c=1 run sent the same prompt, and
    the prefix cache would otherwise serve all but its last block)."""
    send = bridge_request_fn(client, model, 1)
    results = [await send(f"Probe {i} at {time.time_ns()}: {longest()}") for i in range(repeats)]
    ttfts = [r.ttft for r in results if r.ok and r.ttft is not None]
    return {
        "prompt_tokens": max((r.prompt_tokens for r in results), default=0),
        "ttft_median": statistics.median(ttfts) if ttfts else None,
    }


async def _queue_gauges(stack: Stack, wait: float = 5.0) -> dict[str, float]:
    """glmserve_requests_running / _waiting after the load; waits briefly for them to settle."""
    deadline = time.monotonic() + wait
    while True:
        m = stack.metrics()
        running = m.get("glmserve_requests_running", -1.0)
        waiting = m.get("glmserve_requests_waiting", -1.0)
        if (running == 0 and waiting == 0) or time.monotonic() > deadline:
            return {"requests_running_end": running, "requests_waiting_end": waiting}
        await asyncio.sleep(0.2)


def run_baselines(args: argparse.Namespace) -> dict[str, Any]:
    """``python -m bench.baselines`` in its own process; its JSON (or the failure text)."""
    batch_size = 4 if args.quick else args.batch_size
    cmd = [sys.executable, "-m", "bench.baselines", "--max-tokens", str(args.max_tokens)]
    cmd += ["--sequential", str(requests_for(1, args.quick))]
    cmd += ["--batch-prompts", str(max(requests_for(16, args.quick), batch_size))]
    cmd += ["--batch-size", str(batch_size)]
    cmd += ["--hf-continuous" if args.hf_continuous else "--no-hf-continuous"]
    if args.model:
        cmd += ["--model", args.model]
    log("baselines: " + " ".join(cmd[1:]))
    watch = CpuWatch([os.getpid()])  # the child's CPU time counts once it has been waited for
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True, timeout=1800)
    foreign = watch.foreign_share()
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(report.MARKER):
            out = json.loads(line[len(report.MARKER) :])
            for row in out.get("rows", []):
                row["foreign_cpu"] = foreign  # one figure for the whole baseline process
            return out
    return {"error": f"exit {proc.returncode}; stdout tail: {proc.stdout[-2000:]}", "rows": []}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: levels 1,4, few requests")
    p.add_argument("--levels", help="comma-separated bridge concurrencies (default 1,4,16,64)")
    p.add_argument("--max-tokens", type=int, help="fixed reply length (default 128; quick 16)")
    p.add_argument("--model", help="model-server --model (default: the embedded SmolLM2)")
    p.add_argument("--no-baselines", action="store_true", help="skip the transformers baselines")
    p.add_argument(
        "--hf-continuous",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run transformers' continuous batching (generate_batch)",
    )
    p.add_argument(
        "--burst",
        action="store_true",
        help="start each level's workers at the same instant (default: spread over one "
        "single-stream request duration, measured at c=1)",
    )
    p.add_argument(
        "--scenarios",
        help=f"comma-separated scenarios to run after the levels (default: all of "
        f"{','.join(scenarios.NAMES)}; none with --quick)",
    )
    p.add_argument("--no-scenarios", action="store_true", help="skip the scenarios")
    p.add_argument(
        "--only-scenarios",
        action="store_true",
        help="run just the scenarios: no load levels, no baselines",
    )
    p.add_argument(
        "--longprompt-kv-tokens",
        type=int,
        default=scenarios.LONG_KV_TOKENS,
        help="longprompt: the server's KV budget N (passed as --kv-cache-tokens N, or "
        "--max-num-batched-tokens N when the server lists only that)",
    )
    p.add_argument(
        "--longprompt-server-args",
        help="longprompt: model-server flags instead of the KV flag above "
        "(e.g. '--kv-cache-tokens 16384 --max-num-seqs 64')",
    )
    p.add_argument(
        "--rss-guard-mib",
        type=int,
        default=scenarios.Options.rss_guard_mib,
        help="longprompt: cap the server's data segment (RLIMIT_DATA) at its size before the "
        "load + this many MiB, so a runaway engine fails inside the server instead of "
        "exhausting this machine's memory (0: no cap)",
    )
    p.add_argument(
        "--slowreaders-model",
        default="tiny",
        help="slowreaders: the model server's model: 'tiny' (a tiny random checkpoint built "
        "for the run, so the bridge is what gets loaded), 'same' (--model's), or a directory",
    )
    p.add_argument(
        "--slow-readers",
        type=int,
        default=scenarios.SLOW_READERS,
        help="slowreaders: clients that read one byte per second",
    )
    p.add_argument(
        "--slow-seconds",
        type=float,
        default=scenarios.SLOW_SECONDS,
        help="slowreaders: seconds of the c=16 loop, alone and beside the slow clients",
    )
    p.add_argument(
        "--scenario-time-box",
        type=float,
        default=scenarios.Options.time_box_s,
        help="seconds of load per scenario at most; requests still open then count as errors",
    )
    p.add_argument("--batch-size", type=int, default=16, help="HF static batch size")
    p.add_argument("--time-box", type=float, default=240.0, help="seconds per level at most")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="JSON directory")
    args = p.parse_args(argv)
    default_levels = "1,4" if args.quick else "1,4,16,64"
    args.levels = [int(x) for x in (args.levels or default_levels).split(",") if x.strip()]
    if args.max_tokens is None:
        args.max_tokens = 16 if args.quick else 128
    if args.no_scenarios:
        args.scenarios = []
    elif args.scenarios is None:
        args.scenarios = [] if args.quick and not args.only_scenarios else list(scenarios.NAMES)
    else:
        args.scenarios = [x.strip() for x in args.scenarios.split(",") if x.strip()]
    unknown = [x for x in args.scenarios if x not in scenarios.NAMES]
    if unknown:
        p.error(f"unknown scenario(s) {','.join(unknown)}; known: {','.join(scenarios.NAMES)}")
    if args.only_scenarios and not args.scenarios:
        p.error("--only-scenarios with no scenario to run")
    return args


def scenario_options(args: argparse.Namespace) -> scenarios.Options:
    server_args = args.longprompt_server_args
    return scenarios.Options(
        model=args.model,
        long_kv_tokens=args.longprompt_kv_tokens,
        long_server_args=None if server_args is None else shlex.split(server_args),
        rss_guard_mib=args.rss_guard_mib,
        time_box_s=args.scenario_time_box,
        slow_model=args.model if args.slowreaders_model == "same" else args.slowreaders_model,
        slow_readers=args.slow_readers,
        slow_seconds=args.slow_seconds,
    )


def _sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm)
    result: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(),
        "config": {
            "levels": args.levels,
            "max_tokens": args.max_tokens,
            "quick": args.quick,
            "arrivals": "burst" if args.burst else "ramp over one c=1 request duration",
            "model": args.model or "default (embedded SmolLM2-135M-Instruct)",
            "time_box_s": args.time_box,
            "requests_per_level": {c: requests_for(c, args.quick) for c in args.levels},
            "scenarios": args.scenarios,
            "only_scenarios": args.only_scenarios,
        },
        "rows": [],
    }
    t0 = time.perf_counter()
    log(f"load average {result['machine']['loadavg_start']}")
    if not args.only_scenarios:
        log("starting model-server + bridge")
        with Stack(args.model) as stack:
            log(f"model server SERVING after {stack.load_seconds:.1f} s")
            asyncio.run(drive(stack, args, result))
    if args.scenarios:
        result["scenarios"] = scenarios.run_scenarios(args.scenarios, scenario_options(args))
        devices = [s["device"] for s in result["scenarios"].values() if s.get("device")]
        if devices:
            result["machine"].setdefault("device", devices[0])
    if not args.no_baselines and not args.only_scenarios:
        baselines = run_baselines(args)
        result["baselines"] = {k: v for k, v in baselines.items() if k != "rows"}
        result["rows"] += baselines.get("rows", [])
        if "prefill_longest" in baselines:
            result["prefill_longest"] = {
                **baselines["prefill_longest"],
                "source": "one forward of the longest prompt in the baseline process",
            }
    if "prefill_longest" not in result and not args.only_scenarios:
        probe = result.get("prefill_probe_bridge") or {}
        result["prefill_longest"] = {
            "prompt_tokens": probe.get("prompt_tokens"),
            "seconds": probe.get("ttft_median"),
            "source": "TTFT of the longest prompt alone through the bridge",
        }
    order = {"bridge": 0, "grpc": 1, "hf": 2}
    result["rows"].sort(key=lambda r: (order.get(r.get("kind"), 3), r.get("concurrency") or 0))
    result["machine"]["loadavg_end"] = loadavg()
    result["elapsed_s"] = time.perf_counter() - t0
    result["targets"] = report.targets(result)
    print(report.render(result))
    latest, stamped = report.write(result, args.out)
    log(f"wrote {latest} and {stamped.name} ({result['elapsed_s']:.0f} s in all)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted; model-server and http-bridge were stopped")
        sys.exit(130)
