"""The events of a run's ``metrics.jsonl``: written by the trainer (training/engine.py), read by the
report (reports/run.py) and by tools. One JSON object per line with ``event``, ``time`` (seconds since
the session started) and the fields below."""

from __future__ import annotations

START = "start"
"""Before the first step: total_steps, sources (the source table), labels, routing (router state)."""
TRAIN = "train"
"""Every `log_every` steps: step, lr, tokens_per_s, and per source: loss (mean since the last
train event), batches, examples, tokens, share (of examples so far) and target (planned share)."""
EVAL = "eval"
"""A dev evaluation: step, split ("dev"), metrics (flat `source/metric`), best, details."""
EARLY_STOP = "early_stop"
"""Early stopping ended the run: step, best, best_step."""
ROUTE_UPDATE = "route_update"
"""The adaptive router changed its weights: the router's update fields."""
BUDGET = "budget"
"""A retention-budget measurement (step 0: the base model): step, loss, base, change (relative to
the base, of the loss or the perplexity), violation, share (of the controlled sources, from now
on), multiplier, weights (every source's target), seconds (the measurement's cost)."""
SKIPPED = "skipped"
"""A non-finite loss skipped an update: step, source, loss."""
RESUME = "resume"
"""A resumed session starts: step, checkpoint."""
FINAL = "final"
"""The run's results, once summary.json is written: step (the last), test and dev (the end-of-run
scores by source, as in summary.json), before_after (general-text retention, base -> fine-tuned)."""

EVENTS = frozenset({START, TRAIN, EVAL, EARLY_STOP, ROUTE_UPDATE, BUDGET, SKIPPED, RESUME, FINAL})

COUNTS = frozenset({"support", "tokens", "examples", "blocks", "completion_tokens", "generated", "steps", "batches",
                    "sentences", "words", "untokenizable_words", "n_truncated_words", "n_truncated_sentences",
                    "truncated_words", "truncated_sentences", "truncated"})
"""Fields of a score dict that count things rather than measure them (not metrics)."""
