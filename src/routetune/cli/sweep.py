"""`routetune sweep`: search settings on dev data, confirm the chosen ones on test with seeds, fit
a mixing law. The study code (optuna, torch) loads only once the command runs."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from routetune.errors import RunError


def sweep_cmd(
    sweep: Path = typer.Argument(..., metavar="SWEEP", help="Sweep file: base config, search space, objectives, "
                                 "budget (docs/sweep.md)"),
    resume: bool = typer.Option(False, "--resume", help="Continue the study after a stop, or join it as a second "
                                "worker (same storage)"),
    confirm: Optional[int] = typer.Option(None, "--confirm", metavar="K", help="Train the chosen settings, the base "
                                          "and the baselines with K fresh seeds; test scores with 95% intervals"),
    law: Optional[str] = typer.Option(None, "--law", metavar="KEY", help="Fit a mixing law over this key of the "
                                      "space (e.g. routing.weights.general) and check its prediction with a run"),
    budget: float = typer.Option(0.0, "--budget", help="With --law: the dev retention change allowed (0.01 = 1%)"),
    where: Optional[list[str]] = typer.Option(None, "--where", metavar="KEY=VALUE", help="With --law: fit over the "
                                              "trials with this setting only (repeatable; e.g. "
                                              "sources.general.distill=1.0)"),
    trials: Optional[int] = typer.Option(None, "--trials", min=1, metavar="N", help="The search's budget, instead "
                                         "of the sweep file's `trials` (e.g. 3 for a quick check)"),
    set_: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help="A fixed override for every trial, added "
                                   "to the sweep file's `set:` (repeatable; e.g. --set train.max_steps=20)"),
) -> None:
    """Search hyperparameters and the data mixture with optuna: every trial is a run folder scored on
    dev data (task metric, general-text retention); the study resumes after any stop."""
    if where and law is None:
        raise RunError("--where: it chooses the trials a mixing law is fitted on; give it with --law KEY")
    if (trials is not None or set_) and (confirm is not None or law is not None):
        raise RunError("--trials and --set change the search; --confirm and --law read the study as it was run")
    if confirm is not None:
        from routetune.sweep.confirm import confirm as run_confirm, table

        typer.echo(table(run_confirm(sweep, confirm)))
        return
    if law is not None:
        from routetune.sweep.law import law as run_law, parse_where

        r = run_law(sweep, law, budget, parse_where(where or []))
        p, m = r["predicted"], r["measured"]
        typer.echo(f"mixing law over {law}: predicted {law}={p['x']:.4f} -> task {p['task']:.4f}, retention "
                   f"{p['retention']:+.4f}; measured task {m['task']:.4f}, retention {m['retention']:+.4f} "
                   f"({m['run']})")
        return
    from routetune.config import load_config
    from routetune.data.paths import check_inputs
    from routetune.sweep.config import base_of, load_sweep

    base, sets = base_of(sweep, load_sweep(sweep, trials, set_))
    check_inputs(load_config(base, sets))  # the base config, its data and model: before torch and optuna load
    from routetune.sweep.confirm import chosen_trials
    from routetune.sweep.run import optimize

    st = optimize(sweep, resume=resume, trials=trials, sets=set_)
    kinds = [o.kind for o in st.cfg.objectives]
    try:
        for t in chosen_trials(st):
            values = ", ".join(f"{k} {v:.4f}" for k, v in zip(kinds, t.values))
            typer.echo(f"{'best' if len(kinds) == 1 else 'front'}: trial {t.number} ({values}): "
                       + ", ".join(f"{k}={v}" for k, v in t.user_attrs["setting"].items()))
    except RunError as exc:  # no feasible trial yet: the study itself is fine
        typer.echo(str(exc))
    typer.echo(f"study folder: {st.folder}  (routetune report {st.folder})")
