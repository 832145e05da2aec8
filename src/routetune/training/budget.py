"""A retention budget during training (`routing.budget`): a small fixed sample of dev text, scored
on the training model in eval mode before the first step (the base value) and every `every` steps;
each measurement (every block's loss) goes to the router's controller (data/control.py), which sets
the general sources' share for the steps that follow. The sample is spread across the measured text
by default; an optional witness sample, disjoint from it, is measured and logged but never acted on.

Rank 0 measures and broadcasts the losses, so every process makes the same control decision and the
global plan is the single-process one. Measuring draws from no random-number generator (eval
mode; masked-LM masks are seeded per block), so it changes nothing in training but the plan.
"""

from __future__ import annotations

import logging
import time

from routetune.evaluate.tasks import text_blocks
from routetune.model.inference import block_losses
from routetune.training import events

log = logging.getLogger("routetune")


def spread(n: int, total: int, offset: float = 0.0) -> list[int]:
    """Indices of `n` of `total` blocks evenly spaced (at (i + offset) / n of the way, i < n): a sample
    of the whole text rather than of its first stretch."""
    return list(range(total)) if n >= total else [int((i + offset) * total / n) for i in range(n)]


def samples(blocks: list, n: int, witness: int, how: str) -> tuple[list, list]:
    """The measured sample and the witness sample (disjoint; empty if `witness` is 0)."""
    if how == "first":
        return blocks[:n], blocks[n : n + witness]
    chosen = set(spread(n, len(blocks)))
    rest = [b for i, b in enumerate(blocks) if i not in chosen]
    return [blocks[i] for i in sorted(chosen)], [rest[i] for i in spread(witness, len(rest), 0.5)] if witness else []


class Budget:
    def __init__(self, setup):
        cfg = setup.cfg
        b = cfg.routing.budget
        self.every = b.every
        self.metric = b.metric
        self.total = setup.total_steps
        evalset = setup.evals.get(b.measure) or setup.dev.get(b.measure)
        self.objective = setup.objectives[b.measure]
        # only rank 0 scores the samples (the others are given their losses), so only it tokenizes the text
        self.blocks, self.witness = [], []
        if setup.world.main:
            limit = b.blocks + b.witness_blocks if b.sample == "first" else None
            text = text_blocks(setup.tokenizer, evalset, cfg.model.max_length, limit)
            self.blocks, self.witness = samples(text, b.blocks, b.witness_blocks, b.sample)
        self.tokenizer, self.batch_size = setup.tokenizer, cfg.train.eval_batch_size
        self.precision = setup.hardware.precision
        self.max_change, self.warned = b.max_change, False
        margin = (f"aiming inside it at {b.confidence:.0%} confidence for held-out text"
                  if b.confidence is not None else "aiming at it on the sample")
        log.info("routing.budget: %s change of %s at most %+.1f%%, %s; measured on %d block(s) (%s) every %d steps%s; "
                 "controlled share of %s", b.metric, b.measure, 100 * b.max_change, margin, len(self.blocks), b.sample,
                 b.every, f", a witness sample of {len(self.witness)}" if self.witness else "", ", ".join(b.sources))

    @classmethod
    def of(cls, setup) -> Budget | None:
        return cls(setup) if setup.cfg.routing.budget is not None else None

    def due(self, done: int) -> bool:
        return done % self.every == 0

    def _score(self, model, blocks: list) -> list[float]:
        return block_losses(model, self.objective, blocks, self.tokenizer, self.batch_size, self.precision)

    def measure(self, done: int, model, router, world, metrics) -> dict:
        """Score the samples (rank 0), give each block's loss to the router's controller on every rank,
        and log the control record as a `budget` event: step, loss, base, change, margin, bound (what
        the controller acts on), violation, share, multiplier, weights, witness_change, seconds."""
        t0 = time.perf_counter()
        losses = (self._score(model, self.blocks), self._score(model, self.witness) if self.witness else None) \
            if world.main else None
        losses, witness = world.broadcast(losses)
        record = router.measured(losses, done / max(self.total, 1), witness)
        seconds = time.perf_counter() - t0
        metrics.write(events.BUDGET, step=done, seconds=round(seconds, 4), **record)
        log.info("step %d budget: %s change %+.2f%% (acting on %+.2f%%) -> general share %.3f (%.2f s)", done,
                 self.metric, 100 * record["change"], 100 * record["bound"], record["share"], seconds)
        if record["margin"] >= self.max_change and not self.warned:
            self.warned = True
            log.warning("routing.budget: the sample's margin for held-out text (%.1f points) is as large as the budget "
                        "(%+.1f%%): no share can be shown to hold it on other text, so the share stays high; measure "
                        "more blocks (routing.budget.blocks), state a larger budget, or lower the confidence",
                        100 * record["margin"], 100 * self.max_change)
        return record
