"""Task heads: small modules that read the shared backbone's hidden states, each with its loss.

A head kind is one class here and one line in :data:`HEADS`; the objective that trains it names
the kind (objectives.py). Heads are saved in ``heads.safetensors`` + ``heads.json`` (kind, labels
and options per head) beside the backbone.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn


def head_dropout(cfg) -> float:
    p = getattr(cfg, "classifier_dropout", None)
    return p if p is not None else getattr(cfg, "hidden_dropout_prob", 0.1)


class TokenClassificationHead(nn.Module):
    """Dropout + linear layer on every token's hidden state (as BertForTokenClassification)."""

    kind = "token-classification"

    def __init__(self, hidden_size: int, labels: list[str], dropout: float, **_):
        super().__init__()
        self.labels = list(labels)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, len(labels))

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(hidden))

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)

    def spec(self) -> dict:
        return {"kind": self.kind, "labels": self.labels}


class SequenceClassificationHead(nn.Module):
    """One prediction per sequence.

    pooling `cls` (encoders): tanh(dense(first token)) -> dropout -> linear, as
    BertForSequenceClassification (the dense "pooler" starts from the checkpoint's when it has one).
    pooling `last` (decoders): the last non-padding token -> linear without bias, as
    LlamaForSequenceClassification. Binary heads have one logit (sigmoid + BCE).
    """

    def __init__(self, hidden_size: int, labels: list[str], dropout: float, pooling: str = "cls",
                 binary: bool = False, threshold: float = 0.5):
        super().__init__()
        self.labels, self.pooling, self.binary, self.threshold = list(labels), pooling, binary, threshold
        self.kind = "binary-classification" if binary else "sequence-classification"
        outputs = 1 if binary else len(labels)
        if pooling == "cls":
            self.pooler = nn.Linear(hidden_size, hidden_size)
            self.dropout = nn.Dropout(dropout)
            self.classifier = nn.Linear(hidden_size, outputs)
        else:
            self.score = nn.Linear(hidden_size, outputs, bias=False)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "cls":
            pooled = torch.tanh(self.pooler(hidden[:, 0]))
            return self.classifier(self.dropout(pooled))
        last = attention_mask.sum(-1) - 1  # right padding: the last real token
        return self.score(hidden[torch.arange(hidden.shape[0], device=hidden.device), last])

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.binary:
            return nn.functional.binary_cross_entropy_with_logits(logits.squeeze(-1).float(), labels.float())
        return nn.functional.cross_entropy(logits.float(), labels)

    def spec(self) -> dict:
        return {"kind": self.kind, "labels": self.labels, "pooling": self.pooling, "threshold": self.threshold}


HEADS = {
    "token-classification": TokenClassificationHead,
    "sequence-classification": SequenceClassificationHead,
    "binary-classification": lambda *a, **k: SequenceClassificationHead(*a, binary=True, **k),
}


def copy_pooler(head: SequenceClassificationHead, path: str) -> None:
    """Start the `cls` pooler from the checkpoint's BERT pooler, when it has one."""
    files = sorted(Path(path).glob("*.safetensors"))
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            keys = [k for k in fh.keys() if k.endswith("pooler.dense.weight")]
            if keys:
                base = keys[0][: -len("weight")]
                with torch.no_grad():
                    head.pooler.weight.copy_(fh.get_tensor(base + "weight"))
                    head.pooler.bias.copy_(fh.get_tensor(base + "bias"))
                return
