"""`routetune serve RUN`: an HTTP API over one trained run (FastAPI + uvicorn).

* Endpoints: ``POST /v1/ner`` (token-classification heads), ``POST /v1/classify`` (sequence and
  binary heads), ``POST /v1/generate`` (decoder backbones), ``GET /healthz``, ``GET /metrics``
  (Prometheus text format), OpenAPI at ``/docs`` and ``/openapi.json``.
* Dynamic micro-batching: items of concurrent requests to the same head are gathered until
  ``max_batch`` items or ``max_wait_ms`` have passed, then run as one model call on one worker
  thread (torch keeps its own intra-op threads); each request gets its own slice back.
* Limits (serve/limits.py), each configurable: body size (413) and a body deadline (408), both
  before a prediction slot is taken; a connection cap; a concurrency cap (503 with Retry-After);
  items per request, characters and tokens per item (422, or cut and flagged with
  ``--truncate``), tokens per micro-batch; one deadline over the whole request (504).
  Splitting words and counting tokens run on a worker thread, never on the event loop.
  Request schemas are strict (unknown fields, strings that are not valid Unicode: 422).
* Access: an optional bearer API key; /docs and /metrics can be switched off; Swagger's files
  are not fetched from a CDN by routetune (FastAPI's default page does: use --no-docs offline).
* Nothing in a request names a file, a model or a pickle: the run is loaded once at start from
  its safetensors checkpoint. Binds 127.0.0.1 unless told otherwise. SIGTERM: uvicorn stops
  accepting connections and in-flight requests finish (graceful shutdown) before the batchers stop.

Results are produced by the same Predictor / generate functions as ``routetune predict``.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator

from routetune.device import model_device, resolve
from routetune.errors import RoutetuneError
from routetune.model.inference import generate
from routetune.runs import load_for_inference
from routetune.serve.limits import Auth, BodyReader, ConcurrencyLimit, Limits, Metrics, StatusMetrics
from routetune.serve.predictor import Predictor, item_from_text, item_from_tokens, unicode_problem

log = logging.getLogger("routetune")


# ------------------------------------------------------------------ request / response schemas

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _valid_unicode(value):
    """Every string of a request must be encodable (a lone surrogate from a JSON escape is not)."""
    strings = value if isinstance(value, list) else [value]
    for i, s in enumerate(strings):
        if isinstance(s, list):
            _valid_unicode(s)
        elif isinstance(s, str) and (problem := unicode_problem(s)):
            raise ValueError(f"item {i}: {problem}")
    return value


class NerRequest(_Strict):
    texts: list[str] | None = Field(None, description="Raw texts; words are split as by `routetune predict`.")
    tokens: list[list[str]] | None = Field(None, description="Pre-split words (one list per item).")
    head: str | None = Field(None, description="Token-classification head (default: the only one).")
    _unicode = field_validator("texts", "tokens", "head")(_valid_unicode)


class ClassifyRequest(_Strict):
    texts: list[str]
    head: str | None = Field(None, description="Classification head (default: the only one).")
    _unicode = field_validator("texts", "head")(_valid_unicode)


class GenerateRequest(_Strict):
    prompts: list[str]
    max_new_tokens: int = Field(32, ge=1)
    _unicode = field_validator("prompts")(_valid_unicode)


# ------------------------------------------------------------------ micro-batching

class Batcher:
    """Gathers items of concurrent requests into one model call, up to `max_batch` items and
    `max_tokens` tokens (a request that would pass either waits for the next call)."""

    def __init__(self, fn, max_batch: int, max_wait_ms: float, executor: ThreadPoolExecutor, observe,
                 max_tokens: int | None = None):
        self.fn, self.max_batch, self.max_wait = fn, max_batch, max_wait_ms / 1000
        self.max_tokens = max_tokens
        self.executor, self.observe = executor, observe
        self.queue: asyncio.Queue = asyncio.Queue()
        self.carry = None  # a request that did not fit the previous call goes first into the next
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

    async def submit(self, items: list, tokens: int = 0) -> list:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((items, tokens, future))
        return await future

    def _fits(self, n: int, tokens: int, entry) -> bool:
        return (n + len(entry[0]) <= self.max_batch
                and (self.max_tokens is None or tokens + entry[1] <= self.max_tokens))

    async def _gather(self) -> list:
        loop = asyncio.get_running_loop()
        first, self.carry = self.carry or await self.queue.get(), None
        batch, n, tokens = [first], len(first[0]), first[1]
        deadline = loop.time() + self.max_wait
        while n < self.max_batch:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                nxt = await asyncio.wait_for(self.queue.get(), remaining)
            except asyncio.TimeoutError:
                break
            if not self._fits(n, tokens, nxt):
                self.carry = nxt
                break
            batch.append(nxt)
            n, tokens = n + len(nxt[0]), tokens + nxt[1]
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather()
            live = [(items, fut) for items, _, fut in batch if not fut.done()]  # timed-out requests are dropped
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


# ------------------------------------------------------------------ the app

class Service:
    """What the endpoints share: the run, its predictors and batchers, the limits, and the two
    executors: one thread for the model, two for preparing requests (word splitting and token
    counting are CPU work that must not stall the event loop)."""

    def __init__(self, model, tokenizer, cfg, limits: Limits, precision: str, after_batch=None):
        self.model, self.tokenizer, self.limits, self.precision = model, tokenizer, limits, precision
        self.after_batch = after_batch
        # items are cut at the smaller of the limit and the model's max_length (as offline predict cuts)
        self.max_tokens = min(limits.max_tokens or cfg.model.max_length, cfg.model.max_length)
        self.heads = {name: head.kind for name, head in model.heads.items()}
        self.token_heads = [n for n, k in self.heads.items() if k == "token-classification"]
        self.class_heads = [n for n, k in self.heads.items() if k in ("sequence-classification", "binary-classification")]
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="routetune-model")
        self.prep = ThreadPoolExecutor(max_workers=2, thread_name_prefix="routetune-prepare")
        self.metrics = Metrics(["/v1/ner", "/v1/classify", "/v1/generate", "/healthz", "/metrics"])
        self.predictors = {n: Predictor(model, tokenizer, n, self.max_tokens, limits.max_batch, precision)
                           for n in self.token_heads + self.class_heads}
        self.batchers: dict[Any, Batcher] = {}
        self.state = {"inflight": 0}
        # a fast tokenizer sets its truncation and padding on the shared Rust object at every call,
        # so threads must not share one: the model thread keeps the run's, each preparing thread
        # counts with its own copy
        self._local = threading.local()

    def thread_tokenizer(self):
        tok = getattr(self._local, "tokenizer", None)
        if tok is None:
            tok = self._local.tokenizer = copy.deepcopy(self.tokenizer)
        return tok

    def batcher(self, key, fn) -> Batcher:
        if key not in self.batchers:
            def timed(items):  # on the worker thread: time the model call, then trim the heap
                start = time.perf_counter()
                try:
                    return fn(items)
                finally:
                    self.metrics.batch_seconds.observe(time.perf_counter() - start)
                    if self.after_batch is not None:
                        self.after_batch()

            self.batchers[key] = Batcher(timed, self.limits.max_batch, self.limits.max_wait_ms, self.executor,
                                         self.metrics.batch.observe, self.limits.max_batch_tokens)
            self.batchers[key].start()
        return self.batchers[key]

    async def close(self) -> None:
        for b in self.batchers.values():
            await b.stop()
        self.executor.shutdown(wait=True)
        self.prep.shutdown(wait=False)

    @staticmethod
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

    def check_items(self, n: int) -> None:
        if n == 0:
            raise HTTPException(422, "no items in the request")
        if n > self.limits.max_items:
            raise HTTPException(422, f"{n} items in one request; the limit is {self.limits.max_items}")

    def cap_chars(self, texts: list[str]) -> tuple[list[str], list[bool]]:
        """Characters per item, before any tokenising: a 900k-character item would take seconds."""
        limit = self.limits.max_chars
        over = [i for i, t in enumerate(texts) if len(t) > limit]
        if over and not self.limits.truncate:
            raise HTTPException(422, f"items {over[:10]} have more than {limit} characters "
                                     f"(e.g. item {over[0]}: {len(texts[over[0]])}); shorten them")
        return [t[:limit] for t in texts], [len(t) > limit for t in texts]

    def check_tokens(self, counts: list[int]) -> list[bool]:
        over = [i for i, c in enumerate(counts) if c > self.max_tokens]
        if over and not self.limits.truncate:
            raise HTTPException(422, f"items {over[:10]} have more than {self.max_tokens} tokens "
                                     f"(e.g. item {over[0]}: {counts[over[0]]}); shorten them")
        if over:
            self.metrics.truncated.inc(len(over))
        return [c > self.max_tokens for c in counts]

    def token_counts(self, texts: list[str] | None = None, words: list[list[str]] | None = None) -> list[int]:
        tokenizer = self.thread_tokenizer()
        if words is not None:
            enc = tokenizer(words, is_split_into_words=True, add_special_tokens=True)
        else:
            enc = tokenizer(texts, add_special_tokens=True)
        return [len(ids) for ids in enc["input_ids"]]

    async def run(self, request: Request, endpoint: str, key, prepare, fn) -> tuple[list, list, list]:
        """The whole request under one deadline (from its body's arrival): `prepare()` on a
        preparing thread -> (items, cut flags, token count), then the micro-batched model call."""
        loop = asyncio.get_running_loop()
        deadline = request.scope.get("state", {}).get("deadline", time.monotonic() + self.limits.timeout_s)

        async def whole():
            items, cut, tokens = await loop.run_in_executor(self.prep, prepare)
            request.scope.setdefault("state", {})["items"] = len(items)
            return items, cut, await self.batcher(key, fn).submit(items, tokens)

        try:
            items, cut, results = await asyncio.wait_for(whole(), max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise HTTPException(504, f"the request took longer than {self.limits.timeout_s} s") from None
        self.metrics.items.labels(endpoint).inc(len(items))
        return items, cut, results


def create_app(model, tokenizer, cfg, limits: Limits | None = None, precision: str | None = None,
               after_batch=None, api_key: str | None = None, docs: bool = True, metrics: bool = True) -> FastAPI:
    """The API for one loaded run (model + tokenizer + its config)."""
    limits = limits or Limits()
    if precision is None:  # chosen for the device the model is on, as `auto` does
        precision = resolve(str(model_device(model)), "auto").precision
    svc = Service(model, tokenizer, cfg, limits, precision, after_batch)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        await svc.close()

    app = FastAPI(title="routetune", version="1", lifespan=lifespan,
                  description="Predictions of a routetune run: entity spans, class labels, generations.",
                  **({} if docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}))
    _prediction_routes(app, svc)
    _service_routes(app, svc, metrics)
    _error_handlers(app)
    app.add_middleware(ConcurrencyLimit, limit=limits.max_concurrency, state=svc.state, metrics=svc.metrics)
    app.add_middleware(BodyReader, limit=limits.max_body_bytes, timeout_s=limits.body_timeout_s,
                       request_timeout_s=limits.timeout_s)
    app.add_middleware(Auth, api_key=api_key)
    app.add_middleware(StatusMetrics, metrics=svc.metrics)
    app.state.limits, app.state.metrics, app.state.service = limits, svc.metrics, svc
    return app


def _prediction_routes(app: FastAPI, svc: Service) -> None:
    _ner_route(app, svc)
    _classify_route(app, svc)
    _generate_route(app, svc)


def _ner_route(app: FastAPI, svc: Service) -> None:
    @app.post("/v1/ner")
    async def ner(req: NerRequest, request: Request) -> dict:
        """Entity tags and spans (character offsets into the text) per item."""
        head = svc.pick(req.head, svc.token_heads, "token-classification")
        if (req.texts is None) == (req.tokens is None):
            raise HTTPException(422, "give exactly one of 'texts' or 'tokens'")
        if req.tokens is not None:
            svc.check_items(len(req.tokens))
            if any(not t or any(not w for w in t) for t in req.tokens):
                raise HTTPException(422, "'tokens' items must be non-empty lists of non-empty strings")
            _, chars_cut = svc.cap_chars([" ".join(t) for t in req.tokens])
            words = [_cap_words(t, svc.limits.max_chars) for t in req.tokens]
        else:
            svc.check_items(len(req.texts))
            texts, chars_cut = svc.cap_chars(req.texts)

        def prepare():
            items = ([item_from_tokens(t) for t in words] if req.tokens is not None
                     else [item_from_text(t) for t in texts])
            counts = svc.token_counts(words=[it.tokens or [""] for it in items])
            cut = [a or b for a, b in zip(svc.check_tokens(counts), chars_cut)]
            return items, cut, sum(min(c, svc.max_tokens) for c in counts)

        _, cut, results = await svc.run(request, "/v1/ner", ("ner", head), prepare, svc.predictors[head].predict)
        return {"head": head, "results": [{**r, "truncated": c} for r, c in zip(results, cut)]}


def _classify_route(app: FastAPI, svc: Service) -> None:
    @app.post("/v1/classify")
    async def classify(req: ClassifyRequest, request: Request) -> dict:
        """A label with class probabilities per text."""
        head = svc.pick(req.head, svc.class_heads, "classification")
        svc.check_items(len(req.texts))
        texts, chars_cut = svc.cap_chars(req.texts)

        def prepare():
            counts = svc.token_counts(texts=texts)
            cut = [a or b for a, b in zip(svc.check_tokens(counts), chars_cut)]
            return [item_from_text(t) for t in texts], cut, sum(min(c, svc.max_tokens) for c in counts)

        _, cut, results = await svc.run(request, "/v1/classify", ("classify", head), prepare,
                                        svc.predictors[head].predict)
        return {"head": head, "results": [{**r, "truncated": c} for r, c in zip(results, cut)]}


def _generate_route(app: FastAPI, svc: Service) -> None:
    @app.post("/v1/generate")
    async def generate_(req: GenerateRequest, request: Request) -> dict:
        """Greedy continuations (decoder backbones)."""
        if not svc.model.is_decoder:
            raise HTTPException(404, "generation needs a decoder backbone; this run's is an encoder")
        svc.check_items(len(req.prompts))
        if req.max_new_tokens > svc.limits.max_new_tokens:
            raise HTTPException(422, f"max_new_tokens {req.max_new_tokens} is over the limit "
                                     f"{svc.limits.max_new_tokens}")
        prompts, chars_cut = svc.cap_chars(req.prompts)
        n = req.max_new_tokens

        def prepare():
            counts = svc.token_counts(texts=prompts)
            cut = [a or b for a, b in zip(svc.check_tokens(counts), chars_cut)]
            return prompts, cut, sum(min(c, svc.max_tokens) + n for c in counts)

        def run(batch):
            return generate(svc.model, svc.tokenizer, batch, n, svc.max_tokens + n, svc.limits.max_batch,
                            svc.precision)

        _, cut, outputs = await svc.run(request, "/v1/generate", ("generate", n), prepare, run)
        return {"results": [{"prompt": p, "completion": o, "truncated": c}
                            for p, o, c in zip(req.prompts, outputs, cut)]}


def _cap_words(words: list[str], limit: int) -> list[str]:
    """The leading words whose joined length stays within `limit` characters (the first word
    itself cut if it alone is longer)."""
    out, used = [], 0
    for w in words:
        if used + len(w) > limit:
            if not out:
                out.append(w[:limit])
            break
        out.append(w)
        used += len(w) + 1
    return out


def _service_routes(app: FastAPI, svc: Service, metrics: bool) -> None:
    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok", "heads": svc.heads, "decoder": svc.model.is_decoder, "inflight": svc.state["inflight"]}

    if metrics:
        @app.get("/metrics")
        async def prometheus() -> Response:
            from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

            return Response(generate_latest(svc.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException):
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError):
        # FastAPI's own handler echoes each bad input back, and a NaN or a lone surrogate in it
        # makes that response fail to encode (a 500); where and what is enough
        detail = [{"loc": [x if isinstance(x, int) else str(x) for x in e.get("loc", ())],
                   "msg": str(e.get("msg", ""))[:300], "type": str(e.get("type", ""))} for e in exc.errors()]
        return JSONResponse({"detail": detail}, status_code=422)


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


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, api_key: str | None, allow_unauthenticated: bool) -> None:
    """Refuse to serve a non-loopback interface without an API key, unless told to (then warn)."""
    if is_loopback(host) or api_key:
        return
    if not allow_unauthenticated:
        raise RoutetuneError(f"--host {host}: serving beyond this machine needs an API key (--api-key or "
                             "ROUTETUNE_API_KEY); pass --allow-unauthenticated to serve it open anyway")
    log.warning("serving on %s WITHOUT an API key: anyone who can reach this address can use the model "
                "and its /docs and /metrics", host)


def serve_run(run_dir, host: str = "127.0.0.1", port: int = 8080, checkpoint: str = "best",
              limits: Limits | None = None, precision: str | None = None, drain_s: float = 30.0,
              device: str | None = None, api_key: str | None = None, allow_unauthenticated: bool = False,
              docs: bool = True, metrics: bool = True, ssl_certfile: str | None = None,
              ssl_keyfile: str | None = None) -> None:
    import uvicorn  # only `routetune serve` runs a server; create_app (tests, embedding) does not need it

    limits = limits or Limits()
    check_exposure(host, api_key, allow_unauthenticated)
    tune_process()
    cfg, model, tokenizer, hw = load_for_inference(run_dir, checkpoint, device, precision)
    log.info("serving on %s in %s (%s)", hw.device, hw.precision, hw.reason)
    app = create_app(model, tokenizer, cfg, limits, hw.precision, after_batch=_Trim(), api_key=api_key, docs=docs,
                     metrics=metrics)
    config = uvicorn.Config(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=drain_s,
                            access_log=False, limit_concurrency=limits.max_connections,
                            ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile)
    uvicorn.Server(config).run()
