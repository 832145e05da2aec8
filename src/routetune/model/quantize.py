"""4-bit and 8-bit base weights (`model.quantize`: QLoRA), through bitsandbytes.

The base is loaded quantized by transformers (`BitsAndBytesConfig`: NF4 or FP4 with an optional
double quantization, or LLM.int8), on the device it trains on (bitsandbytes runs on x86 CPUs with
AVX2 and on CUDA); its other weights (embeddings, norms, the LM head) are held in the compute
precision. LoRA or DoRA adapters train on top in fp32; a checkpoint holds only them (and the
heads) with the base's identity and these settings, and loading it quantizes the base again.
`export --merge` dequantizes: each adapter is folded into the dequantized weight it was trained
against, and every other quantized layer becomes a plain Linear of its dequantized weight.
"""

from __future__ import annotations

import torch
from torch import nn

from routetune.errors import ConfigError, ModelError

SCHEMES = ("nf4", "fp4", "int8")


def bnb_config(scheme: str, double: bool, compute_dtype: torch.dtype):
    """transformers' BitsAndBytesConfig for `scheme`; a missing bitsandbytes is one clear error."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ModelError("model.quantize: needs the bitsandbytes package (pip install 'routetune[quantize]')") \
            from None
    from transformers import BitsAndBytesConfig

    if scheme == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=scheme, bnb_4bit_use_double_quant=double,
                              bnb_4bit_compute_dtype=compute_dtype)


def keep_trainable_layout(lm: nn.Module) -> None:
    """Switch off bitsandbytes' packed CPU layout on every 4-bit Linear of `lm`.

    On CPUs with AVX512-BF16, bitsandbytes (0.50) repacks a 4-bit weight in place the first time it
    runs in eval mode without gradients (routetune's scoring before training, dev evaluations, a
    retention budget's measurements), and never unpacks it: every later forward goes through its
    inference kernel, which has no backward, so the adapters below that layer would silently get no
    gradient (checked: the input's gradient is None), and the repacking fails outright for layers
    narrower than its 64-wide blocks. Written here because bitsandbytes has no switch but this flag."""
    import bitsandbytes as bnb

    for m in lm.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False


def is_quantized_layer(module: nn.Module) -> bool:
    import bitsandbytes as bnb

    return isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def plain_linear(module: nn.Module) -> nn.Linear:
    """A plain Linear holding the dequantized weight of quantized layer `module`."""
    from peft.utils.integrations import dequantize_module_weight

    weight = dequantize_module_weight(module).float()
    out = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device=weight.device)
    with torch.no_grad():
        out.weight.copy_(weight)
        if module.bias is not None:
            out.bias.copy_(module.bias.float())
    return out


@torch.no_grad()
def merged_linear(module: nn.Module, block: int = 1024) -> nn.Linear:
    """A plain Linear computing what adapter layer `module` (LoRA or DoRA over a quantized layer)
    computes: its weight read off the layer itself, one block of unit vectors at a time, so the
    adapter is folded into the dequantized weight it was trained against whatever its formula."""
    base = module.get_base_layer()
    device = next(module.parameters()).device
    n_in, n_out = base.in_features, base.out_features
    bias = base.bias.float() if base.bias is not None else torch.zeros(n_out, device=device)
    weight = torch.empty(n_out, n_in, device=device)
    was_training = module.training
    module.eval()
    for start in range(0, n_in, block):
        eye = torch.eye(n_in, device=device)[start:start + block]
        weight[:, start:start + block] = (module(eye).float() - bias).T
    module.train(was_training)
    out = nn.Linear(n_in, n_out, bias=base.bias is not None, device=device)
    out.weight.copy_(weight)
    if base.bias is not None:
        out.bias.copy_(bias)
    return out


def dequantize(lm: nn.Module) -> int:
    """Every quantized layer of `lm` replaced by a plain fp32 Linear of its dequantized weight, and
    the model's quantization settings dropped, so `save_pretrained` writes a plain folder."""
    replaced = 0
    for name, module in list(lm.named_modules()):
        if name and is_quantized_layer(module):
            parent_name, _, child = name.rpartition(".")
            parent = lm.get_submodule(parent_name) if parent_name else lm
            setattr(parent, child, plain_linear(module))
            replaced += 1
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(lm, attr):
            delattr(lm, attr)
    if hasattr(lm.config, "quantization_config"):
        del lm.config.quantization_config
    lm.is_quantized = False
    return replaced


def check_quantizable(method, scheme: str) -> None:
    if not method.quantizable:
        raise ConfigError(f"model.quantize: {scheme} holds the base frozen in {scheme}, and peft.method "
                         f"{method.name} trains the base itself or is not built for a quantized one; use lora or dora "
                         "(or model.quantize: none)")
