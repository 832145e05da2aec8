"""How much each example counts in a step: a source's loss is a mean over its scored units
(tokens, or examples for sequence heads), so slices of a batch (micro-batches, data-parallel
ranks) are weighted by their share of those units to give the whole batch's gradient."""

from __future__ import annotations

import math

import torch

from routetune.model.lm_loss import SCORED_INDEX, scored_positions
from routetune.model.packing import PACKED, Layout


def scored_units(objective: str, tensors: dict) -> torch.Tensor:
    """Per example, what its source's loss averages over: scored tokens (labels that are not
    -100; for causal LM the shifted targets), or 1 for a sequence-level label."""
    labels = tensors["labels"]
    if labels.dim() == 1:
        return torch.ones(labels.shape[0], device=labels.device)
    if objective == "causal-lm":
        labels = labels[:, 1:]
    return (labels != -100).sum(1).float()


def micro_batches(tensors: dict, objective: str, k: int, padding_free: bool = False):
    """The batch in `k` slices of consecutive examples, each cut to its own longest row, with
    the slice's scored units; slices with none are skipped. Called on the CPU copy of a batch
    (the counts and cuts read tensor values: on a GPU each would stall the queue); an LM
    objective's slice also gets the positions its loss scores (model/lm_loss.py), and with
    `padding_free` every slice its packed layout (model/packing.py)."""
    units = scored_units(objective, tensors)
    n = tensors["input_ids"].shape[0]
    size = math.ceil(n / k)
    for start in range(0, n, size):
        u = float(units[start:start + size].sum())
        if u == 0:
            continue
        piece = {key: v[start:start + size] for key, v in tensors.items()}
        width = int(piece["attention_mask"].sum(1).max())  # right padding beyond it is not needed
        piece = {key: v[:, :width] if v.dim() == 2 else v for key, v in piece.items()}
        index = scored_positions(objective, piece["labels"]) if piece["labels"].dim() == 2 else None
        if index is not None:
            piece[SCORED_INDEX] = index
        if padding_free:
            piece[PACKED] = Layout.of(piece["attention_mask"])
        yield piece, u
