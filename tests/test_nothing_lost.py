"""Nothing a user made is ever deleted, nothing verified is deleted, and every refusal is one line
with exit status 2: the cases of an attack on the run folder and its logs, one test each
(numbered as in docs/reliability.md's table)."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from support import make_config, run_cli
from routetune.training import checkpoint as ckpt


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model_dir):
    """A tiny finished run with a step checkpoint every step (copied by each test that changes it)."""
    from support import write_task_and_general
    from routetune.workflow import train

    tmp = tmp_path_factory.mktemp("lost")
    files = write_task_and_general(tmp)
    path = make_config(tmp, tiny_model_dir, files, **{"train.max_steps": 6, "train.save_every_steps": 2,
                                                       "train.eval_every_steps": 2,
                                                       "train.keep_last": 3, "run.name": "c"})
    run_dir, _ = train(path, run_test=False)
    return path, run_dir


def _copy(finished, tmp_path, name="c"):
    """A copy of the finished run under tmp_path/runs/NAME and a config that names it."""
    import yaml

    path, run_dir = finished
    runs = tmp_path / "runs"
    shutil.copytree(run_dir, runs / name)
    cfg = yaml.safe_load(path.read_text())
    cfg["run"] = {"name": name, "output_dir": str(runs)}
    (runs / name / "config.yaml").write_text(yaml.safe_dump(cfg))  # the copy's own output_dir
    new = tmp_path / "c.yaml"
    new.write_text(yaml.safe_dump(cfg))
    return new, runs / name


def _unfinish(run_dir):
    """As if the run had been killed after its last checkpoint."""
    (run_dir / "summary.json").unlink()


def _one_line_exit_2(proc, *words):
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr and last.startswith("error: "), proc.stderr[-2000:]
    for w in words:
        assert w in last, last
    return last


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# 1. --overwrite onto a run folder in which the user added files
def test_1_overwrite_keeps_files_the_user_added_to_a_run(finished, tmp_path):
    config, run_dir = _copy(finished, tmp_path)
    (run_dir / "my-analysis.ipynb").write_text("{}")
    (run_dir / "continual.json").write_text("{}")  # a continual sequence writes it in its own folder, not a run's
    (run_dir / "plots").mkdir()
    (run_dir / "plots" / "fig.png").write_bytes(b"png")
    before = _files(run_dir)
    proc = run_cli("train", config, "--overwrite", check=False)
    last = _one_line_exit_2(proc, "holds files it did not write", "my-analysis.ipynb", "plots/fig.png",
                            "continual.json", "nothing was deleted")
    assert "--overwrite" in last
    assert _files(run_dir) == before


# 2. --overwrite onto folders that only resemble a run
@pytest.mark.parametrize("layout", ["config-only", "config-log-precious", "marked-precious"])
def test_2_overwrite_refuses_a_folder_that_only_resembles_a_run(finished, tmp_path, layout):
    config, run_dir = _copy(finished, tmp_path)
    if layout != "marked-precious":
        shutil.rmtree(run_dir)
        run_dir.mkdir()
        (run_dir / "config.yaml").write_text("model: x\n")
        if layout == "config-log-precious":
            (run_dir / "train.log").write_text("log\n")
            (run_dir / "checkpoints").mkdir()
            (run_dir / "checkpoints" / "precious.bin").write_bytes(b"\0" * 64)
    else:  # a real run (marker and all), but with a file of the user's among the checkpoints
        (run_dir / "checkpoints" / "precious.bin").write_bytes(b"\0" * 64)
        (run_dir / "checkpoints" / "step-00000006" / "notes.txt").write_text("mine")
    before = _files(run_dir)
    proc = run_cli("train", config, "--overwrite", check=False)
    _one_line_exit_2(proc, "nothing was deleted")
    assert _files(run_dir) == before


def test_overwrite_deletes_exactly_the_inventory_of_the_old_run(finished, tmp_path):
    """What --overwrite deletes is what a run writes: after it, no old file is left anywhere."""
    from routetune.runs import inventory

    _, run_dir = _copy(finished, tmp_path)
    ours, foreign = inventory(run_dir)
    assert not foreign and {p.name for p in ours} >= {"config.yaml", "metrics.jsonl", "model.safetensors",
                                                      "manifest.json", "COMPLETE", ".routetune-run"}
    (run_dir / "checkpoints" / "step-00000006" / "extra.txt").write_text("x")
    assert [p.name for p in inventory(run_dir)[1]] == ["extra.txt"]


# 3. resume of a run whose newest checkpoint lacks only its COMPLETE marker
def test_3_a_verified_checkpoint_without_its_marker_is_completed_not_deleted(finished, tmp_path):
    _, run_dir = _copy(finished, tmp_path)
    _unfinish(run_dir)
    newest = run_dir / "checkpoints" / "step-00000006"
    (newest / ckpt.COMPLETE).unlink()
    weights = (newest / "model.safetensors").read_bytes()
    proc = run_cli("resume", run_dir, "--no-test", check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "marked complete: step-00000006" in proc.stderr
    assert (newest / ckpt.COMPLETE).is_file() and (newest / "model.safetensors").read_bytes() == weights
    assert "resumed from step-00000006 at step 6" in proc.stderr


def test_a_damaged_unmarked_checkpoint_is_kept_and_not_used(finished, tmp_path):
    _, run_dir = _copy(finished, tmp_path)
    newest = run_dir / "checkpoints" / "step-00000006"
    (newest / ckpt.COMPLETE).unlink()
    (newest / "heads.safetensors").write_bytes(b"cut")
    done = ckpt.recover(run_dir / "checkpoints")
    assert done["kept"] == ["step-00000006"] and newest.is_dir() and (newest / "heads.safetensors").is_file()
    assert ckpt.newest_valid(run_dir / "checkpoints").name == "step-00000004"


def test_a_kill_between_the_two_renames_of_best_puts_the_old_best_back(finished, tmp_path):
    _, run_dir = _copy(finished, tmp_path)
    root = run_dir / "checkpoints"
    os.replace(root / "best", root / ".old-best-4242")
    shutil.copytree(root / ".old-best-4242", root / ".tmp-best-4242")
    (root / ".tmp-best-4242" / ckpt.COMPLETE).unlink()
    done = ckpt.recover(root)
    assert done["restored"] == ["best"] and done["removed"] == [".tmp-best-4242"]
    ckpt.verify(root / "best")


# 4. metrics.jsonl / plan.jsonl cut in the middle
@pytest.mark.parametrize("log", ["metrics.jsonl", "plan.jsonl"])
def test_4_resume_refuses_a_log_cut_in_the_middle(finished, tmp_path, log):
    _, run_dir = _copy(finished, tmp_path)
    _unfinish(run_dir)
    data = (run_dir / log).read_bytes()
    (run_dir / log).write_bytes(data[: len(data) // 3])  # a third: before what the step-6 checkpoint saw
    before = _files(run_dir)
    proc = run_cli("resume", run_dir, "--no-test", check=False)
    _one_line_exit_2(proc, f"{log}:", "bytes short", "cut or edited")
    after = _files(run_dir)
    assert "bytes short" in after["train.log"].decode()  # the refusal is recorded in the run's log
    for appended in (".lock", "train.log", "hardware.json"):  # the lock's holder; the session's records
        after.pop(appended, None), before.pop(appended, None)
    assert after == before  # nothing cut further, no checkpoint touched


def test_a_line_cut_at_the_end_by_a_kill_is_repaired(finished, tmp_path):
    _, run_dir = _copy(finished, tmp_path)
    _unfinish(run_dir)
    with (run_dir / "plan.jsonl").open("a") as fh:
        fh.write('{"step": 7, "source": "ner", "ids": [1,')  # a kill mid-write, after the last checkpoint
    proc = run_cli("resume", run_dir, "--no-test", check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    steps = [json.loads(line)["step"] for line in (run_dir / "plan.jsonl").read_text().splitlines()]
    assert steps[-1] == 6 and "ids" in (run_dir / "plan.jsonl").read_text().splitlines()[-1]


# 7. disk full during a checkpoint write
def test_7_disk_full_is_one_line_in_the_terminal_and_in_train_log(finished, tmp_path):
    config, run_dir = _copy(finished, tmp_path)
    shutil.rmtree(run_dir)
    proc = run_cli("train", config, "--no-test", fault="disk_full:2", check=False)
    last = _one_line_exit_2(proc, "no space left on the device", "checkpoint step-00000002", "MB free",
                            "routetune resume")
    assert last.removeprefix("error: ") in (run_dir / "train.log").read_text()
    root = run_dir / "checkpoints"
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp-")]  # the partial write is gone
    ckpt.verify(root / "step-00000001")  # the checkpoint before it is intact
    proc = run_cli("resume", run_dir, "--no-test", check=False)  # space freed: the run continues
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_safetensors_disk_full_errors_are_recognised():
    assert ckpt._no_space(Exception('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                    'message: "No space left on device" })'))
    assert not ckpt._no_space(Exception("some other error"))


# 8. --overwrite onto a symbolic link to a run folder
def test_8_overwrite_refuses_a_symbolic_link(finished, tmp_path):
    import yaml

    config, run_dir = _copy(finished, tmp_path, name="real")
    link = run_dir.parent / "c"
    link.symlink_to(run_dir, target_is_directory=True)
    cfg = yaml.safe_load(config.read_text())
    cfg["run"]["name"] = "c"  # the config names the link
    config.write_text(yaml.safe_dump(cfg))
    before = _files(run_dir)
    proc = run_cli("train", config, "--overwrite", check=False)
    _one_line_exit_2(proc, "symbolic link", "nothing was deleted")
    assert link.is_symlink() and _files(run_dir) == before


# 9. resume without labels.json; 10. resume with a damaged log line
@pytest.mark.parametrize("damage", ["no-labels", "step-x", "summary-cut"])
def test_9_10_damaged_run_files_are_one_line(finished, tmp_path, damage):
    _, run_dir = _copy(finished, tmp_path)
    if damage == "no-labels":
        _unfinish(run_dir)
        (run_dir / "labels.json").unlink()
        words = ("labels.json: missing", "heads.json")
    elif damage == "step-x":
        _unfinish(run_dir)
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        event = json.loads(lines[1])
        event["step"] = "x"
        lines[1] = json.dumps(event)
        (run_dir / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
        words = ("metrics.jsonl:2:", "expected a whole number")
    else:
        (run_dir / "summary.json").write_text('{"run": "c", "ste')
        words = ("summary.json: not valid JSON",)
    _one_line_exit_2(run_cli("resume", run_dir, "--no-test", check=False), *words)


# 11. a run hidden as .replaced-NAME-PID-TIME by a kill during --overwrite
def test_11_resume_and_eval_name_a_hidden_replaced_copy(finished, tmp_path):
    _, run_dir = _copy(finished, tmp_path)
    hidden = run_dir.parent / ".replaced-c-1234-1700000000"
    os.replace(run_dir, hidden)
    run_dir.mkdir()  # the new run, killed before its first checkpoint
    (run_dir / ".routetune-run").write_text("{}\n")
    shutil.copy(hidden / "config.yaml", run_dir / "config.yaml")
    for cmd in (["resume", run_dir, "--no-test"], ["eval", run_dir]):
        _one_line_exit_2(run_cli(*cmd, check=False), str(hidden), "mv")


# 13. signatures: a manifest recomputed by whoever changed the weights is refused by --require-signed
def test_13_signed_checkpoints(finished, tmp_path, monkeypatch):
    from routetune.errors import RoutetuneError
    from routetune.serve.server import check_signed
    from routetune.training.checkpoint import SIGNATURE, SIGNING_KEY_ENV, sign

    _, run_dir = _copy(finished, tmp_path)
    best = run_dir / "checkpoints" / "best"
    monkeypatch.delenv(SIGNING_KEY_ENV, raising=False)
    with pytest.raises(RoutetuneError, match="not set"):
        check_signed(run_dir, "best")
    monkeypatch.setenv(SIGNING_KEY_ENV, "the user's key")
    with pytest.raises(RoutetuneError, match="was not signed"):
        check_signed(run_dir, "best")
    assert sign(best)
    check_signed(run_dir, "best")
    # swap the weights and recompute the manifest and marker, as a tamperer would: digests pass, signature fails
    (best / "heads.safetensors").write_bytes((best / "heads.safetensors").read_bytes()[:-4] + b"\0\0\0\0")
    manifest = json.loads((best / ckpt.MANIFEST).read_text())
    manifest["heads.safetensors"] = ckpt._sha256(best / "heads.safetensors")
    (best / ckpt.MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    (best / ckpt.COMPLETE).write_text(ckpt._sha256(best / ckpt.MANIFEST) + "\n")
    ckpt.verify(best)  # the digests alone cannot tell
    with pytest.raises(RoutetuneError, match="does not match the manifest under this key"):
        check_signed(run_dir, "best")
    monkeypatch.setenv(SIGNING_KEY_ENV, "another key")
    sign(best)
    monkeypatch.setenv(SIGNING_KEY_ENV, "the user's key")
    with pytest.raises(RoutetuneError, match="signed with another key"):
        check_signed(run_dir, "best")
    assert (best / SIGNATURE).is_file()


def test_training_with_a_key_signs_every_checkpoint(tmp_path, tiny_model_dir, ner_files, monkeypatch):
    from routetune.serve.server import check_signed
    from routetune.training.checkpoint import SIGNING_KEY_ENV
    from routetune.workflow import train

    monkeypatch.setenv(SIGNING_KEY_ENV, "k")
    run_dir, _ = train(make_config(tmp_path, tiny_model_dir, ner_files, **{"train.max_steps": 2}), run_test=False)
    for folder in (run_dir / "checkpoints").iterdir():
        ckpt.verify(folder)  # a signature is not a file of the manifest's
        assert (folder / ckpt.SIGNATURE).is_file()
    check_signed(run_dir, "best")
    check_signed(run_dir, "last")


def test_a_killed_atomic_write_s_temporary_file_is_the_run_s_own(finished, tmp_path):
    """A kill inside files.write_text_atomic leaves NAME.tmp: routetune's, so --overwrite may replace it."""
    from routetune.runs import inventory

    _, run_dir = _copy(finished, tmp_path)
    (run_dir / "labels.json.tmp").write_text("{")
    ours, foreign = inventory(run_dir)
    assert run_dir / "labels.json.tmp" in ours and not foreign


def test_removing_a_run_s_files_leaves_a_folder_someone_else_made(finished, tmp_path):
    from routetune.runs import remove_own

    _, run_dir = _copy(finished, tmp_path)
    (run_dir / "checkpoints" / "mine").mkdir()  # empty, made by someone else after the check
    (run_dir / "elsewhere").mkdir()
    left = remove_own(run_dir)
    assert left  # the empty folders are not the run's
    assert (run_dir / "checkpoints" / "mine").is_dir() and (run_dir / "elsewhere").is_dir()
    assert not [p for p in run_dir.rglob("*") if p.is_file()]  # every file of the run is gone
