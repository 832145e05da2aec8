"""`routetune eval`, `predict`, `generate`, `export` and `serve`: the commands that use a finished run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from routetune.cli.app import _LIMITS, _device_option, _precision_option, app
from routetune.errors import RoutetuneError
from routetune.run_paths import check_run_folder
from routetune.serve.access import check_exposure
from routetune.serve.limits import Limits


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
    from routetune.api import load
    from routetune.evaluate.tasks import format_scores

    scores = load(run, checkpoint, device, precision).evaluate(split)  # the Python API's path
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
    """Predict (plain lines or JSONL in, JSONL out, one output line per input line; a JSONL "id" is
    kept): entity tags and spans, a label with probabilities, or - for a language-model run on a
    decoder - greedy generations of prompts. Batched and length-sorted, like evaluation."""
    if fmt not in ("auto", "lines", "jsonl"):
        raise typer.BadParameter("expected auto, lines or jsonl", param_hint="--format")
    check_run_folder(run)  # before anything heavy loads
    from routetune.api import load
    from routetune.cli.lines import generate_file, read_items, write_jsonl
    from routetune.serve.predictor import parse_line

    loaded = load(run, checkpoint, device, precision)  # the Python API's Run: one path for both
    cfg, model = loaded.config, loaded.model
    head = source or cfg.train.primary
    if head not in model.heads and model.is_decoder and (source is None or source in cfg.sources):
        generate_file(loaded, input_file, max_new_tokens, output)
        return
    predictor = loaded.predictor(head)
    items = read_items(input_file, lambda line, where, n: parse_line(line, fmt, where, n))
    results = iter(predictor.predict([it for it in items if it is not None]))
    # one output line per input line, blank ones included, so outputs join back to inputs by line
    write_jsonl(output, (next(results) if it is not None else predictor.empty() for it in items))


@app.command("generate")
def generate_cmd(
    run: Path = typer.Argument(..., metavar="RUN", help="Run folder (decoder backbone)"),
    input_file: Optional[Path] = typer.Argument(
        None, metavar="INPUT_FILE", help='Prompts: plain lines or JSONL {"prompt": ...}; default: stdin'
    ),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1, help="Tokens to generate per prompt"),
    checkpoint: str = typer.Option("best", "--checkpoint", help="best, last, or a checkpoint folder name"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write JSONL here instead of stdout"),
    device: Optional[str] = _device_option(),
    precision: Optional[str] = _precision_option(),
) -> None:
    """Greedy generation for new prompts with a fine-tuned decoder; writes JSONL {prompt, completion}."""
    check_run_folder(run)  # before anything heavy loads
    from routetune.api import load
    from routetune.cli.lines import generate_file

    loaded = load(run, checkpoint, device, precision)  # the Python API's Run: one path for both
    if not loaded.model.is_decoder:
        raise RoutetuneError(f"{run}: generate needs a decoder backbone; this run's is an encoder")
    generate_file(loaded, input_file, max_new_tokens, output)


@app.command("export")
def export_cmd(
    run: Path = typer.Argument(..., metavar="RUN", help="Run folder"),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write"),
    merge: bool = typer.Option(False, "--merge", help="Merge adapters into the weights (plain transformers folders)"),
    checkpoint: str = typer.Option("best", "--checkpoint", help="best, last, or a checkpoint folder name"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output folder"),
) -> None:
    """Export standard Hugging Face / PEFT folders: the LM, the adapter, and each task head as a transformers task
    model."""
    check_run_folder(run)  # before anything heavy loads
    from routetune.export import export

    for folder in export(run, out, checkpoint, merge, overwrite):
        typer.echo(folder)


RUNS_HELP = ("Run folder; more runs that trained peft adapters on the same base are served beside it, each by its "
             "folder name (the OpenAI endpoints' model)")


@app.command("serve")
def serve_cmd(
    runs: list[Path] = typer.Argument(..., metavar="RUN [RUN...]", help=RUNS_HELP),
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
                                       help="Largest max_new_tokens (OpenAI: max_tokens) a request may ask for"),
) -> None:
    """Serve runs over HTTP (FastAPI + uvicorn): /v1/ner, /v1/classify, /v1/generate, and for decoders the OpenAI
    API (/v1/models, /v1/chat/completions, /v1/completions); /healthz, /metrics, /docs."""
    [check_run_folder(run) for run in runs]  # before FastAPI and torch load
    check_exposure(host, api_key, allow_unauthenticated)
    from routetune.serve.server import serve_run

    limits = Limits(max_body_bytes=max_body_bytes, max_items=max_items, max_tokens=max_tokens, max_chars=max_chars,
                    truncate=truncate, max_concurrency=max_concurrency, max_connections=max_connections,
                    body_timeout_s=body_timeout_s, timeout_s=timeout_s, max_batch=max_batch,
                    max_batch_tokens=max_batch_tokens, max_wait_ms=max_wait_ms, max_new_tokens=max_new_tokens,
                    header_timeout_s=header_timeout_s)
    serve_run(runs, host, port, checkpoint, limits, precision, device=device, api_key=api_key,
              allow_unauthenticated=allow_unauthenticated, docs=docs, metrics=metrics, ssl_certfile=ssl_certfile,
              ssl_keyfile=ssl_keyfile, require_signed=require_signed)

