"""Every objective: reference losses against plain transformers, readers, holdout, and tiny runs."""

import json

import pytest
import torch
from transformers import (BertForSequenceClassification, LlamaForCausalLM, LlamaForSequenceClassification,
                          LlamaForTokenClassification)

from support import make_config
from routetune.data.readers import read_examples
from routetune.data.sources import encode_prompt
from routetune.errors import ConfigError, DataError
from routetune.model.routed import build_model
from routetune.workflow import evaluate_run, train


def _batch(vocab, labels, seed=0, pad_id=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    ids[1, 7:] = pad_id
    mask[1, 7:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("binary", [False, True])
def test_sequence_classification_matches_bert(tiny_model_dir, binary):
    model = build_model(str(tiny_model_dir), 0)
    kind = "binary-classification" if binary else "sequence-classification"
    head = model.add_head("cls", kind, ["neg", "pos"] if binary else ["a", "b", "c"], seed=1)
    model.eval()
    n = 1 if binary else 3
    ref = BertForSequenceClassification.from_pretrained(
        tiny_model_dir, num_labels=n, problem_type="multi_label_classification" if binary else None).eval()
    ref.bert.pooler.dense.load_state_dict(head.pooler.state_dict())
    ref.classifier.load_state_dict(head.classifier.state_dict())
    labels = torch.tensor([1.0, 0.0, 1.0]) if binary else torch.tensor([2, 0, 1])
    batch = _batch(model.config.vocab_size, labels)
    ours = model.loss("cls", kind, batch)
    theirs = ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 labels=labels.view(-1, 1) if binary else labels).loss
    assert abs(ours.item() - theirs.item()) < 1e-5


def test_decoder_heads_match_llama(tiny_llama_dir):
    model = build_model(str(tiny_llama_dir), 0)
    model.eval()
    vocab = model.config.vocab_size
    # sequence classification: last non-padding token, linear without bias
    head = model.add_head("cls", "sequence-classification", ["a", "b", "c"], seed=1)
    ref = LlamaForSequenceClassification.from_pretrained(tiny_llama_dir, num_labels=3).eval()
    ref.score.load_state_dict(head.score.state_dict())
    batch = _batch(vocab, torch.tensor([2, 0, 1]))
    assert abs(model.loss("cls", "sequence-classification", batch).item() - ref(**batch).loss.item()) < 1e-5
    # token classification
    tok_head = model.add_head("ner", "token-classification", ["O", "B-x", "I-x"], seed=2)
    model.eval()  # the new head too
    ref = LlamaForTokenClassification.from_pretrained(tiny_llama_dir, num_labels=3).eval()
    ref.score.load_state_dict(tok_head.classifier.state_dict())
    labels = torch.randint(0, 3, (3, 10), generator=torch.Generator().manual_seed(3))
    labels[1, 7:] = -100
    batch = _batch(vocab, labels)
    assert abs(model.loss("ner", "token-classification", batch).item() - ref(**batch).loss.item()) < 1e-5
    # causal LM
    ref = LlamaForCausalLM.from_pretrained(tiny_llama_dir).eval()
    ids = _batch(vocab, None)
    labels = ids["input_ids"].clone()
    labels[ids["attention_mask"] == 0] = -100
    batch = {**ids, "labels": labels}
    assert abs(model.loss("lm", "causal-lm", batch).item() - ref(**batch).loss.item()) < 1e-5


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "tsv", "lines-per-class", "folders"])
def test_classification_readers_agree(class_files, fmt):
    examples = read_examples(str(class_files[fmt]), fmt, pattern="*.txt")
    assert len(examples) == 30
    assert sorted({e.label for e in examples}) == ["neg", "pos"]
    assert sorted(e.text for e in examples) == sorted(e.text for e in read_examples(str(class_files["jsonl"]), "jsonl"))


@pytest.mark.parametrize("content, message", [
    ('{"text": "x"}\n', "missing field 'label'"),
    ('{"text": 3.5, "label": "a"}\n', "field 'text': expected a string"),
    ('[1, 2]\n', "expected a JSON object"),
    ('{"text": "x", "label": "a"}\n', "only one class"),
    ('{bad json\n', "invalid JSON"),
])
def test_classification_reader_errors(tmp_path, content, message):
    p = tmp_path / "x.jsonl"
    p.write_text(content)
    with pytest.raises(DataError, match=message):
        read_examples(str(p), "jsonl")


def test_csv_column_count_error(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("text,label\nfine,a\ntoo,many,columns\n")
    with pytest.raises(DataError, match=r"x.csv:3: expected 2 columns"):
        read_examples(str(p), "csv")


def test_prompt_completion_masks_the_prompt(tiny_llama_dir):
    from routetune.model.load import load_tokenizer

    tok = load_tokenizer(str(tiny_llama_dir))
    ids, labels, cut = encode_prompt(tok, "the store of", "paris", 64)
    n_prompt = len(tok("the store of", add_special_tokens=False)["input_ids"])
    assert labels[:n_prompt] == [-100] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:] and ids[-1] == tok.eos_token_id and not cut
    ids, labels, cut = encode_prompt(tok, "a " * 100, "paris", 20)
    assert len(ids) == 20 and cut and ids[-1] == tok.eos_token_id  # the prompt lost its start


def _cls_config(tmp_path, model_dir, class_files, objective="sequence-classification", **extra):
    import yaml

    cfg = {
        "model": {"name": str(model_dir), "max_length": 32},
        "sources": {
            "polarity": {
                "objective": objective,
                "train": str(class_files["jsonl"]),
                "holdout": {"dev": 0.2, "test": 0.2, "seed": 1},
            }
        },
        "train": {"precision": "fp32", "device": "cpu", "epochs": 25, "batch_size": 4, "lr": 3e-3, "progress": False},
        "run": {"name": "cls", "output_dir": str(tmp_path / "runs")},
    }
    for key, value in extra.items():
        node = cfg
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    path = tmp_path / "cls.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.mark.parametrize("objective", ["sequence-classification", "binary-classification"])
def test_classification_end_to_end(tmp_path, tiny_model_dir, class_files, objective):
    extra = {"sources.polarity.positive_label": "pos"} if objective == "binary-classification" else {}
    run_dir, summary = train(_cls_config(tmp_path, tiny_model_dir, class_files, objective, **extra))
    scores = summary["test"]["polarity"]
    assert scores["examples"] == 6 and set(scores["per_class"]) == {"neg", "pos"}
    assert scores["accuracy"] >= 5 / 6  # at most one of six wrong; a model that learned nothing gets 0.5
    assert summary["best"]["metric"] == "polarity/accuracy"
    again = evaluate_run(run_dir, "test")["polarity"]
    assert again["accuracy"] == scores["accuracy"] and again["confusion"] == scores["confusion"]
    heads = json.loads((run_dir / "checkpoints" / "best" / "heads.json").read_text())
    assert heads["polarity"]["kind"] == objective
    from typer.testing import CliRunner

    from routetune.cli import app

    texts = [e["text"] for e in map(json.loads, class_files["jsonl"].read_text().splitlines()[:4])]
    result = CliRunner().invoke(app, ["predict", str(run_dir), "--format", "lines"], input="\n".join(texts) + "\n")
    assert result.exit_code == 0, result.output
    rows = [json.loads(x) for x in result.output.splitlines()]
    assert [r["text"] for r in rows] == texts
    for r in rows:
        assert set(r["probabilities"]) == {"neg", "pos"} and abs(sum(r["probabilities"].values()) - 1) < 1e-5
        assert r["label"] == max(r["probabilities"], key=r["probabilities"].get)
    if objective == "binary-classification":
        assert heads["polarity"]["labels"] == ["neg", "pos"] and heads["polarity"]["threshold"] == 0.5


def test_holdout_is_deterministic_and_disjoint(tiny_model_dir, class_files, tmp_path):
    from routetune.config import load_config
    from routetune.data.build import build
    from routetune.model.load import load_tokenizer

    cfg = load_config(_cls_config(tmp_path, tiny_model_dir, class_files))
    tok = load_tokenizer(str(tiny_model_dir))
    objectives = {"polarity": "sequence-classification"}
    a = build(cfg, tok, objectives)
    b = build(cfg, tok, objectives)
    assert [e.origin for e in a[2]["polarity"].items] == [e.origin for e in b[2]["polarity"].items]
    train_o = {e.origin for e in a[0]["polarity"].examples}
    dev_o, test_o = {e.origin for e in a[1]["polarity"].items}, {e.origin for e in a[2]["polarity"].items}
    assert len(dev_o) == len(test_o) == 6 and len(train_o) == 18
    assert not (train_o & dev_o) and not (train_o & test_o) and not (dev_o & test_o)


def test_decoder_causal_lm_text_and_prompts(tmp_path, tiny_llama_dir, ner_files):
    import yaml

    prompts = tmp_path / "qa.jsonl"
    rows = [{"prompt": f"where is {w} ?", "completion": "in paris"} for w in ["john", "apple", "the store"]] * 6
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {
        "model": {"name": str(tiny_llama_dir), "max_length": 32},
        "sources": {
            "domain": {
                "objective": "causal-lm",
                "train": str(ner_files["general"]),
                "text": {"stream": False},
                "holdout": {"test": 0.1},
            },
            "qa": {
                "objective": "causal-lm",
                "format": "jsonl",
                "train": str(prompts),
                "test": str(prompts),
                "max_new_tokens": 4,
                "eval_generate": 5,
            },
            "general": {"objective": "language-modeling", "train": str(ner_files["general"])},
        },
        "routing": {"weights": {"domain": 0.5, "qa": 0.3, "general": 0.2}},
        "train": {
            "precision": "fp32",
            "device": "cpu",
            "max_steps": 30,
            "batch_size": 4,
            "lr": 3e-3,
            "progress": False,
            "eval_each_epoch": False,
        },
        "evals": {"heldout": {"path": str(ner_files["general"]), "max_blocks": 4}},
        "run": {"name": "lm", "output_dir": str(tmp_path / "runs")},
    }
    path = tmp_path / "lm.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    run_dir, summary = train(path)
    assert summary["sources"]["general"]["batches"] > 0  # language-modeling -> causal-lm on a decoder
    domain, qa = summary["test"]["domain"], summary["test"]["qa"]
    assert 1 < domain["perplexity"] < 1000 and domain["tokens"] > 0
    assert qa["generated"] == 5 and 0 <= qa["exact_match"] <= 1 and 0 <= qa["token_f1"] <= 1
    vocab = json.loads((tiny_llama_dir / "config.json").read_text())["vocab_size"]
    assert qa["perplexity"] < 0.6 * vocab  # an untrained model scores about the vocabulary size
    # before vs after: the base model was scored on the LM test sets and the extra held-out text
    before = summary["before"]
    assert set(before) == {"domain", "qa", "heldout"} and before["heldout"]["blocks"] == 4
    pair = summary["before_after"]["domain/perplexity"]
    assert pair["after"] == domain["perplexity"] and pair["after"] < pair["before"]
    assert summary["test"]["heldout"]["blocks"] == 4
    # generate for new prompts
    from typer.testing import CliRunner

    from routetune.cli import app

    result = CliRunner().invoke(app, ["generate", str(run_dir), "--max-new-tokens", "3"],
                                input='where is john ?\n{"prompt": "where is apple ?"}\n')
    assert result.exit_code == 0, result.output
    rows = [json.loads(x) for x in result.output.splitlines()]
    assert [r["prompt"] for r in rows] == ["where is john ?", "where is apple ?"]
    assert all(isinstance(r["completion"], str) for r in rows)
    # `predict` on a language-model run generates too, with the same outputs
    same = CliRunner().invoke(app, ["predict", str(run_dir), "--max-new-tokens", "3"],
                              input='where is john ?\n{"prompt": "where is apple ?"}\n')
    assert same.exit_code == 0, same.output
    assert [json.loads(x) for x in same.output.splitlines()] == rows


def test_objective_must_fit_the_backbone(tmp_path, tiny_model_dir, ner_files):
    path = make_config(tmp_path, tiny_model_dir, ner_files, **{"sources.general.objective": "causal-lm"})
    with pytest.raises(ConfigError, match="causal-lm needs a decoder backbone"):
        train(path)


def test_multi_task_on_one_backbone(tmp_path, tiny_model_dir, ner_files, class_files):
    path = make_config(tmp_path, tiny_model_dir, ner_files, **{
        "sources.polarity": {"objective": "sequence-classification", "format": "csv",
                             "train": str(class_files["csv"]), "dev": str(class_files["csv"])},
        "routing.weights": {"ner": 0.5, "polarity": 0.3, "general": 0.2}})
    run_dir, summary = train(path)
    heads = json.loads((run_dir / "checkpoints" / "best" / "heads.json").read_text())
    assert {n: h["kind"] for n, h in heads.items()} == {"ner": "token-classification",
                                                        "polarity": "sequence-classification"}
    events = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    dev = [e for e in events if e["event"] == "eval"][-1]["metrics"]
    assert {"ner/f1", "polarity/accuracy", "polarity/macro_f1"} <= set(dev)
    assert summary["sources"]["polarity"]["batches"] > 0 and summary["sources"]["ner"]["batches"] > 0
