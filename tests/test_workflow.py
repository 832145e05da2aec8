"""Tiny end-to-end runs on a random-weight 2-layer BERT built in the test session."""

import json

from support import forkserver
import pytest
from typer.testing import CliRunner

from support import cli_env, make_config, run_cli
from routetune.cli import app
from routetune.errors import ConfigError, DataError, ModelError, RunError
from routetune.workflow import evaluate_run, train

runner = CliRunner()


@pytest.fixture
def trained(tmp_path, tiny_model_dir, ner_files):
    cfg = make_config(tmp_path, tiny_model_dir, ner_files)
    run_dir, summary = train(cfg)
    return run_dir, summary


def test_train_eval_predict(trained):
    run_dir, summary = trained
    for name in ("config.yaml", "labels.json", "metrics.jsonl", "summary.json", "train.log",
                 "checkpoints/best/heads.json", "checkpoints/best/COMPLETE", "plan.jsonl"):
        assert (run_dir / name).is_file(), name
    assert summary["steps"] == summary["planned_steps"] > 0
    # both sources were used and the counts add up to the steps
    assert summary["sources"]["ner"]["batches"] + summary["sources"]["general"]["batches"] == summary["steps"]
    assert summary["sources"]["general"]["batches"] > 0
    assert set(summary["test"]["ner"]) >= {"precision", "recall", "f1", "per_type"}
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    kinds = {e["event"] for e in events}
    assert {"start", "train", "eval"} <= kinds
    train_events = [e for e in events if e["event"] == "train"]
    assert set(train_events[-1]["sources"]) == {"ner", "general"}
    assert train_events[-1]["sources"]["ner"]["examples"] == summary["sources"]["ner"]["examples"]

    # eval from the run folder reproduces the test scores of the training run
    again = evaluate_run(run_dir, "test")
    assert again["ner"]["f1"] == pytest.approx(summary["test"]["ner"]["f1"])
    result = runner.invoke(app, ["eval", str(run_dir), "--split", "test", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["scores"]["ner"]["f1"] == pytest.approx(summary["test"]["ner"]["f1"])
    result = runner.invoke(app, ["eval", str(run_dir), "--split", "dev"])
    assert "micro avg" in result.output

    result = runner.invoke(app, ["predict", str(run_dir)],
                           input='John opened a store in Paris\n{"tokens": ["Apple", "in", "London"]}\n\n')
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.output.splitlines()]
    assert len(rows) == 3 and rows[2]["tokens"] == []  # the blank line keeps its place
    assert rows[0]["tokens"] == ["John", "opened", "a", "store", "in", "Paris"]
    assert len(rows[0]["tags"]) == 6 and len(rows[1]["tags"]) == 3
    for row in rows:
        for ent in row["entities"]:
            assert row["text"][ent["start"]:ent["end"]] == ent["text"]


def test_predict_equals_evaluation_path(trained, tmp_path):
    from routetune.data.readers import read_conll
    from routetune.model.inference import tag_words
    from routetune.runs import load_run

    run_dir, _ = trained
    cfg, model, tok = load_run(run_dir)
    sents = read_conll(cfg.sources["ner"].test)
    expected = tag_words(model, "ner", tok, [s.tokens for s in sents], cfg.model.max_length).tags
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(json.dumps({"tokens": s.tokens}) for s in sents) + "\n")
    out = tmp_path / "out.jsonl"
    result = runner.invoke(app, ["predict", str(run_dir), str(inp), "-o", str(out)])
    assert result.exit_code == 0, result.output
    got = [json.loads(line)["tags"] for line in out.read_text().splitlines()]
    assert got == expected


def test_same_seed_same_run(tmp_path, tiny_model_dir, ner_files):
    a = make_config(tmp_path / "a", tiny_model_dir, ner_files)
    b = make_config(tmp_path / "b", tiny_model_dir, ner_files)
    _, sa = train(a)
    _, sb = train(b)
    assert sa["test"]["ner"]["f1"] == sb["test"]["ner"]["f1"]
    assert sa["sources"] == sb["sources"]


def test_learns_the_tiny_task(tmp_path, tiny_model_dir, ner_files):
    cfg = make_config(tmp_path, tiny_model_dir, ner_files, **{"train.epochs": 12, "routing.weights.general": 0.1})
    _, summary = train(cfg)
    assert summary["test"]["ner"]["f1"] > 0.5


def test_existing_run_folder_is_not_overwritten(trained, tmp_path, tiny_model_dir, ner_files):
    run_dir, _ = trained
    before = (run_dir / "summary.json").read_text()
    cfg = make_config(tmp_path, tiny_model_dir, ner_files)
    with pytest.raises(RunError, match="--overwrite"):
        train(cfg)
    assert (run_dir / "summary.json").read_text() == before
    run_dir2, _ = train(cfg, overwrite=True)
    assert run_dir2 == run_dir


@pytest.mark.parametrize("override, error, message", [
    ({"sources.ner.train": "/nonexistent/train.conll"}, DataError, "file not found"),
    ({"model.name": "no-such-alias"}, ModelError, "unknown model 'no-such-alias'"),
    ({"routing.weights": {"ner": -1, "general": 1}}, ConfigError, "routing.weights.ner"),
    ({"routing.weights": {"ner": 0, "general": 0}}, ConfigError, "all weights are zero"),
    ({"train.early_stopping": {"metric": "ner/accuracy"}}, ConfigError, "not a dev metric"),
])
def test_bad_input_fails_before_training(tmp_path, tiny_model_dir, ner_files, override, error, message):
    cfg = make_config(tmp_path, tiny_model_dir, ner_files, **override)
    with pytest.raises(error, match=message):
        train(cfg)
    assert not (tmp_path / "runs" / "tiny").exists()


def test_dev_label_missing_from_train(tmp_path, tiny_model_dir, ner_files):
    with ner_files["dev"].open("a") as fh:
        fh.write("\nMars\tB-planet\n")
    cfg = make_config(tmp_path, tiny_model_dir, ner_files)
    with pytest.raises(DataError, match=r"dev.conll:\d+: dev tag 'B-planet' does not occur in the training data"):
        train(cfg)


def test_empty_sources(tmp_path, tiny_model_dir, ner_files):
    ner_files["general"].write_text("\n\n   \n")
    cfg = make_config(tmp_path, tiny_model_dir, ner_files)
    with pytest.raises(DataError, match="no text found"):
        train(cfg)
    ner_files["general"].write_text("plenty of text here, " * 50)
    ner_files["train"].write_text("")
    with pytest.raises(DataError, match="no sentences"):
        train(cfg)


def test_cli_reports_errors_with_exit_code_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name: x}\nsources: {}\ntrain: {lr: fast}\n")
    proc = forkserver.run("routetune.cli", ["train", str(bad)], cli_env(), timeout=120)
    assert proc.returncode == 2
    assert "train.lr: expected a number, got 'fast'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_no_retention_skips_the_before_and_after_scoring(tmp_path, tiny_model_dir, ner_files):
    """`train --no-retention`: a quick check without the general-text scoring (no base-model
    scoring, no masked-LM head fits); without it the log says what the scoring cost and how to skip it."""
    held = tmp_path / "heldout.txt"
    held.write_text("the store opened in paris and london . " * 30)
    extra = {"train.max_steps": 3, "evals": {"heldout": {"path": str(held)}}, "retention.fit_head": "always",
             "retention.fit_steps": 5}
    quick = run_cli("train", make_config(tmp_path / "q", tiny_model_dir, ner_files, **extra), "--no-retention")
    summary = json.loads((tmp_path / "q" / "runs" / "tiny" / "summary.json").read_text())
    assert "before_after" not in summary and not (tmp_path / "q" / "runs" / "tiny" / "before.json").exists()
    assert "MLM head" not in quick.stderr
    full = run_cli("train", make_config(tmp_path / "f", tiny_model_dir, ner_files, **extra))
    summary = json.loads((tmp_path / "f" / "runs" / "tiny" / "summary.json").read_text())
    assert "heldout/mlm_loss" in summary["before_after"]
    assert "`train --no-retention` skips" in full.stderr


def test_a_run_shorter_than_its_first_evaluation_still_ends_with_one(tmp_path, tiny_model_dir, ner_files, caplog):
    """max_steps ends before the first dev evaluation is due: the last step is evaluated (and the
    log says so), so summary.json names a best value and checkpoint instead of null."""
    import logging

    from routetune.workflow import train

    logging.getLogger("routetune").setLevel(logging.INFO)
    with caplog.at_level(logging.INFO, logger="routetune"):
        run_dir, summary = train(make_config(tmp_path, tiny_model_dir, ner_files, **{"train.max_steps": 2}))
    assert "no dev evaluation in the run's 2 steps" in caplog.text
    assert summary["best"]["value"] is not None and summary["best"]["step"] == 2
    assert summary["best"]["checkpoint"] == "best"
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals if e["event"] == "eval"] == [2]
