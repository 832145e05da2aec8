"""The optimizer of a run: AdamW or SGD, with weight decay on matrices only. `train.fused` asks
PyTorch for its fused AdamW kernel (which it has on the CPU and CUDA); false leaves the choice to
PyTorch (its foreach implementation)."""

from __future__ import annotations

import torch


def build_optimizer(model: torch.nn.Module, tc) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)  # biases and LayerNorm weights: no decay
    groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if tc.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=tc.lr, momentum=tc.momentum)
    return torch.optim.AdamW(groups, lr=tc.lr, fused=tc.fused or None)
