"""One shared backbone, several heads.

:class:`RoutedModel` holds the pretrained LM (backbone + its LM head, as transformers builds it)
and a ``ModuleDict`` of task heads keyed by source name. Every head reads the same backbone's
hidden states; nothing is subclassed per task.

Checkpoint folder layout (``save`` / ``load``):

* ``config.json`` + ``model.safetensors`` + tokenizer files: a plain Hugging Face
  ``AutoModelForMaskedLM`` / ``AutoModelForCausalLM`` folder (backbone and LM head);
* ``heads.safetensors`` + ``heads.json``: the task heads and their label lists.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from routetune.model.load import load_lm, lm_head_is_tied

log = logging.getLogger("routetune")


class TokenClassificationHead(nn.Module):
    """Dropout + linear layer on every token's hidden state (as BertForTokenClassification)."""

    kind = "token-classification"

    def __init__(self, hidden_size: int, labels: list[str], dropout: float):
        super().__init__()
        self.labels = list(labels)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, len(labels))

    def reset_parameters(self, std: float, generator: torch.Generator) -> None:
        with torch.no_grad():
            self.classifier.weight.normal_(0.0, std, generator=generator)
            self.classifier.bias.zero_()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(hidden))

    def spec(self) -> dict:
        return {"kind": self.kind, "labels": self.labels}


class RoutedModel(nn.Module):
    def __init__(self, lm: nn.Module, heads: dict[str, nn.Module] | None = None):
        super().__init__()
        self.lm = lm
        self.heads = nn.ModuleDict(heads or {})

    @property
    def backbone(self) -> nn.Module:
        return self.lm.base_model

    @property
    def config(self):
        return self.lm.config

    def add_token_head(self, name: str, labels: list[str], seed: int) -> TokenClassificationHead:
        cfg = self.config
        dropout = getattr(cfg, "classifier_dropout", None)
        if dropout is None:
            dropout = getattr(cfg, "hidden_dropout_prob", 0.1)
        head = TokenClassificationHead(cfg.hidden_size, labels, dropout)
        head.reset_parameters(getattr(cfg, "initializer_range", 0.02),
                              torch.Generator().manual_seed(seed))
        self.heads[name] = head
        return head

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def token_logits(self, name: str, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.heads[name](self.hidden_states(input_ids, attention_mask))

    def loss(self, name: str, objective: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if objective == "token-classification":
            logits = self.token_logits(name, batch["input_ids"], batch["attention_mask"])
            return nn.functional.cross_entropy(
                logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=-100)
        if objective == "masked-lm":
            return self.masked_lm_loss(batch)
        raise ValueError(f"unknown objective {objective!r}")

    def masked_lm_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Masked-LM loss. For BERT-style heads (``lm.cls``) the vocabulary projection runs only on
        the ~15% selected positions instead of all of them (same loss as the full forward, which
        the reference test checks); other architectures use transformers' own forward."""
        head = getattr(self.lm, "cls", None)
        if head is None:
            return self.lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           labels=batch["labels"]).loss
        labels = batch["labels"]
        selected = labels != -100
        hidden = self.hidden_states(batch["input_ids"], batch["attention_mask"])
        logits = head(hidden[selected])
        return nn.functional.cross_entropy(logits.float(), labels[selected])

    # ------------------------------------------------------------------ persistence

    def save(self, folder: str | Path, tokenizer=None) -> None:
        folder = Path(folder)
        self.lm.save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        tensors = {f"{name}.{k}": v.detach().contiguous() for name, head in self.heads.items()
                   for k, v in head.state_dict().items()}
        if tensors:
            save_file(tensors, str(folder / "heads.safetensors"))
        specs = {name: head.spec() for name, head in self.heads.items()}
        (folder / "heads.json").write_text(json.dumps(specs, indent=2) + "\n")

    def load_weights(self, folder: str | Path) -> None:
        """Load the exact tensors of a checkpoint saved by :meth:`save` into this model."""
        folder = Path(folder)
        state = load_file(str(folder / "model.safetensors"))
        result = self.lm.load_state_dict(state, strict=False)
        params = dict(self.lm.named_parameters(remove_duplicate=False))
        loaded = {params[k].data_ptr() for k in state if k in params}
        untied = [k for k in result.missing_keys if k in params and params[k].data_ptr() not in loaded]
        if untied or [k for k in result.unexpected_keys if k in params]:
            raise ValueError(f"{folder}/model.safetensors does not fit this model (missing {untied[:3]})")
        specs = json.loads((folder / "heads.json").read_text())
        if set(specs) != set(self.heads) or any(specs[n] != self.heads[n].spec() for n in specs):
            raise ValueError(f"{folder}/heads.json: heads or label sets differ from this run's")
        tensors = load_file(str(folder / "heads.safetensors")) if specs else {}
        for name, head in self.heads.items():
            head.load_state_dict({k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")})

    def load_heads_from(self, folder: str | Path, names: list[str]) -> None:
        """Copy the named heads of an earlier checkpoint. A head whose label list grew keeps the
        earlier classes' weights exactly (their rows come first); the new rows stay as initialised."""
        folder = Path(folder)
        specs = json.loads((folder / "heads.json").read_text())
        tensors = load_file(str(folder / "heads.safetensors"))
        for name in names:
            old_labels, head = specs[name]["labels"], self.heads[name]
            if head.labels[: len(old_labels)] != old_labels:
                raise ValueError(f"{folder}/heads.json: head {name!r} labels {old_labels} are not a prefix of {head.labels}")
            with torch.no_grad():
                for key in ("classifier.weight", "classifier.bias"):
                    old = tensors[f"{name}.{key}"]
                    target = head.get_parameter(key)
                    target[: old.shape[0]].copy_(old)

    @classmethod
    def load(cls, folder: str | Path) -> "RoutedModel":
        folder = Path(folder)
        lm, _ = load_lm(str(folder))
        model = cls(lm)
        specs = json.loads((folder / "heads.json").read_text())
        tensors = load_file(str(folder / "heads.safetensors")) if specs else {}
        for name, spec in specs.items():
            if spec["kind"] != "token-classification":
                raise ValueError(f"{folder}/heads.json: unknown head kind {spec['kind']!r}")
            head = model.add_token_head(name, spec["labels"], seed=0)
            head.load_state_dict({k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")})
        return model


def build_model(path: str, seed: int) -> RoutedModel:
    lm, missing_head = load_lm(path)
    if missing_head:
        tied = lm_head_is_tied(lm)
        log.info("the checkpoint has no LM head weights (%s): initialised a new one%s",
                 ", ".join(missing_head[:4]) + (" ..." if len(missing_head) > 4 else ""),
                 " with its decoder tied to the word embeddings" if tied else "")
    return RoutedModel(lm)
