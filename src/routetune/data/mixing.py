"""Mixing weights: from the way a run gives them (probabilities, temperature, per-epoch counts)
to target probabilities, and schedules that move them with training progress."""

from __future__ import annotations

import math

import numpy as np

from routetune.errors import ConfigError


def _normalise(weights: dict[str, float], names: list[str]) -> np.ndarray:
    w = np.array([float(weights.get(n, 0.0)) for n in names], dtype=np.float64)
    return w / w.sum()


def base_weights(routing, names: list[str], sizes: dict[str, int | None]) -> tuple[np.ndarray, float | None]:
    """Start probabilities, and for `counts` the number of examples in one mixture epoch."""
    if routing.temperature is not None:
        unknown = [n for n in names if sizes.get(n) is None]
        if unknown:
            raise ConfigError(f"routing.temperature: source {unknown[0]!r} is a text stream of unknown size; "
                              "give routing.weights instead")
        raw = {n: sizes[n] ** (1.0 / routing.temperature) for n in names}
        return _normalise(raw, names), None
    if routing.counts is not None:
        raw = {}
        for n in names:
            c = routing.counts[n]
            if c.repeat is not None:
                if sizes.get(n) is None:
                    raise ConfigError(f"routing.counts.{n}.repeat: source {n!r} is a text stream of unknown "
                                      "size; use choose: <examples per epoch>")
                raw[n] = c.repeat * sizes[n]
            else:
                raw[n] = float(c.choose)
        total = sum(raw.values())
        return _normalise(raw, names), total
    return _normalise(routing.weights, names), None


class Schedule:
    """Target probabilities as a function of progress x in [0, 1] (step / planned steps)."""

    def __init__(self, kind: str, start: np.ndarray, end: np.ndarray | None = None,
                 stages: list[tuple[float, np.ndarray]] | None = None):
        self.kind = kind
        self.start = start
        self.end = end if end is not None else start
        self.stages = stages or []

    @classmethod
    def from_config(cls, routing, names: list[str], start: np.ndarray) -> "Schedule":
        sch = routing.schedule
        if sch is None or sch.kind == "constant":
            return cls("constant", start)
        if sch.kind in ("linear", "cosine"):
            return cls(sch.kind, start, _normalise(sch.end, names))
        return cls("stages", start, stages=[(st.until, _normalise(st.weights, names)) for st in sch.stages])

    def at(self, x: float) -> np.ndarray:
        x = min(max(x, 0.0), 1.0)
        if self.kind == "constant":
            return self.start
        if self.kind == "stages":
            for until, w in self.stages:
                if x < until:
                    return w
            return self.stages[-1][1]
        f = x if self.kind == "linear" else 0.5 * (1.0 - math.cos(math.pi * x))
        p = (1.0 - f) * self.start + f * self.end
        return p / p.sum()

    def mean(self, index: int, points: int = 1000) -> float:
        """Average probability of one source over the run (to size a scheduled run)."""
        return float(np.mean([self.at((i + 0.5) / points)[index] for i in range(points)]))
