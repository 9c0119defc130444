"""Per-token cost of grammar-constrained decoding: xgrammar vs llguidance vs outlines-core.

What the engine pays per constrained row and step: compute the allowed-token mask, apply it to
the row's logits ([V] fp32), advance the matcher by the sampled token. Measured on the embedded
model's tokenizer (SmolLM2, 49,152 tokens) over the token sequence of a valid reply, for a small
and a nested JSON schema, plus the one-off compile time. A decode step of the model itself is
the yardstick: ``bench/run.py`` measures it (tens of ms on this CPU at c=1).

    .venv/bin/python -m bench.grammar_engines [--json out.json] [--repeat 5]

Engines that are not installed are skipped (``pip install xgrammar llguidance outlines-core``;
only llguidance is a dependency of the server extra).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

SMALL = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "city": {"type": "string", "enum": ["Paris", "Berlin", "Tokyo"]},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}
NESTED = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 80},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                    "qty": {"type": "integer", "minimum": 1},
                    "price": {"type": "number"},
                },
                "required": ["sku", "qty", "price"],
                "additionalProperties": False,
            },
        },
        "paid": {"type": "boolean"},
    },
    "required": ["title", "tags", "items", "paid"],
    "additionalProperties": False,
}
INSTANCES = {
    "small": (SMALL, {"name": "Ada Lovelace", "age": 36, "city": "Paris"}),
    "nested": (
        NESTED,
        {
            "title": "Order for the lab, second quarter",
            "tags": ["urgent", "lab", "q2"],
            "items": [
                {"sku": "ABC-1234", "qty": 2, "price": 19.5},
                {"sku": "XYZ-0001", "qty": 10, "price": 3.25},
                {"sku": "QRS-9876", "qty": 1, "price": 120.0},
            ],
            "paid": False,
        },
    ),
}


class Session:
    """One engine's matcher for one schema: mask(logits) and accept(token)."""

    mask: Callable[[torch.Tensor], None]
    accept: Callable[[int], None]


def apply_bitmask(row: torch.Tensor, bits: torch.Tensor) -> None:
    """The same apply for every engine (the one model_server/engine/grammar.py uses): the
    engines' own torch helpers cost milliseconds per [V] row on a busy CPU, or a torch.compile."""
    allowed = np.unpackbits(bits.numpy().view(np.uint8), bitorder="little")
    row.numpy()[allowed[: row.shape[0]] == 0] = -np.inf


def xgrammar_factory(hf_tok: Any, vocab: int) -> Callable[[dict], Session]:
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(hf_tok, vocab_size=vocab)
    compiler = xgr.GrammarCompiler(info, cache_enabled=False)

    def make(schema: dict) -> Session:
        compiled = compiler.compile_json_schema(
            json.dumps(schema), any_whitespace=False, separators=(",", ":")
        )
        matcher = xgr.GrammarMatcher(compiled)
        bitmask = xgr.allocate_token_bitmask(1, vocab)
        s = Session()

        def mask(row: torch.Tensor) -> None:
            matcher.fill_next_token_bitmask(bitmask)
            apply_bitmask(row, bitmask[0])

        def accept(t: int) -> None:
            if not matcher.accept_token(t):
                raise RuntimeError(f"xgrammar rejected token {t}")

        s.mask, s.accept = mask, accept
        return s

    return make


def llguidance_factory(hf_tok: Any, vocab: int) -> Callable[[dict], Session]:
    import llguidance
    import llguidance.hf
    import llguidance.torch

    tok = llguidance.hf.from_tokenizer(hf_tok, n_vocab=vocab)

    def make(schema: dict) -> Session:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": False}
        )
        matcher = llguidance.LLMatcher(tok, grammar)
        if matcher.is_error():
            raise RuntimeError(matcher.get_error())
        bitmask = llguidance.torch.allocate_token_bitmask(1, vocab)
        s = Session()

        def mask(row: torch.Tensor) -> None:
            llguidance.torch.fill_next_token_bitmask(matcher, bitmask, 0)
            apply_bitmask(row, bitmask[0])

        def accept(t: int) -> None:
            if not matcher.consume_token(t):
                raise RuntimeError(f"llguidance rejected token {t}: {matcher.get_error()}")

        s.mask, s.accept = mask, accept
        return s

    return make


def outlines_factory(hf_tok: Any, vocab: int) -> Callable[[dict], Session]:
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    from model_server.models.hf import HFTokenizer

    table = HFTokenizer(hf_tok)
    eos = hf_tok.eos_token_id
    tokens: dict[bytes, list[int]] = {}
    specials = set(hf_tok.all_special_ids)
    for i in range(len(hf_tok)):
        if i not in specials:
            tokens.setdefault(table.token_bytes(i), []).append(i)
    tokens.pop(b"", None)
    vocabulary = Vocabulary(eos, tokens)

    def make(schema: dict) -> Session:
        regex = build_regex_from_schema(json.dumps(schema), None)
        guide = Guide(Index(regex, vocabulary))
        words = (vocab + 31) // 32
        bitmask = torch.zeros(words, dtype=torch.int32)
        s = Session()

        def mask(row: torch.Tensor) -> None:
            guide.write_mask_into(bitmask.data_ptr(), bitmask.numel(), bitmask.element_size())
            apply_bitmask(row, bitmask)

        def accept(t: int) -> None:
            if t == eos and guide.is_finished():
                return  # the end: outlines has no state after eos
            guide.advance(t)

        s.mask, s.accept = mask, accept
        return s

    return make


FACTORIES = {
    "xgrammar": xgrammar_factory,
    "llguidance": llguidance_factory,
    "outlines-core": outlines_factory,
}


def run(repeat: int) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from model_server.models.gguf import _converted_dir, embedded_gguf_path

    gguf = embedded_gguf_path()
    converted = _converted_dir(gguf)
    if (converted / "tokenizer.json").exists():
        hf_tok = AutoTokenizer.from_pretrained(converted)
    else:
        hf_tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    vocab = len(hf_tok)
    torch.set_num_threads(1)
    results: dict[str, Any] = {"vocab": vocab, "engines": {}}
    logits = torch.randn(vocab)
    for name, factory in FACTORIES.items():
        try:
            t0 = time.perf_counter()
            make = factory(hf_tok, vocab)
            setup = time.perf_counter() - t0
        except ImportError as err:
            results["engines"][name] = {"skipped": str(err)}
            continue
        per_schema = {}
        for label, (schema, instance) in INSTANCES.items():
            text = json.dumps(instance, separators=(",", ":"))
            ids = hf_tok.encode(text, add_special_tokens=False) + [hf_tok.eos_token_id]
            compiles, per_token = [], []
            for _ in range(repeat):
                t0 = time.perf_counter()
                session = make(schema)
                compiles.append(time.perf_counter() - t0)
                row = logits.clone()
                t0 = time.perf_counter()
                for t in ids:
                    row.copy_(logits)
                    session.mask(row)
                    if row[t] == float("-inf"):
                        raise RuntimeError(f"{name} masked out the reply's token {t}")
                    session.accept(t)
                per_token.append((time.perf_counter() - t0) / len(ids))
            # A sampled reply of a weak model wanders through odd states (unicode in strings,
            # long numbers): a seeded random walk over the allowed tokens, up to 64 of them.
            gen = torch.Generator().manual_seed(0)
            session = make(schema)
            row = logits.clone()
            walked, spent = 0, 0.0
            for _ in range(64):
                row.copy_(torch.randn(vocab, generator=gen) * 3)
                t0 = time.perf_counter()
                session.mask(row)
                spent += time.perf_counter() - t0
                t = int(torch.multinomial(row.softmax(-1), 1, generator=gen))
                walked += 1
                if t == hf_tok.eos_token_id:
                    break
                t0 = time.perf_counter()
                session.accept(t)
                spent += time.perf_counter() - t0
            walk = spent / walked  # mask + accept only, not the drawing
            # The row copy is the engine's own work too (it is the batch's logits row).
            per_schema[label] = {
                "tokens": len(ids),
                "compile_ms": round(statistics.median(compiles) * 1e3, 2),
                "per_token_us": round(statistics.median(per_token) * 1e6, 1),
                "random_walk_per_token_us": round(walk * 1e6, 1),
            }
        results["engines"][name] = {"setup_s": round(setup, 2), "schemas": per_schema}
    return results


def table(results: dict[str, Any]) -> str:
    rows = [
        "| engine | tokenizer setup s | schema | compile ms | per token µs | random walk µs |",
        "|---" * 6 + "|",
    ]
    for name, r in results["engines"].items():
        if "skipped" in r:
            rows.append(f"| {name} | skipped: {r['skipped']} | | | | |")
            continue
        for label, s in r["schemas"].items():
            rows.append(
                f"| {name} | {r['setup_s']} | {label} ({s['tokens']} tokens) | "
                f"{s['compile_ms']} | {s['per_token_us']} | {s['random_walk_per_token_us']} |"
            )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()
    results = run(args.repeat)
    print(table(results))
    print(json.dumps(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
