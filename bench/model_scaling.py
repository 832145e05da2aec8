"""How training cost grows with the model: random-weight decoders in the shapes of SmolLM2-135M,
-360M and -1.7B, routetune against the Hugging Face Trainer, tokens/s and peak memory.

    .venv/bin/python bench/model_scaling.py --json docs/records/model_scaling.json
    .venv/bin/python bench/model_scaling.py --sizes 135M --methods lora --lengths 128   # one row
    .venv/bin/python bench/model_scaling.py --plot docs/img/model_scaling.png --from docs/records/model_scaling.json
    .venv/bin/python bench/model_scaling.py --sizes 135M --methods full --profile --json F  # where the time goes

Only the configs are SmolLM2's (hidden size, layers, heads, feed-forward width; vocabulary 49,152,
tied embeddings); the weights are random (no download), which changes nothing about the cost of
a step. Each size is saved once to a temporary folder that both sides load. The work: causal-LM
on blocks of Tiny Shakespeare (the smollm2 tokenizer), 1,024 tokens per step (8 blocks of 128,
or 2 of 512), lr 2e-4, in the precision routetune's `auto` picks on this CPU, on both sides.
Methods: LoRA (r=8, alpha 16, dropout 0.05 on q,k,v,o), full fine-tuning (135M and 360M;
the 1.7B full fine-tuning's fp32 weights and AdamW state alone are 27 GB) and `full-bf16`: full
fine-tuning with every weight and the optimizer state in bf16 (`model.base_dtype: bf16`, what the
Trainer holds when the model is loaded in bf16; all three sizes). Each (size, method, length, side) runs
in its own child process, one after the other, so its peak RSS is its own; the sides alternate
within a row. The Trainer gets the same attention kernel (eager on the CPU, as routetune's
`auto`), the same blocks and the same allocator environment (`import routetune` first).

Printed per row: tokens/s of each side over the timed steps (after `--skip` warm-up steps), the
ratio, each side's peak RSS, and what it holds: the weights (as stored), the gradients of the
trained parameters, the optimizer's state and its anonymous resident memory after the last step.
The Trainer loads the model as transformers' docs recommend (in bf16 where bf16 is the training
precision); routetune holds a frozen base in the training precision (`model.base_dtype: auto`).
This work has no held-out scoring or self-distillation, so no base model or teacher is held.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import train_throughput as tt  # bench/: the Trainer recipe, the step timer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
DATA = Path(os.environ.get("ROUTETUNE_DATA", ROOT.parent / "shared" / "data"))
os.environ.setdefault("ROUTETUNE_DATA", str(DATA))

SHAPES = {  # SmolLM2's published configs, sizes as named
    "135M": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3),
    "360M": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                 num_key_value_heads=5),
    "1.7B": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                 num_key_value_heads=32),
}
TOKENS_PER_STEP = int(os.environ.get("BENCH_TOKENS", 1024))  # --tokens
STEPS = {"135M": 3, "360M": 2, "1.7B": 1}  # timed steps (the 1.7B's take tens of seconds each on 2 cores)


def make_model(size: str, folder: Path) -> int:
    """A random-weight LlamaForCausalLM of SmolLM2-`size`'s shape, saved with the smollm2 tokenizer."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    from routetune.model.load import resolve_model

    base = resolve_model("smollm2-135m")
    cfg = AutoConfig.from_pretrained(base)
    for k, v in SHAPES[size].items():
        setattr(cfg, k, v)
    cfg.head_dim = cfg.hidden_size // cfg.num_attention_heads
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(base).save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


class ProfiledTimer(tt.Timer):
    """The step timer, and with `--profile` torch.profiler over the timed steps (both sides): where
    each side's step time goes, as CPU time per step of the costliest ops. The profiler slows every
    op, so `--profile` runs report their tokens/s too but are not the speed figures."""

    def __init__(self, skip: int, steps: int):
        super().__init__(skip)
        self.last, self.prof, self.top = skip + steps, None, {}

    def begin(self, tokens: int):
        super().begin(tokens)
        if os.environ.get("BENCH_PROFILE") and self.step == self.skip + 1:
            from torch.profiler import ProfilerActivity, profile

            self.prof = profile(activities=[ProfilerActivity.CPU])
            self.prof.__enter__()

    def end(self):
        super().end()
        if self.step == self.last:  # after the last timed step: the weights, optimizer state and buffers held
            STEADY["rss_mb"] = round(held_rss_mb())
        if self.prof is not None and self.step == self.last:
            self.prof.__exit__(None, None, None)
            events = sorted(self.prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]
            n = self.last - self.skip
            self.top = {e.key: round(e.self_cpu_time_total / 1e6 / n, 4) for e in events}
            self.prof = None

    def result(self) -> dict:
        return {**super().result(), **({"top_ops_s_per_step": self.top} if self.top else {})}


STEADY: dict = {}


def held_rss_mb() -> float:
    """This process's anonymous resident memory now, after freed heap is given back (glibc's
    malloc_trim): what the model, its optimizer state and a step's buffers hold. Not counted: the
    pages of the checkpoint's file that the load mapped (safetensors maps it; transformers keeps
    the mapping, so a quantized load keeps the full-precision file's pages resident until the OS
    needs them: clean page cache, dropped under memory pressure) and the load's freed transients."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def weights_mb(model) -> float:
    """The bytes the model's weights are held in: parameters and buffers as stored (a 4-bit weight's
    packed bytes and its quantization constants), whether in anonymous memory or a mapped file."""
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        total += t.numel() * t.element_size()
        state = getattr(t, "quant_state", None)
        while state is not None:
            total += state.absmax.numel() * state.absmax.element_size()
            state = getattr(state, "state2", None)
    return round(total / 2**20)


def state_mb(model, optimizer) -> dict:
    """What training adds to the weights: gradients (one per trained parameter, in its dtype) and the
    optimizer's state (AdamW: two moments per trained parameter), in MB."""
    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    opt = sum(t.numel() * t.element_size() for st in optimizer.state.values() for t in st.values()
              if hasattr(t, "element_size") and t.dim() > 0)
    return {"trained_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "gradients_mb": round(grads / 2**20), "optimizer_mb": round(opt / 2**20)}


def _routetune_config(folder: Path, method: str, length: int, steps: int, out: Path) -> Path:
    import yaml

    cfg = {"model": {"name": str(folder), "max_length": length, "quantize": "nf4" if method == "qlora" else "none",
                     # full-bf16: every weight and the optimizer state in bf16 (a model the Trainer loads in bf16)
                     **({"base_dtype": "bf16"} if method == "full-bf16" else {})},
           "sources": {"shakespeare": {"objective": "causal-lm", "train": str(DATA / "tinyshakespeare" / "input.txt"),
                                       "text": {"stream": False}}},
           "train": {"max_steps": steps, "batch_size": TOKENS_PER_STEP // length, "lr": 2e-4, "weight_decay": 0.0,
                     "precision": os.environ.get("BENCH_PRECISION", "auto"), "seed": 42, "eval_each_epoch": False,
                     "eval_before": False,
                     "log_every": 10**6, "progress": False},
           "peft": ({"method": "lora", "r": 8, "alpha": 16, "dropout": 0.05,
                     "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]} if method in ("lora", "qlora")
                    else {"method": "none"}),
           "run": {"name": "scaling", "output_dir": str(out)}}
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def routetune_side(folder: Path, method: str, length: int, steps: int, skip: int) -> dict:
    from _runs import run_steps

    from routetune.config import load_config
    from routetune.training.setup import prepare

    with tempfile.TemporaryDirectory() as out:
        setup = prepare(load_config(_routetune_config(folder, method, length, steps + skip, Path(out))))
        timer = ProfiledTimer(skip, steps)

        def wrap(trainer, original):
            def timed_step(step, parts):
                timer.begin(sum(p.n_tokens for p in parts))
                losses = original(step, parts)
                timer.end()
                return losses
            return timed_step

        trainer = run_steps(setup, wrap)
    return {**timer.result(), "precision": setup.hardware.precision, "weights_mb": weights_mb(setup.model),
            **state_mb(setup.model, trainer.optimizer)}


def hf_side(folder: Path, method: str, length: int, steps: int, skip: int, precision: str) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from routetune.model.load import pick_attention

    tok = AutoTokenizer.from_pretrained(folder)
    text = (DATA / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
    ids = tok(text[: 200_000])["input_ids"]
    batch = TOKENS_PER_STEP // length
    rows = [{"input_ids": ids[i:i + length], "labels": ids[i:i + length]}
            for i in range(0, len(ids) - length + 1, length)][: batch * (steps + skip) * 2]
    # as transformers' docs recommend: the model loaded in the precision it trains in
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    quantized = {}
    if method == "qlora":  # as transformers' and peft's QLoRA docs do it
        from peft import prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig

        quantized = {"device_map": {"": "cpu"}, "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)}
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation=pick_attention("auto", True,
                                                                                                          "cpu"),
                                                 **quantized)
    if method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if method in ("lora", "qlora"):
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    timer = ProfiledTimer(skip, steps)
    held = {}
    tt.hf_train(model, rows, timer, lambda: batch * length, batch, 2e-4, 0.0, steps + skip, precision=precision,
                after=lambda m, opt: held.update(state_mb(m, opt)))
    return {**timer.result(), "precision": precision, "weights_mb": weights_mb(model), **held}


def child(side: str, folder: str, method: str, length: int, steps: int, skip: int, precision: str) -> None:
    import routetune  # noqa: F401  (both sides: the same allocator switch)

    r = (routetune_side(Path(folder), method, length, steps, skip) if side == "routetune"
         else hf_side(Path(folder), method, length, steps, skip, precision))
    r["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    r["held_rss_mb"] = STEADY.get("rss_mb")
    print("RESULT " + json.dumps(r), flush=True)


def run_child(*args) -> dict:
    cmd = [sys.executable, __file__, "--child", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    sys.stderr.write(proc.stderr[-3000:])
    return {"failed": proc.returncode}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for side, marker in (("hf", "o"), ("routetune", "s")):
        for (method, length), style in (((m, n), s) for m, s in (("lora", "-"), ("full", "--")) for n in (128, 512)):
            rows = [r for r in results["rows"] if r["method"] == method and r["length"] == length
                    and "tokens_per_s" in r.get(side, {})]
            if not rows:
                continue
            x = [r["parameters"] / 1e6 for r in rows]
            label = f"{'Trainer' if side == 'hf' else 'routetune'} {method} {length}"
            a.plot(x, [r[side]["tokens_per_s"] for r in rows], style, marker=marker, label=label)
            b.plot(x, [r[side]["peak_rss_mb"] / 1024 for r in rows], style, marker=marker, label=label)
    for ax, title in ((a, "tokens/s"), (b, "peak RSS (GB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("parameters (millions)")
        ax.set_title(title)
    a.legend(fontsize=7)
    fig.suptitle(f"{results['cpu']}, {results['precision']}, {results['tokens_per_step']} tokens per step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--methods", nargs="+", default=["lora", "full"], choices=["lora", "qlora", "full", "full-bf16"])
    ap.add_argument("--tokens", type=int, default=1024, help="tokens per step (memory rows of large shapes: fewer)")
    ap.add_argument("--lengths", nargs="+", type=int, default=[128, 512])
    ap.add_argument("--skip", type=int, default=1, help="warm-up steps not timed")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--plot", type=Path)
    ap.add_argument("--from", dest="source", type=Path, help="plot these results instead of measuring")
    ap.add_argument("--profile", action="store_true", help="Also profile each side's timed steps (slower)")
    ap.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                    help="both sides' precision (default: what routetune's auto picks on this CPU); bf16 on a CPU "
                         "without native bf16 is slow but shows the memory a bf16 machine would use")
    ap.add_argument("--child", nargs=7, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        side, folder, method, length, steps, skip, precision = args.child
        child(side, folder, method, int(length), int(steps), int(skip), precision)
        return
    if args.source:
        plot(json.loads(args.source.read_text()), args.plot)
        return
    import torch

    from routetune.device import cpu_bf16, resolve

    if args.profile:
        os.environ["BENCH_PROFILE"] = "1"  # read by each child's timer

    os.environ["BENCH_TOKENS"] = str(args.tokens)  # read by each child
    precision = resolve("cpu", "auto").precision if args.precision == "auto" else args.precision
    os.environ["BENCH_PRECISION"] = precision  # read by each routetune child's config
    results = {"cpu": cpu_bf16()[1], "capability": torch.backends.cpu.get_cpu_capability(), "precision": precision,
               "tokens_per_step": args.tokens, "rows": []}
    print(f"CPU: {results['capability']}; {results['cpu']}; both sides in {precision}", flush=True)
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            n = make_model(size, Path(tmp))
            for method in args.methods:
                if method == "full" and size == "1.7B":
                    continue
                lengths = args.lengths if size != "1.7B" else args.lengths[:1]
                for length in lengths:
                    row = {"size": size, "parameters": n, "method": method, "length": length, "steps": STEPS[size]}
                    for side in ("hf", "routetune"):
                        row[side] = run_child(side, tmp, method, length, STEPS[size], args.skip, precision)
                    ok = all("tokens_per_s" in row[s] for s in ("hf", "routetune"))
                    if ok:
                        row["ratio"] = row["routetune"]["tokens_per_s"] / row["hf"]["tokens_per_s"]
                    results["rows"].append(row)
                    print(f"{size:5s} {method:4s} {length:4d} " + "  ".join(
                        f"{s} {row[s].get('tokens_per_s', float('nan')):7.1f} tokens/s "
                        f"{row[s].get('peak_rss_mb', float('nan')):6.0f} MB (weights {row[s].get('weights_mb')} MB, "
                        f"gradients {row[s].get('gradients_mb')} MB, optimizer {row[s].get('optimizer_mb')} MB, "
                        f"anonymous {row[s].get('held_rss_mb')} MB)"
                        for s in ("hf", "routetune"))
                        + (f"  ratio {row['ratio']:.2f}" if ok else "  (a side failed)"), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
