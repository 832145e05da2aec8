"""Dropout with a cheaper random source, for training on CPU.

torch's CPU dropout draws one Bernoulli sample per element from the generator, which made the
LoRA dropout alone a large share of a smollm2-135m step on a 2-core CPU (measured in
docs/benchmarks.md). Here one 64-bit draw from the same
seeded torch generator yields four 16-bit uniforms, so the keep probability is quantised to
1/65536 (p = 0.05 becomes 3277/65536 = 0.050003); the inverted scaling 1/(1-p) is the same as
torch's. Seeded and resumable like torch's dropout (it uses torch's default generator, whose
state the checkpoints keep). Written by hand because no library offers a faster CPU dropout.
"""

from __future__ import annotations

import torch
from torch import nn


def fast_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    n = x.numel()
    words = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=x.device)
    uniform16 = words.view(torch.int16)[:n].view(x.shape)  # uniform over [-32768, 32767]
    keep = uniform16 >= round(p * 65536) - 32768
    return x * keep * (1.0 / (1.0 - p))


class FastDropout(nn.Dropout):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.p >= 1.0:
            return x * 0.0
        return fast_dropout(x, self.p)


def use_fast_dropout(model: nn.Module) -> int:
    """Switch every nn.Dropout in `model` to FastDropout in place (same p, same module tree, so
    state dicts and PEFT wrappers are untouched). Returns how many were switched."""
    n = 0
    for module in model.modules():
        if type(module) is nn.Dropout and not module.inplace:
            module.__class__ = FastDropout
            n += 1
    return n
