"""Continual learning: a sequence of tasks on one backbone, with and without replay."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from support import make_config
from routetune.cli import app
from routetune.continual import format_matrix, run_continual, score

runner = CliRunner()


def _write(tmp_path, tiny_model_dir, ner_files, class_files, replay, forward=False):
    cls_cfg = make_config(tmp_path / "cls", tiny_model_dir, ner_files)
    raw = yaml.safe_load(cls_cfg.read_text())
    raw["sources"] = {"polarity": {"objective": "sequence-classification", "train": str(class_files["jsonl"]),
                                   "dev": str(class_files["dev"]), "test": str(class_files["dev"])},
                      "general": raw["sources"]["general"]}
    raw["routing"]["weights"] = {"polarity": 0.8, "general": 0.2}
    raw["train"]["early_stopping"] = {"metric": "polarity/accuracy", "patience": 5}
    cls_cfg.write_text(yaml.safe_dump(raw))
    ner_cfg = make_config(tmp_path / "ner", tiny_model_dir, ner_files)
    cont = tmp_path / "continual.yaml"
    cont.write_text(yaml.safe_dump({"name": f"seq-{replay}", "output_dir": "runs", "replay": replay,
                                    "forward_transfer": forward,
                                    "tasks": [{"config": str(cls_cfg), "set": ["train.epochs=2"]},
                                              {"config": str(ner_cfg)}]}))
    return cont


@pytest.mark.parametrize("replay", [0.0, 0.3])
def test_continual_matrix_and_transfer(tmp_path, tiny_model_dir, ner_files, class_files, replay):
    cont = _write(tmp_path, tiny_model_dir, ner_files, class_files, replay, forward=replay == 0.0)
    result = run_continual(cont)
    assert result["tasks"] == ["polarity", "ner"] and result["metrics"] == ["accuracy", "f1"]
    R = result["R"]
    assert R[0][1] is None and None not in R[1]
    stages = [s["run"] for s in result["stages"]]
    # every entry equals a direct evaluation of that stage's best checkpoint
    from routetune.config import load_config

    cfgs = [load_config(t["config"], t.get("set", [])) for t in yaml.safe_load(cont.read_text())["tasks"]]
    assert R[0][0] == score(tmp_path / "runs" / "seq-{}".format(replay) / "1-polarity", cfgs[0], "polarity")[0]
    assert R[1][0] == score(stages[1], cfgs[0], "polarity")[0]
    assert R[1][1] == score(stages[1], cfgs[1], "ner")[0]
    assert result["average"] == pytest.approx((R[1][0] + R[1][1]) / 2)
    assert result["bwt"] == pytest.approx(R[1][0] - R[0][0])
    saved = json.loads((tmp_path / "runs" / f"seq-{replay}" / "continual.json").read_text())
    assert saved["R"] == R
    # stage 2 started from stage 1 and still has the polarity head
    heads1 = load_file(f"{stages[0]}/checkpoints/best/heads.safetensors")
    heads2 = load_file(f"{stages[1]}/checkpoints/best/heads.safetensors")
    polarity = [k for k in heads1 if k.startswith("polarity.")]
    assert polarity and all(k in heads2 for k in polarity)
    same = all(torch.equal(heads1[k], heads2[k]) for k in polarity)
    assert same == (replay == 0.0)  # without replay the old head is carried unchanged; with replay it trains
    config2 = yaml.safe_load((tmp_path / "runs" / f"seq-{replay}" / "2-ner" / "config.yaml").read_text())
    assert ("polarity" in config2["sources"]) == (replay > 0)
    if replay:
        assert config2["routing"]["weights"]["polarity"] == pytest.approx(replay)
        summary = json.loads((tmp_path / "runs" / f"seq-{replay}" / "2-ner" / "summary.json").read_text())
        assert summary["sources"]["polarity"]["batches"] > 0
    else:
        assert result["baselines"][1] == score(tmp_path / "runs" / "seq-0.0" / "alone-ner", cfgs[1], "ner")[0]
        assert result["fwt"] == pytest.approx(R[1][1] - result["baselines"][1])
    text = format_matrix(result)
    assert "backward transfer" in text and f"{R[1][0]:.4f}" in text


def test_continual_cli_and_report(tmp_path, tiny_model_dir, ner_files, class_files):
    cont = _write(tmp_path, tiny_model_dir, ner_files, class_files, 0.0)
    result = runner.invoke(app, ["continual", str(cont)])
    assert result.exit_code == 0, result.output
    assert "backward transfer" in result.output
    again = runner.invoke(app, ["continual", str(cont)])
    assert again.exit_code != 0  # refuses to overwrite
    folder = tmp_path / "runs" / "seq-0.0"
    result = runner.invoke(app, ["report", str(folder)])
    assert result.exit_code == 0, result.output
    assert (folder / "report" / "continual.png").is_file()
    assert "Continual" in (folder / "report" / "report.md").read_text()
