"""Device and precision: how `auto` decides, what a forced choice costs, and that training,
resume, evaluation and prediction run on the chosen device in each precision."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file

from support import CUDA, make_config, run_cli
from routetune import device as dev
from routetune.config import load_config
from routetune.errors import ConfigError

AVX2 = {"fpu", "sse2", "avx", "avx2", "fma"}
AVX512 = AVX2 | {"avx512f", "avx512bw", "avx512vl"}


@pytest.mark.parametrize("flags, env, native", [
    (AVX2, {}, False),                                        # AMD EPYC Zen 2/3, older Intel
    (AVX512, {}, False),                                      # Skylake-X: AVX512 without bf16
    (AVX512 | {"avx512_bf16"}, {}, True),                     # Cooper Lake, Zen 4
    (AVX512 | {"amx_bf16", "amx_tile"}, {}, True),            # Sapphire Rapids
    (AVX512 | {"avx512_bf16"}, {"ONEDNN_MAX_CPU_ISA": "AVX2"}, False),  # oneDNN capped below bf16
    (AVX512 | {"avx512_bf16"}, {"ONEDNN_MAX_CPU_ISA": "avx512_core_bf16"}, True),
    ({"fp", "asimd", "bf16"}, {}, True),                      # Arm with BF16 (Graviton 3)
    (None, {}, False),                                        # flags unreadable
], ids=["avx2", "avx512", "avx512-bf16", "amx", "onednn-capped", "onednn-at-bf16", "arm-bf16", "unknown"])
def test_cpu_bf16_is_read_from_the_cpu_flags(flags, env, native, monkeypatch):
    if flags is None:
        monkeypatch.setattr(dev, "cpu_flags", lambda: None)
    got, why = dev.cpu_bf16(flags if flags is not None else None, env)
    assert got is native
    assert why  # a reason for the log, always
    if flags == AVX2:
        assert "AVX2" in why


def test_cpu_flags_parses_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu avx2 avx512_bf16\n\n")
    assert dev.cpu_flags(str(info)) == {"fpu", "avx2", "avx512_bf16"}
    assert dev.cpu_flags(str(tmp_path / "missing")) is None


@pytest.mark.skipif(CUDA, reason="checks the CPU-only machine's choices")
@pytest.mark.parametrize("native, expected", [(False, "fp32"), (True, "bf16")])
def test_auto_on_a_cpu_follows_native_bf16(monkeypatch, native, expected):
    monkeypatch.setattr(dev, "cpu_bf16", lambda: (native, "test CPU"))
    hw = dev.resolve("auto", "auto")
    assert (hw.device.type, hw.precision) == ("cpu", expected)
    assert "test CPU" in hw.reason
    assert hw.describe()["precision"] == expected


def test_forced_bf16_on_a_cpu_without_it_warns_once_with_the_cost(monkeypatch, caplog):
    monkeypatch.setattr(dev, "cpu_bf16", lambda: (False, "CPU without native bf16 (AVX2; no AMX or AVX512-BF16)"))
    logging.getLogger("routetune").setLevel(logging.INFO)
    with caplog.at_level(logging.WARNING, logger="routetune"):
        hw = dev.resolve("cpu", "bf16")
    assert hw.precision == "bf16"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "far slower than fp32" in warnings[0] and "AVX2" in warnings[0]


def test_native_bf16_and_fp32_do_not_warn(monkeypatch, caplog):
    monkeypatch.setattr(dev, "cpu_bf16", lambda: (True, "CPU with native bf16 (amx_bf16)"))
    with caplog.at_level(logging.WARNING, logger="routetune"):
        dev.resolve("cpu", "bf16")
        dev.resolve("cpu", "fp32")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "CPU", "", "cuda:"])
def test_bad_device_names_the_key(spec):
    with pytest.raises(ConfigError, match=r"^train\.device: expected auto, cpu, cuda or cuda:N"):
        dev.resolve_device(spec)


@pytest.mark.skipif(CUDA, reason="needs a machine without CUDA")
def test_cuda_on_a_cpu_only_machine_is_one_clear_error():
    with pytest.raises(ConfigError, match=r"train\.device: cuda asked for, but this PyTorch .* sees no CUDA device"):
        dev.resolve("cuda", "auto")
    with pytest.raises(ConfigError, match=r"^--device: cuda:1 asked for"):
        dev.resolve("cuda:1", "auto", names=("--device", "--precision"))


def test_bad_precision_names_the_key():
    with pytest.raises(ConfigError, match=r"^--precision: expected one of auto, fp32, bf16, fp16, got 'fp8'"):
        dev.resolve("cpu", "fp8", names=("--device", "--precision"))


def test_config_refuses_an_unknown_device_with_its_line(tmp_path, tiny_model_dir, ner_files):
    path = make_config(tmp_path, tiny_model_dir, ner_files, **{"train.device": "gpu"})
    with pytest.raises(
        ConfigError, match=r"tiny\.yaml:\d+: train\.device: expected auto, cpu, cuda or cuda:N, got 'gpu'"
    ):
        load_config(path)
    assert load_config(make_config(tmp_path, tiny_model_dir, ner_files)).train.precision == "fp32"  # the test default


def test_precision_and_device_defaults_are_auto():
    from routetune.config import TrainConfig

    assert (TrainConfig().device, TrainConfig().precision) == ("auto", "auto")


def test_autocast_contexts():
    x = torch.randn(4, 4)
    with dev.autocast("bf16", "cpu"):
        assert (x @ x).dtype == torch.bfloat16
    with dev.autocast("fp16", "cpu"):
        assert (x @ x).dtype == torch.float16
    with dev.autocast("fp32", "cpu"):
        assert (x @ x).dtype == torch.float32


# ------------------------------------------------------------------ runs on a device


def test_a_run_trains_on_its_device_and_records_it(tmp_path, tiny_model_dir, ner_files, device):
    from routetune.workflow import evaluate_run, train

    path = make_config(tmp_path, tiny_model_dir, ner_files, **{"train.device": device, "train.max_steps": 6})
    run_dir, summary = train(path)
    assert summary["hardware"]["device"].startswith(device)
    assert summary["hardware"]["precision"] == "fp32"
    sessions = json.loads((run_dir / "hardware.json").read_text())
    assert len(sessions) == 1 and sessions[0]["device"].startswith(device) and sessions[0]["reason"]
    # checkpoints are device-independent: scored on the CPU they give the run's own test scores
    on_cpu = evaluate_run(run_dir, "test", device="cpu", precision="fp32")
    assert on_cpu["ner"]["f1"] == pytest.approx(summary["test"]["ner"]["f1"], abs=1e-6 if device == "cpu" else 0.02)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_sigkill_resume_is_bitwise_identical(tmp_path, tiny_model_dir, ner_files, precision):
    """16-bit training (fp16 with its gradient scaler) resumes exactly: weights, plan and the
    scaler's state equal an uninterrupted run's."""
    out = {}
    for name, fault in (("ref", None), ("killed", "after_step:5")):
        path = make_config(tmp_path / name, tiny_model_dir, ner_files, **{
            "train.precision": precision, "train.max_steps": 8, "train.save_every_steps": 4, "train.lr": 5e-3,
            "train.eval_each_epoch": False, "run.output_dir": str(tmp_path / name / "runs")})
        proc = run_cli("train", str(path), "--no-test", fault=fault, check=fault is None)
        run_dir = tmp_path / name / "runs" / "tiny"
        if fault:
            assert proc.returncode == -9
            run_cli("resume", str(run_dir), "--no-test")
        folder = run_dir / "checkpoints" / "step-00000008"
        state = json.loads((folder / "trainer_state.json").read_text())
        out[name] = (load_file(str(folder / "model.safetensors")), (run_dir / "plan.jsonl").read_text(),
                     state["grad_scaler"], json.loads((run_dir / "hardware.json").read_text()))
    ref, killed = out["ref"], out["killed"]
    assert ref[1] == killed[1]
    for k, v in ref[0].items():
        assert torch.equal(v, killed[0][k]), k
    assert ref[2] == killed[2]
    assert (ref[2] is not None) == (precision == "fp16")
    assert [s["precision"] for s in killed[3]] == [precision, precision]  # one entry per session


def test_fp16_trains_through_the_gradient_scaler(tmp_path, tiny_model_dir, ner_files, monkeypatch):
    """fp16 goes through torch's GradScaler: a step whose gradients overflow is skipped (weights
    unchanged, the scale halved), clipping sees the unscaled gradients, and the weights stay finite."""
    from routetune.training.engine import Trainer
    from routetune.training.setup import prepare

    def trainer_for(name: str, **extra):
        cfg = load_config(make_config(tmp_path / name, tiny_model_dir, ner_files, **{
            "train.precision": "fp16", "train.max_steps": 4, "train.max_grad_norm": 0.5, **extra}))
        setup = prepare(cfg)
        (tmp_path / name / "run").mkdir(parents=True)
        return setup, Trainer(setup, tmp_path / name / "run")

    # every step overflows: a scale of 2^40 times fp16 activation gradients is far past fp16's range
    setup, trainer = trainer_for("overflow")
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 40)
    before = {n: p.detach().clone() for n, p in setup.model.named_parameters()}
    trainer.run()
    assert trainer.scaler.get_scale() == 2.0 ** 36  # halved at each of the 4 skipped steps
    assert all(torch.equal(p, before[n]) for n, p in setup.model.named_parameters())  # no update applied

    # ordinary steps: applied, clipped on unscaled gradients (the norm clipping sees is not x 65536)
    norms = []
    real_clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, max_norm, **kw: norms.append(
        float(real_clip(params, max_norm, **kw))) or norms[-1])
    setup, trainer = trainer_for("ordinary")
    assert trainer.scaler is not None and not trainer.clip_in_optimizer
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=256.0)  # small enough that no step overflows
    before = {n: p.detach().clone() for n, p in setup.model.named_parameters()}
    trainer.run()
    assert trainer.scaler.get_scale() == 256.0  # no step skipped
    assert len(norms) == 4 and all(0 < n < 50 for n in norms), norms  # scaled, they would be 256x larger
    assert any(not torch.equal(p, before[n]) for n, p in setup.model.named_parameters())
    assert all(torch.isfinite(p).all() for p in setup.model.parameters())


def test_cli_device_and_precision_errors_are_one_line(tmp_path, tiny_model_dir, ner_files):
    from routetune.workflow import train

    run_dir, _ = train(make_config(tmp_path, tiny_model_dir, ner_files, **{"train.max_steps": 2}))
    proc = run_cli("eval", str(run_dir), "--precision", "fp8", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --precision: expected one of auto, fp32")
    ok = run_cli("eval", str(run_dir), "--device", "cpu", "--precision", "fp32", "--json")
    own = json.loads((run_dir / "summary.json").read_text())["test"]["ner"]  # scored in fp32 on the CPU too
    assert json.loads(ok.stdout)["scores"]["ner"]["f1"] == pytest.approx(own["f1"], abs=1e-9)
    if not CUDA:
        proc = run_cli("predict", str(run_dir), "--device", "cuda", check=False, env_extra={})
        assert proc.returncode == 2 and "--device: cuda asked for" in proc.stderr


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="no CUDA device on this machine")
def test_a_gpu_run_killed_midway_resumes_on_the_cpu(tmp_path, tiny_model_dir, ner_files):
    """Checkpoints carry no device: a run trained on the GPU continues on a CPU-only machine
    with the same remaining plan (numerics differ across device types; the plan does not)."""
    out = {}
    for name, fault in (("ref", None), ("killed", "after_step:5")):
        path = make_config(tmp_path / name, tiny_model_dir, ner_files, **{
            "train.device": "cuda", "train.precision": "auto", "train.max_steps": 8, "train.save_every_steps": 4,
            "run.output_dir": str(tmp_path / name / "runs")})
        proc = run_cli("train", str(path), "--no-test", fault=fault, check=fault is None)
        run_dir = tmp_path / name / "runs" / "tiny"
        if fault:
            assert proc.returncode == -9
            run_cli("resume", str(run_dir), "--no-test", "--device", "cpu", "--precision", "fp32")
        out[name] = (run_dir / "plan.jsonl").read_text(), json.loads((run_dir / "hardware.json").read_text())
    assert out["ref"][0] == out["killed"][0]
    assert [s["device"].split(":")[0] for s in out["killed"][1]] == ["cuda", "cpu"]


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_learning_rate_schedules(tmp_path, tiny_model_dir, ner_files, schedule):
    """train.schedule after a linear warm-up: the learning rate of each step follows its formula."""
    import math

    from routetune.training.engine import Trainer
    from routetune.training.setup import prepare

    cfg = load_config(make_config(tmp_path, tiny_model_dir, ner_files, **{
        "train.schedule": schedule, "train.max_steps": 10, "train.warmup_ratio": 0.2, "train.lr": 1e-3}))
    trainer = Trainer(prepare(cfg), tmp_path / "run")
    seen = []
    for _ in range(10):
        seen.append(trainer.scheduler.get_last_lr()[0])
        trainer.optimizer.step()
        trainer.scheduler.step()
    after = {
        "linear": lambda p: 1 - p,
        "cosine": lambda p: 0.5 * (1 + math.cos(math.pi * p)),
        "constant": lambda p: 1.0,
    }
    expected = [1e-3 * (s / 2 if s < 2 else after[schedule]((s - 2) / 8)) for s in range(10)]
    assert seen == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("peft", [{"method": "none"}, {"method": "lora", "r": 2}])
def test_gradient_checkpointing_gives_the_same_training(tmp_path, tiny_model_dir, ner_files, peft):
    import torch

    from routetune.training.engine import Trainer
    from routetune.training.setup import prepare

    weights = []
    for on in (False, True):
        cfg = load_config(make_config(tmp_path / str(on), tiny_model_dir, ner_files, **{
            "train.gradient_checkpointing": on, "train.max_steps": 4, "train.eval_each_epoch": False, "peft": peft}))
        setup = prepare(cfg)
        lm = setup.model.lm
        assert getattr(lm, "is_activation_checkpointing", getattr(lm, "is_gradient_checkpointing", None)) is on
        trainer = Trainer(setup, tmp_path / str(on) / "run")
        (tmp_path / str(on) / "run").mkdir(parents=True)
        trainer.run()
        weights.append({n: p.detach().clone() for n, p in setup.model.named_parameters() if p.requires_grad})
    for name, w in weights[0].items():
        torch.testing.assert_close(weights[1][name], w, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.skipif(CUDA, reason="needs a machine without CUDA")
def test_resume_on_a_missing_device_names_the_option(tmp_path, tiny_model_dir, ner_files):
    from routetune.workflow import train

    run_dir, _ = train(make_config(tmp_path, tiny_model_dir, ner_files, **{"train.max_steps": 2}), run_test=False)
    (run_dir / "summary.json").unlink()  # as if interrupted
    proc = run_cli("resume", str(run_dir), "--device", "cuda", check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: --device: cuda asked for")


def test_deterministic_kernels_are_switched_on_and_logged(tmp_path, tiny_model_dir, ner_files):
    """`train.deterministic`: torch's deterministic algorithms on for the run (in a process of its
    own: the switch is process-wide), said in the log, and the run trains to the end."""
    path = make_config(tmp_path, tiny_model_dir, ner_files, **{"train.max_steps": 3, "train.deterministic": True})
    proc = run_cli("train", path, "--no-test")
    assert "train.deterministic: deterministic kernels (CUBLAS_WORKSPACE_CONFIG=:4096:8)" in proc.stderr
    assert (tmp_path / "runs" / "tiny" / "summary.json").is_file()
