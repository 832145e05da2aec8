"""The router: a seeded plan of which source every batch (or every example slot) comes from.

Strategies (``routing.strategy``):

* ``iid``: decision ``k`` draws from the target probabilities with a uniform number that is a pure
  function of ``(seed, k)`` (counter-based, in blocks), so any decision can be recomputed anywhere.
* ``interleaved``: low-discrepancy; Tijdeman's chairman-assignment rule keeps every source's
  realised count within 1 of its target at every prefix (for constant weights).
* ``adaptive``: Exp3-style online data mixing: draws like ``iid`` from weights that an
  exponential-weights update moves towards sources whose training loss is high relative to its
  first value, with a probability floor per source.

Target probabilities may follow a :class:`~routetune.data.mixing.Schedule` over the run, or, with a
retention budget, a :class:`~routetune.data.control.RetentionController` that sets the general
sources' share from measurements of general ability (``measured``).
All decisions are made in the main process; a router's whole state is in ``state_dict()``.
"""

from __future__ import annotations

import bisect
import math

import numpy as np

from routetune.data.control import RetentionController
from routetune.data.mixing import Schedule
from routetune.seeds import derive_seed

_BLOCK = 4096  # uniforms generated per counter block


class Router:
    strategy = "base"

    def __init__(self, names: list[str], schedule: Schedule, seed: int, horizon: int):
        self.names = list(names)
        self.schedule = schedule
        self.seed = seed
        self.horizon = max(int(horizon), 1)
        self.decisions = 0
        self.active = np.ones(len(names), dtype=bool)
        self._key = derive_seed(seed, "route")
        self._block_id = -1
        self._block = np.empty(0)
        self.control: RetentionController | None = None  # a retention budget's controller (attach_control)

    # -- target probabilities ------------------------------------------------------------
    def target(self, step: int) -> np.ndarray:
        if self.control is not None:
            p = self._controlled
        elif self.schedule.kind == "constant":
            p = self.schedule.start
        else:
            p = self.schedule.at(step / self.horizon)
        if self.active.all():
            return p
        p = p * self.active
        total = p.sum()
        if total <= 0:  # every source with weight is exhausted: fall back to the active ones
            p = self.active.astype(np.float64)
            total = p.sum()
        return p / total

    def deactivate(self, name: str) -> None:
        self.active[self.names.index(name)] = False

    def attach_control(self, control: RetentionController, controlled: list[str]) -> None:
        """Let `control` set the total share of the `controlled` sources from now on."""
        self.control = control
        self._mask = np.array([n in controlled for n in self.names])
        self._set_controlled()

    def _set_controlled(self) -> None:
        """The target probabilities the controller's current share makes (cached: `target` runs every step)."""
        self._controlled = self.control.weights(self.schedule.start, self._mask)

    def measured(self, loss, progress: float = 1.0, witness=None) -> dict:
        """A measurement of the budget's measure (mean token loss, or each block's) -> the controller's
        record, with the target probabilities it sets for the next steps."""
        record = self.control.update(loss, progress, witness)
        self._set_controlled()
        return {**record, "weights": dict(zip(self.names, self._controlled.round(6).tolist()))}

    # -- counter-based uniforms ------------------------------------------------------------
    def uniforms(self, start: int, n: int) -> np.ndarray:
        block, offset = divmod(start, _BLOCK)
        if block == self._block_id and offset + n <= _BLOCK:  # the common case: inside the cached block
            return self._block[offset : offset + n]
        out = np.empty(n)
        filled = 0
        while filled < n:
            k = start + filled
            block, offset = divmod(k, _BLOCK)
            if block != self._block_id:
                self._block = np.random.default_rng([self._key, block]).random(_BLOCK)
                self._block_id = block
            take = min(n - filled, _BLOCK - offset)
            out[filled : filled + take] = self._block[offset : offset + take]
            filled += take
        return out

    def _draw(self, p: np.ndarray, n: int) -> list[int]:
        key = p.tobytes()
        if key != getattr(self, "_cdf_key", None):  # constant weights: computed once
            self._cdf_key, self._cdf = key, np.cumsum(p)
            self._last = int(np.flatnonzero(p > 0)[-1])
        if n == 1:  # per-batch routing: plain Python is faster than numpy for one value
            u = float(self.uniforms(self.decisions, 1)[0])
            return [min(bisect.bisect_right(self._cdf, u), self._last)]
        idx = np.searchsorted(self._cdf, self.uniforms(self.decisions, n), side="right")
        return np.minimum(idx, self._last).tolist()  # round-off at the top never picks a zero weight

    # -- interface -------------------------------------------------------------------------
    def choose(self, step: int, slots: int = 1) -> list[int]:
        """Source indices for the `slots` decisions of `step` (advances the decision counter)."""
        out = self._choose(step, slots)
        self.decisions += slots
        return out

    def _choose(self, step: int, slots: int) -> list[int]:
        return self._draw(self.target(step), slots)

    def observe(self, step: int, losses: dict[str, float]) -> dict | None:
        """Per-source mean training losses of a step; returns an update record if weights moved."""
        return None

    def state_dict(self) -> dict:
        state = {"strategy": self.strategy, "names": self.names, "seed": self.seed, "horizon": self.horizon,
                 "decisions": self.decisions, "active": self.active.tolist()}
        return {**state, "control": self.control.state_dict()} if self.control is not None else state

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("strategy", "names", "seed", "horizon"):
            if state[key] != mine[key]:
                raise ValueError(f"routing: the saved router state has {key}={state[key]!r}, this run {mine[key]!r}")
        self.decisions = int(state["decisions"])
        self.active = np.array(state["active"], dtype=bool)
        if (self.control is None) != (state.get("control") is None):
            raise ValueError("routing: the saved router state and this run differ in routing.budget")
        if self.control is not None:
            self.control.load_state_dict(state["control"])
            self._set_controlled()


class IIDRouter(Router):
    strategy = "iid"


class InterleavedRouter(Router):
    strategy = "interleaved"

    def __init__(self, names, schedule, seed, horizon):
        super().__init__(names, schedule, seed, horizon)
        self.counts = [0] * len(names)
        self.targets = [0.0] * len(names)

    def _choose(self, step: int, slots: int) -> list[int]:
        # Tijdeman (1980): among sources whose deficit target - count is at least d = 1/(2k-2),
        # pick the one whose next deadline (count + 1 - d - target) / p comes first. For constant
        # weights this keeps |count - target| <= 1 - d < 1 at every prefix.
        p = self.target(step).tolist()
        live = [i for i, q in enumerate(p) if q > 0]
        d = 1.0 / (2 * len(live) - 2) if len(live) > 1 else 0.0
        counts, targets = self.counts, self.targets
        rates = [(i, p[i]) for i in live]
        threshold = d - 1e-9
        out = []
        append = out.append
        for _ in range(slots):
            best, best_v = -1, math.inf
            for i, q in rates:
                t = targets[i] = targets[i] + q
                c = counts[i]
                if t - c >= threshold:
                    v = (c + 1 - d - t) / q
                    if v < best_v:
                        best, best_v = i, v
            if best < 0:  # cannot happen for constant weights; schedules may briefly get here
                best = max(live, key=lambda i: targets[i] - counts[i])
            counts[best] += 1
            append(best)
        return out

    def state_dict(self) -> dict:
        return {**super().state_dict(), "counts": list(self.counts), "targets": list(self.targets)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.counts, self.targets = list(state["counts"]), [float(t) for t in state["targets"]]


class AdaptiveRouter(Router):
    """Online Data Mixing (Albalak et al., 2023) in the Exp3 family, with the configured weights
    as a prior.

    Reward of a source: its training loss divided by its first observed loss (so objectives with
    different loss scales compare; a source whose loss stays high, or rises as it is forgotten,
    earns weight). With one source per batch the reward is importance-weighted, Exp3 style:
    the sum of the window's rewards / (window x p), zero for a source not drawn. Smoothed:
    R <- s R + (1 - s) reward. Weights: p = (1 - k floor) normalise(start x exp(eta R)) + floor.
    """

    strategy = "adaptive"

    def __init__(self, names, schedule, seed, horizon, eta: float, floor: float, smoothing: float,
                 update_every: int, importance: bool = True):
        super().__init__(names, schedule, seed, horizon)
        self.eta, self.floor, self.smoothing, self.update_every = eta, floor, smoothing, update_every
        self.importance = importance
        self.prior = np.asarray(schedule.start, dtype=np.float64)
        self.rewards = [0.0] * len(names)
        self.first_loss: list[float | None] = [None] * len(names)
        self._sums = [0.0] * len(names)
        self._n = [0] * len(names)
        self._window = 0
        self.probs = self._probabilities()

    def _probabilities(self) -> np.ndarray:
        mask = (self.prior > 0) & self.active
        if not mask.any():
            mask = self.active.copy()
        k = int(mask.sum())
        z = np.array(self.rewards) * self.eta
        z = np.where(mask, np.exp(z - z[mask].max()) * np.where(self.prior > 0, self.prior, 1.0), 0.0)
        floor = min(self.floor, 1.0 / k)
        return ((1 - k * floor) * z / z.sum() + floor) * mask

    def target(self, step: int) -> np.ndarray:
        return self.probs

    def deactivate(self, name: str) -> None:
        super().deactivate(name)
        self.probs = self._probabilities()

    def observe(self, step: int, losses: dict[str, float]) -> dict | None:
        for name, loss in losses.items():
            i = self.names.index(name)
            if self.first_loss[i] is None:
                self.first_loss[i] = loss if loss > 0 else 1.0
            self._sums[i] += loss / self.first_loss[i]
            self._n[i] += 1
        self._window += 1
        if (step + 1) % self.update_every:
            return None
        for i in range(len(self.names)):
            if self.importance:
                reward = self._sums[i] / (self._window * max(self.probs[i], 1e-6)) if self.probs[i] > 0 else None
            else:
                reward = self._sums[i] / self._n[i] if self._n[i] else None
            if reward is not None:
                self.rewards[i] = self.smoothing * self.rewards[i] + (1 - self.smoothing) * reward
        self._sums, self._n, self._window = [0.0] * len(self.names), [0] * len(self.names), 0
        self.probs = self._probabilities()
        return {"step": step + 1, "weights": dict(zip(self.names, self.probs.round(6).tolist())),
                "rewards": dict(zip(self.names, [round(r, 6) for r in self.rewards]))}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "rewards": list(self.rewards), "first_loss": list(self.first_loss),
                "sums": list(self._sums), "n": list(self._n), "window": self._window}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.rewards, self.first_loss = list(state["rewards"]), list(state["first_loss"])
        self._sums, self._n, self._window = list(state["sums"]), list(state["n"]), int(state["window"])
        self.probs = self._probabilities()


def _adaptive(routing, names: list[str], schedule: Schedule, horizon: int) -> Router:
    a = routing.adaptive
    return AdaptiveRouter(names, schedule, routing.seed, horizon, a.eta, a.floor, a.smoothing, a.update_every,
                          importance=routing.granularity == "batch")


STRATEGIES = {
    "iid": lambda routing, names, schedule, horizon: IIDRouter(names, schedule, routing.seed, horizon),
    "interleaved": lambda routing, names, schedule, horizon: InterleavedRouter(names, schedule, routing.seed, horizon),
    "adaptive": _adaptive,
}
"""`routing.strategy` -> factory (routing config, source names, schedule, horizon) -> Router."""


def make_router(routing, names: list[str], schedule: Schedule, horizon: int) -> Router:
    router = STRATEGIES[routing.strategy](routing, names, schedule, horizon)
    b = routing.budget
    if b is not None:
        share = float(sum(schedule.start[names.index(n)] for n in b.sources))  # the controller clamps it
        router.attach_control(RetentionController(b.max_change, share, b.min_share, b.max_share, b.integral_gain,
                                                  b.proportional_gain, b.derivative_gain, b.metric, b.slack_gain,
                                                  b.confidence, b.holdout_blocks, b.slack_warmup),
                              b.sources)
    return router
