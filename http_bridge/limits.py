"""Per-key limits on the routes that generate (``POST /v1/chat/completions`` and
``/v1/completions``, streaming or not): request rate, token rate, concurrent requests.

One key's budget is shared by both routes.

A key is the caller's API key (held as a SHA-256 digest, never the key itself) when ``--api-key``
is set, else the client IP as uvicorn reports it (``X-Forwarded-For`` counts only from the
addresses uvicorn trusts, by default 127.0.0.1). Counters live in this process (the ``limits``
library's memory storage): several bridge replicas each enforce the whole limit.

Strategies, and why:

- requests: ``limits``' moving window, so no key gets twice its rate across a window boundary;
  only admitted requests count (a 429 does not), whatever their outcome.
- tokens: a fixed window, because tokens are only known once generated: each finished choice
  charges its completion tokens (and its prompt's tokens, once per distinct prompt: chat has one,
  a completions request one per prompt in its list) when its final message arrives, even past
  the limit; a fixed window records such an overshoot, a moving window would refuse to. A
  request is admitted while the key has any tokens left in the window, so the last one may
  overshoot by its own size. A choice cut off (disconnect, error) charges nothing.
- concurrency: a plain counter per key, held from admission until the response's last byte (a
  stream: until it ends or the client leaves).

All checks and updates are synchronous (no await between test and hit), so they are atomic on the
event loop and no key ever waits on another.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field

from limits import RateLimitItem, parse_many
from limits.storage import MemoryStorage
from limits.strategies import FixedWindowRateLimiter, MovingWindowRateLimiter
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from http_bridge.errors import APIError

# The routes that generate, streaming or not: one key's budget covers them all. /health,
# /metrics and /v1/models are never limited. A list, not a mark on the routes: the middleware
# runs before routing, and FastAPI (>= 0.165) keeps an included router's routes out of app.routes.
LIMITED_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
LEASE_KEY = "glmserve.limits.lease"


def parse_rate(text: str, flag: str) -> list[RateLimitItem]:
    """``5/minute``, ``10/second;100/minute``... as ``limits`` items; a ValueError naming
    ``flag`` otherwise (create_app raises it at startup)."""
    try:
        items = parse_many(text)
    except ValueError as err:
        raise ValueError(f"{flag}: {err} (e.g. 5/minute or 10/second;100/minute)") from None
    if not items:
        raise ValueError(f"{flag}: no rate in {text!r}")
    return items


def _duration(seconds: float) -> str:
    """OpenAI's reset format: ``1s``, ``6m0s``, ``1h2m3s``."""
    seconds = max(0.0, seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    out = f"{int(hours)}h" if hours else ""
    out += f"{int(minutes)}m" if hours or minutes else ""
    return out + (f"{int(secs)}s" if out else f"{secs:.3g}s")


@dataclass
class _Usage:
    """The most binding window of one kind (requests or tokens) for one key, now."""

    limit: int
    remaining: int
    reset_at: float  # epoch seconds

    def headers(self, kind: str) -> dict[str, str]:
        return {
            f"x-ratelimit-limit-{kind}": str(self.limit),
            f"x-ratelimit-remaining-{kind}": str(max(0, self.remaining)),
            f"x-ratelimit-reset-{kind}": _duration(self.reset_at - time.time()),
        }


class Limiter:
    """The three limits for every key; ``enabled`` is False when none is configured."""

    def __init__(
        self,
        rate_limit: str | None,
        token_rate_limit: str | None,
        max_concurrent_per_key: int | None,
    ) -> None:
        storage = MemoryStorage()
        self.requests = [] if rate_limit is None else parse_rate(rate_limit, "--rate-limit")
        self.tokens = (
            [] if token_rate_limit is None else parse_rate(token_rate_limit, "--token-rate-limit")
        )
        self.max_concurrent = max_concurrent_per_key
        self._moving = MovingWindowRateLimiter(storage)
        self._fixed = FixedWindowRateLimiter(storage)
        self._open: dict[str, int] = {}

    @property
    def enabled(self) -> bool:
        return bool(self.requests or self.tokens or self.max_concurrent)

    def _usage(self, kind: str, key: str) -> _Usage | None:
        """The window with the fewest units left (requests: moving; tokens: fixed)."""
        items, strategy = (
            (self.requests, self._moving) if kind == "requests" else (self.tokens, self._fixed)
        )
        usages = [
            _Usage(item.amount, stats.remaining, stats.reset_time)
            for item in items
            for stats in [strategy.get_window_stats(item, kind, key)]
        ]
        return min(usages, key=lambda u: (u.remaining, -u.reset_at), default=None)

    def headers(self, key: str) -> dict[str, str]:
        """OpenAI's x-ratelimit-* headers for every configured rate."""
        out: dict[str, str] = {}
        for kind in ("requests", "tokens"):
            if (usage := self._usage(kind, key)) is not None:
                out |= usage.headers(kind)
        return out

    def _refuse(self, key: str, what: str, limit: str, retry_after: float) -> APIError:
        headers = self.headers(key)
        headers["retry-after"] = str(max(1, math.ceil(retry_after)))
        return APIError(
            429,
            f"Rate limit reached for {what} ({limit} per key). "
            f"Retry after {headers['retry-after']} s.",
            type="rate_limit_error",
            code="rate_limit_exceeded",
            headers=headers,
        )

    def admit(self, key: str) -> Lease:
        """Count one request for ``key``, or raise the 429 of the first limit it is over."""
        now = time.time()
        for item in self.requests:
            if not self._moving.test(item, "requests", key):
                reset = self._moving.get_window_stats(item, "requests", key).reset_time
                raise self._refuse(key, "requests", str(item), reset - now)
        for item in self.tokens:
            stats = self._fixed.get_window_stats(item, "tokens", key)
            if stats.remaining <= 0:
                raise self._refuse(key, "tokens", str(item), stats.reset_time - now)
        if self.max_concurrent and self._open.get(key, 0) >= self.max_concurrent:
            # No window to wait for: a slot frees when one of the key's requests ends.
            raise self._refuse(
                key, "concurrent requests", f"{self.max_concurrent} at a time", retry_after=1
            )
        for item in self.requests:
            self._moving.hit(item, "requests", key)
        self._open[key] = self._open.get(key, 0) + 1
        return Lease(self, key)

    def charge(self, key: str, tokens: int) -> None:
        """Add tokens to every token window of ``key``, past the limit if need be."""
        if tokens > 0:
            for item in self.tokens:
                self._fixed.hit(item, "tokens", key, cost=tokens)

    def release(self, key: str) -> None:
        left = self._open[key] - 1
        if left:
            self._open[key] = left
        else:
            del self._open[key]  # no entry per key ever seen


@dataclass
class Lease:
    """One admitted request: its concurrency slot and its token charges."""

    limiter: Limiter
    key: str
    prompts_charged: set[int] = field(default_factory=set)
    released: bool = False

    def charge(self, prompt_tokens: int, completion_tokens: int, prompt: int = 0) -> None:
        """A finished choice's usage; ``prompt`` (which of the request's prompts it continues)
        counts once, however many of the n choices share it, as the reply's usage counts it."""
        tokens = completion_tokens + (0 if prompt in self.prompts_charged else prompt_tokens)
        self.prompts_charged.add(prompt)
        self.limiter.charge(self.key, tokens)

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.limiter.release(self.key)


def lease_of(scope: Scope) -> Lease | None:
    """The request's lease, when limits are on (the route charges tokens to it)."""
    return scope.get(LEASE_KEY)


def client_key(scope: Scope, keyed: bool) -> str:
    """The bearer key's digest when API keys are configured (the key middleware has checked
    it already), else the client's IP."""
    if keyed:
        token = Headers(scope=scope).get("authorization", "").partition(" ")[2].strip()
        return "key:" + hashlib.sha256(token.encode()).hexdigest()
    client = scope.get("client")
    return "ip:" + (client[0] if client else "unknown")


class LimitsMiddleware:
    """Admits or refuses (429) each generation request before its body is read, adds the
    x-ratelimit-* headers to the response, and frees the concurrency slot after its last byte."""

    def __init__(self, app: ASGIApp, limiter: Limiter, keyed: bool) -> None:
        self.app = app
        self.limiter = limiter
        self.keyed = keyed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope.get("method") != "POST"  # a preflight or a 405 generates nothing
            or scope.get("path") not in LIMITED_PATHS
        ):
            await self.app(scope, receive, send)
            return
        key = client_key(scope, self.keyed)
        try:
            lease = self.limiter.admit(key)
        except APIError as error:
            await error.to_response()(scope, receive, send)
            return
        scope[LEASE_KEY] = lease

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in self.limiter.headers(key).items():
                    headers[name] = value
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            lease.release()
