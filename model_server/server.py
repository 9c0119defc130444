"""The grpc.aio server: ChatService, health, reflection, TLS, token and limits; loading and
draining."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from glmserve.v1 import chat_pb2, chat_pb2_grpc

from .auth import TokenInterceptor, read_token, server_credentials
from .interceptors import ExceptionInterceptor
from .metrics import ServerMetrics
from .models.base import LoadedModel
from .servicer import ChatServicer, ServingState
from .settings import Settings

log = logging.getLogger("model_server")

SERVICE_NAME = chat_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# A request is a chat (the bridge caps bodies at 1 MiB); a reply may be a long prompt's token
# ids (Tokenize), up to what the bridge accepts (16 MiB).
MAX_RECEIVE_BYTES = 4 * 1024 * 1024
MAX_SEND_BYTES = 16 * 1024 * 1024


def prefill_chunk_for(requested: int, device_type: str) -> int:
    """Prefill tokens per step. A step stalls every stream for its duration: on a CPU 256
    tokens take a few hundred ms, on a GPU 2048 take tens of ms."""
    if requested > 0:
        return requested
    return 256 if device_type == "cpu" else 2048


def kv_pool_tokens(loaded: LoadedModel, settings: Settings) -> int:
    """The KV pool: --kv-cache-tokens, else --kv-cache-memory-fraction of free device memory
    (host RAM on the CPU), at least one full context, at most every seat at full context."""
    if settings.kv_cache_tokens:
        return settings.kv_cache_tokens
    from .engine.runner import kv_bytes_per_token

    per_token = kv_bytes_per_token(loaded.model, loaded.dtype)
    device = loaded.device
    if device.type == "cuda":
        import torch

        # --device-map: the layers (and so their KV caches) span every GPU the model uses.
        placed = set(getattr(loaded.model, "hf_device_map", {}).values())
        gpus = {f"cuda:{d}" if isinstance(d, int) else d for d in placed}
        gpus = {d for d in gpus if str(d).startswith("cuda")} or {device}
        free = sum(torch.cuda.mem_get_info(torch.device(g))[0] for g in gpus)
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    budget = int(free * settings.kv_cache_memory_fraction) // per_token
    cap = settings.max_num_seqs * loaded.max_model_len
    return max(loaded.max_model_len + 2 * settings.kv_block_size, min(cap, budget))


def connection_age_options(settings: Settings) -> list[tuple[str, int]]:
    """--max-connection-age: a GOAWAY after that long makes clients reconnect, and a
    reconnecting grpc client resolves its DNS name again (it does not on its own)."""
    if settings.max_connection_age is None:
        return []
    return [
        ("grpc.max_connection_age_ms", int(settings.max_connection_age * 1000)),
        ("grpc.max_connection_age_grace_ms", int(settings.max_connection_age_grace * 1000)),
    ]


class ModelServer:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = ServerMetrics()
        self.state = ServingState(settings.model_id)
        self.health = health.aio.HealthServicer()
        self.exceptions = ExceptionInterceptor()
        interceptors: list[grpc.aio.ServerInterceptor] = [self.exceptions]
        if settings.auth_token_file:
            # Outermost: a call without the token reaches nothing else.
            interceptors.insert(0, TokenInterceptor(read_token(settings.auth_token_file)))
        self.server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.so_reuseport", 0),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 5000),
                ("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
                ("grpc.max_send_message_length", MAX_SEND_BYTES),
                *connection_age_options(settings),
            ],
            maximum_concurrent_rpcs=settings.concurrent_rpcs,
        )
        chat_pb2_grpc.add_ChatServiceServicer_to_server(ChatServicer(self.state), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if settings.reflection:
            reflection.enable_server_reflection(
                (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
            )
        # --health-port: the same health servicer on its own plaintext server (nothing else).
        self.probe_server: grpc.aio.Server | None = None
        if settings.health_port:
            self.probe_server = grpc.aio.server()
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.probe_server)
        self.credentials = server_credentials(settings)
        self.address = f"{settings.host}:{settings.port}"
        self.engine_failed = asyncio.Event()

    async def _set_health(self, status: int) -> None:
        await self.health.set("", status)
        await self.health.set(SERVICE_NAME, status)

    async def start(self) -> None:
        if self.credentials is None:
            bound = self.server.add_insecure_port(self.address)
        else:
            bound = self.server.add_secure_port(self.address, self.credentials)
        if bound == 0:
            raise OSError(f"cannot bind {self.address}")
        if self.probe_server is not None:
            probe = f"{self.settings.host}:{self.settings.health_port}"
            if self.probe_server.add_insecure_port(probe) == 0:
                raise OSError(f"cannot bind {probe}")
        await self._set_health(_NOT_SERVING)
        await self.server.start()
        if self.probe_server is not None:
            await self.probe_server.start()
        if self.settings.metrics_port:
            self.metrics.serve(self.settings.metrics_port, self.settings.host)
        s = self.settings
        log.info(
            "listening",
            extra={
                "fields": {
                    "address": self.address,
                    "tls": "mutual" if s.tls_client_ca else "on" if self.credentials else "off",
                    "token": s.auth_token_file is not None,
                    "reflection": s.reflection,
                    "max_concurrent_rpcs": s.concurrent_rpcs,
                    "metrics_port": s.metrics_port,
                }
            },
        )

    async def load(self) -> None:
        """Loads the model in a daemon thread (Ctrl-C during a load must not hang)."""
        s = self.settings
        loop = asyncio.get_running_loop()
        done: asyncio.Future[LoadedModel] = loop.create_future()

        def work() -> None:
            try:
                # torch and transformers are imported here, while health says NOT_SERVING.
                from .models.registry import load_model, resolve_device

                loaded = load_model(
                    s.model,
                    resolve_device(s.device),
                    s.dtype,
                    s.max_model_len,
                    s.quantize,
                    device_map=s.device_map,
                    cpu_linear=s.cpu_linear,
                    fused_layers=s.fused_layers,
                    cache_dir=s.cache_dir,
                )
                loop.call_soon_threadsafe(done.set_result, loaded)
            except BaseException as exc:  # noqa: BLE001 - reported on the loop
                loop.call_soon_threadsafe(done.set_exception, exc)

        t0 = time.perf_counter()
        log.info("loading model", extra={"fields": {"model": s.model}})
        threading.Thread(target=work, name="glmserve-load", daemon=True).start()
        loaded = await done
        from .engine.engine import Engine, EngineConfig

        pool = kv_pool_tokens(loaded, s)
        engine = Engine(
            loaded,
            EngineConfig(
                max_num_seqs=s.max_num_seqs,
                max_waiting=s.max_waiting,
                kv_cache_tokens=pool,
                block_size=s.kv_block_size,
                prefill_chunk_tokens=prefill_chunk_for(s.prefill_chunk_tokens, loaded.device.type),
                prefix_caching=s.prefix_caching,
                step_timeout=s.step_timeout_seconds,
                max_stream_backlog=s.max_stream_backlog,
                cuda_graphs=s.cuda_graphs,
            ),
            self.metrics,
        )
        engine.on_dead = self._engine_died
        engine.start()
        self.state.loaded, self.state.engine = loaded, engine
        self.metrics.model_loaded.set(1)
        await self._set_health(_SERVING)
        log.info(
            "model ready",
            extra={
                "fields": {
                    "id": self.state.model_id,
                    "architecture": loaded.architecture,
                    "device": str(loaded.device),
                    "dtype": str(loaded.dtype).removeprefix("torch."),
                    "quantization": loaded.quantization or "none",
                    "max_model_len": loaded.max_model_len,
                    "kv_cache_tokens": engine.pool_tokens,
                    "kv_block_size": s.kv_block_size,
                    "prefix_caching": s.prefix_caching,
                    "prefill_chunk_tokens": engine.config.prefill_chunk_tokens,
                    "load_seconds": round(time.perf_counter() - t0, 1),
                }
            },
        )

    def _engine_died(self, reason: str) -> None:
        """The watchdog's verdict (on the event loop): NOT_SERVING at once, then exit non-zero
        so the supervisor (systemd, Kubernetes) restarts the process."""
        self.metrics.model_loaded.set(0)
        asyncio.get_running_loop().create_task(self._set_health(_NOT_SERVING))
        self.engine_failed.set()

    async def drain(self) -> None:
        """NOT_SERVING, refuse new calls, let in-flight streams finish within the grace."""
        log.info("draining", extra={"fields": {"grace_seconds": self.settings.drain_seconds}})
        self.state.draining = True
        await self.health.enter_graceful_shutdown()
        stopping = asyncio.ensure_future(self.server.stop(grace=self.settings.drain_seconds))
        # Clients' health watches (one per bridge channel) stay open to the end: once the last
        # Chat stream is done, end them too instead of waiting out the whole grace.
        while not stopping.done() and self.exceptions.open_streams:
            await asyncio.wait({stopping}, timeout=0.1)
        if not stopping.done():
            await self.server.stop(grace=0)
        await stopping
        if self.probe_server is not None:  # answered NOT_SERVING throughout the drain
            await self.probe_server.stop(grace=0)
        if self.state.engine is not None:
            self.state.engine.shutdown()
        self.metrics.model_loaded.set(0)
        log.info("stopped")


# Exit status when the engine died (the watchdog): distinct from a load failure (1).
EXIT_ENGINE_DEAD = 3


async def serve(settings: Settings) -> int:
    server = ModelServer(settings)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loader = asyncio.create_task(server.load())
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({loader, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if loader.done() and loader.exception() is not None:
        log.error("model failed to load: %s", loader.exception())
        await server.server.stop(grace=0)
        return 1
    failed = asyncio.create_task(server.engine_failed.wait())
    await asyncio.wait({stopper, failed}, return_when=asyncio.FIRST_COMPLETED)
    loader.cancel()
    if failed.done():
        log.error("exiting: the engine is dead, the supervisor should restart this process")
        server.state.draining = True
        await server.server.stop(grace=1.0)
        return EXIT_ENGINE_DEAD
    failed.cancel()
    await server.drain()
    return 0
