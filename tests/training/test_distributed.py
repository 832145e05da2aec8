"""Data-parallel training (torch.distributed, gloo on the CPU): the same routed run on 1 and on 2
processes trains on the same plan and ends with the same weights; a 2-process run killed mid-way
resumes exactly on 2 processes and with the same remaining plan on 1."""

import json

import pytest
import torch
from safetensors.torch import load_file
from support import CUDA, cli_env, forkserver
from support.ddp import build_setting
from support.ddp import close as _close
from support.ddp import launch as _launch
from support.ddp import run as _run
from support.ddp import weights as _weights

from routetune.training import checkpoint as ckpt

@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    return build_setting(tmp_path_factory, "ddp")


def _shape(x):
    return {k: _shape(v) for k, v in x.items()} if isinstance(x, dict) else None  # the keys, at every level


@pytest.fixture(scope="module")
def one_and_two(setting):
    return _run(setting, "one")[0], _run(setting, "two", nproc=2)[0]


def test_two_processes_train_the_plan_of_one_to_the_same_weights(one_and_two):
    one, two = one_and_two
    assert (one / "plan.jsonl").read_text() == (two / "plan.jsonl").read_text()  # the global draws, step by step
    _close(_weights(one), _weights(two))
    s1, s2 = (json.loads((d / "summary.json").read_text()) for d in (one, two))
    assert s1["sources"] == s2["sources"] and s1["best"]["step"] == s2["best"]["step"]  # counted over all ranks
    assert s1["best"]["value"] == pytest.approx(s2["best"]["value"])
    assert (s1["hardware"]["processes"], s2["hardware"]["processes"]) == (1, 2)
    assert s2["hardware"]["backend"] == "gloo"
    s1.pop("wall_seconds"), s2.pop("wall_seconds")
    assert _shape(s1) == _shape(s2)
    last = ckpt.step_checkpoints(two / "checkpoints")[-1][1]
    assert (last / "rng-rank1.safetensors").is_file()  # every rank's random state, written by rank 0
    events = [json.loads(line)["event"] for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert events.count("start") == 1  # one writer


def test_accumulation_and_adaptive_routing_on_two_processes(setting):
    """Micro-batches per rank and the adaptive router's rewards (losses reduced over ranks)."""
    sets = ("routing.strategy=adaptive", "routing.granularity=batch", "routing.adaptive.update_every=2")
    one, _ = _run(setting, "adaptive-one", *sets)
    two, _ = _run(setting, "adaptive-two", *sets, "train.grad_accum=2", nproc=2)
    assert (one / "plan.jsonl").read_text() == (two / "plan.jsonl").read_text()
    _close(_weights(one), _weights(two))
    r1, r2 = (json.loads((ckpt.step_checkpoints(d / "checkpoints")[-1][1] / "trainer_state.json").read_text())
              ["batches"]["router"] for d in (one, two))
    assert r1["decisions"] == r2["decisions"] and r1["rewards"] != [0.0] * len(r1["rewards"])
    assert torch.allclose(torch.tensor(r1["rewards"]), torch.tensor(r2["rewards"]), atol=1e-6)


def test_a_retention_budget_on_two_processes_makes_the_plan_of_one(setting):
    """Rank 0 measures the budget's sample and every rank gets the value: the same measurements,
    shares and plan on 1 and 2 processes."""
    root, _ = setting
    sets = (f"evals={{gdev: {{path: {root / 'general.txt'}, split: dev}}}}",
            "routing.budget={measure: gdev, max_change: 0.01, every: 3, blocks: 4}")
    one, _ = _run(setting, "budget-one", *sets)
    two, _ = _run(setting, "budget-two", *sets, nproc=2)
    assert (one / "plan.jsonl").read_text() == (two / "plan.jsonl").read_text()
    t1, t2 = ([e for e in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if e["event"] == "budget"]
              for d in (one, two))
    assert [e["step"] for e in t1] == [e["step"] for e in t2] and len(t1) >= 3
    assert [e["share"] for e in t1] == pytest.approx([e["share"] for e in t2], abs=1e-6)
    assert [e["loss"] for e in t1] == pytest.approx([e["loss"] for e in t2], rel=1e-5)


def test_killed_on_two_resumes_exactly_on_two_and_with_the_same_plan_on_one(setting, one_and_two):
    one, two = one_and_two
    killed, proc = _run(setting, "killed", nproc=2, fault="after_step:8", check=False)
    assert proc.returncode != 0 and not (killed / "summary.json").exists()
    _launch("resume", str(killed), "--no-test", nproc=2)
    ref = ckpt.step_checkpoints(two / "checkpoints")[-1][1]
    got = ckpt.step_checkpoints(killed / "checkpoints")[-1][1]
    for name in ("model.safetensors", "heads.safetensors", "optimizer.safetensors", "rng.safetensors",
                 "rng-rank1.safetensors"):
        a, b = load_file(str(ref / name)), load_file(str(got / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name  # bitwise on gloo
    sa, sb = (json.loads((f / "trainer_state.json").read_text()) for f in (ref, got))
    sa.pop("train_seconds"), sb.pop("train_seconds")
    sa["logs"].pop("metrics.jsonl"), sb["logs"].pop("metrics.jsonl")  # the resumed run's also holds `resume` events
    assert sa == sb
    assert (killed / "plan.jsonl").read_text() == (two / "plan.jsonl").read_text()

    alone, _ = _run(setting, "killed-then-one", nproc=2, fault="after_step:8", check=False)
    _launch("resume", str(alone), "--no-test")  # one process continues the 2-process run
    assert (alone / "plan.jsonl").read_text() == (one / "plan.jsonl").read_text()
    _close(_weights(alone), _weights(one))
    sessions = json.loads((alone / "hardware.json").read_text())
    assert [s["processes"] for s in sessions] == [2, 1]


def test_a_rank_without_examples_gets_a_zero_weight_stand_in(tiny_tokenizer, tmp_path):
    from support.routing import _batches

    text = tmp_path / "t.txt"
    text.write_text("the apple store opened in paris . " * 50)
    ranks = [_batches(tiny_tokenizer, text, "iid", "example", r, 8) for r in range(8)]  # batch 6 < 8 ranks
    for _ in range(5):
        parts = [rank.next() for rank in ranks]
        assert all(p for p in parts)  # every rank has something to run
        real = [b for p in parts for b in p if not b.stand_in]
        assert sum(len(b.example_ids) for b in real) == 6  # the global batch, once
        assert all(b.example_ids == [] and b.n_tokens == 0 for p in parts for b in p if b.stand_in)


def _torchrun(*args, nproc: int):
    proc = forkserver.run("torch.distributed.run", ["--standalone", f"--nproc_per_node={nproc}", "-m", "routetune",
                                                    *args], cli_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_torchrun_with_one_process_takes_the_data_parallel_path(setting, one_and_two):
    """`torchrun -m routetune train` as the docs show it; one process in a process group."""
    one, _ = one_and_two
    root, cfg = setting
    _torchrun("train", str(cfg), "--no-test", "--set", "run.name=torchrun-one", nproc=1)
    run = root / "runs" / "torchrun-one"
    assert json.loads((run / "summary.json").read_text())["hardware"]["backend"] == "gloo"
    assert (run / "plan.jsonl").read_text() == (one / "plan.jsonl").read_text()
    _close(_weights(run), _weights(one))


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="no CUDA device on this machine")
def test_one_gpu_with_nccl_trains_the_plan_of_one_process(setting):
    one, _ = _run(setting, "gpu-alone", "train.device=cuda")
    root, cfg = setting
    _torchrun("train", str(cfg), "--no-test", "--set", "run.name=gpu-nccl", "--set", "train.device=cuda", nproc=1)
    run = root / "runs" / "gpu-nccl"
    assert json.loads((run / "summary.json").read_text())["hardware"]["backend"] == "nccl"
    assert (run / "plan.jsonl").read_text() == (one / "plan.jsonl").read_text()


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA or torch.cuda.device_count() < 2, reason="needs 2 CUDA devices for the nccl path")
def test_two_gpus_with_nccl_train_the_plan_of_one(setting):
    one, _ = _run(setting, "gpu-one", "train.device=cuda")
    two, _ = _run(setting, "gpu-two", "train.device=cuda", nproc=2)
    assert (one / "plan.jsonl").read_text() == (two / "plan.jsonl").read_text()
    assert json.loads((two / "summary.json").read_text())["hardware"]["backend"] == "nccl"
    a, b = _weights(one), _weights(two)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4  # GPU kernels vary with batch shapes


def test_lora_with_self_distillation_on_two_processes(setting):
    """A method that trains adapters only, and a teacher that is the model with them switched off,
    inside the DistributedDataParallel forward."""
    sets = ("peft.method=lora", "peft.r=4", "peft.dropout=0", "sources.general.distill=0.5", "train.lr=1e-2")
    one, _ = _run(setting, "lora-one", *sets)
    two, _ = _run(setting, "lora-two", *sets, nproc=2)
    assert (one / "plan.jsonl").read_text() == (two / "plan.jsonl").read_text()
    folders = [ckpt.step_checkpoints(d / "checkpoints")[-1][1] for d in (one, two)]
    _close(*(load_file(str(f / "adapter_model.safetensors")) for f in folders))
    _close(*(load_file(str(f / "heads.safetensors")) for f in folders))
