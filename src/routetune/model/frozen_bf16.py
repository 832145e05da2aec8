"""Keep frozen Linear weights in bf16 while training under bf16 autocast.

Autocast casts a weight to bf16 on every forward, but caches that cast only for leaf tensors
that require grad; frozen weights (a LoRA or IA3 base model, frozen layers) are cast again at
every call, a copy traffic measured in docs/benchmarks.md (speed levers). Casting them once gives
the matmuls exactly the bf16 operands autocast would have produced, so results do not change. The
fp32 originals are kept and put back for every checkpoint write and at the end of training, so
saved weights stay exact.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


class FrozenBf16:
    def __init__(self, model: nn.Module):
        embeddings = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
        self.originals = {m: m.weight.data for m in model.modules()
                          if isinstance(m, nn.Linear) and not m.weight.requires_grad
                          and id(m.weight) not in embeddings and m.weight.dtype == torch.float32}
        self.active = False

    def cast(self) -> None:
        for module, weight in self.originals.items():
            module.weight.data = weight.to(torch.bfloat16)
        self.active = True

    def restore(self) -> None:
        for module, weight in self.originals.items():
            module.weight.data = weight
        self.active = False

    @contextlib.contextmanager
    def fp32(self):
        """The exact fp32 weights for the duration (e.g. a checkpoint write)."""
        was = self.active
        self.restore()
        try:
            yield
        finally:
            if was:
                self.cast()
