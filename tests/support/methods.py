"""The contract table of the parameter-sharing methods (tests/model/test_methods.py runs it; the
registry test adds a toy method through it) and the tiny config it trains."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from routetune.errors import ConfigError
from routetune.model.methods import METHODS as METHOD_REGISTRY
from routetune.model.routed import RoutedModel
from routetune.training.checkpoint import run_checkpoint
from routetune.workflow import train
from support.sample_files import GENERAL


METHODS = [
    # (peft, freeze, which backbone parameters may change)
    ({"method": "none"}, {}, "all"),
    ({"method": "lora", "r": 4}, {}, "adapters"),
    ({"method": "dora", "r": 4}, {}, "adapters"),
    ({"method": "ia3"}, {}, "adapters"),
    ({"method": "adapter", "adapter_size": 8}, {}, "adapters"),
    ({"method": "adapter", "adapter_size": 8, "adapter_placement": ["ffn"]}, {}, "adapters"),
    ({"method": "prompt_tuning", "num_virtual_tokens": 4}, {}, "none"),
    ({"method": "prefix_tuning", "num_virtual_tokens": 4}, {}, "none"),
    ({"method": "bitfit"}, {}, "biases"),
    ({"method": "none"}, {"embeddings": True}, "not-embeddings"),
    ({"method": "none"}, {"top_k_layers": 1}, "top-layer"),
    ({"method": "none"}, {"head_only": True}, "none"),
]


def _config(tmp_path, model_dir, decoder, peft, freeze, **train):
    text = tmp_path / "general.txt"
    text.write_text(GENERAL)
    cls = tmp_path / "cls.jsonl"
    cls.write_text("".join(json.dumps({"text": t, "label": y}) + "\n"
                           for t, y in [("a great film", "pos"), ("the worst store", "neg")] * 8))
    cfg = {
        "model": {"name": str(model_dir), "max_length": 24},
        "sources": {
            "cls": {"objective": "sequence-classification", "train": str(cls)},
            "general": {"objective": "language-modeling", "train": str(text)},
        },
        "routing": {"strategy": "interleaved", "weights": {"cls": 0.5, "general": 0.5}},
        "train": {
            "precision": "fp32",
            "device": "cpu",
            "max_steps": 3,
            "batch_size": 4,
            "lr": 1e-2,
            "progress": False,
            "seed": 3,
            "weight_decay": 0.0,
            **train,
        },
        "peft": peft,
        "freeze": freeze,
        "run": {"name": "r", "output_dir": str(tmp_path / "runs")},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _expected_change(kind, name, decoder):
    embed = "embed_tokens" in name or ".embeddings." in name
    if kind == "all":
        return True
    if kind == "adapters":
        return "lora_" in name or "ia3_" in name or ".adapter." in name
    if kind == "biases":
        return name.endswith(".bias") and "LayerNorm" not in name or name.endswith("LayerNorm.bias")
    if kind == "not-embeddings":
        return not embed
    if kind == "top-layer":
        return ".layer.1." in name or ".layers.1." in name
    if kind == "norms":
        return "norm" in name.lower()
    return False


def check_method_contract(tmp_path, model_dir, decoder, peft, freeze, kind):
    """One row of the table: train 3 steps, save, load; only the intended parameters changed;
    outputs identical after loading; the checkpoint holds the method's format."""
    path = _config(tmp_path, model_dir, decoder, peft, freeze)
    if peft["method"] == "bitfit" and decoder:
        with pytest.raises(ConfigError, match="bitfit trains only bias terms, and this backbone has none"):
            train(path)
        return
    if freeze.get("head_only") and decoder:
        with pytest.raises(ConfigError, match="sources.general: nothing its causal-lm loss reaches is trainable"):
            train(path)
        return
    from routetune.config import load_config
    from routetune.training.setup import prepare

    before = {n: p.detach().clone() for n, p in prepare(load_config(path)).model.lm.named_parameters()}
    run_dir, _ = train(path)
    folder = run_checkpoint(run_dir, "last")
    loaded = RoutedModel.load(folder)
    # every backbone parameter changed only if the method trains it (the LM head's own parameters
    # and the task heads always train)
    prefix = loaded.lm.base_model_prefix + "."
    changed = [n for n, p in loaded.lm.named_parameters()
               if n.startswith(prefix) and n in before and not torch.equal(p, before[n])]
    wrong = [n for n in changed if not _expected_change(kind, n, decoder)]
    assert not wrong, f"{wrong[:5]} changed under {peft} {freeze}"
    prompt = peft["method"] in ("prompt_tuning", "prefix_tuning")
    assert bool(changed) == (kind != "none" and not prompt) or prompt and not changed
    if prompt:  # the virtual tokens trained, and they are all that changed in the backbone's path
        fresh = prepare(load_config(path)).model.prompt.embedding.weight
        assert not torch.equal(loaded.prompt.embedding.weight, fresh)
    # save -> load gives identical outputs
    ids = torch.randint(5, 60, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    trained = RoutedModel.load(folder)
    assert torch.equal(loaded.head_logits("cls", ids, mask), trained.head_logits("cls", ids, mask))
    fmt = METHOD_REGISTRY[{"none": "full"}.get(peft["method"], peft["method"])].checkpoint
    if fmt == "trained":  # only the trained tensors + a manifest
        assert not (folder / "model.safetensors").exists()
        trained = {n for n, p in loaded.lm.named_parameters() if p.requires_grad}
        assert set(load_file(str(folder / "lm_trainable.safetensors"))) == trained
    if prompt:  # peft's format: PeftModel.from_pretrained loads the same virtual tokens
        assert (folder / "adapter_config.json").is_file() and not (folder / "model.safetensors").exists()
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

        base_cls = AutoModelForCausalLM if decoder else AutoModelForMaskedLM
        plain = PeftModel.from_pretrained(base_cls.from_pretrained(model_dir), str(folder)).eval()
        theirs = plain.prompt_encoder["default"].embedding.weight
        assert torch.equal(theirs, loaded.prompt.embedding.weight)
        if decoder:  # same next-token logits as peft's own forward on the real positions
            ours = loaded.lm_logits(ids, mask)
            out = plain(input_ids=ids, attention_mask=mask).logits
            assert torch.allclose(ours, out[:, -ids.shape[1]:], atol=1e-5)
    if fmt == "adapter" and not prompt:
        assert (folder / "adapter_config.json").is_file() and not (folder / "model.safetensors").exists()
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

        base_cls = AutoModelForCausalLM if decoder else AutoModelForMaskedLM
        plain = PeftModel.from_pretrained(base_cls.from_pretrained(model_dir), str(folder)).eval()
        ours = loaded.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
        theirs = plain.base_model.model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        assert torch.allclose(ours, theirs, atol=1e-6)
