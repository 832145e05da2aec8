"""`lora`, `dora`, `ia3`: adapters injected in place by the peft library
(``inject_adapter_in_model``), so the backbone keeps its module tree and every head still reads
``lm.base_model``; the base weights are frozen. Checkpoints are peft's adapter format, and
`export --merge` folds the adapters into plain weights."""

from __future__ import annotations

from torch import nn

from routetune.errors import ConfigError
from routetune.model.methods.base import PeftFormat, is_adapter_param

# Default target modules per architecture family (attention projections; IA3 also the FFN).
LORA_TARGETS = {"llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
                "bert": ["query", "key", "value", "attention.output.dense"]}
IA3_TARGETS = {"llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
               "bert": (["key", "value", "intermediate.dense"], ["intermediate.dense"])}


def _family(config) -> str:
    return "bert" if config.model_type in ("bert", "roberta", "xlm-roberta", "electra", "distilbert") else "llama"


class PeftTuner(PeftFormat):
    def peft_config(self, pcfg, config):
        raise NotImplementedError

    def apply(self, model, pcfg, base_path: str) -> None:
        config = self.peft_config(pcfg, model.config)
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

    def merge(self, lm: nn.Module) -> int:
        """Merge every injected peft layer into its base layer and put the base layer back."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        merged = 0
        for name, module in list(lm.named_modules()):
            if isinstance(module, BaseTunerLayer):
                module.merge()
                parent_name, _, child = name.rpartition(".")
                parent = lm.get_submodule(parent_name) if parent_name else lm
                setattr(parent, child, module.get_base_layer())
                merged += 1
        if hasattr(lm, "peft_config"):
            del lm.peft_config  # a plain transformers model again
        return merged


class LoRA(PeftTuner):
    name = "lora"

    def peft_config(self, pcfg, config):
        import peft

        targets = pcfg.target_modules or LORA_TARGETS[_family(config)]
        return peft.LoraConfig(r=pcfg.r, lora_alpha=pcfg.alpha, lora_dropout=pcfg.dropout, target_modules=targets,
                               use_dora=self.name == "dora", bias="none")


class DoRA(LoRA):
    name = "dora"
    frozen_bf16 = False  # DoRA reads the base weight to compute its magnitude norm: it keeps autocast's casts


class IA3(PeftTuner):
    name = "ia3"

    def peft_config(self, pcfg, config):
        import peft

        targets, ff = IA3_TARGETS[_family(config)]
        if pcfg.target_modules:
            targets, ff = pcfg.target_modules, [t for t in ff if t in pcfg.target_modules]
        return peft.IA3Config(target_modules=targets, feedforward_modules=ff)


LORA, DORA, IA3_METHOD = LoRA(), DoRA(), IA3()
