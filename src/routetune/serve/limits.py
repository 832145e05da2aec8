"""The server's limits (one dataclass: the defaults of `routetune serve`'s options too) and the
ASGI middleware that enforces the ones that act before a handler runs.

Order, outermost first: StatusMetrics (counts, times and logs every response) -> Auth (bearer
key) -> BodyReader (the whole body, within `max_body_bytes` and `body_timeout_s`) ->
ConcurrencyLimit (a prediction slot, taken only once the body is in) -> the app. A client that
sends its body slowly, or never, holds a connection but never a prediction slot; a connection
that sends no complete headers is closed by serve/connections.py.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from dataclasses import dataclass

log = logging.getLogger("routetune")


@dataclass
class Limits:
    max_body_bytes: int = 1_000_000
    """Larger request bodies get 413 (on Content-Length, or counted as the body streams in)."""
    max_items: int = 64
    """Items per request (more: 422)."""
    max_tokens: int | None = None
    """Tokens per item (default: the run's model.max_length; more: 422, or cut with `truncate`)."""
    max_chars: int = 20_000
    """Characters per item, checked before any tokenising (more: 422, or cut with `truncate`)."""
    truncate: bool = False
    """Cut long items to the limits and flag them instead of 422."""
    max_concurrency: int = 32
    """Prediction requests served at once, counted from when their body has arrived (more: 503)."""
    max_connections: int = 256
    """Open connections: past this, a new connection closes one waiting for its request headers (one
    never served first, the longest waiting; only if every connection has a request in flight is
    the new one refused)."""
    header_timeout_s: float = 5.0
    """Seconds a connection may wait for a request's headers (after connecting, or after its last
    response) before it is closed."""
    body_timeout_s: float = 5.0
    """Seconds a request's body may take to arrive (then 408)."""
    timeout_s: float = 10.0
    """Seconds from a request's body to its response: tokenising, queueing and the model (then 504)."""
    max_batch: int = 32
    """Items per model call (micro-batch)."""
    max_batch_tokens: int = 16_384
    """Tokens per model call: a micro-batch stops growing before it would pass this."""
    max_wait_ms: float = 5.0
    """Wait this long to fill a micro-batch."""
    max_new_tokens: int = 64
    """Largest max_new_tokens a generate request may ask for."""


OPENAI_PATHS = ("/v1/models", "/v1/chat/completions", "/v1/completions")
OPENAI_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
                      408: "timeout", 413: "invalid_request_error", 503: "server_error", 504: "timeout"}


def is_openai_path(path: str) -> bool:
    """The OpenAI endpoints (serve/openai_api.py) answer errors in OpenAI's shape."""
    return path in OPENAI_PATHS or path.startswith("/v1/models/")


def openai_error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""
    kind = OPENAI_ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


async def _reply(send, status: int, detail: str, headers: list | None = None, scope=None) -> None:
    import json

    if scope is not None and is_openai_path(scope.get("path", "")):
        body = json.dumps(openai_error_body(status, detail)).encode()
    else:
        body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class BodyReader:
    """Reads a POST body completely before the app sees the request: 413 past `limit` bytes
    (refused on Content-Length before reading), 408 when it does not arrive within `timeout_s`.
    The request's deadline (`scope["state"]["deadline"]`) starts when the body is in."""

    def __init__(self, app, limit: int, timeout_s: float, request_timeout_s: float):
        self.app, self.limit, self.timeout_s, self.request_timeout_s = app, limit, timeout_s, request_timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await _reply(send, 413, f"request body too large (limit {self.limit} bytes)",
                                [(b"connection", b"close")], scope)
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self.timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > self.limit:
                        return await _reply(send, 413, f"request body too large (limit {self.limit} bytes)",
                                            [(b"connection", b"close")], scope)
                    chunks.append(chunk)
                    if not message.get("more_body"):
                        break
        except TimeoutError:
            return await _reply(send, 408, f"request body not received within {self.timeout_s} s",
                                [(b"connection", b"close")], scope)
        body, delivered = b"".join(chunks), False

        async def replay():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        scope.setdefault("state", {})["deadline"] = time.monotonic() + self.request_timeout_s
        await self.app(scope, replay, send)


class ConcurrencyLimit:
    """503 (with Retry-After) for a prediction request beyond the cap. It runs inside BodyReader,
    so only requests whose body has arrived hold a slot; turning one away costs no parsing."""

    def __init__(self, app, limit: int, state: dict, metrics):
        self.app, self.limit, self.state, self.metrics = app, limit, state, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope.get("path", "").startswith("/v1/"):
            return await self.app(scope, receive, send)
        if self.state["inflight"] >= self.limit:
            return await _reply(send, 503, "server busy: concurrency limit reached", [(b"retry-after", b"1")], scope)
        self.state["inflight"] += 1
        self.metrics.inflight.inc()
        try:
            await self.app(scope, receive, send)
        finally:
            self.state["inflight"] -= 1
            self.metrics.inflight.dec()


class Auth:
    """With an API key: `Authorization: Bearer KEY` on every path but /healthz (401 otherwise)."""

    OPEN = ("/healthz",)

    def __init__(self, app, api_key: str | None):
        self.app, self.key = app, (api_key or "").encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.key or scope.get("path") in self.OPEN:
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, token = given.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
            return await _reply(send, 401, "missing or wrong API key (Authorization: Bearer KEY)",
                                [(b"www-authenticate", b"Bearer")], scope)
        await self.app(scope, receive, send)


class StatusMetrics:
    """Counts every response by endpoint and status code (the middleware's own 401/408/413/503
    included), times it, and writes one access-log line (method, path, status, items, ms)."""

    def __init__(self, app, metrics, access_log: bool = True):
        self.app, self.metrics, self.access_log = app, metrics, access_log

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500
        path = scope.get("path", "")

        async def capture(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            seconds = time.perf_counter() - start
            endpoint = path if path in self.metrics.endpoints else "other"
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(seconds)
            if self.access_log:  # time, client, request, status, items, duration
                items = scope.get("state", {}).get("items", "-")
                client = scope.get("client") or ("-", 0)
                log.info("%s %s:%s %s %s %d items=%s %.1f ms", time.strftime("%Y-%m-%dT%H:%M:%S"), client[0],
                         client[1], scope.get("method"), path, status, items, 1000 * seconds)


class Metrics:
    def __init__(self, endpoints: list[str]):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.endpoints = set(endpoints)
        self.requests = Counter("routetune_requests", "HTTP responses by endpoint and status code",
                                ["endpoint", "code"], registry=self.registry)
        self.latency = Histogram("routetune_request_seconds", "Request latency", ["endpoint"], registry=self.registry,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.batch = Histogram("routetune_batch_items", "Items per model call (micro-batches)", registry=self.registry,
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.batch_seconds = Histogram("routetune_batch_seconds", "Seconds per model call (one micro-batch)",
                                       registry=self.registry,
                                       buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
        self.items = Counter("routetune_items", "Items predicted", ["endpoint"], registry=self.registry)
        self.inflight = Gauge("routetune_inflight_requests", "Requests being served", registry=self.registry)
        self.truncated = Counter("routetune_truncated_items", "Items cut to the token limit", registry=self.registry)
        self.connections = Gauge("routetune_open_connections", "Open HTTP connections", registry=self.registry)
        self.connections_closed = Counter("routetune_connections_closed", "Connections closed by the server: "
                                          "header_timeout (headers not complete in time), evicted (the longest "
                                          "waiting, to admit a new one), refused (all busy)", ["reason"],
                                          registry=self.registry)
