"""Every subcommand once, successfully, in a fresh interpreter, as a user runs it.

The rest of the suite forks command-line children from a process that has torch, transformers,
peft and sklearn imported (tests/support/forkserver.py): fast, but a state no user has (code that checks
`sys.modules`, or reads an environment variable at import, takes other branches there). These
tests start `python -m routetune` anew for each command, with only the environment a user has.
Marked `fresh`: `make test-fresh` (and CI) run them; `make test` leaves them out for speed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
import yaml

from support import make_config

pytestmark = pytest.mark.fresh


def fresh(*args, cwd=None, input_text: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m routetune ARGS` in a new interpreter; must succeed."""
    env = {k: v for k, v in os.environ.items() if k != "ROUTETUNE_FAULT"}
    proc = subprocess.run([sys.executable, "-m", "routetune", *map(str, args)], capture_output=True, text=True,
                          input=input_text, env=env, cwd=cwd, timeout=timeout)
    assert proc.returncode == 0, f"routetune {args[0]}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    from support import write_task_and_general

    tmp = tmp_path_factory.mktemp("fresh")
    files = write_task_and_general(tmp)
    config = make_config(tmp, tiny_model_dir, files, **{"train.max_steps": 6, "train.eval_every_steps": 3})
    fresh("train", config)
    return tmp, config, tmp / "runs" / "tiny"


def test_encoder_commands(trained):
    tmp, config, run = trained
    assert json.loads((run / "summary.json").read_text())["steps"] == 6
    assert "valid" in fresh("validate", config).stdout.lower() + fresh("validate", config).stderr.lower()
    scores = json.loads(fresh("eval", run, "--split", "test", "--json").stdout)["scores"]
    assert "ner" in scores
    line = json.loads(fresh("predict", run, input_text="john opened a store in paris\n").stdout.splitlines()[0])
    assert len(line["tags"]) == 6
    fresh("export", run, "--out", tmp / "hf")
    assert (tmp / "hf" / "routetune-export.json").is_file()
    fresh("report", run)
    assert (run / "report" / "report.html").is_file()
    assert "ner" in fresh("compare", run, run).stdout
    assert "nothing to resume" in fresh("resume", run).stderr


def test_serve_in_a_fresh_interpreter(trained):
    _, _, run = trained
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "routetune", "serve", str(run), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)
                break
            except OSError:
                assert proc.poll() is None, proc.stdout.read()[-2000:]
                time.sleep(0.5)
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/ner", headers={"content-type": "application/json"},
                                     data=json.dumps({"texts": ["john opened a store in paris"]}).encode())
        answer = json.loads(urllib.request.urlopen(req, timeout=30).read())
        assert len(answer["results"][0]["tags"]) == 6
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert proc.returncode == 143  # SIGTERM: in-flight requests drained, "terminated", 128 + 15


def test_decoder_train_and_generate(tmp_path, tiny_llama_dir):
    text = tmp_path / "text.txt"
    text.write_text("to be or not to be that is the question . " * 40)
    cfg = {"model": {"name": str(tiny_llama_dir), "max_length": 24},
           "sources": {"lm": {"objective": "causal-lm", "train": str(text), "text": {"stream": False}}},
           "peft": {"method": "lora", "r": 4},
           "train": {"precision": "fp32", "device": "cpu", "max_steps": 4, "batch_size": 4, "progress": False},
           "run": {"name": "dec", "output_dir": str(tmp_path / "runs")}}
    path = tmp_path / "dec.yaml"
    path.write_text(yaml.safe_dump(cfg))
    fresh("train", path, "--no-test")
    out = fresh("generate", tmp_path / "runs" / "dec", "--max-new-tokens", "4", input_text="to be\n").stdout
    assert json.loads(out.splitlines()[0])["prompt"] == "to be"


def test_continual_sweep_data_and_version(tmp_path, tiny_model_dir, ner_files):
    tasks = []
    for name in ("ner", "ner2"):  # two tasks, each with a source of its own
        cfg = yaml.safe_load(
            make_config(tmp_path / name, tiny_model_dir, ner_files, **{"train.max_steps": 3}).read_text()
        )
        cfg["sources"] = {name: cfg["sources"]["ner"], "general": cfg["sources"]["general"]}
        cfg["routing"]["weights"] = {name: 0.75, "general": 0.25}
        cfg["train"]["early_stopping"]["metric"] = f"{name}/f1"
        (tmp_path / name / "task.yaml").write_text(yaml.safe_dump(cfg))
        tasks.append({"config": str(tmp_path / name / "task.yaml")})
    cont = tmp_path / "continual.yaml"
    cont.write_text(yaml.safe_dump({"name": "seq", "output_dir": "runs", "replay": 0.0, "tasks": tasks}))
    fresh("continual", cont)
    assert (tmp_path / "runs" / "seq" / "continual.json").is_file()
    base = make_config(tmp_path / "s", tiny_model_dir, ner_files, **{"train.max_steps": 3, "train.eval_every_steps": 3})
    sweep = tmp_path / "s" / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"base": base.name, "output_dir": str(tmp_path / "studies"), "name": "s",
                                     "trials": 2, "sampler": "random", "seed": 1, "objectives": [{"kind": "task"}],
                                     "space": {"train.lr": {"type": "float", "low": 1e-4, "high": 1e-3}}}))
    fresh("sweep", sweep)
    assert "wnut17" in fresh("data", "list").stdout
    assert fresh("--version").stdout.startswith("routetune ")
