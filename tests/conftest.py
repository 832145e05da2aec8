"""Fixtures: a tiny random-weight BERT (2 layers, hidden 32) with a character-level
WordPiece vocabulary, built in the test session; small CoNLL and text files."""

from __future__ import annotations

import logging
import os
import string
import tempfile
from pathlib import Path

import pytest
import torch

from support import CUDA, POLARITY, WORDS, write_task_and_general

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRACKIO_DIR", tempfile.mkdtemp(prefix="routetune-tests-trackio-"))  # not the user's




@pytest.fixture(params=["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not CUDA, reason="no CUDA device on this machine")])])
def device(request) -> str:
    """Run a device-agnostic test on the CPU and, where present, on the GPU (shown as skipped elsewhere)."""
    return request.param


@pytest.fixture(autouse=True, scope="session")
def _private_before_cache(tmp_path_factory):
    """Base-model scores of test runs go to a temporary cache, not the user's."""
    os.environ["ROUTETUNE_BEFORE_CACHE"] = str(tmp_path_factory.mktemp("before-cache"))
    yield




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


@pytest.fixture
def ner_files(tmp_path) -> dict[str, Path]:
    return write_task_and_general(tmp_path)


@pytest.fixture(autouse=True)
def _quiet_logs():
    logging.getLogger("routetune").setLevel(logging.WARNING)
    yield


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
