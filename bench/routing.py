"""``python -m bench.routing``: least-loaded against round-robin routing, with skewed lengths.

Starts ``--servers`` model servers and, per policy, one bridge with ``--backend-routing``
over all of them, then sends the same closed-loop workload to each: ``--concurrency``
clients, ``--requests`` chats in a fixed (seeded) order, a ``--long-share`` of them long
(``--long-tokens``, ``ignore_eos``), the rest short. Round robin hands out calls in turn
whatever is still running, so short requests queue behind long ones on one server while
another idles; least-loaded sends each call to the server with the fewest in flight.

Policies run ``--rounds`` times each in ABBA order. Prints a table and the JSON (also written
to ``bench/results/routing-<time>.json``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from glmserve.testing import Proc, spawn_bridge, spawn_model_server, wait_until

ROOT = Path(__file__).resolve().parents[1]
POLICIES = ("round-robin", "least-loaded")
HI = [{"role": "user", "content": "Tell me a story about a lighthouse."}]


def workload(n: int, long_share: float, seed: int) -> list[bool]:
    """Which requests are long, in order (the same for every policy): exactly
    ``round(n * long_share)`` of them, at seeded random places."""
    long = round(n * long_share)
    order = [True] * long + [False] * (n - long)
    random.Random(seed).shuffle(order)
    return order


def finished(server: Proc) -> float:
    return sum(v for k, v in server.metrics().items() if k.startswith("glmserve_requests_total"))


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


async def drive(url: str, model: str, longs: list[bool], args: argparse.Namespace) -> dict:
    """Closed loop: ``concurrency`` workers take the next request until none is left."""
    queue = list(enumerate(longs))
    latencies: dict[str, list[float]] = {"short": [], "long": []}
    failures = 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal failures
        while queue:
            _, long = queue.pop(0)
            tokens = args.long_tokens if long else args.short_tokens
            body = {"model": model, "messages": HI, "max_tokens": tokens, "ignore_eos": True}
            start = time.perf_counter()
            r = await client.post(url + "/v1/chat/completions", json=body)
            if r.status_code != 200:
                failures += 1
                continue
            latencies["long" if long else "short"].append(time.perf_counter() - start)

    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=600) as client:
        await asyncio.gather(*(worker(client) for _ in range(args.concurrency)))
    wall = time.perf_counter() - start
    done = len(latencies["short"]) + len(latencies["long"])
    return {
        "wall_s": wall,
        "requests_per_s": done / wall,
        "failures": failures,
        "short_p50_s": pct(latencies["short"], 0.5),
        "short_p95_s": pct(latencies["short"], 0.95),
        "long_p50_s": pct(latencies["long"], 0.5),
        "mean_s": statistics.fmean(latencies["short"] + latencies["long"]) if done else None,
    }


def run_policy(policy: str, servers: list[Proc], longs: list[bool], args: argparse.Namespace):
    backends = "ipv4:" + ",".join(f"127.0.0.1:{s.port}" for s in servers)
    bridge = spawn_bridge("--backend", backends, "--backend-routing", policy, "--no-ui")
    try:
        wait_until(lambda: httpx.get(bridge.url + "/health").status_code == 200, 60, "healthy")
        model = httpx.get(bridge.url + "/v1/models").json()["data"][0]["id"]
        before = [finished(s) for s in servers]
        row = asyncio.run(drive(bridge.url, model, longs, args))
        row["per_server"] = [finished(s) - b for s, b in zip(servers, before, strict=True)]
        return {"policy": policy, **row}
    finally:
        bridge.stop()


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def table(rows: list[dict[str, Any]]) -> str:
    cols = ["round", "policy", "req/s", "short p50 s", "short p95 s", "long p50 s", "mean s"]
    cols += ["per server", "failed"]
    lines = ["| " + " | ".join(cols) + " |", "|---" * len(cols) + "|"]
    for r in rows:
        share = "/".join(str(int(n)) for n in r["per_server"])
        lines.append(
            f"| {r['round']} | {r['policy']} | {r['requests_per_s']:.2f} | "
            f"{_s(r['short_p50_s'])} | {_s(r['short_p95_s'])} | {_s(r['long_p50_s'])} | "
            f"{_s(r['mean_s'])} | {share} | "
            f"{r['failures']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.routing", description=__doc__)
    ap.add_argument("--model", default=None, help="checkpoint dir (default: the embedded one)")
    ap.add_argument("--servers", type=int, default=2)
    ap.add_argument("--requests", type=int, default=96)
    ap.add_argument("--concurrency", type=int, default=6)
    ap.add_argument("--long-share", type=float, default=0.15)
    ap.add_argument("--long-tokens", type=int, default=256)
    ap.add_argument("--short-tokens", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=2, help="policy runs each, in ABBA order")
    ap.add_argument("--server-arg", action="append", default=[], help="extra model-server flag")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args(argv)

    longs = workload(args.requests, args.long_share, args.seed)
    servers = [
        spawn_model_server(args.model, *args.server_arg, wait=False) for _ in range(args.servers)
    ]
    try:
        for s in servers:
            wait_until(lambda s=s: s.alive() and _serving(s), 600, "model server SERVING")
        rows = []
        for i in range(args.rounds):  # ABBA: drift on a shared machine hits both policies
            for policy in POLICIES if i % 2 == 0 else POLICIES[::-1]:
                rows.append({"round": i + 1, **run_policy(policy, servers, longs, args)})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)  # survives a kill
    finally:
        for s in servers:
            s.stop()
    result = {
        "benchmark": "routing",
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "long_requests": sum(longs),
        "rows": rows,
    }
    print(table(rows))
    print(json.dumps(result, indent=2))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"routing-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written {path}", file=sys.stderr)


def _serving(server: Proc) -> bool:
    from glmserve.testing import SERVING, health_status

    return health_status(server.target) == SERVING


if __name__ == "__main__":
    main()
