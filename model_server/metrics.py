"""The model server's Prometheus instruments, in one place (names are a public contract)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from .engine.types import EngineObserver

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class ServerMetrics(EngineObserver):
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests_running = Gauge(
            "glmserve_requests_running",
            "Requests admitted to the batch (prefilling or decoding)",
            registry=r,
        )
        self.requests_waiting = Gauge(
            "glmserve_requests_waiting", "Requests queued, not yet admitted", registry=r
        )
        self.requests_paused = Gauge(
            "glmserve_requests_paused",
            "Requests paused because their clients stopped reading (no seat, no KV, nothing "
            "computed until they read again)",
            registry=r,
        )
        self.prompt_tokens = Counter(
            "glmserve_prompt_tokens", "Prompt tokens of finished requests", registry=r
        )
        self.generated_tokens = Counter("glmserve_generated_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram(
            "glmserve_time_to_first_token_seconds",
            "Arrival to first token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.duration = Histogram(
            "glmserve_request_duration_seconds",
            "Arrival to last token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            "glmserve_requests", "Finished requests by finish reason", ["finish_reason"], registry=r
        )
        self.batch_size = Histogram(
            "glmserve_batch_size",
            "Rows per forward step",
            ["phase"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.step_tokens = Counter(
            "glmserve_step_tokens", "Tokens processed by forward steps", ["phase"], registry=r
        )
        self.decode_steps = Counter(
            "glmserve_decode_steps",
            "Decode steps by how they ran: ordinary, static (CUDA, eager), capture (a CUDA "
            "graph captured, then replayed), graph (a replayed CUDA graph)",
            ["mode"],
            registry=r,
        )
        self.kv_cache_usage = Gauge(
            "glmserve_kv_cache_usage_ratio",
            "KV-cache blocks in use / blocks in the pool (padding, spare room and cached "
            "prefix blocks included)",
            registry=r,
        )
        self.kv_cache_tokens = Gauge(
            "glmserve_kv_cache_tokens",
            "KV-cache positions in use (blocks in use x block size)",
            registry=r,
        )
        self.kv_cache_blocks_used = Gauge(
            "glmserve_kv_cache_blocks_used", "KV-cache blocks in use", registry=r
        )
        self.kv_cache_blocks_total = Gauge(
            "glmserve_kv_cache_blocks_total", "KV-cache blocks in the pool", registry=r
        )
        self.prefix_cache_blocks = Gauge(
            "glmserve_prefix_cache_blocks",
            "KV-cache blocks held by the prefix cache (evicted first when memory runs out)",
            registry=r,
        )
        self.preemptions = Counter(
            "glmserve_num_preemptions",
            "Requests preempted (KV freed, recomputed later) because the pool ran out",
            registry=r,
        )
        self.stream_pauses = Counter(
            "glmserve_stream_pauses",
            "Times a stream was paused because its client left --max-stream-backlog outputs unread",
            registry=r,
        )
        self.prefix_queries = Counter(
            "glmserve_prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache at admission",
            registry=r,
        )
        self.prefix_hits = Counter(
            "glmserve_prefix_cache_hits",
            "Prompt tokens found in the prefix cache (not recomputed)",
            registry=r,
        )
        # The Gateway API Inference Extension's model-server protocol: its endpoint picker reads
        # queue depth, running requests and KV-cache utilization (0..1) under vLLM's names by
        # default. Same values as the glmserve_* gauges above.
        self.gateway_waiting = Gauge(
            "vllm:num_requests_waiting", "Same as glmserve_requests_waiting", registry=r
        )
        self.gateway_running = Gauge(
            "vllm:num_requests_running", "Same as glmserve_requests_running", registry=r
        )
        self.gateway_kv_usage = Gauge(
            "vllm:gpu_cache_usage_perc",
            "Same as glmserve_kv_cache_usage_ratio (0..1, on the CPU too)",
            registry=r,
        )
        self._seen = (0, 0, 0, 0)
        self.model_loaded = Gauge(
            "glmserve_model_loaded", "1 once the model is loaded and serving", registry=r
        )

    # EngineObserver -----------------------------------------------------------------------

    def queue_changed(self, running: int, waiting: int, paused: int) -> None:
        self.requests_running.set(running)
        self.requests_waiting.set(waiting)
        self.requests_paused.set(paused)
        self.gateway_running.set(running)
        self.gateway_waiting.set(waiting)

    def step(self, kind: str, batch_size: int, tokens: int) -> None:
        self.batch_size.labels(kind).observe(batch_size)
        self.step_tokens.labels(kind).inc(tokens)

    def decode_step(self, mode: str) -> None:
        self.decode_steps.labels(mode).inc()

    def kv_usage(
        self, used_blocks: int, total_blocks: int, block_size: int, cached_blocks: int
    ) -> None:
        usage = used_blocks / total_blocks if total_blocks else 0.0
        self.kv_cache_usage.set(usage)
        self.gateway_kv_usage.set(usage)
        self.prefix_cache_blocks.set(cached_blocks)
        self.kv_cache_tokens.set(used_blocks * block_size)
        self.kv_cache_blocks_used.set(used_blocks)
        self.kv_cache_blocks_total.set(total_blocks)

    def scheduler_counters(
        self, preemptions: int, prefix_queries: int, prefix_hits: int, pauses: int
    ) -> None:
        # The engine publishes totals (called from one thread only); counters take deltas.
        seen = self._seen
        self.preemptions.inc(preemptions - seen[0])
        self.prefix_queries.inc(prefix_queries - seen[1])
        self.prefix_hits.inc(prefix_hits - seen[2])
        self.stream_pauses.inc(pauses - seen[3])
        self._seen = (preemptions, prefix_queries, prefix_hits, pauses)

    # per request --------------------------------------------------------------------------

    def request_finished(
        self,
        finish_reason: str,
        prompt_tokens: int,
        completion_tokens: int,
        ttft: float | None,
        duration: float | None,
    ) -> None:
        self.requests.labels(finish_reason).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.generated_tokens.inc(completion_tokens)
        if ttft is not None:
            self.ttft.observe(ttft)
        if duration is not None:
            self.duration.observe(duration)

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        start_http_server(port, addr=host, registry=self.registry)
