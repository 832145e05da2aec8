"""Self-distillation (``sources.NAME.distill``): the trained model is pulled towards the
predictions of the model as the run started (the teacher) on language-modelling text.

Written here rather than taken from a library: the teacher is usually this same model with its
adapters or virtual tokens switched off (no copy), and the student's logits are shared by both
terms of the loss (one vocabulary projection).
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

from routetune.model.frozen_bf16 import FrozenBf16
from routetune.model.lm_loss import SCORED_INDEX, pick_scored
from routetune.model.methods.base import is_adapter_param


class Teacher:
    """The model as it is now (the start of the run), frozen. Methods that leave the starting
    weights untouched (LoRA / DoRA / IA3, prompt methods) give it by switching their adapters or
    virtual tokens off; any other method changes backbone weights, so a frozen copy of the LM is
    kept (bf16 Linear weights under bf16, as for prediction). So is one when parameters outside
    the adapters train (e.g. an encoder's MLM head beside LoRA)."""

    def __init__(self, model, precision: str):
        others = [n for n, p in model.lm.named_parameters() if p.requires_grad and not is_adapter_param(n)]
        self.model = model
        if model.method.teacher_by_switching and not others:
            from peft.tuners.tuners_utils import BaseTunerLayer  # peft loads slowly; only this path needs it

            self.lm = None
            self.layers = [m for m in model.lm.modules() if isinstance(m, BaseTunerLayer)]  # found once
            self.how = "the same model with its adapters or virtual tokens switched off"
        else:
            lm = copy.deepcopy(model.lm).requires_grad_(False).eval()
            if precision == "bf16":
                FrozenBf16(lm).cast()
            self.lm, self.layers = lm, []
            self.how = (
                f"a frozen copy of the starting model ({sum(p.numel() for p in model.lm.parameters()):,} parameters)"
            )

    @contextlib.contextmanager
    def _starting_model(self):
        """The model with adapters and prompt switched off and dropout off, for the duration."""
        model = self.model
        flags = [(p, p.requires_grad) for m in self.layers for p in m.parameters()]
        prompt, training = model.prompt, model.training
        try:
            for m in self.layers:
                m.enable_adapters(False)
            model.prompt = None
            model.eval()
            yield
        finally:
            for m in self.layers:
                m.enable_adapters(True)
            for p, flag in flags:  # enable_adapters(True) marks every adapter tensor trainable
                p.requires_grad_(flag)
            model.prompt = prompt
            model.train(training)

    @torch.no_grad()
    def outputs(self, objective: str, input_ids, attention_mask, selected, index=None) -> torch.Tensor:
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.lm is not None:
            return lm_outputs(self.lm, objective, inputs, 0, selected, index)
        with self._starting_model():
            return lm_outputs(self.model.lm, objective, inputs, 0, selected, index)


def lm_outputs(lm, objective: str, inputs: dict, drop: int, selected: torch.Tensor,
               index: torch.Tensor | None = None) -> torch.Tensor:
    """LM-head logits at the selected positions only (rows), the vocabulary projection run on
    those rows alone where the head allows it (BERT's ``cls``); `index`: the selected positions
    as (row, position) pairs, gathered without a host sync (model/lm_loss.py)."""
    head = getattr(lm, "cls", None) if objective == "masked-lm" else None
    if head is not None:
        return head(pick_scored(lm.base_model(**inputs).last_hidden_state[:, drop:], selected, index))
    logits = lm(**inputs).logits[:, drop:]
    if objective == "causal-lm":
        logits = logits[:, :-1]  # position i predicts token i + 1
    return pick_scored(logits, selected, index)


def distill_loss(model, teacher: Teacher, objective: str, batch: dict[str, torch.Tensor], share: float) -> torch.Tensor:
    """(1 - share) x the usual LM loss + share x KL(teacher || model), both averaged over the
    tokens the LM loss scores (masked positions, or next tokens that are not padding/prompt)."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    targets = labels[:, 1:] if objective == "causal-lm" else labels
    selected, index = targets != -100, batch.get(SCORED_INDEX)
    inputs, drop = model.lm_inputs(ids, mask)
    student = lm_outputs(model.lm, objective, inputs, drop, selected, index).float()
    target = teacher.outputs(objective, ids, model.backbone_mask(mask), selected, index).float()
    log_p = nn.functional.log_softmax(student, -1)
    kl = nn.functional.kl_div(log_p, nn.functional.log_softmax(target, -1), log_target=True,
                              reduction="batchmean")  # batchmean over rows = mean per scored token
    if share >= 1.0:
        return kl
    return (1.0 - share) * nn.functional.nll_loss(log_p, pick_scored(targets, selected, index)) + share * kl
