"""The benchmark's pure parts: deterministic prompts, statistics, target math, report files.

Nothing here starts a process or loads a model (``make bench`` does that).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import prompts as bench_prompts  # noqa: E402
from bench import report  # noqa: E402
from bench.load import RequestResult, percentile, summarize  # noqa: E402


def test_prompts_are_deterministic_and_mixed() -> None:
    first = bench_prompts.prompts(40)
    assert first == bench_prompts.prompts(40)
    assert first[:16] == list(bench_prompts.BASE)
    assert first[16:32] == first[:16]  # the base list repeats
    lengths = [len(p) for p in bench_prompts.BASE]
    assert len(set(bench_prompts.BASE)) == 16
    assert min(lengths) < 100 < 500 < max(lengths)  # short questions up to passages
    # Every prefix of 4 holds a short, a medium and a long prompt.
    kinds = ["short" if n < 200 else "medium" if n < 1000 else "long" for n in lengths]
    assert kinds[:4] == ["short", "medium", "short", "long"]
    assert bench_prompts.longest() == max(bench_prompts.BASE, key=len)


def test_percentile() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0], 95) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    assert percentile(list(range(101)), 95) == pytest.approx(95.0)


def test_summarize_counts_tokens_and_errors() -> None:
    ok = RequestResult(completion_tokens=8, prompt_tokens=5, ttft=0.2, itl=[0.05] * 7)
    bad = RequestResult(ok=False, error="UNAVAILABLE: gone")
    row = summarize("bridge c=2", "bridge", 2, [ok, ok, bad], wall=2.0)
    assert row["requests"] == 3 and row["errors"] == 1
    assert row["completion_tokens"] == 16 and row["tok_s"] == pytest.approx(8.0)
    assert row["ttft_p50"] == pytest.approx(0.2) and row["itl_p95"] == pytest.approx(0.05)
    assert row["error_samples"] == ["UNAVAILABLE: gone"]


def test_steady_ttft_leaves_out_the_first_wave() -> None:
    burst = [RequestResult(completion_tokens=1, ttft=5.0, seq=i) for i in range(2)]
    later = [RequestResult(completion_tokens=1, ttft=0.5, seq=i) for i in range(2, 6)]
    row = summarize("bridge c=2", "bridge", 2, burst + later, wall=1.0)
    assert row["ttft_steady_p95"] == pytest.approx(0.5) and row["ttft_p95"] > 4


def _row(kind: str, c: int | None, tok_s: float, **kw: object) -> dict:
    name = f"{kind} c={c}" if c else kind
    return {
        "name": name,
        "kind": kind if c else "hf",
        "concurrency": c,
        "tok_s": tok_s,
        "requests": 8,
        "errors": 0,
        **kw,
    }


FAKE = {
    "machine": {"cpu_model": "Test CPU", "cpu_count": 2, "torch": "x", "device": "cpu"},
    "rows": [
        _row("bridge", 1, 10.0, ttft_p50=0.2, ttft_p95=0.3, itl_p50=0.05, itl_p95=0.06),
        _row(
            "bridge",
            16,
            70.0,
            ttft_p50=0.5,
            ttft_p95=0.9,
            itl_p50=0.1,
            itl_p95=0.2,
            foreign_cpu=0.05,
        ),
        _row("bridge", 64, 90.0, errors=0, requests=128),
        _row("grpc", 1, 10.4),
        _row("HF static batch 16", None, 60.0, batch_size=16),
        {"name": "HF continuous batching", "kind": "hf", "error": "RuntimeError('no')"},
    ],
    "prefill_longest": {"seconds": 0.6, "prompt_tokens": 360, "source": "test"},
    "server": {
        "rss_before_c64": 1000 * 2**20,
        "rss_after_c64": 1500 * 2**20,
        "rss_peak_c64": 1600 * 2**20,
        "kv_cache_tokens": 2000,
        "kv_bytes_per_token": 2**20,
        "requests_running_end": 0.0,
        "requests_waiting_end": 0.0,
    },
}


def test_targets_math() -> None:
    checks = {c["target"].split(":")[0]: c for c in report.targets(FAKE)}
    assert len(checks) == 6
    six_x = checks["bridge c=16 tok/s >= 6x bridge c=1 tok/s"]
    assert six_x["ratio"] == pytest.approx(7.0) and six_x["status"] == "PASS"
    vs_static = checks["bridge c=16 tok/s >= 1.0x HF static batch 16 tok/s"]
    assert vs_static["ratio"] == pytest.approx(70 / 60) and vs_static["status"] == "PASS"
    ttft = next(v for k, v in checks.items() if k.startswith("TTFT"))
    assert ttft["ratio"] == pytest.approx(0.9 / (2 * 0.2 + 0.6)) and ttft["status"] == "PASS"
    grpc_ratio = checks["bridge c=1 tok/s >= 0.95x gRPC c=1 tok/s"]
    assert grpc_ratio["ratio"] == pytest.approx(10 / 10.4) and grpc_ratio["status"] == "PASS"
    assert checks["c=64"]["ratio"] == pytest.approx(1.6)  # peak / before; bound 3000 MiB
    assert all(c["status"] == "PASS" for c in checks.values())


def test_targets_miss_and_missing_rows() -> None:
    fake = json.loads(json.dumps(FAKE))
    fake["rows"][1]["tok_s"] = 30.0  # 3x c=1, below the static batch
    fake["rows"][2]["errors"] = 2
    fake["server"]["requests_waiting_end"] = 1.0
    status = [c["status"] for c in report.targets(fake)]
    assert status == ["MISS", "MISS", "PASS", "PASS", "MISS", "MISS"]
    over = json.loads(json.dumps(FAKE))
    over["server"]["rss_peak_c64"] = 3500 * 2**20  # above before + KV budget (3000 MiB)
    assert [c["status"] for c in report.targets(over)][4] == "MISS"
    quick = {"rows": [_row("bridge", 1, 10.0), _row("grpc", 1, 12.0)]}
    status = [c["status"] for c in report.targets(quick)]
    assert status == ["N/A", "N/A", "N/A", "MISS", "N/A"]


def test_table_and_files(tmp_path: Path) -> None:
    text = report.render({**FAKE, "targets": report.targets(FAKE)})
    table = report.table(FAKE).splitlines()
    assert len(table) == 2 + len(FAKE["rows"])
    assert "| bridge c=16 | 8 | 70.0 | 500 | 900 | - | 100 | 200 | 0 | 5% |" in table
    assert "| HF continuous batching | - | failed |" in table[-1]
    assert "[PASS]" in text and "Test CPU" in text
    latest, stamped = report.write(FAKE, tmp_path)
    assert json.loads(latest.read_text()) == json.loads(stamped.read_text())
    assert latest.name == "latest.json" and stamped.parent == tmp_path
