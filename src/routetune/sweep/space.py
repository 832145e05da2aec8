"""A trial's setting: each dimension of the space sampled through optuna's define-by-run API,
as dotted config overrides."""

from __future__ import annotations

import math


def _active(param, values: dict) -> bool:
    return all(values.get(k, _MISSING) == v for k, v in param.when.items())


_MISSING = object()


def suggest(trial, space: dict) -> dict:
    """Dotted key -> value for this trial. Conditional dimensions are sampled only when their
    condition holds, so optuna sees them only in the trials where they mean something.

    A simplex is drawn as k independent uniforms turned into normalised exponentials
    (-log u / sum): the flat Dirichlet, the parametrisation optuna's documentation recommends for
    weights that must sum to one. The raw draws are the trial's parameters (``KEY.NAME~u``); the
    weights themselves are stored as user attributes for reports."""
    values: dict = {}
    pending = dict(space)
    while pending:  # conditions may point at keys listed later: resolve in dependency order
        ready = [k for k, p in pending.items() if all(o in values or o not in pending for o in p.when)]
        if not ready:
            raise ValueError("space: the `when` conditions refer to each other in a cycle")
        for key in ready:
            p = pending.pop(key)
            if not _active(p, values):
                continue
            values.update(_draw(trial, key, p))
    return values


def _draw(trial, key: str, p) -> dict:
    if p.type == "float":
        return {key: trial.suggest_float(key, p.low, p.high, log=p.log, step=p.step)}
    if p.type == "int":
        return {key: trial.suggest_int(key, int(p.low), int(p.high), log=p.log, step=int(p.step or 1))}
    if p.type == "categorical":
        return {key: trial.suggest_categorical(key, p.choices)}
    raw = {name: trial.suggest_float(f"{key}.{name}~u", 1e-6, 1.0) for name in p.keys}
    weights = {name: -math.log(u) for name, u in raw.items()}
    total = sum(weights.values())
    out = {f"{key}.{name}": round(w / total, 6) for name, w in weights.items()}
    trial.set_user_attr("simplex", {**trial.user_attrs.get("simplex", {}), **out})
    return out
