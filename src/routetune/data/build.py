"""Config -> sources (what the router draws from) and evaluation sets (what dev/test score).

Splits that the data lacks are made by a fixed rule (`holdout`): labelled examples by a seeded
permutation (test first, then dev), text by position (the last `test` share of each file is the
test part, the `dev` share before it the dev part).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from routetune.data.readers import read_conll, read_examples, read_prompt_completions, resolve_text_files
from routetune.data.sources import (ClassificationSource, LabelledSource, PromptSource, check_classes, check_tags,
                                    class_list_from, derive_seed, label_list_from)
from routetune.data.text import TextBlocks, TextStream, text_parts
from routetune.errors import ConfigError, DataError

@dataclass
class EvalSet:
    kind: str  # tags | classes | prompts | text
    items: list  # Sentences, Examples, or text parts (path, start, end)
    origin: str = ""
    strip_gutenberg: bool = False  # text only
    max_blocks: int | None = None  # text only


def resolve_objective(objective: str, decoder: bool, name: str) -> str:
    if objective == "language-modeling":
        return "causal-lm" if decoder else "masked-lm"
    if objective == "causal-lm" and not decoder:
        raise ConfigError(f"sources.{name}.objective: causal-lm needs a decoder backbone; this one is an "
                          "encoder (use masked-lm or language-modeling)")
    if objective == "masked-lm" and decoder:
        raise ConfigError(f"sources.{name}.objective: masked-lm needs an encoder backbone; this one is a "
                          "decoder (use causal-lm or language-modeling)")
    return objective


def _split(items: list, sc, name: str) -> tuple[list, list, list]:
    """(train, dev, test) by the holdout rule, for items without upstream dev/test files."""
    h = sc.holdout
    if h is None or (h.dev == 0 and h.test == 0):
        return items, [], []
    order = np.random.default_rng(derive_seed(h.seed, name, "holdout")).permutation(len(items))
    n_test, n_dev = round(h.test * len(items)), round(h.dev * len(items))
    test = [items[i] for i in sorted(order[:n_test])]
    dev = [items[i] for i in sorted(order[n_test : n_test + n_dev])]
    train = [items[i] for i in sorted(order[n_test + n_dev :])]
    if not train:
        raise DataError(f"sources.{name}.holdout leaves no training examples", sc.train)
    return train, dev, test


def _merge_labels(found: list[str], earlier: list[str] | None, allow_new: bool, name: str, path: str) -> list[str]:
    if earlier is None:
        return found
    new = [t for t in found if t not in earlier]
    if new and not allow_new:
        raise DataError(f"labels {new} are not in the label set of the earlier run's head for source "
                        f"{name!r} ({', '.join(earlier)}); pass --allow-new-labels to add them", path)
    return list(earlier) + new


def build(cfg, tokenizer, objectives: dict[str, str], earlier_labels: dict | None = None,
          allow_new_labels: bool = False):
    """Returns (sources, dev sets, test sets), all validated."""
    sources, dev, test = {}, {}, {}
    earlier_labels = earlier_labels or {}
    for name, sc in cfg.sources.items():
        seed = derive_seed(cfg.routing.seed, "source", name)
        objective = objectives[name]
        max_length = cfg.model.max_length
        extra = {}
        if objective == "token-classification":
            fmt = sc.conll

            def read(path, fmt=fmt):
                return read_conll(path, fmt.token_column, fmt.tag_column, fmt.scheme, fmt.separator)

            train, extra["dev"], extra["test"] = _split(read(sc.train), sc, name)
            labels = _merge_labels(label_list_from(train), earlier_labels.get(name), allow_new_labels, name, sc.train)
            sources[name] = LabelledSource(name, train, labels, tokenizer, max_length, seed)
            for split in ("dev", "test"):
                path = getattr(sc, split)
                items = read(path) if path else extra[split]
                if path:
                    check_tags(items, labels, path, split)
                if items:
                    (dev if split == "dev" else test)[name] = EvalSet("tags", items, path or "holdout")
        elif objective in ("sequence-classification", "binary-classification"):
            def read(path, sc=sc):
                return read_examples(path, sc.format, sc.fields.text, sc.fields.label, sc.text.glob)

            train, extra["dev"], extra["test"] = _split(read(sc.train), sc, name)
            labels = _merge_labels(class_list_from(train), earlier_labels.get(name), allow_new_labels, name, sc.train)
            binary = objective == "binary-classification"
            if binary and sc.positive_label is not None:
                if sc.positive_label not in labels:
                    raise ConfigError(f"sources.{name}.positive_label: {sc.positive_label!r} is not a label "
                                      f"of the data ({', '.join(labels)})")
                labels = [t for t in labels if t != sc.positive_label] + [sc.positive_label]
            sources[name] = ClassificationSource(name, train, labels, tokenizer, max_length, seed, binary)
            for split in ("dev", "test"):
                path = getattr(sc, split)
                items = read(path) if path else extra[split]
                check_classes(items, labels, split)
                if items:
                    (dev if split == "dev" else test)[name] = EvalSet("classes", items, path or "holdout")
        elif sc.format == "jsonl":  # causal-lm prompt / completion pairs
            def read(path, sc=sc):
                return read_prompt_completions(path, sc.fields.prompt, sc.fields.completion)

            train, extra["dev"], extra["test"] = _split(read(sc.train), sc, name)
            sources[name] = PromptSource(name, train, tokenizer, max_length, seed)
            for split in ("dev", "test"):
                path = getattr(sc, split)
                items = read(path) if path else extra[split]
                if items:
                    (dev if split == "dev" else test)[name] = EvalSet("prompts", items, path or "holdout")
        else:  # plain text for masked-lm / causal-lm
            sources[name], dev_set, test_set = _text_source(name, sc, objective, tokenizer, max_length, seed)
            if dev_set:
                dev[name] = dev_set
            if test_set:
                test[name] = test_set
    return sources, dev, test


def _text_source(name, sc, objective, tokenizer, max_length, seed):
    files = resolve_text_files(sc.train, sc.text.glob)
    h = sc.holdout
    held_dev, held_test = (h.dev, h.test) if h else (0.0, 0.0)
    if held_dev + held_test >= 1:
        raise ConfigError(f"sources.{name}.holdout: dev + test must leave some text for training")
    cut_dev, cut_test = 1.0 - held_dev - held_test, 1.0 - held_test
    common = dict(objective=objective, strip_gutenberg=sc.text.strip_gutenberg, mlm_probability=sc.mlm_probability)
    train_parts = text_parts(files, 0.0, cut_dev)
    if sc.text.stream:
        src = TextStream(name, train_parts, tokenizer, max_length, seed, shuffle_buffer=sc.text.shuffle_buffer,
                         **common)
    else:
        src = TextBlocks(name, train_parts, tokenizer, max_length, seed, **common)

    def eval_set(path, lo, hi):
        strip = sc.text.strip_gutenberg
        if path:
            return EvalSet("text", text_parts(resolve_text_files(path, sc.text.glob)), path, strip)
        if hi > lo:
            return EvalSet("text", text_parts(files, lo, hi), f"holdout {lo:.3g}-{hi:.3g} of each file", strip)
        return None

    return src, eval_set(sc.dev, cut_dev, cut_test), eval_set(sc.test, cut_test, 1.0)


def build_evals(cfg, decoder: bool) -> tuple[dict[str, EvalSet], dict[str, str]]:
    """The `evals` section: held-out text sets and their (resolved) objectives."""
    sets, objectives = {}, {}
    for name, ev in cfg.evals.items():
        objectives[name] = resolve_objective(ev.objective, decoder, f"evals.{name}")
        files = resolve_text_files(ev.path, ev.glob)
        sets[name] = EvalSet("text", text_parts(files), ev.path, ev.strip_gutenberg, ev.max_blocks)
    return sets, objectives


def source_sizes(sources: dict) -> dict[str, int | None]:
    return {n: (len(s) if not isinstance(s, TextStream) else None) for n, s in sources.items()}


__all__ = ["EvalSet", "build", "build_evals", "resolve_objective", "source_sizes"]
