"""The retention budget's controller: the general sources' total share as a control variable.

The constrained problem a budget states is: minimise the task loss subject to
``change(general measure) <= max_change``. Its Lagrangian, ``L_task + lam L_general``, is up to a
factor the mixture loss ``(1 - s) L_task + s L_general`` with ``s = lam / (1 + lam)``: the general
share *is* the normalised Lagrange multiplier of the constraint. So the controller runs dual
ascent on the multiplier from the measured violation, with two choices made for a noisy,
lagging measurement on a few hundred steps:

* It moves ``log lam`` (the log-odds of the share) rather than ``lam``: a step is then relative to
  the share (0.02 -> 0.03 and 0.2 -> 0.3 are the same move) and one setting of the gains works for
  shares from 1% to 50% (a multiplicative-weights update of the multiplier).
* Proportional and derivative terms beside the integral (dual-ascent) term: the PID Lagrangian of
  Stooke, Achiam and Abbeel (2020). The integral alone lags the forgetting it corrects; the
  proportional part answers the current violation at once and lets go when it is gone; the
  derivative part answers a change that is *rising* fast before it crosses the budget. Forgetting
  in fine-tuning often does that: the general loss first falls (the model adapts to the block
  format) and then climbs steeply (a smollm2-135m LoRA run went from -10% to +6% in 15 steps).

The violation is relative, ``e = (change - max_change) / max_change``, clipped to [-2, 2] so one
measurement cannot swing the share across its range; slack (``e < 0``) is scaled by
``slack_gain`` before it acts, so the share can be given away more slowly than it is taken back:
forgetting, once in the weights, is slow to undo (the smollm2 run above stayed at +8% for 40 steps
while its share rose from 0.05 to 0.33), while too much general text only costs some domain data.
The integral is clamped to the share's bounds (anti-windup). Every value is a plain float in
``state_dict()``: the plan is a function of the seed, the step and these logged values, and a
resumed run continues it exactly.

**Held-out text, not the sample.** What a user states is a limit on general ability, but the
controller sees a sample of a few dozen blocks. Given each block's own loss (``update`` with a
list), it aims inside the budget by a margin from the sample's own spread: with ``d_i`` the change
of block i's loss against the base model (paired: the same blocks, the same masks), mean ``d`` and
standard deviation ``s`` over the n blocks, a held-out sample of m blocks of the same kind changes
by ``D ~ N(mu, s^2/m)`` where the measured ``d ~ N(mu, s^2/n)``, so ``D <= d + z s sqrt(1/n + 1/m)``
with probability ``P`` (``z`` its normal quantile; m infinite for a large held-out text). The
controller acts on that bound. Assumed: the held-out blocks are exchangeable with the sample's
(drawn from the same kind of text; the sample is spread across the measured text for that), and
``d`` is near normal (a mean over blocks). The margin is logged with every measurement.

**Early slack.** The measure often *falls* at first (adapting to the block format helps all
text), and that slack is transient: spent, it returns as forgetting that stays in the weights.
``slack_warmup`` lets slack act in proportion to the run's progress until that fraction of the
run, so the share is given away late, when the run has little time left to forget with it.

Written here rather than taken from a control library: the controller is a dozen lines of
arithmetic tied to routetune's router state and checkpoint, and its state must be plain data.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

CLIP = 2.0  # largest relative violation one measurement acts on


def logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


class RetentionController:
    """PID control of the log-odds of the controlled sources' total share from the measured relative
    change of a general-ability measure against the base model."""

    def __init__(self, max_change: float, share: float, min_share: float, max_share: float,
                 integral_gain: float, proportional_gain: float, derivative_gain: float = 0.0, metric: str = "loss",
                 slack_gain: float = 1.0, confidence: float | None = None, holdout_blocks: int | None = None,
                 slack_warmup: float = 0.0):
        self.max_change, self.metric, self.slack_gain = max_change, metric, slack_gain
        self.lo, self.hi = logit(min_share), logit(max_share)
        self.ki, self.kp, self.kd = integral_gain, proportional_gain, derivative_gain
        self.z = NormalDist().inv_cdf(confidence) if confidence is not None else 0.0
        self.holdout_blocks, self.slack_warmup = holdout_blocks, slack_warmup
        self.last: float | None = None  # the previous measurement's violation (for the derivative)
        self.integral = logit(min(max(share, min_share), max_share))  # the start, within the bounds
        self.share = sigmoid(self.integral)
        self.base: float | None = None  # the measure on the base model (before the first step)
        self.base_blocks: list[float] | None = None  # and each block's (for the margin)
        self.witness_base: float | None = None  # a sample that is measured, never acted on
        self.updates = 0

    def change(self, loss: float, base: float | None = None) -> float:
        """Relative change of the measure against the base (or `base`): of the loss, or of its exponential."""
        base = self.base if base is None else base
        if self.metric == "perplexity":
            return math.exp(loss - base) - 1.0
        return loss / base - 1.0

    def margin(self, blocks: list[float]) -> float:
        """The margin in loss, ``z s sqrt(1/n + 1/m)``, from the spread of the blocks' paired changes (0
        with one block, no confidence, or no per-block base)."""
        n = len(blocks)
        if not self.z or self.base_blocks is None or n < 2 or len(self.base_blocks) != n:
            return 0.0
        s = float(np.std(np.subtract(blocks, self.base_blocks), ddof=1))
        return self.z * s * math.sqrt(1.0 / n + (1.0 / self.holdout_blocks if self.holdout_blocks else 0.0))

    def update(self, loss, progress: float = 1.0, witness: list[float] | float | None = None) -> dict:
        """One measurement -> the new share; returns the control record (measure, change, margin, the
        bound acted on, violation, multiplier, share). `loss`: the measure's mean token loss, or each
        block's (then the margin applies); `progress`: the fraction of the run done (for
        `slack_warmup`); `witness`: a disjoint sample's loss(es), logged as its change, never acted on."""
        blocks = [float(x) for x in np.atleast_1d(loss)]
        loss = float(np.mean(blocks))
        wit = float(np.mean(witness)) if witness is not None else None
        if self.base is None:
            self.base, self.base_blocks, self.witness_base = loss, blocks, wit
            out = {"loss": loss, "base": loss, "change": 0.0, "max_change": self.max_change, "share": self.share,
                   "multiplier": self.multiplier, "margin": 0.0, "bound": 0.0}
            return {**out, "witness_change": 0.0} if wit is not None else out
        change, bound = self.change(loss), self.change(loss + self.margin(blocks))
        violation = min(max((bound - self.max_change) / self.max_change, -CLIP), CLIP)
        ramp = min(1.0, progress / self.slack_warmup) if self.slack_warmup > 0 else 1.0
        e = violation * self.slack_gain * ramp if violation < 0 else violation
        rise = e - self.last if self.last is not None else 0.0
        self.last = e
        self.integral = min(max(self.integral + self.ki * e, self.lo), self.hi)
        z = min(max(self.integral + self.kp * e + self.kd * rise, self.lo), self.hi)
        self.share = sigmoid(z)
        self.updates += 1
        out = {"loss": loss, "base": self.base, "change": change, "max_change": self.max_change,
               "margin": bound - change, "bound": bound, "violation": violation, "share": self.share,
               "multiplier": self.multiplier}
        if wit is not None and self.witness_base is not None:
            out["witness_change"] = self.change(wit, self.witness_base)
        return out

    @property
    def multiplier(self) -> float:
        """lam = s / (1 - s): the Lagrange multiplier the share stands for."""
        return self.share / (1.0 - self.share)

    def weights(self, start: np.ndarray, controlled: np.ndarray) -> np.ndarray:
        """Target probabilities: the controlled sources share `share` as their start weights do (equally
        if those are all zero); the others share the rest likewise."""
        out = np.zeros_like(start, dtype=np.float64)
        for mask, total in ((controlled, self.share), (~controlled, 1.0 - self.share)):
            w = np.where(mask, start, 0.0)
            w = w if w.sum() > 0 else mask.astype(np.float64)
            out += total * w / w.sum()
        return out

    def state_dict(self) -> dict:
        return {"integral": self.integral, "share": self.share, "base": self.base, "updates": self.updates,
                "last": self.last, "base_blocks": self.base_blocks, "witness_base": self.witness_base}

    def load_state_dict(self, state: dict) -> None:
        self.integral, self.share = float(state["integral"]), float(state["share"])
        self.base = None if state["base"] is None else float(state["base"])
        self.updates = int(state["updates"])
        self.last = None if state.get("last") is None else float(state["last"])
        blocks, wit = state.get("base_blocks"), state.get("witness_base")
        self.base_blocks = None if blocks is None else [float(x) for x in blocks]
        self.witness_base = None if wit is None else float(wit)
