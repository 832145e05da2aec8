"""A data-mixing law fitted over a study's trials, and its prediction checked by a run.

Each objective is fitted as a function of one mixture coordinate x (e.g. the general-text
weight) with the exponential form of the data-mixing laws of Ye et al. (2024),
``y(x) = c + k * exp(t * x)``. The prediction is the x that meets a retention budget (the dev
general-text change at most B) with the best predicted task score; a run at that x (its other
settings from the trial with the best task score) measures both, next to what the law predicted.

Fitted by hand with scipy's curve_fit: the form is routetune's choice, a few lines, and no
library offers mixing laws.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from pathlib import Path

import numpy as np

from routetune.run_folder import RunFolder
from routetune.errors import ConfigError, RunError
from routetune.files import write_text_atomic
from routetune.sweep.study import Study, open_study, retention_change, retention_set, scores, trial_config
from routetune.sweep.confirm import run_or_continue, task_place

log = logging.getLogger("routetune")


def _form(x, c, k, t):
    return c + k * np.exp(t * x)


def _fit(x: np.ndarray, y: np.ndarray) -> dict:
    from scipy.optimize import curve_fit

    best = None
    for t0 in (-5.0, -1.0, 1.0, 5.0):  # the sign and scale of the curvature are not known beforehand
        try:
            k0 = (y[np.argmax(x)] - y[np.argmin(x)]) / (math.exp(t0 * x.max()) - math.exp(t0 * x.min()) or 1.0)
            with np.errstate(over="ignore", invalid="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # overflowing curvatures and flat data: judged by the RMSE below
                p, _ = curve_fit(_form, x, y, p0=(float(y.mean()), float(k0), t0), maxfev=20000)
        except (RuntimeError, ValueError, OverflowError):
            continue
        rmse = float(np.sqrt(np.mean((_form(x, *p) - y) ** 2)))
        if best is None or rmse < best["rmse"]:
            best = {"c": float(p[0]), "k": float(p[1]), "t": float(p[2]), "rmse": rmse}
    if best is None:
        raise RunError("the mixing law did not fit these trials (too few distinct mixtures, or no trend)")
    return best


def _trials(st: Study, key: str, where: dict) -> list:
    """The finished trials that vary `key` and hold every `where` key at its value: a law over one
    coordinate, with the study's other choices (a categorical one, say) held fixed."""
    from optuna.trial import TrialState

    trials = [t for t in st.study.get_trials(states=(TrialState.COMPLETE,)) if key in t.user_attrs.get("setting", {})]
    for k in where:
        if not any(k in t.user_attrs["setting"] for t in trials):
            raise ConfigError(f"--where: {k} is not a key of this study's settings "
                              f"(keys: {', '.join(sorted({n for t in trials for n in t.user_attrs['setting']}))})")
    return [t for t in trials if all(t.user_attrs["setting"].get(k) == v for k, v in where.items())]


def parse_where(items: list[str]) -> dict:
    """`--where KEY=VALUE` options as a dict, each value read as YAML (1.0, iid, true)."""
    import yaml

    out = {}
    for item in items:
        k, eq, v = item.partition("=")
        if not eq or not k.strip():
            raise ConfigError(f"--where: expected KEY=VALUE (e.g. sources.general.distill=1.0), got {item!r}")
        out[k.strip()] = yaml.safe_load(v)
    return out


def _points(st: Study, key: str, where: dict) -> list[tuple[float, float, float]]:
    kinds = [o.kind for o in st.cfg.objectives]
    out = []
    for t in _trials(st, key, where):
        x = t.user_attrs["setting"][key]
        task = t.values[kinds.index("task")] if "task" in kinds else None
        ret = t.values[kinds.index("retention")] if "retention" in kinds else t.user_attrs.get("retention")
        if ret is None:
            summary = json.loads(RunFolder(t.user_attrs["run0"]["run"]).summary.read_text())
            ret = retention_change(summary, retention_set(st))
        out.append((float(x), task, float(ret)))
    return out


def fit_law(st: Study, key: str, budget: float, where: dict | None = None) -> dict:
    where = where or {}
    points = _points(st, key, where)
    if len({p[0] for p in points}) < 4 or any(p[1] is None for p in points):
        held = f" among the trials with {', '.join(f'{k}={v}' for k, v in where.items())}" if where else ""
        raise RunError(f"--law {key}: needs a task objective and at least 4 finished trials with different "
                       f"values of {key}{held} (found {len({p[0] for p in points})})")
    x = np.array([p[0] for p in points])
    task_fit, ret_fit = _fit(x, np.array([p[1] for p in points])), _fit(x, np.array([p[2] for p in points]))
    grid = np.linspace(x.min(), x.max(), 2001)
    task_of = _form(grid, task_fit["c"], task_fit["k"], task_fit["t"])
    ret_of = _form(grid, ret_fit["c"], ret_fit["k"], ret_fit["t"])
    ok = ret_of <= budget
    if not ok.any():
        raise RunError(f"--law {key}: the fitted law meets the retention budget {budget:+.4f} nowhere in "
                       f"[{x.min():.4g}, {x.max():.4g}] (least change {ret_of.min():+.4f})")
    sign = task_place(st)[1]
    i = int(np.argmax(np.where(ok, sign * task_of, -np.inf)))
    return {
        "key": key,
        "budget": budget,
        "where": where,
        "points": points,
        "task_fit": task_fit,
        "retention_fit": ret_fit,
        "predicted": {"x": float(grid[i]), "task": float(task_of[i]), "retention": float(ret_of[i])},
    }


def _setting_at(st: Study, key: str, x: float, where: dict) -> tuple[dict, int]:
    """The setting to check a prediction with: x put in (and, for a two-way simplex, 1 - x), the
    other keys (a learning rate, say) from the trial with the best task score among those `where`
    holds. The law models x alone, so the check holds the rest at the best the study found (the
    trial nearest to x may have a poor learning rate). Returns the setting and that trial's number."""
    i, sign = task_place(st)
    best = max(_trials(st, key, where), key=lambda t: sign * t.values[i])
    setting = dict(best.user_attrs["setting"])
    setting[key] = round(x, 6)
    parent, _, leaf = key.rpartition(".")
    simplex = st.cfg.space.get(parent)
    if simplex is not None and simplex.type == "simplex" and len(simplex.keys) == 2:
        other = next(n for n in simplex.keys if n != leaf)
        setting[f"{parent}.{other}"] = round(1 - x, 6)
    return setting, best.number


def law(sweep_path: str | Path, key: str, budget: float, where: dict | None = None) -> dict:
    """Fit, predict, and measure the prediction with one run (its dev scores, like the trials')."""
    where = where or {}
    st = open_study(sweep_path, resume=True)
    result = fit_law(st, key, budget, where)
    setting, result["settings_from_trial"] = _setting_at(st, key, result["predicted"]["x"], where)
    held = "".join(f"-{k.rpartition('.')[2]}={v}" for k, v in where.items())
    name = f"law-check-{key.rpartition('.')[2]}-{result['predicted']['x']:.4f}{held}"  # one folder per prediction
    run_dir = st.folder / name
    cfg = trial_config(st, {**setting, "run.name": name, "run.output_dir": str(st.folder)})
    summary = run_or_continue(cfg, run_dir, run_test=False)
    kinds = [o.kind for o in st.cfg.objectives]
    measured = scores(st, run_dir, summary)
    result["measured"] = {"task": measured[kinds.index("task")],
                          "retention": measured[kinds.index("retention")] if "retention" in kinds
                          else retention_change(summary, retention_set(st)), "run": str(run_dir)}
    result["setting"] = setting
    write_text_atomic(st.folder / "law.json", json.dumps(result, indent=2) + "\n")
    return result
