"""Config of sources (what the router draws from) and of extra held-out text (`evals`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from routetune import objectives
from routetune.config.base import Strict, one_of


class ConllFormat(Strict):
    token_column: int = 0
    """Column index of the token (negative counts from the end)."""
    tag_column: int = -1
    """Column index of the tag (negative counts from the end)."""
    scheme: Literal["iob1", "iob2"] = "iob2"
    """Tagging scheme of the file; IOB1 is converted to IOB2 when read."""
    separator: str | None = None
    """Column separator; default: any run of whitespace (tabs or spaces)."""


class TextFormat(Strict):
    glob: str = "*.txt"
    """File pattern used when a path is a folder."""
    strip_gutenberg: bool = False
    """Drop the Project Gutenberg header/footer (text outside `*** START OF` / `*** END OF`)."""
    shuffle_buffer: int = Field(1024, ge=1)
    """Blocks held in the seeded shuffle buffer of the streaming reader (1 = file order)."""
    stream: bool = True
    """Read lazily (a corpus larger than memory works; size unknown). false: load all blocks into memory as a sized
    source with an exact per-epoch shuffle (needed for the primary source)."""


class FieldsConfig(Strict):
    text: str = "text"
    """Column / JSON field holding the text (csv, tsv, jsonl)."""
    label: str = "label"
    """Column / JSON field holding the class label (csv, tsv, jsonl)."""
    prompt: str = "prompt"
    """JSON field of the prompt (causal-lm, jsonl)."""
    completion: str = "completion"
    """JSON field of the completion (causal-lm, jsonl); the loss is computed on it only."""


class HoldoutConfig(Strict):
    dev: float = Field(0.0, ge=0, lt=1)
    """Share held out as the dev set (when no dev file is given)."""
    test: float = Field(0.0, ge=0, lt=1)
    """Share held out as the test set (when no test file is given)."""
    seed: int = 0
    """Seed of the shuffled split of labelled examples. Text is split by position instead: the
    test part is the last `test` share of each file, the dev part the `dev` share just before it."""


class DatasetConfig(Strict):
    path: str
    """A Hugging Face dataset: a folder written by `save_to_disk`, a parquet / arrow / json(l) / csv file or glob
    (relative to the config file), or a hub id (when the hub is reachable)."""
    name: str | None = None
    """The dataset's configuration, for hub datasets that have several."""
    train: str = "train"
    """Split trained on (files and hub datasets without splits give `train`)."""
    dev: str | None = None
    """Split evaluated during training (e.g. `validation`)."""
    test: str | None = None
    """Split evaluated at the end (e.g. `test`)."""
    columns: dict[str, str] = Field(default_factory=dict)
    """The dataset's column for each field, where it is named otherwise: `tokens` and `tags` (token classification;
    ClassLabel tags give their names), `text` and `label` (classification), `prompt` and `completion` (causal-LM pairs),
    `messages` (chat rows), `text` (language modelling); e.g. `{tags: ner_tags}`."""


class SourceConfig(Strict):
    objective: str = Field(json_schema_extra={"choices": objectives.names()})
    """How a batch of this source becomes a loss. `language-modeling` follows the backbone: causal-LM for a decoder,
    masked-LM for an encoder."""
    train: str | None = None
    """Training data: a file, or for text also a folder or a glob (or give `dataset`)."""
    dataset: DatasetConfig | None = None
    """Read through Hugging Face `datasets` instead of files. Labelled sources, prompt/completion pairs and instruction
    rows (`messages`, or `instruction`/`input`/`output`) are read by format `dataset`; a text column for language
    modelling by `dataset-text` (chosen when `columns` maps `text`, or for masked-LM sources)."""
    dev: str | None = None
    """Development data (evaluated during training)."""
    test: str | None = None
    """Test data (evaluated at the end and by `routetune eval --split test`)."""
    format: str | None = Field(None, json_schema_extra={"choices": objectives.formats()})
    """Reader. Default: conll (token-classification), jsonl (classification; causal-lm prompt/completion pairs need it
    too), text (language modelling). Causal-LM instruction data: `chat` (jsonl `{"messages": [{"role", "content"},
    ...]}`, or ShareGPT's `{"conversations": [{"from", "value"}, ...]}`, rendered with the tokenizer's chat template;
    the loss is on every assistant reply) or `alpaca` (jsonl `{"instruction", "input", "output"}`). `folders`: one
    sub-folder per class, one file per example; `lines-per-class`: one file per class named by its suffix (e.g.
    `rt-polarity.pos`), one example per line."""
    fields: FieldsConfig = FieldsConfig()
    """Column / field names of csv, tsv and jsonl files."""
    holdout: HoldoutConfig | None = None
    """Carve dev/test sets out of `train` by a fixed rule when the data has no such splits."""
    threshold: float = Field(0.5, gt=0, lt=1)
    """binary-classification: probability above which the positive class is predicted."""
    positive_label: str | None = None
    """binary-classification: the label that is class 1. Default: the second label in sorted order."""
    max_new_tokens: int = Field(32, ge=1)
    """causal-lm prompt/completion: tokens generated greedily for exact match and token F1."""
    eval_generate: int = Field(200, ge=0)
    """causal-lm prompt/completion: evaluation examples that are generated for exact match and token F1 (0: none)."""
    conll: ConllFormat = ConllFormat()
    """Options of the CoNLL reader."""
    text: TextFormat = TextFormat()
    """Options of the plain-text reader."""
    mlm_probability: float = Field(0.15, gt=0.0, lt=1.0)
    """Share of tokens selected for masked-LM prediction (80% [MASK], 10% random, 10% kept)."""
    distill: float = Field(0.0, ge=0.0, le=1.0)
    """Language-modelling sources: share of this source's loss that is self-distillation, the KL divergence from the
    predictions of the frozen starting model (the teacher: the same model with its LoRA/DoRA/IA3 adapters or virtual
    tokens switched off, or for other methods a frozen copy of the backbone taken before the first step) to the trained
    model's, on the same tokens; the rest (1 - distill) is the usual LM loss on the text. Holds the model's general
    predictions in place instead of pulling them towards this text's style. Costs one extra forward without gradients on
    this source's examples."""

    _objective = field_validator("objective")(lambda v: one_of(v, objectives.names()))

    @model_validator(mode="after")
    def _default_format(self) -> SourceConfig:
        spec = objectives.get(self.objective)
        if (self.train is None) == (self.dataset is None):
            raise ValueError("train: give the training data as `train` (files) or as `dataset`, one of them")
        if self.dataset is not None:
            for split in ("dev", "test"):
                if getattr(self, split) is not None:
                    raise ValueError(f"{split}: a dataset source names its {split} split as dataset.{split}")
            if self.format not in (None, "dataset", "dataset-text"):
                raise ValueError(f"format: a source with `dataset` is read by `dataset` or `dataset-text`, "
                                 f"got {self.format!r}")
            if self.format is None:  # plain text when the text column is mapped or the objective reads only text
                as_text = "dataset-text" in spec.formats and ("text" in self.dataset.columns
                                                              or "dataset" not in spec.formats)
                object.__setattr__(self, "format", "dataset-text" if as_text else "dataset")
        elif self.format in ("dataset", "dataset-text"):
            raise ValueError(f"format: `{self.format}` needs the `dataset` key (path, splits, columns)")
        if self.format is None:
            object.__setattr__(self, "format", spec.default_format)
        if self.format not in spec.formats:
            raise ValueError(f"format: {self.objective} reads {' or '.join(spec.formats)}, got {self.format!r}")
        if self.distill and spec.supervised:
            raise ValueError(f"distill: self-distillation applies to language-modelling sources, not {self.objective}")
        return self

    @property
    def supervised(self) -> bool:
        return objectives.get(self.objective).supervised

    def locations(self) -> dict:
        """Where each split is read from: file paths, or the split names of the source's dataset."""
        d = self.dataset
        return {"train": self.train, "dev": self.dev, "test": self.test} if d is None else \
            {"train": d.train, "dev": d.dev, "test": d.test}

    def has_split(self, split: str) -> bool:
        """Whether a `dev` or `test` set exists: read from its own file or dataset split, or held out."""
        return bool(self.locations()[split] or (self.holdout and getattr(self.holdout, split)))


class EvalTextConfig(Strict):
    path: str
    """Held-out text: a file, a folder or a glob (relative to the config file)."""
    objective: str = Field("language-modeling", json_schema_extra={"choices": objectives.names(lm_only=True)})
    """How it is scored: perplexity (causal-lm) or masked-LM loss; `language-modeling` follows the backbone."""
    _objective = field_validator("objective")(lambda v: one_of(v, objectives.names(lm_only=True)))
    glob: str = "*.txt"
    """File pattern used when `path` is a folder."""
    strip_gutenberg: bool = False
    """Drop Project Gutenberg headers and footers."""
    max_blocks: int | None = Field(None, ge=1)
    """Score only the first N blocks of `max_length` tokens (bounds the cost on a large corpus)."""
    part: tuple[float, float] = (0.0, 1.0)
    """The part of each file read, as fractions of its length: `[0, 0.5]` the first half, `[0.5, 1]` the second
    (one file can give a dev set and a test set that do not overlap)."""
    split: Literal["test", "dev"] = "test"
    """`test`: scored with the test sets (`--test`, `routetune eval`). `dev`: scored after training on the best
    checkpoint whether or not the test sets are, for choosing settings on held-out data (`routetune sweep` retention);
    both are scored with the base model before training."""

    @field_validator("part")
    @classmethod
    def _part(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0.0 <= v[0] < v[1] <= 1.0:
            raise PydanticCustomError("part", "expected [start, end] with 0 <= start < end <= 1")
        return v
