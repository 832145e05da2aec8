"""``train.compile``: regional torch.compile of the backbone's repeated blocks while training.

Compiling the whole training forward of smollm2-135m took ~14 minutes on 2 CPU cores (inductor
compiles all 30 decoder layers and their backward as one graph). The blocks of a transformer are
instances of one class with the same code, so this compiles the block's ``forward`` once and
every block reuses that code (PyTorch's "regional compilation" recipe); embeddings, heads and the
loss stay eager. Only the training loop uses it: :class:`CompiledBlocks` installs the compiled
forward as an instance attribute on each block and removes it again, so evaluation, checkpoints
(state_dict keys are unchanged) and everything after training run the eager model.
"""

from __future__ import annotations

import functools

import torch
from torch import nn


def repeated_blocks(backbone: nn.Module) -> list[nn.Module]:
    """The transformer blocks: the ModuleList (with at least two members, all of one class) that
    holds the most parameters. Empty if the backbone has none."""
    best, best_n = [], 0
    for module in backbone.modules():
        if isinstance(module, nn.ModuleList) and len(module) >= 2 \
                and len({type(m) for m in module}) == 1:
            n = sum(p.numel() for p in module.parameters())
            if n > best_n:
                best, best_n = list(module), n
    return best


class CompiledBlocks:
    """Context manager: while active, every block's forward is one shared compiled function."""

    def __init__(self, backbone: nn.Module):
        self.blocks = repeated_blocks(backbone)
        if not self.blocks:
            raise ValueError(f"train.compile: found no repeated blocks in {type(backbone).__name__}")
        # dynamic: batches differ in length (and the last batch in size)
        self.fn = torch.compile(type(self.blocks[0]).forward, dynamic=True)

    def __enter__(self) -> "CompiledBlocks":
        for block in self.blocks:
            block.forward = functools.partial(self.fn, block)
        return self

    def __exit__(self, *exc) -> None:
        for block in self.blocks:
            block.__dict__.pop("forward", None)
