"""A retention budget during training (`routing.budget`): a small fixed sample of dev text, scored
on the training model in eval mode before the first step (the base value) and every `every` steps;
each measurement goes to the router's controller (data/control.py), which sets the general
sources' share for the steps that follow.

Rank 0 measures and broadcasts the loss, so every process makes the same control decision and the
global plan is the single-process one. Measuring draws from no random-number generator (eval
mode; masked-LM masks are seeded per block), so it changes nothing in training but the plan.
"""

from __future__ import annotations

import logging
import time

from routetune.evaluate.tasks import text_blocks
from routetune.model.inference import lm_loss
from routetune.training import events

log = logging.getLogger("routetune")


class Budget:
    def __init__(self, setup):
        cfg = setup.cfg
        b = cfg.routing.budget
        self.every = b.every
        self.metric = b.metric
        evalset = setup.evals.get(b.measure) or setup.dev.get(b.measure)
        self.objective = setup.objectives[b.measure]
        # only rank 0 scores the sample (the others are given its loss), so only it tokenizes it
        self.blocks = text_blocks(setup.tokenizer, evalset, cfg.model.max_length, b.blocks) if setup.world.main else []
        self.tokenizer, self.batch_size = setup.tokenizer, cfg.train.eval_batch_size
        self.precision = setup.hardware.precision
        log.info("routing.budget: %s change of %s at most %+.1f%%, measured on %d block(s) every %d steps; "
                 "controlled share of %s", b.metric, b.measure, 100 * b.max_change, len(self.blocks), b.every,
                 ", ".join(b.sources))

    @classmethod
    def of(cls, setup) -> Budget | None:
        return cls(setup) if setup.cfg.routing.budget is not None else None

    def due(self, done: int) -> bool:
        return done % self.every == 0

    def measure(self, done: int, model, router, world, metrics) -> dict:
        """Score the sample (rank 0), give the loss to the router's controller on every rank, and log
        the control record as a `budget` event: step, loss, base, change, violation, share,
        multiplier, weights, seconds (the measurement's cost)."""
        t0 = time.perf_counter()
        loss = lm_loss(model, self.objective, self.blocks, self.tokenizer, self.batch_size, self.precision)[0] \
            if world.main else None
        loss = world.broadcast(loss)
        record = router.measured(loss)
        seconds = time.perf_counter() - t0
        metrics.write(events.BUDGET, step=done, seconds=round(seconds, 4), **record)
        log.info("step %d budget: %s change %+.2f%% -> general share %.3f (%.2f s)", done, self.metric,
                 100 * record["change"], record["share"], seconds)
        return record
