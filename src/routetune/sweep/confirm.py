"""`routetune sweep --confirm K`: the chosen settings (the best feasible trial, or the Pareto
front), the base config and the named baselines, each trained with the same K fresh seeds
(never used in the search) and scored on *test* data: the task's test metric and the relative
change of every test `evals` set from the base model. Reported as mean and 95% t-interval, and
as the paired difference to each baseline (same seeds, so the seed's share of the noise cancels).
Runs go to ``STUDY/confirm/LABEL-seedN``; a confirmation that stops continues where it stopped, and
several processes started on one study share its runs."""

from __future__ import annotations

import fcntl
import json
import logging
import math
from pathlib import Path

from routetune.run_folder import RunFolder
from routetune.errors import RunError
from routetune.files import write_text_atomic
from routetune.sweep.study import Study, open_study, task_metric, trial_config
from routetune.workflow import resume_run, train_config

log = logging.getLogger("routetune")
SEED_BASE = 1000  # confirmation seeds: train.seed = routing.seed = 1000 + i, apart from the search's


def chosen_trials(st: Study) -> list:
    """The best feasible trial (one objective) or the feasible Pareto front, at most
    `confirm_points` of it: both ends and evenly between (one: the end best on the task)."""
    from optuna.trial import TrialState

    done = [t for t in st.study.get_trials(states=(TrialState.COMPLETE,))]
    feasible = [t for t in done if all(c <= 0 for c in t.user_attrs.get("constraint", [0.0]))]
    if not feasible:
        raise RunError(f"{st.folder}: no finished trial meets the constraints yet; nothing to confirm")
    if len(st.cfg.objectives) == 1:
        sign = 1 if st.directions[0] == "maximize" else -1
        return [max(feasible, key=lambda t: sign * t.values[0])]
    front = [t for t in st.study.best_trials if t in feasible] or feasible
    i, sign = task_place(st)
    front = sorted(front, key=lambda t: -sign * t.values[i])  # the end best on the task first
    limit = st.cfg.confirm_points
    if len(front) > limit:  # spread along the front: both ends and evenly between
        front = [front[round(i * (len(front) - 1) / max(limit - 1, 1))] for i in range(limit)]
    return front


def task_place(st: Study) -> tuple[int, int]:
    """The task objective's place among the study's values (the sweep file may list retention
    first), and +1 where higher is better, else -1."""
    i = [o.kind for o in st.cfg.objectives].index("task")
    return i, 1 if st.directions[i] == "maximize" else -1


def interval(values: list[float]) -> dict:
    """Mean and the half-width of its 95% t-interval (None for one value)."""
    from scipy import stats

    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return {"mean": mean, "half": None, "n": n}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return {"mean": mean, "half": float(stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)), "n": n}


def _test_scores(st: Study, summary: dict) -> dict:
    """The task's test metric and the change of every test-scored general text (dev sets chose the
    settings; they are left out here)."""
    metric = task_metric(st)
    source, _, name = metric.partition("/")
    out = {f"test {metric}": float(summary["test"][source][name])}
    for key, v in summary.get("before_after", {}).items():
        if v.get("ratio") is not None and key.split("/")[0] in summary["test"]:
            out[f"{key} change"] = v["ratio"] - 1.0
    return out


def confirm(sweep_path: str | Path, k: int) -> dict:
    if k < 2:
        raise RunError("--confirm: give at least 2 seeds (an interval needs them)")
    st = open_study(sweep_path, resume=True)
    settings = {f"trial-{t.number:04d}": t.user_attrs["setting"] for t in chosen_trials(st)}
    settings.update({"base": {}, **{name: dict(over) for name, over in st.cfg.baselines.items()}})
    jobs = [(label, setting, SEED_BASE + i) for label, setting in settings.items() for i in range(k)]
    summaries = {}
    for wait in (False, True):  # runs another process holds come last: waited for, then read or continued
        for n, (label, setting, seed) in enumerate(jobs):
            if n not in summaries:
                summary = _claimed_run(st, label, setting, seed, wait, f"{n + 1} of {len(jobs)}")
                if summary is not None:
                    summaries[n] = summary
    results: dict = {}
    for n, (label, _, _) in enumerate(jobs):
        for key, value in _test_scores(st, summaries[n]).items():
            results.setdefault(label, {}).setdefault(key, []).append(value)
    report = {"seeds": [SEED_BASE + i for i in range(k)], "settings": settings,
              "scores": {label: {key: {"values": v, **interval(v)} for key, v in by.items()}
                         for label, by in results.items()},
              "paired": _paired(results, [n for n in settings if not n.startswith("trial-")])}
    write_text_atomic(st.folder / "confirm.json", json.dumps(report, indent=2) + "\n")
    return report


def _claimed_run(st: Study, label: str, setting: dict, seed: int, wait: bool, place: str) -> dict | None:
    """One confirmation run's summary, trained under an exclusive lock on its name, so several
    `--confirm` processes on one study share the runs. Without `wait`, a run another process holds
    is skipped (None); with it, the lock is waited for. The lock is the operating system's
    (`flock`): it goes when its process ends, however it ends, so a run whose process died is
    continued from its last checkpoint by whoever takes it next. Written here: optuna's storage
    coordinates trials, and confirmation runs are not trials."""
    name = f"{label}-seed{seed}"
    locks = st.folder / "confirm" / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / name, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("confirm %s (%s): another process is running it; %s", name, place,
                     "waiting for it" if wait else "later")
            if not wait:
                return None
            fcntl.flock(handle, fcntl.LOCK_EX)
        cfg = trial_config(st, {**setting, "train.seed": seed, "routing.seed": seed, "run.name": name,
                                "run.output_dir": str(st.folder / "confirm")})
        log.info("confirm %s (%s)", name, place)
        return run_or_continue(cfg, st.folder / "confirm" / name, run_test=True)


def run_or_continue(cfg, run_dir: Path, run_test: bool) -> dict:
    """A run's summary: read when it finished earlier, continued from its last checkpoint when it
    stopped, trained otherwise (a folder it left without a checkpoint is replaced: it is ours)."""
    if RunFolder(run_dir).summary.is_file():
        return json.loads(RunFolder(run_dir).summary.read_text(encoding="utf-8"))
    if (run_dir / "checkpoints").is_dir():
        try:
            return resume_run(run_dir, run_test=run_test)[1]
        except RunError:
            pass
    return train_config(cfg, run_dir, overwrite=run_dir.exists(), run_test=run_test)[1]


def _paired(results: dict, baselines: list[str]) -> dict:
    """Chosen minus baseline, seed by seed, as mean and 95% interval."""
    out = {}
    for label, by in results.items():
        if not label.startswith("trial-"):
            continue
        for base in baselines:
            for key, values in by.items():
                diffs = [a - b for a, b in zip(values, results[base].get(key, []))]
                if diffs:
                    out[f"{label} - {base}: {key}"] = interval(diffs)
    return out


def table(report: dict) -> str:
    """The confirmation as a Markdown table: one row per setting, one column per score."""
    keys = list(dict.fromkeys(k for by in report["scores"].values() for k in by))
    fmt = lambda s: f"{s['mean']:.4f}" + (f" ± {s['half']:.4f}" if s["half"] is not None else "")  # noqa: E731
    lines = [f"test scores over seeds {', '.join(map(str, report['seeds']))} (mean ± 95% interval)", "",
             "| setting | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for label, by in report["scores"].items():
        lines.append(f"| {label} | " + " | ".join(fmt(by[k]) if k in by else "" for k in keys) + " |")
    if report["paired"]:
        lines += ["", "| paired difference | mean ± 95% interval |", "|---|---|"]
        lines += [f"| {name} | {fmt(s)} |" for name, s in report["paired"].items()]
    return "\n".join(lines)
