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

Padding-free batches (:mod:`routetune.model.packing`) need their own attention function too: this
module registers both routetune implementations, each inside the padding-free wrapper (which is
the plain function when no layout is passed): ``routetune_sdpa`` (the function above) and
``routetune_eager`` (the model's own eager attention, for models that use eager attention).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from routetune.model import packing
from routetune.model.fast_dropout import fast_dropout

NAME = packing.SDPA_NAME


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


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask as eager attention adds it: 0 where allowed, the dtype's minimum elsewhere."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def _model_eager(module: nn.Module):
    """The eager attention function of the module's own modeling file (transformers defines one
    per model; it is not in the AttentionInterface)."""
    return inspect.getmodule(type(module)).eager_attention_forward


def _eager(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """The model's eager attention, given the masks SDPA's mask function makes (boolean or None;
    None: no padding, so only the causal part is left)."""
    if attention_mask is None and (is_causal if is_causal is not None else getattr(module, "is_causal", False)):
        q, k = query.shape[2], key.shape[2]
        if q > 1:
            attention_mask = torch.ones(q, k, dtype=torch.bool, device=query.device).tril(k - q)[None, None]
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        attention_mask = _additive(attention_mask, query.dtype)
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    return _model_eager(module)(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


def register() -> None:
    """Register routetune's attention functions and their mask functions with transformers
    (idempotent). The eager one gets transformers' eager masks (additive, made without reading
    the mask on the host), the SDPA one SDPA's; neither makes a mask for a packed forward."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

    AttentionInterface.register(packing.SDPA_NAME, packing.packed(sdpa_fast_dropout))
    AttentionInterface.register(packing.EAGER_NAME, packing.packed(_eager))
    AttentionMaskInterface.register(packing.SDPA_NAME, packing.masks(sdpa_mask))
    AttentionMaskInterface.register(packing.EAGER_NAME, packing.masks(eager_mask))


def use_packed_attention(lm: nn.Module) -> None:
    """Route the LM's attention through routetune's functions (eager models through
    ``routetune_eager``, others ``routetune_sdpa``); without a layout they compute what the
    model's own did."""
    register()
    current = lm.config._attn_implementation
    lm.set_attn_implementation(packing.EAGER_NAME if current in ("eager", packing.EAGER_NAME) else packing.SDPA_NAME)


def attention_dropout(config) -> float:
    """The attention-probability dropout a model's config trains with (BERT's name or Llama's)."""
    return getattr(config, "attention_probs_dropout_prob", None) or getattr(config, "attention_dropout", 0.0)


def use_fast_attention_dropout(lm: nn.Module) -> bool:
    """Switch an SDPA model that trains with attention dropout to :func:`sdpa_fast_dropout`.
    Returns whether it switched (not for eager attention or attention dropout 0)."""
    config = lm.config
    if config._attn_implementation != "sdpa" or not attention_dropout(config):
        return False
    register()
    lm.set_attn_implementation(NAME)
    return True
