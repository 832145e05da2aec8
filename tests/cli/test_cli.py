"""The command line behaves: every usage mistake is one line on stderr and exit status 2, a
config mistake is reported before the heavy libraries load, --version, python -m routetune."""

from __future__ import annotations

import subprocess
import sys
import time

from support import forkserver
import pytest

from support import cli_env, make_config, run_cli


@pytest.mark.parametrize("args, message", [
    (["trian"], "error: No such command 'trian'. Did you mean 'train'? (see: routetune --help)"),
    (["--bogus"], "error: No such option: --bogus"),
    (["eval"], "error: Missing argument 'RUN'. (see: routetune eval --help)"),
    (["eval", "runs/x", "--split", "foo"], "error: Invalid value for --split: expected dev, validation or test"),
    (["predict", "runs/x", "--format", "xml"], "error: Invalid value for --format: expected auto, lines or jsonl"),
    (["serve", "runs/x", "--port", "many"], "error: Invalid value for '--port': Input should be a valid integer"),
    (["eval", "runs/x", "--precision", "fp8"], "error: --precision: expected one of auto, fp32, bf16, fp16"),
    (["sweep", "s.yaml", "--where", "a=1"], "error: --where: it chooses the trials a mixing law is fitted on"),
], ids=["unknown-command", "unknown-option", "missing-argument", "bad-choice", "bad-format", "bad-integer",
        "bad-precision", "where-without-law"])
def test_usage_errors_are_one_line_and_exit_2(args, message):
    proc = run_cli(*args, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), proc.stderr
    assert "Traceback" not in proc.stderr


def test_no_arguments_shows_the_help_and_exit_2():
    proc = run_cli(check=False)
    assert proc.returncode == 2 and "Usage" in proc.stderr + proc.stdout and "Traceback" not in proc.stderr


def test_version_and_python_dash_m():
    proc = subprocess.run([sys.executable, "-m", "routetune", "--version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("routetune 0.") and "torch" in proc.stdout


def test_set_errors_name_the_override_not_the_file(tmp_path, tiny_model_dir, ner_files):
    path = make_config(tmp_path, tiny_model_dir, ner_files)
    proc = run_cli("train", str(path), "--set", "train.lrr=1", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: --set train.lrr=1: train.lrr: unknown key under train"
    proc = run_cli("train", str(path), "--set", "train.lr=fast", check=False)
    assert proc.stderr.strip() == "error: --set train.lr=fast: train.lr: expected a number, got 'fast'"


def _in_a_fresh_interpreter(*args):
    """`routetune ARGS` in a new interpreter; stdout: its exit status, whether torch and
    transformers were loaded by then, and whether transformers' progress bars are on after."""
    code = ("import sys; import routetune.cli as c; sys.argv = ['routetune', *%r]\n"
            "try:\n    c.main()\nexcept SystemExit as e:\n"
            "    print(e.code, 'torch' in sys.modules, 'transformers' in sys.modules)\n"
            "import transformers; print(transformers.utils.logging.is_progress_bar_enabled())") % (args,)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_a_config_mistake_is_reported_before_torch_loads(tmp_path, tiny_model_dir, ner_files):
    path = make_config(tmp_path, tiny_model_dir, ner_files, **{"train.lr": "fast"})
    proc = _in_a_fresh_interpreter("train", str(path))
    assert proc.stdout.split()[:2] == ["2", "False"], proc.stdout + proc.stderr
    assert "train.lr: expected a number" in proc.stderr


@pytest.mark.parametrize("args", [["eval", "runs/x", "--precision", "fp8"], ["resume", "runs/x", "--device", "gpu"],
                                  ["eval", "runs/x", "--split", "foo"], ["predict", "runs/x", "--format", "xml"]])
def test_a_misspelt_option_is_reported_before_torch_and_transformers_load(args):
    proc = _in_a_fresh_interpreter(*args)
    assert proc.stdout.split() == ["2", "False", "False", "False"], proc.stdout + proc.stderr  # bars off all the same
    assert proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("case", ["eval", "predict", "resume", "serve", "report", "compare", "generate", "export",
                                  "serve-open", "train-existing"])
def test_a_wrong_run_folder_is_reported_before_torch_and_transformers_load(tmp_path, tiny_model_dir, ner_files, case):
    """A run folder that is not there, a run folder that may not be replaced, a non-loopback host
    without a key: one line and exit 2 before torch and transformers load (measured: under a
    second of CPU, against 8 s for the import)."""
    nope = str(tmp_path / "runs" / "nope")
    args = {"serve-open": ["serve", str(tmp_path), "--host", "0.0.0.0"],
            "export": ["export", nope, "--out", str(tmp_path / "out")]}.get(case, [case, nope])
    if case == "train-existing":
        path = make_config(tmp_path, tiny_model_dir, ner_files)
        (tmp_path / "runs" / "tiny").mkdir(parents=True)
        (tmp_path / "runs" / "tiny" / "notes.txt").write_text("mine")
        args = ["train", str(path)]
    proc = _in_a_fresh_interpreter(*args)
    assert proc.stdout.split()[:3] == ["2", "False", "False"], proc.stdout + proc.stderr
    line = proc.stderr.strip()
    assert line.startswith("error: ") and len(line.splitlines()) == 1, line
    expected = {"serve-open": "needs an API key", "train-existing": "run folder exists and is not empty"}
    assert expected.get(case, "no such run folder") in line


@pytest.mark.parametrize("key,value,expected", [
    ("sources.ner.train", "nope.conll", "sources.ner.train: {tmp}/nope.conll: no such file, folder or matching glob"),
    ("sources.ner.dev", "data/*.nope", "sources.ner.dev: {tmp}/data/*.nope: no such file, folder or matching glob"),
    ("model.name", "minilm-l7", "unknown model 'minilm-l7': not an alias (minilm-l6, smollm2-135m)"),
    ("model.name", "./no-model", "{tmp}/no-model: model folder not found"),
    ("model.init_from", "{tmp}/runs/gone", "model.init_from: {tmp}/runs/gone: no such run folder"),
])
@pytest.mark.parametrize("command", ["train", "validate"])
def test_a_missing_data_path_or_model_is_reported_before_torch_loads(tmp_path, tiny_model_dir, ner_files, key,
                                                                     value, expected, command):
    path = make_config(tmp_path, tiny_model_dir, ner_files)
    value = value.format(tmp=tmp_path.resolve())
    proc = _in_a_fresh_interpreter(command, str(path), "--set", f"{key}={value}")
    assert proc.stdout.split()[:3] == ["2", "False", "False"], proc.stdout + proc.stderr
    line = proc.stderr.strip()
    assert line.startswith("error: ") and len(line.splitlines()) == 1, line
    assert expected.format(tmp=tmp_path.resolve()) in line, line


def test_unknown_checkpoint_lists_the_ones_there(tmp_path, tiny_model_dir, ner_files):
    from routetune.workflow import train

    run_dir, _ = train(make_config(tmp_path, tiny_model_dir, ner_files, **{"train.max_steps": 2}))
    for name in ("step-99999999", "../../elsewhere/checkpoints/best"):
        proc = run_cli("eval", str(run_dir), "--checkpoint", name, check=False)
        assert proc.returncode == 2
        line = proc.stderr.strip().splitlines()[-1]
        assert f"no checkpoint named {name!r} (this run has: last, best, step-00000001, step-00000002)" in line


def test_unknown_model_fails_in_seconds_naming_the_aliases(monkeypatch):
    from routetune import hub
    from routetune.errors import ModelError
    from routetune.model import load

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "reachable", lambda timeout=3.0: False)  # as on an offline machine
    t = time.perf_counter()
    with pytest.raises(ModelError, match=r"unknown model 'minilm-l12': not an alias \(minilm-l6, smollm2-135m\).*"
                                         r"cannot be reached"):
        load.resolve_model("minilm-l12")
    assert time.perf_counter() - t < 5
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match=r"HF_HUB_OFFLINE=1"):
        load.resolve_model("some-org/some-model")


def test_predict_input_that_is_not_unicode_is_one_line(tmp_path, tiny_model_dir, ner_files):
    from routetune.workflow import train

    run_dir, _ = train(make_config(tmp_path, tiny_model_dir, ner_files, **{"train.max_steps": 2}))
    proc = forkserver.run("routetune", ["predict", str(run_dir)], cli_env(),
                          input=b"John in \xff Paris\n", timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: <stdin>:1: invalid UTF-8")
    bad = tmp_path / "in.jsonl"
    bad.write_text('John in Paris\n\n{"text": "Apple \\ud800"}\n')
    proc = run_cli("predict", str(run_dir), str(bad), check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (f"error: {bad}:3: 'text': not valid Unicode: a lone surrogate "
                                                     "(U+D800) at character 6")


def test_predict_keeps_lines_and_ids(tmp_path, tiny_model_dir, ner_files):
    import json

    from routetune.workflow import train

    run_dir, _ = train(make_config(tmp_path, tiny_model_dir, ner_files, **{"train.max_steps": 2}))
    src = tmp_path / "in.jsonl"
    src.write_text(
        '{"id": "a-1", "text": "John in Paris"}\n\nApple in London\n{"id": 7, "tokens": ["John", "Smith"]}\n'
    )
    out = [json.loads(x) for x in run_cli("predict", str(run_dir), str(src)).stdout.splitlines()]
    assert len(out) == 4  # one answer per input line, the blank one included
    assert out[0]["id"] == "a-1" and out[0]["tokens"] == ["John", "in", "Paris"]
    assert out[1] == {"text": "", "tokens": [], "tags": [], "entities": []}
    assert "id" not in out[2] and out[2]["text"] == "Apple in London"
    assert out[3]["id"] == 7 and out[3]["tokens"] == ["John", "Smith"]


def test_train_log_holds_the_set_up_summary(tmp_path, tiny_model_dir, ner_files):
    path = make_config(tmp_path, tiny_model_dir, ner_files, **{"train.max_steps": 2})
    run_cli("train", str(path), "--no-test")
    log = (tmp_path / "runs" / "tiny" / "train.log").read_text()
    for line in ("device cpu, precision fp32", "source ner", "source general", "2 steps of batch 4"):
        assert line in log, line  # logged before the run folder existed, kept for train.log


def test_validate_checks_config_and_data_without_writing(tmp_path, tiny_model_dir, ner_files):
    path = make_config(tmp_path, tiny_model_dir, ner_files)
    proc = run_cli("validate", str(path))
    assert "valid;" in proc.stdout and "ner (24)" in proc.stdout and "general" in proc.stdout
    assert not (tmp_path / "runs").exists()
    ner_files["train"].write_text(ner_files["train"].read_text() + "broken line with three\n")
    proc = run_cli("validate", str(path), check=False)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert str(ner_files["train"]) in proc.stderr


def _stderr_on_a_terminal(*args) -> str:
    """Run `routetune ARGS` with stderr on a pseudo-terminal; what it drew there."""
    import os
    import pty

    import fcntl
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a new pty is 0 columns wide
    proc = forkserver.popen("routetune.cli", list(args), cli_env(), stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the terminal closed with the process
            break
        if not chunk:
            break
        out += chunk
    proc.wait(timeout=120)
    os.close(master)
    return out.decode("utf-8", "replace")


def test_evaluation_shows_progress_on_a_terminal_and_not_with_quiet(tmp_path, tiny_model_dir, ner_files):
    from routetune.workflow import train

    run_dir, _ = train(make_config(tmp_path, tiny_model_dir, ner_files, **{"train.max_steps": 2}))
    assert "tagging (ner)" in _stderr_on_a_terminal("eval", str(run_dir), "--split", "dev")
    assert "tagging (ner)" not in _stderr_on_a_terminal("--quiet", "eval", str(run_dir), "--split", "dev")
    assert "tagging (ner)" not in run_cli("eval", str(run_dir), "--split", "dev").stderr  # not a terminal


def test_train_prints_the_task_score_and_the_general_text_before_and_after(tmp_path, tiny_model_dir, ner_files):
    import json

    from support import make_config

    held = tmp_path / "held.txt"
    held.write_text("the store in paris opened a river of bread and salt . " * 30)
    cfg = make_config(tmp_path, tiny_model_dir, ner_files, **{"evals": {"held": {"path": str(held)}},
                                                              "train.epochs": 1})
    out = run_cli("train", str(cfg), "--test").stdout
    ba = json.loads((tmp_path / "runs" / "tiny" / "summary.json").read_text())["before_after"]["held/mlm_loss"]
    assert "micro avg" in out and "general text, base model -> fine-tuned (lower is better):" in out
    line = next(x for x in out.splitlines() if "held/mlm_loss" in x)
    assert line.split()[1:4] == [f"{ba['before']:.4f}", "->", f"{ba['after']:.4f}"]
    assert line.endswith(f"({ba['ratio'] - 1:+.1%})")


def test_third_party_info_lines_only_with_verbose(tmp_path, tiny_model_dir, ner_files, monkeypatch):
    """MLflow's and alembic's INFO lines are not the run's: quiet by default, shown with --verbose."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    path = make_config(tmp_path, tiny_model_dir, ner_files, **{"train.max_steps": 1, "train.report_to": "mlflow"})
    plain = run_cli("train", path, "--no-test").stderr
    assert "alembic" not in plain and "mlflow" not in plain.lower().replace("mlflow.db", ""), plain[-2000:]
    loud = run_cli("--verbose", "train", path, "--no-test", "--overwrite").stderr
    assert "alembic" in loud and "mlflow.store" in loud, loud[-2000:]


def test_sweep_checks_its_base_config_before_torch_loads(tmp_path, tiny_model_dir, ner_files):
    import yaml

    make_config(tmp_path, tiny_model_dir, ner_files)
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"base": "tiny.yaml", "name": "s", "objectives": [{"kind": "task"}],
                                     "trials": 2, "space": {"train.lr": {"type": "float", "low": 1e-4, "high": 1e-3}}}))
    proc = _in_a_fresh_interpreter("sweep", str(sweep), "--set", "sources.ner.train=nope.conll")
    assert proc.stdout.split()[:3] == ["2", "False", "False"], proc.stdout + proc.stderr
    assert proc.stderr.strip() == f"error: sources.ner.train: {tmp_path.resolve()}/nope.conll: no such file, folder " \
                                  "or matching glob", proc.stderr
