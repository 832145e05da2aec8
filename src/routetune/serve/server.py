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

import contextlib
import copy
import functools
import logging
import time
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi_offline import FastAPIOffline
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from routetune.device import model_device, resolve
from routetune.errors import RoutetuneError
from routetune.model.inference import generate
from routetune.device import inference_hardware
from routetune.model.inference import for_inference
from routetune.runs import load_run
from routetune.serve.access import check_exposure, is_loopback  # noqa: F401  (is_loopback: this module's API)
from routetune.serve.connections import ConnectionGuard
from routetune.serve.limits import Auth, BodyReader, ConcurrencyLimit, Limits, StatusMetrics, is_openai_path
from routetune.serve.limits import openai_error_body as error_body
from routetune.serve.predictor import item_from_text, item_from_tokens, unicode_problem
from routetune.serve.adapters import Served
from routetune.serve.generation import Engine
from routetune.serve.openai_api import openai_routes, validation_error
from routetune.serve.service import Batcher, Service  # noqa: F401  (Batcher: part of this module's API)
from routetune.training import checkpoint as ckpt

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


def create_app(model, tokenizer, cfg, limits: Limits | None = None, precision: str | None = None,
               after_batch=None, api_key: str | None = None, docs: bool = True, metrics: bool = True,
               served: Served | None = None) -> FastAPI:
    """The API for one loaded run (model + tokenizer + its config); `served`: the runs a decoder
    server answers for by name on the OpenAI endpoints (default: this run alone, as run.name)."""
    limits = limits or Limits()
    if precision is None:  # chosen for the device the model is on, as `auto` does
        precision = resolve(str(model_device(model)), "auto").precision
    svc = Service(model, tokenizer, cfg, limits, precision, after_batch)
    if model.is_decoder and not model.method.generate_refusal:
        svc.served = served or Served(model, Path(cfg.model.name).name, cfg.run.name or "routetune",
                                      model.method.checkpoint == "adapter" and model.prompt is None)
        svc.engine = Engine(model, copy.deepcopy(tokenizer), precision, limits.max_batch, svc.served, svc.model_lock)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        await svc.close()

    # /docs and /redoc load Swagger UI and ReDoc from the app itself (fastapi-offline), not a CDN
    make = FastAPIOffline if docs else functools.partial(FastAPI, docs_url=None, redoc_url=None, openapi_url=None)
    app = make(title="routetune", version="1", lifespan=lifespan,
               description="Predictions of a routetune run: entity spans, class labels, generations.")
    _prediction_routes(app, svc)
    if svc.engine is not None:
        openai_routes(app, svc)
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
    @app.exception_handler(StarletteHTTPException)  # FastAPI's own raise reaches only this one
    async def http_error(request: Request, exc: StarletteHTTPException):
        if is_openai_path(request.url.path):  # the OpenAI endpoints answer in OpenAI's error shape
            status = 400 if exc.status_code == 422 else exc.status_code  # a value over a limit: OpenAI's 400
            return JSONResponse(error_body(status, str(exc.detail)), status_code=status, headers=exc.headers)
        if exc.status_code == 400 and exc.detail == "There was an error parsing the body":
            # FastAPI's answer when the JSON parser itself fails (nesting deeper than it recurses):
            # bad JSON is a 422 like any other, with where and what
            return JSONResponse({"detail": [{"loc": ["body"], "msg": "the body could not be parsed as JSON "
                                             "(nested too deeply?)", "type": "json_invalid"}]}, status_code=422)
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        if is_openai_path(request.url.path):  # a 400 naming the parameter, as OpenAI answers
            error = validation_error(list(exc.errors()))
            return JSONResponse(error.body(), status_code=400)
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
    (with the heap trimmed after batches, RSS stays flat under overload: measured in
    docs/serving.md)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(-8, 2)  # M_ARENA_MAX


def uvicorn_config(app: FastAPI, host: str, port: int, limits: Limits, drain_s: float = 30.0, **kw):
    """uvicorn's settings for `routetune serve`: its own connection cap off (it answers 503 to
    everyone while idle sockets are open), routetune's header deadline and idle eviction instead."""
    import uvicorn

    guard = ConnectionGuard(getattr(app.state, "metrics", None), limits.header_timeout_s, limits.max_connections)
    return uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=drain_s, access_log=False,
                          http=guard.protocol(), **{"log_level": "info", **kw})


def check_signed(run_dir, checkpoint: str) -> None:
    """`serve --require-signed`: the checkpoint must carry the HMAC of its manifest under the key in
    ROUTETUNE_SIGNING_KEY (see training/checkpoint.py for what digests and signatures protect)."""
    import os

    folder = ckpt.run_checkpoint(run_dir, checkpoint)  # verified against its manifest
    try:
        ckpt.verify_signature(folder, os.environ.get(ckpt.SIGNING_KEY_ENV))
    except ckpt.CheckpointError as exc:
        raise RoutetuneError(f"--require-signed: {exc}") from None
    log.info("%s: signature verified", folder)


def serve_run(run_dirs, host: str = "127.0.0.1", port: int = 8080, checkpoint: str = "best",
              limits: Limits | None = None, precision: str | None = None, drain_s: float = 30.0,
              device: str | None = None, api_key: str | None = None, allow_unauthenticated: bool = False,
              docs: bool = True, metrics: bool = True, ssl_certfile: str | None = None,
              ssl_keyfile: str | None = None, require_signed: bool = False) -> None:
    import uvicorn  # only `routetune serve` runs a server; create_app (tests, embedding) does not need it

    limits = limits or Limits()
    run_dirs = [run_dirs] if isinstance(run_dirs, (str, Path)) else list(run_dirs)
    check_exposure(host, api_key, allow_unauthenticated)
    if require_signed:
        for run_dir in run_dirs:
            check_signed(run_dir, checkpoint)
    tune_process()
    hw = inference_hardware(device, precision)
    cfg, model, tokenizer = load_run(run_dirs[0], checkpoint, hw.device.type)
    served = None
    if model.is_decoder and not model.method.generate_refusal:
        served = Served.load(model, cfg, [Path(r) for r in run_dirs], checkpoint)
        log.info("OpenAI endpoints serve: %s", ", ".join(served.ids))
    elif len(run_dirs) > 1:
        raise RoutetuneError(f"{run_dirs[1]}: several runs are served together only as adapters of one decoder")
    for_inference(model, hw.precision, hw.device)
    log.info("serving on %s in %s (%s)", hw.device, hw.precision, hw.reason)
    app = create_app(model, tokenizer, cfg, limits, hw.precision, after_batch=_Trim(), api_key=api_key, docs=docs,
                     metrics=metrics, served=served)
    uvicorn.Server(uvicorn_config(app, host, port, limits, drain_s, ssl_certfile=ssl_certfile,
                                  ssl_keyfile=ssl_keyfile)).run()
