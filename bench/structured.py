"""Structured outputs end to end on the embedded model (SmolLM2-135M): validity and cost.

1. **Validity**: 20 ``response_format: json_schema`` requests at temperature 0.7 through the
   bridge with the openai SDK; every reply must parse and validate against the schema.
2. **Constraint cost**: per-token latency (time between the first and the last streamed token,
   divided by the tokens between them) with the schema vs without, at concurrency 1 and 16. The
   issue's target is at most 1.15x.

    .venv/bin/python -m bench.structured [--json out.json] [--model DIR]

Prints a table and the JSON. On a shared CPU the numbers move with the load (``loadavg`` is
recorded); compare the two columns of one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from typing import Any

import jsonschema
from openai import AsyncOpenAI

from .stack import Stack

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "city": {"type": "string", "maxLength": 40},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 30}, "maxItems": 4},
        "employed": {"type": "boolean"},
    },
    "required": ["name", "age", "city", "hobbies", "employed"],
    "additionalProperties": False,
}
PROMPT = [{"role": "user", "content": "Invent a person and describe them as JSON."}]
FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
TOKENS = 64  # the unconstrained requests' length (the constrained ones end with the JSON)


def log(msg: str) -> None:
    print(f"[structured {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


async def timed(client: AsyncOpenAI, model: str, constrained: bool, seed: int) -> dict[str, Any]:
    kw: dict[str, Any] = (
        {"response_format": FORMAT} if constrained else {"extra_body": {"ignore_eos": True}}
    )
    first = last = None
    usage = None
    text = []
    stream = await client.chat.completions.create(
        model=model, messages=PROMPT, max_tokens=TOKENS * 3 if constrained else TOKENS,
        temperature=0.7, seed=seed, stream=True, stream_options={"include_usage": True}, **kw,
    )  # fmt: skip
    async for chunk in stream:
        now = time.perf_counter()
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                first = first or now
                last = now
                text.append(choice.delta.content)
    tokens = usage.completion_tokens if usage else 0
    per_token = (last - first) / (tokens - 1) if first and last and tokens > 1 else None
    return {"tokens": tokens, "per_token_s": per_token, "text": "".join(text)}


async def level(client: AsyncOpenAI, model: str, constrained: bool, c: int) -> dict[str, Any]:
    rounds = 2 if c == 1 else 1

    async def worker(w: int) -> list[dict[str, Any]]:
        return [await timed(client, model, constrained, 1000 * w + r) for r in range(rounds)]

    results = [r for rs in await asyncio.gather(*(worker(w) for w in range(c))) for r in rs]
    per_token = [r["per_token_s"] for r in results if r["per_token_s"]]
    return {
        "requests": len(results),
        "mean_tokens": round(statistics.mean(r["tokens"] for r in results), 1),
        "per_token_ms": round(statistics.median(per_token) * 1e3, 2),
    }


async def validity(client: AsyncOpenAI, model: str, n: int = 20) -> dict[str, Any]:
    async def one(seed: int) -> bool:
        out = await client.chat.completions.create(
            model=model, messages=PROMPT, max_tokens=400, temperature=0.7, seed=seed,
            response_format=FORMAT,
        )  # fmt: skip
        try:
            jsonschema.validate(json.loads(out.choices[0].message.content), SCHEMA)
            return True
        except (ValueError, jsonschema.ValidationError):
            return False

    ok = await asyncio.gather(*(one(s) for s in range(n)))
    log(f"validity: {sum(ok)}/{n}")
    return {"requests": n, "valid": sum(ok)}


async def run(base_url: str) -> dict[str, Any]:
    client = AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)
    model = (await client.models.list()).data[0].id
    await timed(client, model, True, 0)  # warm-up: the grammar engine's tokenizer (~1 s)
    out: dict[str, Any] = {"validity": await validity(client, model), "levels": {}}
    for c in (1, 16):
        plain = await level(client, model, False, c)
        log(f"c={c} plain: {plain}")
        schema = await level(client, model, True, c)
        log(f"c={c} schema: {schema}")
        ratio = schema["per_token_ms"] / plain["per_token_ms"]
        out["levels"][str(c)] = {"plain": plain, "schema": schema, "ratio": round(ratio, 3)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()
    with Stack(args.model) as stack:
        results = asyncio.run(run(stack.base_url))
    results["loadavg"] = os.getloadavg()
    v = results["validity"]
    print(f"json_schema validity: {v['valid']}/{v['requests']} valid (temperature 0.7)")
    print("| c | plain ms/token | schema ms/token | ratio (target <= 1.15) |")
    print("|---|---|---|---|")
    for c, r in results["levels"].items():
        print(
            f"| {c} | {r['plain']['per_token_ms']} | {r['schema']['per_token_ms']} | {r['ratio']} |"
        )
    print(json.dumps(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
