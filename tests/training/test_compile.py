"""Compiled training steps (`train.compile`, training/compiled.py): a compiled run trains what the
eager run trains (per-step losses and final weights to rounding), logs its graphs and the reasons
for each recompilation, keeps its checkpoints as they were, and falls back to eager with one line,
from the step's own random state, when compiling fails."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file

from support import make_config
from routetune.training import compiled
from routetune.workflow import train


@pytest.fixture(scope="module")
def still_bert(tmp_path_factory, tiny_model_dir):
    """The tiny BERT without dropout: a compiled kernel draws its dropout masks from its own random
    stream, so only a model without dropout can be compared step by step."""
    import shutil

    folder = tmp_path_factory.mktemp("still-bert") / "m"
    shutil.copytree(tiny_model_dir, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def _run(tmp_path, model_dir, ner_files, name, *sets):
    path = make_config(tmp_path / name, model_dir, ner_files)
    _, summary = train(path, ["train.max_steps=4", "train.eval_every_steps=2", f"run.name={name}", *sets],
                       overwrite=True)
    run = tmp_path / name / "runs" / name
    losses = [(r["step"], {s: v["loss"] for s, v in r["sources"].items()})
              for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["event"] == "train"]
    weights = {f"{f.name}:{k}": v for f in sorted((run / "checkpoints" / "step-00000004").glob("*.safetensors"))
               for k, v in load_file(str(f)).items()}  # the model (or adapters) and the heads
    return summary, losses, weights


def _close_losses(a, b, tol):
    assert [s for s, _ in a] == [s for s, _ in b]
    for (_, x), (_, y) in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert (x[k] is None) == (y[k] is None)
            if x[k] is not None:
                assert x[k] == pytest.approx(y[k], rel=tol, abs=tol), (k, x[k], y[k])


def test_a_compiled_run_trains_what_the_eager_run_trains(tmp_path, still_bert, ner_files):
    """Inductor, full fine-tuning of an encoder on NER with masked-LM routed in (both heads' losses
    through the compiled blocks), dev scored in between (eagerly: no graphs for it)."""
    eager, eager_losses, eager_weights = _run(tmp_path, still_bert, ner_files, "eager", "train.compile=false",
                                              "train.log_every=1")
    comp, comp_losses, comp_weights = _run(tmp_path, still_bert, ner_files, "compiled", "train.compile=true",
                                           "train.log_every=1")
    assert "compiled" not in eager
    info = comp["compiled"]
    assert info["blocks"] == 2 and info["backend"] == "inductor" and info["fallback"] is None
    assert 1 <= info["graphs"] <= 4 and info["seconds"] > 0
    assert len(info["recompilations"]) == info["graphs"] - 1  # each graph after the first had a reason
    _close_losses(eager_losses, comp_losses, 1e-4)
    assert eager_weights.keys() == comp_weights.keys()  # the same parameter names: no wrapper prefix
    for k in eager_weights:
        torch.testing.assert_close(comp_weights[k], eager_weights[k], rtol=1e-4, atol=1e-5)


def _failing_backend(gm, example_inputs):
    raise RuntimeError("no kernels for this graph today")


def test_a_failed_compilation_falls_back_to_eager_with_one_line(tmp_path, tiny_model_dir, ner_files, caplog):
    """With dropout on: the eager retry starts from the step's own random state, so the run is the
    eager run exactly."""
    from torch._dynamo import register_backend

    register_backend(name="routetune_test_failing")(_failing_backend)
    _, eager_losses, eager_weights = _run(tmp_path, tiny_model_dir, ner_files, "eager", "train.compile=false")
    with caplog.at_level(logging.WARNING, logger="routetune"):
        summary, losses, weights = _run(tmp_path, tiny_model_dir, ner_files, "fails", "train.compile=true",
                                        "train.compile_backend=routetune_test_failing")
    lines = [r.getMessage() for r in caplog.records if "train.compile" in r.getMessage()]
    assert len(lines) == 1 and "training continues eager" in lines[0] and "no kernels" in lines[0], lines
    assert "no kernels for this graph today" in summary["compiled"]["fallback"]
    assert losses == eager_losses
    for k in eager_weights:
        assert torch.equal(weights[k], eager_weights[k]), k


def test_recompilations_are_counted_with_torch_s_reasons(tmp_path, tiny_llama_dir, ner_files):
    """A decoder with LoRA through the traced (not code-generated) backend: the first block's input
    needs no gradient and the second's does, and the batches change shape, so graphs are recompiled
    and each time torch's reason is logged. The blocks are eager again after training."""
    summary, losses, _ = _run(tmp_path, tiny_llama_dir, ner_files, "lora", "train.compile=true",
                              "train.compile_backend=aot_eager", "peft.method=lora", "peft.r=4",
                              "routing.weights.general=0.5", "sources.general.objective=causal-lm")
    info = summary["compiled"]
    assert info["graphs"] >= 2 and len(info["recompilations"]) == info["graphs"] - 1
    assert any("requires_grad" in r for r in info["recompilations"]), info["recompilations"]
    assert all(loss is None or loss == loss for _, ls in losses for loss in ls.values())
    assert "recompiles" not in torch._logging._internal.log_state.artifact_names  # put back as it was


def test_auto_follows_the_measurements_and_errors_are_told_apart():
    assert compiled.wanted("auto", torch.device("cpu")) == compiled.AUTO["cpu"]
    assert compiled.wanted("auto", torch.device("cuda", 0)) == compiled.AUTO["cuda"]
    assert compiled.wanted(True, torch.device("cpu")) == (True, "train.compile=true")
    assert compiled.wanted(False, torch.device("cuda", 0))[0] is False
    from torch._dynamo.exc import Unsupported

    assert compiled.is_compiler_error(Unsupported("x"))
    try:
        torch.ones(2) @ torch.ones(3)
    except RuntimeError as error:
        assert not compiled.is_compiler_error(error)  # a shape error of the model's own: raised, not retried


@pytest.fixture(scope="module")
def decoder_config(tmp_path_factory, tiny_llama_dir):
    """A tiny Llama (no dropout) trained with LoRA on general text in packed padding-free batches."""
    import yaml
    from support import write_task_and_general

    root = tmp_path_factory.mktemp("compile-decoder")
    files = write_task_and_general(root)
    cfg = {"model": {"name": str(tiny_llama_dir), "max_length": 32},
           "sources": {"text": {"objective": "causal-lm", "train": str(files["general"]), "text": {"stream": False}}},
           "train": {"max_steps": 4, "batch_size": 4, "lr": 1e-2, "seed": 3, "eval_each_epoch": False,
                     "eval_before": False, "progress": False, "log_every": 1, "max_grad_norm": None},
           "peft": {"method": "lora", "r": 4, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "down_proj"]},
           "run": {"output_dir": str(root / "runs")}}
    path = root / "decoder.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return root, path


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_compiled_blocks_train_on_two_processes_as_eager_ones_do(decoder_config, strategy):
    """The blocks compiled inside DistributedDataParallel, or after FSDP2 has sharded them (its
    gathers run around the compiled block), on 2 processes: the adapters of the same 2 processes
    eager. (That 2 processes train as one is tests/training/test_distributed.py's and test_fsdp.py's
    to show: the batch split in two rounds differently, and AdamW's first steps move a weight whose
    gradient is zero but for rounding by +-lr, so this tiny run at lr 1e-2 is compared like for like.)"""
    from support.ddp import close, launch

    root, path = decoder_config
    out = []
    strategy_set = ["--set", f"train.distributed.strategy={strategy}"]
    for name, extra in ((f"eager-{strategy}", strategy_set),
                        (f"compiled-{strategy}", [*strategy_set, "--set", "train.compile=true", "--set",
                                                  "train.compile_backend=aot_eager"])):
        launch("train", str(path), "--no-test", "--set", f"run.name={name}", *extra, nproc=2)
        out.append(root / "runs" / name)
    a, b = (load_file(str(d / "checkpoints" / "step-00000004" / "adapter_model.safetensors")) for d in out)
    close(a, b)
    summary = json.loads((out[1] / "summary.json").read_text())
    assert summary["compiled"]["graphs"] >= 1 and summary["compiled"]["fallback"] is None


def test_a_compiled_run_killed_and_resumed_ends_as_the_uninterrupted_one(decoder_config):
    """Exact resume is unchanged: killed after step 2, resumed (its blocks compiled again), the
    adapters equal bitwise those of the compiled run that was not interrupted."""
    from support.ddp import launch

    root, path = decoder_config
    sets = ["--set", "train.compile=true", "--set", "train.compile_backend=aot_eager",
            "--set", "train.save_every_steps=1"]
    launch("train", str(path), "--no-test", "--set", "run.name=whole", *sets)
    launch("train", str(path), "--no-test", "--set", "run.name=killed", *sets, fault="after_step:2", check=False)
    launch("resume", str(root / "runs" / "killed"), "--no-test")
    a, b = (load_file(str(root / "runs" / name / "checkpoints" / "step-00000004" / "adapter_model.safetensors"))
            for name in ("whole", "killed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((root / "runs" / "killed" / "summary.json").read_text())["compiled"]["graphs"] >= 1
