"""Run reports: `routetune report RUN` (one run) and `routetune report RUN_A RUN_B ...` (compare).

Everything in a report is read from the run folder (summary.json, metrics.jsonl, continual.json);
nothing is recomputed, so the report shows what the run measured. Plots are PNG files next to
report.md / report.html, which reference them by relative name.
"""

from __future__ import annotations

import json
from pathlib import Path

from routetune.run_folder import RunFolder
from routetune.errors import RunError
from routetune.reports import render
from routetune.training.events import BUDGET, COUNTS, EARLY_STOP, EVAL, TRAIN


# ------------------------------------------------------------------ reading a run

def read_events(run_dir: Path) -> list[dict]:
    path = RunFolder(run_dir).metrics
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_run(run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    folder = RunFolder(run_dir)
    if not folder.summary.is_file() and not folder.continual.is_file():
        raise RunError(f"{run_dir}: no {folder.summary.name} (not a finished run folder) and no "
                       f"{folder.continual.name}")
    summary = json.loads(folder.summary.read_text()) if folder.summary.is_file() else {}
    continual = json.loads(folder.continual.read_text()) if folder.continual.is_file() else None
    return {"dir": run_dir, "name": run_dir.name, "summary": summary, "events": read_events(run_dir),
            "continual": continual}


def loss_curves(events: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """Per source: (step, mean training loss over the steps since the previous log line)."""
    out: dict[str, list[tuple[int, float]]] = {}
    for e in events:
        if e["event"] == TRAIN:
            for name, s in e["sources"].items():
                if s.get("loss") is not None:
                    out.setdefault(name, []).append((e["step"], s["loss"]))
    return out


def share_curves(events: list[dict]) -> dict[str, list[tuple[int, float, float]]]:
    """Per source: (step, realised share of examples so far, target share at that step)."""
    out: dict[str, list[tuple[int, float, float]]] = {}
    for e in events:
        if e["event"] == TRAIN:
            for name, s in e["sources"].items():
                out.setdefault(name, []).append((e["step"], s["share"], s["target"]))
    return out


def dev_curves(events: list[dict]) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for e in events:
        if e["event"] == EVAL and e.get("split") == "dev":
            for metric, value in e["metrics"].items():
                out.setdefault(metric, []).append((e["step"], value))
    return out


def early_stop(events: list[dict]) -> dict | None:
    return next((e for e in events if e["event"] == EARLY_STOP), None)


def test_rows(summary: dict) -> list[tuple[str, str, float]]:
    """(source, metric, value) for every scalar test metric."""
    rows = []
    for source, scores in summary.get("test", {}).items():
        for metric, value in scores.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and metric not in ("tokens", "blocks"):
                rows.append((source, metric, float(value)))
    return rows


# ------------------------------------------------------------------ plots

def plot_losses(runs: list[dict], out: Path) -> str | None:
    plt = render.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = False
    for run in runs:
        for name, pts in loss_curves(run["events"]).items():
            label = name if len(runs) == 1 else f"{run['name']}: {name}"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label)
            drawn = True
    return render.finish(fig, ax, drawn, out / "loss.png", xlabel="step", ylabel="training loss",
                   title="Training loss per source")


def plot_shares(run: dict, out: Path) -> str | None:
    curves = share_curves(run["events"])
    if not curves:
        return None
    plt = render.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (name, pts) in enumerate(curves.items()):
        color = f"C{i}"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color=color, label=f"{name} realised")
        ax.plot([p[0] for p in pts], [p[2] for p in pts], color=color, linestyle="--", label=f"{name} target")
    ax.set(xlabel="step", ylabel="share of examples", title="Realised (cumulative) vs target shares", ylim=(0, 1))
    ax.legend(fontsize=8)
    return render.save(fig, out / "shares.png")


def budget_trace(events: list[dict]) -> list[dict]:
    """A retention budget's measurements, in step order (step 0: the base model)."""
    return [e for e in events if e["event"] == BUDGET]


def plot_budget(run: dict, out: Path) -> str | None:
    """The controlled share and the measured change against the step, with the budget, the change the
    controller aimed at (the budget less its margin for held-out text) and a witness sample if measured."""
    trace = budget_trace(run["events"])
    if not trace:
        return None
    plt = render.pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    steps = [e["step"] for e in trace]
    top.step(steps, [e["share"] for e in trace], where="post", color="C0")
    top.set(ylabel="general share", title="Retention budget: controlled share and measured change")
    budget = 100 * trace[0]["max_change"]
    bottom.plot(steps, [100 * e["change"] for e in trace], marker=".", color="C1", label="measured change")
    if any(e.get("margin") for e in trace):
        bottom.plot(steps[1:], [budget - 100 * e["margin"] for e in trace[1:]], color="C2", linestyle=":",
                    label="aimed at (budget - margin)")
    if "witness_change" in trace[0]:
        bottom.plot(steps, [100 * e["witness_change"] for e in trace], marker="x", color="C4", linestyle="-.",
                    label="witness sample (not acted on)")
    bottom.axhline(budget, color="C3", linestyle="--", label="budget")
    bottom.set(xlabel="step", ylabel="change vs base (%)")
    bottom.legend(fontsize=8)
    return render.save(fig, out / "budget.png")


def plot_dev(runs: list[dict], out: Path) -> str | None:
    plt = render.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = False
    for run in runs:
        best = run["summary"].get("best", {})
        for metric, pts in dev_curves(run["events"]).items():
            if best.get("metric") and metric != best["metric"]:
                continue
            label = metric if len(runs) == 1 else f"{run['name']}: {metric}"
            line = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)[0]
            drawn = True
            if best.get("step") is not None:
                ax.axvline(best["step"], color=line.get_color(), linestyle=":", alpha=0.7)
            stop = early_stop(run["events"])
            if stop:
                ax.axvline(stop["step"], color=line.get_color(), linestyle="--", alpha=0.7)
    return render.finish(fig, ax, drawn, out / "dev.png", xlabel="step", ylabel="dev metric",
                   title="Dev metric (dotted: best checkpoint, dashed: early stop)")


def plot_test_details(run: dict, out: Path) -> list[str]:
    plt = render.pyplot()
    files = []
    for source, scores in run["summary"].get("test", {}).items():
        if "per_type" in scores:
            types = sorted(scores["per_type"])
            fig, ax = plt.subplots(figsize=(7, 3.5))
            ax.bar(types, [scores["per_type"][t]["f1"] for t in types])
            ax.set(ylabel="test F1", title=f"{source}: F1 per entity type", ylim=(0, 1))
            ax.tick_params(axis="x", rotation=30)
            files.append(render.save(fig, out / f"per_type_{source}.png"))
        if "confusion" in scores:
            labels, matrix = scores["labels"], scores["confusion"]
            fig, ax = plt.subplots(figsize=(4.5, 4))
            ax.imshow(matrix, cmap="Blues")
            ax.set(xticks=range(len(labels)), yticks=range(len(labels)), xticklabels=labels, yticklabels=labels,
                   xlabel="predicted", ylabel="gold", title=f"{source}: test confusion")
            for i, row in enumerate(matrix):
                for j, v in enumerate(row):
                    ax.text(j, i, str(v), ha="center", va="center")
            files.append(render.save(fig, out / f"confusion_{source}.png"))
    return files


def plot_retention(runs: list[dict], out: Path) -> str | None:
    rows = [(run["name"], key, v) for run in runs for key, v in run["summary"].get("before_after", {}).items()]
    if not rows:
        return None
    # the change against the base model, in %: bars of absolute values that start at 0 made a
    # -1.4% change look like two equal bars
    plt = render.pyplot()
    keys = sorted({r[1] for r in rows})
    fig, ax = plt.subplots(figsize=(7, 4))
    width = min(0.3, 0.8 / len(runs))
    for r, run in enumerate(runs):
        for k, key in enumerate(keys):
            v = run["summary"].get("before_after", {}).get(key)
            if not v:
                continue
            change = 100 * (v["ratio"] - 1)
            x = k + (r - (len(runs) - 1) / 2) * width
            ax.bar(x, change, width, color=f"C{r}", label=(run["name"] if len(runs) > 1 else "fine-tuned")
                   if k == 0 else None)
            ax.annotate(f"{v['before']:.4g} -> {v['after']:.4g}\n{change:+.2f}%", (x, change), fontsize=7,
                        ha="center", va="bottom" if change >= 0 else "top")
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xticks(range(len(keys)), keys, fontsize=8)
    ax.set_xlim(-0.75, len(keys) - 0.25)
    ax.set(ylabel="change vs the base model (%)",
           title="General text, fine-tuned vs base model\n(loss / perplexity: below 0 is better)")
    ax.margins(y=0.3)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    return render.save(fig, out / "retention.png")


def plot_continual(continual: dict, out: Path) -> str:
    plt = render.pyplot()
    tasks, matrix = continual["tasks"], continual["R"]
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(tasks), 1.4 + 0.9 * len(tasks)))
    shown = [[float("nan") if v is None else v for v in row] for row in matrix]
    ax.imshow(shown, cmap="viridis", vmin=0, vmax=1)
    ax.set(xticks=range(len(tasks)), yticks=range(len(tasks)), xticklabels=tasks,
           yticklabels=[f"after {t}" for t in tasks], xlabel="scored on task", title="Continual R[i][j]")
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            ax.text(j, i, "-" if v is None else f"{v:.3f}", ha="center", va="center", color="white")
    return render.save(fig, out / "continual.png")


# ------------------------------------------------------------------ text

def _seconds(v) -> str:
    return "-" if v is None else f"{v:,.1f}"


def _label_runs(runs: list[dict]) -> None:
    """Give runs with the same folder name labels that tell them apart: as many trailing path
    parts as needed (`a/quickstart`, `b/quickstart`)."""
    for depth in range(1, 1 + max(len(r["dir"].resolve().parts) for r in runs)):
        labels = ["/".join(r["dir"].resolve().parts[-depth:]) for r in runs]
        if len(set(labels)) == len(labels) or depth == 1 and len({r["name"] for r in runs}) == len(runs):
            for r, label in zip(runs, labels):
                r["name"] = label
            return


def sections(runs: list[dict], images: dict[str, list[str]]) -> list[tuple[str, list[str], list[list[str]], list[str]]]:
    """(title, table header, table rows, images) per section; rendered as Markdown and HTML."""
    parts = [_run_section(runs), _test_section(runs, images), _before_after_section(runs, images),
             _sources_section(runs, images), _budget_section(runs), *_continual_sections(runs, images)]
    return [p for p in parts if p is not None]


def _budget_section(runs: list[dict]):
    rows = []
    for run in runs:
        trace = budget_trace(run["events"])
        if trace:
            changes = [e["change"] for e in trace[1:]] or [0.0]
            witness = trace[-1].get("witness_change")
            rows.append([run["name"], f"{100 * trace[0]['max_change']:+.1f}%", render.fmt(trace[0]["base"]),
                         f"{100 * changes[-1]:+.2f}%", f"{100 * trace[-1].get('margin', 0.0):.2f} points",
                         f"{100 * witness:+.2f}%" if witness is not None else "-", f"{100 * max(changes):+.2f}%",
                         render.fmt(trace[-1]["share"]), str(len(trace)), _seconds(sum(e["seconds"] for e in trace))])
    if not rows:
        return None
    return ("Retention budget (measured on dev text during training)",
            ["run", "budget", "base loss", "last change", "last margin", "witness's last change", "largest change",
             "last share", "measurements", "measuring time"], rows, [])


def _run_section(runs: list[dict]):
    header = ["run", "steps", "best metric", "best value", "best step", "train s", "tokens/s", "trainable params"]
    rows = []
    for run in runs:
        s = run["summary"]
        if not s:
            continue
        best = s.get("best", {})
        params = s.get("parameters", {})
        rows.append(
            [
                run["name"],
                render.fmt(s.get("steps"), "steps"),
                render.fmt(best.get("metric")),
                render.fmt(best.get("value")),
                render.fmt(best.get("step"), "steps"),
                _seconds(s.get("train_seconds")),
                _seconds(s.get("tokens_per_s")),
                f"{params['trainable']:,} / {params['total']:,}" if params else "-",
            ]
        )
    return ("Run", header, rows, []) if rows else None


def _test_section(runs: list[dict], images: dict):
    """Test metrics, runs side by side, with each run's difference from the first (metrics only:
    counts such as sentences or truncated words stay in summary.json)."""
    keys = sorted({(src, m) for run in runs for src, m, _ in test_rows(run["summary"]) if m not in COUNTS})
    if not keys:
        return None
    values = {run["name"]: {(src, m): v for src, m, v in test_rows(run["summary"])} for run in runs}
    first, others = runs[0]["name"], [r["name"] for r in runs[1:]]

    def diff(src, m, name):
        a, b = values[first].get((src, m)), values[name].get((src, m))
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b)):
            return "-"
        d = b - a
        return f"{int(d):+,}" if m in COUNTS and float(d).is_integer() else f"{d:+.4f}"

    return ("Test metrics", ["source", "metric", *[r["name"] for r in runs], *[f"{n} - {first}" for n in others]],
            [[src, m, *[render.fmt(values[r["name"]].get((src, m), "-"), m) for r in runs],
              *[diff(src, m, name) for name in others]] for src, m in keys],
            images.get("test", []))


def _before_after_section(runs: list[dict], images: dict):
    rows = []
    for run in runs:
        for key, v in run["summary"].get("before_after", {}).items():
            rows.append([run["name"], key, render.fmt(v["before"]), render.fmt(v["after"]), render.fmt(v["ratio"]),
                         f"{100 * (v['ratio'] - 1):+.2f}%"])
    if not rows:
        return None
    note = [r["summary"]["retention_note"] for r in runs if r["summary"].get("retention_note")]
    return ("Before vs after (base model vs fine-tuned)" + (": " + note[0] if note else ""),
            ["run", "set/metric", "before", "after", "after/before", "change"], rows, images.get("retention", []))


def _sources_section(runs: list[dict], images: dict):
    rows = []
    for run in runs:
        curves = loss_curves(run["events"])
        shares = share_curves(run["events"])
        for name, counts in run["summary"].get("sources", {}).items():
            last_share = shares.get(name, [(0, float("nan"), float("nan"))])[-1]
            last_loss = curves.get(name, [(0, None)])[-1][1]
            rows.append([run["name"], name, render.fmt(counts.get("batches"), "batches"),
                         render.fmt(counts.get("examples"), "examples"), render.fmt(counts.get("tokens"), "tokens"),
                         render.fmt(last_share[1]), render.fmt(last_share[2]),
                         render.fmt(last_loss) if last_loss is not None else "-"])
    if not rows:
        return None
    return ("Sources during training", ["run", "source", "batches", "examples", "tokens", "realised share",
                                        "target share (last)", "last logged loss"], rows, images.get("training", []))


def _continual_sections(runs: list[dict], images: dict) -> list:
    out = []
    for run in runs:
        c = run["continual"]
        if c:
            rows = [[f"after {c['tasks'][i]}", *["-" if v is None else render.fmt(v) for v in row]]
                    for i, row in enumerate(c["R"])]
            rows += [["average (last row)", render.fmt(c["average"])], ["backward transfer", render.fmt(c["bwt"])],
                     ["forward transfer", render.fmt(c["fwt"]) if c.get("fwt") is not None else "-"]]
            out.append((f"Continual: {run['name']} ({c['metric_note']})", ["R[i][j]", *c["tasks"]], rows,
                        images.get("continual", [])))
    return out


def write_report(run_dirs: list[Path], out: Path | None = None) -> Path:
    """Write report.md, report.html and the PNG plots; returns the folder."""
    runs = [read_run(Path(d)) for d in run_dirs]
    if out is None:  # one run: its report/ folder; several: a comparison folder beside the first
        out = runs[0]["dir"] / "report" if len(runs) == 1 else \
            runs[0]["dir"].parent / ("compare-" + "-".join(r["dir"].name for r in runs))[:120]
    out.mkdir(parents=True, exist_ok=True)
    images: dict[str, list[str]] = {"training": [], "test": [], "retention": [], "continual": []}
    for name in (plot_losses(runs, out), plot_dev(runs, out)):
        if name:
            images["training"].append(name)
    if len(runs) == 1:
        shares = plot_shares(runs[0], out)
        if shares:
            images["training"].insert(1, shares)
        budget = plot_budget(runs[0], out)
        if budget:
            images["training"].append(budget)
        images["test"] = plot_test_details(runs[0], out)
    retention = plot_retention(runs, out)
    if retention:
        images["retention"].append(retention)
    for run in runs:
        if run["continual"]:
            images["continual"].append(plot_continual(run["continual"], out))
    title = f"routetune report: {runs[0]['name']}" if len(runs) == 1 else \
        "routetune comparison: " + ", ".join(r["name"] for r in runs)
    parts = sections(runs, images)
    (out / "report.md").write_text(render.markdown(title, parts), encoding="utf-8")
    (out / "report.html").write_text(render.html_page(title, parts), encoding="utf-8")
    return out


def compare_table(run_dirs: list[Path]) -> str:
    """The Markdown table of `routetune compare`: test metrics and before/after, runs side by side."""
    runs = [read_run(Path(d)) for d in run_dirs]
    _label_runs(runs)
    parts = [p for p in sections(runs, {}) if p[0].startswith(("Test", "Before", "Run"))]
    return render.markdown("comparison", parts)
