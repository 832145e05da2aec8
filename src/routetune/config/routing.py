"""The `routing` section: how the router chooses a source for each batch (strategy, weights or
temperature or counts, a schedule over the run, the adaptive strategy's options), and its checks
against the config's sources."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from routetune.config.base import Strict


class StageConfig(Strict):
    until: float = Field(gt=0, le=1)
    """End of this stage as a fraction of the run (the last stage should end at 1)."""
    weights: dict[str, float]
    """Weights (normalised) during this stage."""


class ScheduleConfig(Strict):
    kind: Literal["constant", "linear", "cosine", "stages"] = "constant"
    """How weights move over the run: from the start weights to `end` (linear or cosine), or piecewise `stages`."""
    end: dict[str, float] | None = None
    """Weights at the end of the run (linear, cosine)."""
    stages: list[StageConfig] | None = None
    """Piecewise-constant weights (stages)."""


class CountConfig(Strict):
    repeat: float | None = Field(None, ge=0)
    """Examples per epoch = repeat x source size."""
    choose: int | None = Field(None, ge=0)
    """Examples per epoch, absolute."""


class AdaptiveConfig(Strict):
    eta: float = Field(0.5, gt=0)
    """Step size of the exponential-weights update."""
    floor: float = Field(0.05, ge=0, lt=1)
    """Minimum probability of every source with a positive start weight (exploration)."""
    smoothing: float = Field(0.9, ge=0, lt=1)
    """Exponential moving average factor of each source's reward (its training loss)."""
    update_every: int = Field(10, ge=1)
    """Steps between weight updates (each update is logged to metrics.jsonl)."""


class BudgetConfig(Strict):
    measure: str
    """Where retention is measured: an `evals` set with `split: dev`, or a source whose dev set is language-modelling
    text. A sample of `blocks` blocks of it (`sample`) is scored in eval mode on the training model every `every`
    steps."""
    max_change: float = Field(gt=0)
    """Largest allowed change of the measure against the base model, relative: 0.02 = at most 2% higher."""
    metric: Literal["loss", "perplexity"] = "loss"
    """What `max_change` bounds: the relative change of the mean token loss, or of its exponential (perplexity)."""
    every: int = Field(10, ge=1)
    """Steps between measurements (each is logged as a `budget` event with its cost in seconds)."""
    blocks: int = Field(16, ge=1)
    """Blocks of `model.max_length` tokens in the fixed measurement sample."""
    sources: list[str] | None = None
    """The general sources whose total share is controlled (split among them as their start weights are). Default:
    every source except `train.primary`."""
    min_share: float = Field(0.02, gt=0, lt=1)
    """Lowest total share of the controlled sources."""
    max_share: float = Field(0.5, gt=0, lt=1)
    """Highest total share of the controlled sources."""
    integral_gain: float = Field(0.3, ge=0)
    """Step of the log-odds of the share per measurement per unit of relative violation ((change - max_change) /
    max_change): the dual-ascent (integral) part."""
    proportional_gain: float = Field(0.5, ge=0)
    """Immediate response of the log-odds to the current violation (the proportional part)."""
    derivative_gain: float = Field(0.0, ge=0)
    """Response of the log-odds to the rise of the violation since the last measurement (the derivative part:
    answers forgetting that climbs fast before it crosses the budget)."""
    slack_gain: float = Field(0.25, gt=0, le=1)
    """Factor on the violation while there is slack (the change below `max_change`): below 1 the share is given away
    more slowly than it is taken back (forgetting, once in the weights, is slow to undo)."""
    slack_warmup: float = Field(0.0, ge=0, le=1)
    """Fraction of the run over which slack's action grows from none to full (0: full from the start): the measure
    often falls at first, and slack spent then returns as forgetting that stays in the weights."""
    sample: Literal["spread", "first"] = "spread"
    """Which `blocks` of the measure are scored: spread evenly across the whole text (a sample of all of it), or its
    first blocks (one stretch of text, as before this option)."""
    confidence: float | None = Field(0.9, gt=0.5, lt=1)
    """Aim inside `max_change` by a margin from the sample's own spread so that held-out text of the same kind stays
    within it with about this probability (docs/results.md says under which assumptions); null: aim at
    `max_change` on the sample itself."""
    holdout_blocks: int | None = Field(None, ge=1)
    """Size of the held-out text the confidence is for, in blocks (its own noise widens the margin); null: a large
    text (only the sample's noise counts)."""
    witness_blocks: int = Field(0, ge=0)
    """Blocks of a second sample of the measure, disjoint from the first, scored at every measurement and logged as
    `witness_change`, never acted on: a check of the margin during the run (costs that much more measuring)."""


class RoutingConfig(Strict):
    strategy: Literal["iid", "interleaved", "adaptive"] = "iid"
    """`iid`: independent draws; `interleaved`: low-discrepancy (each source within 1 of its target share at every
    prefix, for constant weights); `adaptive`: Exp3-style online mixing from per-source training losses."""
    weights: dict[str, float] | None = None
    """Probabilities per source (normalised). Give this, `temperature` or `counts`; default: equal weights."""
    temperature: float | None = Field(None, gt=0)
    """p_i proportional to size_i^(1/T): T=1 proportional to size, large T towards uniform."""
    counts: dict[str, CountConfig] | None = None
    """Absolute examples per epoch of the mixture for each source (`repeat` or `choose`)."""
    schedule: ScheduleConfig | None = None
    """Weights as a function of training progress (iid and interleaved)."""
    adaptive: AdaptiveConfig = AdaptiveConfig()
    """Options of the adaptive strategy."""
    granularity: Literal["batch", "example"] = "batch"
    """`batch`: each batch from one source; `example`: a batch mixes sources, each part with its own loss."""
    loss_weights: dict[str, float] = Field(default_factory=dict)
    """Per-source multiplier of the loss (default 1). With granularity `example` the batch loss is the sum over sources
    of loss_weight x share-of-batch x loss."""
    on_exhausted: Literal["restart", "stop_first", "stop_all"] = "restart"
    """When a sized source finishes a pass: `restart` it with a new shuffle; `stop_first`: end the run; `stop_all`: stop
    drawing it, end the run when all sized sources are done."""
    seed: int = 0
    """Seed of the routing plan (source choices and per-epoch shuffles)."""
    budget: BudgetConfig | None = None
    """A retention budget: the share of the general sources is controlled during training so that the measured
    change of general ability against the base model stays within `max_change` (iid and interleaved routing)."""


def check_routing(r: RoutingConfig, names: list[str], sources: dict) -> None:
    given = [k for k in ("weights", "temperature", "counts") if getattr(r, k) is not None]
    if len(given) > 1:
        raise ValueError(f"routing: give exactly one of weights, temperature or counts (got {' and '.join(given)})")
    if r.weights is None and not given:
        object.__setattr__(r, "weights", {n: 1.0 for n in names})
    if r.weights is not None:
        _check_weights("routing.weights", r.weights, names)
    if r.counts is not None:
        _check_names("routing.counts", r.counts, names)
        for name, c in r.counts.items():
            if (c.repeat is None) == (c.choose is None):
                raise ValueError(f"routing.counts.{name}: give exactly one of repeat or choose")
        if sum((c.repeat or 0) + (c.choose or 0) for c in r.counts.values()) <= 0:
            raise ValueError("routing.counts: all counts are zero")
    _check_names("routing.loss_weights", r.loss_weights, names, complete=False)
    for name, w in r.loss_weights.items():
        if not (0 <= w < float("inf")):
            raise ValueError(f"routing.loss_weights.{name}: expected a finite number >= 0, got {w}")
    distilled = [n for n, src in sources.items() if src.distill > 0]
    if r.strategy == "adaptive" and distilled:
        raise ValueError(f"sources.{distilled[0]}.distill: the adaptive strategy rewards a source by its loss "
                         "relative to its first value, and a distilled loss starts at 0 (the model is its own "
                         "teacher); use iid or interleaved routing with distillation")
    if r.schedule is not None and r.schedule.kind != "constant":
        _check_schedule(r, names)
    if r.budget is not None:
        _check_budget(r, names)


def _check_budget(r: RoutingConfig, names: list[str]) -> None:
    b = r.budget
    if r.strategy == "adaptive":
        raise ValueError("routing.budget: the adaptive strategy sets its own weights; use iid or interleaved routing "
                         "with a budget")
    if r.schedule is not None and r.schedule.kind != "constant":
        raise ValueError("routing.budget: the budget's controller moves the weights; remove routing.schedule")
    if r.counts is not None:
        raise ValueError("routing.budget: give start shares with routing.weights (or temperature), not counts")
    if b.min_share > b.max_share:
        raise ValueError(f"routing.budget.min_share: {b.min_share} is above max_share {b.max_share}")
    if b.sources is not None:
        if not b.sources:
            raise ValueError("routing.budget.sources: name at least one source")
        for name in b.sources:
            if name not in names:
                raise ValueError(f"routing.budget.sources: no source named {name!r} (sources: {', '.join(names)})")


def _check_schedule(r: RoutingConfig, names: list[str]) -> None:
    if r.counts is not None:
        raise ValueError("routing.schedule: schedules move weights; they cannot be combined with routing.counts")
    if r.strategy == "adaptive":
        raise ValueError("routing.schedule: the adaptive strategy sets its own weights; remove the schedule")
    sch = r.schedule
    if sch.kind in ("linear", "cosine"):
        if sch.end is None:
            raise ValueError(f"routing.schedule.end: required for kind {sch.kind}")
        _check_weights("routing.schedule.end", sch.end, names)
    if sch.kind == "stages":
        if not sch.stages:
            raise ValueError("routing.schedule.stages: required for kind stages")
        prev = 0.0
        for i, st in enumerate(sch.stages):
            if st.until <= prev:
                raise ValueError(f"routing.schedule.stages.{i}.until: stages must end in increasing order")
            prev = st.until
            _check_weights(f"routing.schedule.stages.{i}.weights", st.weights, names)
        if prev < 1.0:
            raise ValueError("routing.schedule.stages: the last stage must end at until: 1.0")


def _check_names(key: str, mapping: dict, names: list[str], complete: bool = True) -> None:
    for name in mapping:
        if name not in names:
            raise ValueError(f"{key}.{name}: no source named {name!r} (sources: {', '.join(names)})")
    if complete:
        for name in names:
            if name not in mapping:
                raise ValueError(f"{key}: missing source {name!r} (give every source a value, 0 to leave it out)")


def _check_weights(key: str, weights: dict, names: list[str]) -> None:
    _check_names(key, weights, names)
    for name, w in weights.items():
        if not (w >= 0 and w != float("inf")):
            raise ValueError(f"{key}.{name}: expected a finite number >= 0, got {w}")
    if sum(weights.values()) <= 0:
        raise ValueError(f"{key}: all weights are zero; at least one source must have weight > 0")
