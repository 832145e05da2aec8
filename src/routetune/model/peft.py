"""Parameter sharing: which backbone parameters train. One function, :func:`apply_peft`.

* ``lora`` / ``dora`` / ``ia3``: adapters injected in place by the ``peft`` library
  (``inject_adapter_in_model``), so the backbone keeps its module tree and every head still reads
  ``lm.base_model``; the base weights are frozen. Checkpoints hold the adapter in PEFT's own format
  (``adapter_config.json`` + ``adapter_model.safetensors``, loadable with ``PeftModel.from_pretrained``).
* ``prompt_tuning`` / ``prefix_tuning``: peft's virtual-token modules, wired in by
  :mod:`routetune.model.prompts`; the whole backbone is frozen. Checkpoints in peft's format.
* ``adapter``: routetune's own bottleneck adapters (:mod:`routetune.model.adapters`) after the
  attention and/or feed-forward output projections (Houlsby: both; Pfeiffer: ffn).
* ``bitfit``: only bias terms of the backbone train.
  Adapter and BitFit checkpoints hold only the trained tensors plus a manifest (the base is
  rebuilt from the model it names).
* ``none`` with ``freeze``: full fine-tuning, optionally with frozen embeddings, only the top k
  layers, or only the heads.

Task heads always train. The LM head's own parameters (e.g. BERT's prediction transform and
bias) train too, but a decoder matrix *tied* to the word embeddings is the same tensor as the
embeddings and follows them: frozen under an adapter method, bitfit, ``head_only`` or
``embeddings: true``.
"""

from __future__ import annotations

import logging
from collections import defaultdict

from torch import nn

from routetune.errors import ConfigError

log = logging.getLogger("routetune")

ADAPTER_MARKERS = ("lora_", "ia3_", ".adapter.")

# Default target modules per architecture family (attention projections; IA3 also the FFN).
LORA_TARGETS = {"llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
                "bert": ["query", "key", "value", "attention.output.dense"]}
IA3_TARGETS = {"llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
               "bert": (["key", "value", "intermediate.dense"], ["intermediate.dense"])}


def _family(config) -> str:
    return "bert" if config.model_type in ("bert", "roberta", "xlm-roberta", "electra", "distilbert") else "llama"


def peft_config_for(pcfg, config):
    """The peft library's config object for this run's method, or None."""
    import peft

    family = _family(config)
    if pcfg.method in ("lora", "dora"):
        targets = pcfg.target_modules or LORA_TARGETS[family]
        return peft.LoraConfig(r=pcfg.r, lora_alpha=pcfg.alpha, lora_dropout=pcfg.dropout, target_modules=targets,
                               use_dora=pcfg.method == "dora", bias="none")
    if pcfg.method == "ia3":
        targets, ff = IA3_TARGETS[family]
        if pcfg.target_modules:
            targets, ff = pcfg.target_modules, [t for t in ff if t in pcfg.target_modules]
        return peft.IA3Config(target_modules=targets, feedforward_modules=ff)
    return None


def is_adapter_param(name: str) -> bool:
    return any(m in name for m in ADAPTER_MARKERS)


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


def apply_peft(model, pcfg, fcfg, base_path: str) -> None:
    """Inject adapters and set requires_grad on every parameter of the model."""
    lm = model.lm
    method = pcfg.method
    if method == "adapter":
        from routetune.model.adapters import add_bottleneck_adapters

        if not add_bottleneck_adapters(lm, pcfg.adapter_size, pcfg.adapter_placement):
            raise ConfigError(f"peft.adapter_placement: no matching projection in this backbone ({model.config.model_type})")
    if method in ("lora", "dora", "ia3"):
        from peft import inject_adapter_in_model

        config = peft_config_for(pcfg, model.config)
        config.base_model_name_or_path = base_path
        try:
            inject_adapter_in_model(config, lm)
        except ValueError as exc:
            raise ConfigError(f"peft.target_modules: {exc}") from None
        model.adapter_config = config
    if method in ("prompt_tuning", "prefix_tuning"):
        import torch

        from routetune.model.prompts import peft_prompt_config

        config = peft_prompt_config(method, pcfg.num_virtual_tokens, model.config, model.is_decoder, base_path)
        model.attach_prompt(config, torch.Generator().manual_seed(pcfg.seed))
        model.adapter_config = config
    model.base_path = base_path
    model.peft_method = method
    model.peft_options = {"adapter_size": pcfg.adapter_size, "adapter_placement": list(pcfg.adapter_placement)}
    embeddings = embedding_params(lm)
    prefix = lm.base_model_prefix + "."
    layers = _layers(model.backbone) if fcfg.top_k_layers is not None else None
    top = set()
    if layers is not None:
        if not 0 < fcfg.top_k_layers <= len(layers):
            raise ConfigError(f"freeze.top_k_layers: expected 1..{len(layers)}, got {fcfg.top_k_layers}")
        top = {id(p) for layer in list(layers)[-fcfg.top_k_layers:] for p in layer.parameters()}
    has_bias = False
    for name, p in lm.named_parameters():
        in_backbone = name.startswith(prefix)
        if id(p) in embeddings:
            train = method == "none" and not fcfg.embeddings and not fcfg.head_only and layers is None
        elif not in_backbone:  # the LM head's own parameters
            train = True
        elif method in ("lora", "dora", "ia3", "adapter"):
            train = is_adapter_param(name)
        elif method in ("prompt_tuning", "prefix_tuning"):
            train = False  # only the virtual tokens (model.prompt) and the heads train
        elif method == "bitfit":
            train = name.endswith(".bias")
            has_bias = has_bias or train
        elif fcfg.head_only:
            train = False
        elif layers is not None:
            train = id(p) in top
        else:
            train = True
        p.requires_grad_(train)
    if method == "bitfit" and not has_bias:
        raise ConfigError("peft.method: bitfit trains only bias terms, and this backbone has none "
                          f"({model.config.model_type}); choose lora, ia3 or a freeze strategy")
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
    named = [(f"lm.{n}", p) for n, p in lm.named_parameters()] + [(f"heads.{n}", p) for n, p in model.heads.named_parameters()]
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
