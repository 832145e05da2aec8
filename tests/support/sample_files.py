"""Small data files and configs the tests write: CoNLL tagging, general text, a two-class set, and
the YAML config of a tiny run."""

from __future__ import annotations

import textwrap
from pathlib import Path

WORDS = ["the", "a", "in", "and", "of", "to", "paris", "apple", "store", "opened", "london", "john"]

NER_TRAIN = """\
-DOCSTART- O

John\tB-person
opened\tO
a\tO
store\tO
in\tO
Paris\tB-location
.\tO

Apple\tB-corporation
opened\tO
in\tO
London\tB-location

the\tO
store\tO
of\tO
John\tB-person
Smith\tI-person
"""


def write_ner(folder: Path, n_repeat: int = 8) -> dict[str, Path]:
    """Small train/dev/test CoNLL files (train repeated so a few epochs have some batches)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, repeat in (("train", n_repeat), ("dev", 2), ("test", 2)):
        p = folder / f"{split}.conll"
        body = NER_TRAIN.replace("-DOCSTART- O\n\n", "")
        p.write_text("-DOCSTART- O\n\n" + "\n".join([body] * repeat), encoding="utf-8")
        paths[split] = p
    return paths


GENERAL = textwrap.dedent("""\
    The river runs slowly through the old town and the bridges cast long shadows.
    Bread needs flour, water, salt and yeast, and time to rise in a cool kitchen.
    Libraries are busy places where people read, learn and meet each other.
    """) * 20


def write_task_and_general(root: Path) -> dict[str, Path]:
    """The small NER files plus a general text, under `root` (for module-scoped fixtures too)."""
    paths = write_ner(root / "ner")
    general = root / "general.txt"
    general.write_text(GENERAL, encoding="utf-8")
    paths["general"] = general
    return paths


def make_config(tmp_path: Path, model_dir: Path, files: dict, **overrides) -> Path:
    """Write a tiny-run YAML config and return its path."""
    import yaml

    cfg = {
        "model": {"name": str(model_dir), "max_length": 32},
        "sources": {
            "ner": {
                "objective": "token-classification",
                "train": str(files["train"]),
                "dev": str(files["dev"]),
                "test": str(files["test"]),
            },
            "general": {"objective": "masked-lm", "train": str(files["general"])},
        },
        "routing": {"weights": {"ner": 0.75, "general": 0.25}, "seed": 3},
        "train": {
            "precision": "fp32",
            "device": "cpu",
            "epochs": 2,
            "batch_size": 4,
            "lr": 1e-3,
            "seed": 1,
            "progress": False,
            "early_stopping": {"metric": "ner/f1", "patience": 5},
        },
        "run": {"name": "tiny", "output_dir": str(tmp_path / "runs")},
    }
    for key, value in overrides.items():
        node = cfg
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


POLARITY = {
    "pos": ["a great film and a joy", "the best store in london", "john is great", "a joy to watch",
            "the film is a joy and great"],
    "neg": ["a dull film", "the worst store of paris", "john is dull and slow", "a slow and dull film",
            "the worst of the worst"],
}
