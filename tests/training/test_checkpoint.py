"""Checkpoints that lie about their contents, adapters on a changed base, damaged run files:
each is refused (or, for a log line cut off by a kill, dropped) with one line naming the file."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest

from support import make_config, run_cli
from routetune.errors import ConfigError, ModelError, RunError
from routetune.training import checkpoint as ckpt


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir):
    from support import write_task_and_general
    from routetune.workflow import train

    root = tmp_path_factory.mktemp("integrity")
    files = write_task_and_general(root)
    run_dir, _ = train(make_config(root, tiny_model_dir, files, **{"train.max_steps": 3}))
    return run_dir


def _reseal(folder, manifest: dict) -> None:
    """Rewrite manifest + COMPLETE as a forger would, so that only the file-set rule can tell."""
    (folder / ckpt.MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    digest = hashlib.sha256((folder / ckpt.MANIFEST).read_bytes()).hexdigest()
    (folder / ckpt.COMPLETE).write_text(digest + "\n")


@pytest.mark.parametrize("drop", ["model.safetensors", "heads.json", "optimizer.safetensors", "rng.safetensors"])
def test_a_manifest_without_a_required_file_is_refused(tmp_path, run, drop):
    folder = tmp_path / "step-00000003"
    shutil.copytree(run / "checkpoints" / "step-00000003", folder)
    manifest = json.loads((folder / ckpt.MANIFEST).read_text())
    del manifest[drop]
    (folder / drop).unlink()
    _reseal(folder, manifest)
    with pytest.raises(ckpt.CheckpointError, match=rf"a full checkpoint must list {drop}"):
        ckpt.verify(folder)


def test_an_unlisted_file_is_refused(tmp_path, run):
    folder = tmp_path / "step-00000003"
    shutil.copytree(run / "checkpoints" / "step-00000003", folder)
    (folder / "extra.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(ckpt.CheckpointError, match=r"extra\.safetensors: file not in the checkpoint's manifest"):
        ckpt.verify(folder)


def test_an_adapter_refuses_a_changed_base(tmp_path, tiny_llama_dir):
    import yaml

    from support import GENERAL
    from routetune.model.routed import RoutedModel
    from routetune.workflow import train

    base = tmp_path / "base"
    shutil.copytree(tiny_llama_dir, base)
    text = tmp_path / "t.txt"
    text.write_text(GENERAL)
    cfg = {"model": {"name": str(base), "max_length": 24},
           "sources": {"lm": {"objective": "causal-lm", "train": str(text), "text": {"stream": False}}},
           "peft": {"method": "lora", "r": 2},
           "train": {"precision": "fp32", "device": "cpu", "max_steps": 2, "batch_size": 3, "progress": False},
           "run": {"name": "lora", "output_dir": str(tmp_path / "runs")}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    run_dir, _ = train(tmp_path / "c.yaml", run_test=False)
    folder = ckpt.run_checkpoint(run_dir, "last")
    assert json.loads((folder / "routetune.json").read_text())["base_digest"]
    RoutedModel.load(folder)  # the same base: loads
    from safetensors.torch import load_file, save_file

    weights = load_file(str(base / "model.safetensors"))
    name = next(iter(weights))
    weights[name] = weights[name] + 1  # someone replaced the base model's weights
    save_file(weights, str(base / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelError, match=r"routetune\.json: the base model at .* is not the one this checkpoint"):
        RoutedModel.load(folder)


def test_resume_drops_a_log_line_cut_off_by_a_kill(tmp_path, tiny_model_dir, ner_files):
    from routetune.workflow import resume_run, train

    path = make_config(tmp_path, tiny_model_dir, ner_files, **{"train.max_steps": 4, "train.save_every_steps": 2})
    run_dir, _ = train(path, run_test=False)
    (run_dir / "summary.json").unlink()  # as if killed before the end
    for name in ("metrics.jsonl", "plan.jsonl"):
        with (run_dir / name).open("a") as fh:
            fh.write('{"step": 9, "ev')  # a write cut short
    resume_run(run_dir, run_test=False)
    for name in ("metrics.jsonl", "plan.jsonl"):
        for line in (run_dir / name).read_text().splitlines():
            json.loads(line)


def test_a_damaged_log_line_elsewhere_names_file_and_line(tmp_path, tiny_model_dir, ner_files):
    from routetune.workflow import resume_run, train

    run_dir, _ = train(make_config(tmp_path, tiny_model_dir, ner_files, **{"train.max_steps": 2}), run_test=False)
    (run_dir / "summary.json").unlink()
    lines = (run_dir / "plan.jsonl").read_text().splitlines()
    (run_dir / "plan.jsonl").write_text("\n".join(["garbage", *lines]) + "\n")
    with pytest.raises(RunError, match=r"plan\.jsonl:1: not a JSON line"):
        resume_run(run_dir)


@pytest.mark.parametrize("text", ["model: [unclosed\n", "\xff\xfe binary", "just a string\n"])
def test_a_damaged_run_config_is_one_line(tmp_path, run, text):
    broken = tmp_path / "run"
    shutil.copytree(run, broken, ignore=shutil.ignore_patterns("checkpoints"))
    (broken / "config.yaml").write_bytes(text.encode("latin-1"))
    proc = run_cli("eval", str(broken), check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "config.yaml" in lines[0] and "Traceback" not in proc.stderr
    from routetune.config import config_from_run

    with pytest.raises(ConfigError):
        config_from_run(broken)


def test_permission_errors_are_one_line(monkeypatch, capsys, tmp_path):
    import routetune.cli as cli
    import routetune.workflow as workflow

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied", f"{tmp_path}/metrics.jsonl")

    monkeypatch.setattr(workflow, "resume_run", denied)
    monkeypatch.setattr("sys.argv", ["routetune", "resume", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path}/metrics.jsonl: Permission denied"
