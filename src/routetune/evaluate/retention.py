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

import functools
import hashlib
import json
import logging
import os
import random
from itertools import islice
from pathlib import Path

import torch
from torch import nn

from routetune import objectives
from routetune.model import init
from routetune.config import config_from_run
from routetune.data.collate import mask_sequence, pad_batch
from routetune.data.readers import resolve_text_files
from routetune.data.sources import special_affixes
from routetune.seeds import derive_seed
from routetune.data.text import iter_blocks, text_parts
from routetune.device import autocast, model_device
from routetune.errors import ConfigError
from routetune.evaluate.tasks import score_sets, text_scores
from routetune.files import write_text_atomic
from routetune.hub import cache_dir
from routetune.logs import bar
from routetune.model.load import load_lm, resolve_model
from routetune.model.routed import build_model

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
    if evalset.kind == "text":
        items = [(str(p), a, b) for p, a, b in evalset.items]
    else:  # the examples themselves (a set may come from a dataset rather than a file)
        items = hashlib.sha256(
            repr([(e.text, e.completion) + ((e.trained,) if e.trained else ()) for e in evalset.items]).encode()
        ).hexdigest()
    text_files = [Path(p) for p, _, _ in evalset.items] if evalset.kind == "text" else [Path(evalset.origin)]
    payload = {
        "model": model_digest(model_path), "objective": objective, "kind": evalset.kind, "items": items,
        "files": _files_digest([p for p in text_files if p.is_file()], content=True),
        "strip": getattr(evalset, "strip_gutenberg", None), "max_blocks": getattr(evalset, "max_blocks", None),
        "max_length": cfg.model.max_length, "precision": hardware.precision, "device": hardware.device.type,
        "batch": cfg.train.eval_batch_size, "attention": cfg.model.attention, "fit": fit, "version": 3,
        "base": [cfg.model.quantize, cfg.model.quantize_double, cfg.model.base_dtype],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]


def before_dir() -> Path:
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
    write_text_atomic(folder / f"{key}.json", json.dumps(scores))


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
    embed = frozenset(id(p) for p in lm.get_input_embeddings().parameters())
    with torch.no_grad():
        for module in mlm_head_modules(lm):
            init.bert_style_(module, std, gen, skip=embed)
            for name, p in module.named_parameters(recurse=False):
                if name == "bias":
                    p.zero_()
            predictions = getattr(module, "predictions", None)
            if predictions is not None and getattr(predictions, "bias", None) is not None:
                predictions.bias.zero_()


def fit_mlm_head(model, blocks: list[list[int]], tokenizer, steps: int, batch_size: int, lr: float, seed: int,
                 precision: str, on_step=None) -> list[float]:
    """Train only the LM head (seeded init) on masked-LM over `blocks`; the backbone is frozen
    and in eval mode (no dropout), so both sides see the same deterministic features. Returns
    the loss per step. `on_step(step, losses)` is called after each step (bench/retention_fit.py
    scores the head along the way)."""
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
        for step in bar(range(steps), "fitting the MLM head"):
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
            if on_step is not None:
                on_step(step + 1, losses)
    finally:
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
        model.train(was_training)
    return losses


# ------------------------------------------------------------------ base vs fine-tuned

def before_after(before: dict, after: dict) -> dict:
    """Base vs fine-tuned for every language-modelling score present on both sides."""
    out = {}
    for name, b in before.items():
        a = after.get(name, {})
        for metric in objectives.lm_metrics():
            if metric in b and metric in a:
                out[f"{name}/{metric}"] = {"before": b[metric], "after": a[metric],
                                           "ratio": a[metric] / b[metric] if b[metric] else None}
    return out


def base_model_name(cfg) -> str:
    """The pretrained model a chain of init_from runs started from."""
    for _ in range(100):  # a chain of runs, each started from the one before
        if not cfg.model.init_from:
            break
        cfg = config_from_run(cfg.model.init_from)
    return cfg.model.name


@functools.lru_cache(maxsize=8)
def _head_missing(base: str, digest: str) -> bool:
    """Whether the checkpoint at `base` lacks an MLM head (loaded once per version of its files).
    Loading initialises a missing head from torch's generator: on a forked state, so the first
    run of a process draws the same random numbers as the next ones, for which this is cached."""
    with torch.random.fork_rng(devices=[]):
        return bool(load_lm(base)[1])


def fit_recipe(cfg, sets: dict, objectives_of: dict) -> dict | None:
    """The head-fit recipe for masked-LM retention of `sets`, or None when the base's own head is
    used (it has one, or `retention.fit_head: never`)."""
    rc = cfg.retention
    if rc.fit_head == "never" or not any(objectives_of[n] == "masked-lm" for n in sets):
        return None
    base = resolve_model(base_model_name(cfg))
    if rc.fit_head == "auto" and not _head_missing(base, model_digest(base)):
        return None
    text, strip = rc.fit_text, rc.fit_strip_gutenberg
    if text is None:
        source = next((sc for n, sc in cfg.sources.items() if objectives_of.get(n) == "masked-lm" and sc.train), None)
        text, strip = (source.train, source.text.strip_gutenberg) if source else (None, False)
    if text is None:
        raise ConfigError("retention.fit_text: masked-LM retention needs text to fit the MLM head on "
                          "(no masked-LM source to take it from)")
    return {
        "base": base,
        "text": text,
        "strip_gutenberg": strip,
        "steps": rc.fit_steps,
        "batch_size": rc.fit_batch_size,
        "lr": rc.fit_lr,
        "blocks": rc.fit_blocks,
        "seed": rc.seed,
    }


def fit_note(fit: dict) -> str:
    return (f"masked-LM head fitted on both sides with the backbone frozen ({fit['steps']} steps x "
            f"{fit['batch_size']} blocks, lr {fit['lr']}, seed {fit['seed']}, text {fit['text']})")


def score_with_fitted_head(model, fit: dict, sets: dict, objectives_of: dict, tokenizer, cfg, precision: str) -> dict:
    """Fit the MLM head on `model` (backbone frozen) and score the masked-LM sets of `sets`."""
    prefix, suffix = special_affixes(tokenizer)
    content = cfg.model.max_length - len(prefix) - len(suffix)
    parts = text_parts(resolve_text_files(fit["text"], "*.txt"))
    blocks = [prefix + b + suffix
              for b in islice(iter_blocks(parts, tokenizer, content, fit["strip_gutenberg"]), fit["blocks"])]
    losses = fit_mlm_head(model, blocks, tokenizer, fit["steps"], fit["batch_size"], fit["lr"], fit["seed"], precision)
    log.info("fitted the MLM head (%d steps): loss %.3f -> %.3f", len(losses), losses[0], losses[-1])
    return {name: {**text_scores(model, "masked-lm", tokenizer, evalset, cfg.model.max_length, cfg.train, precision),
                   "head_fit_loss": [losses[0], losses[-1]]}
            for name, evalset in sets.items() if objectives_of[name] == "masked-lm"}


def score_before(model, model_path: str, sets: dict, objectives_of: dict, tokenizer, cfg, hardware,
                 fit: dict | None) -> dict:
    """Base-model scores of `sets` (cached by content). `model` is the untrained model of the run;
    masked-LM sets with a `fit` recipe are scored through a head fitted on a fresh copy of the base."""
    keys = {n: before_key(model_path, n, objectives_of[n], s, cfg, fit if objectives_of[n] == "masked-lm" else None,
                          hardware) for n, s in sets.items()}
    out, todo = {}, {}
    for name, evalset in sets.items():
        hit = cached(keys[name]) if cfg.retention.cache_before else None
        if hit is not None:
            out[name] = hit
        else:
            todo[name] = evalset
    if len(todo) < len(sets):
        log.info("base-model scores of %s from the cache (~/.cache/routetune/before)",
                 ", ".join(n for n in sets if n not in todo))
    fitted = {n: s for n, s in todo.items() if fit is not None and objectives_of[n] == "masked-lm"}
    plain = {n: s for n, s in todo.items() if n not in fitted}
    if plain:
        log.info("scoring the base model before training: %s", ", ".join(plain))
        out.update(score_sets(model, plain, objectives_of, tokenizer, cfg, hardware.precision)[1])
    if fitted:
        log.info("fitting an MLM head on the base model for masked-LM retention: %s", fit_note(fit))
        # the fresh base model draws its new head weights from torch's generator reseeded as
        # training's was; on a forked state, so that training draws the same random numbers
        # whether these scores come from the cache or are computed here
        with torch.random.fork_rng(devices=[hardware.device.index or 0] if hardware.cuda else [], device_type="cuda"):
            torch.manual_seed(cfg.train.seed)
            base = build_model(model_path, cfg.train.seed, cfg.model.attention, hardware.device.type)
            out.update(score_with_fitted_head(base.to(hardware.device), fit, fitted, objectives_of, tokenizer, cfg,
                                              hardware.precision))
        del base
    for name in todo:
        if cfg.retention.cache_before:
            store(keys[name], out[name])
    return {n: out[n] for n in sets}
