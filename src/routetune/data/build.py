"""Config -> sources (what the router draws from) and evaluation sets (what dev/test score).

Splits that the data lacks are made by a fixed rule (`holdout`): labelled examples by a seeded
permutation (test first, then dev), text by position (the last `test` share of each file is the
test part, the `dev` share before it the dev part).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from routetune.data import hf_datasets
from routetune.data.chat import read_instructions
from routetune.data.readers import read_conll, read_examples, read_prompt_completions, resolve_text_files
from routetune.data.sources import (ClassificationSource, LabelledSource, PromptSource, check_classes, check_tags,
                                    class_list_from, label_list_from)
from routetune.data.text import TextBlocks, TextStream, text_parts
from routetune import objectives
from routetune.errors import ConfigError, DataError
from routetune.seeds import derive_seed


@dataclass
class EvalSet:
    kind: str  # tags | classes | prompts | text
    items: list  # Sentences, Examples, or text parts (path, start, end)
    origin: str = ""
    strip_gutenberg: bool = False  # text only
    max_blocks: int | None = None  # text only


def resolve_objective(objective: str, decoder: bool, name: str) -> str:
    """The objective source `name` trains on this backbone (`language-modeling` follows it)."""
    try:
        return objectives.resolve(objective, decoder)
    except ValueError as exc:
        key = name if name.startswith("evals.") else f"sources.{name}"
        raise ConfigError(f"{key}.objective: {exc}") from None


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


def build(cfg, tokenizer, objectives_of: dict[str, str], earlier_labels: dict | None = None,
          allow_new_labels: bool = False):
    """Returns (sources, dev sets, test sets), all validated. Each source is read by the builder
    of the kind of examples its objective gives for its format (objectives.py)."""
    sources, dev, test = {}, {}, {}
    earlier_labels = earlier_labels or {}
    for name, sc in cfg.sources.items():
        objective = objectives_of[name]
        kind = objectives.get(objective).formats[sc.format]
        ctx = _Context(
            name,
            sc,
            objective,
            tokenizer,
            cfg.model.max_length,
            derive_seed(cfg.routing.seed, "source", name),
            earlier_labels.get(name),
            allow_new_labels,
        )
        sources[name], dev_set, test_set = BUILDERS[kind](ctx)
        if dev_set is not None:
            dev[name] = dev_set
        if test_set is not None:
            test[name] = test_set
    return sources, dev, test


@dataclass
class _Context:
    """What a builder needs to read one source."""
    name: str
    sc: object  # SourceConfig
    objective: str
    tokenizer: object
    max_length: int
    seed: int
    earlier_labels: list[str] | None
    allow_new_labels: bool


def _labelled(ctx: _Context, read, found, make_source, check, kind: str):
    """Shared by the labelled kinds: read train, split off holdout dev/test, fix the label list,
    read or carve the dev/test sets and check their labels. `read` takes a location: a file
    path, or for a dataset source a split name."""
    sc, name = ctx.sc, ctx.name
    where = sc.locations()
    train, held_dev, held_test = _split(read(where["train"]), sc, name)
    labels = _merge_labels(found(train), ctx.earlier_labels, ctx.allow_new_labels, name, _origin(sc, where["train"]))
    source, labels = make_source(train, labels)
    sets = []
    for split, held in (("dev", held_dev), ("test", held_test)):
        loc = where[split]
        items = read(loc) if loc else held
        if check is not None:
            check(items, labels, _origin(sc, loc) if loc else None, split)
        sets.append(EvalSet(kind, items, _origin(sc, loc) if loc else "holdout") if items else None)
    return source, sets[0], sets[1]


def _origin(sc, loc: str) -> str:
    return loc if sc.dataset is None else f"{sc.dataset.path}[{loc}]"


def _dataset_reader(ctx: _Context, convert):
    """read(split name) of a dataset source: the split's rows as examples (data/hf_datasets.py)."""
    d, key = ctx.sc.dataset, f"sources.{ctx.name}.dataset"
    splits = hf_datasets.load_splits(d, key)

    def read(split: str):
        return convert(hf_datasets.split_of(splits, split, key, d), d.columns, _origin(ctx.sc, split))
    return read


def _tags(ctx: _Context):
    fmt = ctx.sc.conll

    def read_file(path):
        return read_conll(path, fmt.token_column, fmt.tag_column, fmt.scheme, fmt.separator)

    read = read_file if ctx.sc.dataset is None else _dataset_reader(
        ctx, lambda ds, columns, origin: hf_datasets.sentences(ds, columns, origin, fmt.scheme))

    def check(items, labels, path, split):
        if path:
            check_tags(items, labels, path, split)

    def make(train, labels):
        return LabelledSource(ctx.name, train, labels, ctx.tokenizer, ctx.max_length, ctx.seed), labels

    return _labelled(ctx, read, label_list_from, make, check, "tags")


def _classes(ctx: _Context):
    sc, name = ctx.sc, ctx.name
    binary = objectives.get(ctx.objective).head == "binary-classification"

    def read_file(path):
        return read_examples(path, sc.format, sc.fields.text, sc.fields.label, sc.text.glob)

    read = read_file if sc.dataset is None else _dataset_reader(ctx, hf_datasets.examples)

    def make(train, labels):
        if binary and sc.positive_label is not None:
            if sc.positive_label not in labels:
                raise ConfigError(f"sources.{name}.positive_label: {sc.positive_label!r} is not a label "
                                  f"of the data ({', '.join(labels)})")
            labels = [t for t in labels if t != sc.positive_label] + [sc.positive_label]
        source = ClassificationSource(name, train, labels, ctx.tokenizer, ctx.max_length, ctx.seed, binary)
        return source, labels

    return _labelled(ctx, read, class_list_from, make,
                     lambda items, labels, _path, split: check_classes(items, labels, split), "classes")


def _prompts(ctx: _Context):
    """Causal-LM prompt / completion pairs."""
    sc = ctx.sc

    def read_file(path):
        if sc.format in ("chat", "alpaca"):  # instruction data rendered with the chat template
            return read_instructions(path, sc.format, ctx.tokenizer)
        return read_prompt_completions(path, sc.fields.prompt, sc.fields.completion)

    read = read_file if sc.dataset is None else _dataset_reader(
        ctx, lambda ds, columns, origin: hf_datasets.prompts(ds, columns, origin, ctx.tokenizer))

    def make(train, _labels):
        return PromptSource(ctx.name, train, ctx.tokenizer, ctx.max_length, ctx.seed), []

    return _labelled(ctx, read, lambda _train: [], make, None, "prompts")


def _text_files(ctx: _Context, split: str) -> list | None:
    """The files of a text split: the paths given, or a dataset split's text column written to a file."""
    loc = ctx.sc.locations()[split]
    if not loc:
        return None
    if ctx.sc.dataset is None:
        return resolve_text_files(loc, ctx.sc.text.glob)
    read = _dataset_reader(ctx, hf_datasets.text_file)
    return [read(loc)]


def _text(ctx: _Context):
    name, sc, tokenizer, max_length, seed = ctx.name, ctx.sc, ctx.tokenizer, ctx.max_length, ctx.seed
    files = _text_files(ctx, "train")
    h = sc.holdout
    held_dev, held_test = (h.dev, h.test) if h else (0.0, 0.0)
    if held_dev + held_test >= 1:
        raise ConfigError(f"sources.{name}.holdout: dev + test must leave some text for training")
    cut_dev, cut_test = 1.0 - held_dev - held_test, 1.0 - held_test
    common = dict(objective=ctx.objective, strip_gutenberg=sc.text.strip_gutenberg, mlm_probability=sc.mlm_probability)
    train_parts = text_parts(files, 0.0, cut_dev)
    if sc.text.stream:
        src = TextStream(name, train_parts, tokenizer, max_length, seed, shuffle_buffer=sc.text.shuffle_buffer,
                         **common)
    else:
        src = TextBlocks(name, train_parts, tokenizer, max_length, seed, **common)

    def eval_set(split, lo, hi):
        strip = sc.text.strip_gutenberg
        given = _text_files(ctx, split)
        if given:
            return EvalSet("text", text_parts(given), _origin(sc, sc.locations()[split]), strip)
        if hi > lo:
            return EvalSet("text", text_parts(files, lo, hi), f"holdout {lo:.3g}-{hi:.3g} of each file", strip)
        return None

    return src, eval_set("dev", cut_dev, cut_test), eval_set("test", cut_test, 1.0)


BUILDERS = {"tags": _tags, "classes": _classes, "prompts": _prompts, "text": _text}
"""Kind of examples (objectives.py) -> builder: (source, dev set or None, test set or None)."""


def build_evals(cfg, decoder: bool) -> tuple[dict[str, EvalSet], dict[str, str]]:
    """The `evals` section: held-out text sets and their (resolved) objectives."""
    sets, objectives = {}, {}
    for name, ev in cfg.evals.items():
        objectives[name] = resolve_objective(ev.objective, decoder, f"evals.{name}")
        files = resolve_text_files(ev.path, ev.glob)
        sets[name] = EvalSet("text", text_parts(files, *ev.part), ev.path, ev.strip_gutenberg, ev.max_blocks)
    return sets, objectives


def source_sizes(sources: dict) -> dict[str, int | None]:
    return {n: (len(s) if not isinstance(s, TextStream) else None) for n, s in sources.items()}


__all__ = ["EvalSet", "build", "build_evals", "resolve_objective", "source_sizes"]
