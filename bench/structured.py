"""Structured outputs end to end on the embedded model (SmolLM2-135M): validity and cost.

1. **Validity**: 20 ``response_format: json_schema`` requests at temperature 0.7 through the
   bridge with the openai SDK; every reply must parse and validate against the schema.
2. **Constraint cost**: per-token latency (time between the first and the last streamed token,
   divided by the tokens between them) with the schema vs without, at concurrency 1 and 16,
   through the bridge (rounds in ABBA order). The issue's target is at most 1.15x.
3. **Engine cost** (``--engine``, in-process, no servers): the same model's decode steps for a
   batch of 1 and 16 rows, sampled plainly vs every row under the schema's grammar (mask,
   sample, advance; a finished grammar starts over), in *CPU time* of the process on one torch
   thread: wall-clock latency on a shared box moves with everyone else's load, CPU time much
   less (and idle intra-op threads spinning would bill it for nothing).

    .venv/bin/python -m bench.structured [--json out.json] [--model DIR] [--engine]

Prints a table and the JSON (``loadavg`` is recorded).
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
        # ABBA: the machine's load drifts; each side gets an early and a late round.
        runs = {False: [], True: []}
        for constrained in (False, True, True, False):
            runs[constrained].append(await level(client, model, constrained, c))
            log(f"c={c} {'schema' if constrained else 'plain'}: {runs[constrained][-1]}")
        plain, schema = (
            {
                "requests": sum(r["requests"] for r in rs),
                "mean_tokens": round(statistics.mean(r["mean_tokens"] for r in rs), 1),
                "per_token_ms": round(statistics.mean(r["per_token_ms"] for r in rs), 2),
            }
            for rs in (runs[False], runs[True])
        )
        ratio = schema["per_token_ms"] / plain["per_token_ms"]
        out["levels"][str(c)] = {"plain": plain, "schema": schema, "ratio": round(ratio, 3)}
    return out


def engine_cost(model: str | None, steps: int = 32) -> dict[str, Any]:
    """CPU seconds per decode step, plain vs constrained, at batch 1 and 16 (in-process)."""
    import torch

    from model_server.engine import kv
    from model_server.engine.grammar import Grammars
    from model_server.engine.runner import ModelRunner
    from model_server.engine.sampling import RowSampling, sample
    from model_server.engine.types import SamplingParams
    from model_server.models import DEFAULT_MODEL
    from model_server.models.base import ChatMessage
    from model_server.models.registry import load_model

    # One thread: on a shared box, idle intra-op threads spin and bill CPU time for nothing.
    torch.set_num_threads(1)
    loaded = load_model(model or DEFAULT_MODEL, torch.device("cpu"), "auto", None)
    runner = ModelRunner(loaded)
    grammars = Grammars(loaded, runner.vocab)
    grammar = grammars.json_schema(SCHEMA, "bench")
    prompt = loaded.chat_format.render([ChatMessage("user", PROMPT[0]["content"])])
    out: dict[str, Any] = {}
    with torch.inference_mode():
        for batch in (1, 16):
            per_mode = {}
            for constrained in (False, True, True, False):  # ABBA
                cache = kv.new_cache()
                ids = torch.tensor([prompt] * batch)
                mask = torch.ones_like(ids)
                logits = runner.forward(
                    ids, mask, torch.arange(len(prompt)).expand(batch, -1), cache
                )
                matchers = [grammars.matcher(grammar) for _ in range(batch)] if constrained else []
                rows = [
                    RowSampling(
                        SamplingParams(max_tokens=steps, temperature=0.7),
                        torch.Generator().manual_seed(i),
                        0,
                        logit_masks=[matchers[i].mask] if constrained else [],
                    )  # fmt: skip
                    for i in range(batch)
                ]
                spent = 0.0
                for step in range(steps):
                    t0 = time.process_time()
                    result = sample(logits, rows, frozenset(), None)
                    tokens = [t or 0 for t in result.tokens]
                    for i, m in enumerate(matchers):
                        m.accept(tokens[i])
                        if m.done or m.error:  # keep every row constrained: start over
                            matchers[i] = grammars.matcher(grammar)
                            rows[i].logit_masks = [matchers[i].mask]
                    mask = torch.cat([mask, torch.ones(batch, 1, dtype=torch.long)], dim=1)
                    pos = torch.full((batch, 1), len(prompt) + step)
                    logits = runner.forward(torch.tensor([[t] for t in tokens]), mask, pos, cache)
                    spent += time.process_time() - t0
                per_mode.setdefault(constrained, []).append(spent / steps)
                log(f"engine batch={batch} constrained={constrained}: {spent / steps * 1e3:.1f} ms")
            plain = statistics.mean(per_mode[False])
            schema = statistics.mean(per_mode[True])
            out[str(batch)] = {
                "plain_cpu_ms_per_step": round(plain * 1e3, 2),
                "schema_cpu_ms_per_step": round(schema * 1e3, 2),
                "ratio": round(schema / plain, 3),
            }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2")
    parser.add_argument("--json", help="write the results here too")
    parser.add_argument("--engine", action="store_true", help="only the in-process engine cost")
    args = parser.parse_args()
    if args.engine:
        results = {"engine": engine_cost(args.model), "loadavg": os.getloadavg()}
        print("| batch | plain CPU ms/step | schema CPU ms/step | ratio (target <= 1.15) |")
        print("|---|---|---|---|")
        for b, r in results["engine"].items():
            print(
                f"| {b} | {r['plain_cpu_ms_per_step']} | {r['schema_cpu_ms_per_step']} | "
                f"{r['ratio']} |"
            )
        print(json.dumps(results))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)
        return
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
