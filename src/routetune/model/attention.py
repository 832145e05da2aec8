"""Attention-probability dropout with the cheap random source of :mod:`routetune.model.fast_dropout`.

An encoder trained with attention dropout (BERT's `attention_probs_dropout_prob`, 0.1 for
minilm-l6) asks PyTorch's SDPA for ``dropout_p > 0``. On CPU that rules out the fused kernel, and
the math path draws one Bernoulli sample per attention weight from the generator, a visible
share of a minilm-l6 NER step on a 2-core CPU (measured in docs/benchmarks.md). This attention function computes
the same thing (softmax(QK^T * scale + mask), dropout, times V) with the 16-bit-uniform dropout
when training with dropout, and hands everything else (evaluation, dropout 0, grouped-query
attention, position biases) to transformers' own SDPA function unchanged.

It is registered with transformers' ``AttentionInterface`` under its own name, so only models
that opt in use it; a saved config keeps naming ``sdpa``. Written here because neither torch nor
transformers offers attention dropout with a cheaper random source.
"""

from __future__ import annotations

import torch
from torch import nn

from routetune.model.fast_dropout import fast_dropout

NAME = "routetune_sdpa"


def math_attention(module: nn.Module, query, key, value, attention_mask, dropout: float, scaling, is_causal):
    """softmax(QK^T * scale + mask) -> dropout (16-bit uniforms) -> times V, as [b, q, heads, d]."""
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale
    q_len, k_len = scores.shape[-2:]
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:  # SDPA's boolean mask: True = may attend
            scores = scores.masked_fill(~attention_mask, float("-inf"))
        else:
            scores = scores + attention_mask
    elif is_causal and q_len > 1:
        causal = torch.ones(q_len, k_len, dtype=torch.bool, device=scores.device).tril(k_len - q_len)
        scores = scores.masked_fill(~causal, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    if dropout > 0.0:
        probs = fast_dropout(probs, dropout)
    return torch.matmul(probs, value).transpose(1, 2).contiguous()


def sdpa_fast_dropout(module: nn.Module, query, key, value, attention_mask, dropout: float = 0.0,
                      scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    simple = (kwargs.get("position_bias") is None and kwargs.get("softcap") is None
              and getattr(module, "num_key_value_groups", 1) == 1 and key.shape[2] == query.shape[2])
    if dropout == 0.0 or not simple:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    return math_attention(module, query, key, value, attention_mask, dropout, scaling, causal), None


def use_fast_attention_dropout(lm: nn.Module) -> bool:
    """Switch an SDPA model that trains with attention dropout to :func:`sdpa_fast_dropout`.
    Returns whether it switched (not for eager attention or attention dropout 0)."""
    from routetune.model import packing

    config = lm.config
    p = getattr(config, "attention_probs_dropout_prob", None) or getattr(config, "attention_dropout", 0.0)
    if config._attn_implementation != "sdpa" or not p:
        return False
    packing.register()  # sdpa_fast_dropout, inside the padding-free wrapper (a no-op without a layout)
    lm.set_attn_implementation(NAME)
    return True
