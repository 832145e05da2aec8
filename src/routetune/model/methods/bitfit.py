"""`bitfit`: only the backbone's bias terms train (Ben Zaken et al., 2022). Checkpoints hold the
trained biases and a note naming the base."""

from routetune.errors import ConfigError
from routetune.model.methods.base import TrainedTensors


class BitFit(TrainedTensors):
    name = "bitfit"
    options = ("train_lm_head",)
    low_precision_base = False  # its trained biases sit in the base's own modules, beside their weights

    def trains(self, name: str) -> bool:
        return name.endswith(".bias")

    def check(self, model) -> None:
        prefix = model.lm.base_model_prefix + "."
        if not any(p.requires_grad and n.startswith(prefix) and n.endswith(".bias")
                   for n, p in model.lm.named_parameters()):
            raise ConfigError("peft.method: bitfit trains only bias terms, and this backbone has none "
                              f"({model.config.model_type}); choose lora, ia3 or a freeze strategy")


METHOD = BitFit()
