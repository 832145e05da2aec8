"""Continuous batching for the OpenAI-compatible endpoints (serve/openai_api.py).

One worker thread owns the model. Requests join the running batch between decoding steps: a new
request's prompt is run once (prefill) into a key/value cache of its own, and from then on every
decoding step runs all active sequences of one adapter as one batch (their caches left-padded to a
common length, each row at its own position), then gives each sequence its new token. A sequence
leaves when it ends (end of sequence, a stop string, `max_tokens`) or its client has gone; the
next step runs without it.

Written here rather than with transformers' continuous-batching manager (``generate_batch`` /
``init_continuous_batching``) because that manager samples every request from one shared
generator (so a request's `seed` would not give its answer back once other requests share the
batch), runs one set of weights (no per-request adapter), and takes token ids only (prompt tuning
prefills from embeddings). Here each sequence samples from its own CPU generator seeded from the
request, and sequences of different adapters run in turn within a step (one forward per adapter
present: the adapter is switched between them, never mixed in one forward).

Text is produced token by token and handed out only when it is final: held back while it ends in
an incomplete multi-byte character (the tokenizer's replacement character) or could be the start
of a stop string, and cut exactly where a stop string begins, whichever tokens it spans. The
non-streamed answer is the same deltas joined, so a streamed and a non-streamed request with the
same seed give the same text.
"""

from __future__ import annotations

import inspect
import logging
import math
import threading
from collections import deque
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from routetune.device import autocast, model_device

log = logging.getLogger("routetune")


@dataclass
class Sampling:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int = 0
    logprobs: bool = False
    top_logprobs: int = 0


@dataclass
class Token:
    """One generated token: its id, text and log-probability under the model (before temperature
    and top-p), with the `top` most likely alternatives."""

    id: int
    text: str
    logprob: float
    top: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class Event:
    """What a sequence hands to its request: new text (with the tokens that made it), or its end."""

    index: int
    text: str = ""
    tokens: list[Token] = field(default_factory=list)
    finish: str | None = None  # "stop" or "length" on the last event
    completion_tokens: int = 0
    error: str | None = None


class Sequence:
    """One choice of one request: its prompt, sampling, adapter, cache and text so far."""

    def __init__(self, prompt: list[int], sampling: Sampling, adapter, index: int, deliver, tokenizer):
        self.prompt, self.sampling, self.adapter, self.index = prompt, sampling, adapter, index
        self.deliver, self.tokenizer = deliver, tokenizer
        self.generator = torch.Generator().manual_seed(sampling.seed)
        self.ids: list[int] = []  # generated, the end-of-sequence token excluded
        self.pending: list[Token] = []  # tokens whose text has not been handed out yet
        self.emitted = 0  # characters of the decoded text handed out
        self.cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.length = 0  # positions in the cache
        self.last = 0  # the token the next decoding step feeds
        self.cancelled = False
        self.done = False

    def add(self, token: Token, eos: bool) -> None:
        """Take one generated token; hand out the text it makes final; end the sequence when due."""
        if eos:
            return self.finish("stop")
        self.ids.append(token.id)
        self.pending.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in self.sampling.stop) if i >= 0), default=-1)
        if cut >= 0:
            return self.finish("stop", text[:cut])
        if len(self.ids) >= self.sampling.max_tokens:
            return self.finish("length", text)
        stable = text.rstrip("\ufffd")  # an incomplete multi-byte character waits for its other bytes
        safe = len(stable) - _pending_stop(stable, self.sampling.stop)
        if safe > self.emitted:
            self.deliver(Event(self.index, text[self.emitted:safe], self._take_tokens()))
            self.emitted = safe

    def finish(self, reason: str, text: str | None = None) -> None:
        if text is None:
            text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        rest = text[self.emitted:] if len(text) > self.emitted else ""
        self.emitted = max(self.emitted, len(text))
        self.done = True
        self.deliver(Event(self.index, rest, self._take_tokens(), reason, len(self.ids)))

    def _take_tokens(self) -> list[Token]:
        out, self.pending = self.pending, []
        return out if self.sampling.logprobs else []


def _pending_stop(text: str, stops) -> int:
    """The length of the longest end of `text` that begins a stop string (it may still complete)."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


def _pick(logits: torch.Tensor, seq: Sequence, tokenizer) -> Token:
    """Sample (or take the argmax at temperature 0) from one row of logits with the sequence's
    own generator; the log-probabilities are the model's, before temperature and top-p."""
    s = seq.sampling
    logits = logits.float().cpu()
    if s.temperature == 0:
        token = int(logits.argmax())
    else:
        probs = torch.softmax(logits / s.temperature, -1)
        if s.top_p < 1:
            ordered, order = probs.sort(descending=True)
            keep = ordered.cumsum(0) - ordered < s.top_p  # the smallest set whose mass reaches top_p
            probs = torch.zeros_like(probs).scatter_(0, order[keep], ordered[keep])
        token = int(torch.multinomial(probs, 1, generator=seq.generator))
    if not s.logprobs:
        return Token(token, "", math.nan)
    logp = torch.log_softmax(logits, -1)
    top = []
    if s.top_logprobs:
        values, ids = logp.topk(s.top_logprobs)
        top = [(tokenizer.decode([int(i)]), float(v)) for v, i in zip(values, ids)]
    return Token(token, tokenizer.decode([token]), float(logp[token]), top)


class Engine:
    """The worker thread and its queue (see the module docstring)."""

    def __init__(self, model, tokenizer, precision: str, max_batch: int, adapters=None, lock=None):
        self.model, self.tokenizer, self.precision, self.max_batch = model, tokenizer, precision, max_batch
        self.adapters = adapters  # switches the model between served adapters (serve/adapters.py), or None
        self.lock = lock or threading.Lock()  # held for each step: other users of the model wait for it
        eos = model.lm.generation_config.eos_token_id if model.lm.generation_config is not None else None
        self.eos = {tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None}
        # transformers 5.x renames past_key_values to cache (the old name warns, then goes in 5.40)
        self.cache_kw = "cache" if "cache" in inspect.signature(model.lm.forward).parameters else "past_key_values"
        self.queue: deque[list[Sequence]] = deque()
        self.active: list[Sequence] = []
        self.wake = threading.Condition()
        self.stopped = False
        self.steps = 0
        self.thread = threading.Thread(target=self._loop, name="routetune-generate", daemon=True)
        self.thread.start()

    # ---------------------------------------------------------------- the request side
    def submit(self, sequences: list[Sequence]) -> None:
        """A request's choices (one prefill for all of them), joining at the next step."""
        with self.wake:
            self.queue.append(sequences)
            self.wake.notify()

    def cancel(self, sequences: list[Sequence]) -> None:
        for s in sequences:
            s.cancelled = True
        with self.wake:
            self.wake.notify()

    def stop(self) -> None:
        with self.wake:
            self.stopped = True
            self.wake.notify()
        self.thread.join(timeout=10)

    @property
    def running(self) -> int:
        return len(self.active) + sum(len(r) for r in list(self.queue))

    # ---------------------------------------------------------------- the worker
    def _loop(self) -> None:
        while True:
            with self.wake:
                while not self.stopped and not self.queue and not self.active:
                    self.wake.wait()
                if self.stopped:
                    return
                joining, taken = [], len(self.active)
                while self.queue and taken + len(self.queue[0]) <= self.max_batch:  # n <= max_batch (checked)
                    taken += len(self.queue[0])
                    joining.append(self.queue.popleft())
            try:
                with self.lock:
                    self._step(joining)
            except Exception as exc:  # a model error ends the sequences it touched, never the server
                log.exception("generation failed")
                for s in [*self.active, *(s for r in joining for s in r)]:
                    if not s.done:
                        s.done = True
                        s.deliver(Event(s.index, finish="error", error=f"{type(exc).__name__}: {exc}"))
                self.active = []

    @torch.inference_mode()
    def _step(self, joining: list[list[Sequence]]) -> None:
        self.active = [s for s in self.active if not (s.cancelled or s.done)]
        joining = [[s for s in request if not s.cancelled] for request in joining]
        by_adapter: dict = {}
        for request in (r for r in joining if r):
            by_adapter.setdefault(request[0].adapter, []).append(request)
        for adapter, requests in by_adapter.items():
            if self.model.prompt is None:
                self._prefill(adapter, requests)  # every joining prompt of the adapter in one forward
            else:  # prompt tuning: the virtual tokens come first, so each prompt runs on its own
                for request in requests:
                    self._prefill(adapter, [request])
            self.active += [s for r in requests for s in r if not s.done]
        by_adapter = {}
        for s in self.active:
            by_adapter.setdefault(s.adapter, []).append(s)
        for adapter, group in by_adapter.items():
            self._decode(adapter, [s for s in group if not s.done])
        self.active = [s for s in self.active if not (s.cancelled or s.done)]
        self.steps += 1

    def _use(self, adapter) -> None:
        if self.adapters is not None:
            self.adapters.use(adapter)

    def _prefill(self, adapter, requests: list[list[Sequence]]) -> None:
        """The prompts of joining requests, left-padded into one batch (each row at its own
        positions), once for all of a request's choices; each choice samples its first token."""
        self._use(adapter)
        device = model_device(self.model)
        width = max(len(r[0].prompt) for r in requests)
        ids = torch.full((len(requests), width), self.tokenizer.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros((len(requests), width), dtype=torch.long)
        for row, r in enumerate(requests):
            ids[row, width - len(r[0].prompt):] = torch.tensor(r[0].prompt)
            mask[row, width - len(r[0].prompt):] = 1
        ids, mask = ids.to(device), mask.to(device)
        cache = DynamicCache(config=self.model.lm.config)
        with autocast(self.precision, device.type):
            if self.model.prompt is None:
                positions = (mask.cumsum(-1) - 1).clamp(min=0)
                out = self.model.lm(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                                    **{self.cache_kw: cache})
            else:  # prompt tuning (one request): the virtual tokens' embeddings before the prompt's
                inputs, _ = self.model.lm_inputs(ids, mask)
                out = self.model.lm(**inputs, use_cache=True, **{self.cache_kw: cache})
        layers = [(layer.keys, layer.values) for layer in cache.layers]
        total = layers[0][0].shape[2]
        for row, r in enumerate(requests):
            length = total - (width - len(r[0].prompt))  # the real positions (virtual tokens included)
            mine = [(k[row:row + 1, :, total - length:], v[row:row + 1, :, total - length:]) for k, v in layers]
            for s in r:
                s.cache, s.length = mine, length
                self._advance(s, out.logits[row, -1])

    def _decode(self, adapter, group: list[Sequence]) -> None:
        """One decoding step for the active sequences of one adapter, as one batch."""
        if not group:
            return
        self._use(adapter)
        device = model_device(self.model)
        width = max(s.length for s in group)
        data = []
        for layer in range(len(group[0].cache)):
            keys = [torch.nn.functional.pad(s.cache[layer][0], (0, 0, width - s.length, 0)) for s in group]
            values = [torch.nn.functional.pad(s.cache[layer][1], (0, 0, width - s.length, 0)) for s in group]
            data.append((torch.cat(keys), torch.cat(values)))
        cache = DynamicCache(ddp_cache_data=data, config=self.model.lm.config)
        mask = torch.zeros(len(group), width + 1, dtype=torch.long)
        for row, s in enumerate(group):
            mask[row, width - s.length:] = 1
        ids = torch.tensor([[s.last] for s in group], device=device)
        positions = torch.tensor([[s.length] for s in group], device=device)
        with autocast(self.precision, device.type):
            out = self.model.lm(input_ids=ids, attention_mask=mask.to(device), position_ids=positions,
                                use_cache=True, **{self.cache_kw: cache})
        new = [(layer.keys, layer.values) for layer in cache.layers]
        for row, s in enumerate(group):
            pad = width - s.length
            s.cache = [(k[row:row + 1, :, pad:], v[row:row + 1, :, pad:]) for k, v in new]
            s.length += 1
            self._advance(s, out.logits[row, -1])

    def _advance(self, s: Sequence, logits: torch.Tensor) -> None:
        """The sequence's next token from its row of logits: handed to it, fed to the next step."""
        token = _pick(logits, s, self.tokenizer)
        s.add(token, token.id in self.eos)
        s.last = token.id
