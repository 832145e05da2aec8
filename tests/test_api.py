"""The Python API as a notebook uses it (a fresh interpreter, cell after cell), user callbacks,
and the experiment trackers read back with their own libraries."""

import json
import subprocess
import sys
import textwrap

import pytest
import yaml
from support import make_config


def test_the_python_api_from_a_fresh_interpreter(tmp_path, tiny_model_dir, ner_files):
    cfg = yaml.safe_load(make_config(tmp_path, tiny_model_dir, ner_files).read_text())
    cfg["run"]["name"] = None
    notebook = textwrap.dedent(f"""
        import json, sys
        import routetune
        assert "torch" not in sys.modules, "import routetune loads torch"

        events = []
        config = {cfg!r}
        run = routetune.train(config, run__name="nb", train__epochs=1, train__lr=2e-3,
                              callbacks=[events.append])
        kinds = [e["event"] for e in events]
        assert kinds[0] == "start" and "train" in kinds and "eval" in kinds, kinds
        assert run.summary["steps"] == run.summary["planned_steps"]
        assert run.dir.name == "nb" and run.config.train.lr == 2e-3

        again = routetune.load(run.dir)
        out = again.predict(["john opened the apple store in paris", ["the", "apple", "store"]])
        assert [len(o["tags"]) for o in out] == [7, 3], out
        dev = again.evaluate("dev")
        assert set(dev) == {{"ner"}} and 0 <= dev["ner"]["f1"] <= 1
        assert again.evaluate()["ner"]["f1"] == run.summary["test"]["ner"]["f1"]
        written = again.export("{tmp_path / 'exported'}")
        print(json.dumps({{"written": written, "repr": repr(again)}}))
    """)
    proc = subprocess.run([sys.executable, "-c", notebook], capture_output=True, text=True, cwd=tmp_path,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert any(w.endswith("heads/ner") for w in result["written"])
    assert "INFO run folder" in proc.stderr  # log lines reach the notebook
    assert "Loading weights" not in proc.stderr  # transformers' own bars stay quiet
    assert (tmp_path / "runs" / "nb" / "summary.json").is_file()


def test_the_api_speaks_the_ecosystem_s_words_and_refuses_at_once(tmp_path, tiny_model_dir, ner_files):
    """As a notebook would use it: `validation` is `dev`, any other split is refused with the
    choices; one text in, one result out; bad items, a missing run or checkpoint, and generation
    on an encoder are one clear error each, at once; numbers are plain Python numbers."""
    import routetune
    from routetune.errors import RoutetuneError, RunError
    from routetune.workflow import train

    short_test = tmp_path / "short-test.conll"  # fewer sentences than dev: the two splits tell apart
    short_test.write_text("\n\n".join(ner_files["dev"].read_text().strip().split("\n\n")[:2]) + "\n")
    run_dir, summary = train(make_config(tmp_path, tiny_model_dir, ner_files, **{
        "train.max_steps": 6, "train.eval_every_steps": 3, "sources.ner.test": str(short_test)}))
    events = []
    run = routetune.load(run_dir)
    sentences = {split: run.evaluate(split)["ner"]["sentences"] for split in ("validation", "dev", "test")}
    assert sentences["validation"] == sentences["dev"] > sentences["test"], sentences
    with pytest.raises(RunError, match=r"split: expected dev, validation or test, got 'train'"):
        run.evaluate("train")
    one = run.predict("john opened a store in paris")
    assert isinstance(one, dict) and len(one["tags"]) == 6
    assert run.predict(["john opened a store in paris"]) == [one]
    for bad, word in (([1], "item 0 is a int"), (5, "got int"), ([["a", 2]], "item 0 is a list")):
        with pytest.raises(RoutetuneError, match=word):
            run.predict(bad)
    with pytest.raises(RunError, match="generation needs a decoder backbone"):
        run.generate("hello")
    with pytest.raises(RunError, match="no such run folder"):
        routetune.load(tmp_path / "runs" / "nope")
    with pytest.raises(RunError, match="no checkpoint named 'step-99'"):
        routetune.load(run_dir, checkpoint="step-99")

    def numbers(x):
        if isinstance(x, dict):
            return [n for v in x.values() for n in numbers(v)]
        if isinstance(x, (list, tuple)):
            return [n for v in x for n in numbers(v)]
        return [x] if not isinstance(x, (str, bool, type(None))) else []

    scores = run.evaluate("dev")
    assert numbers(scores) and all(type(n) in (int, float) for n in numbers(scores)), scores
    assert all(type(n) in (int, float) for n in numbers(one))
    routetune.train(make_config(tmp_path / "cb", tiny_model_dir, ner_files, **{"train.max_steps": 3,
                                                                               "train.eval_every_steps": 3}),
                    callbacks=[events.append])
    assert all(type(n) in (int, float) for e in events for n in numbers(e))


def test_overrides_are_checked_like_set(tmp_path, tiny_model_dir, ner_files):
    import routetune
    from routetune.errors import ConfigError

    path = make_config(tmp_path, tiny_model_dir, ner_files)
    with pytest.raises(ConfigError, match=r"--set train.lr=\"fast\": train.lr: expected a number"):
        routetune.train(path, train__lr="fast")
    with pytest.raises(ConfigError, match="config: expected a mapping"):
        routetune.train([1])


def summary_model(run_dir):
    import yaml as _yaml

    return _yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["name"]


@pytest.fixture
def tracked_run(tmp_path, tiny_model_dir, ner_files, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return make_config(tmp_path, tiny_model_dir, ner_files, **{"train.report_to": ["tensorboard", "mlflow", "trackio"],
                                                                "train.log_every": 2, "train.eval_every_steps": 4})


def test_tensorboard_mlflow_and_trackio_receive_the_metrics(tracked_run):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from routetune.workflow import train

    run_dir, summary = train(tracked_run)
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [e for e in events if e["event"] == "train" and e["sources"]["ner"]["loss"] is not None]
    evals = [e for e in events if e["event"] == "eval"]

    tb = EventAccumulator(str(run_dir / "tensorboard"))
    tb.Reload()
    loss = tb.Scalars("train/ner/loss")
    assert [s.step for s in loss] == [e["step"] for e in logged]
    assert loss[-1].value == pytest.approx(logged[-1]["sources"]["ner"]["loss"], rel=1e-6)
    assert [s.value for s in tb.Scalars("dev/ner/f1")] == pytest.approx([e["metrics"]["ner/f1"] for e in evals])
    assert "config" in " ".join(tb.Tags()["tensors"])

    client = MlflowClient(tracking_uri=f"sqlite:///{(run_dir / 'mlflow.db').resolve()}")
    run_id = json.loads((run_dir / "mlflow.json").read_text())["run_id"]
    run = client.get_run(run_id)
    assert run.info.run_name == run_dir.name
    assert json.loads(run.data.params["train.lr"]) == 1e-3
    history = client.get_metric_history(run_id, "dev/ner/f1")
    assert [m.step for m in history] == [e["step"] for e in evals]
    assert [m.value for m in history] == pytest.approx([e["metrics"]["ner/f1"] for e in evals])
    assert run.data.params["model.name"] == str(summary_model(run_dir))  # a plain value, not JSON-quoted
    # the results a user opens the tracker for: test scores and before/after retention, at the last step
    final = [e for e in events if e["event"] == "final"]
    assert len(final) == 1 and final[0]["test"]["ner"]["f1"] == summary["test"]["ner"]["f1"]
    assert run.data.metrics["test/ner/f1"] == pytest.approx(summary["test"]["ner"]["f1"])
    assert "test/ner/sentences" not in run.data.metrics  # counts are not metrics
    assert tb.Scalars("test/ner/f1")[-1].value == pytest.approx(summary["test"]["ner"]["f1"])
    assert tb.Scalars("test/ner/f1")[-1].step == summary["steps"]

    from trackio.sqlite_storage import SQLiteStorage

    logs = SQLiteStorage.get_logs("routetune", run_dir.name)
    dev = [(r["step"], r["dev/ner/f1"]) for r in logs if "dev/ner/f1" in r]
    assert dev == [(e["step"], pytest.approx(e["metrics"]["ner/f1"])) for e in evals]
    assert SQLiteStorage.get_run_config("routetune", run_dir.name)["train"]["lr"] == 1e-3


def test_a_missing_tracker_package_is_refused_before_training(tracked_run, monkeypatch):
    import importlib.util

    from routetune.errors import ConfigError
    from routetune.workflow import train

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(ConfigError, match=r"train.report_to: mlflow needs the mlflow package"):
        train(tracked_run)
    assert not (tracked_run.parent / "runs").exists()


def test_a_resumed_run_continues_its_tracking(tracked_run):
    from support import run_cli
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tracked_run.parent / "runs" / "tiny"
    assert run_cli("train", str(tracked_run), "--no-test", fault="after_step:9", check=False).returncode != 0
    first = json.loads((run_dir / "mlflow.json").read_text())["run_id"]
    run_cli("resume", str(run_dir), "--no-test")
    assert json.loads((run_dir / "mlflow.json").read_text())["run_id"] == first  # the same MLflow run
    tb = EventAccumulator(str(run_dir / "tensorboard"))
    tb.Reload()
    steps = [s.step for s in tb.Scalars("train/lr")]
    assert steps == sorted(set(steps)) and steps[-1] == json.loads((run_dir / "summary.json").read_text())["steps"]


def test_wandb_receives_the_metrics_and_a_resume_continues_its_run(tmp_path, tiny_model_dir, ner_files, monkeypatch):
    """W&B needs an account or its offline files, so the test stands in for the package and checks
    what routetune hands it: the project, the run name, the config, the metrics by step."""
    import importlib.machinery
    import types

    from routetune.config import config_from_run
    from routetune.training.tracking import WandB
    from routetune.workflow import train

    calls = {"init": [], "log": [], "finish": 0}

    class FakeRun:
        id = "abc123"

        def log(self, values, step):
            calls["log"].append((step, values))

        def finish(self):
            calls["finish"] += 1

    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init = lambda **kw: calls["init"].append(kw) or FakeRun()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    path = make_config(
        tmp_path, tiny_model_dir, ner_files, **{"train.report_to": ["wandb"], "train.eval_every_steps": 4}
    )
    run_dir, _ = train(path)
    (init,) = calls["init"]
    assert init["project"] == "routetune" and init["name"] == run_dir.name and init["dir"] == str(run_dir)
    assert init["config"]["train"]["lr"] == 1e-3 and init["id"] is None and calls["finish"] == 1
    evals = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if e["event"] == "eval"]
    assert [(s, v["dev/ner/f1"]) for s, v in calls["log"] if "dev/ner/f1" in v] == \
        [(e["step"], pytest.approx(e["metrics"]["ner/f1"])) for e in evals]
    assert json.loads((run_dir / "wandb.json").read_text()) == {"run_id": "abc123"}
    WandB(run_dir, config_from_run(run_dir), resume_step=4)  # a resume continues the same W&B run
    assert calls["init"][-1]["id"] == "abc123" and calls["init"][-1]["resume"] == "allow"


def test_the_final_event_gives_trackers_test_scores_and_retention():
    from routetune.training.tracking import scalars

    record = {"event": "final", "step": 9, "test": {"ner": {"f1": 0.5, "precision": 0.4, "sentences": 12,
                                                            "per_type": {"person": {"f1": 1.0}}}},
              "dev": {"general-dev": {"mlm_loss": 6.1, "tokens": 300}},
              "before_after": {"general-heldout/mlm_loss": {"before": 6.8, "after": 6.7, "ratio": 0.985}}}
    assert scalars(record) == {"test/ner/f1": 0.5, "test/ner/precision": 0.4, "dev/general-dev/mlm_loss": 6.1,
                               "retention/general-heldout/mlm_loss/before": 6.8,
                               "retention/general-heldout/mlm_loss/after": 6.7,
                               "retention/general-heldout/mlm_loss/ratio": 0.985}


def test_the_command_line_goes_through_the_api_s_run(tmp_path, tiny_model_dir, ner_files, monkeypatch, capsys):
    """`routetune eval` and `predict` use routetune.load(RUN) and its Run, as a notebook does: their
    outputs are the Run's, and the command calls the Run's predictor."""
    from support import run_cli

    import routetune
    from routetune import api
    from routetune.cli import main
    from routetune.training import checkpoint as ckpt
    from routetune.workflow import train

    run_dir, _ = train(make_config(tmp_path, tiny_model_dir, ner_files, **{"train.max_steps": 3}))
    run = routetune.load(run_dir)
    cli = json.loads(run_cli("eval", run_dir, "--split", "dev", "--json").stdout)["scores"]
    assert cli == json.loads(json.dumps(run.evaluate("dev")))
    text = "john opened a store in paris"
    (tmp_path / "in.txt").write_text(text + "\n")
    line = json.loads(run_cli("predict", run_dir, tmp_path / "in.txt").stdout.splitlines()[0])
    assert line == json.loads(json.dumps(run.predict(text)))

    calls, verified = [], []
    real = api.Run.predictor
    monkeypatch.setattr(api.Run, "predictor", lambda self, source=None: calls.append(source) or real(self, source))
    real_verify = ckpt.verify
    monkeypatch.setattr(ckpt, "verify", lambda folder: verified.append(folder) or real_verify(folder))
    monkeypatch.setattr("sys.argv", ["routetune", "predict", str(run_dir), str(tmp_path / "in.txt")])
    try:
        main()
    except SystemExit as stop:  # typer may end a successful command this way too
        assert stop.code in (0, None)
    assert calls == ["ner"]
    assert len(verified) == 1  # the checkpoint's files are hashed once, by routetune.load
    assert json.loads(capsys.readouterr().out.splitlines()[0]) == line
    verified.clear()
    assert run.evaluate("dev") == routetune.load(run_dir).evaluate("dev") and len(verified) == 1
