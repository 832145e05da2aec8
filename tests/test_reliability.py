"""Exact resume after SIGKILL, atomic checkpoints, damage detection, non-finite loss policy."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from support import make_config, run_cli
from routetune.training import checkpoint as ckpt

STEPS = 20


def _config(tmp_path, tiny_model_dir, ner_files, name):
    return make_config(tmp_path / name, tiny_model_dir, ner_files, **{
        "train.max_steps": STEPS, "train.save_every_steps": 5, "train.keep_last": 10,
        "train.eval_each_epoch": True, "train.batch_size": 3, "train.lr": 5e-3,
        "run.name": "run", "run.output_dir": str(tmp_path / name / "runs"),
        "routing.weights": {"ner": 0.6, "general": 0.4}})


def _cli(*args, fault=None, check=True):
    return run_cli(*args, fault=fault, check=check)


def _final(run_dir: Path):
    folder = run_dir / "checkpoints" / f"step-{STEPS:08d}"
    ckpt.verify(folder)
    tensors = {**load_file(str(folder / "model.safetensors")), **load_file(str(folder / "heads.safetensors"))}
    plan = [json.loads(line) for line in (run_dir / "plan.jsonl").read_text().splitlines()]
    return tensors, plan


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir):
    from support import write_task_and_general

    root = tmp_path_factory.mktemp("reference")
    files = write_task_and_general(root)
    cfg = _config(root, tiny_model_dir, files, "ref")
    _cli("train", str(cfg))
    run_dir = root / "ref" / "runs" / "run"
    evals = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()
             if json.loads(x)["event"] == "eval"]
    return files, _final(run_dir), evals


def _assert_same(run_dir, ref):
    tensors, plan = _final(run_dir)
    ref_tensors, ref_plan = ref
    assert plan == ref_plan
    assert tensors.keys() == ref_tensors.keys()
    for k in tensors:
        assert torch.equal(tensors[k], ref_tensors[k]), k  # bitwise


@pytest.mark.parametrize("faults", [["after_step:12"], ["after_step:7", "after_step:16"], ["in_checkpoint:10"]],
                         ids=["kill-at-12", "two-kills", "kill-during-checkpoint-write"])
def test_sigkill_then_resume_is_bitwise_identical(tmp_path, tiny_model_dir, reference, faults):
    files, ref, _ = reference
    cfg = _config(tmp_path, tiny_model_dir, files, "killed")
    run_dir = tmp_path / "killed" / "runs" / "run"
    first = _cli("train", str(cfg), fault=faults[0], check=False)
    assert first.returncode == -9  # SIGKILL
    for fault in faults[1:]:
        again = _cli("resume", str(run_dir), fault=fault, check=False)
        assert again.returncode == -9
    if faults[0].startswith("in_checkpoint"):
        leftovers = [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
        assert leftovers  # the half-written checkpoint is there, but unmarked ...
        assert ckpt.newest_valid(run_dir / "checkpoints").name == "step-00000005"  # ... and never used
    _cli("resume", str(run_dir))
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]  # cleaned up
    _assert_same(run_dir, ref)


def test_resume_at_an_epoch_boundary(tmp_path, tiny_model_dir, reference):
    files, ref, evals = reference
    boundary = evals[0]  # dev evaluation = end of a pass over the primary source (and a checkpoint)
    cfg = _config(tmp_path, tiny_model_dir, files, "epoch")
    assert _cli("train", str(cfg), fault=f"after_step:{boundary}", check=False).returncode == -9
    run_dir = tmp_path / "epoch" / "runs" / "run"
    assert ckpt.newest_valid(run_dir / "checkpoints").name == f"step-{boundary:08d}"
    _cli("train", str(cfg), "--resume")
    _assert_same(run_dir, ref)


def test_resume_refuses_a_changed_config(tmp_path, tiny_model_dir, reference):
    files, _, _ = reference
    cfg = _config(tmp_path, tiny_model_dir, files, "changed")
    _cli("train", str(cfg), fault="after_step:6", check=False)
    proc = _cli("train", str(cfg), "--resume", "--set", "train.lr=0.1", check=False)
    assert proc.returncode == 2 and "differs from the run's saved config at train.lr" in proc.stderr


def _checkpoint(tmp_path, tiny_model_dir, ner_files) -> Path:
    from routetune.workflow import train

    cfg = make_config(tmp_path, tiny_model_dir, ner_files, **{"train.max_steps": 3})
    run_dir, _ = train(cfg)
    return ckpt.newest_valid(run_dir / "checkpoints")


def test_every_file_is_checked_truncation_and_bit_flips(tmp_path, tiny_model_dir, ner_files):
    folder = _checkpoint(tmp_path, tiny_model_dir, ner_files)
    files = sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file() and p.name != ckpt.COMPLETE)
    assert {"model.safetensors", "heads.safetensors", "optimizer.safetensors", "trainer_state.json",
            "rng.safetensors", "manifest.json", "tokenizer.json"} <= {f.as_posix() for f in files}
    for rel in files:
        for damage in ("truncate", "flip"):
            copy = tmp_path / f"copy-{damage}"
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(folder, copy)
            target = copy / rel
            data = bytearray(target.read_bytes())
            if damage == "truncate":
                data = data[: len(data) // 2]
            else:
                data[len(data) // 2] ^= 0x01
            target.write_bytes(bytes(data))
            with pytest.raises(ckpt.CheckpointError) as err:
                ckpt.verify(copy)
            assert str(target if rel.name != "manifest.json" else copy / "manifest.json") in str(err.value)


def test_unmarked_checkpoint_is_never_used_and_damaged_newest_falls_back(tmp_path, tiny_model_dir, ner_files):
    from routetune.runs import load_run

    folder = _checkpoint(tmp_path, tiny_model_dir, ner_files)
    root = folder.parent
    for _, other in ckpt.step_checkpoints(root):  # only the newest stays (the run also saved step 1)
        if other != folder:
            shutil.rmtree(other)
    older = root / "step-00000000"  # older than the real checkpoint
    shutil.copytree(folder, older)
    (folder / "heads.safetensors").write_bytes(b"garbage")
    assert ckpt.newest_valid(root) == older  # the damaged newer one is skipped, with a warning
    (older / ckpt.COMPLETE).unlink()
    with pytest.raises(ckpt.CheckpointError, match="no step checkpoint verifies"):
        ckpt.newest_valid(root)
    with pytest.raises(ckpt.CheckpointError):
        load_run(root.parent, "last")
    # its files still match its manifest: recovery completes it (never deletes it), and it is used again
    assert ckpt.recover(root)["completed"] == ["step-00000000"]
    assert ckpt.newest_valid(root) == older


@pytest.mark.parametrize("policy", ["abort", "skip"])
def test_non_finite_loss_policy(tmp_path, tiny_model_dir, ner_files, monkeypatch, policy):
    from routetune.model.routed import RoutedModel
    from routetune.training.engine import NonFiniteLoss
    from routetune.workflow import train

    real = RoutedModel.loss
    calls = {"n": 0}

    def flaky(self, name, objective, batch):
        calls["n"] += 1
        loss = real(self, name, objective, batch)
        return loss * float("nan") if calls["n"] >= 4 else loss

    monkeypatch.setattr(RoutedModel, "loss", flaky)
    cfg = make_config(tmp_path, tiny_model_dir, ner_files, **{
        "train.max_steps": 12, "train.nonfinite": policy, "train.max_skipped": 3, "train.save_every_steps": 2})
    with pytest.raises(NonFiniteLoss) as err:
        train(cfg)
    if policy == "abort":
        assert "step 4: non-finite loss nan" in str(err.value) and "source" in str(err.value)
        steps = [s for s, _ in ckpt.step_checkpoints(tmp_path / "runs" / "tiny" / "checkpoints")]
        assert steps == [1, 2]  # nothing saved after the bad step (step 1 is always saved)
    else:
        assert "3 consecutive skipped steps" in str(err.value) and "step 6" in str(err.value)
        events = [json.loads(x) for x in (tmp_path / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()]
        assert [e["step"] for e in events if e["event"] == "skipped"] == [4, 5, 6]


@pytest.mark.parametrize("method, precision", [("lora", "fp32"), ("adapter", "fp32"), ("lora", "bf16"),
                                               ("full", "bf16-weights")])
def test_adapter_runs_resume_bitwise(tmp_path, tiny_llama_dir, method, precision):
    """bf16: the frozen base held in bf16 (model.base_dtype auto), the adapters and their state in fp32;
    bf16-weights: every weight and its optimizer state in bf16 (model.base_dtype bf16)."""
    import yaml

    from support import GENERAL

    text = tmp_path / "t.txt"
    text.write_text(GENERAL)
    runs = {}
    for name, fault in (("ref", None), ("killed", "after_step:5")):
        cfg = {
            "sources": {"lm": {"objective": "causal-lm", "train": str(text), "text": {"stream": False}}},
            "model": {"name": str(tiny_llama_dir), "max_length": 24,
                      **({"base_dtype": "bf16"} if precision == "bf16-weights" else {})},
            "peft": {"method": method, **{"lora": {"r": 2}, "adapter": {"adapter_size": 4}}.get(method, {})},
            "train": {
                "precision": precision.removesuffix("-weights"),
                "device": "cpu",
                "max_steps": 8,
                "batch_size": 3,
                "lr": 1e-2,
                "progress": False,
                "save_every_steps": 4,
            },
            "run": {"name": "run", "output_dir": str(tmp_path / name)},
        }
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        proc = _cli("train", str(path), fault=fault, check=fault is None)
        run_dir = tmp_path / name / "run"
        if fault:
            assert proc.returncode == -9
            _cli("resume", str(run_dir))
        folder = run_dir / "checkpoints" / "step-00000008"
        ckpt.verify(folder)
        weights = {"lora": "adapter_model.safetensors", "adapter": "lm_trainable.safetensors"}.get(method,
                                                                                                    "model.safetensors")
        runs[name] = (load_file(str(folder / weights)), (run_dir / "plan.jsonl").read_text())
    assert runs["ref"][1] == runs["killed"][1]
    for k, v in runs["ref"][0].items():
        assert torch.equal(v, runs["killed"][0][k]), k
