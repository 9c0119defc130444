"""Model-server settings: flags, each with a GLMSERVE_* environment fallback."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass

from .models import DEFAULT_MODEL


@dataclass(frozen=True)
class Settings:
    model: str = DEFAULT_MODEL
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 50051
    device: str = "auto"
    dtype: str = "auto"
    max_model_len: int | None = None
    metrics_port: int | None = None
    drain_seconds: float = 30.0
    max_num_seqs: int = 64
    max_waiting: int = 512
    max_num_batched_tokens: int | None = None
    kv_cache_memory_fraction: float = 0.3
    prefill_chunk_tokens: int = 0  # 0: by device (see prefill_chunk_for)
    log_level: str = "info"
    log_format: str = "text"

    @property
    def model_id(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        return os.path.basename(os.path.normpath(self.model)) or self.model


def _env(name: str, default: object = None) -> object:
    return os.environ.get("GLMSERVE_" + name, default)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="model-server",
        description="glmserve model server: serves glmserve.v1.ChatService over gRPC. "
        "Every flag falls back to the GLMSERVE_<FLAG> environment variable.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d = Settings()

    def opt(flag: str, env: str, default: object, help: str, **kw: object) -> None:
        p.add_argument(flag, default=_env(env, default), help=f"{help} [env GLMSERVE_{env}]", **kw)

    opt("--model", "MODEL", d.model, f"'{DEFAULT_MODEL}' (embedded) or a local checkpoint dir")
    opt(
        "--served-model-name",
        "SERVED_MODEL_NAME",
        None,
        "model id clients see (default: the model's name)",
    )
    opt("--host", "HOST", d.host, "address to bind")
    opt("--port", "PORT", d.port, "gRPC port", type=int)
    opt("--device", "DEVICE", d.device, "auto (cuda when available), cpu, cuda, cuda:N")
    opt(
        "--dtype",
        "DTYPE",
        d.dtype,
        "auto (bf16/fp16 on CUDA, fp32 on CPU), float32, float16, bfloat16",
    )
    opt("--max-model-len", "MAX_MODEL_LEN", None, "context window (default: the model's)", type=int)
    opt("--metrics-port", "METRICS_PORT", None, "Prometheus port (off when unset)", type=int)
    opt(
        "--drain-seconds",
        "DRAIN_SECONDS",
        d.drain_seconds,
        "on SIGTERM, how long in-flight streams may finish",
        type=float,
    )
    opt("--max-num-seqs", "MAX_NUM_SEQS", d.max_num_seqs, "requests generating at once", type=int)
    opt(
        "--max-waiting",
        "MAX_WAITING",
        d.max_waiting,
        "queued requests beyond which new ones get RESOURCE_EXHAUSTED",
        type=int,
    )
    opt(
        "--max-num-batched-tokens",
        "MAX_NUM_BATCHED_TOKENS",
        None,
        "KV-cache budget in tokens "
        "(prompt + max_tokens summed over running requests; default: from "
        "--kv-cache-memory-fraction)",
        type=int,
    )
    opt(
        "--kv-cache-memory-fraction",
        "KV_CACHE_MEMORY_FRACTION",
        d.kv_cache_memory_fraction,
        "share of free device memory (host RAM on CPU) the KV cache may use",
        type=float,
    )
    opt(
        "--prefill-chunk-tokens",
        "PREFILL_CHUNK_TOKENS",
        d.prefill_chunk_tokens,
        "most (padded) prompt tokens prefilled per step, longer prompts go in chunks; "
        "0 = by device: 256 on CPU, 2048 on GPU",
        type=int,
    )
    opt("--log-level", "LOG_LEVEL", d.log_level, "debug, info, warning, error")
    opt("--log-format", "LOG_FORMAT", d.log_format, "text or json")
    return p


def parse_settings(argv: Sequence[str] | None = None) -> Settings:
    ns = parser().parse_args(argv)

    def num(v: object, kind: type) -> object:
        return None if v in (None, "") else kind(v)

    return Settings(
        model=ns.model,
        served_model_name=ns.served_model_name or None,
        host=ns.host,
        port=int(ns.port),
        device=ns.device,
        dtype=ns.dtype,
        max_model_len=num(ns.max_model_len, int),
        metrics_port=num(ns.metrics_port, int),
        drain_seconds=float(ns.drain_seconds),
        max_num_seqs=int(ns.max_num_seqs),
        max_waiting=int(ns.max_waiting),
        max_num_batched_tokens=num(ns.max_num_batched_tokens, int),
        kv_cache_memory_fraction=float(ns.kv_cache_memory_fraction),
        prefill_chunk_tokens=int(ns.prefill_chunk_tokens),
        log_level=ns.log_level,
        log_format=ns.log_format,
    )
