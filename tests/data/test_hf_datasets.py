"""Sources read through Hugging Face `datasets` (offline: save_to_disk folders, parquet and json
files built in the test): label names from ClassLabel features, column mapping, holdout,
exact resume, and errors that name the dataset, split and row."""

import json

import pytest
import yaml
from support import run_cli
from safetensors.torch import load_file

datasets = pytest.importorskip("datasets")

from routetune.data.readers import read_conll  # noqa: E402
from routetune.errors import ConfigError, DataError  # noqa: E402
from routetune.workflow import train  # noqa: E402


def _ner_dataset(ner_files, folder):
    """The small NER data as a DatasetDict (train / validation / test), tags as ClassLabel ids."""
    splits = {"train": "train", "validation": "dev", "test": "test"}
    sents = {s: read_conll(ner_files[f]) for s, f in splits.items()}
    names = sorted({t for ss in sents.values() for s in ss for t in s.tags})
    features = datasets.Features({"words": datasets.Sequence(datasets.Value("string")),
                                  "ner_tags": datasets.Sequence(datasets.ClassLabel(names=names))})
    dd = datasets.DatasetDict({s: datasets.Dataset.from_dict(
        {"words": [x.tokens for x in ss], "ner_tags": [[names.index(t) for t in x.tags] for x in ss]},
        features=features) for s, ss in sents.items()})
    dd.save_to_disk(str(folder))
    return folder


def _config(tmp_path, model_dir, source, general=None, **train):
    cfg = {
        "model": {"name": str(model_dir), "max_length": 32},
        "sources": {
            "task": source,
            **({"general": {"objective": "masked-lm", "train": str(general)}} if general else {}),
        },
        "train": {
            "precision": "fp32",
            "device": "cpu",
            "epochs": 1,
            "batch_size": 4,
            "progress": False,
            "log_plan": True,
            **train,
        },
        "run": {"name": "r", "output_dir": str(tmp_path / "runs")},
    }
    if general:
        cfg["routing"] = {"weights": {"task": 0.75, "general": 0.25}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_ner_from_a_saved_dataset_with_classlabel_tags(tmp_path, tiny_model_dir, ner_files):
    folder = _ner_dataset(ner_files, tmp_path / "wnut-like")
    source = {"objective": "token-classification",
              "dataset": {"path": str(folder), "dev": "validation", "test": "test",
                          "columns": {"tokens": "words", "tags": "ner_tags"}}}
    run_dir, summary = train(_config(tmp_path, tiny_model_dir, source, ner_files["general"]))
    labels = json.loads((run_dir / "labels.json").read_text())["task"]
    assert "B-location" in labels and all(isinstance(t, str) for t in labels)  # names, not ClassLabel ids
    assert 0 <= summary["test"]["task"]["f1"] <= 1
    # the same numbers as the CoNLL files the dataset was made from
    files = {"objective": "token-classification", "train": str(ner_files["train"]), "dev": str(ner_files["dev"]),
             "test": str(ner_files["test"])}
    (tmp_path / "b").mkdir()
    _, from_files = train(_config(tmp_path / "b", tiny_model_dir, files, ner_files["general"]))
    assert summary["test"]["task"]["f1"] == from_files["test"]["task"]["f1"]


def test_classification_from_parquet_with_holdout_and_exact_resume(tmp_path, tiny_model_dir):
    rows = [("a great film", "pos"), ("the worst store", "neg"), ("loved it in paris", "pos"),
            ("awful apple", "neg")] * 10
    datasets.Dataset.from_dict({"sentence": [t for t, _ in rows], "label": [y for _, y in rows]}) \
        .to_parquet(str(tmp_path / "polarity.parquet"))
    source = {"objective": "sequence-classification", "holdout": {"dev": 0.2, "test": 0.2, "seed": 1},
              "dataset": {"path": "polarity.parquet", "columns": {"text": "sentence"}}}  # relative to the config
    path = _config(tmp_path, tiny_model_dir, source, epochs=2, eval_each_epoch=True)
    ref, summary = train(path)
    assert summary["test"]["task"]["examples"] == 8 and set(summary["sources"]) == {"task"}
    killed = tmp_path / "runs" / "killed"
    assert run_cli("train", str(path), "--no-test", "--set", "run.name=killed", fault="after_step:7",
                   check=False).returncode != 0
    run_cli("resume", str(killed), "--no-test")
    assert (killed / "plan.jsonl").read_text() == (ref / "plan.jsonl").read_text()
    last = sorted((ref / "checkpoints").glob("step-*"))[-1].name
    a, b = (load_file(str(d / "checkpoints" / last / "heads.safetensors")) for d in (ref, killed))
    assert all((a[k] == b[k]).all() for k in a)


def test_prompt_completion_pairs_from_json(tmp_path, tiny_llama_dir):
    pairs = [{"q": "what is the apple store", "a": "a store"}, {"q": "where is paris", "a": "in france"}] * 6
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    source = {"objective": "causal-lm", "eval_generate": 0, "holdout": {"test": 0.25},
              "dataset": {"path": str(tmp_path / "qa.jsonl"), "columns": {"prompt": "q", "completion": "a"}}}
    _, summary = train(_config(tmp_path, tiny_llama_dir, source, max_steps=2))
    assert summary["test"]["task"]["perplexity"] > 1


def test_dataset_mistakes_name_the_dataset_split_and_column(tmp_path, tiny_model_dir, ner_files):
    folder = _ner_dataset(ner_files, tmp_path / "ds")
    base = {"objective": "token-classification", "dataset": {"path": str(folder), "dev": "validation"}}
    with pytest.raises(DataError, match=r"ds\[train\]: no column 'tokens' \(columns: words, ner_tags\); map it"):
        train(_config(tmp_path, tiny_model_dir, base))
    base["dataset"].update(columns={"tokens": "words", "tags": "ner_tags"}, dev="dev")
    with pytest.raises(
        ConfigError, match=r"sources.task.dataset: .* has no split 'dev' \(splits: train, validation, test\)"
    ):
        train(_config(tmp_path, tiny_model_dir, base))
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE"):
        train(_config(tmp_path, tiny_model_dir, {"objective": "token-classification",
                                                "dataset": {"path": "someone/no-such-dataset"}}))
    with pytest.raises(ConfigError, match="train: give the training data as `train` .* or as `dataset`"):
        train(_config(tmp_path, tiny_model_dir, {"objective": "token-classification", "train": "x",
                                                "dataset": {"path": str(folder)}}))
    assert not (tmp_path / "runs").exists()


def test_general_text_from_a_dataset_column_trains_like_the_same_text_file(tmp_path, tiny_model_dir, ner_files,
                                                                           monkeypatch):
    monkeypatch.setenv("ROUTETUNE_CACHE", str(tmp_path / "cache"))
    rows = [line for line in ner_files["general"].read_text().splitlines() if line.strip()]
    datasets.Dataset.from_dict({"content": rows, "id": list(range(len(rows)))}).to_parquet(
        str(tmp_path / "wiki.parquet")
    )
    task = {"objective": "token-classification", "train": str(ner_files["train"]), "dev": str(ner_files["dev"]),
            "test": str(ner_files["test"])}
    path = _config(tmp_path, tiny_model_dir, task, ner_files["general"], max_steps=6)
    cfg = yaml.safe_load(path.read_text())
    cfg["sources"]["general"] = {"objective": "masked-lm", "holdout": {"test": 0.2},
                                 "dataset": {"path": str(tmp_path / "wiki.parquet"), "columns": {"text": "content"}}}
    path.write_text(yaml.safe_dump(cfg))
    _, from_dataset = train(path)
    (written,) = (tmp_path / "cache" / "dataset-text").glob("*.txt")
    assert written.read_text() == "".join(r.strip() + "\n\n" for r in rows)  # one row per paragraph
    same = tmp_path / "same.txt"
    same.write_text(written.read_text())
    cfg["sources"]["general"] = {"objective": "masked-lm", "holdout": {"test": 0.2}, "train": str(same)}
    cfg["run"]["name"] = "from-file"
    path.write_text(yaml.safe_dump(cfg))
    _, from_file = train(path)
    assert from_dataset["test"]["general"] == from_file["test"]["general"]
    assert from_dataset["test"]["task"]["f1"] == from_file["test"]["task"]["f1"]
    with pytest.raises(DataError, match=r"wiki.parquet\[train\]: no column 'text' \(columns: content, id\)"):
        cfg["sources"]["general"] = {"objective": "masked-lm", "dataset": {"path": str(tmp_path / "wiki.parquet")}}
        cfg["run"]["name"] = "no-column"
        path.write_text(yaml.safe_dump(cfg))
        train(path)


def test_chat_rows_from_a_dataset_train_on_every_assistant_reply(tmp_path, tiny_llama_dir):
    from transformers import AutoTokenizer

    from routetune.data.hf_datasets import prompts

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tok.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                         "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
    sharegpt = datasets.Dataset.from_list([{"conversations": [
        {"from": "human", "value": "where is paris"}, {"from": "gpt", "value": "in france"},
        {"from": "human", "value": "and london"}, {"from": "gpt", "value": "the apple store"}]}])
    (example,) = prompts(sharegpt, {}, "chats[train]", tok)
    assert example.completion == "the apple store" and example.origin == "chats[train]:1"
    assert [example.text[a:b] for a, b in example.trained] == ["in france</s>\n"]
    rows = datasets.Dataset.from_list([{"q": "name a city", "ctx": "", "a": "paris"}])
    (alpaca,) = prompts(rows, {"instruction": "q", "input": "ctx", "output": "a"}, "alp[train]", tok)
    assert alpaca.completion == "paris" and "name a city" in alpaca.text and alpaca.trained == ()
    with pytest.raises(DataError, match=r"qa\[train\]: expected prompt and completion columns, a messages column"):
        prompts(datasets.Dataset.from_list([{"q": "x", "a": "y"}]), {}, "qa[train]", tok)
