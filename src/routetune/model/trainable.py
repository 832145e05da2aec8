"""Which parameters train: one function, :func:`apply_method`, for every method and freeze strategy.

The method (model/methods/) decides for backbone parameters; ``full`` (full fine-tuning) leaves
it to ``freeze``: frozen embeddings, only the top k layers, or only the heads. Task heads always
train. The LM head's own parameters (e.g. BERT's prediction transform and bias) train too, except
the vocabulary projection, which a parameter-efficient method leaves frozen unless
``peft.train_lm_head`` (peft's ``modules_to_save``); a decoder matrix *tied* to the word
embeddings is the same tensor as the embeddings and follows them: frozen under any method but
``full``, and under ``head_only`` or ``embeddings: true``.
"""

from __future__ import annotations

import logging
from collections import defaultdict

from torch import nn

from routetune.errors import ConfigError
from routetune.model import methods
from routetune.model.methods.base import is_adapter_param

log = logging.getLogger("routetune")


def _layers(backbone: nn.Module) -> nn.ModuleList:
    for path in ("encoder.layer", "layers", "h", "transformer.layer"):
        module = backbone
        for part in path.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        if isinstance(module, nn.ModuleList):
            return module
    raise ConfigError("freeze.top_k_layers: cannot find the transformer layers of this backbone")


def embedding_params(lm: nn.Module) -> set[int]:
    """The word embeddings and, where the backbone has an `embeddings` module (BERT), all of it
    (position and token-type embeddings, their LayerNorm)."""
    ids = {id(p) for p in lm.get_input_embeddings().parameters()}
    module = getattr(lm.base_model, "embeddings", None)
    if isinstance(module, nn.Module):
        ids |= {id(p) for p in module.parameters()}
    return ids


def apply_method(model, pcfg, fcfg, base_path: str) -> None:
    """Put the configured method into the model and set requires_grad on every parameter."""
    method = methods.get(pcfg.method)
    method.apply(model, pcfg, base_path)
    model.method, model.base_path = method, base_path
    model.peft_options = method.option_values(pcfg)
    lm = model.lm
    embeddings = embedding_params(lm)
    prefix = lm.base_model_prefix + "."
    layers = _layers(model.backbone) if fcfg.top_k_layers is not None else None
    top = set()
    if layers is not None:
        if not 0 < fcfg.top_k_layers <= len(layers):
            raise ConfigError(f"freeze.top_k_layers: expected 1..{len(layers)}, got {fcfg.top_k_layers}")
        top = {id(p) for layer in list(layers)[-fcfg.top_k_layers:] for p in layer.parameters()}
    output = lm.get_output_embeddings()
    vocab = id(output.weight) if output is not None else None  # the vocabulary projection
    for name, p in lm.named_parameters():
        rule = method.trains(name)  # None: full fine-tuning, the freeze strategies decide
        if id(p) in embeddings:
            train = rule is None and not fcfg.embeddings and not fcfg.head_only and layers is None
        elif id(p) == vocab:  # frozen under a parameter-efficient method unless asked (peft's modules_to_save)
            train = rule is None or pcfg.train_lm_head
        elif not name.startswith(prefix):  # the LM head's own other parameters (e.g. BERT's transform, bias)
            train = True
        elif rule is not None:
            train = rule
        elif fcfg.head_only:
            train = False
        else:
            train = layers is None or id(p) in top
        p.requires_grad_(train and p.is_floating_point())  # quantized weights (model.quantize) stay frozen
    method.check(model)
    for p in model.heads.parameters():
        p.requires_grad_(True)
    if model.prompt is not None:
        for p in model.prompt.parameters():
            p.requires_grad_(True)
    log_parameters(model)


def parameter_groups(model) -> dict[str, tuple[int, int]]:
    """(trainable, total) parameter counts per module group; a shared tensor counts once."""
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    lm = model.lm
    embeddings = embedding_params(lm)
    prefix = lm.base_model_prefix + "."
    seen = set()
    named = [(f"lm.{n}", p) for n, p in lm.named_parameters()] + [
        (f"heads.{n}", p) for n, p in model.heads.named_parameters()
    ]
    if model.prompt is not None:
        named += [(f"prompt.{n}", p) for n, p in model.prompt.named_parameters()]
    for name, p in named:
        if id(p) in seen:
            continue
        seen.add(id(p))
        if name.startswith("heads."):
            group = "head:" + name.split(".")[1]
        elif name.startswith("prompt."):
            group = "virtual-tokens"
        elif is_adapter_param(name):
            group = "adapters"
        elif id(p) in embeddings:
            group = "embeddings"
        elif not name[3:].startswith(prefix):
            group = "lm-head"
        else:
            group = "backbone"
        groups[group][1] += p.numel()
        if p.requires_grad:
            groups[group][0] += p.numel()
    return {k: (v[0], v[1]) for k, v in groups.items()}


def log_parameters(model) -> dict:
    groups = parameter_groups(model)
    trainable = sum(t for t, _ in groups.values())
    total = sum(n for _, n in groups.values())
    log.info("parameters: %s trainable of %s (%.2f%%): %s", f"{trainable:,}", f"{total:,}", 100 * trainable / total,
             ", ".join(f"{g} {t:,}/{n:,}" for g, (t, n) in sorted(groups.items())))
    return groups
