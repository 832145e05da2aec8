"""Sharded training (train.distributed.strategy=fsdp: PyTorch's FSDP2 on gloo, CPU processes): the
same routed run on 1 process and sharded over 2 ends with the same weights and the same optimizer
state (a gradient summed over ranks instead of averaged would double Adam's first moment); its
checkpoints (written in shards, the last gathered) resume bitwise on 2 processes and
continue on 1, a 1-process run continues sharded on 2, and a kill inside a sharded save loses nothing;
what sharding cannot do is refused."""

import json

import pytest
import torch
from safetensors.torch import load_file
from support.ddp import build_setting, close, launch, run, weights

from routetune.training import checkpoint as ckpt

FSDP = "train.distributed.strategy=fsdp"


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    return build_setting(tmp_path_factory, "fsdp")


@pytest.fixture(scope="module")
def common(setting):
    """A general-text eval (the base scored before training, the run after it) and no clipping (a
    clipped gradient hides its scale: a sum over ranks would clip to the same update)."""
    root, _ = setting
    return f"evals={{gdev: {{path: {root / 'general.txt'}, split: dev}}}}", "train.max_grad_norm=null"


@pytest.fixture(scope="module")
def one_and_sharded(setting, common):
    return run(setting, "one", *common)[0], run(setting, "sharded", *common, FSDP, nproc=2)[0]


def _optimizer(run_dir):
    return load_file(str(ckpt.step_checkpoints(run_dir / "checkpoints")[-1][1] / "optimizer.safetensors"))


def test_two_sharded_processes_train_the_weights_and_optimizer_state_of_one(one_and_sharded):
    one, two = one_and_sharded
    assert (one / "plan.jsonl").read_text() == (two / "plan.jsonl").read_text()
    close(weights(one), weights(two))  # full fine-tuning of a BERT with tied input/output embeddings
    a, b = _optimizer(one), _optimizer(two)  # the checkpoint of one process, gathered from the shards
    assert a.keys() == b.keys() and any(k.endswith("exp_avg") for k in a)
    for k in a:  # gradients that cancel to ~1e-13 (a bias before a norm) are rounding on both sides
        assert (a[k] - b[k]).abs().max() <= 1e-4 * a[k].abs().max() + 1e-9, k
    first = [k for k in a if k.endswith("exp_avg")]
    ratio = sum(b[k].abs().sum() for k in first) / sum(a[k].abs().sum() for k in first)
    assert ratio == pytest.approx(1.0, abs=1e-4)  # a gradient summed over 2 ranks would make this 2
    s1, s2 = (json.loads((d / "summary.json").read_text()) for d in (one, two))
    assert s1["best"]["step"] == s2["best"]["step"] and s1["best"]["value"] == pytest.approx(s2["best"]["value"])
    for key in ("before", "dev"):  # the base scored by rank 0 from the gathered weights, the best checkpoint after
        assert s1[key]["gdev"] == pytest.approx(s2[key]["gdev"], rel=1e-4), key
    assert s2["hardware"]["processes"] == 2 and s1["parameters"] == s2["parameters"]
    losses = [[e["sources"] for e in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
               if e["event"] == "train"] for d in (one, two)]
    flat = [[s["loss"] for step in run_ for s in step.values() if s.get("loss") is not None] for run_ in losses]
    assert flat[0] == pytest.approx(flat[1], rel=1e-5) and flat[0]


def test_sharded_resume_is_exact_on_two_and_continues_on_one_and_from_one(setting, common, one_and_sharded):
    one, two = one_and_sharded
    killed, proc = run(setting, "fsdp-killed", *common, FSDP, nproc=2, fault="after_step:8", check=False)
    assert proc.returncode != 0 and not (killed / "summary.json").exists()
    launch("resume", str(killed), "--no-test", nproc=2)
    ref, got = (ckpt.step_checkpoints(d / "checkpoints")[-1][1] for d in (two, killed))
    for name in ("model.safetensors", "heads.safetensors", "optimizer.safetensors"):
        a, b = load_file(str(ref / name)), load_file(str(got / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name  # bitwise on gloo

    alone, _ = run(setting, "fsdp-then-one", *common, FSDP, nproc=2, fault="after_step:8", check=False)
    launch("resume", str(alone), "--no-test")  # 2 -> 1: the sharded checkpoint is one process's
    assert (alone / "plan.jsonl").read_text() == (one / "plan.jsonl").read_text()
    close(weights(alone), weights(one))

    grown, _ = run(setting, "one-then-fsdp", *common, FSDP, fault="after_step:8", check=False)
    launch("resume", str(grown), "--no-test", nproc=2)  # 1 -> 2: each rank takes its slice
    assert (grown / "plan.jsonl").read_text() == (one / "plan.jsonl").read_text()
    close(weights(grown), weights(one))
    assert [s["processes"] for s in json.loads((grown / "hardware.json").read_text())] == [1, 2]


def test_lora_with_self_distillation_and_accumulation_sharded(setting):
    """Adapters only in the optimizer, the frozen base sharded, a teacher that is the model with its
    adapters off (inside the sharded forward), micro-batches that reduce once per step."""
    sets = ("peft.method=lora", "peft.r=4", "peft.dropout=0", "sources.general.distill=0.5", "train.lr=1e-2")
    one, _ = run(setting, "fsdp-lora-one", *sets)
    two, _ = run(setting, "fsdp-lora-two", *sets, FSDP, "train.grad_accum=2", nproc=2)
    assert (one / "plan.jsonl").read_text() == (two / "plan.jsonl").read_text()
    folders = [ckpt.step_checkpoints(d / "checkpoints")[-1][1] for d in (one, two)]
    close(*(load_file(str(f / "adapter_model.safetensors")) for f in folders))
    close(*(load_file(str(f / "heads.safetensors")) for f in folders))
    a, b = (load_file(str(f / "optimizer.safetensors")) for f in folders)
    assert a.keys() == b.keys() and len(a) == 3 * 15  # 8 adapter matrices and 7 head tensors, not the 44 of the model
    # killed after a sharded step checkpoint (adapters and heads only: the frozen base is not in it), resumed
    killed, _ = run(setting, "fsdp-lora-killed", *sets, FSDP, "train.grad_accum=2", nproc=2, fault="after_step:8",
                    check=False)
    shards = ckpt.step_checkpoints(killed / "checkpoints")[-1][1]
    from torch.distributed.checkpoint import FileSystemReader
    saved = [k for k in FileSystemReader(str(shards / "sharded")).read_metadata().state_dict_metadata
             if k.startswith("model.")]
    assert ckpt.is_sharded(shards) and len(saved) == 16 and sum("lora_" in k for k in saved) == 8  # and 8 head names
    assert not any("embeddings" in k or "base_layer" in k or "decoder.weight" in k for k in saved)  # a tied alias too
    launch("resume", str(killed), "--no-test", nproc=2)
    last = ckpt.step_checkpoints(killed / "checkpoints")[-1][1]
    for name in ("adapter_model.safetensors", "heads.safetensors"):
        x, y = load_file(str(folders[1] / name)), load_file(str(last / name))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name


@pytest.mark.parametrize("sets, expected", [
    ((FSDP, "model.quantize=nf4", "peft.method=lora"), "train.distributed.strategy=fsdp: not with model.quantize=nf4"),
    ((FSDP, "train.distributed.offload=true"), "train.distributed.offload: only for GPU runs"),
    (("train.distributed.offload=true",), "train.distributed.offload: only with train.distributed.strategy=fsdp"),
])
def test_what_sharding_cannot_do_is_refused_with_one_line(setting, sets, expected):
    proc = run(setting, "refused", *sets, check=False)[1]
    assert proc.returncode == 2 and expected in proc.stderr, proc.stderr[-2000:]


@pytest.fixture(scope="module")
def decoder_config(tmp_path_factory, tiny_llama_dir):
    """A tiny Llama (tied embeddings, no dropout) trained with LoRA on general text, causal-LM, in
    packed padding-free batches."""
    import yaml
    from support import write_task_and_general

    root = tmp_path_factory.mktemp("fsdp-decoder")
    files = write_task_and_general(root)
    cfg = {"model": {"name": str(tiny_llama_dir), "max_length": 32},
           "sources": {"text": {"objective": "causal-lm", "train": str(files["general"]), "text": {"stream": False}}},
           "train": {"max_steps": 6, "batch_size": 4, "lr": 1e-2, "seed": 3, "eval_each_epoch": False,
                     "eval_before": False, "progress": False, "log_every": 1, "log_plan": True},
           "peft": {"method": "lora", "r": 4, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "down_proj"]},
           "run": {"output_dir": str(root / "runs")}}
    path = root / "decoder.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return root, path


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_decoder_with_lora_trains_sharded_as_on_one_process(decoder_config, precision):
    """fp32: the adapters of one process within 1e-5. bf16: FSDP gathers the weights in bf16 and
    reduces gradients in fp32, one process autocasts: the same training to bf16 rounding."""
    out = []
    for name, extra, nproc in (("one", [], 1), ("sharded", ["--set", FSDP], 2)):
        run_name = f"{name}-{precision}"
        launch("train", str(decoder_config[1]), "--no-test", "--set", f"run.name={run_name}",
               "--set", f"train.precision={precision}", *extra, nproc=nproc)
        out.append(decoder_config[0] / "runs" / run_name)
    one, two = out
    assert (one / "plan.jsonl").read_text() == (two / "plan.jsonl").read_text()
    a, b = (load_file(str(ckpt.step_checkpoints(d / "checkpoints")[-1][1] / "adapter_model.safetensors"))
            for d in out)
    losses = [[e["sources"]["text"]["loss"] for e in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
               if e["event"] == "train"] for d in out]
    assert len(losses[1]) == 6 and losses[1][-1] < losses[1][0]
    if precision == "fp32":
        close(a, b)
    else:  # bf16 rounding in other places: the same losses, adapters pointing the same way
        assert losses[1] == pytest.approx(losses[0], rel=1e-3)
        flat = [torch.cat([t[k].flatten().double() for k in sorted(t)]) for t in (a, b)]
        assert torch.nn.functional.cosine_similarity(*flat, dim=0) > 0.99


def _trained(run_dir):
    """Every trained tensor the last step checkpoint saved (the method's own files and the heads; not
    the optimizer state, nor the random states, of which each process saves its own)."""
    folder = ckpt.step_checkpoints(run_dir / "checkpoints")[-1][1]
    return {f"{f.name}:{k}": v for f in sorted(folder.glob("*.safetensors"))
            if f.name != "optimizer.safetensors" and not f.name.startswith("rng")
            for k, v in load_file(str(f)).items()}


@pytest.mark.parametrize("method", [
    ("peft.method=dora", "peft.r=4", "peft.dropout=0"),
    ("peft.method=ia3",),
    ("peft.method=prompt_tuning", "peft.num_virtual_tokens=4"),
    ("peft.method=prefix_tuning", "peft.num_virtual_tokens=4"),
    ("peft.method=adapter", "peft.adapter_size=8"),
    ("peft.method=bitfit",),
], ids=lambda m: m[0].split("=")[1])
def test_every_method_trains_sharded_as_on_one_process(setting, method):
    """The frozen base sharded with its blocks, the method's trained tensors (adapters, magnitudes,
    scaling vectors, virtual tokens, a prefix encoder's tables, bottleneck layers, biases) and the
    heads in the optimizer: what 2 sharded processes save equals what one process saves."""
    sets = (*method, "train.max_steps=4", "train.lr=1e-2")
    name = method[0].split("=")[1]
    one, _ = run(setting, f"fsdp-{name}-one", *sets)
    two, _ = run(setting, f"fsdp-{name}-two", *sets, FSDP, nproc=2)
    a, b = _trained(one), _trained(two)
    assert a and a.keys() == b.keys()
    close(a, b)


# ------------------------------------------------ sharded step checkpoints (torch.distributed.checkpoint)
def test_step_checkpoints_are_written_in_shards_and_the_last_is_gathered(setting, common, one_and_sharded):
    """Each process writes its own part of a step checkpoint (torch.distributed.checkpoint); the manifest
    covers every part and refuses a checkpoint that lost one; the run's last checkpoint and `best` are
    plain model folders; a sharded one resumes, and is named as such if asked to score or export."""
    from routetune.errors import RunError

    _, two = one_and_sharded
    steps = ckpt.step_checkpoints(two / "checkpoints")
    assert not ckpt.is_sharded(steps[-1][1]) and (steps[-1][1] / "model.safetensors").is_file()
    assert not ckpt.is_sharded(two / "checkpoints" / "best")
    killed, _ = run(setting, "fsdp-shards", *common, FSDP, nproc=2, fault="after_step:8", check=False)
    step, folder = ckpt.step_checkpoints(killed / "checkpoints")[-1]
    assert step == 8 and ckpt.is_sharded(folder) and not (folder / "model.safetensors").exists()
    manifest = json.loads((folder / ckpt.MANIFEST).read_text())
    assert {"sharded/.metadata", "sharded/__0_0.distcp", "sharded/__1_0.distcp", "trainer_state.json",
            "rng.safetensors", "rng-rank1.safetensors"} <= set(manifest)
    ckpt.verify(folder)
    with pytest.raises(RunError, match="a sharded step checkpoint"):
        ckpt.run_checkpoint(killed, "last")
    # a part removed and the manifest rewritten without it: refused, naming the part
    copy = killed / "copy" / folder.name
    import shutil
    shutil.copytree(folder, copy)
    (copy / "sharded" / "__1_0.distcp").unlink()
    del manifest["sharded/__1_0.distcp"]
    (copy / ckpt.MANIFEST).write_text(json.dumps(manifest))
    (copy / ckpt.COMPLETE).write_text(ckpt._sha256(copy / ckpt.MANIFEST) + "\n")
    with pytest.raises(ckpt.CheckpointError, match="sharded/__1_0.distcp"):
        ckpt.verify(copy)


def test_a_kill_inside_a_sharded_save_loses_nothing_and_the_run_resumes_exactly(setting, common, one_and_sharded):
    """Killed after both processes wrote their parts of step 10 and before the checkpoint was
    completed: the partial folder is never used (recover removes it), step 8 verifies, and the
    resumed run ends bitwise as the uninterrupted one."""
    _, two = one_and_sharded
    killed, proc = run(setting, "fsdp-kill-in-save", *common, FSDP, nproc=2, fault="in_write:10", check=False)
    assert proc.returncode != 0
    root = killed / "checkpoints"
    assert [s for s, _ in ckpt.step_checkpoints(root)] == [5, 8] and any(p.name.startswith(".tmp-step-00000010")
                                                                      for p in root.iterdir())
    launch("resume", str(killed), "--no-test", nproc=2)
    assert not any(p.name.startswith(".tmp-") for p in root.iterdir())
    ref, got = (ckpt.step_checkpoints(d / "checkpoints")[-1][1] for d in (two, killed))
    for name in ("model.safetensors", "heads.safetensors", "optimizer.safetensors"):
        a, b = load_file(str(ref / name)), load_file(str(got / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_gathered_step_checkpoints_remain_an_option(setting, common):
    killed, _ = run(setting, "fsdp-gathered", *common, FSDP, "train.distributed.checkpoint=gathered", nproc=2,
                    fault="after_step:8", check=False)
    folder = ckpt.step_checkpoints(killed / "checkpoints")[-1][1]
    assert not ckpt.is_sharded(folder) and (folder / "model.safetensors").is_file()
