"""Training throughput: the standard Hugging Face Trainer recipe vs routetune, same work, one run.

    .venv/bin/python bench/train_throughput.py                  # both works, default step counts
    .venv/bin/python bench/train_throughput.py --work ner --ner-steps 100
    .venv/bin/python bench/train_throughput.py --work ner cls --repeat 3 --json runs/t.json   # medians of 3
    .venv/bin/python bench/train_throughput.py --set train.fused=false   # ablate a routetune lever
    .venv/bin/python bench/train_throughput.py --repeat 3 --lever train.embedding_grad_buffer=false  # beside it
    THP_MEM_ALLOC_ENABLE=0 .venv/bin/python bench/train_throughput.py --only routetune  # no huge pages

Works (each variant runs in its own child process, one after the other, so peak RSS is its own
and the two never share the cores):

* ner: minilm-l6 token classification on WNUT-17 train, batch 16, max_length 128, AdamW lr 5e-5.
  HF: AutoModelForTokenClassification + DataCollatorForTokenClassification + Trainer, twice: the
  default (random) sampler and `train_sampling_strategy="group_by_length"`. routetune:
  examples/wnut17-minilm.yaml with general routing at 0: its default (random order, padding-free),
  `train.group_by_length=true`, and its random order with padded batches
  (`train.padding_free=false`, to show what padding-free batches bring). Ratios: routetune's
  default against the faster Trainer setting, and each order against the Trainer's same order
  (the pairs whose quality matches: grouping lowers dev F1 on both sides, docs/results.md).
* cls: minilm-l6 sequence classification on sentence polarity (routetune's 80% training split),
  batch 32, max_length 64, AdamW lr 5e-5. HF: AutoModelForSequenceClassification +
  DataCollatorWithPadding + Trainer, random and `group_by_length`; routetune:
  examples/polarity-minilm.yaml with general routing at 0, random and grouped.
* clm: smollm2-135m, LoRA r=8 alpha 16 dropout 0.05 on q,k,v,o, causal-LM on 128-token blocks of
  Tiny Shakespeare, batch 8, lr 2e-4. HF: get_peft_model + Trainer. routetune:
  examples/shakespeare-smollm2.yaml with general routing at 0.

Like for like: both sides train in the same precision (`--precision`, default what routetune's
`auto` picks on this CPU: bf16 only where it is native), with the attention kernel routetune's
`auto` picks (SDPA for the encoder, eager for the decoder on CPU), in the same allocator
environment (huge pages as `import routetune` sets them), and tokens are counted from the batch
each step actually trains on.

With `--compile`, each side also runs compiled, in the same rounds: the Trainer with
`TrainingArguments(torch_compile=True)` (the whole model through inductor) in its default and
grouped orders, routetune with `train.compile=true` (its blocks through inductor). Compiling
happens in the warm-up steps (their seconds are printed); a recompilation after them is timed.
The reference's best is then the fastest of all four Trainer settings.

Printed per variant: non-padding tokens/s (special tokens included, as the attention mask
counts them) over the timed steps (the first `--skip` steps are warm-up and not timed), peak RSS
of the child, and achieved training FLOP/s as a share of the matmul peak (in the trained precision) of this invocation
(the best rate of `matmul_peak` measured at the start and again right after every child: the
machine's speed moves by 2-3x between minutes, so one measurement is not enough). Training FLOPs
are counted, not estimated: torch.utils.flop_counter.FlopCounterMode over one forward+backward
of a padding-free batch of the work's mean length gives FLOPs per token, which is multiplied by
the tokens/s. The ratio routetune/HF is printed against the reference's best setting. For
routetune, one more step after the timed ones is profiled: the share of the step
its matrix multiplications take and the rate they run at, as a share of the peak (what a step of
matmuls alone would reach; see matmul_profile).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
DATA = Path(os.environ.get("ROUTETUNE_DATA", ROOT.parent / "shared" / "data"))
os.environ.setdefault("ROUTETUNE_DATA", str(DATA))  # the examples read their data from there


def matmul_peak(precision: str = "bf16") -> float:
    """Best matmul GFLOP/s in the trained precision (bf16 or fp32) over a few square sizes, three
    trials each (all threads): the machine's clock and neighbours vary, so the best trial is the
    peak."""
    import torch

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    best = 0.0
    for n in (1024, 2048, 4096):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        for _ in range(2):
            a @ b
        reps = max(3, int(2e11 / (2 * n**3)))
        for _ in range(3):
            t = time.perf_counter()
            for _ in range(reps):
                a @ b
            best = max(best, 2 * n**3 * reps / (time.perf_counter() - t) / 1e9)
    return best


def flops_per_token(model, batch: dict, n_tokens: int) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(**batch)
        out.loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / n_tokens


class Timer:
    """Times optimizer steps after `skip` warm-up steps and counts their non-padding tokens."""

    def __init__(self, skip: int):
        self.skip, self.step, self.tokens, self.t0, self.t1 = skip, 0, 0, None, None

    def begin(self, tokens: int):
        self.step += 1
        if self.step == 1:
            self.w0 = time.perf_counter()
        if self.step == self.skip + 1:
            self.t0 = time.perf_counter()
        if self.step > self.skip:
            self.tokens += tokens

    def end(self):
        self.t1 = time.perf_counter()

    def result(self) -> dict:
        seconds = self.t1 - self.t0
        return {"timed_steps": self.step - self.skip, "tokens": self.tokens, "seconds": seconds,
                "tokens_per_s": self.tokens / seconds, "warmup_seconds": self.t0 - self.w0}


# ------------------------------------------------------------------ Hugging Face reference

def hf_train(model, rows, timer: Timer, tokens_of_step, batch_size: int, lr: float, weight_decay: float, steps: int,
             collator=None, precision: str = "bf16", sampling: str = "random", after=None) -> None:
    """The standard Trainer recipe (autocast in `precision` on CPU, AdamW as Trainer picks it,
    `sampling` random or group_by_length), timed per optimizer step by a callback; `after(model,
    optimizer)`, if given, is called once training ends (to read what the run holds)."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            timer.begin(tokens_of_step())

        def on_step_end(self, args, state, control, **kw):
            timer.end()

        def on_train_end(self, args, state, control, **kw):
            if after is not None:
                after(kw["model"], kw["optimizer"])

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(out, per_device_train_batch_size=batch_size, learning_rate=lr,
                                 weight_decay=weight_decay, max_steps=steps, bf16=precision == "bf16", use_cpu=True,
                                 torch_compile=HF_COMPILE,
                                 report_to=[], save_strategy="no", logging_strategy="no", seed=42,
                                 dataloader_num_workers=0, train_sampling_strategy=sampling)
        Trainer(model=model, args=args, train_dataset=rows, data_collator=collator, callbacks=[StepTimer()]).train()


def hf_padded_rows(model, rows, collate, batch_size: int, steps: int, skip: int, precision: str,
                   sampling: str) -> dict:
    """The Trainer on rows of different lengths, its collator padding each batch (lr 5e-5, weight
    decay 0.01), counting each step's non-padding tokens; FLOPs per token on a padding-free probe
    batch of the rows' mean length."""
    import torch

    timer = Timer(skip)

    def counting_collate(features):
        batch = collate(features)
        timer.pending = int(batch["attention_mask"].sum())
        return batch

    hf_train(model, rows, timer, lambda: timer.pending, batch_size, 5e-5, 0.01, steps, counting_collate, precision,
             sampling)
    mean = round(sum(len(r["input_ids"]) for r in rows) / len(rows))
    probe = collate(rows[:batch_size])
    probe = {k: (v[:, :mean].contiguous() if v.dim() == 2 else v) for k, v in probe.items()}
    probe["attention_mask"] = torch.ones_like(probe["input_ids"])
    return {**timer.result(), "flops_per_token": flops_per_token(model, probe, probe["input_ids"].numel())}


def hf_ner(steps: int, skip: int, precision: str, sampling: str) -> dict:
    from transformers import (
        AutoModelForTokenClassification,
        AutoTokenizer,
        DataCollatorForTokenClassification,
    )

    from routetune.data.readers import read_conll
    from routetune.model.load import pick_attention, resolve_model

    path = resolve_model("minilm-l6")
    sents = read_conll(DATA / "wnut17" / "wnut17train.conll")
    labels = sorted({t for s in sents for t in s.tags})
    tok = AutoTokenizer.from_pretrained(path)
    rows = []
    for s in sents:
        enc = tok(s.tokens, is_split_into_words=True, truncation=True, max_length=128)
        prev, lab = None, []
        for w in enc.word_ids():
            lab.append(-100 if w is None or w == prev else labels.index(s.tags[w]))
            prev = w
        rows.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": lab})
    # the attention kernel routetune's `auto` picks for this work (SDPA for an encoder)
    model = AutoModelForTokenClassification.from_pretrained(path, num_labels=len(labels),
                                                            attn_implementation=pick_attention("auto", False, "cpu"))
    return hf_padded_rows(model, rows, DataCollatorForTokenClassification(tok), 16, steps, skip, precision, sampling)


def hf_cls(steps: int, skip: int, precision: str, sampling: str) -> dict:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

    from routetune.config.load import load_config
    from routetune.data.build import _split
    from routetune.data.readers import read_examples
    from routetune.model.load import pick_attention, resolve_model

    path = resolve_model("minilm-l6")
    sc = load_config(ROOT / "examples" / "polarity-minilm.yaml").sources["polarity"]
    train, _, _ = _split(read_examples(sc.train, sc.format), sc, "polarity")  # routetune's own training split
    labels = sorted({e.label for e in train})
    tok = AutoTokenizer.from_pretrained(path)
    rows = []
    for e in train:
        enc = tok(e.text, truncation=True, max_length=64)
        rows.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                     "labels": labels.index(e.label)})
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=len(labels), attn_implementation=pick_attention("auto", False, "cpu"))
    return hf_padded_rows(model, rows, DataCollatorWithPadding(tok), 32, steps, skip, precision, sampling)


def shakespeare_blocks(tok, n_blocks: int | None = None) -> list[list[int]]:
    text = (DATA / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
    text = text[: int(len(text) * 0.9)]  # the example holds out the last 10% as test
    ids = tok(text)["input_ids"]
    return [ids[i:i + 128] for i in range(0, len(ids) - 127, 128)][:n_blocks]


def hf_clm(steps: int, skip: int, precision: str) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
    )

    from routetune.model.load import pick_attention, resolve_model

    path = resolve_model("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(path)
    rows = [{"input_ids": b, "labels": b} for b in shakespeare_blocks(tok)]
    # eager attention, as routetune's `auto` picks for a decoder on CPU (SDPA's CPU backward is slow here)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                 attn_implementation=pick_attention("auto", True, "cpu"))
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    timer = Timer(skip)

    hf_train(model, rows, timer, lambda: 8 * 128, 8, 2e-4, 0.0, steps, precision=precision)
    x = torch.tensor([r["input_ids"] for r in rows[:8]])
    return {**timer.result(), "flops_per_token": flops_per_token(model, {"input_ids": x, "labels": x}, x.numel())}


# ------------------------------------------------------------------ routetune

def routetune_run(work: str, steps: int, skip: int, overrides: list[str]) -> dict:
    from _runs import prepare_example, run_steps

    example = EXAMPLES[work]
    # one step more than timed: the last one is profiled (see matmul_profile), not timed
    setup = prepare_example(example, steps + 1, overrides)
    timer = Timer(skip)
    profiled: dict = {}

    def wrap(trainer, original):
        def timed_step(step, parts):
            if step == steps:
                profiled.update(matmul_profile(original, step, parts))
                return {}
            timer.last_parts = parts
            timer.begin(sum(p.n_tokens for p in parts))
            losses = original(step, parts)
            timer.end()
            return losses

        return timed_step

    trainer = run_steps(setup, wrap)
    # FLOPs per token of the same module graph, on a padding-free batch of the mean length
    name = next(iter(setup.cfg.sources))
    setup.model.train()
    flops = _routetune_flops(trainer, timer.last_parts[0], trainer.objectives[name])
    return {**timer.result(), "flops_per_token": flops, **profiled}


EXAMPLES = {"ner": "wnut17-minilm.yaml", "cls": "polarity-minilm.yaml", "clm": "shakespeare-smollm2.yaml"}
MATMUL_OPS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::addbmm")


def matmul_profile(train_step, step: int, parts) -> dict:
    """How much of one training step its matrix multiplications take, and how fast they run:
    the step's FLOPs are counted on one call (FlopCounterMode; it slows every op, so that call is
    not timed), then the same step is run again under torch.profiler, which gives the matmul
    kernels' own time. FLOPs / matmul time is the rate a step made of nothing but its matmuls
    would reach: an upper bound on the step's share of the matmul peak without fusing the rest."""
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        train_step(step, parts)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        train_step(step, parts)
        wall = time.perf_counter() - t
    events = prof.key_averages()
    mm = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS) / 1e6
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:10]  # where the rest of the step goes
    return {"profiled_step_s": wall, "matmul_s": mm, "matmul_gflops": counter.get_total_flops() / mm / 1e9,
            "top_ops_s": {e.key: round(e.self_cpu_time_total / 1e6, 4) for e in top}}


def _routetune_flops(trainer, part, objective: str) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    model = trainer.model
    tensors = dict(part.tensors)
    mask = tensors.get("attention_mask")
    if mask is not None:  # cut to the mean non-padding length and drop padding, as for the HF side
        n = max(1, round(float(mask.sum()) / mask.shape[0]))
        tensors = {k: (v[:, :n].contiguous() if torch.is_tensor(v) and v.dim() == 2 else v) for k, v in tensors.items()}
        tensors["attention_mask"] = torch.ones_like(tensors["attention_mask"])
    n_tokens = int(tensors["attention_mask"].numel()) if mask is not None else int(tensors["input_ids"].numel())
    with FlopCounterMode(display=False) as counter:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model.loss(part.source, objective, tensors)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / n_tokens


# ------------------------------------------------------------------ driver

def child(kind: str, work: str, steps: int, skip: int, overrides: list[str], precision: str) -> None:
    import routetune  # noqa: F401  (both sides: the same allocator switch, see run_child)
    import torch

    torch.manual_seed(0)
    if kind.endswith("-fp32"):  # a reference variant in fp32 (on a bf16 machine a user may keep fp32)
        kind, precision = kind.removesuffix("-fp32"), "fp32"
    if kind.startswith("hf"):
        global HF_COMPILE
        HF_COMPILE, kind = kind.endswith("-compiled"), kind.removesuffix("-compiled")
        sampling = "group_by_length" if kind == "hf-grouped" else "random"
        if work == "clm":
            result = hf_clm(steps, skip, precision)
        else:
            result = (hf_ner if work == "ner" else hf_cls)(steps, skip, precision, sampling)
    else:
        result = routetune_run(work, steps, skip, [f"train.precision={precision}", *overrides])
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["matmul_peak_after_gflops"] = matmul_peak(precision)  # the machine's speed right after these steps
    print("RESULT " + json.dumps(result), flush=True)


# each measured kind: the child process that trains it, and the config overrides routetune's side
# adds (the Trainer's children read their settings from their own name)
KINDS = {"hf": ("hf", []), "hf-grouped": ("hf-grouped", []), "hf-fp32": ("hf-fp32", []),
         "hf-grouped-fp32": ("hf-grouped-fp32", []), "routetune": ("routetune", []),
         "routetune-grouped": ("routetune", ["train.group_by_length=true"]),
         "routetune-padded": ("routetune", ["train.padding_free=false"]),
         "hf-compiled": ("hf-compiled", []), "hf-grouped-compiled": ("hf-grouped-compiled", []),
         "routetune-compiled": ("routetune", ["train.compile=true"]),
         "routetune-lever": ("routetune", [])}  # its overrides: --lever
HF_COMPILE = False  # the Trainer child compiles (TrainingArguments(torch_compile=True): the whole model, inductor)


def run_child(kind: str, work: str, steps: int, skip: int, overrides: list[str], precision: str) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--work", work, "--steps", str(steps), "--skip", str(skip),
           "--precision", precision]
    for o in overrides:
        cmd += ["--set", o]
    # Both sides run in the same allocator environment: `import routetune` turns torch's huge
    # pages on (THP_MEM_ALLOC_ENABLE=1) unless it is set, in the HF child as in routetune's.
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    sys.stderr.write(proc.stderr[-4000:])
    raise SystemExit(f"{kind} {work} failed (exit {proc.returncode})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", nargs="+", choices=["ner", "cls", "clm", "all"], default=["all"])
    ap.add_argument("--ner-steps", type=int, default=80)
    ap.add_argument("--cls-steps", type=int, default=60)
    ap.add_argument("--clm-steps", type=int, default=20)
    ap.add_argument("--skip", type=int, default=3, help="warm-up steps not timed")
    ap.add_argument("--set", action="append", default=[], help="routetune config override (ablation)")
    ap.add_argument("--only", choices=["hf", "routetune"], help="run one side only")
    ap.add_argument("--repeat", type=int, default=1, help="rounds of HF then routetune; medians are printed")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                    help="autocast of both sides; auto: what routetune picks on this CPU (bf16 only where native)")
    ap.add_argument("--hf-fp32", action="store_true",
                    help="also run the reference in fp32 (when both train in bf16): a user may find it faster")
    ap.add_argument("--compile", action="store_true",
                    help="each side eager and compiled: the Trainer with torch_compile=True (default and grouped "
                         "order), routetune with train.compile=true; the compile time is in the warm-up steps")
    ap.add_argument("--lever", action="append", default=[], metavar="KEY=VALUE",
                    help="also routetune with this override (kind routetune-lever; repeat for several), next to its "
                         "default in every round: what one lever brings, in alternating rounds")
    ap.add_argument("--child", choices=sorted({process for process, _ in KINDS.values()}),
                    help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.work[0], args.steps, args.skip, args.set, args.precision)
        return
    import torch

    from routetune.device import cpu_bf16, resolve

    if args.precision == "auto":
        args.precision = resolve("cpu", "auto").precision
    native, why = cpu_bf16()
    print(f"CPU: {torch.backends.cpu.get_cpu_capability()}; {why}; both sides train in {args.precision}")
    peak = matmul_peak(args.precision)
    print(f"{args.precision} matmul peak at the start ({torch.get_num_threads()} threads): {peak:.0f} GFLOP/s")
    works = ["ner", "cls", "clm"] if "all" in args.work else args.work
    results = {"overrides": args.set, "lever": args.lever, "precision": args.precision, "cpu": why,
               "capability": torch.backends.cpu.get_cpu_capability()}
    peaks = [peak]
    for work in works:
        steps = {"ner": args.ner_steps, "cls": args.cls_steps, "clm": args.clm_steps}[work]
        rounds = []
        for k in range(args.repeat):  # HF and routetune alternate, so slow drifts of the machine hit both
            row = {}
            sized = work in ("ner", "cls")  # examples of different lengths (the causal-LM blocks all have one)
            kinds = ["hf", "hf-grouped"] if sized else ["hf"]
            if args.hf_fp32 and args.precision == "bf16":
                kinds += [k + "-fp32" for k in kinds]
            kinds.append("routetune")
            if args.compile:  # each side compiled beside its eager self (the levers below are measured elsewhere)
                kinds = [*kinds[:-1], *(k + "-compiled" for k in kinds[:-1]), "routetune", "routetune-compiled"]
            elif sized:  # length grouping is off by default, padding-free on: each measured next to it
                kinds += ["routetune-grouped", "routetune-padded"]
            if args.lever:
                kinds.insert(kinds.index("routetune") + 1, "routetune-lever")
            for kind in kinds:
                if args.only and not kind.startswith(args.only):
                    continue
                process, own = KINDS[kind]
                own = args.lever if kind == "routetune-lever" else own
                r = run_child(process, work, steps, args.skip, [*args.set, *own] if process == "routetune" else [],
                              args.precision)
                peaks.append(r["matmul_peak_after_gflops"])
                row[kind] = r
                print(f"{work:4s} {kind:15s} {r['tokens_per_s']:8.0f} tokens/s  {r['timed_steps']} steps "
                      f"{r['seconds']:.1f} s  {r['tokens_per_s'] * r['flops_per_token'] / 1e9:.0f} GFLOP/s  "
                      f"peak RSS {r['peak_rss_mb']:.0f} MB  ({args.skip} warm-up steps {r['warmup_seconds']:.1f} s; "
                      f"matmul peak right after: {r['matmul_peak_after_gflops']:.0f} GFLOP/s)", flush=True)
            hf_best = max((row[k]["tokens_per_s"], k) for k in row if k.startswith("hf")) if "hf" in row else None
            if hf_best and "routetune" in row:
                # against the reference's best setting (default sampler or length grouping)
                row["ratio"] = row["routetune"]["tokens_per_s"] / hf_best[0]
                row["hf_best"] = hf_best[1]
                print(f"{work:4s} ratio routetune/HF best ({hf_best[1]}): {row['ratio']:.2f}", flush=True)
                if "routetune-compiled" in row:
                    row["ratio_compiled_best"] = row["routetune-compiled"]["tokens_per_s"] / hf_best[0]
                    print(f"{work:4s} ratio routetune-compiled/HF best: {row['ratio_compiled_best']:.2f}", flush=True)
            # the same order on both sides, routetune's default against the Trainer's grouped order,
            # and routetune's default against its own padded batches
            for mine, theirs in (("routetune", "hf"), ("routetune-grouped", "hf-grouped"), ("routetune", "hf-grouped"),
                                 ("routetune", "routetune-padded"), ("routetune-compiled", "routetune"),
                                 ("hf-compiled", "hf"), ("hf-grouped-compiled", "hf-grouped"),
                                 ("routetune", "routetune-lever"), ("routetune-lever", "hf-grouped")):
                if mine in row and theirs in row:
                    row[f"ratio_{mine}_{theirs}"] = row[mine]["tokens_per_s"] / row[theirs]["tokens_per_s"]
                    print(f"{work:4s} ratio {mine}/{theirs}: {row[f'ratio_{mine}_{theirs}']:.2f}", flush=True)
            rounds.append(row)
        results[work] = rounds[0] if args.repeat == 1 else {"rounds": rounds}
        if args.repeat > 1:
            summary = {kind: statistics.median(r[kind]["tokens_per_s"] for r in rounds) for kind in rounds[0]
                       if isinstance(rounds[0][kind], dict)}
            # ratios: the median of the per-round (paired) ratios
            summary.update({k: statistics.median(r[k] for r in rounds) for k in rounds[0] if k.startswith("ratio")})
            results[work]["median"] = summary
            rss = {kind: statistics.median(r[kind]["peak_rss_mb"] for r in rounds) for kind in rounds[0]
                   if isinstance(rounds[0][kind], dict)}
            results[work]["median_peak_rss_mb"] = rss
            print(f"{work:4s} median peak RSS: " + "  ".join(f"{k} {v:.0f} MB" for k, v in rss.items()), flush=True)
            shown = (f"{k} {v:.2f}" if k.startswith("ratio") else f"{k} {v:.0f} tokens/s" for k, v in summary.items())
            print(f"{work:4s} median of {args.repeat} rounds: " + "  ".join(shown), flush=True)
    # The peak is the best bf16 matmul rate the machine showed anywhere in this invocation (at the
    # start and after every child): its speed moves by 2-3x between minutes on this shared host,
    # and a peak taken once, in a slow minute, would flatter every share below.
    peak = max(peaks)
    results["peak_gflops"], results["peak_trials_gflops"] = peak, peaks
    print(f"{args.precision} matmul peak of this invocation: {peak:.0f} GFLOP/s (best of {len(peaks)} measurements: "
          + ", ".join(f"{p:.0f}" for p in peaks) + ")")
    for work in works:
        rounds = results[work]["rounds"] if args.repeat > 1 else [results[work]]
        for n, row in enumerate(rounds, 1):
            for kind in KINDS:
                if kind not in row:
                    continue
                r = row[kind]
                r["peak_fraction"] = r["tokens_per_s"] * r["flops_per_token"] / (peak * 1e9)
                line = f"{work:4s} round {n} {kind:15s} {100 * r['peak_fraction']:5.1f}% of peak"
                if "matmul_s" in r:
                    r["matmul_peak_fraction"] = r["matmul_gflops"] / peak
                    line += (f"; one profiled step: matmuls {r['matmul_s']:.2f} of {r['profiled_step_s']:.2f} s "
                             f"({100 * r['matmul_s'] / r['profiled_step_s']:.0f}%) at {r['matmul_gflops']:.0f} GFLOP/s "
                             f"= {100 * r['matmul_peak_fraction']:.1f}% of peak (a step of matmuls alone)")
                print(line, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
