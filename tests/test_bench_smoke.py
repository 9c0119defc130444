"""The benchmark's pure parts: deterministic prompts, statistics, target math, report files
(the load levels' and the scenarios').

Nothing here starts a process or loads a model (``make bench`` does that).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import prompts as bench_prompts  # noqa: E402
from bench import report, scenarios  # noqa: E402
from bench.load import RequestResult, percentile, summarize  # noqa: E402
from glmserve.testing import parse_metrics  # noqa: E402


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


# ---- scenarios (bench/scenarios.py): text, metrics parsing, target math; no server ----------


def _scenarios(**over: dict) -> dict:
    turns = [
        {"turn": k + 1, "ok": True, "prompt_tokens": 200 + 240 * k, "ttft": 0.3 + 0.01 * k}
        for k in range(16)
    ]
    base = {
        "multiturn": {
            "turns": turns,
            "turns_planned": 16,
            "reply_tokens": 48,
            "errors": 0,
            "wrong_length": 0,
            "ttft_first": 0.3,
            "ttft_last": 0.45,
            "ttft_ratio": 1.5,
            "prefix_cache": {
                "queries_before": 0.0,
                "queries_after": 30000.0,
                "hits_before": 0.0,
                "hits_after": 26000.0,
            },
        },
        "nomax": {"streams": 48, "running_max": 48.0, "errors": 0, "samples": 100},
        "longprompt": {
            "requests": 64,
            "completed": 64,
            "errors": 0,
            "rss_before": 1000 * 2**20,
            "rss_peak": 1800 * 2**20,
            "kv_cache_tokens": 16384,
            "kv_bytes_per_token": 2**15,  # 512 MiB of KV
            "kv_bytes": 512 * 2**20,
            "overhead_kv_fraction": 0.25,
            "overhead_bytes": 256 * 2**20,
        },
    }
    for name, fields in over.items():
        base[name] = {**base[name], **fields}
    return {"machine": {}, "rows": [], "scenarios": base}


def _by_scenario(result: dict) -> dict[str, dict]:
    return {c["target"].split(":")[0]: c for c in report.targets(result)}


def test_scenario_targets_pass() -> None:
    checks = _by_scenario(_scenarios())
    assert set(checks) == {"multiturn", "nomax", "longprompt"}  # no level targets without rows
    assert checks["multiturn"]["ratio"] == pytest.approx(1.5)
    assert "hits 26000/30000 tokens" in checks["multiturn"]["measured"]
    assert checks["nomax"]["ratio"] == pytest.approx(1.0)
    # bound = 1000 + 512 + (0.25 x 512 + 256) = 1896 MiB; growth 800 of 896 MiB allowed
    assert "bound 1896 MiB" in checks["longprompt"]["measured"]
    assert checks["longprompt"]["ratio"] == pytest.approx(800 / 896)
    assert all(c["status"] == "PASS" for c in checks.values())


def test_scenario_targets_miss() -> None:
    checks = _by_scenario(
        _scenarios(
            multiturn={"ttft_ratio": 18.8, "prefix_cache": {}},
            nomax={"running_max": 18.0},
            longprompt={"rss_peak": 1900 * 2**20},
        )
    )
    assert [c["status"] for c in checks.values()] == ["MISS", "MISS", "MISS"]
    assert "prefix cache counters absent" in checks["multiturn"]["measured"]
    # Errors fail a target whatever the figure; so does an incomplete conversation.
    checks = _by_scenario(
        _scenarios(
            multiturn={"turns_planned": 17},
            nomax={"errors": 1},
            longprompt={"completed": 63, "errors": 1, "timed_out": 1},
        )
    )
    assert [c["status"] for c in checks.values()] == ["MISS", "MISS", "MISS"]
    assert "1 not done within the time box" in checks["longprompt"]["measured"]
    failed = _scenarios()
    failed["scenarios"]["nomax"] = {"error": "RuntimeError: model-server: exited with 1"}
    assert _by_scenario(failed)["nomax"]["status"] == "MISS"
    unknown = _by_scenario(_scenarios(longprompt={"kv_bytes": None, "kv_bytes_per_token": None}))
    assert unknown["longprompt"]["status"] == "N/A"


def test_scenarios_add_to_level_targets_and_render() -> None:
    both = {**FAKE, "scenarios": _scenarios()["scenarios"]}
    assert len(report.targets(both)) == 6 + 3
    text = report.render({**both, "targets": report.targets(both)})
    assert "| 16 | 3800 | 450 | - |" in text  # the multiturn table, one row per turn
    assert "nomax: 48 streams" in text and "longprompt: 1 x" in text
    assert "scenarios" not in report.render({**FAKE, "targets": report.targets(FAKE)})


def _slowreaders(**over: object) -> dict:
    row = {"requests": 64, "tok_s": 100.0, "errors": 0, "mean_decode_batch": 15.0}
    s = {
        "slow_readers": 200,
        "normal_concurrency": 16,
        "write_timeout_s": 20.0,
        "alone": row,
        "beside": {**row, "tok_s": 95.0, "server_cpu_s": 60.0, "bridge_cpu_s": 3.0},
        "tok_s_ratio": 0.95,
        "bridge_rss_growth": 40 * 2**20,
        "slow_closed_by_timeout": 200,
        **over,
    }
    return {"scenarios": {"slowreaders": s}}


def test_slowreaders_target_and_table() -> None:
    check = report.scenario_targets(_slowreaders())[0]
    assert check["status"] == "PASS" and check["ratio"] == pytest.approx(0.95)
    assert "95.0 tok/s vs 100.0 alone" in check["measured"]
    assert "200/200 closed by the 20 s write timeout" in check["measured"]
    for over in ({"tok_s_ratio": 0.85}, {"bridge_rss_growth": 100 * 2**20}):
        assert report.scenario_targets(_slowreaders(**over))[0]["status"] == "MISS"
    assert report.scenario_targets(_slowreaders(slow_closed_by_timeout=199))[0]["status"] == "MISS"
    text = report.scenarios_text(_slowreaders())
    assert "| c=16 + 200 slow | 64 | 95.0 |" in text and "60.0 / 3.0 / -" in text


METRICS_TEXT = """# HELP glmserve_requests_running Requests admitted
# TYPE glmserve_requests_running gauge
glmserve_requests_running 3.0
# HELP glmserve_prefix_cache_hits_total Prompt tokens found in the prefix cache
# TYPE glmserve_prefix_cache_hits_total counter
glmserve_prefix_cache_hits_total 128.0
glmserve_prefix_cache_hits_created 1.7e+09
# HELP glmserve_step_tokens_total Tokens
# TYPE glmserve_step_tokens_total counter
glmserve_step_tokens_total{phase="decode"} 7.0
"""


def test_metrics_parsing_tolerates_absent_counters() -> None:
    m = parse_metrics(METRICS_TEXT)
    assert scenarios.metric(m, scenarios.RUNNING) == 3.0
    assert scenarios.metric(m, scenarios.PREFIX_HITS) == 128.0
    assert scenarios.metric(m, "glmserve_prefix_cache_hits") == 128.0
    assert m['glmserve_step_tokens_total{phase="decode"}'] == 7.0
    two = parse_metrics('# TYPE x counter\nx_total{b="2",a="1"} 5\n')
    assert two == {'x_total{a="1",b="2"}': 5.0}  # labels sorted by name
    assert scenarios.metric(m, scenarios.PREEMPTIONS) is None
    assert (
        scenarios.delta(
            m, {**m, "glmserve_prefix_cache_hits_total": 200.0}, "glmserve_prefix_cache_hits_total"
        )
        == 72.0
    )
    assert scenarios.delta(m, m, scenarios.PREFIX_QUERIES) is None


def test_scenario_inputs_are_deterministic() -> None:
    turns = [scenarios.turn_text(k) for k in range(scenarios.TURNS)]
    assert len(set(turns)) == scenarios.TURNS and turns == [
        scenarios.turn_text(k) for k in range(scenarios.TURNS)
    ]
    replies = [scenarios.short_reply_tokens(i) for i in range(scenarios.SHORT_REQUESTS)]
    assert min(replies) == 64 and max(replies) <= 128 and len(set(replies)) > 30
    assert len(scenarios.long_prompt(3)) < len(scenarios.long_prompt(4))
    assert scenarios.kv_tokens_in(["--kv-cache-tokens", "12288"]) == 12288
    assert scenarios.kv_tokens_in(["--max-num-batched-tokens=4096", "--x"]) == 4096
    assert scenarios.kv_tokens_in(["--max-num-seqs", "8"]) is None


def test_bench_gpu_reads_the_decode_steps_by_mode() -> None:
    """What ``python -m bench.gpu`` reports of how the server's decode steps ran."""
    from bench.gpu import decode_steps

    m = parse_metrics(
        "# TYPE glmserve_decode_steps_total counter\n"
        'glmserve_decode_steps_total{mode="graph"} 120.0\n'
        'glmserve_decode_steps_total{mode="static"} 8.0\n'
        'glmserve_step_tokens_total{phase="decode"} 7.0\n'
    )
    assert decode_steps(m) == {"graph": 120.0, "static": 8.0}
