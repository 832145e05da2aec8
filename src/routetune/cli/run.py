"""`routetune train`, `validate`, `resume` and `continual`: the commands that train."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer

from routetune.cli.app import DEVICE_HELP, NPROC_HELP, _device_option, _precision_option, app
from routetune.data.paths import check_inputs
from routetune.run_paths import check_new_run_folder, check_run_folder


@app.command("train")
def train_cmd(
    config: Path = typer.Argument(..., metavar="CONFIG", help="YAML run config"),
    set_: list[str] = typer.Option([], "--set", help="Override a key: --set train.lr=3e-5 (repeatable)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run folder of the same name"),
    test: bool = typer.Option(True, "--test/--no-test", help="Evaluate the test sets at the end"),
    resume: bool = typer.Option(
        False, "--resume", help="Continue the run folder named by run.name from its newest checkpoint"
    ),
    allow_new_labels: bool = typer.Option(
        False, "--allow-new-labels", help="With model.init_from: add labels the earlier heads lack"
    ),
    nproc: int = typer.Option(1, "--nproc", min=1, help=NPROC_HELP),
    retention: bool = typer.Option(
        True,
        "--retention/--no-retention",
        help="Score general text before and after training (the config's `evals`); "
        "--no-retention skips it, with its masked-LM head fits (a quick check; a retention budget still measures)",
    ),
) -> None:
    """Train a config into a new run folder (or continue one with --resume)."""
    from routetune.config import load_config

    if allow_new_labels:
        set_ = [*set_, "model.allow_new_labels=true"]
    if not retention:
        set_ = [*set_, "retention.score=false"]
    cfg = load_config(config, set_)  # a config mistake is reported before torch and transformers load (seconds)
    check_inputs(cfg)  # so are a missing data file and an unknown model
    if cfg.run.name is not None and not resume and "WORLD_SIZE" not in os.environ:  # so is a run folder that
        check_new_run_folder(Path(cfg.run.output_dir) / cfg.run.name, overwrite)  # may not be used (once, not per rank)
    _launch_processes(nproc)
    from routetune.workflow import train_loaded

    run_dir, summary = train_loaded(cfg, config.stem, overwrite=overwrite, run_test=test, resume=resume)
    _print_summary(run_dir, summary)


@app.command("validate")
def validate_cmd(
    config: Path = typer.Argument(..., metavar="CONFIG", help="YAML run config"),
    set_: list[str] = typer.Option([], "--set", help="Override a key: --set train.lr=3e-5 (repeatable)"),
) -> None:
    """Check a config and all its data (every file read and checked, the model and tokenizer
    loaded, the plan counted) without training or writing anything."""
    from routetune.config import load_config

    cfg = load_config(config, set_)
    check_inputs(cfg)
    from routetune.training.setup import prepare

    setup = prepare(cfg)
    typer.echo(f"{config}: valid; {setup.total_steps} steps of batch {cfg.train.batch_size}, sources "
               + ", ".join(f"{r['source']} ({r['size'] if r['size'] is not None else 'stream'})"
                           for r in setup.source_table))


@app.command("resume")
def resume_cmd(
    run: Path = typer.Argument(..., metavar="RUN", help="Run folder"),
    test: bool = typer.Option(True, "--test/--no-test", help="Evaluate the test sets at the end"),
    device: Optional[str] = _device_option(f"Continue on another device: {DEVICE_HELP} (default: the run's "
                                           "train.device)"),
    precision: Optional[str] = _precision_option("Continue in another precision (default: the run's "
                                                 "train.precision)"),
    nproc: int = typer.Option(1, "--nproc", min=1, help=NPROC_HELP),
) -> None:
    """Continue an interrupted run exactly from its newest complete checkpoint."""
    check_run_folder(run)  # before anything heavy loads
    _launch_processes(nproc)
    from routetune.workflow import resume_run

    run_dir, summary = resume_run(run, run_test=test, device=device, precision=precision)
    _print_summary(run_dir, summary)


def _launch_processes(nproc: int) -> None:
    """`--nproc N` (N > 1): this command again under torchrun on this machine, N processes (the
    process is replaced). CPU threads are shared out among them unless OMP_NUM_THREADS is set."""
    if nproc <= 1 or "WORLD_SIZE" in os.environ:
        return
    argv, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            argv.append(arg)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "routetune.cli", *argv]
    sys.stdout.flush()
    os.execvpe(sys.executable, cmd, env)


def _print_summary(run_dir: Path, summary: dict) -> None:
    if os.environ.get("RANK", "0") != "0":  # data-parallel: rank 0 reports
        return
    from routetune.evaluate.tasks import format_scores

    for name, scores in summary.get("test", {}).items():
        typer.echo(format_scores(name, "test", scores))
    changes = summary.get("before_after", {})
    if changes:
        typer.echo("general text, base model -> fine-tuned (lower is better):")
        for key, v in changes.items():
            change = f"  ({v['ratio'] - 1:+.1%})" if v.get("ratio") is not None else ""
            typer.echo(f"  {key:<32} {v['before']:.4f} -> {v['after']:.4f}{change}")
    best = summary["best"]
    if best["value"] is not None:
        typer.echo(f"best dev {best['metric']} = {best['value']:.4f} at step {best['step']}")
    typer.echo(f"run folder: {run_dir}")


@app.command("continual")
def continual_cmd(
    config: Path = typer.Argument(..., metavar="CONFIG", help="Continual config: a sequence of task run configs"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing stage run folders"),
    nproc: int = typer.Option(1, "--nproc", min=1, help=NPROC_HELP),
) -> None:
    """Train tasks one after another on one backbone (each from the previous stage, optional replay); print and write
    the matrix R[i][j], average score, backward and forward transfer."""
    _launch_processes(nproc)
    from routetune.continual import format_matrix, run_continual

    result = run_continual(config, overwrite)
    if os.environ.get("RANK", "0") == "0":
        typer.echo(format_matrix(result))

