"""Objectives: how a source's examples become a loss, and how its dev/test sets are scored.

Everything routetune knows about an objective is its row in :data:`OBJECTIVES`: the formats it
reads and what kind of examples each gives, the task head it trains (or the LM head's loss), its
metrics (the first is the headline: continual matrices and the default early-stopping metric),
and the backbone it needs. The code that acts on a row is keyed by the row's values, each in one
table of its own layer:

* examples kind -> ``data/build.py`` ``BUILDERS`` (reads the files into a source and dev/test sets)
  and ``evaluate/tasks.py`` ``SCORERS`` (scores a set);
* head kind -> ``model/heads.py`` ``HEADS`` (the module and its loss);
* LM loss (``causal-lm`` / ``masked-lm``) -> ``model/routed.py`` (``RoutedModel.loss``).

An objective that reads a known kind of examples into a known head is one row here. This module
imports nothing: the config validates against it before torch loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

CLASS_FORMATS = ("jsonl", "csv", "tsv", "folders", "lines-per-class", "dataset")


@dataclass(frozen=True)
class Objective:
    name: str
    formats: dict[str, str]
    """Reader -> kind of examples it gives (`tags`, `classes`, `prompts`, `text`); the first reader is the default."""
    metrics: tuple[str, ...]
    """Dev/test metrics of its sets; the first is the headline."""
    head: str | None = None
    """Task head kind (model/heads.py); None: the LM head's own loss."""
    lm_loss: str | None = None
    """`causal-lm` or `masked-lm` for LM-head objectives."""
    backbone: str = "any"
    """`decoder`, `encoder`, `any`, or `follow` (resolves to causal-lm on a decoder, masked-lm on an encoder)."""
    generation_metrics: tuple[str, ...] = field(default=())
    """Extra metrics of prompt/completion sets whose examples are generated (`eval_generate`)."""

    @property
    def supervised(self) -> bool:
        return self.head is not None

    @property
    def headline(self) -> str:
        return self.metrics[0]

    @property
    def default_format(self) -> str:
        return next(iter(self.formats))


OBJECTIVES: dict[str, Objective] = {o.name: o for o in (
    Objective("token-classification", {"conll": "tags", "dataset": "tags"}, ("f1", "precision", "recall"),
                   head="token-classification"),
    Objective("sequence-classification", dict.fromkeys(CLASS_FORMATS, "classes"), ("accuracy", "macro_f1"),
                   head="sequence-classification"),
    Objective("binary-classification", dict.fromkeys(CLASS_FORMATS, "classes"), ("accuracy", "macro_f1"),
                   head="binary-classification"),
    Objective("causal-lm", {"text": "text", "jsonl": "prompts", "chat": "prompts", "alpaca": "prompts",
                             "dataset": "prompts", "dataset-text": "text"}, ("perplexity",), lm_loss="causal-lm",
                   backbone="decoder", generation_metrics=("exact_match", "token_f1")),
    Objective("masked-lm", {"text": "text", "dataset-text": "text"}, ("mlm_loss",), lm_loss="masked-lm",
              backbone="encoder"),
    Objective("language-modeling", {"text": "text", "dataset-text": "text"}, ("perplexity",), backbone="follow"),
)}
"""The objectives a source (or an `evals` set, for the LM ones) can name."""


def get(name: str) -> Objective:
    return OBJECTIVES[name]


def names(lm_only: bool = False) -> tuple[str, ...]:
    return tuple(n for n, o in OBJECTIVES.items() if not (lm_only and o.supervised))


def formats() -> tuple[str, ...]:
    """Every reader some objective reads."""
    return tuple(dict.fromkeys(f for o in OBJECTIVES.values() for f in o.formats))


def all_metrics(lm_only: bool = False) -> tuple[str, ...]:
    """Every metric some objective reports (headlines first), or only those of language-modelling
    sets (compared before vs after training)."""
    out: list[str] = []
    for o in OBJECTIVES.values():
        if not (lm_only and o.supervised):
            out += [m for m in (*o.metrics, *o.generation_metrics) if m not in out]
    return tuple(out)


def lm_metrics() -> tuple[str, ...]:
    return all_metrics(lm_only=True)


def lower_is_better(metric: str) -> bool:
    """Whether smaller is better for a metric name (`source/metric`): perplexities and losses."""
    return metric.endswith(("perplexity", "loss"))


def resolve(name: str, decoder: bool) -> str:
    """The objective a source trains on this backbone (`language-modeling` follows it); raises
    ValueError when the backbone cannot train it (the caller names the config key)."""
    o = OBJECTIVES[name]
    kind = "decoder" if decoder else "encoder"
    if o.backbone == "follow":
        return "causal-lm" if decoder else "masked-lm"
    if o.backbone not in ("any", kind):
        fits = [n for n, x in OBJECTIVES.items() if not x.supervised and x.backbone in (kind, "follow")]
        raise ValueError(f"{name} needs {'a' if o.backbone == 'decoder' else 'an'} {o.backbone} backbone; this one "
                         f"is {'a' if decoder else 'an'} {kind} (use {' or '.join(fits)})")
    return name
