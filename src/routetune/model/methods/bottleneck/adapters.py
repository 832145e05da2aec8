"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020): down-projection,
non-linearity, up-projection, added back to its input. peft has no such method, so this module is
routetune's own: each adapter wraps the output projection of an attention block and/or a
feed-forward block, so the layer computes ``h + up(act(down(h)))`` on that projection's output.
The up-projection starts at zero: before training the model computes exactly what the base does.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from routetune.model import init

# Output projections per placement: attention output (Houlsby), feed-forward output (both).
PLACEMENT_PATTERNS = {
    "attention": (r"\.attention\.output\.dense$", r"\.self_attn\.o_proj$"),
    "ffn": (r"\.layer\.\d+\.output\.dense$", r"\.mlp\.down_proj$"),
}


class BottleneckAdapter(nn.Module):
    def __init__(self, hidden: int, size: int):
        super().__init__()
        self.down = nn.Linear(hidden, size)
        self.up = nn.Linear(size, hidden)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(nn.functional.gelu(self.down(h)))


class WithAdapter(nn.Module):
    """A base linear layer followed by a bottleneck adapter on its output."""

    def __init__(self, base_layer: nn.Linear, size: int):
        super().__init__()
        self.base_layer = base_layer
        self.adapter = BottleneckAdapter(base_layer.out_features, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.base_layer(x))


def add_bottleneck_adapters(lm: nn.Module, size: int, placement: list[str], seed: int = 0) -> int:
    """Wrap the matching output projections; returns how many adapters were added."""
    patterns = [re.compile(p) for where in placement for p in PLACEMENT_PATTERNS[where]]
    gen = torch.Generator().manual_seed(seed)
    added = 0
    for name, module in list(lm.named_modules()):
        if isinstance(module, nn.Linear) and any(p.search(name) for p in patterns):
            parent_name, _, child = name.rpartition(".")
            wrapped = WithAdapter(module, size)
            with torch.no_grad():
                init.normal_(wrapped.adapter.down.weight, 0.02, gen)
                wrapped.adapter.down.bias.zero_()
            setattr(lm.get_submodule(parent_name), child, wrapped)
            added += 1
    return added
