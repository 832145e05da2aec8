"""Padding-free batches: the real tokens of a padded batch in one row, no compute on padding.

A batch of examples of different lengths is padded to its longest row, and every layer but
attention is token by token: the projections, feed-forward layers, layer norms and dropout of a
padded batch spend their time on padding too (in a randomly ordered WNUT-17 batch of 16 about
half its positions). Here the backbone runs on the batch's real tokens packed into one row
(`[1, tokens]`), each example with its own position ids (restarting at 0), and attention is the only
step that sees the examples apart: a registered attention function (:func:`packed` around the
model's kernel, registered by model/attention.py) lays the packed queries, keys and values out
as the padded batch, runs the model's own attention kernel there with the batch's padding (and,
for a decoder, causal) mask, and packs the result again. So no example attends to another,
every example's attention is the kernel and mask it would get in a padded batch, and everything
else computes on the real tokens only. The backbone's output is scattered back into the padded
layout (zeros at padding), so task heads, LM losses and metrics see the batch exactly as before:
only how the batch is laid out inside the backbone changes, never which examples a step trains
on.

Transformers' own padding-free path (`DataCollatorWithFlattening`) keeps examples apart only
through position ids, which flash-attention kernels honour and the CPU's SDPA and eager kernels
do not (an encoder like BERT would attend across examples); hence this wrapper, registered with
transformers' ``AttentionInterface`` under names of its own, so only models that opt in use it.
The model types below are those whose position ids are plain 0..n-1 and whose attention is
called through that interface with the keyword arguments of the model's forward; tests check
each against the unpacked batch (tests/model/test_packing.py).
"""

from __future__ import annotations

import functools
from contextvars import ContextVar

import torch
from torch import nn

PACKABLE_TYPES = frozenset({"bert", "llama", "mistral", "qwen2", "qwen3"})
# routetune's attention implementations (registered by model/attention.py): SDPA (with the fast
# attention dropout) and the model's own eager attention, each inside the padding-free wrapper
SDPA_NAME = "routetune_sdpa"
EAGER_NAME = "routetune_eager"
LAYOUT = "routetune_layout"  # keyword argument carried by transformers from the model's forward to attention
PACKED = "packed_layout"  # batch key: the batch's Layout, made on the CPU copy (training/weighting.py)
# set while a packed forward builds its masks: the mask functions then return None (the attention
# function makes the padded batch's own mask), and transformers' check whether the all-ones mask
# has padding, a host read on a GPU, is never made
_PACKED: ContextVar[bool] = ContextVar("routetune_packed", default=False)
class Layout:
    """Where a padded batch's real tokens are: `index`, each real token's flat (row x width +
    position) place in the padded batch, in order (the packed row); `positions`, its position id
    within its example; `keys`, the padding mask as attention takes it. Made on the CPU from the
    attention mask (any padding side), because finding the real tokens reads tensor values: on a
    GPU the batch carries its layout, made on its CPU copy, and :meth:`to` moves it.

    Attention runs on the padded batch's full width. Cutting the batch into groups of similar
    lengths, each padded to its own width, was tried: on WNUT-17 NER steps (batch 16, random
    order) it was no faster, as attention is a small part of a short-sequence step, and its
    varied shapes raised the peak RSS by ~280 MB."""

    def __init__(self, rows: int, width: int, index: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor,
                 lengths: tuple[int, ...], attention: str = "padded"):
        self.rows, self.width, self.index, self.positions, self.keys = rows, width, index, positions, keys
        self.lengths = lengths  # each row's real tokens, read on the CPU copy (no host read on a GPU)
        self.attention = attention  # train.packed_attention: padded, per_example or flex
        self._causal: dict[int, torch.Tensor] = {}  # causal masks by length, made once for all layers
        self._blocks: dict[bool, object] = {}  # FlexAttention block masks (causal or not), made once for all layers

    @classmethod
    def of(cls, attention_mask: torch.Tensor) -> Layout:
        mask = attention_mask.detach().to("cpu", torch.bool)
        index = mask.flatten().nonzero().squeeze(1)
        positions = (mask.long().cumsum(1) - 1).flatten().index_select(0, index)[None]
        lengths = tuple(mask.sum(1).tolist())
        return cls(*mask.shape, index, positions, mask, lengths).to(attention_mask.device)

    def to(self, device, non_blocking: bool = False) -> Layout:
        if torch.device(device) == self.index.device:
            return self
        moved = (t.to(device, non_blocking=non_blocking) for t in (self.index, self.positions, self.keys))
        return Layout(self.rows, self.width, *moved, self.lengths, self.attention)

    def using(self, attention: str) -> Layout:
        """This layout with attention run as `attention` says (train.packed_attention)."""
        if attention == self.attention:
            return self
        return Layout(self.rows, self.width, self.index, self.positions, self.keys, self.lengths, attention)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """[rows, width, ...] -> [1, tokens, ...]"""
        return x.flatten(0, 1).index_select(0, self.index)[None]

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """[1, tokens, ...] -> [rows, width, ...], zeros at padding."""
        flat = x[0]
        out = flat.new_zeros((self.rows * self.width, *flat.shape[1:])).index_copy(0, self.index, flat)
        return out.view(self.rows, self.width, *flat.shape[1:])

    def mask(self, causal: bool) -> torch.Tensor:
        """Boolean (True: may attend): [rows, 1, 1, width] keys, and for a decoder causal too."""
        keys = self.keys[:, None, None, :]
        if not causal:
            return keys
        tri = torch.ones(self.width, self.width, dtype=torch.bool, device=keys.device).tril()
        return tri[None, None] & keys

    def attend(self, attention, query, key, value, causal: bool) -> torch.Tensor:
        """`attention(q, k, v, mask)` (padded-batch tensors [rows, heads, width, d] and a boolean
        mask -> [rows, width, heads, d]) on the packed [1, heads, tokens, d] query, key and value;
        returns [1, tokens, heads, d]."""
        if self.attention == "per_example":
            return self.attend_each(attention, query, key, value, causal)
        q, k, v = (self.unpack(t.transpose(1, 2)).transpose(1, 2) for t in (query, key, value))
        return self.pack(attention(q, k, v, self.mask(causal)))

    def attend_each(self, attention, query, key, value, causal: bool) -> torch.Tensor:
        """The same, with each example's attention run alone on its own length: its slice of the
        packed row, no padding mask (a causal one for a decoder), no padded width. Written here
        because the kernels that take variable lengths do not cover this on a CPU: SDPA on
        jagged nested tensors refuses a causal mask there, and FlexAttention has no CPU backward.
        A loop over the batch's examples: one kernel call per example and layer."""
        out, start = [], 0
        for n in self.lengths:
            if n:
                part = (t[:, :, start:start + n] for t in (query, key, value))
                mask = None
                if causal:
                    if n not in self._causal:
                        self._causal[n] = torch.ones(n, n, dtype=torch.bool, device=query.device).tril()[None, None]
                    mask = self._causal[n]
                out.append(attention(*part, mask))
            start += n
        return torch.cat(out, dim=1)

    def block_mask(self, causal: bool):
        """The FlexAttention block mask of the packed row: a token attends to the tokens of its own
        example (and, for a decoder, not to later ones). Made once per batch from `index` (the row of
        each real token is its flat place // width: no host read), shared by every layer."""
        if causal not in self._blocks:
            from torch.nn.attention.flex_attention import create_block_mask

            example = torch.div(self.index, self.width, rounding_mode="floor")

            def same_example(b, h, q, k):
                return example[q] == example[k]

            def same_example_causal(b, h, q, k):
                return (example[q] == example[k]) & (q >= k)

            n = example.numel()
            self._blocks[causal] = create_block_mask(same_example_causal if causal else same_example, None, None, n, n,
                                                     device=example.device)
        return self._blocks[causal]

    def attend_flex(self, query, key, value, causal: bool, scaling: float | None) -> torch.Tensor:
        """Attention on the packed row itself with FlexAttention and the block mask above: no padded
        width and one kernel call per layer (train.packed_attention=flex). Grouped-query attention is
        the kernel's own (`enable_gqa`). PyTorch has no FlexAttention backward on the CPU, so training
        with it is for CUDA (setup refuses it elsewhere); the CPU computes its forward, eagerly."""
        kernel = _flex_kernel(query.device.type != "cpu")
        out = kernel(query, key, value, block_mask=self.block_mask(causal), scale=scaling,
                     enable_gqa=key.shape[1] != query.shape[1])
        return out.transpose(1, 2).contiguous()


@functools.cache
def _flex_kernel(compiled: bool):
    """FlexAttention as its docs use it: compiled on a GPU (once per process; eager it is a
    reference implementation that holds the whole score matrix), eager on the CPU (forward only)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention) if compiled else flex_attention


def packed(inner):
    """An attention function (transformers' AttentionInterface signature) that runs `inner` on
    the padded layout when a packed forward passes its layout, and is `inner` otherwise."""
    def attend(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None,
               **kwargs):
        layout = kwargs.pop(LAYOUT, None)
        if layout is None:
            return inner(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                         is_causal=is_causal, **kwargs)
        if layout.attention == "flex":
            if dropout:  # setup refuses flex for a model that trains with attention dropout
                raise ValueError("train.packed_attention=flex: FlexAttention has no attention dropout")
            return layout.attend_flex(query, key, value, getattr(module, "is_causal", False), scaling), None
        def attention(q, k, v, mask):
            return inner(module, q, k, v, mask, dropout=dropout, scaling=scaling, is_causal=False, **kwargs)[0]

        return layout.attend(attention, query, key, value, getattr(module, "is_causal", False)), None
    return attend


def why_not(model) -> str | None:
    """Why `model` (a RoutedModel) cannot train padding-free, or None when it can."""
    cfg = model.config
    if model.prompt is not None:
        return f"{model.method.name} adds virtual tokens to every example"
    if cfg.model_type not in PACKABLE_TYPES:
        return f"model type {cfg.model_type!r} is not one routetune has checked ({', '.join(sorted(PACKABLE_TYPES))})"
    if cfg._attn_implementation not in ("sdpa", "eager", SDPA_NAME, EAGER_NAME):
        return f"attention {cfg._attn_implementation!r}"
    if any(t != "full_attention" for t in getattr(cfg, "layer_types", None) or ()) or (
            getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True)):
        return "sliding-window attention"  # the layout's masks are full (causal) attention
    return None


def masks(inner):
    """A mask function that is `inner` (transformers' mask function of the implementation) except
    while a packed forward runs, when it makes none."""
    def make(*args, **kwargs):
        return None if _PACKED.get() else inner(*args, **kwargs)
    return make


def run_packed(module: nn.Module, layout: Layout, input_ids: torch.Tensor, causal: bool = False):
    """`module` (a transformers backbone or LM; `causal`: a decoder's) on the packed batch; returns
    its output. The all-ones mask keeps transformers from reading the position ids as packed
    sequences (working that out reads a value on the host). FlexAttention's block mask is made here,
    before the layers (outside any compiled block)."""
    ids = layout.pack(input_ids)
    if layout.attention == "flex":
        layout.block_mask(causal)
    token = _PACKED.set(True)
    try:
        return module(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=layout.positions,
                      **{LAYOUT: layout})
    finally:
        _PACKED.reset(token)
