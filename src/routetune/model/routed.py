"""One shared backbone, several heads: :class:`RoutedModel`.

It holds the pretrained LM (backbone + its LM head, as transformers builds it), a ``ModuleDict``
of task heads keyed by source name (model/heads.py), the parameter-sharing method
(model/methods/) and, for prompt methods, peft's virtual-token module. Every head reads the same
backbone's hidden states; nothing is subclassed per task.

Checkpoint folder (``save`` / ``load``): the method's files (a plain Hugging Face model folder
for full fine-tuning; see model/methods/base.py for the others), tokenizer files, and
``heads.safetensors`` + ``heads.json`` (the task heads and their label lists).
"""

from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from routetune import objectives
from routetune.model import init, lm_loss
from routetune.model import methods
from routetune.model.distill import Teacher, distill_loss
from routetune.model.heads import HEADS, copy_pooler, head_dropout
from routetune.model.lm_loss import SCORED_INDEX, linear_cross_entropy, pick_scored
from routetune.model.load import is_decoder, lm_head_is_tied, load_lm
from routetune.model.attention import NAME as ATTENTION_NAME
from routetune.model.methods.base import NOTE, Method, check_base
from routetune.model.methods.prompts.modules import build_prompt_module
from routetune.model.packing import PACKED, Layout, run_packed

log = logging.getLogger("routetune")

HEADS_SPEC, HEADS_WEIGHTS = "heads.json", "heads.safetensors"  # the task heads: kinds and labels, weights


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
        self.method: Method = methods.get("full")  # the parameter-sharing method (model/methods/)
        self.peft_options: dict = {}
        self.prompt: nn.Module | None = None  # prompt_tuning / prefix_tuning: peft's trained module
        self.n_virtual = 0
        self.quantization: dict | None = None  # model.quantize: the base's bitsandbytes settings (model/quantize.py)
        self.fused_lm_loss = True  # causal-LM loss through model/lm_loss.py where the head allows it
        self.padding_free = False  # the backbone runs on the real tokens only (model/packing.py)
        self.packed_attention = "padded"  # ...and how attention sees the packed examples (train.packed_attention)

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
        head = HEADS[kind](cfg.hidden_size, labels, head_dropout(cfg), **options)
        init.bert_style_(head, getattr(cfg, "initializer_range", 0.02), torch.Generator().manual_seed(seed))
        if getattr(head, "pooling", None) == "cls" and pooler_from:
            copy_pooler(head, pooler_from)
        self.heads[name] = head
        return head

    def add_token_head(self, name: str, labels: list[str], seed: int) -> nn.Module:
        return self.add_head(name, "token-classification", labels, seed)

    def lm_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[dict, int]:
        """Keyword arguments for the backbone / LM, and how many leading output positions are
        virtual tokens (prompt tuning) to drop. See model/methods/prompts/modules.py."""
        if self.prompt is None:
            return {"input_ids": input_ids, "attention_mask": self.backbone_mask(attention_mask)}, 0
        return self.method.virtual_inputs(self, input_ids, attention_mask)

    def backbone_mask(self, attention_mask: torch.Tensor, queries: int | None = None) -> torch.Tensor:
        """The padding mask as the backbone takes it. Given a 2-D mask, transformers asks the device
        whether any position is padded (to skip the mask for SDPA), a host synchronisation in every
        forward pass. So off the CPU an SDPA backbone gets the 4-D boolean mask SDPA takes, which
        transformers uses as it is: [batch, 1, 1, keys] for an encoder, causal and padding
        [batch, 1, queries, keys] for a decoder (`queries` < keys when a prefix's keys come first).
        On the CPU the 2-D mask is kept (the question costs nothing there; same kernels)."""
        if (not lm_loss.sync_free(attention_mask.device)
                or self.config._attn_implementation not in ("sdpa", ATTENTION_NAME)):
            return attention_mask
        keys = attention_mask[:, None, None, :].bool()
        if not self.is_decoder:
            return keys
        k = attention_mask.shape[1]
        q = queries if queries is not None else k
        causal = torch.ones(q, k, dtype=torch.bool, device=attention_mask.device).tril(k - q)
        return causal[None, None] & keys

    def _layout(self, attention_mask: torch.Tensor, layout: Layout | None) -> Layout | None:
        """The padding-free layout of a batch when the model runs padding-free (model/packing.py):
        the one the batch brought, or made now (a host read of the mask)."""
        if not self.padding_free:
            return None
        return (layout if layout is not None else Layout.of(attention_mask)).using(self.packed_attention)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      layout: Layout | None = None) -> torch.Tensor:
        """The backbone's last hidden states, [rows, width, hidden] (zeros at padding when
        padding-free); `layout`: the batch's own, made on its CPU copy (model/packing.py)."""
        layout = self._layout(attention_mask, layout)
        if layout is not None:
            return layout.unpack(run_packed(self.backbone, layout, input_ids, self.is_decoder).last_hidden_state)
        inputs, drop = self.lm_inputs(input_ids, attention_mask)
        return self.backbone(**inputs).last_hidden_state[:, drop:]

    def lm_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  layout: Layout | None = None) -> torch.Tensor:
        """LM-head logits, one row per input position."""
        layout = self._layout(attention_mask, layout)
        if layout is not None:
            return layout.unpack(run_packed(self.lm, layout, input_ids, self.is_decoder).logits)
        inputs, drop = self.lm_inputs(input_ids, attention_mask)
        return self.lm(**inputs).logits[:, drop:]

    def causal_lm_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs, drop = self.lm_inputs(batch["input_ids"], batch["attention_mask"])
        labels = batch["labels"]
        if drop:
            labels = torch.cat([labels.new_full((labels.shape[0], drop), -100), labels], 1)
        head = self._plain_lm_head()
        if head is None:
            return self.lm(**inputs, labels=labels).loss
        # transformers' loss (shift, mean over scored tokens) without the full fp32 logits
        if self.padding_free:
            hidden = self.hidden_states(batch["input_ids"], batch["attention_mask"], batch.get(PACKED))[:, :-1]
        else:
            hidden = self.backbone(**inputs).last_hidden_state[:, :-1]
        targets = labels[:, 1:]
        scored, index = targets != -100, batch.get(SCORED_INDEX)
        return linear_cross_entropy(pick_scored(hidden, scored, index, drop), head.weight,
                                    pick_scored(targets, scored, index, drop))

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

    def forward(self, name: str, objective: str, batch: dict[str, torch.Tensor], distill: float | None = None
                ) -> torch.Tensor:
        """The training loss of source `name` on `batch` (what DistributedDataParallel wraps):
        self-distillation where the source has a share, its objective's loss otherwise."""
        if distill:
            return self.distill_loss(objective, batch, distill)
        return self.loss(name, objective, batch)

    def loss(self, name: str, objective: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Source `name`'s loss on `batch`: its task head's, or the LM loss its objective names."""
        spec = objectives.get(objective)
        if spec.head is not None:
            hidden = self.hidden_states(batch["input_ids"], batch["attention_mask"], batch.get(PACKED))
            return self.heads[name].loss(self.heads[name](hidden, batch["attention_mask"]), batch["labels"])
        return self.masked_lm_loss(batch) if spec.lm_loss == "masked-lm" else self.causal_lm_loss(batch)

    def masked_lm_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Masked-LM loss. For BERT-style heads (``lm.cls``) the vocabulary projection runs only on
        the ~15% selected positions instead of all of them (same loss as the full forward, which
        the reference test checks); other architectures use transformers' own forward."""
        head = getattr(self.lm, "cls", None)
        labels = batch["labels"]
        if head is None:
            logits = self.lm_logits(batch["input_ids"], batch["attention_mask"], batch.get(PACKED))
            return nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        selected, index = labels != -100, batch.get(SCORED_INDEX)
        hidden = self.hidden_states(batch["input_ids"], batch["attention_mask"], batch.get(PACKED))
        return nn.functional.cross_entropy(head(pick_scored(hidden, selected, index)).float(),
                                           pick_scored(labels, selected, index))

    # ------------------------------------------------------------------ self-distillation

    def enable_teacher(self, precision: str) -> str:
        """Keep the model as it is now as the frozen teacher of :meth:`distill_loss` (model/distill.py).
        Returns how it is held, for the log."""
        teacher = Teacher(self, precision)
        self.__dict__["_teacher"] = teacher  # outside the module tree: never trained, saved or counted
        return teacher.how

    def distill_loss(self, objective: str, batch: dict[str, torch.Tensor], share: float) -> torch.Tensor:
        if "_teacher" not in self.__dict__:
            raise RuntimeError("distill_loss needs enable_teacher() first")
        return distill_loss(self, self.__dict__["_teacher"], objective, batch, share)

    # ------------------------------------------------------------------ persistence

    def save(self, folder: str | Path, tokenizer=None) -> None:
        folder = Path(folder)
        self.method.save(self, folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        tensors = {f"{name}.{k}": v.detach().contiguous() for name, head in self.heads.items()
                   for k, v in head.state_dict().items()}
        if tensors:
            save_file(tensors, str(folder / HEADS_WEIGHTS))
        specs = {name: head.spec() for name, head in self.heads.items()}
        (folder / HEADS_SPEC).write_text(json.dumps(specs, indent=2) + "\n")

    def attach_prompt(self, pconfig, generator: torch.Generator | None = None) -> None:
        """Add peft's prompt / prefix module for `pconfig` (see model/methods/prompts/modules.py)."""
        self.prompt = build_prompt_module(pconfig, self.lm.get_input_embeddings(),
                                          generator or torch.Generator().manual_seed(0))
        self.n_virtual = pconfig.num_virtual_tokens
        # transformers 5.x renames `past_key_values` to `cache` (the old name warns, then goes in
        # 5.40); looked up once here, not on every forward
        params = inspect.signature(self.backbone.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"

    def _load_head_tensors(self, folder: Path, names: list[str]) -> None:
        tensors = load_file(str(folder / HEADS_WEIGHTS)) if names else {}
        for name in names:
            prefix = name + "."
            self.heads[name].load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})

    def load_weights(self, folder: str | Path) -> None:
        """Load the exact tensors of a checkpoint saved by :meth:`save` into this model."""
        folder = Path(folder)
        specs = json.loads((folder / HEADS_SPEC).read_text())
        if set(specs) != set(self.heads) or any(specs[n] != self.heads[n].spec() for n in specs):
            raise ValueError(f"{folder}/{HEADS_SPEC}: heads or label sets differ from this run's")
        self.method.load_weights(self, folder)
        self._load_head_tensors(folder, list(specs))

    def load_heads_from(self, folder: str | Path, names: list[str]) -> None:
        """Copy the named heads of an earlier checkpoint. A head whose label list grew keeps the
        earlier classes' weights exactly (their rows come first); the new rows stay as initialised."""
        folder = Path(folder)
        specs = json.loads((folder / HEADS_SPEC).read_text())
        tensors = load_file(str(folder / HEADS_WEIGHTS))
        for name in names:
            old_labels, head = specs[name]["labels"], self.heads[name]
            if specs[name]["kind"] != head.kind or head.labels[: len(old_labels)] != old_labels:
                raise ValueError(f"{folder}/{HEADS_SPEC}: head {name!r} ({specs[name]['kind']}, labels {old_labels}) "
                                 f"does not fit this run's ({head.kind}, labels {head.labels})")
            with torch.no_grad():
                for key, target in head.state_dict(keep_vars=True).items():
                    old = tensors[f"{name}.{key}"]
                    target[: old.shape[0]].copy_(old)

    @classmethod
    def load(cls, folder: str | Path, attention: str = "auto", device_type: str | None = None) -> RoutedModel:
        """A checkpoint folder as a model: its method rebuilds the LM (from the base it names, for
        partial checkpoints), then the heads are added and loaded. `attention` (the run's
        `model.attention`) and `device_type` (where the model will run) choose the attention
        implementation as training does; the model itself is on the CPU."""
        folder = Path(folder)
        note = json.loads((folder / NOTE).read_text()) if (folder / NOTE).is_file() else {}
        if note:
            check_base(folder, note)
        name = note.get("method") or ("lora" if note.get("adapter") else "full")
        model = methods.get(name).rebuild(cls, folder, note, attention, device_type)
        specs = json.loads((folder / HEADS_SPEC).read_text())
        for name, spec in specs.items():
            if spec["kind"] not in HEADS:
                raise ValueError(f"{folder}/{HEADS_SPEC}: unknown head kind {spec['kind']!r}")
            options = {k: spec[k] for k in ("pooling", "threshold") if k in spec}
            model.add_head(name, spec["kind"], spec["labels"], seed=0, **options)
        model._load_head_tensors(folder, list(specs))
        model.eval()
        return model


def build_model(path: str, seed: int, attention: str = "auto", device_type: str | None = None,
                dtype: torch.dtype = torch.float32, quantization: dict | None = None) -> RoutedModel:
    """The LM of `path` as a RoutedModel without task heads, on the CPU (the caller moves it), its
    weights in `dtype` (quantized with `quantization`, then on `device_type` already);
    `device_type` is where it will train, which decides `auto` attention."""
    lm, missing_head = load_lm(path, attention, device_type, dtype, quantization)
    if missing_head:
        tied = lm_head_is_tied(lm)
        log.info("the checkpoint has no LM head weights (%s), as usual for a model published without one: "
                 "initialised a new one%s (language-modelling sources train it)",
                 ", ".join(missing_head[:4]) + (" ..." if len(missing_head) > 4 else ""),
                 " with its decoder tied to the word embeddings" if tied else "")
    model = RoutedModel(lm)
    model.quantization = quantization
    return model
