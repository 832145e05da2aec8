"""Shared fixtures: a tiny random-weight BERT (2 layers, hidden 32) with a character-level
WordPiece vocabulary, built in the test session; small CoNLL and text files."""

from __future__ import annotations

import logging
import os
import string
import tempfile
import textwrap
from pathlib import Path

import forkserver
import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRACKIO_DIR", tempfile.mkdtemp(prefix="routetune-tests-trackio-"))  # not the user's


CUDA = torch.cuda.is_available()


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not CUDA, reason="no CUDA device on this machine")])])
def device(request) -> str:
    """Run a device-agnostic test on the CPU and, where present, on the GPU (shown as skipped elsewhere)."""
    return request.param


def cli_env(fault: str | None = None, **extra: str) -> dict:
    """The environment of a command-line child in the tests: this process's, a fixed hash seed,
    and a fault point (training/faults.py) only where one is asked for."""
    env = {**os.environ, "PYTHONHASHSEED": "0", **extra}
    env.pop("ROUTETUNE_FAULT", None)
    if fault:
        env["ROUTETUNE_FAULT"] = fault
    return env


def run_cli(*args, fault=None, check=True, env_extra=None):
    """`python -m routetune.cli ARGS` in a child process (optionally killed at a fault point),
    forked from one that has the heavy modules imported (forkserver.py)."""
    proc = forkserver.run("routetune.cli", [str(a) for a in args], cli_env(fault, **(env_extra or {})), timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(autouse=True, scope="session")
def _private_before_cache(tmp_path_factory):
    """Base-model scores of test runs go to a temporary cache, not the user's."""
    os.environ["ROUTETUNE_BEFORE_CACHE"] = str(tmp_path_factory.mktemp("before-cache"))
    yield

WORDS = ["the", "a", "in", "and", "of", "to", "paris", "apple", "store", "opened", "london", "john"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    import transformers
    from transformers import BertConfig, BertForMaskedLM, BertTokenizer

    transformers.utils.logging.disable_progress_bar()
    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(string.ascii_lowercase)
             + ["##" + c for c in string.ascii_lowercase] + list(string.digits)
             + ["##" + c for c in string.digits] + list(string.punctuation) + WORDS)
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    tok.save_pretrained(folder)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(0)
    BertForMaskedLM(cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A tiny random Llama (2 layers, hidden 32) with a word-piece tokenizer that adds no special
    tokens, as decoder tokenizers do; </s> is the end of sequence and <pad> the padding."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    transformers.utils.logging.disable_progress_bar()
    folder = tmp_path_factory.mktemp("tiny-llama")
    vocab = (["<pad>", "<unk>", "<s>", "</s>"] + list(string.ascii_letters) + ["##" + c for c in string.ascii_letters]
             + list(string.digits) + list(string.punctuation) + WORDS)
    core = Tokenizer(models.WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    core.decoder = decoders.WordPiece()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>")
    tok.save_pretrained(folder)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=0, bos_token_id=2, eos_token_id=3, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from routetune.model.load import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


NER_TRAIN = """\
-DOCSTART- O

John\tB-person
opened\tO
a\tO
store\tO
in\tO
Paris\tB-location
.\tO

Apple\tB-corporation
opened\tO
in\tO
London\tB-location

the\tO
store\tO
of\tO
John\tB-person
Smith\tI-person
"""


def write_ner(folder: Path, n_repeat: int = 8) -> dict[str, Path]:
    """Small train/dev/test CoNLL files (train repeated so a few epochs have some batches)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, repeat in (("train", n_repeat), ("dev", 2), ("test", 2)):
        p = folder / f"{split}.conll"
        body = NER_TRAIN.replace("-DOCSTART- O\n\n", "")
        p.write_text("-DOCSTART- O\n\n" + "\n".join([body] * repeat), encoding="utf-8")
        paths[split] = p
    return paths


GENERAL = textwrap.dedent("""\
    The river runs slowly through the old town and the bridges cast long shadows.
    Bread needs flour, water, salt and yeast, and time to rise in a cool kitchen.
    Libraries are busy places where people read, learn and meet each other.
    """) * 20


def write_task_and_general(root: Path) -> dict[str, Path]:
    """The small NER files plus a general text, under `root` (for module-scoped fixtures too)."""
    paths = write_ner(root / "ner")
    general = root / "general.txt"
    general.write_text(GENERAL, encoding="utf-8")
    paths["general"] = general
    return paths


@pytest.fixture
def ner_files(tmp_path) -> dict[str, Path]:
    return write_task_and_general(tmp_path)


def make_config(tmp_path: Path, model_dir: Path, files: dict, **overrides) -> Path:
    """Write a tiny-run YAML config and return its path."""
    import yaml

    cfg = {
        "model": {"name": str(model_dir), "max_length": 32},
        "sources": {
            "ner": {"objective": "token-classification", "train": str(files["train"]),
                    "dev": str(files["dev"]), "test": str(files["test"])},
            "general": {"objective": "masked-lm", "train": str(files["general"])},
        },
        "routing": {"weights": {"ner": 0.75, "general": 0.25}, "seed": 3},
        "train": {"precision": "fp32", "device": "cpu", "epochs": 2, "batch_size": 4, "lr": 1e-3, "seed": 1, "progress": False,
                  "early_stopping": {"metric": "ner/f1", "patience": 5}},
        "run": {"name": "tiny", "output_dir": str(tmp_path / "runs")},
    }
    for key, value in overrides.items():
        node = cfg
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def _quiet_logs():
    logging.getLogger("routetune").setLevel(logging.WARNING)
    yield


POLARITY = {
    "pos": ["a great film and a joy", "the best store in london", "john is great", "a joy to watch",
            "the film is a joy and great"],
    "neg": ["a dull film", "the worst store of paris", "john is dull and slow", "a slow and dull film",
            "the worst of the worst"],
}


@pytest.fixture
def class_files(tmp_path) -> dict[str, Path]:
    """The same small two-class data in every supported layout."""
    import json

    folder = tmp_path / "cls"
    folder.mkdir()
    rows = [(t, label) for label, texts in POLARITY.items() for t in texts] * 3
    (folder / "train.jsonl").write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    (folder / "train.csv").write_text("text,label\n" + "".join(f'"{t}",{y}\n' for t, y in rows))
    (folder / "train.tsv").write_text("label\ttext\n" + "".join(f"{y}\t{t}\n" for t, y in rows))
    for label, texts in POLARITY.items():
        (folder / f"lines.{label}").write_text("\n".join(texts * 3) + "\n")
        (folder / "folders" / label).mkdir(parents=True)
        for i, t in enumerate(texts * 3):
            (folder / "folders" / label / f"{i}.txt").write_text(t)
    (folder / "dev.jsonl").write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows[::3]))
    return {"jsonl": folder / "train.jsonl", "csv": folder / "train.csv", "tsv": folder / "train.tsv",
            "lines-per-class": folder / "lines.*", "folders": folder / "folders", "dev": folder / "dev.jsonl"}
