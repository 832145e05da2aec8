"""Retention (evaluate/retention.py): the base model against the fine-tuned one on held-out text, the
fitted MLM head, the cache of base-model scores; every number checked against a direct computation."""

import math

import pytest

from support import make_config


@pytest.fixture
def headless_bert(tmp_path, tiny_model_dir):
    """The tiny BERT saved without its masked-LM head (like a sentence-embedding checkpoint)."""
    from transformers import AutoTokenizer, BertModel

    folder = tmp_path / "headless"
    BertModel.from_pretrained(tiny_model_dir).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    return folder


def _direct_mlm_retention(model_dir, run_dir, general, cfg_path):
    """Fit the head with the run's recipe on the base and on the best checkpoint; score the eval
    text directly with lm_loss, outside the workflow."""
    from routetune.config import load_config
    from routetune.data.readers import resolve_text_files
    from routetune.data.sources import special_affixes
    from routetune.data.text import iter_blocks, text_parts
    from routetune.evaluate.retention import fit_mlm_head
    from routetune.model.routed import RoutedModel, build_model
    from routetune.model.inference import lm_loss
    from routetune.model.load import load_tokenizer

    cfg = load_config(cfg_path)
    tok = load_tokenizer(str(model_dir))
    prefix, suffix = special_affixes(tok)
    content = cfg.model.max_length - len(prefix) - len(suffix)

    def blocks(path, n=None):
        out = [
            prefix + b + suffix
            for b in iter_blocks(text_parts(resolve_text_files(str(path), "*.txt")), tok, content, False)
        ]
        return out[:n]

    fit_blocks = blocks(general, cfg.retention.fit_blocks)
    eval_blocks = blocks(cfg.evals["held"].path)
    rc = cfg.retention
    scores = []
    for model in (build_model(str(model_dir), 0), RoutedModel.load(run_dir / "checkpoints" / "best")):
        fit_mlm_head(model, fit_blocks, tok, rc.fit_steps, rc.fit_batch_size, rc.fit_lr, rc.seed, cfg.train.precision)
        scores.append(lm_loss(model, "masked-lm", eval_blocks, tok, cfg.train.eval_batch_size, cfg.train.precision)[0])
    return scores


def test_masked_lm_retention_fits_the_head_on_both_sides(tmp_path, headless_bert, ner_files):
    from routetune.workflow import train

    held = tmp_path / "held.txt"
    held.write_text("the store in paris opened a river of bread and salt . " * 30)
    cfg = make_config(tmp_path, headless_bert, ner_files, **{
        "evals": {"held": {"path": str(held)}},
        "retention": {"fit_steps": 5, "fit_batch_size": 4, "fit_lr": 1e-2, "cache_before": False}})
    run_dir, summary = train(cfg)
    assert "MLM head fitted" in summary["retention_note"] or "masked-LM head fitted" in summary["retention_note"]
    ba = summary["before_after"]["held/mlm_loss"]
    before, after = _direct_mlm_retention(headless_bert, run_dir, ner_files["general"], cfg)
    assert ba["before"] == pytest.approx(before, rel=1e-5)
    assert ba["after"] == pytest.approx(after, rel=1e-5)
    assert ba["ratio"] == pytest.approx(after / before)


def test_before_scores_are_cached(tmp_path, tiny_llama_dir, monkeypatch, caplog):
    """A second run on the same base and text takes the base scores from the cache; they equal
    a direct computation."""
    import logging

    from support import GENERAL
    from routetune.workflow import train

    monkeypatch.setenv("ROUTETUNE_BEFORE_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "domain.txt"
    text.write_text(GENERAL)
    held = tmp_path / "held.txt"
    held.write_text("the store in paris opened a river of bread and salt . " * 30)
    cfg = {
        "model": {"name": str(tiny_llama_dir), "max_length": 16},
        "sources": {
            "domain": {
                "objective": "causal-lm",
                "train": str(text),
                "text": {"stream": False},
                "holdout": {"test": 0.2},
            }
        },
        "train": {"precision": "fp32", "device": "cpu", "max_steps": 3, "batch_size": 4, "lr": 1e-2, "progress": False},
        "evals": {"held": {"path": str(held)}},
        "run": {"output_dir": str(tmp_path / "runs")},
    }
    import yaml

    runs = []
    for name in ("a", "b"):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({**cfg, "run": {**cfg["run"], "name": name}}))
        caplog.clear()
        logging.getLogger("routetune").setLevel(logging.INFO)
        runs.append(train(path)[1])
        logging.getLogger("routetune").setLevel(logging.WARNING)
    assert "from the cache" in caplog.text  # the second run
    assert runs[0]["before"] == runs[1]["before"]
    # a run over the same base held in 4 bits starts from another model: scored, not taken from the cache
    path = tmp_path / "q.yaml"
    path.write_text(yaml.safe_dump({**cfg, "model": {**cfg["model"], "quantize": "nf4"}, "peft": {"method": "lora"},
                                    "run": {**cfg["run"], "name": "q"}}))
    quantized = train(path)[1]["before"]
    assert quantized.keys() == runs[0]["before"].keys()
    assert all(quantized[n]["perplexity"] != runs[0]["before"][n]["perplexity"] for n in quantized)
    from routetune.data.sources import special_affixes
    from routetune.data.text import iter_blocks, text_parts
    from routetune.model.routed import build_model
    from routetune.model.inference import lm_loss
    from routetune.model.load import load_tokenizer

    tok = load_tokenizer(str(tiny_llama_dir))
    prefix, suffix = special_affixes(tok)
    blocks = [prefix + b + suffix for b in iter_blocks(text_parts([held]), tok, 16 - len(prefix) - len(suffix), False)]
    loss, _ = lm_loss(build_model(str(tiny_llama_dir), 0), "causal-lm", blocks, tok, 64, "fp32")
    assert runs[1]["before"]["held"]["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    # the report's before/after row: the base model and the run's best checkpoint, scored directly
    from routetune.model.routed import RoutedModel
    from routetune.reports.run import write_report

    run_dir = tmp_path / "runs" / "b"
    from routetune.training.checkpoint import run_checkpoint

    folder = run_checkpoint(run_dir, runs[1]["best"]["checkpoint"])  # no dev set: the last checkpoint
    after, _ = lm_loss(RoutedModel.load(folder), "causal-lm", blocks, tok, 64, "fp32")
    md = (write_report([run_dir]) / "report.md").read_text()
    b, a = math.exp(loss), math.exp(after)
    assert f"| b | held/perplexity | {b:.4f} | {a:.4f} | {a / b:.4f} | {100 * (a / b - 1):+.2f}% |" in md


def test_cache_key_follows_data_content_not_file_times(tmp_path):
    """A re-provisioned data folder (same bytes, new times) still hits the cache; new bytes miss."""
    import os

    from routetune.evaluate.retention import _files_digest

    f = tmp_path / "t.txt"
    f.write_text("some held-out text")
    key = _files_digest([f], content=True)
    os.utime(f, ns=(1, 1))
    assert _files_digest([f], content=True) == key
    f.write_text("other held-out text")  # same size, other bytes
    assert _files_digest([f], content=True) != key


def test_a_run_trains_the_same_whether_base_scores_are_cached_or_not(tmp_path, headless_bert, ner_files, monkeypatch):
    """Scoring the base model (here: fitting an MLM head for it) must not move the random stream
    training draws from; otherwise a warm cache of base-model scores changes the trained model."""
    from routetune.evaluate import retention
    from routetune.workflow import train

    retention._head_missing.cache_clear()  # the first check of a process loads the model (and its new head)
    monkeypatch.setenv("ROUTETUNE_BEFORE_CACHE", str(tmp_path / "before-cache"))
    held = tmp_path / "held.txt"
    held.write_text("the store in paris opened a river of bread and salt . " * 30)
    summaries = []
    for name in ("cold", "warm"):
        cfg = make_config(tmp_path, headless_bert, ner_files, **{
            "run.name": name, "evals": {"held": {"path": str(held)}},
            "retention": {"fit_steps": 5, "fit_batch_size": 4, "fit_lr": 1e-2}})
        summaries.append(train(cfg, run_test=True)[1])
    cold, warm = summaries
    assert any((tmp_path / "before-cache").iterdir())  # the second run read the first one's scores
    assert cold["before"] == warm["before"]
    assert cold["test"] == warm["test"] and cold["before_after"] == warm["before_after"]
