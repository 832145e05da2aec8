"""Seeded weight initialisation that gives the same weights on every device.

The draw is made by a CPU ``torch.Generator`` into a CPU tensor and then copied to wherever the
parameter lives: a CPU generator cannot draw into a CUDA tensor (torch refuses it), and a CUDA
generator would draw other numbers, so a head, an adapter or a fitted LM head would differ
between a CPU and a GPU run of one seed."""

from __future__ import annotations

import torch
from torch import nn


def normal_(tensor: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    """Fill `tensor` (any device or dtype) in place with normal(0, std) drawn on the CPU by `generator`."""
    draw = torch.empty(tensor.shape, dtype=torch.float32).normal_(0.0, std, generator=generator)
    with torch.no_grad():
        tensor.copy_(draw)
    return tensor


def randint(high: int, size: tuple[int, ...], generator: torch.Generator, device=None) -> torch.Tensor:
    """Integers in [0, high) drawn on the CPU by `generator`, then moved to `device`."""
    return torch.randint(0, high, size, generator=generator).to(device)


def bert_style_(module: nn.Module, std: float, generator: torch.Generator, skip: frozenset = frozenset()) -> None:
    """BERT's initialisation of `module`, in module order: normal(0, std) Linear weights (except
    those whose weight is in `skip`, e.g. tied to the word embeddings) with zero biases, and unit
    LayerNorms. Task heads and the refitted masked-LM head of retention scoring both use it."""
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, nn.Linear) and id(sub.weight) not in skip:
                normal_(sub.weight, std, generator)
                if sub.bias is not None:
                    sub.bias.zero_()
            elif isinstance(sub, nn.LayerNorm) and sub.weight is not None:
                sub.weight.fill_(1.0)
                if sub.bias is not None:
                    sub.bias.zero_()
