"""Prompt tuning and prefix tuning on routetune's shared backbone.

The trained modules are the peft library's own (``PromptEmbedding``, ``PrefixEncoder``) and the
checkpoints are peft's format (``adapter_config.json`` + ``adapter_model.safetensors`` with
``prompt_embeddings``), so ``PeftModel.from_pretrained`` loads them onto the base model. The
wiring is ours because routetune's task heads read the backbone's hidden states directly (a
``PeftModel`` task class would own the head): prompt tuning prepends the virtual-token
embeddings to ``inputs_embeds`` and drops those positions from the outputs, so token heads see
one state per real token; prefix tuning passes the virtual keys/values of every layer as a
pre-filled cache (the attention mask grows by the prefix; positions start after it, as in peft).
"""

from __future__ import annotations

import torch
from torch import nn

from routetune.model import init

METHODS = ("prompt_tuning", "prefix_tuning")


def _kv_geometry(config) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) of the backbone's self-attention."""
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv, head_dim


def peft_prompt_config(method: str, n_virtual: int, config, decoder: bool, base_path: str):
    import peft

    layers, kv, head_dim = _kv_geometry(config)
    common = dict(task_type="CAUSAL_LM" if decoder else "FEATURE_EXTRACTION", num_virtual_tokens=n_virtual,
                  num_transformer_submodules=1, num_layers=layers, base_model_name_or_path=base_path)
    if method == "prompt_tuning":
        return peft.PromptTuningConfig(token_dim=config.hidden_size, num_attention_heads=config.num_attention_heads,
                                       prompt_tuning_init="RANDOM", **common)
    # the prefix is stored per key/value head (grouped-query attention keeps fewer of them)
    return peft.PrefixTuningConfig(token_dim=kv * head_dim, num_attention_heads=kv, prefix_projection=False,
                                   encoder_hidden_size=config.hidden_size, **common)


def build_prompt_module(pconfig, word_embeddings: nn.Embedding, generator: torch.Generator) -> nn.Module:
    """peft's module; prompt tuning starts from embeddings of random vocabulary tokens (so the
    virtual tokens have the scale of real ones), prefix tuning from peft's initialisation."""
    from peft.tuners.prefix_tuning import PrefixEncoder
    from peft.tuners.prompt_tuning import PromptEmbedding

    if pconfig.peft_type.value == "PROMPT_TUNING":
        module = PromptEmbedding(pconfig, word_embeddings)
        ids = init.randint(word_embeddings.num_embeddings, (pconfig.num_virtual_tokens,), generator,
                           word_embeddings.weight.device)
        with torch.no_grad():
            module.embedding.weight.copy_(word_embeddings.weight[ids].float())
        return module
    return PrefixEncoder(pconfig)


def virtual_tokens(module: nn.Module, n: int, batch: int) -> torch.Tensor:
    device = next(module.parameters()).device
    idx = torch.arange(n, device=device).unsqueeze(0).expand(batch, -1)
    return module(idx)


def prefix_cache(module: nn.Module, config, n: int, batch: int):
    """A DynamicCache pre-filled with the virtual keys/values of every layer."""
    from transformers import DynamicCache

    layers, kv, head_dim = _kv_geometry(config)
    past = virtual_tokens(module, n, batch).view(batch, n, layers * 2, kv, head_dim).permute(2, 0, 3, 1, 4)
    cache = DynamicCache()
    for layer in range(layers):
        cache.update(past[2 * layer], past[2 * layer + 1], layer)
    return cache
