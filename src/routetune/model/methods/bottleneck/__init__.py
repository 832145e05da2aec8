"""`adapter`: routetune's bottleneck adapters (adapters.py beside this file) after the attention and/or
feed-forward output projections. They are non-linear, so they cannot be merged into plain
weights; checkpoints hold the adapter tensors (and the LM head's own) plus a note naming the base."""

from routetune.errors import ConfigError
from routetune.model.methods.bottleneck.adapters import add_bottleneck_adapters
from routetune.model.methods.base import TrainedTensors, is_adapter_param


class BottleneckAdapter(TrainedTensors):
    name = "adapter"
    export_refusal = ("bottleneck adapters are non-linear and cannot be merged into plain transformers weights; "
                      "the checkpoint (lm_trainable.safetensors + routetune.json) loads with routetune")
    merge_refusal = export_refusal
    options = ("adapter_size", "adapter_placement", "train_lm_head")
    note_options = ("adapter_size", "adapter_placement")

    def apply(self, model, pcfg, base_path: str) -> None:
        if not add_bottleneck_adapters(model.lm, pcfg.adapter_size, pcfg.adapter_placement):
            raise ConfigError(f"peft.adapter_placement: no matching projection in this backbone "
                              f"({model.config.model_type})")

    def inject(self, lm, options: dict) -> None:
        add_bottleneck_adapters(lm, options["adapter_size"], options["adapter_placement"])

    def trains(self, name: str) -> bool:
        return is_adapter_param(name)


METHOD = BottleneckAdapter()
