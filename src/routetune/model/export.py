"""Export a run's checkpoint as standard Hugging Face / PEFT folders.

    OUT/lm/                 the backbone with its LM head (AutoModelForMaskedLM / AutoModelForCausalLM);
                            with --merge, adapters are merged into the weights
    OUT/adapter/            (adapter runs, without --merge) the PEFT adapter folder for PeftModel.from_pretrained
    OUT/heads/<source>/     each task head as a plain transformers task model
                            (AutoModelForTokenClassification / AutoModelForSequenceClassification),
                            with id2label; adapter runs need --merge for these
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import nn

from routetune.errors import RunError

TASK_CLASSES = {"token-classification": "AutoModelForTokenClassification",
                "sequence-classification": "AutoModelForSequenceClassification",
                "binary-classification": "AutoModelForSequenceClassification"}


def merge_adapters(lm: nn.Module) -> int:
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


def task_model(model, name: str):
    """A transformers task model with this run's backbone and the head `name`'s weights."""
    import transformers

    head = model.heads[name]
    kind = head.kind
    labels = head.labels
    config = model.config.__class__.from_dict(model.config.to_dict())
    binary = kind == "binary-classification"
    config.num_labels = 1 if binary else len(labels)
    config.id2label = {i: t for i, t in enumerate(labels[-1:] if binary else labels)}
    config.label2id = {t: i for i, t in config.id2label.items()}
    if binary:
        config.problem_type = "multi_label_classification"
    config.architectures = None
    cls = getattr(transformers, TASK_CLASSES[kind])
    task = cls.from_config(config)
    base = task.base_model
    missing = base.load_state_dict(model.backbone.state_dict(), strict=False)
    if [k for k in missing.missing_keys if "pooler" not in k]:
        raise RunError(f"cannot map the backbone into {cls.__name__}: missing {missing.missing_keys[:3]}")
    with torch.no_grad():
        if kind == "token-classification":
            out = getattr(task, "classifier", None) or task.score
            out.load_state_dict(head.classifier.state_dict(), strict=False)
        elif head.pooling == "cls":
            base.pooler.dense.load_state_dict(head.pooler.state_dict())
            task.classifier.load_state_dict(head.classifier.state_dict())
        else:
            task.score.load_state_dict(head.score.state_dict())
    return task.eval()


def export(run_dir: Path, out: Path, checkpoint: str = "best", merge: bool = False, overwrite: bool = False) -> list[str]:
    from routetune.workflow import load_run

    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise RunError(f"{out}: exists and is not empty; pass --overwrite to replace it")
        shutil.rmtree(out)
    cfg, model, tokenizer = load_run(run_dir, checkpoint)
    if model.peft_method == "adapter":
        raise RunError(f"{run_dir}: bottleneck adapters are non-linear and cannot be merged into plain transformers "
                       "weights; the checkpoint (lm_trainable.safetensors + routetune.json) loads with routetune")
    if merge and model.prompt is not None:
        raise RunError(f"{run_dir}: {model.peft_method} adds virtual tokens, which cannot be merged into the "
                       "weights; export without --merge (a peft adapter folder)")
    written = []
    adapter = model.adapter_config is not None
    if adapter and not merge:
        from routetune.train.checkpoint import run_checkpoint

        folder = run_checkpoint(run_dir, checkpoint)
        (out / "adapter").mkdir(parents=True)
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copy2(folder / f, out / "adapter" / f)
        tokenizer.save_pretrained(out / "adapter")
        written.append(str(out / "adapter"))
    if adapter and merge:
        merge_adapters(model.lm)
    if not adapter or merge:
        model.lm.save_pretrained(out / "lm")
        tokenizer.save_pretrained(out / "lm")
        written.append(str(out / "lm"))
        for name in model.heads:
            folder = out / "heads" / name
            task_model(model, name).save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            written.append(str(folder))
    return written
