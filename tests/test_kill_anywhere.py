"""Kills at moments no hook chose: a timer SIGKILLs `routetune train` (and then each `resume`) at
seeded random times, inside steps and inside checkpoint writes; the run is resumed until it
finishes and its final checkpoint must equal an uninterrupted run's in every state tensor:
weights, optimizer, scheduler, router and source cursors, early stopping, RNG."""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

from support import forkserver
import pytest
from safetensors.torch import load_file

from support import cli_env, make_config, run_cli
from routetune.training import checkpoint as ckpt

STEPS = 10
TIMING = ("train_seconds",)  # wall-clock, the one field that may differ
# a resumed run's metrics.jsonl also holds its `resume` events, so its length differs; plan.jsonl's may not


def _config(root: Path, model_dir, files, name: str, **extra) -> Path:
    return make_config(
        root / name,
        model_dir,
        files,
        **{
            "train.max_steps": STEPS,
            "train.save_every_steps": 1,
            "train.keep_last": 3,
            "train.batch_size": 3,
            "train.lr": 5e-3,
            "train.eval_each_epoch": False,
            "run.name": "run",
            "run.output_dir": str(root / name / "runs"),
            "routing.weights": {"ner": 0.6, "general": 0.4},
            **extra,
        },
    )


def final_state(run_dir: Path) -> dict:
    folder = run_dir / "checkpoints" / f"step-{STEPS:08d}"
    ckpt.verify(folder)
    out = {}
    for f in sorted(folder.iterdir()):
        if f.suffix == ".safetensors":
            out[f.name] = load_file(str(f))
        elif f.name in ("optimizer.json", "trainer_state.json"):
            state = json.loads(f.read_text())
            for key in TIMING:
                state.pop(key, None)
            state.get("logs", {}).pop("metrics.jsonl", None)
            out[f.name] = state
    out["plan"] = (run_dir / "plan.jsonl").read_text()
    return out


def assert_equal_states(a: dict, b: dict) -> None:
    import torch

    assert a.keys() == b.keys()
    for name in a:
        if name.endswith(".safetensors"):
            assert a[name].keys() == b[name].keys(), name
            for k in a[name]:
                assert torch.equal(a[name][k], b[name][k]), f"{name}:{k}"
        else:
            assert a[name] == b[name], name


def _launch(args: list[str], run_dir: Path, delay: float | None) -> tuple[int, float]:
    """Run `routetune ARGS`; once it trains (plan.jsonl grows), wait `delay` seconds and SIGKILL
    it (None: let it finish). Returns (exit code, seconds it spent training)."""
    plan = run_dir / "plan.jsonl"
    size = plan.stat().st_size if plan.is_file() else 0
    proc = forkserver.popen("routetune.cli", args, cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None and not (plan.is_file() and plan.stat().st_size > size):
        time.sleep(0.01)
    started = time.perf_counter()
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return proc.returncode, time.perf_counter() - started


def run_with_random_kills(cfg: Path, run_dir: Path, seed: int, train_s: float, kills: int = 2) -> list:
    """Kill the first process and the resumes at seeded random moments of their training, then let
    the run finish. A first kill that lands before the first checkpoint (nothing to resume) or after
    the end (this run trained faster than the reference, or the kill came after summary.json was
    written) is tried again, later or earlier, so that the run is always resumed at least once."""
    rng = random.Random(seed)
    # within the first 60% of the reference's training time: a kill after the end proves nothing
    delay = rng.uniform(0, 0.6 * train_s)
    codes = []
    for _ in range(4):
        if run_dir.exists():  # (with --overwrite, _launch would wait for the new plan to outgrow the old one)
            shutil.rmtree(run_dir)
        codes.append(_launch(["train", str(cfg), "--no-test"], run_dir, delay)[0])
        finished = codes[-1] == 0 or (run_dir / "summary.json").is_file()  # a kill after the summary is the end
        if not finished and ckpt.step_checkpoints(run_dir / "checkpoints"):
            break  # killed mid-run, with a checkpoint to resume from
        delay = delay / 3 if finished else min(2 * delay + 0.05 * train_s, 0.6 * train_s)
    for _ in range(kills - 1):
        if (run_dir / "summary.json").is_file() or not ckpt.step_checkpoints(run_dir / "checkpoints"):
            break
        codes.append(_launch(["resume", str(run_dir), "--no-test"], run_dir, rng.uniform(0, 0.5 * train_s))[0])
    if not (run_dir / "summary.json").is_file():
        run_cli("resume", str(run_dir), "--no-test")
    return codes


def resumes(run_dir: Path) -> int:
    """How many times the run was resumed (its `resume` events)."""
    return sum(json.loads(line)["event"] == "resume" for line in (run_dir / "metrics.jsonl").read_text().splitlines())


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir):
    from support import write_task_and_general

    root = tmp_path_factory.mktemp("kill-ref")
    files = write_task_and_general(root)
    cfg = _config(root, tiny_model_dir, files, "ref")
    run_dir = root / "ref" / "runs" / "run"
    code, train_s = _launch(["train", str(cfg), "--no-test"], run_dir, None)
    assert code == 0
    return files, final_state(run_dir), train_s


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_sigkills_resume_with_every_state_equal(tmp_path, tiny_model_dir, reference, seed):
    files, ref, train_s = reference
    cfg = _config(tmp_path, tiny_model_dir, files, "killed")
    run_dir = tmp_path / "killed" / "runs" / "run"
    codes = run_with_random_kills(cfg, run_dir, seed, train_s)
    assert -signal.SIGKILL in codes  # at least one kill landed mid-run
    assert resumes(run_dir) >= 1  # and the run was resumed from a checkpoint, not trained again
    assert_equal_states(final_state(run_dir), ref)


@pytest.mark.parametrize("fault", ["in_write:4", "in_checkpoint:7", "after_step:1"])
def test_kill_inside_a_checkpoint_write_resumes_with_every_state_equal(tmp_path, tiny_model_dir, reference, fault):
    files, ref, _ = reference
    cfg = _config(tmp_path, tiny_model_dir, files, "killed")
    run_dir = tmp_path / "killed" / "runs" / "run"
    assert run_cli("train", str(cfg), "--no-test", fault=fault, check=False).returncode == -9
    leftovers = [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    assert bool(leftovers) == fault.startswith("in_"), leftovers  # a half-written folder, never used
    run_cli("resume", str(run_dir), "--no-test")
    assert resumes(run_dir) == 1
    assert_equal_states(final_state(run_dir), ref)


@pytest.mark.slow
def test_random_sigkills_on_the_real_minilm(tmp_path):
    """The same on the real minilm-l6 (22.7M parameters, a 90 MB checkpoint per step)."""
    from support import GENERAL, write_ner

    files = write_ner(tmp_path / "ner")
    (tmp_path / "general.txt").write_text(GENERAL)
    files["general"] = tmp_path / "general.txt"
    extra = {"model.name": "minilm-l6", "train.save_every_steps": 2, "train.keep_last": 2}
    ref_cfg = _config(tmp_path, "minilm-l6", files, "ref", **extra)
    _, train_s = _launch(["train", str(ref_cfg), "--no-test"], tmp_path / "ref" / "runs" / "run", None)
    ref = final_state(tmp_path / "ref" / "runs" / "run")
    for seed in (11, 12):
        cfg = _config(tmp_path, "minilm-l6", files, f"killed{seed}", **extra)
        run_dir = tmp_path / f"killed{seed}" / "runs" / "run"
        run_with_random_kills(cfg, run_dir, seed, train_s)
        assert resumes(run_dir) >= 1
        assert_equal_states(final_state(run_dir), ref)
