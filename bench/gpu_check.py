"""The sections of bench/gpu_check.sh: each trains, predicts or serves on the device and checks
what it must, raising on the first thing that is wrong (the shell script runs every section, each
under its own time limit, and sums up).

    python bench/gpu_check.py SECTION OUT MODELS DATA DEVICE

SECTION: quickstart, syncs, fp16, distill, prompt, decoder, encoder, ddp1, resume_cpu. OUT: the
results folder; MODELS: random-weight `minilm` and `smollm2` folders (.gpu/random_weights.py);
DATA: `wnut17` and `tinyshakespeare`; DEVICE: cuda (or cpu for a dry run of the script itself).
HTTP calls use Python's urllib (a GPU image may have no curl).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def cli(*args, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "routetune.cli", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    print("$ routetune", " ".join(map(str, args)), f"-> {proc.returncode}")
    print("\n".join(proc.stderr.strip().splitlines()[-6:]))
    if check and proc.returncode != 0:
        raise AssertionError(f"routetune {args[0]} failed ({proc.returncode})")
    return proc


def write(out: Path, name: str, cfg: dict) -> Path:
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def quiet_train(device: str, **extra) -> dict:
    return {"device": device, "precision": "auto", "progress": False, "seed": 42, "eval_each_epoch": False, **extra}


def ner(out: Path, models: Path, data: Path, device: str, name: str, **train) -> dict:
    return {"model": {"name": str(models / "minilm"), "max_length": 128},
            "sources": {"wnut17": {"objective": "token-classification",
                                   "train": str(data / "wnut17" / "wnut17train.conll"),
                                   "dev": str(data / "wnut17" / "emerging.dev.conll"),
                                   "test": str(data / "wnut17" / "emerging.test.annotated")}},
            "train": quiet_train(device, batch_size=16, lr=5e-5, **train),
            "run": {"name": name, "output_dir": str(out / "runs")}}


def shakespeare(out: Path, models: Path, data: Path, device: str, name: str, peft: dict, distill: float = 0.0,
                **train) -> dict:
    text = str(data / "tinyshakespeare" / "input.txt")
    return {"model": {"name": str(models / "smollm2"), "max_length": 128},
            "sources": {"shakespeare": {"objective": "causal-lm", "train": text, "text": {"stream": False},
                                        "holdout": {"test": 0.1}},
                        "general": {"objective": "language-modeling", "train": text,
                                    "text": {"stream": False}, "distill": distill}},
            "routing": {"weights": {"shakespeare": 0.75, "general": 0.25}, "granularity": "example", "seed": 13},
            "peft": peft, "train": quiet_train(device, batch_size=8, lr=2e-4, **train),
            "run": {"name": name, "output_dir": str(out / "runs")}}


def summary(out: Path, name: str) -> dict:
    return json.loads((out / "runs" / name / "summary.json").read_text())


def on(device: str, s: dict) -> None:
    assert s["hardware"]["device"].startswith(device), s["hardware"]
    print(f"trained on {s['hardware'].get('gpu', s['hardware']['cpu'])} in {s['hardware']['precision']}: "
          f"{s['steps']} steps, {s['tokens_per_s']:.0f} tokens/s")


# ---------------------------------------------------------------------------------- sections

def quickstart(out, models, data, device):
    """The README's quickstart as shipped (examples/quickstart.yaml), on the random-weight minilm
    with the masked-LM head fit forced (the real minilm has no MLM head, so the shipped run fits one)."""
    cli("train", ROOT / "examples" / "quickstart.yaml", "--set", f"model.name={models / 'minilm'}",
        "--set", "retention.fit_head=always", "--set", f"train.device={device}", "--set", "run.name=quickstart",
        "--set", f"run.output_dir={out / 'runs'}", "--overwrite", "--test")
    s = summary(out, "quickstart")
    on(device, s)
    change = s["before_after"]
    print("before -> after:", json.dumps(change)[:300])
    assert change and s["test"]["news"]["f1"] >= 0.0


def syncs(out, models, data, device):
    """Host synchronisations per training step, as CUDA's own sync debug mode reports them (one
    is expected: the step's losses read back)."""
    import warnings

    import torch

    if device != "cuda":
        print("skipped: CUDA's sync debug mode needs a GPU")
        return
    sys.path.insert(0, str(ROOT / "src"))
    import routetune.training.engine as engine
    from routetune.workflow import train

    counts: list[int] = []
    real = engine.Trainer.train_step

    def counted(self, step, parts):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                return real(self, step, parts)
            finally:
                torch.cuda.set_sync_debug_mode("default")
                counts.append(sum("synchroniz" in str(w.message) for w in seen))

    engine.Trainer.train_step = counted
    for name, cfg in (("syncs-ner", ner(out, models, data, device, "syncs-ner", max_steps=12)),
                      ("syncs-lora", shakespeare(out, models, data, device, "syncs-lora", {"method": "lora", "r": 8},
                                                 max_steps=12))):
        counts.clear()
        train(write(out, name, cfg), run_test=False, overwrite=True)
        print(f"{name}: host synchronisations per step {counts}")
        assert max(counts[1:]) <= 1, counts


def fp16(out, models, data, device):
    """Ten steps in fp16 with the gradient scaler; steps it skipped (overflow) are counted from its scale."""
    if device != "cuda":
        print("skipped: fp16 with a gradient scaler is a GPU setting")
        return
    cli(
        "train", write(out, "fp16", ner(out, models, data, device, "fp16", max_steps=10, precision="fp16")), "--no-test"
    )
    state = json.loads(next((out / "runs" / "fp16" / "checkpoints").glob("step-00000010/trainer_state.json"))
                       .read_text())
    scale = state["grad_scaler"]["scale"]
    print(f"fp16: final loss scale {scale}, steps skipped by the scaler {round(math.log2(65536.0 / scale))} of 10")
    on(device, summary(out, "fp16"))


def distill(out, models, data, device):
    cli("train", write(out, "distill", shakespeare(out, models, data, device, "distill", {"method": "lora", "r": 8},
                                                   distill=1.0, max_steps=10)), "--no-test")
    on(device, summary(out, "distill"))


def prompt(out, models, data, device):
    cli("train", write(out, "prompt", {**ner(out, models, data, device, "prompt", max_steps=10),
                                       "peft": {"method": "prompt_tuning", "num_virtual_tokens": 8}}), "--no-test")
    on(device, summary(out, "prompt"))


class Server:
    """`routetune serve RUN` on a local port, answered through urllib."""

    def __init__(self, run: Path, port: int):
        self.port = port
        self.proc = subprocess.Popen([sys.executable, "-m", "routetune.cli", "serve", str(run), "--port", str(port)],
                                     stdout=open(run.parent / f"serve-{run.name}.log", "w"), stderr=subprocess.STDOUT)

    def __enter__(self):
        for _ in range(120):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2)
                return self
            except OSError:
                time.sleep(1)
        raise AssertionError("the server did not answer /healthz in 120 s")

    def post(self, path: str, body: dict) -> dict:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
        return json.loads(urllib.request.urlopen(req, timeout=60).read())

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait(30)


def decoder(out, models, data, device):
    """A decoder with LoRA trained on the device, then generate offline and served, equal (greedy)."""
    cli("train", write(out, "decoder", shakespeare(out, models, data, device, "decoder", {"method": "lora", "r": 8},
                                                   max_steps=20)), "--no-test")
    run = out / "runs" / "decoder"
    on(device, summary(out, "decoder"))
    proc = subprocess.run([sys.executable, "-m", "routetune.cli", "generate", str(run), "--max-new-tokens", "12"],
                          input="ROMEO:\n", capture_output=True, text=True, check=True)
    offline = json.loads(proc.stdout.splitlines()[0])
    with Server(run, 8766) as server:
        served = server.post("/v1/generate", {"prompts": ["ROMEO:"], "max_new_tokens": 12})
    print("offline:", offline, "\nserved:", served)
    assert served["results"][0]["completion"] == offline["completion"], (served, offline)


def openai(out, models, data, device):
    """The decoder of `decoder` served on the device: the OpenAI completion (greedy) equals generate;
    a streamed chat joined equals the whole answer for a seed."""
    run = out / "runs" / "decoder"
    if not run.is_dir():
        decoder(out, models, data, device)
    proc = subprocess.run([sys.executable, "-m", "routetune.cli", "generate", str(run), "--max-new-tokens", "12"],
                          input="ROMEO:\n", capture_output=True, text=True, check=True)
    offline = json.loads(proc.stdout.splitlines()[0])["completion"]
    with Server(run, 8767) as server:
        done = server.post("/v1/completions", {"model": "decoder", "prompt": "ROMEO:", "max_tokens": 12,
                                                "temperature": 0})
    print("offline:", offline, "\nserved:", done)
    assert done["choices"][0]["text"].strip() == offline, (done, offline)


def qlora(out, models, data, device):
    """LoRA over an NF4 base on the device (bitsandbytes' CUDA kernels) beside LoRA over the bf16 base:
    both train (the loss falls); each run's seconds per step printed."""
    for name, quantize in (("lora-bf16", "none"), ("qlora-nf4", "nf4")):
        cfg = shakespeare(out, models, data, device, name, {"method": "lora", "r": 8}, max_steps=20)
        cfg["model"]["quantize"] = quantize
        cli("train", write(out, name, cfg), "--no-test", "--no-retention")
        s = summary(out, name)
        on(device, s)
        events = [json.loads(x) for x in (out / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        losses = [sum(v["loss"] for v in e["sources"].values() if v.get("loss") is not None)
                  for e in events if e["event"] == "train"]
        print(name, "losses", losses, "train seconds", s["train_seconds"])
        assert losses[-1] < losses[0], (name, losses)


def encoder(out, models, data, device):
    """NER trained on the device; dev F1 on the device and on the CPU; predict offline and served, equal."""
    cli("train", write(out, "ner", ner(out, models, data, device, "gpu-ner", max_steps=60, eval_every_steps=30,
                                       save_every_steps=20, keep_last=5)))
    run = out / "runs" / "gpu-ner"
    on(device, summary(out, "gpu-ner"))
    scores = {}
    for where in (device, "cpu"):
        proc = cli("eval", run, "--split", "dev", "--json", "--device", where, "--precision",
                   "auto" if where != "cpu" else "fp32")
        scores[where] = json.loads(proc.stdout)["scores"]["wnut17"]["f1"]
    print(f"dev F1 on {device} {scores[device]:.4f}, on the CPU {scores['cpu']:.4f}")
    assert abs(scores[device] - scores["cpu"]) < 0.02, scores
    # the tags themselves (random weights give F1 near 0 either way): the same on both, to rounding
    words, lines = [], []
    for line in (data / "wnut17" / "emerging.dev.conll").read_text(encoding="utf-8").splitlines():
        if line.strip():
            words.append(line.split("\t")[0])
        elif words:
            lines.append(json.dumps({"tokens": words}))
            words = []
    text = "\n".join(lines[:200]) + "\n"
    tags = {}
    for where in (device, "cpu"):
        proc = subprocess.run([sys.executable, "-m", "routetune.cli", "predict", str(run), "--device", where,
                               "--precision", "auto" if where != "cpu" else "fp32"],
                              input=text, capture_output=True, text=True, check=True)
        tags[where] = [t for line in proc.stdout.splitlines() for t in json.loads(line)["tags"]]
    same = sum(a == b for a, b in zip(tags[device], tags["cpu"])) / max(len(tags["cpu"]), 1)
    print(f"predicted tags equal on {device} and the CPU for {same:.1%} of {len(tags['cpu'])} words")
    assert len(tags[device]) == len(tags["cpu"]) and same >= 0.98, same
    proc = subprocess.run([sys.executable, "-m", "routetune.cli", "predict", str(run)],
                          input="Apple opened a store in Paris\n", capture_output=True, text=True, check=True)
    offline = json.loads(proc.stdout.splitlines()[0])
    with Server(run, 8765) as server:
        served = server.post("/v1/ner", {"texts": ["Apple opened a store in Paris"]})
    assert served["results"][0]["tags"] == offline["tags"], (served, offline)


def ddp1(out, models, data, device):
    """One process on one GPU through torchrun: the data-parallel code path (nccl on a GPU)."""
    path = write(out, "ddp1", ner(out, models, data, device, "ddp1", max_steps=10))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                           "-m", "routetune.cli", "train", str(path), "--no-test"], capture_output=True, text=True)
    print("\n".join(proc.stderr.strip().splitlines()[-4:]))
    assert proc.returncode == 0, proc.returncode
    hw = summary(out, "ddp1")["hardware"]
    print("processes", hw["processes"], "backend", hw["backend"])
    assert hw["backend"] == ("nccl" if device == "cuda" else "gloo"), hw


def fsdp1(out, models, data, device):
    """FSDP2 on one GPU through torchrun (nccl; bf16 weights gathered, fp32 reduction), LoRA on the
    decoder: killed after step 6 and resumed sharded to the plan of an uninterrupted run; its
    checkpoint then continued by a plain process; and a run with CPU offload. One GPU holds one
    process, so this proves the sharded code path on CUDA, not the averaging over ranks (tested on
    gloo with 2 processes)."""
    lora = {"method": "lora", "r": 8, "target_modules": ["q_proj", "v_proj"]}
    fsdp = {"strategy": "fsdp"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m",
                "routetune.cli"]
    runs = {}
    for name, extra, fault in (("fsdp-whole", {}, None), ("fsdp-kill", {}, "after_step:6"),
                               ("fsdp-offload", {"offload": True}, None)):
        cfg = shakespeare(out, models, data, device, name, lora, max_steps=12, save_every_steps=3,
                          distributed={**fsdp, **extra})
        env = {**os.environ, **({"ROUTETUNE_FAULT": fault} if fault else {})}
        proc = subprocess.run([*torchrun, "train", str(write(out, name, cfg)), "--no-test"], capture_output=True,
                              text=True, env=env)
        print(name, "->", proc.returncode, "\n".join(proc.stderr.strip().splitlines()[-3:]))
        runs[name] = proc.returncode
    assert runs["fsdp-whole"] == 0 and runs["fsdp-offload"] == 0 and runs["fsdp-kill"] != 0, runs
    proc = subprocess.run([*torchrun, "resume", str(out / "runs" / "fsdp-kill"), "--no-test"], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = ((out / "runs" / r / "plan.jsonl").read_text() for r in ("fsdp-whole", "fsdp-kill"))
    assert a == b, "the resumed sharded run's plan differs"
    s = summary(out, "fsdp-whole")
    on(device, s)
    print("backend", s["hardware"]["backend"], "offload run", summary(out, "fsdp-offload")["steps"], "steps")


def compile(out, models, data, device):
    """Compiled against eager blocks (train.compile true/false), decoder LoRA at 16 x 1,024 tokens: tokens/s
    of the steps that compiled nothing, the graphs compiled and why, the compile seconds, and the model
    FLOPs utilisation against the GPU's dense bf16 peak (LoRA: ~4N FLOPs per token, a forward and the
    backward through the activations; N the backbone's parameters)."""
    peaks = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}  # dense bf16 tensor-core FLOP/s
    rows = {}
    for name, setting in (("eager", False), ("compiled", True)):
        cfg = shakespeare(out, models, data, device, name, {"method": "lora", "r": 8}, max_steps=30, compile=setting)
        cfg["model"]["max_length"] = 1024
        cfg["train"]["batch_size"] = 16
        cli("train", write(out, name, cfg), "--no-test", "--no-retention")
        s = summary(out, name)
        on(device, s)
        rows[name] = s
    n = rows["eager"]["parameters"]["total"]
    gpu = rows["eager"]["hardware"].get("gpu", "")
    peak = next((v for k, v in peaks.items() if k in gpu), None)
    for name, s in rows.items():
        mfu = f"{4 * n * s['tokens_per_s'] / peak:.1%}" if peak else "n/a"
        print(f"{name}: {s['tokens_per_s']:.0f} tokens/s, MFU ~{mfu}, compiled {json.dumps(s.get('compiled'))}")
    c = rows["compiled"]["compiled"]
    assert c["fallback"] is None and c["graphs"] >= 1, c
    print(f"compiled / eager tokens/s: {rows['compiled']['tokens_per_s'] / rows['eager']['tokens_per_s']:.2f}")


def flex(out, models, data, device):
    """Attention in padding-free batches on the padded width (train.packed_attention=padded) against
    FlexAttention on the packed row (flex), decoder LoRA on prompt/completion examples of uneven
    length (Tiny Shakespeare cut into 25-1,000-token pieces), batch 16, max_length 1,024, 30 steps:
    tokens/s of each, and their logged losses (the same plan, so equal up to rounding)."""
    import random

    text = (data / "tinyshakespeare" / "input.txt").read_text()
    rng = random.Random(0)
    lines = []
    for _ in range(800):
        n = rng.randint(100, 4000)
        start = rng.randrange(len(text) - n)
        cut = start + n // 2
        lines.append(json.dumps({"prompt": text[start:cut], "completion": text[cut:start + n]}))
    (out / "pieces.jsonl").write_text("\n".join(lines) + "\n")
    losses, rows = {}, {}
    for name in ("padded", "flex"):
        run = f"flex-{name}"
        cfg = {"model": {"name": str(models / "smollm2"), "max_length": 1024},
               "sources": {"pieces": {"objective": "causal-lm", "format": "jsonl", "train": str(out / "pieces.jsonl"),
                                      "eval_generate": 0}},
               "peft": {"method": "lora", "r": 8},
               "train": quiet_train(device, batch_size=16, lr=2e-4, max_steps=30, packed_attention=name, log_every=5),
               "run": {"name": run, "output_dir": str(out / "runs")}}
        cli("train", write(out, run, cfg), "--no-test", "--no-retention")
        s = summary(out, run)
        on(device, s)
        rows[name] = s
        events = [json.loads(line) for line in (out / "runs" / run / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [e["sources"]["pieces"]["loss"] for e in events if e["event"] == "train"]
    print("losses padded:", [round(x, 4) for x in losses["padded"]])
    print("losses flex:  ", [round(x, 4) for x in losses["flex"]])
    print(f"flex / padded tokens/s: {rows['flex']['tokens_per_s'] / rows['padded']['tokens_per_s']:.2f}")
    assert losses["padded"] and len(losses["padded"]) == len(losses["flex"]), losses
    for a, b in zip(losses["padded"], losses["flex"]):
        assert abs(a - b) <= 0.02 * abs(a), (a, b)  # bf16 kernels of two kinds: rounding, not a change of model


def resume_cpu(out, models, data, device):
    """Killed on the device after step 30, resumed on the CPU: the plan equals an uninterrupted run's."""
    path = write(out, "kill", ner(out, models, data, device, "gpu-kill", max_steps=40, save_every_steps=10))
    whole = write(out, "whole", ner(out, models, data, device, "gpu-whole", max_steps=40, save_every_steps=10))
    cli("train", whole, "--no-test")
    cli("train", path, "--no-test", env={"ROUTETUNE_FAULT": "after_step:30"}, check=False)
    cli("resume", out / "runs" / "gpu-kill", "--device", "cpu", "--precision", "fp32", "--no-test")
    a, b = ((out / "runs" / r / "plan.jsonl").read_text() for r in ("gpu-whole", "gpu-kill"))
    assert a == b, "the resumed run's plan differs"
    print(
        "plan identical;", [h["device"] for h in json.loads((out / "runs" / "gpu-kill" / "hardware.json").read_text())]
    )


if __name__ == "__main__":
    section, out, models, data, device = sys.argv[1], *map(Path, sys.argv[2:5]), sys.argv[5]
    out.mkdir(parents=True, exist_ok=True)
    globals()[section](out, models, data, device)
