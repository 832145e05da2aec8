"""What a parameter-sharing method is to routetune: one object that knows how to put the method
into a backbone, which backbone parameters it trains, how its checkpoints are written and read
back, and what it allows afterwards (merging, generation, a teacher by switching it off).

Checkpoint formats are shared by methods (each names one in ``checkpoint``):

* ``full``: a plain Hugging Face model folder (``config.json`` + ``model.safetensors``);
* ``adapter``: peft's own adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``,
  loadable with ``PeftModel.from_pretrained``), the LM head's own trained tensors
  (``lm_trainable.safetensors``) and ``routetune.json`` naming the base;
* ``trained``: only the tensors the method trains (``lm_trainable.safetensors``), ``config.json``
  and ``routetune.json`` naming the base they apply to.

``routetune.json`` holds the base's path and SHA-256 digest, checked on load.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from routetune.errors import ConfigError, ModelError
from routetune.model.load import base_digest, load_lm

log = logging.getLogger("routetune")

NOTE = "routetune.json"
LM_TRAINABLE = "lm_trainable.safetensors"  # the LM's trained tensors outside peft's own file
ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"  # peft's adapter folder

ADAPTER_MARKERS = ("lora_", "ia3_", ".adapter.")
"""Parameter names of adapter tensors (peft's LoRA/DoRA/IA3, routetune's bottleneck adapters)."""


def is_adapter_param(name: str) -> bool:
    return any(m in name for m in ADAPTER_MARKERS)


class Method:
    """The base: full fine-tuning's behaviour where a method does not say otherwise."""

    name = "full"
    checkpoint = "full"
    required_files = frozenset({"config.json"})
    """What a checkpoint of this format cannot be without (training/checkpoint.py refuses a manifest
    that lists less); `full` also needs model.safetensors or its sharded index."""
    teacher_by_switching = False
    """The model as it started = this model with the method switched off (no frozen copy needed)."""
    frozen_bf16 = True
    """Frozen Linear weights may be held as bf16 copies while training (model/frozen_bf16.py)."""
    quantizable = False
    """The method trains adapters over a base it never changes, so the base may be quantized (`model.quantize`)."""
    low_precision_base = True
    """A base this method freezes may be held in the training precision, bf16 or fp16 (`model.base_dtype`):
    false where the method reads the base weight in full (DoRA's magnitude) or trains parts of the
    base's own modules (BitFit's biases beside 16-bit weights)."""
    merge_refusal: str | None = None
    """Why `export --merge` cannot fold this method into plain weights (None: it can)."""
    export_refusal: str | None = None
    """Why no plain transformers export exists at all (None: it does)."""
    generate_refusal: str | None = None
    """Why generation is not supported (None: it is)."""
    options: tuple[str, ...] = ()
    """The `peft.*` keys this method reads (documented on the config's `peft` section); any other
    `peft.*` key given with this method is refused (:meth:`check_options`)."""
    note_options: tuple[str, ...] = ()
    """The options a checkpoint's note records (what rebuilding the method needs)."""

    freezable = False
    """The `freeze` strategies apply (full fine-tuning): other methods freeze the backbone themselves."""

    def check_options(self, pcfg, fcfg) -> None:
        """Refuse a `peft.*` option the config gives that this method does not read, and freezing
        strategies where the method freezes the backbone itself."""
        # options away from their defaults (a saved run's config lists every key, at its default)
        fields = type(pcfg).model_fields.items()
        given = sorted(k for k, f in fields if k not in ("method", *self.options)
                       and getattr(pcfg, k) != f.get_default(call_default_factory=True))
        if given:
            takes = ", ".join(f"peft.{o}" for o in self.options) or "none"
            raise ConfigError(f"peft.{given[0]}: not an option of peft.method {self.name} (its options: {takes})")
        if not self.freezable and (fcfg.embeddings or fcfg.head_only or fcfg.top_k_layers):
            raise ConfigError("freeze: freezing strategies apply to full fine-tuning; with peft.method "
                              f"{self.name} the backbone is frozen already")

    def option_values(self, pcfg) -> dict:
        """The options a checkpoint's note keeps, from the config."""
        return {k: (list(v) if isinstance(v, (list, tuple)) else v)
                for k in self.note_options for v in [getattr(pcfg, k)]}

    # ---------------------------------------------------------------- training
    def apply(self, model, pcfg, base_path: str) -> None:
        """Put the method's modules into `model` (before requires_grad is set)."""

    def trains(self, name: str) -> bool | None:
        """Whether the backbone parameter `name` (not an embedding) trains; None: the freeze
        strategies decide (full fine-tuning)."""
        return None

    def check(self, model) -> None:
        """Refuse a backbone the method cannot train (after requires_grad is set)."""

    def virtual_inputs(self, model, input_ids, attention_mask) -> tuple[dict, int]:
        """The backbone's keyword arguments when the method adds virtual tokens (prompts/), and how
        many leading output positions to drop."""
        raise NotImplementedError(f"{self.name} adds no virtual tokens")

    # ---------------------------------------------------------------- checkpoints
    def save(self, model, folder: Path) -> None:
        model.lm.save_pretrained(folder)

    def load_weights(self, model, folder: Path) -> None:
        """Load a checkpoint's tensors into `model`, which was built by the same config."""
        state = load_file(str(folder / "model.safetensors"))
        result = model.lm.load_state_dict(state, strict=False)
        params = dict(model.lm.named_parameters(remove_duplicate=False))
        loaded = {params[k].data_ptr() for k in state if k in params}
        untied = [k for k in result.missing_keys if k in params and params[k].data_ptr() not in loaded]
        if untied or [k for k in result.unexpected_keys if k in params]:
            raise ValueError(f"{folder}/model.safetensors does not fit this model (missing {untied[:3]})")

    def rebuild(self, routed_cls, folder: Path, note: dict, attention: str = "auto", device_type: str | None = None):
        """A RoutedModel (without heads) with this checkpoint's LM, for `RoutedModel.load`, its
        attention implementation chosen for `device_type` (where it will run) as in training."""
        lm, _ = load_lm(str(folder), attention, device_type)
        return routed_cls(lm)

    # ---------------------------------------------------------------- serving several runs on one base
    def add_adapter(self, model, folder: Path, name: str) -> None:
        """Load the adapter of checkpoint `folder` into `model` (same base, same method) beside the
        ones it has, as `name` (`routetune serve RUN_A RUN_B`)."""
        raise ModelError(f"{folder}: a {self.name} run cannot be served beside other runs on one base (only "
                         "peft adapters can: lora, dora, ia3); serve it on its own")

    def use_adapter(self, model, name: str | None) -> None:
        """Make adapter `name` the one the model runs with; None: the base alone."""
        raise ModelError(f"{self.name} has no adapters to switch")

    # ---------------------------------------------------------------- export
    def merge(self, lm) -> None:
        """Fold the method into plain weights (export --merge); nothing to do by default."""

    def note(self, model) -> dict:
        quantized = {"quantization": model.quantization} if model.quantization else {}
        return {"base": model.base_path, "base_digest": base_digest(model.base_path), "method": self.name,
                "adapter": self.checkpoint == "adapter", **model.peft_options, **quantized}


class TrainedTensors(Method):
    """Methods whose checkpoint holds only the tensors they train (``trained`` format)."""

    checkpoint = "trained"
    required_files = frozenset({"config.json", LM_TRAINABLE, NOTE})

    def save(self, model, folder: Path) -> None:
        trained = {n: p.detach().contiguous() for n, p in model.lm.named_parameters() if p.requires_grad}
        save_file(trained, str(folder / LM_TRAINABLE))
        (folder / NOTE).write_text(json.dumps(self.note(model)) + "\n")
        model.lm.config.save_pretrained(folder)

    def load_weights(self, model, folder: Path, tensors: dict | None = None) -> None:
        if tensors is None:
            tensors = load_file(str(folder / LM_TRAINABLE))
        params = dict(model.lm.named_parameters())
        unknown = [n for n in tensors if n not in params]
        if unknown:
            raise ValueError(f"{folder}/{LM_TRAINABLE} does not fit this model ({unknown[:3]})")
        with torch.no_grad():
            for name, tensor in tensors.items():
                params[name].copy_(tensor)

    def inject(self, lm, options: dict) -> None:
        """Rebuild the method's modules in a freshly loaded base (from the note's options)."""

    def rebuild(self, routed_cls, folder: Path, note: dict, attention: str = "auto", device_type: str | None = None):
        lm, _ = load_lm(note["base"], attention, device_type)
        self.inject(lm, note)
        model = routed_cls(lm)
        model.method, model.base_path = self, note["base"]
        model.peft_options = {k: note[k] for k in self.note_options if k in note}
        trained = load_file(str(folder / LM_TRAINABLE))
        for name, p in model.lm.named_parameters():
            p.requires_grad_(name in trained)  # so that a re-save writes the same tensors
        self.load_weights(model, folder, trained)
        return model


class PeftFormat(Method):
    """Methods saved in peft's adapter format (``adapter`` format)."""

    checkpoint = "adapter"
    required_files = frozenset({ADAPTER_CONFIG, ADAPTER_WEIGHTS, LM_TRAINABLE, NOTE})
    teacher_by_switching = True

    def save(self, model, folder: Path) -> None:
        from peft import get_peft_model_state_dict  # peft is imported where it is used: it loads slowly

        if model.prompt is not None:  # peft saves prompt-learning weights under this one key
            tensors = {"prompt_embeddings": model.prompt.embedding.weight.detach().contiguous()}
        else:
            tensors = {f"base_model.model.{k}": v.detach().contiguous()
                       for k, v in get_peft_model_state_dict(model.lm).items()}
        save_file(tensors, str(folder / ADAPTER_WEIGHTS))
        model.adapter_config.save_pretrained(str(folder))
        extra = {n: p.detach().contiguous() for n, p in model.lm.named_parameters()
                 if p.requires_grad and not is_adapter_param(n)}
        save_file(extra, str(folder / LM_TRAINABLE))
        (folder / NOTE).write_text(json.dumps(self.note(model)) + "\n")

    def load_weights(self, model, folder: Path) -> None:
        from peft import set_peft_model_state_dict

        state = load_file(str(folder / ADAPTER_WEIGHTS))
        if model.prompt is not None:
            with torch.no_grad():
                model.prompt.embedding.weight.copy_(state["prompt_embeddings"])
        else:
            set_peft_model_state_dict(model.lm, {k.removeprefix("base_model.model."): v for k, v in state.items()})
        extra = load_file(str(folder / LM_TRAINABLE))
        params = dict(model.lm.named_parameters())
        with torch.no_grad():
            for name, tensor in extra.items():
                params[name].copy_(tensor)

    def attach(self, model, config) -> None:
        """Put the method described by peft `config` into `model` (training and loading alike)."""
        raise NotImplementedError

    def rebuild(self, routed_cls, folder: Path, note: dict, attention: str = "auto", device_type: str | None = None):
        from peft import PeftConfig

        lm, _ = load_lm(note["base"], attention, device_type, quantization=note.get("quantization"))
        config = PeftConfig.from_pretrained(str(folder))
        model = routed_cls(lm)
        model.quantization = note.get("quantization")
        self.attach(model, config)
        model.adapter_config, model.base_path, model.method = config, note["base"], self
        self.load_weights(model, folder)
        return model


def check_base(folder: Path, note: dict) -> None:
    """An adapter or trained-tensors checkpoint applies to the exact base it was trained on."""
    recorded, base = note.get("base_digest"), note.get("base")
    if recorded is None:
        log.warning("%s/%s records no digest of its base %s (written by an older routetune): "
                    "the base is loaded unchecked", folder, NOTE, base)
        return
    now = base_digest(base)
    if now is not None and now != recorded:
        raise ModelError(f"{folder}/{NOTE}: the base model at {base} is not the one this checkpoint was "
                         "trained on (its files changed: different SHA-256); restore that model or retrain")


FORMATS: dict[str, frozenset[str]] = {cls.checkpoint: cls.required_files
                                      for cls in (Method, TrainedTensors, PeftFormat)}
"""Each checkpoint format and the files it cannot be without."""
