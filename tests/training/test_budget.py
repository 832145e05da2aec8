"""A retention budget (`routing.budget`) in real runs on tiny random models: the measurements are
the training model's loss on the fixed dev sample, the router follows the controller, a killed run
resumes with the same plan and measurements, decoders and self-distilled general text work, and
bad budgets are refused with one line naming the key."""

from __future__ import annotations

import json
from statistics import NormalDist

import numpy as np
import pytest
import yaml

from support import GENERAL, make_config, run_cli, write_task_and_general
from routetune.config import load_config
from routetune.errors import ConfigError
from routetune.evaluate.tasks import text_blocks
from routetune.data.build import EvalSet
from routetune.data.readers import text_range
from routetune.data.text import text_parts
from routetune.model.inference import block_losses, lm_loss
from routetune.training.budget import samples
from routetune.model.load import load_tokenizer
from routetune.model.routed import RoutedModel
from routetune.training import checkpoint as ckpt

BUDGET = {"measure": "general-dev", "max_change": 0.01, "every": 3, "blocks": 4, "witness_blocks": 2, "min_share": 0.05}


def _config(root, model, **extra):
    files = write_task_and_general(root)
    over = {"evals": {"general-dev": {"path": str(files["general"]), "split": "dev"}}, "routing.budget": BUDGET,
            "routing.granularity": "example", "train.log_plan": True, "train.max_steps": 12,
            "train.save_every_steps": 3, "train.keep_last": 10, **extra}
    return make_config(root, model, files, **over)


def _events(run_dir, kind):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == kind]


@pytest.fixture(scope="module")
def budget_run(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("budget")
    cfg = _config(root, tiny_model_dir)
    run_cli("train", cfg, "--no-test", "--set", "run.name=whole")
    return root, cfg, root / "runs" / "whole"


def test_each_measurement_is_the_training_models_loss_on_the_dev_sample(budget_run, tiny_model_dir):
    root, _, run_dir = budget_run
    trace = _events(run_dir, "budget")
    assert [e["step"] for e in trace] == [0, 3, 6, 9, 12]
    assert trace[0]["change"] == 0.0 and trace[0]["loss"] == trace[0]["base"]
    tok = load_tokenizer(str(tiny_model_dir))
    text = text_blocks(tok, EvalSet("text", text_parts([root / "general.txt"])), 32, None)
    blocks, witness = samples(text, 4, 2, "spread")  # 4 blocks spread across the whole dev text, 2 others
    assert len(text) > 8 and len(blocks) == 4 and blocks[0] == text[0] and blocks[-1] != text[3]
    assert len(witness) == 2 and not any(w in blocks for w in witness)
    z = NormalDist().inv_cdf(0.9)  # the default confidence
    for e in trace[1:]:  # the checkpoint of that step, scored afresh
        folder = dict(ckpt.step_checkpoints(run_dir / "checkpoints"))
        model = RoutedModel.load(folder[e["step"]])
        each = block_losses(model, "masked-lm", blocks, tok, 16, "fp32")
        assert np.mean(each) == pytest.approx(e["loss"], rel=1e-5)
        assert lm_loss(model, "masked-lm", blocks, tok, 16, "fp32")[0] == pytest.approx(e["loss"], rel=0.05)
        assert e["change"] == pytest.approx(e["loss"] / e["base"] - 1)
        base = json.loads((folder[e["step"]] / "trainer_state.json").read_text())["batches"]["router"]["control"]
        margin = z * np.std(np.subtract(each, base["base_blocks"]), ddof=1) * np.sqrt(1 / 4)
        assert e["margin"] == pytest.approx(margin / e["base"], rel=1e-4) and e["margin"] > 0
        assert e["bound"] == pytest.approx(e["change"] + e["margin"])
        seen = np.mean(block_losses(model, "masked-lm", witness, tok, 16, "fp32"))
        assert e["witness_change"] == pytest.approx(seen / base["witness_base"] - 1, rel=1e-4)
        assert sum(e["weights"].values()) == pytest.approx(1.0)
        assert e["weights"]["general"] == pytest.approx(e["share"], abs=1e-6) and e["seconds"] >= 0
    # a margin as large as the budget: the run says once that no share can be shown to hold it
    wide = [e["step"] for e in trace[1:] if e["margin"] >= 0.01]
    assert (run_dir / "train.log").read_text().count("margin for held-out text") == (1 if wide else 0)


def test_the_plan_follows_the_controlled_share(budget_run):
    _, _, run_dir = budget_run
    trace = {e["step"]: e for e in _events(run_dir, "budget")}
    plan = [json.loads(line) for line in (run_dir / "plan.jsonl").read_text().splitlines()]
    for train in _events(run_dir, "train"):  # the target each train event logs is the controller's
        last = max(s for s in trace if s < train["step"])
        assert train["sources"]["general"]["target"] == pytest.approx(trace[last]["share"], abs=1e-6)
    assert {p["source"] for p in plan} == {"ner", "general"}


def test_a_killed_budget_run_resumes_with_the_same_measurements_and_plan(budget_run):
    root, cfg, whole = budget_run
    proc = run_cli("train", cfg, "--no-test", "--set", "run.name=killed", fault="after_step:8", check=False)
    assert proc.returncode != 0
    killed = root / "runs" / "killed"
    run_cli("resume", killed, "--no-test")
    assert (killed / "plan.jsonl").read_text() == (whole / "plan.jsonl").read_text()
    a, b = _events(whole, "budget"), _events(killed, "budget")
    assert [(e["step"], e["share"]) for e in a] == [(e["step"], e["share"]) for e in b]
    assert [e["loss"] for e in a] == pytest.approx([e["loss"] for e in b], rel=1e-6)
    states = [json.loads((ckpt.step_checkpoints(d / "checkpoints")[-1][1] / "trainer_state.json").read_text())
              ["batches"]["router"]["control"] for d in (whole, killed)]
    assert states[0]["updates"] == states[1]["updates"] == 4
    assert states[0]["integral"] == pytest.approx(states[1]["integral"], rel=1e-6)


def test_the_report_shows_the_control_trace(budget_run):
    _, _, run_dir = budget_run
    out = run_dir / "report"
    run_cli("report", run_dir)
    md = (out / "report.md").read_text()
    assert (out / "budget.png").is_file() and "Retention budget" in md and "+1.0%" in md
    assert "witness's last change" in md and " points" in md


@pytest.mark.parametrize("method,distill", [("lora", 0.0), ("lora", 1.0), ("none", 1.0), ("dora", 0.0), ("ia3", 0.0),
                                             ("prompt_tuning", 0.0), ("prefix_tuning", 1.0), ("adapter", 0.0)])
def test_a_decoder_with_lm_or_distilled_general_text_under_a_budget(tmp_path, tiny_llama_dir, method, distill):
    (tmp_path / "domain.txt").write_text("the store of john opened in paris and london . " * 60)
    (tmp_path / "general.txt").write_text(GENERAL)
    cfg = {"model": {"name": str(tiny_llama_dir), "max_length": 24},
           "sources": {"domain": {"objective": "causal-lm", "train": str(tmp_path / "domain.txt"),
                                  "text": {"stream": False}},
                       "general": {"objective": "causal-lm", "train": str(tmp_path / "general.txt"),
                                   "text": {"stream": False, "glob": "*.txt"}, "distill": distill}},
           "evals": {"general-dev": {"path": str(tmp_path / "general.txt"), "split": "dev"}},
           "routing": {"weights": {"domain": 0.8, "general": 0.2}, "granularity": "example", "budget": BUDGET},
           "peft": {"method": method}, "train": {"max_steps": 6, "batch_size": 4, "lr": 1e-2, "precision": "fp32",
                                                  "device": "cpu", "progress": False},
           "run": {"name": "dec", "output_dir": str(tmp_path / "runs")}}
    path = tmp_path / "dec.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run_cli("train", path, "--no-test")
    trace = _events(tmp_path / "runs" / "dec", "budget")
    assert [e["step"] for e in trace] == [0, 3, 6] and trace[-1]["loss"] != trace[0]["loss"]


@pytest.mark.parametrize("method", ["bitfit", "prompt_tuning"])
def test_an_encoder_under_a_budget_with_a_parameter_efficient_method(tmp_path, tiny_model_dir, method):
    """Bias-only training (the llama decoder above has no biases) and virtual tokens on an encoder:
    the masked-LM measurement runs through the method and sees the training move the model."""
    cfg = _config(tmp_path, tiny_model_dir, **{"peft.method": method, "train.max_steps": 6, "train.lr": 1e-2})
    run_cli("train", cfg, "--no-test", "--set", "run.name=enc")
    trace = _events(tmp_path / "runs" / "enc", "budget")
    assert [e["step"] for e in trace] == [0, 3, 6] and trace[-1]["loss"] != trace[0]["loss"]


@pytest.mark.parametrize("change,message", [
    ({"routing.strategy": "adaptive"}, "routing.budget: the adaptive strategy"),
    ({"routing.budget": {**BUDGET, "measure": "nowhere"}}, "routing.budget.measure: no evals set or source"),
    ({"evals": {"general-dev": {"path": "general.txt"}}}, "evals.general-dev has split test"),
    ({"routing.budget": {**BUDGET, "measure": "ner"}}, "source 'ner' has no language-modelling dev text"),
    ({"routing.budget": {**BUDGET, "sources": ["ner"]}}, "the primary source 'ner' cannot be"),
    ({"routing.budget": {**BUDGET, "min_share": 0.6}}, "min_share: 0.6 is above max_share"),
    ({"routing.budget": {**BUDGET, "max_change": 0}}, "routing.budget.max_change"),
    ({"routing.budget": {**BUDGET, "confidence": 0.3}}, "routing.budget.confidence"),
])
def test_bad_budgets_are_refused_naming_the_key(tmp_path, tiny_model_dir, change, message):
    cfg = _config(tmp_path, tiny_model_dir, **change)
    with pytest.raises(ConfigError, match=message):
        load_config(cfg)


def test_an_evals_part_reads_that_part_of_each_file(tmp_path, tiny_model_dir):
    """`part` splits one file into a dev and a test set that do not overlap and together read it all."""
    from routetune.data.build import build_evals

    lines = [f"line {i} of the store in paris" for i in range(200)]
    (tmp_path / "text.txt").write_text("\n".join(lines) + "\n")
    text = str(tmp_path / "text.txt")
    cfg = load_config(_config(tmp_path, tiny_model_dir, evals={
        "general-dev": {"path": text, "part": [0.0, 0.5], "split": "dev"}, "general-test": {"path": text,
                                                                                          "part": [0.5, 1.0]},
        "whole": {"path": text}}))
    sets, _ = build_evals(cfg, decoder=False)
    read = {n: [ln for path, a, b in s.items for ln in text_range(path, a, b, False)] for n, s in sets.items()}
    assert read["whole"] == lines and 80 < len(read["general-dev"]) < 120
    assert read["general-dev"] + read["general-test"] == lines
    with pytest.raises(ConfigError, match="evals.whole.part: .*expected \\[start, end\\]"):
        load_config(_config(tmp_path, tiny_model_dir, evals={"whole": {"path": text, "part": [0.5, 0.5]}}))


def test_no_retention_keeps_the_budget_measuring(tmp_path, tiny_model_dir):
    """`train --no-retention` skips the before/after scoring, not a budget's measurement: the
    budget's `evals` set is training input. The run measures as it would, and scores nothing
    before or after."""
    cfg = _config(tmp_path, tiny_model_dir, **{"train.max_steps": 6})
    run_cli("train", cfg, "--no-retention", "--set", "run.name=quick")
    run_dir = tmp_path / "runs" / "quick"
    assert [e["step"] for e in _events(run_dir, "budget")] == [0, 3, 6]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert "before_after" not in summary and "general-dev" not in summary.get("dev", {})
    assert not (run_dir / "before.json").exists()


def test_a_budget_the_sample_cannot_certify_is_named_once(tmp_path, tiny_model_dir):
    """A budget smaller than the margin the sample's own spread gives: the run keeps going at a high
    share and says once, in its log, what to change."""
    cfg = _config(tmp_path, tiny_model_dir, **{"routing.budget": {**BUDGET, "max_change": 0.0005},
                                               "train.max_steps": 6})
    run_cli("train", cfg, "--no-test", "--set", "run.name=tight")
    run_dir = tmp_path / "runs" / "tight"
    trace = _events(run_dir, "budget")
    assert all(e["margin"] >= 0.0005 for e in trace[1:])
    log = (run_dir / "train.log").read_text()
    assert log.count("margin for held-out text") == 1 and "routing.budget.blocks" in log
