"""Run folders: nothing routetune did not write is ever deleted; one process per run folder;
a finished run is not re-run; an export never touches its output before it is complete."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from support import make_config, run_cli
from routetune.config import load_config
from routetune.errors import ConfigError, RunError
from routetune.runs import MARKER, RunLock, claim


@pytest.mark.parametrize("name", ["/tmp/elsewhere", "../up", "a/b", "..", "."])
def test_run_name_is_one_folder_name(tmp_path, tiny_model_dir, ner_files, name):
    path = make_config(tmp_path, tiny_model_dir, ner_files, **{"run.name": name})
    with pytest.raises(ConfigError, match=r"tiny\.yaml:\d+: run\.name: expected one folder name .*run\.output_dir"):
        load_config(path)


def test_overwrite_refuses_a_folder_routetune_did_not_write(tmp_path, tiny_model_dir, ner_files):
    mine = tmp_path / "runs" / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "important.txt").write_text("keep me")
    (mine / "sub" / "notes.md").write_text("and me")
    path = make_config(
        tmp_path, tiny_model_dir, ner_files, **{"run.name": "mine", "run.output_dir": str(tmp_path / "runs")}
    )
    proc = run_cli("train", str(path), "--overwrite", check=False)
    assert proc.returncode == 2
    assert "replaces only a run folder routetune wrote" in proc.stderr and "nothing was deleted" in proc.stderr
    assert (mine / "important.txt").read_text() == "keep me" and (mine / "sub" / "notes.md").is_file()
    assert sorted(p.name for p in mine.iterdir()) == ["important.txt", "sub"]


def test_overwrite_replaces_a_run_and_removes_the_old_one_after_the_first_checkpoint(tmp_path, tiny_model_dir,
                                                                                     ner_files):
    from routetune.workflow import train

    path = make_config(tmp_path, tiny_model_dir, ner_files, **{"train.max_steps": 3})
    run_dir, _ = train(path)
    (run_dir / "metrics.jsonl").write_text("old\n")
    seen = {}
    import routetune.training.engine as engine

    original = engine.Trainer.save

    def spy(self, step, final=False):  # before the first checkpoint of the new run the old one waits aside
        if step == 1:
            seen["aside"] = [p.name for p in run_dir.parent.iterdir() if p.name.startswith(".replaced-")]
        original(self, step, final)
        if step == 1:
            seen["after"] = [p.name for p in run_dir.parent.iterdir() if p.name.startswith(".replaced-")]

    engine.Trainer.save = spy
    try:
        train(path, overwrite=True)
    finally:
        engine.Trainer.save = original
    assert len(seen["aside"]) == 1 and seen["after"] == []
    assert (run_dir / MARKER).is_file() and "old" not in (run_dir / "metrics.jsonl").read_text()


def test_a_failed_overwrite_puts_the_previous_run_back(tmp_path, tiny_model_dir, ner_files, monkeypatch):
    from routetune.training.engine import Trainer
    from routetune.workflow import train

    path = make_config(tmp_path, tiny_model_dir, ner_files, **{"train.max_steps": 3})
    run_dir, _ = train(path)
    before = {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"}

    def boom(self, step, parts):
        raise RuntimeError("the new run breaks at its first step")

    monkeypatch.setattr(Trainer, "train_step", boom)
    with pytest.raises(RuntimeError, match="breaks"):
        train(path, overwrite=True)
    after = {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before
    assert not [p for p in run_dir.parent.iterdir() if p.name.startswith(".replaced-")]


def test_claim_of_a_fresh_folder_marks_it(tmp_path):
    c = claim(tmp_path / "new", overwrite=False)
    assert (tmp_path / "new" / MARKER).is_file() and c.aside is None


def test_a_second_process_cannot_use_a_live_run(tmp_path, tiny_model_dir, ner_files):
    from routetune.workflow import resume_run, train

    path = make_config(tmp_path, tiny_model_dir, ner_files, **{"train.max_steps": 3, "train.save_every_steps": 1})
    run_dir, _ = train(path, run_test=False)
    (run_dir / "summary.json").unlink()  # as if it were still running
    (run_dir / "checkpoints" / ".tmp-step-00000004-99999").mkdir()  # a live writer's half-written checkpoint
    with RunLock(run_dir):
        with pytest.raises(RunError, match=r"the run folder is in use \(pid \d+ on .*\)"):
            resume_run(run_dir)
        proc = run_cli("train", str(path), "--overwrite", check=False)
        assert proc.returncode == 2 and "in use" in proc.stderr
    assert (run_dir / "checkpoints" / ".tmp-step-00000004-99999").is_dir()  # untouched while locked


def test_the_lock_of_a_killed_process_is_released(tmp_path):
    code = ("import sys, time; sys.path.insert(0, %r); from routetune.runs import RunLock; "
            "lock = RunLock(%r).acquire(); print('locked', flush=True); time.sleep(60)") % (
        str(os.path.join(os.path.dirname(__file__), "..", "src")), str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    with pytest.raises(RunError, match="in use"):
        RunLock(tmp_path).acquire()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with RunLock(tmp_path):  # the kernel dropped the dead process's lock: no stale-lock cleanup needed
        pass


def test_resume_of_a_finished_run_changes_nothing(tmp_path, tiny_model_dir, ner_files):
    from routetune.workflow import train

    path = make_config(tmp_path, tiny_model_dir, ner_files, **{"train.max_steps": 3})
    run_dir, _ = train(path)
    files = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"}
    proc = run_cli("resume", str(run_dir))
    assert proc.returncode == 0 and "nothing to resume" in proc.stderr
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files} == files


def test_a_kill_right_after_the_first_step_can_resume(tmp_path, tiny_model_dir, ner_files):
    out = {}
    for name, fault in (("ref", None), ("killed", "after_step:1")):
        path = make_config(tmp_path / name, tiny_model_dir, ner_files, **{
            "train.max_steps": 6, "train.eval_each_epoch": False, "run.output_dir": str(tmp_path / name / "runs")})
        proc = run_cli("train", str(path), "--no-test", fault=fault, check=fault is None)
        run_dir = tmp_path / name / "runs" / "tiny"
        if fault:
            assert proc.returncode == -9
            assert (run_dir / "checkpoints" / "step-00000001" / "COMPLETE").is_file()
            run_cli("resume", str(run_dir), "--no-test")
        out[name] = (run_dir / "plan.jsonl").read_text()
    assert out["ref"] == out["killed"]


def test_time_based_checkpoints(tmp_path, tiny_model_dir, ner_files):
    from routetune.workflow import train

    path = make_config(tmp_path, tiny_model_dir, ner_files, **{
        "train.max_steps": 5, "train.eval_each_epoch": False, "train.keep_last": 10,
        "train.save_every_minutes": 1e-9})  # due after every step
    run_dir, _ = train(path, run_test=False)
    steps = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert steps == [f"step-{i:08d}" for i in range(1, 6)]


def test_export_never_touches_what_it_does_not_own(tmp_path, tiny_model_dir, ner_files):
    from routetune.export import EXPORT_MARKER, export
    from routetune.workflow import train

    run_dir, _ = train(make_config(tmp_path, tiny_model_dir, ner_files, **{"train.max_steps": 2}))
    user = tmp_path / "user"
    user.mkdir()
    (user / "important.txt").write_text("keep")
    with pytest.raises(RunError, match="replaces only an earlier routetune export.*nothing was changed"):
        export(run_dir, user, overwrite=True)
    assert [p.name for p in user.iterdir()] == ["important.txt"]

    out = tmp_path / "hf"
    export(run_dir, out)
    assert (out / EXPORT_MARKER).is_file() and (out / "lm" / "config.json").is_file()
    stamp = (out / "lm" / "config.json").stat().st_mtime_ns
    with pytest.raises(RunError, match="no such run folder"):  # a failing export leaves the old one whole
        export(tmp_path / "missing", out, overwrite=True)
    assert (out / "lm" / "config.json").stat().st_mtime_ns == stamp
    time.sleep(0.01)
    export(run_dir, out, overwrite=True)
    assert (out / "lm" / "config.json").stat().st_mtime_ns != stamp
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".tmp-export", ".old-export"))]
