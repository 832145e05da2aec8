"""`lora`, `dora`, `ia3`: adapters injected in place by the peft library
(``inject_adapter_in_model``), so the backbone keeps its module tree and every head still reads
``lm.base_model``; the base weights are frozen. Checkpoints are peft's adapter format, and
`export --merge` folds the adapters into plain weights."""

from __future__ import annotations

import logging
from pathlib import Path

from safetensors.torch import load_file
from torch import nn

from routetune.errors import ConfigError, ModelError
from routetune.model import quantize
from routetune.model.methods.base import ADAPTER_WEIGHTS, LM_TRAINABLE, PeftFormat, is_adapter_param

log = logging.getLogger("routetune")

def _linear_names(lm: nn.Module) -> list[str]:
    """The distinct last names of the backbone's Linear (and GPT-2 Conv1D) layers, for a message."""
    kinds = ("Linear", "Conv1D")
    names = {n.rpartition(".")[2] for n, m in lm.named_modules() if type(m).__name__ in kinds and n}
    out = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    out_names = {n.rpartition(".")[2] for n, m in lm.named_modules() if m is out}
    return sorted(names - out_names)


def lora_targets(pcfg, lm: nn.Module) -> list[str] | str:
    """`peft.target_modules`, else peft's own default for the architecture
    (``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``: the attention's query and value
    projections), else, for an architecture peft has no default for, every linear layer but the
    output projection (peft's ``all-linear``)."""
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    if pcfg.target_modules:
        return list(pcfg.target_modules)
    model_type = lm.config.model_type
    if model_type in DEFAULTS:
        return list(DEFAULTS[model_type])
    log.info("peft.target_modules: peft has no default for model type %r; every linear layer but the output "
             "projection gets adapters (peft's 'all-linear'): %s", model_type, ", ".join(_linear_names(lm)))
    return "all-linear"


def ia3_targets(pcfg, lm: nn.Module) -> tuple[list[str], list[str]]:
    """(target, feed-forward) modules of IA3: `peft.target_modules` (the feed-forward ones among
    them as peft's default says), else peft's default for the architecture; an architecture peft
    has none for needs them named."""
    from peft.utils import TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FEEDFORWARD
    from peft.utils import TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as DEFAULTS

    model_type = lm.config.model_type
    ff = list(FEEDFORWARD.get(model_type, []))
    if pcfg.target_modules:
        return list(pcfg.target_modules), [t for t in ff if t in pcfg.target_modules]
    if model_type not in DEFAULTS:
        raise ConfigError(f"peft.target_modules: peft has no IA3 default for model type {model_type!r}; name the "
                          f"modules (its linear layers: {', '.join(_linear_names(lm))})")
    return list(DEFAULTS[model_type]), ff


class PeftTuner(PeftFormat):
    def peft_config(self, pcfg, lm: nn.Module):
        raise NotImplementedError

    def apply(self, model, pcfg, base_path: str) -> None:
        config = self.peft_config(pcfg, model.lm)
        config.base_model_name_or_path = base_path
        try:
            self.attach(model, config)
        except ValueError as exc:
            raise ConfigError(f"peft.target_modules: {exc}") from None
        model.adapter_config = config

    def attach(self, model, config) -> None:
        from peft import inject_adapter_in_model  # peft is imported where it is used: it loads slowly

        inject_adapter_in_model(config, model.lm)

    def trains(self, name: str) -> bool:
        return is_adapter_param(name)

    def add_adapter(self, model, folder: Path, name: str) -> None:
        from peft import PeftConfig, inject_adapter_in_model, set_peft_model_state_dict

        extra = load_file(str(folder / LM_TRAINABLE))
        if extra:
            raise ModelError(f"{folder}: this run also trained {len(extra)} tensor(s) outside its adapters (e.g. "
                             f"{next(iter(extra))}), which runs on one base cannot share; serve it on its own")
        config = PeftConfig.from_pretrained(str(folder))
        inject_adapter_in_model(config, model.lm, adapter_name=name)
        state = load_file(str(folder / ADAPTER_WEIGHTS))
        set_peft_model_state_dict(model.lm, {k.removeprefix("base_model.model."): v for k, v in state.items()},
                                  adapter_name=name)
        model.lm.requires_grad_(False)

    def use_adapter(self, model, name: str | None) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        for module in model.lm.modules():
            if isinstance(module, BaseTunerLayer):
                module.enable_adapters(name is not None)
                if name is not None and module.active_adapters != [name]:
                    module.set_adapter(name, inference_mode=True)  # (not marked trainable)

    def merge(self, lm: nn.Module) -> int:
        """Merge every injected peft layer into its base layer and put the base layer back. Over a
        quantized base (model/quantize.py) each layer becomes a plain Linear of what it computes
        (the adapter folded into the dequantized weight), and the other quantized layers plain
        Linears of their dequantized weights."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        merged = 0
        for name, module in list(lm.named_modules()):
            if isinstance(module, BaseTunerLayer):
                parent_name, _, child = name.rpartition(".")
                parent = lm.get_submodule(parent_name) if parent_name else lm
                if quantize.is_quantized_layer(module.get_base_layer()):
                    setattr(parent, child, quantize.merged_linear(module))
                else:
                    module.merge()
                    setattr(parent, child, module.get_base_layer())
                merged += 1
        if getattr(lm, "is_quantized", False):
            quantize.dequantize(lm)
        if hasattr(lm, "peft_config"):
            del lm.peft_config  # a plain transformers model again
        return merged


class LoRA(PeftTuner):
    name = "lora"
    quantizable = True
    options = ("r", "alpha", "dropout", "target_modules", "train_lm_head")

    def peft_config(self, pcfg, lm: nn.Module):
        import peft

        targets = lora_targets(pcfg, lm)
        return peft.LoraConfig(r=pcfg.r, lora_alpha=pcfg.alpha, lora_dropout=pcfg.dropout, target_modules=targets,
                               use_dora=self.name == "dora", bias="none")


class DoRA(LoRA):
    name = "dora"
    frozen_bf16 = False  # DoRA reads the base weight to compute its magnitude norm: it keeps autocast's casts
    low_precision_base = False


class IA3(PeftTuner):
    name = "ia3"
    options = ("target_modules", "train_lm_head")

    def peft_config(self, pcfg, lm: nn.Module):
        import peft

        targets, ff = ia3_targets(pcfg, lm)
        return peft.IA3Config(target_modules=targets, feedforward_modules=ff)


LORA, DORA, IA3_METHOD = LoRA(), DoRA(), IA3()
