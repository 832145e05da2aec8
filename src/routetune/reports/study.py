"""`routetune report STUDY`: a study's trials as a table, the Pareto front of task score against
retention (or the optimisation history of one objective), the parameter importances, and the
confirmation and mixing-law results when they exist; ``--json`` gives the same as one object."""

from __future__ import annotations

import functools
import json
from pathlib import Path

from routetune.errors import RunError
from routetune.reports import render
from routetune.sweep.study import MARK


cell = functools.partial(render.fmt, spec=".4g")  # a study's numbers: four significant digits


def load_study(folder: Path):
    """(sweep config as stored, optuna study) of a study folder, without the sweep file."""
    import optuna

    mark = folder / MARK
    if not mark.is_file():
        raise RunError(f"{folder}: not a routetune study (no {MARK})")
    stored = json.loads(mark.read_text(encoding="utf-8"))
    url = stored["config"].get("storage") or f"sqlite:///{(folder / 'study.db').resolve()}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    name = stored["config"].get("name") or Path(stored["sweep"]).stem
    return stored, optuna.load_study(study_name=name, storage=url)


def study_json(folder: Path) -> dict:
    stored, study = load_study(folder)
    kinds = [o["kind"] for o in stored["config"]["objectives"]]
    trials = []
    for t in study.get_trials(deepcopy=False):
        trials.append({"number": t.number, "state": t.state.name, "values": dict(zip(kinds, t.values or [])),
                       "setting": t.user_attrs.get("setting", {}), "run": t.user_attrs.get("run0", {}).get("run"),
                       "feasible": all(c <= 0 for c in t.user_attrs.get("constraint", [0.0])),
                       "seconds": t.duration.total_seconds() if t.duration else None})
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    front = [t.number for t in study.best_trials] if len(kinds) > 1 and complete else []
    out = {"study": str(folder), "objectives": kinds, "directions": [d.name.lower() for d in study.directions],
           "trials": trials, "pareto_front": front, "importances": _importances(study, kinds)}
    for extra in ("confirm", "law"):
        path = folder / f"{extra}.json"
        if path.is_file():
            out[extra] = json.loads(path.read_text(encoding="utf-8"))
    return out


def _importances(study, kinds: list[str]) -> dict:
    import optuna

    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if len(complete) < 3 or not any(len({json.dumps(t.params.get(p)) for t in complete}) > 1
                                     for p in complete[0].params):
        return {}
    out = {}
    for i, kind in enumerate(kinds):
        try:
            # fANOVA: the share of the objective's variance each parameter explains (direction-free)
            out[kind] = optuna.importance.get_param_importances(
                study, target=lambda t, i=i: t.values[i], evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
        except (ValueError, RuntimeError):  # e.g. a parameter that never varied
            continue
    return out


def _plot_front(data: dict, out: Path) -> str | None:
    kinds = data["objectives"]
    done = [t for t in data["trials"] if t["state"] == "COMPLETE"]
    if not done:
        return None
    plt = render.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    if len(kinds) == 2:
        front = set(data["pareto_front"])
        # one scatter per kind of point, so each legend entry shows its own colour and marker
        groups = (("Pareto front", "o", "C3", lambda t: t["number"] in front),
                  ("trial", "o", "C0", lambda t: t["feasible"] and t["number"] not in front),
                  ("infeasible", "x", "C7", lambda t: not t["feasible"] and t["number"] not in front))
        for label, marker, color, member in groups:
            pts = [t for t in done if member(t)]
            if pts:
                ax.scatter([t["values"]["retention"] for t in pts], [t["values"]["task"] for t in pts],
                           marker=marker, c=color, label=label)
        line = sorted((t["values"]["retention"], t["values"]["task"]) for t in done if t["number"] in front)
        ax.plot([p[0] for p in line], [p[1] for p in line], "C3-")
        for t in done:
            ax.annotate(str(t["number"]), (t["values"]["retention"], t["values"]["task"]), fontsize=7)
        ax.set(xlabel="dev general-text change vs base (lower is better)", ylabel="dev task metric",
               title="task against retention")
    else:
        kind = kinds[0]
        sign = 1 if data["directions"][0] == "maximize" else -1
        xs, ys = [t["number"] for t in done], [t["values"][kind] for t in done]
        best = [sign * max(sign * y for y in ys[: i + 1]) for i in range(len(ys))]
        ax.scatter(xs, ys, label="trial")
        ax.step(xs, best, "C3", where="post", label="best so far")
        ax.set(xlabel="trial", ylabel=f"dev {kind}", title="optimisation history")
    ax.legend(fontsize=8)
    return render.save(fig, out / "study_front.png")


def _plot_importances(data: dict, out: Path) -> str | None:
    if not data["importances"]:
        return None
    plt = render.pyplot()
    fig, ax = plt.subplots(figsize=(6, 3))
    names = sorted({p for imp in data["importances"].values() for p in imp})
    width = 0.8 / len(data["importances"])
    for i, (kind, imp) in enumerate(data["importances"].items()):
        ax.barh([j + i * width for j in range(len(names))], [imp.get(n, 0.0) for n in names], height=width,
                label=kind)
    ax.set_yticks([j + 0.4 - width / 2 for j in range(len(names))], names, fontsize=7)
    ax.set(xlabel="importance (fANOVA)", title="parameter importances")
    ax.legend(fontsize=8)
    return render.save(fig, out / "study_importances.png")


def write_study_report(folder: Path, out: Path | None = None) -> Path:
    data = study_json(folder)
    out = out or folder / "report"
    out.mkdir(parents=True, exist_ok=True)
    images = [i for i in (_plot_front(data, out), _plot_importances(data, out)) if i]
    kinds = data["objectives"]
    rows = [[str(t["number"]), t["state"].lower(), *[cell(t["values"].get(k, "")) for k in kinds],
             "yes" if t["number"] in data["pareto_front"] else "", "yes" if t["feasible"] else "no",
             ", ".join(f"{k}={cell(v)}" for k, v in t["setting"].items())] for t in data["trials"]]
    complete = sum(t["state"] == "COMPLETE" for t in data["trials"])
    caveat = (f"; the importances come from {complete} finished trials, too few for fANOVA to rank parameters "
              "reliably (it needs tens)") if data["importances"] and complete < 10 else ""
    parts = [("Trials (dev scores)" + caveat, ["trial", "state", *kinds, "front", "feasible", "setting"], rows, images)]
    if "confirm" in data:
        c = data["confirm"]
        keys = list(dict.fromkeys(k for by in c["scores"].values() for k in by))
        fmt = lambda s: cell(s["mean"]) + (f" ± {s['half']:.4f}" if s["half"] is not None else "")  # noqa: E731
        parts.append((f"Confirmation on test, seeds {', '.join(map(str, c['seeds']))} (mean ± 95% interval)",
                      ["setting", *keys], [[label, *[fmt(by[k]) if k in by else "" for k in keys]]
                                           for label, by in c["scores"].items()], []))
        if c["paired"]:
            parts.append(("Paired differences (same seeds)", ["difference", "mean ± 95% interval"],
                          [[name, fmt(s)] for name, s in c["paired"].items()], []))
    if "law" in data:
        law = data["law"]
        held = "".join(f", {k}={v}" for k, v in law.get("where", {}).items())
        if "settings_from_trial" in law:
            held += f"; the check run's other settings from trial {law['settings_from_trial']}"
        parts.append((f"Mixing law over {law['key']} (retention budget {law['budget']:+.4f}{held})",
                      ["", law["key"], "task", "retention"],
                      [["predicted", cell(law["predicted"]["x"]), cell(law["predicted"]["task"]),
                        cell(law["predicted"]["retention"])]]
                      + ([["measured", cell(law["predicted"]["x"]), cell(law["measured"]["task"]),
                           cell(law["measured"]["retention"])]] if "measured" in law else []), []))
    title = f"routetune study: {folder.name}"
    (out / "report.md").write_text(render.markdown(title, parts), encoding="utf-8")
    (out / "report.html").write_text(render.html_page(title, parts), encoding="utf-8")
    return out
