"""`routetune report` and `compare`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from routetune.cli.app import app
from routetune.errors import RunError
from routetune.run_paths import check_run_folder


@app.command("report")
def report_cmd(
    runs: list[Path] = typer.Argument(
        ..., metavar="RUNS", help="One run folder, or several to compare, or a study folder"
    ),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", help="Output folder (default: RUN/report; required for several runs)"
    ),
    as_json: bool = typer.Option(False, "--json", help="A study: print its trials, front and importances as JSON"),
) -> None:
    """Write report.md and report.html with PNG plots: losses per source, realised vs target shares, dev metric with the
    early-stopping point, per-type F1 or confusion, before vs after, continual matrix; for a study folder the trials,
    the Pareto front, the importances."""
    for run in runs:
        check_run_folder(run)  # before anything heavy loads
    from routetune.reports.run import write_report

    if len(runs) == 1 and (runs[0] / "sweep.json").is_file():
        from routetune.reports.study import study_json, write_study_report

        if as_json:
            typer.echo(json.dumps(study_json(runs[0]), indent=2))
        else:
            typer.echo(str(write_study_report(runs[0], out) / "report.html"))
        return
    if as_json:
        raise RunError(f"--json: {runs[0]} is not a study folder (runs have summary.json)")

    folder = write_report(runs, out)
    typer.echo(str(folder / "report.html"))


@app.command("compare")
def compare_cmd(runs: list[Path] = typer.Argument(..., metavar="RUNS", help="Run folders to put side by side")) -> None:
    """Print a Markdown table: test metrics and before/after of each run, side by side."""
    for run in runs:
        check_run_folder(run)  # before anything heavy loads
    from routetune.reports.run import compare_table

    typer.echo(compare_table(runs))

