"""The serving core behind the HTTP routes: :class:`Batcher` (dynamic micro-batching) and
:class:`Service` (one loaded run: its heads, predictors, limits, metrics and the worker threads).
The routes in serve/server.py validate a request, then hand its items to ``Service.run``."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import HTTPException, Request

from routetune.serve.limits import Limits, Metrics
from routetune.serve.predictor import Predictor

log = logging.getLogger("routetune")


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
        self.class_heads = [
            n for n, k in self.heads.items() if k in ("sequence-classification", "binary-classification")
        ]
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="routetune-model")
        self.prep = ThreadPoolExecutor(max_workers=2, thread_name_prefix="routetune-prepare")
        self.metrics = Metrics(["/v1/ner", "/v1/classify", "/v1/generate", "/healthz", "/metrics"])
        self.predictors = {n: Predictor(model, tokenizer, n, self.max_tokens, limits.max_batch, precision)
                           for n in self.token_heads + self.class_heads}
        self.batchers: dict[Any, Batcher] = {}
        # the model's one user at a time: the micro-batches' worker and the generation engine
        # (serve/generation.py) take turns; `served` switches between adapters under it
        self.model_lock = threading.Lock()
        self.served = None  # the OpenAI endpoints' models (serve/adapters.py), for decoders
        self.engine = None
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
                    with self.model_lock:
                        if self.served is not None:
                            self.served.use(self.served.ids[next(iter(self.served.ids))])  # the first run's
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
        if self.engine is not None:
            self.engine.stop()
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
