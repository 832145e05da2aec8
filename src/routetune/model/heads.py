"""One shared backbone, several heads.

:class:`RoutedModel` holds the pretrained LM (backbone + its LM head, as transformers builds it)
and a ``ModuleDict`` of task heads keyed by source name. Every head reads the same backbone's
hidden states; nothing is subclassed per task. Adding a head kind = one class + one line in
``HEADS``.

Checkpoint folder layout (``save`` / ``load``):

* ``config.json`` + ``model.safetensors`` + tokenizer files: a plain Hugging Face
  ``AutoModelForMaskedLM`` / ``AutoModelForCausalLM`` folder (backbone and LM head);
* ``heads.safetensors`` + ``heads.json``: the task heads and their label lists.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from routetune.model.lm_loss import linear_cross_entropy
from routetune.errors import ModelError
from routetune.model.load import base_digest, is_decoder, lm_head_is_tied, load_lm
from routetune.model.peft import is_adapter_param

log = logging.getLogger("routetune")


def _dropout(cfg) -> float:
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


# decoder model types whose causal-LM forward computes ``logits = lm_head(last_hidden_state)``
# and transformers' standard shifted mean cross-entropy (checked in transformers 5.x); for them
# the causal-LM loss goes through model/lm_loss.py. Others (e.g. soft-capped or scaled logits)
# keep transformers' forward.
FUSED_LM_LOSS_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gpt2", "gpt_neox", "phi3", "smollm3",
                                 "olmo2", "starcoder2", "stablelm"})


class RoutedModel(nn.Module):
    def __init__(self, lm: nn.Module, heads: dict[str, nn.Module] | None = None):
        super().__init__()
        self.lm = lm
        self.heads = nn.ModuleDict(heads or {})
        self.adapter_config = None  # peft config object when peft adapters are injected
        self.base_path: str | None = None  # the backbone a partial checkpoint builds on
        self.peft_method = "none"
        self.peft_options: dict = {}
        self.prompt: nn.Module | None = None  # prompt_tuning / prefix_tuning: peft's trained module
        self.n_virtual = 0
        self.fused_lm_loss = True  # causal-LM loss through model/lm_loss.py where the head allows it

    @property
    def backbone(self) -> nn.Module:
        return self.lm.base_model

    @property
    def config(self):
        return self.lm.config

    @property
    def is_decoder(self) -> bool:
        return is_decoder(self.config)

    def add_head(self, name: str, kind: str, labels: list[str], seed: int, pooler_from: str | None = None,
                 **options) -> nn.Module:
        cfg = self.config
        if kind in ("sequence-classification", "binary-classification"):
            options.setdefault("pooling", "last" if self.is_decoder else "cls")
        head = HEADS[kind](cfg.hidden_size, labels, _dropout(cfg), **options)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for module in head.modules():
                if isinstance(module, nn.Linear):
                    module.weight.normal_(0.0, getattr(cfg, "initializer_range", 0.02), generator=gen)
                    if module.bias is not None:
                        module.bias.zero_()
        if getattr(head, "pooling", None) == "cls" and pooler_from:
            _copy_pooler(head, pooler_from)
        self.heads[name] = head
        return head

    def add_token_head(self, name: str, labels: list[str], seed: int) -> nn.Module:
        return self.add_head(name, "token-classification", labels, seed)

    def _inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[dict, int]:
        """Keyword arguments for the backbone / LM, and how many leading output positions are
        virtual tokens (prompt tuning) to drop. See model/prompts.py."""
        if self.prompt is None:
            return {"input_ids": input_ids, "attention_mask": attention_mask}, 0
        from routetune.model.prompts import prefix_cache, virtual_tokens

        b, n = input_ids.shape[0], self.n_virtual
        mask = torch.cat([attention_mask.new_ones(b, n), attention_mask], 1)
        if self.peft_method == "prompt_tuning":
            embeds = self.lm.get_input_embeddings()(input_ids)
            virtual = virtual_tokens(self.prompt, n, b).to(embeds.dtype)
            return {"inputs_embeds": torch.cat([virtual, embeds], 1), "attention_mask": mask}, n
        return {"input_ids": input_ids, "attention_mask": mask,
                self._cache_kwarg: prefix_cache(self.prompt, self.config, n, b), "use_cache": False}, 0

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        inputs, drop = self._inputs(input_ids, attention_mask)
        return self.backbone(**inputs).last_hidden_state[:, drop:]

    def lm_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """LM-head logits, one row per input position."""
        inputs, drop = self._inputs(input_ids, attention_mask)
        return self.lm(**inputs).logits[:, drop:]

    def causal_lm_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs, drop = self._inputs(batch["input_ids"], batch["attention_mask"])
        labels = batch["labels"]
        if drop:
            labels = torch.cat([labels.new_full((labels.shape[0], drop), -100), labels], 1)
        head = self._plain_lm_head()
        if head is None:
            return self.lm(**inputs, labels=labels).loss
        # transformers' loss (shift, mean over scored tokens) without the full fp32 logits
        hidden = self.backbone(**inputs).last_hidden_state[:, :-1]
        targets = labels[:, 1:]
        scored = targets != -100
        return linear_cross_entropy(hidden[scored], head.weight, targets[scored])

    def _plain_lm_head(self) -> nn.Linear | None:
        """The LM head when the causal-LM logits are exactly ``lm_head(last_hidden_state)`` (no
        bias, soft-capping or logit scaling: the model types in FUSED_LM_LOSS_TYPES) and the fused
        loss is on; else None (transformers' own forward and loss are used)."""
        if not self.fused_lm_loss or self.config.model_type not in FUSED_LM_LOSS_TYPES:
            return None
        head = self.lm.get_output_embeddings()
        if type(head) is not nn.Linear or head.bias is not None:
            return None  # e.g. a LoRA-wrapped head
        return head

    def head_logits(self, name: str, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.heads[name](self.hidden_states(input_ids, attention_mask), attention_mask)

    token_logits = head_logits

    def loss(self, name: str, objective: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if objective in HEADS:
            logits = self.head_logits(name, batch["input_ids"], batch["attention_mask"])
            return self.heads[name].loss(logits, batch["labels"])
        if objective == "masked-lm":
            return self.masked_lm_loss(batch)
        if objective == "causal-lm":
            return self.causal_lm_loss(batch)
        raise ValueError(f"unknown objective {objective!r}")

    def masked_lm_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Masked-LM loss. For BERT-style heads (``lm.cls``) the vocabulary projection runs only on
        the ~15% selected positions instead of all of them (same loss as the full forward, which
        the reference test checks); other architectures use transformers' own forward."""
        head = getattr(self.lm, "cls", None)
        labels = batch["labels"]
        if head is None:
            logits = self.lm_logits(batch["input_ids"], batch["attention_mask"])
            return nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        selected = labels != -100
        hidden = self.hidden_states(batch["input_ids"], batch["attention_mask"])
        return nn.functional.cross_entropy(head(hidden[selected]).float(), labels[selected])

    # ------------------------------------------------------------------ self-distillation

    def enable_teacher(self, precision: str) -> str:
        """Keep the model as it is now (the start of the run) as a frozen teacher for
        :meth:`distill_loss`. LoRA / DoRA / IA3 and prompt methods leave the starting weights
        untouched, so the teacher is the same model with its adapters or prompt switched off (no
        copy); any other method changes backbone weights, so a frozen copy of the LM is kept
        (bf16 Linear weights under bf16, as for prediction); so is one when parameters outside
        the adapters train (e.g. an encoder's MLM head). Returns how, for the log."""
        # switching adapters off gives the starting model only when nothing else in the LM
        # trains (an encoder's MLM head trains beside LoRA, for example: then a copy is needed)
        others = [n for n, p in self.lm.named_parameters() if p.requires_grad and not is_adapter_param(n)]
        if (self.adapter_config is not None or self.prompt is not None) and not others:
            from peft.tuners.tuners_utils import BaseTunerLayer

            self.__dict__["_teacher_lm"] = None
            # the layers _starting_model switches, found once rather than at every distilled step
            self.__dict__["_tuner_layers"] = [m for m in self.lm.modules() if isinstance(m, BaseTunerLayer)]
            return "the same model with its adapters or virtual tokens switched off"
        import copy

        from routetune.model.inference import for_inference

        # kept outside the module tree (not a submodule): never trained, saved or counted
        self.__dict__["_teacher_lm"] = for_inference(copy.deepcopy(self.lm), precision)
        return f"a frozen copy of the starting model ({sum(p.numel() for p in self.lm.parameters()):,} parameters)"

    @contextlib.contextmanager
    def _starting_model(self):
        """This model with adapters and prompt switched off and dropout off, for the duration."""
        layers = self.__dict__["_tuner_layers"]
        flags = [(p, p.requires_grad) for m in layers for p in m.parameters()]
        prompt, training = self.prompt, self.training
        try:
            for m in layers:
                m.enable_adapters(False)
            self.prompt = None
            self.eval()
            yield
        finally:
            for m in layers:
                m.enable_adapters(True)
            for p, flag in flags:  # enable_adapters(True) marks every adapter tensor trainable
                p.requires_grad_(flag)
            self.prompt = prompt
            self.train(training)

    @torch.no_grad()
    def _teacher_outputs(self, objective: str, input_ids, attention_mask, selected) -> torch.Tensor:
        if "_teacher_lm" not in self.__dict__:
            raise RuntimeError("distill_loss needs enable_teacher() first")
        teacher = self.__dict__["_teacher_lm"]
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if teacher is not None:
            return self._lm_outputs(teacher, objective, inputs, 0, selected)
        with self._starting_model():
            return self._lm_outputs(self.lm, objective, inputs, 0, selected)

    @staticmethod
    def _lm_outputs(lm, objective: str, inputs: dict, drop: int, selected: torch.Tensor) -> torch.Tensor:
        """LM-head logits at the selected positions only (rows), the vocabulary projection run on
        those rows alone where the head allows it (BERT's ``cls``)."""
        head = getattr(lm, "cls", None) if objective == "masked-lm" else None
        if head is not None:
            return head(lm.base_model(**inputs).last_hidden_state[:, drop:][selected])
        logits = lm(**inputs).logits[:, drop:]
        if objective == "causal-lm":
            logits = logits[:, :-1]  # position i predicts token i + 1
        return logits[selected]

    def distill_loss(self, objective: str, batch: dict[str, torch.Tensor], share: float) -> torch.Tensor:
        """(1 - share) x the usual LM loss + share x KL(teacher || model), both averaged over the
        tokens the LM loss scores (masked positions, or next tokens that are not padding/prompt).
        The teacher is the model as the run started (:meth:`enable_teacher`). Written here rather
        than taken from a library: the teacher is this same model with its adapters off, and the
        student's logits are shared by both terms (one vocabulary projection)."""
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        targets = labels[:, 1:] if objective == "causal-lm" else labels
        selected = targets != -100
        inputs, drop = self._inputs(ids, mask)
        student = self._lm_outputs(self.lm, objective, inputs, drop, selected).float()
        teacher = self._teacher_outputs(objective, ids, mask, selected).float()
        log_p = nn.functional.log_softmax(student, -1)
        kl = nn.functional.kl_div(log_p, nn.functional.log_softmax(teacher, -1), log_target=True,
                                  reduction="batchmean")  # batchmean over rows = mean per scored token
        if share >= 1.0:
            return kl
        return (1.0 - share) * nn.functional.nll_loss(log_p, targets[selected]) + share * kl

    # ------------------------------------------------------------------ persistence

    def save(self, folder: str | Path, tokenizer=None) -> None:
        folder = Path(folder)
        if self.adapter_config is not None:
            self._save_adapter(folder)
        elif self.peft_method in ("adapter", "bitfit"):
            self._save_trained(folder)
        else:
            self.lm.save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        tensors = {f"{name}.{k}": v.detach().contiguous() for name, head in self.heads.items()
                   for k, v in head.state_dict().items()}
        if tensors:
            save_file(tensors, str(folder / "heads.safetensors"))
        specs = {name: head.spec() for name, head in self.heads.items()}
        (folder / "heads.json").write_text(json.dumps(specs, indent=2) + "\n")

    def attach_prompt(self, pconfig, generator: torch.Generator | None = None) -> None:
        """Add peft's prompt / prefix module for `pconfig` (see model/prompts.py)."""
        from routetune.model.prompts import build_prompt_module

        self.prompt = build_prompt_module(pconfig, self.lm.get_input_embeddings(),
                                          generator or torch.Generator().manual_seed(0))
        self.n_virtual = pconfig.num_virtual_tokens
        # transformers 5.x renames `past_key_values` to `cache` (the old name warns, then goes in
        # 5.40); looked up once here, not on every forward
        import inspect

        params = inspect.signature(self.backbone.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"

    def _save_adapter(self, folder: Path) -> None:
        """PEFT's own adapter format (PeftModel.from_pretrained loads it onto the base model), plus the
        LM head's own trained tensors and a note of the base."""
        from peft import get_peft_model_state_dict

        if self.prompt is not None:  # peft saves prompt-learning weights under this one key
            save_file({"prompt_embeddings": self.prompt.embedding.weight.detach().contiguous()},
                      str(folder / "adapter_model.safetensors"))
        else:
            adapter = get_peft_model_state_dict(self.lm)
            save_file({f"base_model.model.{k}": v.detach().contiguous() for k, v in adapter.items()},
                      str(folder / "adapter_model.safetensors"))
        self.adapter_config.save_pretrained(str(folder))
        extra = {n: p.detach().contiguous() for n, p in self.lm.named_parameters()
                 if p.requires_grad and not is_adapter_param(n)}
        save_file(extra, str(folder / "lm_trainable.safetensors"))
        (folder / "routetune.json").write_text(json.dumps(self._note()) + "\n")

    def _note(self) -> dict:
        return {"base": self.base_path, "base_digest": base_digest(self.base_path), "method": self.peft_method,
                "adapter": self.adapter_config is not None, **self.peft_options}

    def _save_trained(self, folder: Path) -> None:
        """Only the tensors this method trains (adapters or biases, the LM head's own), plus a
        manifest naming the base they apply to."""
        trained = {n: p.detach().contiguous() for n, p in self.lm.named_parameters() if p.requires_grad}
        save_file(trained, str(folder / "lm_trainable.safetensors"))
        (folder / "routetune.json").write_text(json.dumps(self._note()) + "\n")
        self.lm.config.save_pretrained(folder)

    def _load_trained(self, folder: Path, tensors: dict | None = None) -> None:
        if tensors is None:
            tensors = load_file(str(folder / "lm_trainable.safetensors"))
        params = dict(self.lm.named_parameters())
        unknown = [n for n in tensors if n not in params]
        if unknown:
            raise ValueError(f"{folder}/lm_trainable.safetensors does not fit this model ({unknown[:3]})")
        with torch.no_grad():
            for name, tensor in tensors.items():
                params[name].copy_(tensor)

    def _load_adapter(self, folder: Path) -> None:
        from peft import set_peft_model_state_dict

        state = load_file(str(folder / "adapter_model.safetensors"))
        if self.prompt is not None:
            with torch.no_grad():
                self.prompt.embedding.weight.copy_(state["prompt_embeddings"])
        else:
            set_peft_model_state_dict(self.lm, {k.removeprefix("base_model.model."): v for k, v in state.items()})
        extra = load_file(str(folder / "lm_trainable.safetensors"))
        params = dict(self.lm.named_parameters())
        with torch.no_grad():
            for name, tensor in extra.items():
                params[name].copy_(tensor)

    def _load_head_tensors(self, folder: Path, names: list[str]) -> None:
        tensors = load_file(str(folder / "heads.safetensors")) if names else {}
        for name in names:
            prefix = name + "."
            self.heads[name].load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})

    def load_weights(self, folder: str | Path) -> None:
        """Load the exact tensors of a checkpoint saved by :meth:`save` into this model."""
        folder = Path(folder)
        specs = json.loads((folder / "heads.json").read_text())
        if set(specs) != set(self.heads) or any(specs[n] != self.heads[n].spec() for n in specs):
            raise ValueError(f"{folder}/heads.json: heads or label sets differ from this run's")
        if self.adapter_config is not None or self.peft_method in ("adapter", "bitfit"):
            self._load_adapter(folder) if self.adapter_config is not None else self._load_trained(folder)
            self._load_head_tensors(folder, list(specs))
            return
        state = load_file(str(folder / "model.safetensors"))
        result = self.lm.load_state_dict(state, strict=False)
        params = dict(self.lm.named_parameters(remove_duplicate=False))
        loaded = {params[k].data_ptr() for k in state if k in params}
        untied = [k for k in result.missing_keys if k in params and params[k].data_ptr() not in loaded]
        if untied or [k for k in result.unexpected_keys if k in params]:
            raise ValueError(f"{folder}/model.safetensors does not fit this model (missing {untied[:3]})")
        self._load_head_tensors(folder, list(specs))

    def load_heads_from(self, folder: str | Path, names: list[str]) -> None:
        """Copy the named heads of an earlier checkpoint. A head whose label list grew keeps the
        earlier classes' weights exactly (their rows come first); the new rows stay as initialised."""
        folder = Path(folder)
        specs = json.loads((folder / "heads.json").read_text())
        tensors = load_file(str(folder / "heads.safetensors"))
        for name in names:
            old_labels, head = specs[name]["labels"], self.heads[name]
            if specs[name]["kind"] != head.kind or head.labels[: len(old_labels)] != old_labels:
                raise ValueError(f"{folder}/heads.json: head {name!r} ({specs[name]['kind']}, labels {old_labels}) "
                                 f"does not fit this run's ({head.kind}, labels {head.labels})")
            with torch.no_grad():
                for key, target in head.state_dict(keep_vars=True).items():
                    old = tensors[f"{name}.{key}"]
                    target[: old.shape[0]].copy_(old)

    @classmethod
    def load(cls, folder: str | Path) -> RoutedModel:
        folder = Path(folder)
        note = json.loads((folder / "routetune.json").read_text()) if (folder / "routetune.json").is_file() else {}
        if note:
            _check_base(folder, note)
        if note.get("adapter"):
            from peft import PeftConfig, inject_adapter_in_model

            lm, _ = load_lm(note["base"])
            config = PeftConfig.from_pretrained(str(folder))
            model = cls(lm)
            if note["method"] in ("prompt_tuning", "prefix_tuning"):
                model.attach_prompt(config)
            else:
                inject_adapter_in_model(config, lm)
            model.adapter_config, model.base_path, model.peft_method = config, note["base"], note["method"]
            model._load_adapter(folder)
        elif note.get("method") in ("adapter", "bitfit"):
            lm, _ = load_lm(note["base"])
            if note["method"] == "adapter":
                from routetune.model.adapters import add_bottleneck_adapters

                add_bottleneck_adapters(lm, note["adapter_size"], note["adapter_placement"])
            model = cls(lm)
            model.base_path, model.peft_method = note["base"], note["method"]
            model.peft_options = {k: note[k] for k in ("adapter_size", "adapter_placement")}
            trained = load_file(str(folder / "lm_trainable.safetensors"))
            for name, p in model.lm.named_parameters():
                p.requires_grad_(name in trained)  # so that a re-save writes the same tensors
            model._load_trained(folder, trained)
        else:
            lm, _ = load_lm(str(folder))
            model = cls(lm)
        specs = json.loads((folder / "heads.json").read_text())
        for name, spec in specs.items():
            if spec["kind"] not in HEADS:
                raise ValueError(f"{folder}/heads.json: unknown head kind {spec['kind']!r}")
            options = {k: spec[k] for k in ("pooling", "threshold") if k in spec}
            model.add_head(name, spec["kind"], spec["labels"], seed=0, **options)
        model._load_head_tensors(folder, list(specs))
        model.eval()
        return model


def _check_base(folder: Path, note: dict) -> None:
    """An adapter or trained-tensors checkpoint applies to the exact base it was trained on."""
    recorded, base = note.get("base_digest"), note.get("base")
    if recorded is None:
        log.warning("%s/routetune.json records no digest of its base %s (written by an older routetune): "
                    "the base is loaded unchecked", folder, base)
        return
    now = base_digest(base)
    if now is not None and now != recorded:
        raise ModelError(f"{folder}/routetune.json: the base model at {base} is not the one this checkpoint was "
                         "trained on (its files changed: different SHA-256); restore that model or retrain")


def _copy_pooler(head: SequenceClassificationHead, path: str) -> None:
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


def build_model(path: str, seed: int, attention: str = "auto", device_type: str | None = None) -> RoutedModel:
    """The LM of `path` as a RoutedModel without task heads, on the CPU (the caller moves it);
    `device_type` is where it will train, which decides `auto` attention."""
    lm, missing_head = load_lm(path, attention, device_type)
    if missing_head:
        tied = lm_head_is_tied(lm)
        log.info("the checkpoint has no LM head weights (%s): initialised a new one%s",
                 ", ".join(missing_head[:4]) + (" ..." if len(missing_head) > 4 else ""),
                 " with its decoder tied to the word embeddings" if tied else "")
    return RoutedModel(lm)
