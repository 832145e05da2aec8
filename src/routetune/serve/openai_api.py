"""The OpenAI API for decoder runs: ``GET /v1/models``, ``POST /v1/chat/completions`` and
``POST /v1/completions``, streamed (server-sent events) or not, so the `openai` clients, LangChain,
LlamaIndex, evaluation harnesses and chat front-ends can use a model trained here.

Requests follow the OpenAI schemas. Honoured: `max_tokens` / `max_completion_tokens`,
`temperature`, `top_p`, `stop` (cut exactly where a stop string starts), `seed` (the same seed
gives the same answer), `n`, `stream` with `stream_options.include_usage`, `logprobs` and
`top_logprobs` (the model's own distribution, before temperature and top-p). A field routetune
does not support, or a value that would change the answer and cannot be honoured, is a 400 in
OpenAI's error shape naming it, never silently ignored; `user` is accepted (it changes nothing).
Chat messages go through the tokenizer's chat template as training renders chat data
(data/chat.py). Generation runs in serve/generation.py (continuous batching).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from routetune.data.chat import render_chat
from routetune.data.sources import encode_prompt
from routetune.seeds import derive_seed
from routetune.serve.generation import Event, Sampling, Sequence
from routetune.serve.limits import openai_error_body as error_body

MAX_STOP = 4  # stop strings per request, as OpenAI allows
MAX_TOP_LOGPROBS = 20


class OpenAIError(Exception):
    """An error answered in OpenAI's shape (serve/limits.py `openai_error_body`)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)


# ------------------------------------------------------------------ request schemas

class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # an end-user id for the operator's logs: changes nothing

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _no_penalty(cls, value: float) -> float:
        if value != 0:
            raise ValueError("penalties are not supported (only 0)")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, value):
        if value:
            raise ValueError("logit_bias is not supported")
        return value

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > MAX_STOP or any(not s for s in stops):
            raise ValueError(f"at most {MAX_STOP} non-empty stop strings")
        return stops


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None


class CompletionRequest(_Request):
    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: Literal[False] = False
    best_of: Literal[1] | None = None
    suffix: None = None


StreamOptions.model_rebuild()
_Request.model_rebuild()
ChatRequest.model_rebuild()
CompletionRequest.model_rebuild()


def validation_error(errors: list[dict]) -> OpenAIError:
    """The first problem of a request body, as OpenAI names it: the parameter and what is wrong."""
    e = errors[0] if errors else {}
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    if e.get("type") == "extra_forbidden":
        message = f"Unsupported parameter: '{param}' (routetune does not support it)"
    else:
        message = f"{param}: {str(e.get('msg', 'invalid value'))[:300]}" if param else str(e.get("msg", ""))[:300]
    return OpenAIError(400, message, param, "unsupported_parameter" if e.get("type") == "extra_forbidden"
                       else "invalid_value")


# ------------------------------------------------------------------ from a request to sequences

class Job:
    """One request's sequences (n choices per prompt) and the queue their events arrive on."""

    def __init__(self, svc, served_model: str, prompts: list[list[int]], sampling: list[Sampling], adapter):
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.svc, self.model = svc, served_model
        self.sequences: list[Sequence] = []
        self.requests: list[list[Sequence]] = []
        per_prompt = len(sampling) // len(prompts)
        for i, prompt in enumerate(prompts):
            group = [Sequence(prompt, sampling[i * per_prompt + j], adapter, i * per_prompt + j, self._deliver,
                              svc.tokenizer) for j in range(per_prompt)]
            self.requests.append(group)
            self.sequences += group
        # as OpenAI counts them: each prompt once, whatever `n`; every choice's generated tokens
        self.usage = {"prompt_tokens": sum(len(p) for p in prompts), "completion_tokens": 0}

    def _deliver(self, event: Event) -> None:  # on the engine's thread
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def start(self) -> None:
        for group in self.requests:
            self.svc.engine.submit(group)

    def cancel(self) -> None:
        self.svc.engine.cancel(self.sequences)


def _sampling(req, n_prompts: int, max_tokens: int, logprobs: bool, top: int) -> list[Sampling]:
    seed = req.seed if req.seed is not None else secrets.randbits(62)
    return [Sampling(max_tokens, req.temperature, req.top_p, tuple(req.stop or ()),
                     derive_seed(seed, "choice", i), logprobs, top) for i in range(n_prompts * req.n)]


def _max_tokens(svc, req, given: int | None, default: int) -> int:
    limit = svc.limits.max_new_tokens
    value = given if given is not None else min(default, limit)
    if value > limit:
        raise OpenAIError(400, f"max_tokens: {value} is over this server's limit of {limit} (routetune serve "
                               "--max-new-tokens)", "max_tokens", "invalid_value")
    return value


def _encode(svc, text: str, max_tokens: int, param: str) -> list[int]:
    """The prompt's token ids as training and `routetune generate` make them; too long is a 400."""
    ids = encode_prompt(svc.thread_tokenizer(), text, None, 10**9)[0]
    room = svc.max_tokens
    context = getattr(svc.model.config, "max_position_embeddings", None) or 10**9
    if len(ids) > room and not svc.limits.truncate:
        raise OpenAIError(400, f"{param}: the prompt is {len(ids)} tokens, over this server's limit of {room} "
                               "(serve --max-tokens, or --truncate to cut it from the start)", param,
                          "context_length_exceeded")
    if len(ids) > room:
        ids, _, _ = encode_prompt(svc.thread_tokenizer(), text, None, room)
    if len(ids) + max_tokens + svc.model.n_virtual > context:  # prompt tuning's virtual tokens take positions too
        raise OpenAIError(400, f"{param}: {len(ids)} prompt tokens and max_tokens {max_tokens} pass the model's "
                               f"context of {context} positions", param, "context_length_exceeded")
    return ids


def _check_common(svc, req) -> None:
    if req.n > svc.limits.max_batch:
        raise OpenAIError(400, f"n: {req.n} is over this server's limit of {svc.limits.max_batch}", "n",
                          "invalid_value")
    if req.stream_options is not None and not req.stream:
        raise OpenAIError(400, "stream_options: only with stream: true", "stream_options", "invalid_value")


# ------------------------------------------------------------------ answers

def _usage(job: Job) -> dict:
    u = job.usage
    return {"prompt_tokens": u["prompt_tokens"], "completion_tokens": u["completion_tokens"],
            "total_tokens": u["prompt_tokens"] + u["completion_tokens"]}


def _chat_logprobs(tokens) -> dict:
    return {"content": [{"token": t.text, "logprob": t.logprob, "bytes": list(t.text.encode()),
                         "top_logprobs": [{"token": s, "logprob": lp, "bytes": list(s.encode())} for s, lp in t.top]}
                        for t in tokens]}


def _completion_logprobs(tokens, offset: int) -> dict:
    offsets, at = [], offset
    for t in tokens:
        offsets.append(at)
        at += len(t.text)
    return {"tokens": [t.text for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [dict(t.top) for t in tokens], "text_offset": offsets}


async def _next(job: Job, deadline: float | None) -> Event:
    timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
    try:
        return await asyncio.wait_for(job.events.get(), timeout)
    except TimeoutError:
        raise OpenAIError(504, "the answer took longer than this server's limit (serve --timeout)") from None


async def _collect(job: Job, request: Request) -> tuple[list[str], list[str], list[list]]:
    """Every choice's text, finish reason and tokens: the streamed deltas joined."""
    n = len(job.sequences)
    texts, finish, tokens = [""] * n, [None] * n, [[] for _ in range(n)]
    deadline = request.scope.get("state", {}).get("deadline")
    while any(f is None for f in finish):
        event = await _next(job, deadline)
        if event.error:
            raise OpenAIError(500, f"generation failed: {event.error}")
        texts[event.index] += event.text
        tokens[event.index] += event.tokens
        if event.finish:
            finish[event.index] = event.finish
            job.usage["completion_tokens"] += event.completion_tokens
    return texts, finish, tokens


def _sse(obj) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


async def _stream(job: Job, request: Request, chat: bool, include_usage: bool, first_deadline: float | None):
    """Server-sent events: the role first (chat), text as it is final, each choice's finish, the
    usage chunk if asked, `[DONE]`. A client that goes away cancels its sequences at once."""
    rid, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
    kind = "chat.completion.chunk" if chat else "text_completion"
    base = {"id": rid, "object": kind, "created": created, "model": job.model}
    extra = {"usage": None} if include_usage else {}
    offsets = [0] * len(job.sequences)
    try:
        if chat:
            for i in range(len(job.sequences)):
                yield _sse({**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                 "logprobs": None, "finish_reason": None}], **extra})
        open_choices, deadline = len(job.sequences), first_deadline
        while open_choices:
            event = await _next(job, deadline)
            deadline = None  # the limit is on the first answer; the rest is bounded by max_tokens
            if event.error:
                yield _sse({"error": error_body(500, f"generation failed: {event.error}")["error"]})
                return
            if chat:
                delta = {"content": event.text} if event.text else {}
                logprobs = _chat_logprobs(event.tokens) if event.tokens else None
                choice = {"index": event.index, "delta": delta, "logprobs": logprobs, "finish_reason": event.finish}
            else:
                logprobs = _completion_logprobs(event.tokens, offsets[event.index]) if event.tokens else None
                choice = {"index": event.index, "text": event.text, "logprobs": logprobs,
                          "finish_reason": event.finish}
            offsets[event.index] += len(event.text)
            if event.text or event.finish or event.tokens:
                yield _sse({**base, "choices": [choice], **extra})
            if event.finish:
                open_choices -= 1
                job.usage["completion_tokens"] += event.completion_tokens
        if include_usage:
            yield _sse({**base, "choices": [], "usage": _usage(job)})
        yield b"data: [DONE]\n\n"
    finally:
        job.cancel()  # a no-op for finished sequences; frees the slots of a client that went away


# ------------------------------------------------------------------ routes

def openai_routes(app: FastAPI, svc) -> None:
    """The OpenAI endpoints of a decoder run, and their error shape."""
    _model_routes(app, svc.served)
    _chat_route(app, svc)
    _completion_route(app, svc)

    @app.exception_handler(OpenAIError)
    async def openai_error(_request: Request, exc: OpenAIError):
        return JSONResponse(exc.body(), status_code=exc.status)


def _model_routes(app: FastAPI, served) -> None:
    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": served.cards()}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict:
        return served.card(model_id)


def _chat_route(app: FastAPI, svc) -> None:
    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        adapter = svc.served.adapter_of(req.model)
        _check_common(svc, req)
        if not getattr(svc.tokenizer, "chat_template", None):
            raise OpenAIError(400, "this model's tokenizer has no chat template; use /v1/completions", "messages",
                              "invalid_value")
        if req.top_logprobs and not req.logprobs:
            raise OpenAIError(400, "top_logprobs: needs logprobs: true", "top_logprobs", "invalid_value")
        given = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        max_tokens = _max_tokens(svc, req, given, svc.limits.max_new_tokens)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        text = await asyncio.to_thread(render_chat, svc.thread_tokenizer(), messages)
        ids = await asyncio.to_thread(_encode, svc, text, max_tokens, "messages")
        job = Job(svc, req.model, [ids], _sampling(req, 1, max_tokens, req.logprobs, req.top_logprobs or 0), adapter)
        return await _answer(job, request, req, chat=True)


def _completion_route(app: FastAPI, svc) -> None:
    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        adapter = svc.served.adapter_of(req.model)
        _check_common(svc, req)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not prompts:
            raise OpenAIError(400, "prompt: at least one prompt", "prompt", "invalid_value")
        svc.check_items(len(prompts) * req.n)
        max_tokens = _max_tokens(svc, req, req.max_tokens, 16)
        ids = [await asyncio.to_thread(_encode, svc, p, max_tokens, "prompt") for p in prompts]
        logprobs = req.logprobs is not None
        job = Job(svc, req.model, ids, _sampling(req, len(prompts), max_tokens, logprobs, req.logprobs or 0), adapter)
        return await _answer(job, request, req, chat=False)


async def _answer(job: Job, request: Request, req, chat: bool):
    """A stream of events, or the whole answer once every choice has finished."""
    request.scope.setdefault("state", {})["items"] = len(job.sequences)
    deadline = request.scope.get("state", {}).get("deadline")
    job.start()
    if req.stream:
        include = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(_stream(job, request, chat, include, deadline), media_type="text/event-stream",
                                 headers={"cache-control": "no-cache", "x-accel-buffering": "no"})
    try:
        texts, finish, tokens = await _collect(job, request)
    finally:
        job.cancel()
    created = int(time.time())
    if chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": t},
                    "logprobs": _chat_logprobs(tokens[i]) if req.logprobs else None, "finish_reason": finish[i]}
                   for i, t in enumerate(texts)]
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": created,
                "model": job.model, "choices": choices, "usage": _usage(job), "system_fingerprint": None}
    choices = [{"index": i, "text": t, "finish_reason": finish[i],
                "logprobs": _completion_logprobs(tokens[i], 0) if req.logprobs is not None else None}
               for i, t in enumerate(texts)]
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": created,
            "model": job.model, "choices": choices, "usage": _usage(job)}
