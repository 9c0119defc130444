"""The benchmark's output: the table, the target checks, and the JSON files.

Everything here works on the plain result dict that ``bench.run`` builds (and writes as JSON),
so it can be checked on a fixed fake result without running anything.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

Result = dict[str, Any]
Row = dict[str, Any]

# Prefix of the line on which ``python -m bench.baselines`` prints its JSON result.
MARKER = "BENCH_JSON "


def emit_json(result: dict[str, Any], path: str | Path | None) -> None:
    """A one-off bench's result (``bench.gpu``, ``hf_step``, ``quant_kernels``,
    ``sdpa_backends``, ``fused_layers``): one ``JSON {...}`` line on stdout, and the file
    ``--json`` names."""
    print("JSON " + json.dumps(result))
    if path:
        Path(path).write_text(json.dumps(result, indent=2))


def find_row(result: Result, kind: str, concurrency: int | None = None) -> Row | None:
    """The first row of ``kind`` (bridge, grpc) at ``concurrency``, or named ``kind`` (HF)."""
    for row in result.get("rows", []):
        if concurrency is not None:
            if row.get("kind") == kind and row.get("concurrency") == concurrency:
                return row
        elif row.get("name") == kind or row.get("name", "").startswith(kind):
            return row
    return None


def _ok(row: Row | None, key: str) -> float | None:
    if row is None or row.get("error") or row.get(key) is None:
        return None
    return float(row[key])


def _check(name: str, measured: str, ratio: float | None, passed: bool | None) -> dict[str, Any]:
    status = "N/A" if passed is None else ("PASS" if passed else "MISS")
    return {"target": name, "measured": measured, "ratio": ratio, "status": status}


def targets(result: Result) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured figures, a ratio and PASS / MISS / N/A;
    then the scenarios' (only those, for a run of just the scenarios)."""
    scenario_checks = scenario_targets(result)
    if not result.get("rows") and result.get("scenarios"):
        return scenario_checks
    return level_targets(result) + scenario_checks


def level_targets(result: Result) -> list[dict[str, Any]]:
    """The load levels' targets."""
    c1 = find_row(result, "bridge", 1)
    c16 = find_row(result, "bridge", 16)
    c64 = find_row(result, "bridge", 64)
    g1 = find_row(result, "grpc", 1)
    static = find_row(result, "HF static batch")
    out = []

    a, b = _ok(c16, "tok_s"), _ok(c1, "tok_s")
    ratio = a / b if a is not None and b else None
    out.append(
        _check(
            "bridge c=16 tok/s >= 6x bridge c=1 tok/s",
            f"{_f(a)} vs {_f(b)} tok/s",
            ratio,
            None if ratio is None else ratio >= 6.0,
        )
    )

    s = _ok(static, "tok_s")
    ratio = a / s if a is not None and s else None
    label = static["name"] if static else "HF static batch 16"
    out.append(
        _check(
            f"bridge c=16 tok/s >= 1.0x {label} tok/s",
            f"{_f(a)} vs {_f(s)} tok/s",
            ratio,
            None if ratio is None else ratio >= 1.0,
        )
    )

    all95, steady95 = _ok(c16, "ttft_p95"), _ok(c16, "ttft_steady_p95")
    burst = str((result.get("config") or {}).get("arrivals", "burst")) == "burst"
    # A burst start makes the first wave a queue of 16 prefills: judge the waves after it.
    # Ramped arrivals have no burst: judge every request.
    p95 = steady95 if burst and steady95 is not None else all95
    p50 = _ok(c1, "ttft_p50")
    prefill = result.get("prefill_longest") or {}
    pf = prefill.get("seconds")
    if p95 is not None and p50 is not None and pf is not None:
        limit = 2 * p50 + pf
        which = "after the first wave" if p95 is steady95 and burst else "all requests"
        out.append(
            _check(
                "TTFT p95 at c=16 <= 2 x TTFT p50 at c=1 + one prefill of the longest prompt",
                f"{_ms(p95)} ({which}) vs 2 x {_ms(p50)} + {_ms(pf)} "
                f"({prefill.get('source', '?')}) = {_ms(limit)}; arrivals: "
                f"{(result.get('config') or {}).get('arrivals', 'burst')}",
                p95 / limit,
                p95 <= limit,
            )
        )
    else:
        out.append(_check("TTFT p95 at c=16 <= 2 x TTFT(c=1) + prefill", "missing", None, None))

    g = _ok(g1, "tok_s")
    ratio = b / g if b is not None and g else None
    out.append(
        _check(
            "bridge c=1 tok/s >= 0.95x gRPC c=1 tok/s",
            f"{_f(b)} vs {_f(g)} tok/s",
            ratio,
            None if ratio is None else ratio >= 0.95,
        )
    )

    server = result.get("server") or {}
    before, after = server.get("rss_before_c64"), server.get("rss_after_c64")
    peak = server.get("rss_peak_c64") or after
    budget, per_token = server.get("kv_cache_tokens"), server.get("kv_bytes_per_token")
    if c64 is not None and before and after and budget and per_token:
        # The bound: RSS before the level plus the KV cache the server sized for itself
        # (--kv-cache-tokens, by default from --kv-cache-memory-fraction); the peak
        # sampled during the level must stay under it.
        bound = before + budget * per_token
        errors = int(c64.get("errors", 0))
        out.append(
            _check(
                "c=64: zero errors, server RSS bounded",
                f"{errors} errors in {c64.get('requests')} requests; RSS {_mib(before)} before, "
                f"peak {_mib(peak)}, {_mib(after)} after; bound {_mib(bound)} = before + "
                f"KV budget {budget} tokens x {per_token} B",
                peak / before,
                errors == 0 and peak <= bound,
            )
        )
    else:
        out.append(_check("c=64: zero errors, server RSS bounded", "not run", None, None))

    running, waiting = server.get("requests_running_end"), server.get("requests_waiting_end")
    if running is not None and waiting is not None:
        out.append(
            _check(
                "at the end glmserve_requests_running = glmserve_requests_waiting = 0",
                f"running {running:g}, waiting {waiting:g}",
                None,
                running == 0 and waiting == 0,
            )
        )
    return out


MULTITURN_TARGET = "multiturn: turn-16 TTFT <= 2x turn-1 TTFT"
MULTITURN_MAX_RATIO = 2.0
NOMAX_TARGET = (
    "nomax: 48 streams without max_tokens all run at once (max glmserve_requests_running)"
)
LONGPROMPT_TARGET = "longprompt: no errors, peak RSS <= RSS before + configured KV bytes + overhead"
SLOWREADERS_TARGET = (
    "slowreaders: c=16 tok/s beside slow SSE readers (200) within 10% of alone, bridge RSS "
    "+ < 100 MiB, every slow stream closed by --stream-write-timeout"
)
SLOWREADERS_MIN_RATIO = 0.9
SLOWREADERS_MAX_RSS_GROWTH = 100 * 2**20


def longprompt_bound(s: dict[str, Any]) -> tuple[float, float] | None:
    """(allowed RSS, overhead) for the longprompt scenario: RSS before the load + N x bytes per
    token + overhead, the overhead being ``overhead_kv_fraction`` of the KV bytes +
    ``overhead_bytes`` (allocator slack, and the transients of a step: attention scores of a
    prefill chunk against a long context, logits, a per-layer gather of paged KV)."""
    before, kv = s.get("rss_before"), s.get("kv_bytes")
    if not before or not kv:
        return None
    overhead = s.get("overhead_kv_fraction", 0.25) * kv + s.get("overhead_bytes", 256 * 2**20)
    return before + kv + overhead, overhead


def scenario_targets(result: Result) -> list[dict[str, Any]]:
    """One check per scenario that ran (``result["scenarios"]``); a failed run is a MISS."""
    out = []
    titles = {
        "multiturn": MULTITURN_TARGET,
        "nomax": NOMAX_TARGET,
        "longprompt": LONGPROMPT_TARGET,
        "slowreaders": SLOWREADERS_TARGET,
    }
    for name, s in (result.get("scenarios") or {}).items():
        title = titles.get(name, name)
        if s.get("error"):
            out.append(_check(title, f"failed: {s['error'][:300]}", None, False))
        elif name == "multiturn":
            out.append(_multiturn_check(title, s))
        elif name == "nomax":
            out.append(_nomax_check(title, s))
        elif name == "longprompt":
            out.append(_longprompt_check(title, s))
        elif name == "slowreaders":
            out.append(_slowreaders_check(title, s))
    return out


def _slowreaders_check(title: str, s: dict[str, Any]) -> dict[str, Any]:
    ratio, growth = s.get("tok_s_ratio"), s.get("bridge_rss_growth")
    slow, cut = int(s.get("slow_readers", 0)), int(s.get("slow_closed_by_timeout", 0))
    alone, beside = s.get("alone") or {}, s.get("beside") or {}
    errors = int(alone.get("errors", 0)) + int(beside.get("errors", 0))
    fast = (s.get("beside_fast") or {}).get("tok_s")
    measured = (
        f"{slow} slow readers: c={s.get('normal_concurrency')} {_f(beside.get('tok_s'))} tok/s "
        f"vs {_f(alone.get('tok_s'))} alone ({_f(fast)} beside the same streams read at full "
        f"speed); bridge RSS +{_mib(growth)}; {cut}/{slow} closed by the "
        f"{_g(s.get('write_timeout_s'))} s write timeout; {errors} errors"
    )
    if ratio is None or growth is None:
        return _check(title, measured, ratio, None)
    passed = (
        ratio >= SLOWREADERS_MIN_RATIO
        and growth < SLOWREADERS_MAX_RSS_GROWTH
        and cut == slow
        and errors == 0
    )
    return _check(title, measured, ratio, passed)


def _multiturn_check(title: str, s: dict[str, Any]) -> dict[str, Any]:
    turns = s.get("turns") or []
    t1, tn, ratio = s.get("ttft_first"), s.get("ttft_last"), s.get("ttft_ratio")
    errors, wrong = int(s.get("errors", 0)), int(s.get("wrong_length", 0))
    complete = len(turns) == s.get("turns_planned", len(turns)) and errors == 0
    pc = s.get("prefix_cache") or {}
    q = _diff(pc.get("queries_before"), pc.get("queries_after"))
    h = _diff(pc.get("hits_before"), pc.get("hits_after"))
    cache = (
        "prefix cache counters absent" if q is None else f"prefix cache hits {_g(h)}/{_g(q)} tokens"
    )
    tokens = [t.get("prompt_tokens") for t in turns] or ["-"]
    measured = (
        f"turn {len(turns)} TTFT {_ms(tn)} vs turn 1 {_ms(t1)}; prompt {tokens[0]} -> "
        f"{tokens[-1]} tokens; {errors} errors, {wrong} replies of the wrong length; {cache}"
    )
    # An incomplete conversation is a MISS; a complete one without TTFTs cannot be judged.
    passed = None if complete and ratio is None else complete and ratio <= MULTITURN_MAX_RATIO
    return _check(title, measured, ratio, passed)


def _nomax_check(title: str, s: dict[str, Any]) -> dict[str, Any]:
    streams, running = int(s.get("streams", 48)), s.get("running_max")
    errors = int(s.get("errors", 0))
    measured = (
        f"max running {_g(running)} of {streams} (max waiting {_g(s.get('waiting_max'))}, "
        f"{s.get('samples', 0)} samples); {errors} errors{_late(s)}; at the end running "
        f"{_g(s.get('running_end'))}, waiting {_g(s.get('waiting_end'))}"
    )
    ratio = None if running is None else running / streams
    passed = None if running is None else (running >= streams and errors == 0)
    return _check(title, measured, ratio, passed)


def _longprompt_check(title: str, s: dict[str, Any]) -> dict[str, Any]:
    errors, requests = int(s.get("errors", 0)), int(s.get("requests", 0))
    completed, peak, before = int(s.get("completed", 0)), s.get("rss_peak"), s.get("rss_before")
    bound = longprompt_bound(s)
    killed = f"; {s['server_killed']}" if s.get("server_killed") else ""
    base = f"{completed}/{requests} completed, {errors} errors{_late(s)}{killed}"
    if bound is None or not peak or not before:
        return _check(title, base + "; RSS or KV size unknown", None, None)
    limit, overhead = bound
    measured = (
        f"{base}; RSS {_mib(before)} before, peak {_mib(peak)}; bound {_mib(limit)} = before "
        f"+ KV {s.get('kv_cache_tokens')} tokens x {s.get('kv_bytes_per_token')} B "
        f"({_mib(s.get('kv_bytes'))}) + overhead {_mib(overhead)}; preemptions "
        f"{_g(s.get('preemptions'))}"
    )
    ok = errors == 0 and completed == requests and peak <= limit
    return _check(title, measured, (peak - before) / (limit - before), ok)


def _late(s: dict[str, Any]) -> str:
    late = s.get("timed_out")
    return f" ({late} not done within the time box)" if late else ""


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else b - a


def _g(x: float | None) -> str:
    return "-" if x is None else f"{x:g}"


def scenarios_text(result: Result) -> str:
    """The scenarios' figures: multiturn's TTFT per turn as a table, one line for the others."""
    parts: list[str] = []
    for name, s in (result.get("scenarios") or {}).items():
        if s.get("error"):
            parts.append(f"{name}: failed: {s['error'][:1000]}")
        elif name == "multiturn":
            parts += [
                f"multiturn: one conversation, {s.get('reply_tokens')}-token replies, resent "
                "in full each turn",
                "| turn | prompt tokens | TTFT ms | prefix cache hits / queries |",
                "|---:|---:|---:|---:|",
            ]
            for t in s.get("turns") or []:
                hits = (
                    "-"
                    if t.get("prefix_queries") is None
                    else f"{_g(t.get('prefix_hits'))} / {_g(t.get('prefix_queries'))}"
                )
                cells = [str(t["turn"]), str(t.get("prompt_tokens") or "-")]
                cells += [_cell_ms(t.get("ttft")), hits]
                parts.append("| " + " | ".join(cells) + " |")
        elif name == "nomax":
            parts.append(
                f"nomax: {s.get('streams')} streams, no max_tokens, each closed after "
                f"{s.get('close_after_chunks')} chunks: max running {_g(s.get('running_max'))} "
                f"(at {_f(s.get('running_max_at_s'))} s), max waiting {_g(s.get('waiting_max'))}; "
                f"TTFT p50 {_ms(s.get('ttft_p50'))}, p95 {_ms(s.get('ttft_p95'))}; "
                f"{s.get('errors')} errors{_late(s)}; {_f(s.get('wall_s'))} s; server KV budget "
                f"{s.get('kv_cache_tokens')} tokens; gauges at the end running "
                f"{_g(s.get('running_end'))}, waiting {_g(s.get('waiting_end'))}"
            )
        elif name == "longprompt":
            parts.append(
                f"longprompt: 1 x {s.get('long_prompt_tokens')}-token prompt + "
                f"{s.get('requests', 1) - 1} short ones (mean "
                f"{_f(s.get('short_prompt_tokens_mean'))} tokens), all prompts + max_tokens = "
                f"{s.get('demand_tokens')} tokens; server {' '.join(s.get('server_args') or [])}"
                f": {s.get('completed')}/{s.get('requests')} completed, {s.get('errors')} errors"
                f"{_late(s)}; "
                f"weights {_mib(s.get('weights_bytes'))}, KV {_mib(s.get('kv_bytes'))}; RSS "
                f"{_mib(s.get('rss_before'))} before, peak {_mib(s.get('rss_peak'))}, after "
                f"{_mib(s.get('rss_after'))}; peak glmserve_kv_cache_tokens "
                f"{_g(s.get('peak_kv_positions'))}; preemptions {_g(s.get('preemptions'))}; "
                f"long TTFT {_ms(s.get('long_ttft'))}, short TTFT p50 "
                f"{_ms(s.get('short_ttft_p50'))} p95 {_ms(s.get('short_ttft_p95'))}; "
                f"{_f(s.get('wall_s'))} s"
            )
            if s.get("error_samples"):
                parts.append(f"  errors: {s['error_samples']}")
        elif name == "slowreaders":
            parts += _slowreaders_text(s)
        if s.get("foreign_cpu") is not None:
            parts.append(
                f"  ({name}: other CPU {s['foreign_cpu']:.0%}, the share of all cores busy with "
                "processes outside the benchmark while it ran)"
            )
    return "\n".join(parts)


def _slowreaders_text(s: dict[str, Any]) -> list[str]:
    c, slow = s.get("normal_concurrency"), s.get("slow_readers")
    lines = [
        f"slowreaders: a c={c} loop of {s.get('normal_max_tokens')}-token streams for "
        f"{_f(s.get('seconds'))} s, alone and beside {slow} clients reading 1 B/s "
        f"({s.get('slow_request')}); model {s.get('model')}",
        "| run | requests | tok/s | TTFT p50 | TTFT p95 | errors | decode batch | tokens decoded "
        "| streams paused | CPU s: server / bridge / clients |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows = (
        (f"c={c} alone", s.get("alone")),
        (f"c={c} + {slow} read at full speed", s.get("beside_fast")),
        (f"c={c} + {slow} slow", s.get("beside")),
    )
    for label, row in rows:
        row = row or {}
        cells = [label, str(row.get("requests", "-")), _f(row.get("tok_s"))]
        cells += [_cell_ms(row.get("ttft_p50")), _cell_ms(row.get("ttft_p95"))]
        cells += [str(row.get("errors", "-")), _f(row.get("mean_decode_batch"))]
        cells += [_g(row.get("decoded_tokens")), _g(row.get("stream_pauses"))]
        cells.append(" / ".join(_f(row.get(f"{k}_cpu_s")) for k in ("server", "bridge", "client")))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(
        f"  tok/s beside the slow readers: {_f2(s.get('tok_s_ratio'))}x alone, "
        f"{_f2(s.get('tok_s_ratio_vs_fast'))}x beside the same streams read at full speed"
    )
    lines.append(
        f"  slow streams: status lines {s.get('slow_statuses')}, "
        f"{s.get('slow_closed_by_timeout')} closed by the {_g(s.get('write_timeout_s'))} s write "
        f"timeout, all gone from the bridge {_f(s.get('slow_gone_at_s'))} s and their calls "
        f"ended on the server {_f(s.get('slow_calls_ended_at_s'))} s after they were sent; "
        "bridge streams "
        f"in flight max {_g(s.get('bridge_in_flight_max'))}, at the end "
        f"{_g(s.get('bridge_in_flight_end'))}; bridge RSS {_mib(s.get('bridge_rss_before'))} "
        f"before, peak {_mib(s.get('bridge_rss_peak'))}; server gauges at the end running "
        f"{_g(s.get('running_end'))}, waiting {_g(s.get('waiting_end'))}"
    )
    return lines


def _f2(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.0f} ms"


def _mib(x: float | None) -> str:
    return "-" if x is None else f"{x / 2**20:.0f} MiB"


def _cell_ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.0f}"


COLUMNS = (
    "run",
    "requests",
    "tok/s",
    "TTFT p50",
    "TTFT p95",
    "TTFT p95 steady",
    "ITL p50",
    "ITL p95",
    "errors",
    "other CPU",
)


def table(result: Result) -> str:
    """A Markdown table, one row per run (latencies in ms; "other CPU": the share of the
    machine's cores busy with processes outside the benchmark while the run measured)."""
    lines = [
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(COLUMNS) - 1)) + "|",
    ]
    for row in result.get("rows", []):
        if row.get("error"):
            cells = [row["name"], "-", "failed"] + ["-"] * (len(COLUMNS) - 3)
        else:
            cells = [
                row["name"],
                str(row.get("requests", "-")),
                f"{row['tok_s']:.1f}",
                _cell_ms(row.get("ttft_p50")),
                _cell_ms(row.get("ttft_p95")),
                _cell_ms(row.get("ttft_steady_p95")),
                _cell_ms(row.get("itl_p50")),
                _cell_ms(row.get("itl_p95")),
                str(row.get("errors", 0)),
                "-" if row.get("foreign_cpu") is None else f"{row['foreign_cpu']:.0%}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets_text(checks: list[dict[str, Any]]) -> str:
    lines = []
    for c in checks:
        ratio = "" if c["ratio"] is None else f" (ratio {c['ratio']:.2f})"
        lines.append(f"[{c['status']}] {c['target']}: {c['measured']}{ratio}")
    return "\n".join(lines)


def render(result: Result) -> str:
    """Everything printed at the end of a run."""
    m = result.get("machine", {})
    parts: list[str] = []
    if result.get("rows"):
        parts += [
            table(result),
            "",
            "latencies in ms; other CPU: share of all cores busy with processes outside the "
            "benchmark while the row measured (noise)",
        ]
    if result.get("scenarios"):
        parts += ["", "scenarios:", scenarios_text(result), ""]
    parts += [
        f"machine: {m.get('cpu_model', '?')}, {m.get('cpu_count', '?')} CPUs, "
        f"torch {m.get('torch', '?')} on {m.get('device', '?')}; load average "
        f"{m.get('loadavg_start', '?')} at start, {m.get('loadavg_end', '?')} at the end",
    ]
    errors = [r for r in result.get("rows", []) if r.get("error")]
    parts += [f"{r['name']} failed: {r['error']}" for r in errors]
    parts += ["", "targets:", targets_text(result.get("targets", []))]
    return "\n".join(parts)


def write(result: Result, out_dir: Path) -> tuple[Path, Path]:
    """Writes ``latest.json`` and a timestamped copy into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=2, sort_keys=False) + "\n"
    latest = out_dir / "latest.json"
    stamped = out_dir / time.strftime("%Y%m%d-%H%M%S.json", time.localtime())
    latest.write_text(text)
    stamped.write_text(text)
    return latest, stamped


def main(argv: list[str] | None = None) -> None:
    """``python -m bench.report FILE``: print a results file again (targets recomputed)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m bench.report", description=main.__doc__)
    p.add_argument("file", type=Path, nargs="?", default=Path("bench/results/latest.json"))
    p.add_argument("--update", action="store_true", help="write the recomputed targets back")
    args = p.parse_args(argv)
    result = json.loads(args.file.read_text())
    result["targets"] = targets(result)
    print(render(result))
    if args.update:
        args.file.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
