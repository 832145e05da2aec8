"""The router: a seeded plan of which source each batch comes from.

The source of step ``s`` is a pure function of (weights, seed, s): it is computed from a seed
derived from (seed, s), never from a generator whose state would depend on the past, so any
step's choice can be recomputed anywhere (resume, data-parallel ranks, the dry run that counts
steps). Per-source example order lives in the sources (seeded per epoch) and their cursors.
"""

from __future__ import annotations

import bisect
import random
from itertools import accumulate

from routetune.data.sources import Batch, derive_seed
from routetune.errors import ConfigError


class StaticRouter:
    """i.i.d. per-batch choice with fixed probabilities proportional to the weights."""

    def __init__(self, weights: dict[str, float], seed: int):
        if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise ConfigError("routing.weights: need weights >= 0 with a positive sum")
        self.names = list(weights)
        self.weights = dict(weights)
        self.seed = seed
        total = sum(weights.values())
        self.probabilities = {n: w / total for n, w in weights.items()}
        self._cumulative = list(accumulate(self.probabilities[n] for n in self.names))

    def choose(self, step: int) -> str:
        u = random.Random(derive_seed(self.seed, "route", step)).random()
        # bisect_right skips zero-weight sources: their cumulative value equals their predecessor's
        i = min(bisect.bisect_right(self._cumulative, u), len(self.names) - 1)
        while self.probabilities[self.names[i]] == 0:  # guard against float round-off at the top
            i -= 1
        return self.names[i]

    def plan(self, start: int, stop: int) -> list[str]:
        return [self.choose(s) for s in range(start, stop)]

    def state_dict(self) -> dict:
        return {"kind": "static", "weights": self.weights, "seed": self.seed}


class RoutedBatches:
    """Draws batch after batch: the router picks the source, the source supplies the examples."""

    def __init__(self, router: StaticRouter, sources: dict, batch_size: int):
        missing = [n for n in router.names if n not in sources]
        if missing:
            raise ConfigError(f"routing.weights: no source named {missing[0]!r}")
        self.router = router
        self.sources = sources
        self.batch_size = batch_size
        self.step = 0

    def next(self) -> Batch:
        name = self.router.choose(self.step)
        batch = self.sources[name].take(self.batch_size, self.step)
        self.step += 1
        return batch

    def state_dict(self) -> dict:
        return {"step": self.step, "router": self.router.state_dict(),
                "sources": {n: s.state_dict() for n, s in self.sources.items()}}

    def load_state_dict(self, state: dict) -> None:
        if state["router"] != self.router.state_dict():
            raise ConfigError("routing: the saved router state was made with other weights or seed")
        self.step = int(state["step"])
        for name, s in state["sources"].items():
            self.sources[name].load_state_dict(s)


def count_steps(router: StaticRouter, primary: str, primary_batches: int, max_steps: int | None) -> int:
    """Steps until the primary source has supplied `primary_batches` batches (or `max_steps`)."""
    step = seen = 0
    while seen < primary_batches:
        if max_steps is not None and step >= max_steps:
            return max_steps
        if router.choose(step) == primary:
            seen += 1
        step += 1
    return step if max_steps is None else min(step, max_steps)
