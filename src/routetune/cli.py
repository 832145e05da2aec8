"""Command line: one function per subcommand. How a command ends (exit statuses, the one-line
error of routetune's own types, Ctrl-C and SIGTERM) is in cli_exit.py."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from routetune.cli_data import data_app
from routetune.cli_exit import run_app
from routetune.cli_sweep import sweep_cmd
from routetune.data.paths import check_inputs
from routetune.run_paths import check_new_run_folder, check_run_folder
from routetune.serve.access import check_exposure
from routetune.errors import RoutetuneError, RunError
from routetune.logs import set_quiet, setup_logging
from routetune.serve.limits import Limits

_LIMITS = Limits()  # the serving defaults, defined once (serve/limits.py)

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Fine-tune pretrained language models with seeded routing of task and general data.")


DEVICE_HELP = "auto (a CUDA GPU when PyTorch sees one, else the CPU), cpu, cuda or cuda:N"
PRECISION_HELP = ("auto (bf16 where this device computes it natively, fp16 on GPUs without bf16, else fp32), "
                  "fp32, bf16 or fp16; chosen for this machine, not copied from the run")


NPROC_HELP = ("Data-parallel processes on this machine (one per GPU, or per CPU socket), started with torchrun; "
              "across machines use torchrun itself (docs/distributed.md)")


def _spelling(option: str):
    """A callback that checks how --device or --precision is spelled before anything heavy loads
    (what the value means on this machine is checked once torch is there)."""
    def check(value: Optional[str]) -> Optional[str]:
        if value is None:  # not given: nothing to check (and nothing to import)
            return None
        from routetune.config.schema import check_device, check_precision

        return (check_device if option == "--device" else check_precision)(value, option)
    return check


def _device_option(help_text: str = DEVICE_HELP):
    return typer.Option(None, "--device", help=help_text, callback=_spelling("--device"))


def _precision_option(help_text: str = PRECISION_HELP):
    return typer.Option(None, "--precision", help=help_text, callback=_spelling("--precision"))


def _version(value: bool) -> None:
    if value:
        import importlib.metadata

        from routetune import __version__

        try:
            import torch

            torch_line = f"torch {torch.__version__}"
        except ImportError:  # pragma: no cover
            torch_line = "torch not installed"
        typer.echo(f"routetune {__version__} ({torch_line}, transformers "
                   f"{importlib.metadata.version('transformers')})")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the versions of routetune, torch and transformers and exit"),
          quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars (when stderr is not a "
                                     "terminal, evaluation shows none anyway and the training bar "
                                     "updates every 30 s)"),
          verbose: bool = typer.Option(False, "--verbose", "-v", help="routetune's debug lines, and the INFO lines "
                                       "of the libraries it uses (transformers, MLflow, datasets, ...)")) -> None:
    """Fine-tune pretrained language models with seeded routing of task and general data."""
    set_quiet(quiet)
    if verbose:
        setup_logging(verbose=True)


@app.command("train")
def train_cmd(
    config: Path = typer.Argument(..., metavar="CONFIG", help="YAML run config"),
    set_: list[str] = typer.Option([], "--set", help="Override a key: --set train.lr=3e-5 (repeatable)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run folder of the same name"),
    test: bool = typer.Option(True, "--test/--no-test", help="Evaluate the test sets at the end"),
    resume: bool = typer.Option(False, "--resume", help="Continue the run folder named by run.name from its newest checkpoint"),
    allow_new_labels: bool = typer.Option(False, "--allow-new-labels",
                                          help="With model.init_from: add labels the earlier heads lack"),
    nproc: int = typer.Option(1, "--nproc", min=1, help=NPROC_HELP),
    retention: bool = typer.Option(True, "--retention/--no-retention",
                                   help="Score general text before and after training (the config's `evals`); "
                                        "--no-retention skips it, with its masked-LM head fits (a quick check)"),
) -> None:
    """Train a config into a new run folder (or continue one with --resume)."""
    from routetune.config import load_config

    if allow_new_labels:
        set_ = [*set_, "model.allow_new_labels=true"]
    if not retention:
        set_ = [*set_, "evals={}", "train.eval_before=false"]
    cfg = load_config(config, set_)  # a config mistake is reported before torch and transformers load (seconds)
    check_inputs(cfg)  # so are a missing data file and an unknown model
    if cfg.run.name is not None and not resume and "WORLD_SIZE" not in os.environ:  # so is a run folder that
        check_new_run_folder(Path(cfg.run.output_dir) / cfg.run.name, overwrite)  # may not be used (once, not per rank)
    _launch_processes(nproc)
    from routetune.workflow import train

    run_dir, summary = train(config, set_, overwrite=overwrite, run_test=test, resume=resume)
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


@app.command("eval")
def eval_cmd(
    run: Path = typer.Argument(..., metavar="RUN", help="Run folder"),
    split: str = typer.Option("test", "--split", help="dev (also called validation) or test"),
    checkpoint: str = typer.Option("best", "--checkpoint", help="best, last, or a checkpoint folder name"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of the report"),
    device: Optional[str] = _device_option(),
    precision: Optional[str] = _precision_option(),
) -> None:
    """Evaluate a run's checkpoint on the dev or test sets of its sources."""
    if split not in ("dev", "validation", "test"):
        raise typer.BadParameter("expected dev, validation or test", param_hint="--split")
    check_run_folder(run)  # before anything heavy loads
    from routetune.evaluate.tasks import format_scores
    from routetune.workflow import evaluate

    scores = evaluate(run, split, checkpoint, device=device, precision=precision)
    if as_json:
        typer.echo(json.dumps({"run": str(run), "split": split, "checkpoint": checkpoint, "scores": scores}))
        return
    for name, s in scores.items():
        typer.echo(format_scores(name, split, s))


@app.command("predict")
def predict_cmd(
    run: Path = typer.Argument(..., metavar="RUN", help="Run folder"),
    input_file: Optional[Path] = typer.Argument(None, metavar="INPUT_FILE", help="Input file; default: standard input"),
    fmt: str = typer.Option("auto", "--format", help="lines, jsonl, or auto (JSONL lines start with '{')"),
    source: Optional[str] = typer.Option(None, "--source", help="Task head to use (default: the primary)"),
    checkpoint: str = typer.Option("best", "--checkpoint", help="best, last, or a checkpoint folder name"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write JSONL here instead of stdout"),
    precision: Optional[str] = _precision_option(),
    device: Optional[str] = _device_option(),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1, help="Generation: tokens per prompt"),
) -> None:
    """Predict (plain lines or JSONL in, JSONL out, one output line per input line; a JSONL "id" is kept): entity tags and spans, a label with probabilities, or - for a
    language-model run on a decoder - greedy generations of prompts. Batched and length-sorted, like evaluation."""
    if fmt not in ("auto", "lines", "jsonl"):
        raise typer.BadParameter("expected auto, lines or jsonl", param_hint="--format")
    check_run_folder(run)  # before anything heavy loads
    from routetune.cli_io import generate_file, read_items, write_jsonl
    from routetune.runs import load_for_inference
    from routetune.serve.predictor import Predictor, parse_line

    cfg, model, tokenizer, hw = load_for_inference(run, checkpoint, device, precision)
    precision = hw.precision
    head = source or cfg.train.primary
    if head not in model.heads and model.is_decoder and (source is None or source in cfg.sources):
        generate_file(cfg, model, tokenizer, input_file, max_new_tokens, output, precision)
        return
    predictor = Predictor(model, tokenizer, head, cfg.model.max_length, cfg.train.eval_batch_size, precision)
    items = read_items(input_file, lambda line, where, n: parse_line(line, fmt, where, n))
    results = iter(predictor.predict([it for it in items if it is not None]))
    # one output line per input line, blank ones included, so outputs join back to inputs by line
    write_jsonl(output, (next(results) if it is not None else predictor.empty() for it in items))


@app.command("generate")
def generate_cmd(
    run: Path = typer.Argument(..., metavar="RUN", help="Run folder (decoder backbone)"),
    input_file: Optional[Path] = typer.Argument(None, metavar="INPUT_FILE", help="Prompts: plain lines or JSONL {\"prompt\": ...}; default: stdin"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1, help="Tokens to generate per prompt"),
    checkpoint: str = typer.Option("best", "--checkpoint", help="best, last, or a checkpoint folder name"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write JSONL here instead of stdout"),
    device: Optional[str] = _device_option(),
    precision: Optional[str] = _precision_option(),
) -> None:
    """Greedy generation for new prompts with a fine-tuned decoder; writes JSONL {prompt, completion}."""
    check_run_folder(run)  # before anything heavy loads
    from routetune.cli_io import generate_file
    from routetune.runs import load_for_inference

    cfg, model, tokenizer, hw = load_for_inference(run, checkpoint, device, precision)
    if not model.is_decoder:
        raise RoutetuneError(f"{run}: generate needs a decoder backbone; this run's is an encoder")
    generate_file(cfg, model, tokenizer, input_file, max_new_tokens, output, hw.precision)


@app.command("export")
def export_cmd(
    run: Path = typer.Argument(..., metavar="RUN", help="Run folder"),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write"),
    merge: bool = typer.Option(False, "--merge", help="Merge adapters into the weights (plain transformers folders)"),
    checkpoint: str = typer.Option("best", "--checkpoint", help="best, last, or a checkpoint folder name"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output folder"),
) -> None:
    """Export standard Hugging Face / PEFT folders: the LM, the adapter, and each task head as a transformers task model."""
    check_run_folder(run)  # before anything heavy loads
    from routetune.export import export

    for folder in export(run, out, checkpoint, merge, overwrite):
        typer.echo(folder)


@app.command("serve")
def serve_cmd(
    run: Path = typer.Argument(..., metavar="RUN", help="Run folder"),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind (default: loopback only)"),
    port: int = typer.Option(8080, "--port"),
    checkpoint: str = typer.Option("best", "--checkpoint", help="best, last, or a checkpoint folder name"),
    precision: Optional[str] = _precision_option(),
    device: Optional[str] = _device_option(),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="ROUTETUNE_API_KEY",
                                          help="Require 'Authorization: Bearer KEY' (all but /healthz); "
                                               "needed to bind a non-loopback host"),
    allow_unauthenticated: bool = typer.Option(False, "--allow-unauthenticated",
                                               help="Serve a non-loopback host without an API key (warns)"),
    docs: bool = typer.Option(True, "--docs/--no-docs", help="Serve /docs, /redoc and /openapi.json"),
    metrics: bool = typer.Option(True, "--metrics/--no-metrics", help="Serve /metrics (Prometheus)"),
    ssl_certfile: Optional[str] = typer.Option(None, "--ssl-certfile", help="TLS certificate (PEM): serve HTTPS"),
    ssl_keyfile: Optional[str] = typer.Option(None, "--ssl-keyfile", help="TLS private key (PEM)"),
    max_batch: int = typer.Option(_LIMITS.max_batch, "--max-batch", min=1, help="Items per micro-batch"),
    max_batch_tokens: int = typer.Option(_LIMITS.max_batch_tokens, "--max-batch-tokens", min=1,
                                         help="Tokens per micro-batch"),
    max_wait_ms: float = typer.Option(_LIMITS.max_wait_ms, "--max-wait-ms", min=0,
                                      help="Wait this long to fill a micro-batch"),
    max_body_bytes: int = typer.Option(_LIMITS.max_body_bytes, "--max-body-bytes", min=1,
                                       help="Larger bodies get 413"),
    body_timeout_s: float = typer.Option(_LIMITS.body_timeout_s, "--body-timeout", min=0.001,
                                         help="Seconds a request body may take to arrive (408)"),
    max_items: int = typer.Option(_LIMITS.max_items, "--max-items", min=1, help="Items per request (more: 422)"),
    max_chars: int = typer.Option(_LIMITS.max_chars, "--max-chars", min=1,
                                  help="Characters per item, checked before tokenising (more: 422)"),
    max_tokens: Optional[int] = typer.Option(_LIMITS.max_tokens, "--max-tokens", min=1,
                                             help="Tokens per item (default: model.max_length; more: 422)"),
    truncate: bool = typer.Option(_LIMITS.truncate, "--truncate",
                                  help="Cut long items to the limits and flag them instead of 422"),
    max_concurrency: int = typer.Option(_LIMITS.max_concurrency, "--max-concurrency", min=1,
                                        help="Requests served at once, once their body is in (more: 503)"),
    max_connections: int = typer.Option(_LIMITS.max_connections, "--max-connections", min=1,
                                        help="Open connections; past this the longest-idle one is closed"),
    header_timeout_s: float = typer.Option(_LIMITS.header_timeout_s, "--header-timeout", min=0.001,
                                           help="Seconds a connection may take to send a request's headers"),
    require_signed: bool = typer.Option(False, "--require-signed",
                                        help="Serve only a checkpoint signed with the key in "
                                             "ROUTETUNE_SIGNING_KEY (set it when training)"),
    timeout_s: float = typer.Option(_LIMITS.timeout_s, "--timeout", min=0.001,
                                    help="Seconds from a request's body to its response (504)"),
    max_new_tokens: int = typer.Option(_LIMITS.max_new_tokens, "--max-new-tokens", min=1,
                                       help="Largest max_new_tokens a request may ask for"),
) -> None:
    """Serve a run over HTTP (FastAPI + uvicorn): /v1/ner, /v1/classify, /v1/generate, /healthz, /metrics, /docs."""
    check_run_folder(run)  # before FastAPI and torch load
    check_exposure(host, api_key, allow_unauthenticated)
    from routetune.serve.server import serve_run

    limits = Limits(max_body_bytes=max_body_bytes, max_items=max_items, max_tokens=max_tokens, max_chars=max_chars,
                    truncate=truncate, max_concurrency=max_concurrency, max_connections=max_connections,
                    body_timeout_s=body_timeout_s, timeout_s=timeout_s, max_batch=max_batch,
                    max_batch_tokens=max_batch_tokens, max_wait_ms=max_wait_ms, max_new_tokens=max_new_tokens,
                    header_timeout_s=header_timeout_s)
    serve_run(run, host, port, checkpoint, limits, precision, device=device, api_key=api_key,
              allow_unauthenticated=allow_unauthenticated, docs=docs, metrics=metrics, ssl_certfile=ssl_certfile,
              ssl_keyfile=ssl_keyfile, require_signed=require_signed)


@app.command("continual")
def continual_cmd(
    config: Path = typer.Argument(..., metavar="CONFIG", help="Continual config: a sequence of task run configs"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing stage run folders"),
    nproc: int = typer.Option(1, "--nproc", min=1, help=NPROC_HELP),
) -> None:
    """Train tasks one after another on one backbone (each from the previous stage, optional replay); print and write the matrix R[i][j], average score, backward and forward transfer."""
    _launch_processes(nproc)
    from routetune.continual import format_matrix, run_continual

    result = run_continual(config, overwrite)
    if os.environ.get("RANK", "0") == "0":
        typer.echo(format_matrix(result))


@app.command("report")
def report_cmd(
    runs: list[Path] = typer.Argument(..., metavar="RUNS", help="One run folder, or several to compare, or a study folder"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (default: RUN/report; required for several runs)"),
    as_json: bool = typer.Option(False, "--json", help="A study: print its trials, front and importances as JSON"),
) -> None:
    """Write report.md and report.html with PNG plots: losses per source, realised vs target shares, dev metric with the early-stopping point, per-type F1 or confusion, before vs after, continual matrix; for a study folder the trials, the Pareto front, the importances."""
    for run in runs:
        check_run_folder(run)  # before anything heavy loads
    from routetune.report import write_report

    if len(runs) == 1 and (runs[0] / "sweep.json").is_file():
        from routetune.report_study import study_json, write_study_report

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
    from routetune.report import compare_table

    typer.echo(compare_table(runs))


app.command("sweep")(sweep_cmd)  # listed after the run commands; defined in cli_sweep.py
app.add_typer(data_app, name="data")


def main() -> None:
    setup_logging()
    run_app(app)


if __name__ == "__main__":
    main()
