"""Which modules get adapters when `peft.target_modules` is not given: peft's own default for the
architecture, or every linear layer but the output projection (peft's 'all-linear') where peft has
none. One row per architecture family transformers can build from a config, each a tiny random
model saved to a folder and loaded the way a run loads it."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

from routetune.config.schema import FreezeConfig, PeftConfig
from routetune.errors import ConfigError
from routetune.model.routed import build_model
from routetune.model.trainable import apply_method

SMALL = {"vocab_size": 64, "hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 32,
         "max_position_embeddings": 64}
DECODER = {**SMALL, "num_hidden_layers": 2, "num_key_value_heads": 2, "head_dim": 8}

# model type -> (its config, the module names (suffixes) that get LoRA, those that get IA3 or None: refused)
FAMILIES = {
    "bert": ({**SMALL, "num_hidden_layers": 2}, {"query", "value"}, {"key", "value", "dense"}),
    "distilbert": ({"vocab_size": 64, "dim": 16, "n_layers": 2, "n_heads": 2, "hidden_dim": 32,
                    "max_position_embeddings": 64},
                   {"q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2", "vocab_transform"}, None),
    "roberta": ({**SMALL, "num_hidden_layers": 2, "max_position_embeddings": 70}, {"query", "value"},
                {"key", "value", "dense"}),
    "gpt2": ({"vocab_size": 64, "n_embd": 16, "n_layer": 2, "n_head": 2, "n_positions": 64}, {"c_attn"},
             {"c_attn", "c_proj"}),
    "llama": (DECODER, {"q_proj", "v_proj"}, {"k_proj", "v_proj", "down_proj"}),
    "qwen2": (DECODER, {"q_proj", "v_proj"}, {"q_proj", "v_proj", "down_proj"}),
    "phi3": ({**DECODER, "pad_token_id": 0}, {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}, None),
    "mistral": (DECODER, {"q_proj", "v_proj"}, {"k_proj", "v_proj", "down_proj"}),
    "gemma": (DECODER, {"q_proj", "v_proj"}, {"q_proj", "v_proj", "down_proj"}),
}


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    out = {}
    for model_type, (options, _, _) in FAMILIES.items():
        config = AutoConfig.for_model(model_type, **options)
        decoder = model_type in ("gpt2", "llama", "qwen2", "phi3", "mistral", "gemma")
        torch.manual_seed(0)
        model = (AutoModelForCausalLM if decoder else AutoModelForMaskedLM).from_config(config)
        model.save_pretrained(root / model_type)
        out[model_type] = root / model_type
    return out


def _adapted(model, marker: str) -> set[str]:
    """The last names of the modules that hold an adapter tensor named with `marker`."""
    return {n.split("." + marker)[0].rpartition(".")[2] for n, _ in model.lm.named_parameters() if marker in n}


@pytest.mark.parametrize("model_type", FAMILIES)
def test_lora_goes_where_peft_puts_it(family_dirs, model_type):
    _, expected, _ = FAMILIES[model_type]
    model = build_model(str(family_dirs[model_type]), 0)
    apply_method(model, PeftConfig(method="lora", r=2), FreezeConfig(), str(family_dirs[model_type]))
    assert _adapted(model, "lora_A") == expected
    trainable = {n for n, p in model.lm.named_parameters() if p.requires_grad}
    head = {n for n, p in model.lm.named_parameters() if not n.startswith(model.lm.base_model_prefix + ".")}
    # the adapters, and of the LM head only its parts beside the vocabulary projection (BERT's transform, bias)
    assert trainable and all("lora_" in n or n in head for n in trainable), sorted(trainable)[:5]
    assert not model.lm.get_output_embeddings().weight.requires_grad
    ids = torch.randint(1, 60, (2, 7), generator=torch.Generator().manual_seed(0))
    model.lm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float().pow(2).mean().backward()
    b = [p for n, p in model.lm.named_parameters() if "lora_B" in n]  # A's gradient is 0 while B starts at 0
    assert b and all(p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0 for p in b)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_ia3_goes_where_peft_puts_it_or_is_refused_naming_the_key(family_dirs, model_type):
    _, _, expected = FAMILIES[model_type]
    model = build_model(str(family_dirs[model_type]), 0)
    pcfg = PeftConfig(method="ia3")
    if expected is None:
        with pytest.raises(ConfigError, match="peft.target_modules: peft has no IA3 default for model type"):
            apply_method(model, pcfg, FreezeConfig(), str(family_dirs[model_type]))
        return
    apply_method(model, pcfg, FreezeConfig(), str(family_dirs[model_type]))
    assert _adapted(model, "ia3_l") == expected


def test_named_target_modules_win(family_dirs):
    model = build_model(str(family_dirs["llama"]), 0)
    apply_method(model, PeftConfig(method="lora", r=2, target_modules=["o_proj"]), FreezeConfig(),
                 str(family_dirs["llama"]))
    assert _adapted(model, "lora_A") == {"o_proj"}


@pytest.mark.parametrize("method", ["lora", "ia3", "adapter", "prompt_tuning"])
def test_the_vocabulary_projection_trains_only_when_asked(family_dirs, method):
    """An untied decoder (Phi-3, Llama-3, Mistral): its output matrix is vocabulary x hidden."""
    path = str(family_dirs["llama"])
    options = {"target_modules": ["q_proj", "v_proj"]} if method == "ia3" else {}
    for asked in (False, True):
        model = build_model(path, 0)
        assert not model.lm.config.tie_word_embeddings
        apply_method(model, PeftConfig(method=method, train_lm_head=asked, **options), FreezeConfig(), path)
        assert model.lm.get_output_embeddings().weight.requires_grad == asked
    full = build_model(path, 0)
    apply_method(full, PeftConfig(method="full"), FreezeConfig(), path)
    assert full.lm.get_output_embeddings().weight.requires_grad
