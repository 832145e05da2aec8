
import pytest

from support import REPO
import yaml

from routetune.config import apply_override, load_config
from routetune.errors import ConfigError

BASE = """\
model:
  name: some/model
sources:
  ner:
    objective: token-classification
    train: data/train.conll
  general:
    objective: masked-lm
    train: data/text
routing:
  weights: {ner: 0.8, general: 0.2}
train:
  lr: 3.0e-5
"""


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_valid_config_defaults_and_resolved_paths(tmp_path):
    cfg = load_config(write(tmp_path, BASE))
    assert cfg.train.lr == 3e-5 and cfg.train.primary == "ner"
    assert cfg.train.early_stopping.metric == "ner/f1"
    assert cfg.sources["ner"].format == "conll" and cfg.sources["general"].format == "text"
    assert cfg.sources["ner"].train == str((tmp_path / "data/train.conll").resolve())
    assert cfg.routing.weights == {"ner": 0.8, "general": 0.2}


def test_wrong_type_names_key_and_line(tmp_path):
    p = write(tmp_path, BASE.replace("lr: 3.0e-5", "lr: fast"))
    with pytest.raises(ConfigError) as err:
        load_config(p)
    assert f"{p}:13: train.lr: expected a number, got 'fast'" in str(err.value)


def test_unknown_key(tmp_path):
    p = write(tmp_path, BASE + "  learning_rate: 1\n")
    with pytest.raises(ConfigError, match=r"train\.learning_rate: unknown key under train"):
        load_config(p)


def test_missing_required(tmp_path):
    p = write(tmp_path, BASE.replace("  name: some/model\n", "  max_length: 64\n"))
    with pytest.raises(ConfigError, match=r"model\.name: required key is missing"):
        load_config(p)


@pytest.mark.parametrize("weights, message", [
    ("{ner: -1, general: 0.2}", r"routing\.weights\.ner: expected a finite number >= 0"),
    ("{ner: 0, general: 0}", "all weights are zero"),
    ("{ner: 1, nope: 1}", r"routing\.weights\.nope: no source named 'nope'"),
    ("{ner: 0, general: 1}", "primary source has weight 0"),
])
def test_bad_weights(tmp_path, weights, message):
    p = write(tmp_path, BASE.replace("{ner: 0.8, general: 0.2}", weights))
    with pytest.raises(ConfigError, match=message):
        load_config(p)


def test_overrides(tmp_path):
    p = write(tmp_path, BASE)
    cfg = load_config(p, ["train.lr=1e-4", "routing.weights.general=0", "train.early_stopping.patience=3"])
    assert cfg.train.lr == 1e-4 and cfg.routing.weights["general"] == 0.0
    assert cfg.train.early_stopping.patience == 3
    with pytest.raises(ConfigError, match=r"train\.epochs: expected a number, got 'many'"):
        load_config(p, ["train.epochs=many"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(p, ["train.lr"])


def test_override_into_scalar_refused():
    raw = yaml.safe_load(BASE)
    with pytest.raises(ConfigError, match="train.lr is a float, not a mapping"):
        apply_override(raw, "train.lr.x=1")


def test_env_expansion(tmp_path, monkeypatch):
    text = BASE.replace("data/train.conll", "${MY_DATA:-fallback}/train.conll")
    monkeypatch.delenv("MY_DATA", raising=False)
    assert load_config(write(tmp_path, text)).sources["ner"].train.endswith("fallback/train.conll")
    monkeypatch.setenv("MY_DATA", "/abs/data")
    assert load_config(write(tmp_path, text)).sources["ner"].train == "/abs/data/train.conll"


@pytest.mark.parametrize("text, message", [
    ("", "empty"), ("- a\n- b\n", "mapping at the top level"), ("model: [unclosed\n", "invalid YAML"),
])
def test_bad_yaml(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text))


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "none.yaml")


def test_configuration_docs_are_current():
    from routetune.config.docs import render

    doc = REPO / "docs" / "configuration.md"
    assert doc.read_text() == render(), "regenerate: python -m routetune.config.docs > docs/configuration.md"


@pytest.mark.parametrize("path", sorted((REPO / "examples").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_example_config_is_valid(path):
    """The shipped examples parse and validate (their data paths are not opened here)."""
    if "tasks" in yaml.safe_load(path.read_text()):  # a `routetune continual` sequence
        from routetune.continual import load_continual

        ccfg = load_continual(path)
        assert ccfg.tasks
        for task in ccfg.tasks:
            assert load_config(path.parent / task.config, task.set).sources
        return
    if "space" in yaml.safe_load(path.read_text()):  # a `routetune sweep` file: every dimension gives a valid run
        from routetune.sweep.study import Study, _check_space
        from routetune.sweep.config import load_sweep

        cfg = load_sweep(path)
        _check_space(Study(cfg, path, (path.parent / cfg.base).resolve(), path.parent, None))
        return
    assert load_config(path).sources


@pytest.mark.parametrize("value, expected", [("tensorboard", ["tensorboard"]), ("none", []),
                                             ("[mlflow, tensorboard]", ["mlflow", "tensorboard"])])
def test_report_to_takes_one_name_or_none_like_the_trainer(tmp_path, value, expected):
    assert load_config(write(tmp_path, BASE), [f"train.report_to={value}"]).train.report_to == expected


def test_per_example_attention_is_not_compiled(tmp_path):
    p = write(tmp_path, BASE)
    assert load_config(p, ["train.packed_attention=per_example"]).train.packed_attention == "per_example"
    with pytest.raises(ConfigError, match=r"train\.packed_attention=per_example: not with train\.compile=true"):
        load_config(p, ["train.packed_attention=per_example", "train.compile=true"])
