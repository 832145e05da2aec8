"""General-ability retention: the base model vs the fine-tuned one on held-out text.

Two pieces:

* A cache of base-model scores (``~/.cache/routetune/before``), keyed by the model files, the
  evaluation text, the objective and every setting that changes the score. Scoring the base
  model on WikiText-2 test took minutes per run; a sweep of runs over the same base and sets
  pays that once.
* For an encoder whose checkpoint has no masked-LM head (e.g. ``minilm-l6``, a sentence-embedding
  checkpoint), a masked-LM loss through a randomly initialised head says nothing. So the head is
  *fitted* before scoring: the same seeded initialisation, the same text, steps, batch size and
  learning rate, with the backbone frozen, on both sides (base and fine-tuned backbone). The
  scores then compare backbones through equally-trained heads, and the report says so.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from pathlib import Path

import torch
from torch import nn

from routetune.model.load import cache_dir

log = logging.getLogger("routetune")


# ------------------------------------------------------------------ cache of base-model scores

def _files_digest(paths: list[Path], content: bool = False) -> str:
    """Size and modification time of each file, or (content=True) a hash of its bytes: data files
    are hashed so that a copied or re-provisioned data folder still hits the cache; model weights
    (hundreds of MB) are identified by size and time."""
    h = hashlib.sha256()
    for path in sorted(paths):
        st = path.stat()
        h.update(f"{path.resolve()}:{st.st_size}:".encode())
        if content:
            with path.open("rb") as f:  # streamed: an eval text may be larger than memory allows
                h.update(hashlib.file_digest(f, "sha256").digest())
        else:
            h.update(str(st.st_mtime_ns).encode())
    return h.hexdigest()


def model_digest(model_path: str) -> str:
    folder = Path(model_path)
    files = [p for p in folder.iterdir() if p.is_file()] if folder.is_dir() else []
    return _files_digest(files) if files else hashlib.sha256(model_path.encode()).hexdigest()


def before_key(model_path: str, name: str, objective: str, evalset, cfg, fit: dict | None, hardware) -> str:
    items = [(str(p), a, b) for p, a, b in evalset.items] if evalset.kind == "text" else []
    text_files = [Path(p) for p, _, _ in evalset.items] if evalset.kind == "text" else [Path(evalset.origin)]
    payload = {
        "model": model_digest(model_path), "objective": objective, "kind": evalset.kind, "items": items,
        "files": _files_digest([p for p in text_files if p.is_file()], content=True),
        "strip": getattr(evalset, "strip_gutenberg", None), "max_blocks": getattr(evalset, "max_blocks", None),
        "max_length": cfg.model.max_length, "precision": hardware.precision, "device": hardware.device.type,
        "batch": cfg.train.eval_batch_size, "attention": cfg.model.attention, "fit": fit, "version": 2,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]


def before_dir() -> Path:
    import os

    return Path(os.environ.get("ROUTETUNE_BEFORE_CACHE", cache_dir() / "before"))


def cached(key: str) -> dict | None:
    path = before_dir() / f"{key}.json"
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            return None
    return None


def store(key: str, scores: dict) -> None:
    folder = before_dir()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{key}.tmp"
    tmp.write_text(json.dumps(scores))
    tmp.replace(folder / f"{key}.json")


# ------------------------------------------------------------------ fitting an MLM head

def mlm_head_modules(lm: nn.Module) -> list[nn.Module]:
    head = getattr(lm, "cls", None) or lm.get_output_embeddings()
    return [head] if head is not None else []


def head_parameters(lm: nn.Module) -> list[nn.Parameter]:
    """The LM head's own parameters; a decoder matrix tied to the word embeddings is excluded
    (it belongs to the backbone)."""
    embed = {id(p) for p in lm.get_input_embeddings().parameters()}
    seen, out = set(), []
    for module in mlm_head_modules(lm):
        for p in module.parameters():
            if id(p) not in embed and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def reset_head(lm: nn.Module, seed: int) -> None:
    """Seeded re-initialisation of the LM head's own parameters (BERT's recipe: normal(0, 0.02)
    weights, zero biases, unit LayerNorm)."""
    gen = torch.Generator().manual_seed(seed)
    std = getattr(lm.config, "initializer_range", 0.02)
    embed = {id(p) for p in lm.get_input_embeddings().parameters()}
    with torch.no_grad():
        for module in mlm_head_modules(lm):
            for sub in module.modules():
                if isinstance(sub, nn.Linear) and id(sub.weight) not in embed:
                    sub.weight.normal_(0.0, std, generator=gen)
                    if sub.bias is not None:
                        sub.bias.zero_()
                elif isinstance(sub, nn.LayerNorm):
                    sub.weight.fill_(1.0)
                    sub.bias.zero_()
            for name, p in module.named_parameters(recurse=False):
                if name == "bias":
                    p.zero_()
            predictions = getattr(module, "predictions", None)
            if predictions is not None and getattr(predictions, "bias", None) is not None:
                predictions.bias.zero_()


def fit_mlm_head(model, blocks: list[list[int]], tokenizer, steps: int, batch_size: int, lr: float, seed: int,
                 precision: str) -> list[float]:
    """Train only the LM head (seeded init) on masked-LM over `blocks`; the backbone is frozen
    and in eval mode (no dropout), so both sides see the same deterministic features. Returns
    the loss per step."""
    from routetune.data.collate import mask_sequence, pad_batch
    from routetune.data.sources import derive_seed
    from routetune.device import autocast, model_device

    lm = model.lm
    device = model_device(model)
    reset_head(lm, seed)
    flags = {id(p): p.requires_grad for p in model.parameters()}
    params = head_parameters(lm)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)))
    rng = random.Random(seed)
    was_training = model.training
    model.eval()
    losses = []
    try:
        for step in range(steps):
            chunk = [blocks[rng.randrange(len(blocks))] for _ in range(batch_size)]
            inputs, labels = [], []
            for i, seq in enumerate(chunk):
                x, y = mask_sequence(seq, special, 0.15, tokenizer.mask_token_id, len(tokenizer),
                                     derive_seed(seed, "fit-mask", step, i))
                inputs.append(x)
                labels.append(y)
            batch = {k: v.to(device) for k, v in pad_batch(inputs, tokenizer.pad_token_id, labels).items()}
            with autocast(precision, device.type):
                loss = model.masked_lm_loss(batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
    finally:
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
        model.train(was_training)
    return losses
