"""Model-server settings, each declared once: flag, GLMSERVE_* variable, type, default, help."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from glmserve.settings import Cli, log_format_setting, log_level_setting, setting

from .models import DEFAULT_MODEL

# Calls beyond the batch and the queue: health watches (one per bridge channel), ListModels,
# Tokenize.
RPC_MARGIN = 64


@dataclass(frozen=True)
class Settings:
    """Everything the model server is told at start; the README flag table is rendered from it."""

    model: str = setting(
        DEFAULT_MODEL,
        flag="--model",
        env="GLMSERVE_MODEL",
        help="the embedded default, or a local checkpoint directory "
        "(ChatGLM2 layout or any transformers chat model)",
    )
    served_model_name: str | None = setting(
        None,
        flag="--served-model-name",
        env="GLMSERVE_SERVED_MODEL_NAME",
        help="the model id clients see",
        default_text="the model's name",
    )
    cache_dir: str | None = setting(
        None,
        flag="--cache-dir",
        env="GLMSERVE_CACHE_DIR",
        metavar="DIR",
        help="where the embedded default model is converted to a torch checkpoint on its first "
        "start (~30 s, ~520 MB) and found on later ones; must be writable unless it already "
        "holds the conversion",
        default_text="`$XDG_CACHE_HOME/glmserve`, else `~/.cache/glmserve`",
    )
    host: str = setting("127.0.0.1", flag="--host", env="GLMSERVE_HOST", help="address to bind")
    port: int = setting(50051, flag="--port", env="GLMSERVE_PORT", help="gRPC port")
    device: str = setting(
        "auto",
        flag="--device",
        env="GLMSERVE_DEVICE",
        help="`auto` (cuda when available), `cpu`, `cuda`, `cuda:N`",
    )
    device_map: str | None = setting(
        None,
        flag="--device-map",
        env="GLMSERVE_DEVICE_MAP",
        choices=("auto", "balanced", "balanced_low_0", "sequential"),
        help="spread one model's layers over all visible GPUs with accelerate (a model larger "
        "than one GPU; the original demo's `num_gpus`); each layer's KV cache stays on its GPU",
        default_text="off (the whole model on `--device`)",
    )
    dtype: str = setting(
        "auto",
        flag="--dtype",
        env="GLMSERVE_DTYPE",
        help="`auto` (bf16/fp16 on CUDA, fp32 on CPU), `float32`, `float16`, `bfloat16`",
    )
    quantize: str | None = setting(
        None,
        flag="--quantize",
        env="GLMSERVE_QUANTIZE",
        help="quantize a full-precision ChatGLM checkpoint's linears at load, for small GPUs "
        "(int4/int8 checkpoints are detected by themselves)",
        choices=("int4", "int8"),
        default_text="off",
    )
    cpu_linear: str = setting(
        "auto",
        flag="--cpu-linear",
        env="GLMSERVE_CPU_LINEAR",
        choices=("auto", "onednn", "torch"),
        help="how an fp32 model's linears run on the CPU: `onednn` packs each weight once at "
        "load for oneDNN (about 2x faster than torch's MKL path on AMD CPUs with AVX-512, on "
        "par on AVX2 ones; last-bit differences only) and runs prompts over cached KV (prefix "
        "hits, later chunks) attending as explicit matmuls too, `torch` leaves both to torch; "
        "`auto`: oneDNN on x86-64 when this torch has it",
    )
    fused_layers: bool = setting(
        True,
        flag="--fused-layers",
        env="GLMSERVE_FUSED_LAYERS",
        help="apply ChatGLM's rotary from tables built once per forward and, on CUDA, run "
        "standard RMSNorms as one fused kernel (fewer kernel launches: 1.3-1.6x tok/s on a GPU "
        "at 1-16 streams); identical results in fp32, RMSNorm within one last-place unit in "
        "bf16/fp16",
    )
    cuda_graphs: bool = setting(
        True,
        flag="--cuda-graphs",
        env="GLMSERVE_CUDA_GRAPHS",
        help="on CUDA, decode steps with static shapes replay a CUDA graph (one launch per "
        "step instead of hundreds), captured at a batch's first step after each join, leave "
        "or growth: 1.2-1.8x tok/s on an H100 at 64-1 streams; no effect on the CPU or with "
        "a sliding window",
    )
    max_model_len: int | None = setting(
        None,
        flag="--max-model-len",
        env="GLMSERVE_MAX_MODEL_LEN",
        help="context window in tokens (prompt + reply)",
        default_text="the model's",
    )
    health_port: int | None = setting(
        None,
        flag="--health-port",
        env="GLMSERVE_HEALTH_PORT",
        help="a second, plaintext port serving only `grpc.health.v1` (the same status): for "
        "Kubernetes gRPC probes, which speak neither TLS nor tokens",
        default_text="off",
    )
    metrics_port: int | None = setting(
        None,
        flag="--metrics-port",
        env="GLMSERVE_METRICS_PORT",
        help="Prometheus `/metrics` port",
        default_text="off",
    )
    drain_seconds: float = setting(
        30.0,
        flag="--drain-seconds",
        env="GLMSERVE_DRAIN_SECONDS",
        help="on SIGTERM, how long in-flight streams may finish",
    )
    max_num_seqs: int = setting(
        64,
        flag="--max-num-seqs",
        env="GLMSERVE_MAX_NUM_SEQS",
        help="requests generating at once (batch size)",
    )
    max_waiting: int = setting(
        512,
        flag="--max-waiting",
        env="GLMSERVE_MAX_WAITING",
        help="queue bound; beyond it new requests get `RESOURCE_EXHAUSTED` (HTTP 429)",
    )
    kv_cache_tokens: int | None = setting(
        None,
        flag="--kv-cache-tokens",
        env="GLMSERVE_KV_CACHE_TOKENS",
        help="KV-cache pool size in tokens, rounded down to whole blocks",
        default_text="from `--kv-cache-memory-fraction`",
    )
    kv_cache_memory_fraction: float = setting(
        0.3,
        flag="--kv-cache-memory-fraction",
        env="GLMSERVE_KV_CACHE_MEMORY_FRACTION",
        help="share of free device memory (host RAM on CPU) for the KV cache, "
        "when `--kv-cache-tokens` is not given",
    )
    kv_block_size: int = setting(
        16,
        flag="--kv-block-size",
        env="GLMSERVE_KV_BLOCK_SIZE",
        help="tokens per KV-cache block (the unit of allocation and of prefix caching)",
    )
    prefix_caching: bool = setting(
        True,
        flag="--prefix-caching",
        env="GLMSERVE_PREFIX_CACHING",
        help="reuse the KV cache of earlier requests' common prefixes (multi-turn chats)",
    )
    prefill_chunk_tokens: int = setting(
        0,
        flag="--prefill-chunk-tokens",
        env="GLMSERVE_PREFILL_CHUNK_TOKENS",
        help="most (padded) prompt tokens prefilled per step; longer prompts go in chunks so "
        "streams keep flowing; `0`: by device",
        default_text="`0` = by device: 256 on CPU, 2048 on GPU",
    )
    max_stream_backlog: int = setting(
        3,
        flag="--max-stream-backlog",
        env="GLMSERVE_MAX_STREAM_BACKLOG",
        help="a stream whose client leaves this many outputs unread is paused: its seat, "
        "compute and KV are freed (its blocks stay in the prefix cache) until the client has "
        "read all but a quarter of them; `0`: never pause",
    )
    step_timeout_seconds: float = setting(
        60.0,
        flag="--step-timeout-seconds",
        env="GLMSERVE_STEP_TIMEOUT_SECONDS",
        help="watchdog: an engine step running longer than this marks the server `NOT_SERVING`, "
        "ends open streams with `UNAVAILABLE` and exits non-zero",
    )
    max_concurrent_rpcs: int | None = setting(
        None,
        flag="--max-concurrent-rpcs",
        env="GLMSERVE_MAX_CONCURRENT_RPCS",
        help="calls open at once (streams included); beyond it grpc answers `RESOURCE_EXHAUSTED` "
        "before any of our code runs. The default leaves room for health watches, `ListModels` "
        "and `Tokenize` beside a full batch and a full queue",
        default_text=f"`--max-num-seqs` + `--max-waiting` + {RPC_MARGIN}",
    )
    tls_cert: str | None = setting(
        None,
        flag="--tls-cert",
        env="GLMSERVE_TLS_CERT",
        metavar="FILE",
        help="PEM certificate chain; with `--tls-key` the port speaks TLS only",
        default_text="off (plaintext)",
    )
    tls_key: str | None = setting(
        None,
        flag="--tls-key",
        env="GLMSERVE_TLS_KEY",
        metavar="FILE",
        help="PEM private key of `--tls-cert`",
        default_text="off",
    )
    tls_client_ca: str | None = setting(
        None,
        flag="--tls-client-ca",
        env="GLMSERVE_TLS_CLIENT_CA",
        metavar="FILE",
        help="PEM CA bundle; clients must present a certificate it signed (mutual TLS)",
        default_text="off",
    )
    auth_token_file: str | None = setting(
        None,
        flag="--auth-token-file",
        env="GLMSERVE_AUTH_TOKEN_FILE",
        metavar="FILE",
        help="file holding a shared token; every call except `grpc.health.v1` must send "
        "`authorization: Bearer <token>`, else `UNAUTHENTICATED`",
        default_text="off",
    )
    reflection: bool = setting(
        True,
        flag="--reflection",
        env="GLMSERVE_REFLECTION",
        help="gRPC server reflection (what `grpcurl list` and `describe` use)",
    )
    max_connection_age: float | None = setting(
        None,
        flag="--max-connection-age",
        env="GLMSERVE_MAX_CONNECTION_AGE",
        metavar="SECONDS",
        help="close each client connection after about this long (grpc `max_connection_age`, "
        "+-10% jitter): clients reconnect and resolve DNS again, so new replicas get traffic",
        default_text="off",
    )
    max_connection_age_grace: float = setting(
        900.0,
        flag="--max-connection-age-grace",
        env="GLMSERVE_MAX_CONNECTION_AGE_GRACE",
        metavar="SECONDS",
        help="how long calls open when a connection ages out may still run; keep it above the "
        "longest stream (the bridge's `--request-timeout`)",
    )
    log_level: str = log_level_setting("`debug`, `info` (one line per request), `warning`, `error`")
    log_format: str = log_format_setting()

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError("--port must be in 1..65535")
        if self.kv_block_size < 1:
            raise ValueError("--kv-block-size must be >= 1")
        if self.step_timeout_seconds <= 0:
            raise ValueError("--step-timeout-seconds must be > 0")
        if self.max_stream_backlog < 0:
            raise ValueError("--max-stream-backlog must be >= 0")
        if self.max_concurrent_rpcs is not None and self.max_concurrent_rpcs < 1:
            raise ValueError("--max-concurrent-rpcs must be >= 1")
        if self.health_port is not None and not 0 < self.health_port < 65536:
            raise ValueError("--health-port must be in 1..65535")
        if self.max_connection_age is not None and self.max_connection_age <= 0:
            raise ValueError("--max-connection-age must be > 0")
        if self.max_connection_age_grace < 0:
            raise ValueError("--max-connection-age-grace must be >= 0")

    @property
    def concurrent_rpcs(self) -> int:
        """--max-concurrent-rpcs, else every seat and queue slot plus the control margin."""
        if self.max_concurrent_rpcs is not None:
            return self.max_concurrent_rpcs
        return self.max_num_seqs + self.max_waiting + RPC_MARGIN

    @property
    def model_id(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        return os.path.basename(os.path.normpath(self.model)) or self.model


CLI = Cli(
    Settings,
    prog="model-server",
    description="glmserve model server: serves glmserve.v1.ChatService over gRPC.",
)


def parse_settings(
    argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None
) -> Settings:
    """Settings from the command line and the environment (os.environ unless given); a bad
    TLS/token file combination is a usage error (status 2), not a traceback at bind time."""
    settings = CLI.parse(argv, env)
    problem = security_problem(settings)
    if problem:
        CLI.parser().error(problem)
    return settings


def security_problem(s: Settings) -> str | None:
    """What is wrong with the TLS and token files, if anything.

    Checked here rather than in ``__post_init__``: it needs both flags of a pair and reads
    files, while the dataclass validates each value on its own.
    """
    if (s.tls_cert is None) != (s.tls_key is None):
        return "--tls-cert and --tls-key go together"
    if s.tls_client_ca and not s.tls_cert:
        return "--tls-client-ca needs --tls-cert and --tls-key"
    for flag, path in (
        ("--tls-cert", s.tls_cert),
        ("--tls-key", s.tls_key),
        ("--tls-client-ca", s.tls_client_ca),
        ("--auth-token-file", s.auth_token_file),
    ):
        if path is None:
            continue
        try:
            data = Path(path).read_bytes()
        except OSError as err:
            return f"{flag}: cannot read {path}: {err.strerror}"
        if not data.strip():
            return f"{flag}: {path} is empty"
    return None
