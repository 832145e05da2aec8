"""Export a run's checkpoint as standard Hugging Face / PEFT folders.

    OUT/lm/                 the backbone with its LM head (AutoModelForMaskedLM / AutoModelForCausalLM);
                            with --merge, adapters are merged into the weights
    OUT/adapter/            (adapter runs, without --merge) the PEFT adapter folder for PeftModel.from_pretrained
    OUT/heads/<source>/     each task head as a plain transformers task model
                            (AutoModelForTokenClassification / AutoModelForSequenceClassification),
                            with id2label; adapter runs need --merge for these
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from routetune.run_folder import RunFolder
from routetune import objectives
from routetune.errors import RunError
from routetune.hub import ALIASES
from routetune.runs import load_run
from routetune.training.checkpoint import run_checkpoint

TASK_CLASSES = {"token-classification": "AutoModelForTokenClassification",
                "sequence-classification": "AutoModelForSequenceClassification",
                "binary-classification": "AutoModelForSequenceClassification"}


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


EXPORT_MARKER = "routetune-export.json"


def _replaceable(out: Path) -> bool:
    """An earlier export: its marker, or (older exports) only lm/, adapter/ and heads/ folders."""
    names = {p.name for p in out.iterdir()}
    return EXPORT_MARKER in names or (bool(names) and names <= {"lm", "adapter", "heads"})


def export(
    run_dir: Path, out: Path, checkpoint: str = "best", merge: bool = False, overwrite: bool = False
) -> list[str]:
    """Write the export into a temporary folder beside `out`, then put it in place. Nothing at
    `out` is touched until the run has loaded and the export is complete; --overwrite replaces
    only an earlier export (never other files), and the old one is removed after the swap."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise RunError(f"{out}: exists and is not empty; pass --overwrite to replace an earlier export")
        if not out.is_dir() or not _replaceable(out):
            raise RunError(f"{out}: --overwrite replaces only an earlier routetune export (it has no {EXPORT_MARKER} "
                           "and holds other files); nothing was changed; choose another --out")
    cfg, model, tokenizer = load_run(run_dir, checkpoint)
    method = model.method
    if method.export_refusal or (merge and method.merge_refusal):
        raise RunError(f"{run_dir}: {method.export_refusal or method.merge_refusal}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-export-{out.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        parts = _write_export(model, tokenizer, run_checkpoint(run_dir, checkpoint), tmp, merge)
        for part in parts:  # a model card in every exported folder, as the hub expects
            (tmp / part / "README.md").write_text(model_card(Path(run_dir), cfg, model, part, merge),
                                                  encoding="utf-8")
        # the run's folder name, not a path of this machine (the export may be shared)
        (tmp / EXPORT_MARKER).write_text(json.dumps({"run": Path(run_dir).resolve().name, "checkpoint": checkpoint,
                                                     "merge": merge, "method": method.name}) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.parent / f".old-export-{out.name}-{os.getpid()}"
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    if old.exists():
        shutil.rmtree(old)
    return [str(out / p) for p in parts]


def _loader(model, part: str) -> str:
    """The one class that loads an exported folder."""
    if part == "adapter":
        return "peft.AutoPeftModelForCausalLM" if model.is_decoder else "peft.PeftModel"
    if part == "lm":
        return "transformers.AutoModelForCausalLM" if model.is_decoder else "transformers.AutoModelForMaskedLM"
    kind = model.heads[part.removeprefix("heads/")].kind
    return ("transformers.AutoModelForTokenClassification" if kind == "token-classification"
            else "transformers.AutoModelForSequenceClassification")


def model_card(run_dir: Path, cfg, model, part: str, merged: bool) -> str:
    """README.md of an exported folder: what it is, what it was trained from and on (file names, not
    this machine's paths), its labels, its scores (summary.json), and the class that loads it."""
    method = model.method.name
    summary_path = RunFolder(run_dir).summary
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else {}
    kind = {"lm": "the backbone with its language-model head", "adapter": "a PEFT adapter for the base model"}.get(
        part, f"the task model of source `{part.removeprefix('heads/')}`")
    weights = cfg.routing.weights or {}
    lines = ["---", "library_name: " + ("peft" if part == "adapter" else "transformers"), "tags: [routetune]", "---",
             "", f"# {run_dir.name}: {part}", "",
             f"This folder holds {kind}, exported by routetune from the run `{run_dir.name}`.", "",
             f"- base model: `{_base_name(cfg.model.name)}`",
             f"- parameter-sharing method: `{method}`" + (" (merged into the weights)" if merged else ""),
             f"- steps: {summary.get('steps', '?')} of batch {cfg.train.batch_size}, lr {cfg.train.lr}, "
             f"precision {summary.get('hardware', {}).get('precision', cfg.train.precision)}", "",
             "## Training data (routed)", "", "| source | objective | data | routing weight |", "|---|---|---|---|"]
    for name, sc in cfg.sources.items():
        data = sc.dataset.path if sc.dataset is not None else Path(str(sc.train)).name  # a hub id, or a file name
        lines.append(f"| {name} | {sc.objective} | `{data}` | {weights.get(name, '-')} |")
    name = part.removeprefix("heads/")
    head = model.heads[name] if part.startswith("heads/") and name in model.heads else None
    if head is not None:
        lines += ["", f"Labels (class id: label): {', '.join(f'{i}: `{x}`' for i, x in enumerate(head.labels))}"]
    test = summary.get("test", {})
    if test:
        lines += ["", "## Test scores", "", "| set | metric | value |", "|---|---|---|"]
        for name, scores in test.items():
            for metric in objectives.all_metrics():
                if isinstance(scores.get(metric), (int, float)):
                    lines.append(f"| {name} | {metric} | {scores[metric]:.4f} |")
    for key, v in summary.get("before_after", {}).items():
        lines.append(f"\nGeneral text `{key}`: {v['before']:.4f} before training, {v['after']:.4f} after.")
    lines += ["", f"Load with `{_loader(model, part)}.from_pretrained(\"<this folder>\")`" +
              (" on top of the base model." if part == "adapter" else "."), ""]
    return "\n".join(lines)


def _base_name(name: str) -> str:
    """The hub id behind an offline alias (what a reader of the card can look up); a local folder
    by its name only."""
    if name in ALIASES and ALIASES[name].hub_id:
        return ALIASES[name].hub_id
    return Path(name).name if Path(name).is_absolute() else name


def _write_export(model, tokenizer, folder: Path, out: Path, merge: bool) -> list[str]:
    """The export's folders under `out` (relative names returned)."""
    written = []
    adapter = model.method.checkpoint == "adapter"  # peft's format: exported as a peft adapter folder
    if adapter and not merge:
        (out / "adapter").mkdir(parents=True)
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copy2(folder / f, out / "adapter" / f)
        tokenizer.save_pretrained(out / "adapter")
        written.append("adapter")
    if adapter and merge:
        model.method.merge(model.lm)
    if not adapter or merge:
        model.lm.save_pretrained(out / "lm")
        tokenizer.save_pretrained(out / "lm")
        written.append("lm")
        for name in model.heads:
            task_model(model, name).save_pretrained(out / "heads" / name)
            tokenizer.save_pretrained(out / "heads" / name)
            written.append(f"heads/{name}")
    return written
