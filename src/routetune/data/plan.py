"""The plan in motion: router + sources -> one step's draws -> collated batches.

:class:`RoutedBatches` makes every decision in the main process (which source, which example
ids), applies the exhaustion policy, shards a step's draws across data-parallel ranks, and
collates. The plan can also feed a ``torch.utils.data.DataLoader`` whose workers only collate:
the sequence is then the same for any worker count.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import torch

from routetune.data.mixing import Schedule, base_weights
from routetune.data.router import Router, make_router
from routetune.data.sources import Batch, Draw, EpochCursor, LabelledSource
from routetune.errors import ConfigError

MAX_SIMULATED_STEPS = 50_000_000


class RoutedBatches:
    def __init__(self, router: Router, sources: dict, batch_size: int, granularity: str = "batch",
                 on_exhausted: str = "restart", rank: int = 0, world_size: int = 1):
        missing = [n for n in router.names if n not in sources]
        if missing:
            raise ConfigError(f"routing: no source named {missing[0]!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        self.router = router
        self.sources = sources
        self.batch_size = batch_size
        self.granularity = granularity
        self.on_exhausted = on_exhausted
        self.rank, self.world_size = rank, world_size
        # sharded training (FSDP): every rank a part of every draw, a zero-weight stand-in where its share is empty
        self.lockstep = False
        self.step = 0
        self.finished = False
        self.last_draws: list[Draw] = []

    def _sized(self, name: str) -> bool:
        return isinstance(self.sources[name], (LabelledSource, _DrySource))

    def plan_step(self) -> list[Draw]:
        """Decide and draw the global batch of the current step (all ranks agree on it)."""
        names = self.router.names
        if self.granularity == "batch":
            name = names[self.router.choose(self.step, 1)[0]]
            draws = [self.sources[name].draw(self.batch_size, wrap=False)]
        else:
            counts = Counter(self.router.choose(self.step, self.batch_size))
            draws = [self.sources[names[i]].draw(counts[i], wrap=True) for i in sorted(counts)]
        for d in draws:
            if d.epoch_ended and self._sized(d.source) and self.on_exhausted != "restart":
                if self.on_exhausted == "stop_first":
                    self.finished = True
                else:
                    self.router.deactivate(d.source)
                    if not any(self.router.active[i] for i, n in enumerate(names) if self._sized(n)):
                        self.finished = True
        self.step += 1
        return draws

    def collate(self, draw: Draw, step: int) -> Batch:
        part = draw.shard(self.rank, self.world_size)
        tensors, n_tokens = self.sources[part.source].collate(part, step)
        return Batch(part.source, part.ids, tensors, n_tokens, part.epoch_ended)

    def next(self) -> list[Batch]:
        """This rank's parts of the next step (the step's global draws are in `last_draws`). A rank
        whose share is empty (fewer examples than ranks) gets a stand-in: the step's first example,
        which it trains with weight 0, so that every rank takes part in the gradient exchange."""
        step = self.step
        self.last_draws = self.plan_step()
        parts = [self.collate(d, step) if len(d.ids) > self.rank else self.stand_in(d, step)
                 for d in self.last_draws if len(d.ids) > self.rank or (self.lockstep and d.ids)]
        if not parts:
            parts = [self.stand_in(next(d for d in self.last_draws if d.ids), step)]
        return parts

    def stand_in(self, draw: Draw, step: int) -> Batch:
        """The draw's first example as a part this rank trains with weight 0."""
        one = Draw(draw.source, draw.ids[:1], draw.payload[:1] if draw.payload is not None else None)
        tensors, _ = self.sources[draw.source].collate(one, step)
        return Batch(draw.source, [], tensors, 0, False, stand_in=True)

    def loader(self, steps: int, num_workers: int = 0) -> torch.utils.data.DataLoader:
        """A DataLoader over the next `steps` steps: the plan is made here (main process); workers
        only collate. Its batches are lists of per-source :class:`Batch` parts."""
        return torch.utils.data.DataLoader(_Collator(self), batch_sampler=_PlanSampler(self, steps),
                                           num_workers=num_workers, collate_fn=_first)

    def state_dict(self) -> dict:
        return {"step": self.step, "finished": self.finished, "router": self.router.state_dict(),
                "sources": {n: s.state_dict() for n, s in self.sources.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.router.load_state_dict(state["router"])
        self.step, self.finished = int(state["step"]), bool(state["finished"])
        for name, s in state["sources"].items():
            self.sources[name].load_state_dict(s)


class _PlanSampler:
    def __init__(self, batches: RoutedBatches, steps: int):
        self.batches, self.steps = batches, steps

    def __iter__(self):
        for _ in range(self.steps):
            if self.batches.finished:
                return
            step = self.batches.step
            yield [(step, self.batches.plan_step())]

    def __len__(self) -> int:
        return self.steps


class _Collator(torch.utils.data.Dataset):
    def __init__(self, batches: RoutedBatches):
        self.batches = batches

    def __getitem__(self, item):
        step, draws = item
        return [self.batches.collate(d, step) for d in draws if len(d.ids) > self.batches.rank]


def _first(items):
    return items[0]


# ---------------------------------------------------------------------------------------------
# Run length


class _DrySource:
    """A sized source reduced to its cursor: enough to simulate the plan without data."""

    def __init__(self, name: str, size: int):
        self.name, self.cursor = name, EpochCursor(size)

    def draw(self, n: int, wrap: bool = False) -> Draw:
        positions, ended = self.cursor.advance(n, wrap)
        return Draw(self.name, [0] * len(positions), None, ended)


class _DryStream:
    def __init__(self, name: str):
        self.name = name

    def draw(self, n: int, wrap: bool = True) -> Draw:
        return Draw(self.name, [0] * n, None, False)


def plan_run(cfg, sizes: dict[str, int | None]) -> tuple[Router, int, np.ndarray]:
    """Build the router and the exact (or, for loss-driven routing, expected) number of steps.

    * `routing.counts`: steps = epochs x examples-per-mixture-epoch / batch size.
    * scheduled, adaptive or budget-controlled weights: steps chosen so the primary source gets `epochs` passes in
      expectation (a schedule needs its horizon before the run starts).
    * constant weights: the plan is simulated until the primary source has made `epochs` passes
      (exact).
    A stop policy (`on_exhausted`) can end a simulated run earlier; `train.max_steps` caps all.
    """
    r, tc = cfg.routing, cfg.train
    names = list(cfg.sources)
    start, mixture_epoch = base_weights(r, names, sizes)
    schedule = Schedule.from_config(r, names, start)
    primary = names.index(tc.primary)
    size = sizes[tc.primary]
    per_epoch = math.ceil(size / tc.batch_size) if r.granularity == "batch" else size / tc.batch_size
    share = schedule.mean(primary) if schedule.kind != "constant" else float(start[primary])
    if mixture_epoch is not None:
        horizon = math.ceil(tc.epochs * mixture_epoch / tc.batch_size)
    elif share > 0:
        horizon = math.ceil(tc.epochs * per_epoch / share)
    elif tc.max_steps is not None:
        horizon = tc.max_steps
    else:
        raise ConfigError(f"routing: the primary source {tc.primary!r} is never drawn; set train.max_steps")
    if tc.max_steps is not None:
        horizon = min(horizon, tc.max_steps)
    moving = r.strategy == "adaptive" or r.budget is not None  # weights set by feedback during the run
    exact = mixture_epoch is None and schedule.kind == "constant" and not moving and share > 0
    if exact:
        horizon = _simulate(cfg, sizes, names, schedule, horizon, tc.max_steps or MAX_SIMULATED_STEPS,
                            tc.epochs * size, primary)
    elif r.on_exhausted != "restart" and not moving:
        horizon = _simulate(cfg, sizes, names, schedule, horizon, horizon, None, primary)
    return make_router(r, names, schedule, horizon), horizon, start


def _simulate(cfg, sizes, names, schedule, horizon, limit, wanted, primary) -> int:
    """Run the plan on data-free cursors; stop after `wanted` primary examples, a stop policy,
    or `limit` steps."""
    r, tc = cfg.routing, cfg.train
    router = make_router(r, names, schedule, horizon)
    dry = {n: _DrySource(n, sizes[n]) if sizes[n] is not None else _DryStream(n) for n in names}
    plan = RoutedBatches(router, dry, tc.batch_size, r.granularity, r.on_exhausted)
    taken = 0
    while plan.step < limit and not plan.finished:
        for d in plan.plan_step():
            if d.source == names[primary]:
                taken += len(d.ids)
        if wanted is not None and taken >= wanted:
            break
    if plan.step >= MAX_SIMULATED_STEPS:
        raise ConfigError("routing: the run would take more than 50 million steps; set train.max_steps")
    return plan.step
