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

Written here rather than taken from a control library: the controller is a dozen lines of
arithmetic tied to routetune's router state and checkpoint, and its state must be plain data.
"""

from __future__ import annotations

import math

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
                 slack_gain: float = 1.0):
        self.max_change, self.metric, self.slack_gain = max_change, metric, slack_gain
        self.lo, self.hi = logit(min_share), logit(max_share)
        self.ki, self.kp, self.kd = integral_gain, proportional_gain, derivative_gain
        self.last: float | None = None  # the previous measurement's violation (for the derivative)
        self.integral = logit(min(max(share, min_share), max_share))  # the start, within the bounds
        self.share = sigmoid(self.integral)
        self.base: float | None = None  # the measure on the base model (before the first step)
        self.updates = 0

    def change(self, loss: float) -> float:
        """Relative change of the measure against the base: of the loss, or of its exponential."""
        if self.metric == "perplexity":
            return math.exp(loss - self.base) - 1.0
        return loss / self.base - 1.0

    def update(self, loss: float) -> dict:
        """One measurement of the measure's mean token loss -> the new share; returns the control
        record (measure, change, violation, multiplier, share)."""
        if self.base is None:
            self.base = loss
            return {"loss": loss, "base": loss, "change": 0.0, "max_change": self.max_change, "share": self.share,
                    "multiplier": self.multiplier}
        change = self.change(loss)
        violation = min(max((change - self.max_change) / self.max_change, -CLIP), CLIP)
        e = violation * self.slack_gain if violation < 0 else violation
        rise = e - self.last if self.last is not None else 0.0
        self.last = e
        self.integral = min(max(self.integral + self.ki * e, self.lo), self.hi)
        z = min(max(self.integral + self.kp * e + self.kd * rise, self.lo), self.hi)
        self.share = sigmoid(z)
        self.updates += 1
        return {"loss": loss, "base": self.base, "change": change, "max_change": self.max_change,
                "violation": violation, "share": self.share, "multiplier": self.multiplier}

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
                "last": self.last}

    def load_state_dict(self, state: dict) -> None:
        self.integral, self.share = float(state["integral"]), float(state["share"])
        self.base = None if state["base"] is None else float(state["base"])
        self.updates = int(state["updates"])
        self.last = None if state.get("last") is None else float(state["last"])
