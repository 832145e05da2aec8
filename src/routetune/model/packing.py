"""Padding-free batches: the real tokens of a padded batch in one row, no compute on padding.

A batch of examples of different lengths is padded to its longest row, and every layer but
attention is token by token: the projections, feed-forward layers, layer norms and dropout of
a padded batch spend their time on padding too (in a randomly ordered WNUT-17 batch of 16 about
half its positions). Here the backbone runs on the batch's real tokens packed into one row
(`[1, tokens]`), each example with its own position ids (restarting at 0), and attention is
the only step that sees the examples apart: a registered attention function
(:func:`packed_attention`) lays the packed queries, keys and values out as the padded batch,
runs the model's own attention kernel there with the batch's padding (and, for a decoder,
causal) mask, and packs the result again. So no example attends to another, every example's
attention is the kernel and mask of the unpacked batch, and everything else computes on the
real tokens only. The backbone's output is scattered back into the padded layout (zeros at
padding), so task heads, LM losses and metrics see the batch exactly as before: only how the
batch is laid out inside the backbone changes, never which examples a step trains on.

Transformers' own padding-free path (`DataCollatorWithFlattening`) keeps examples apart only
through position ids, which flash-attention kernels honour and the CPU's SDPA and eager kernels
do not (an encoder like BERT would attend across examples); hence this function, registered
with transformers' ``AttentionInterface`` under names of its own, so only models that opt in use
it. The model types below are those whose position ids are plain 0..n-1 and whose attention is
called through that interface with the keyword arguments of the model's forward; tests check
each against the unpacked batch (tests/model/test_packing.py).
"""

from __future__ import annotations

import inspect
import logging
from contextvars import ContextVar

import torch
from torch import nn

from routetune.model.attention import NAME as SDPA_NAME, sdpa_fast_dropout

log = logging.getLogger("routetune")

PACKABLE_TYPES = frozenset({"bert", "llama", "mistral", "qwen2", "qwen3"})
EAGER_NAME = "routetune_eager"
LAYOUT = "routetune_layout"  # keyword argument carried by transformers from the model's forward to attention
PACKED_INDEX = "packed_index"  # batch key: flat (row * width + position) index of each real token
# set while a packed forward builds its masks: the mask functions then return None (the attention
# function makes the padded batch's own mask), and transformers' check whether the all-ones mask
# has padding, a host read on a GPU, is never made
_PACKED: ContextVar[bool] = ContextVar("routetune_packed", default=False)


class Layout:
    """Where a padded batch's real tokens are: `index` into the flattened [rows x width]
    positions, in order, and each token's position id within its example. Built from the
    attention mask (any padding side); `index` may come precomputed with the batch (on the CPU,
    :func:`packed_index`), because working it out on a GPU would make the host wait."""

    def __init__(self, attention_mask: torch.Tensor, index: torch.Tensor | None = None):
        self.mask = attention_mask.bool()
        self.rows, self.width = attention_mask.shape
        self.index = packed_index(attention_mask) if index is None else index
        self.positions = (attention_mask.long().cumsum(1) - 1).flatten().index_select(0, self.index)[None]

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """[rows, width, ...] -> [1, tokens, ...]"""
        return x.flatten(0, 1).index_select(0, self.index)[None]

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """[1, tokens, ...] -> [rows, width, ...], zeros at padding."""
        flat = x[0]
        out = flat.new_zeros((self.rows * self.width, *flat.shape[1:])).index_copy(0, self.index, flat)
        return out.view(self.rows, self.width, *flat.shape[1:])

    def heads_to_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Attention's [1, heads, tokens, d] -> the padded batch's [rows, heads, width, d]."""
        return self.unpack(x.transpose(1, 2)).transpose(1, 2)

    def rows_to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """An attention output [rows, width, heads, d] -> [1, tokens, heads, d]."""
        return self.pack(x)

    def attention_mask(self, causal: bool) -> torch.Tensor:
        """Boolean mask (True: may attend) of the padded batch: [rows, 1, 1, width] (keys), and
        for a decoder causal too: [rows, 1, width, width]."""
        keys = self.mask[:, None, None, :]
        if not causal:
            return keys
        tri = torch.ones(self.width, self.width, dtype=torch.bool, device=self.mask.device).tril()
        return tri[None, None] & keys


def packed_index(attention_mask: torch.Tensor) -> torch.Tensor:
    return attention_mask.flatten().nonzero().squeeze(1)


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


def _packed(inner):
    def attend(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None,
               **kwargs):
        layout = kwargs.pop(LAYOUT, None)
        if layout is None:
            return inner(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                         is_causal=is_causal, **kwargs)
        causal = getattr(module, "is_causal", False)
        q, k, v = (layout.heads_to_rows(t) for t in (query, key, value))
        out, _ = inner(module, q, k, v, layout.attention_mask(causal), dropout=dropout, scaling=scaling,
                       is_causal=False, **kwargs)
        return layout.rows_to_tokens(out), None
    return attend


packed_attention = _packed(sdpa_fast_dropout)
packed_eager_attention = _packed(_eager)


def why_not(model) -> str | None:
    """Why `model` (a RoutedModel) cannot train padding-free, or None when it can."""
    cfg = model.config
    if model.prompt is not None:
        return f"{model.method.name} adds virtual tokens to every example"
    if cfg.model_type not in PACKABLE_TYPES:
        return f"model type {cfg.model_type!r} is not one routetune has checked ({', '.join(sorted(PACKABLE_TYPES))})"
    if cfg._attn_implementation not in ("sdpa", "eager", SDPA_NAME, EAGER_NAME):
        return f"attention {cfg._attn_implementation!r}"
    return None


def _mask(*args, **kwargs):
    """SDPA's masks (boolean; _eager makes them additive), none while a packed forward runs."""
    from transformers.masking_utils import sdpa_mask

    return None if _PACKED.get() else sdpa_mask(*args, **kwargs)


def register() -> None:
    """Register routetune's attention functions with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(SDPA_NAME, packed_attention)
    AttentionInterface.register(EAGER_NAME, packed_eager_attention)
    AttentionMaskInterface.register(SDPA_NAME, _mask)
    AttentionMaskInterface.register(EAGER_NAME, _mask)


def use_packed_attention(lm: nn.Module) -> None:
    """Route the LM's attention through :func:`packed_attention` (SDPA models) or
    :func:`packed_eager_attention` (eager ones); without a layout they compute what they did."""
    register()
    current = lm.config._attn_implementation
    lm.set_attn_implementation(EAGER_NAME if current in ("eager", EAGER_NAME) else SDPA_NAME)


def run_packed(module: nn.Module, layout: Layout, input_ids: torch.Tensor):
    """`module` (a transformers backbone or LM) on the packed batch; returns its output. The
    all-ones mask keeps transformers from reading the position ids as packed sequences (working
    that out reads a value on the host)."""
    ids = layout.pack(input_ids)
    token = _PACKED.set(True)
    try:
        return module(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=layout.positions,
                      **{LAYOUT: layout})
    finally:
        _PACKED.reset(token)
