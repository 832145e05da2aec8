"""`routetune serve RUN`: an HTTP API over one trained run (FastAPI + uvicorn).

* Endpoints: ``POST /v1/ner`` (token-classification heads), ``POST /v1/classify`` (sequence and
  binary heads), ``POST /v1/generate`` (decoder backbones), ``GET /healthz``, ``GET /metrics``
  (Prometheus text format), OpenAPI at ``/docs`` and ``/openapi.json``.
* Dynamic micro-batching: items of concurrent requests to the same head are gathered until
  ``max_batch`` items or ``max_wait_ms`` have passed, then run as one model call on one worker
  thread (torch keeps its own intra-op threads); each request gets its own slice back.
* Limits, each configurable: body size (413, checked on Content-Length and while the body
  streams in, before it is buffered), items per request and tokens per item (422, or
  truncation flagged per result with ``--truncate``), a concurrency cap (503 beyond it, with
  Retry-After), a per-request timeout (504). Request schemas are strict (unknown fields: 422).
* Nothing in a request names a file, a model or a pickle: the run is loaded once at start from
  its safetensors checkpoint. Binds 127.0.0.1 unless told otherwise. SIGTERM: uvicorn stops
  accepting connections and in-flight requests finish (graceful shutdown) before the batchers stop.

Results are produced by the same Predictor / generate functions as ``routetune predict``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from routetune.serve.predictor import Predictor, item_from_text, item_from_tokens

log = logging.getLogger("routetune")


@dataclass
class Limits:
    max_body_bytes: int = 1_000_000
    max_items: int = 64
    max_tokens: int | None = None  # per item; default: the run's model.max_length
    truncate: bool = False
    max_concurrency: int = 32
    timeout_s: float = 10.0
    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_new_tokens: int = 64


# ------------------------------------------------------------------ request / response schemas

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NerRequest(_Strict):
    texts: list[str] | None = Field(None, description="Raw texts; words are split as by `routetune predict`.")
    tokens: list[list[str]] | None = Field(None, description="Pre-split words (one list per item).")
    head: str | None = Field(None, description="Token-classification head (default: the only one).")


class ClassifyRequest(_Strict):
    texts: list[str]
    head: str | None = Field(None, description="Classification head (default: the only one).")


class GenerateRequest(_Strict):
    prompts: list[str]
    max_new_tokens: int = Field(32, ge=1)


# ------------------------------------------------------------------ micro-batching

class Batcher:
    """Gathers items of concurrent requests into one model call."""

    def __init__(self, fn, max_batch: int, max_wait_ms: float, executor: ThreadPoolExecutor, observe):
        self.fn, self.max_batch, self.max_wait = fn, max_batch, max_wait_ms / 1000
        self.executor, self.observe = executor, observe
        self.queue: asyncio.Queue = asyncio.Queue()
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

    async def submit(self, items: list) -> list:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((items, future))
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            n = len(batch[0][0])
            deadline = loop.time() + self.max_wait
            while n < self.max_batch:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    nxt = await asyncio.wait_for(self.queue.get(), remaining)
                except asyncio.TimeoutError:
                    break
                batch.append(nxt)
                n += len(nxt[0])
            live = [(items, fut) for items, fut in batch if not fut.done()]  # timed-out requests are dropped
            if not live:
                continue
            flat = [x for items, _ in live for x in items]
            self.observe(len(flat))
            try:
                results = await loop.run_in_executor(self.executor, self.fn, flat)
            except Exception as exc:  # noqa: BLE001 - handed to every waiting request
                for _, fut in live:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            k = 0
            for items, fut in live:
                if not fut.done():
                    fut.set_result(results[k:k + len(items)])
                k += len(items)


# ------------------------------------------------------------------ limits as ASGI middleware

class _TooLarge(Exception):
    pass


class BodyLimit:
    """413 for bodies over the limit: refused on Content-Length before reading, and counted
    while a body without one streams in (never buffered past the limit)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._reject(send)
        seen, started, too_large = 0, False, False

        async def limited_receive():
            nonlocal seen, too_large
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    too_large = True
                    raise _TooLarge  # the app may turn this into its own error response: replaced below
            return message

        async def tracking_send(message):
            nonlocal started
            if too_large:  # whatever the app answers to a cut-off body becomes our 413
                if message["type"] == "http.response.start" and not started:
                    started = True
                    await self._reject(send)
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self._reject(send)

    async def _reject(self, send):
        body = b'{"detail":"request body too large (limit %d bytes)"}' % self.limit
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


class ConcurrencyLimit:
    """503 (with Retry-After) for a prediction request beyond the cap, decided before its body is
    read or parsed: under overload, turning a request away must cost almost nothing, or the
    rejections themselves take the CPU from the model."""

    def __init__(self, app, limit: int, state: dict, metrics):
        self.app, self.limit, self.state, self.metrics = app, limit, state, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope.get("path", "").startswith("/v1/"):
            return await self.app(scope, receive, send)
        if self.state["inflight"] >= self.limit:
            body = b'{"detail":"server busy: concurrency limit reached"}'
            await send({"type": "http.response.start", "status": 503,
                        "headers": [(b"content-type", b"application/json"), (b"retry-after", b"1"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        self.state["inflight"] += 1
        self.metrics.inflight.inc()
        try:
            await self.app(scope, receive, send)
        finally:
            self.state["inflight"] -= 1
            self.metrics.inflight.dec()


class StatusMetrics:
    """Counts every response by endpoint and status code (including 413s from BodyLimit) and
    times it."""

    def __init__(self, app, metrics):
        self.app, self.metrics = app, metrics

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
            endpoint = path if path in self.metrics.endpoints else "other"
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)


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


# ------------------------------------------------------------------ the app

def create_app(model, tokenizer, cfg, limits: Limits | None = None, precision: str | None = None,
               after_batch=None) -> FastAPI:
    """The API for one loaded run (model + tokenizer + its config)."""
    limits = limits or Limits()
    # items are cut at the smaller of the limit and the model's max_length (as offline predict cuts)
    max_tokens = min(limits.max_tokens or cfg.model.max_length, cfg.model.max_length)
    if precision is None:  # chosen for the device the model is on, as `auto` does
        from routetune.device import model_device, resolve

        precision = resolve(str(model_device(model)), "auto").precision
    heads = {name: head.kind for name, head in model.heads.items()}
    token_heads = [n for n, k in heads.items() if k == "token-classification"]
    class_heads = [n for n, k in heads.items() if k in ("sequence-classification", "binary-classification")]
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="routetune-model")
    endpoints = ["/v1/ner", "/v1/classify", "/v1/generate", "/healthz", "/metrics"]
    metrics = Metrics(endpoints)
    predictors = {n: Predictor(model, tokenizer, n, max_tokens, limits.max_batch, precision)
                  for n in token_heads + class_heads}
    batchers: dict[Any, Batcher] = {}
    state = {"inflight": 0}

    def batcher(key, fn) -> Batcher:
        if key not in batchers:
            def timed(items):  # on the worker thread: time the model call, then trim the heap
                start = time.perf_counter()
                try:
                    return fn(items)
                finally:
                    metrics.batch_seconds.observe(time.perf_counter() - start)
                    if after_batch is not None:
                        after_batch()

            batchers[key] = Batcher(timed, limits.max_batch, limits.max_wait_ms, executor, metrics.batch.observe)
            batchers[key].start()
        return batchers[key]

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        for b in batchers.values():
            await b.stop()
        executor.shutdown(wait=True)

    app = FastAPI(title="routetune", version="1", lifespan=lifespan,
                  description="Predictions of a routetune run: entity spans, class labels, generations.")

    def pick(head: str | None, available: list[str], what: str) -> str:
        if not available:
            raise HTTPException(404, f"this run has no {what} head")
        if head is None:
            if len(available) > 1:
                raise HTTPException(422, f"several {what} heads ({', '.join(available)}): give 'head'")
            return available[0]
        if head not in available:
            raise HTTPException(422, f"unknown {what} head {head!r} (available: {', '.join(available)})")
        return head

    def check_items(n: int) -> None:
        if n == 0:
            raise HTTPException(422, "no items in the request")
        if n > limits.max_items:
            raise HTTPException(422, f"{n} items in one request; the limit is {limits.max_items}")

    def token_counts(texts: list[str] | None = None, words: list[list[str]] | None = None) -> list[int]:
        if words is not None:
            enc = tokenizer(words, is_split_into_words=True, add_special_tokens=True)
        else:
            enc = tokenizer(texts, add_special_tokens=True)
        return [len(ids) for ids in enc["input_ids"]]

    def check_tokens(counts: list[int]) -> list[bool]:
        over = [i for i, c in enumerate(counts) if c > max_tokens]
        if over and not limits.truncate:
            raise HTTPException(422, f"items {over[:10]} have more than {max_tokens} tokens "
                                     f"(e.g. item {over[0]}: {counts[over[0]]}); shorten them")
        if over:
            metrics.truncated.inc(len(over))
        return [c > max_tokens for c in counts]

    async def serve(endpoint: str, key, fn, items: list) -> list:
        try:
            results = await asyncio.wait_for(batcher(key, fn).submit(items), limits.timeout_s)
        except asyncio.TimeoutError:
            raise HTTPException(504, f"prediction took longer than {limits.timeout_s} s") from None
        metrics.items.labels(endpoint).inc(len(items))
        return results

    @app.post("/v1/ner")
    async def ner(req: NerRequest) -> dict:
        """Entity tags and spans (character offsets into the text) per item."""
        head = pick(req.head, token_heads, "token-classification")
        if (req.texts is None) == (req.tokens is None):
            raise HTTPException(422, "give exactly one of 'texts' or 'tokens'")
        if req.tokens is not None:
            check_items(len(req.tokens))
            if any(not t or any(not w for w in t) for t in req.tokens):
                raise HTTPException(422, "'tokens' items must be non-empty lists of non-empty strings")
            items = [item_from_tokens(t) for t in req.tokens]
        else:
            check_items(len(req.texts))
            items = [item_from_text(t) for t in req.texts]
        cut = check_tokens(token_counts(words=[it.tokens or [""] for it in items]))
        results = await serve("/v1/ner", ("ner", head), predictors[head].predict, items)
        return {"head": head, "results": [{**r, "truncated": c} for r, c in zip(results, cut)]}

    @app.post("/v1/classify")
    async def classify(req: ClassifyRequest) -> dict:
        """A label with class probabilities per text."""
        head = pick(req.head, class_heads, "classification")
        check_items(len(req.texts))
        cut = check_tokens(token_counts(texts=req.texts))
        items = [item_from_text(t) for t in req.texts]
        results = await serve("/v1/classify", ("classify", head), predictors[head].predict, items)
        return {"head": head, "results": [{**r, "truncated": c} for r, c in zip(results, cut)]}

    @app.post("/v1/generate")
    async def generate_(req: GenerateRequest) -> dict:
        """Greedy continuations (decoder backbones)."""
        from routetune.model.inference import generate

        if not model.is_decoder:
            raise HTTPException(404, "generation needs a decoder backbone; this run's is an encoder")
        check_items(len(req.prompts))
        if req.max_new_tokens > limits.max_new_tokens:
            raise HTTPException(422, f"max_new_tokens {req.max_new_tokens} is over the limit {limits.max_new_tokens}")
        cut = check_tokens(token_counts(texts=req.prompts))
        n = req.max_new_tokens

        def run(prompts):
            return generate(model, tokenizer, prompts, n, max_tokens + n, limits.max_batch, precision)

        outputs = await serve("/v1/generate", ("generate", n), run, req.prompts)
        return {"results": [{"prompt": p, "completion": o, "truncated": c}
                            for p, o, c in zip(req.prompts, outputs, cut)]}

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok", "heads": heads, "decoder": model.is_decoder, "inflight": state["inflight"]}

    @app.get("/metrics")
    async def prometheus() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException):
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    app.add_middleware(BodyLimit, limit=limits.max_body_bytes)
    app.add_middleware(ConcurrencyLimit, limit=limits.max_concurrency, state=state, metrics=metrics)
    app.add_middleware(StatusMetrics, metrics=metrics)
    app.state.limits, app.state.metrics = limits, metrics
    return app


def _libc():
    """glibc, for the allocator settings below; None where it is not the C library."""
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


class _Trim:
    """Give freed heap back to the OS at most once a second (glibc's malloc_trim): tensors of
    ever-changing shapes otherwise leave the resident set growing under load."""

    def __init__(self):
        self.libc = _libc()
        self.last = 0.0

    def __call__(self) -> None:
        now = time.monotonic()
        if self.libc is not None and now - self.last > 1.0:
            self.libc.malloc_trim(0)
            self.last = now


def tune_process() -> None:
    """Process settings for serving (called by `routetune serve`, not by create_app): glibc is
    limited to two malloc arenas, so the worker and event-loop threads do not each grow a heap
    (with the heap trimmed after batches, RSS stayed within +2.5% over a minute of overload;
    docs/serving.md)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(-8, 2)  # M_ARENA_MAX


def serve_run(run_dir, host: str = "127.0.0.1", port: int = 8080, checkpoint: str = "best",
              limits: Limits | None = None, precision: str | None = None, drain_s: float = 30.0,
              device: str | None = None) -> None:
    import uvicorn

    from routetune.model.inference import for_inference
    from routetune.device import inference_hardware
    from routetune.runs import load_run

    tune_process()
    hw = inference_hardware(device, precision)
    cfg, model, tokenizer = load_run(run_dir, checkpoint)
    for_inference(model, hw.precision, hw.device)
    log.info("serving on %s in %s (%s)", hw.device, hw.precision, hw.reason)
    app = create_app(model, tokenizer, cfg, limits, hw.precision, after_batch=_Trim())
    config = uvicorn.Config(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=drain_s,
                            access_log=False)
    uvicorn.Server(config).run()
