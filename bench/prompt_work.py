"""The prompt/completion work of bench/quality_parity.py: sentence polarity asked of a decoder.

Each of the 10,662 sentences of sentence polarity (Pang & Lee v1.0) becomes a prompt
``"Review: <sentence>\\nSentiment:"`` with the completion ``" positive"`` or ``" negative"`` (one
token each for SmolLM2's tokenizer, followed by the end-of-sequence token the loss also trains).
The file is written in a fixed shuffled order (``random.Random(0)``), and 3% dev and 3% test (320
examples each) are held out by routetune's seeded rule (``holdout: {dev: 0.03, test: 0.03, seed:
0}``): the same examples on both sides. smollm2-135m with LoRA (r=8, alpha 16, dropout 0.05 on
q,k,v,o), 100 steps of 8 examples, lr 2e-4, linear decay, no warm-up, no weight decay, max_length
96. The score is exact match of a greedy one-token generation on every dev and test example (the
polarity the model answers), scored by routetune's own code on both sides
(routetune.evaluate.tasks.prompt_scores; the Trainer's model through an adapter). The held-out
sets are small because scoring a decoder by generation is slow on 2 CPU cores. Prompts vary in
length (16 to ~90 tokens), so a padded batch of 8 carries a lot of padding: what padding-free
batches remove.

The Trainer's side (``hf``): AutoModelForCausalLM + peft's LoRA with the same settings, the same
token ids and labels (routetune's encode_prompt: the loss on the completion and the end-of-sequence
token only), ``DataCollatorForSeq2Seq`` (labels padded with -100), the same steps, batch, learning
rate and schedule, the last step scored (no checkpoint choice on either side).

Fixed before the first runs (2026-12-04): seeds 1-5; equivalence margin ±0.03 exact match for the
95% t-interval of the paired difference (same seed) on dev and on test, for padding-free minus
padded batches and for routetune minus the Trainer. Padding-free batches stay the default for
prompt/completion data if both of their intervals lie inside it.

Fixed before the QLoRA runs (2026-12-07): seeds 1-5, fp32 compute on an AVX2-only CPU; variants
``routetune`` (LoRA over the fp32 base) and ``routetune:model.quantize=nf4`` (the same LoRA over an
NF4 base, no double quantization); equivalence margin ±0.03 exact match for the 95% t-interval of
the paired difference (LoRA minus QLoRA, same seed) on dev and on test. The docs call QLoRA at
parity on this work only if both intervals lie inside it.
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import yaml

import replay_reference as rr  # bench/: the shared scoring adapter

STEPS, BATCH, LR, MAX_LENGTH, HELD_OUT = 100, 8, 2e-4, 96, 0.03
NAME = "polarity"


def write_work(data: Path, folder: Path) -> Path:
    """The prompt/completion file and the routetune config that trains on it; returns the config."""
    rows = []
    for label in ("pos", "neg"):
        text = (data / "sentence_polarity" / f"rt-polarity.{label}").read_bytes().decode("latin-1")
        rows += [{"prompt": f"Review: {line.strip()}\nSentiment:",
                  "completion": " positive" if label == "pos" else " negative"}
                 for line in text.splitlines() if line.strip()]
    random.Random(0).shuffle(rows)  # a fixed order (the held-out examples keep the file's order)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "polarity-prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {"model": {"name": "smollm2-135m", "max_length": MAX_LENGTH},
           "sources": {NAME: {"objective": "causal-lm", "format": "jsonl",
                              "train": str(folder / "polarity-prompts.jsonl"),
                              "holdout": {"dev": HELD_OUT, "test": HELD_OUT, "seed": 0},
                              "max_new_tokens": 1, "eval_generate": 1000}},
           "routing": {"weights": {NAME: 1.0}, "seed": 13},
           "peft": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.05,
                    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
           "train": {"max_steps": STEPS, "batch_size": BATCH, "lr": LR, "warmup_ratio": 0.0, "weight_decay": 0.0,
                     "schedule": "linear", "eval_batch_size": 16}}
    path = folder / "polarity-prompts.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _scored(model):
    """The peft model through the interface routetune's generation and loss code read."""
    scored = rr._scorer(model)
    scored.lm, scored.prompt = model, None
    scored.method = SimpleNamespace(generate_refusal=None)
    return scored


def run_hf(config: Path, seed: int, precision: str, steps: int = STEPS) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainingArguments, set_seed

    from routetune.config.load import load_config
    from routetune.data.build import _split
    from routetune.data.readers import read_prompt_completions
    from routetune.data.sources import encode_prompt
    from routetune.evaluate.tasks import prompt_scores
    from routetune.model.load import load_tokenizer, pick_attention, resolve_model

    cfg = load_config(config)
    sc, t, p = cfg.sources[NAME], cfg.train, cfg.peft
    path = resolve_model(cfg.model.name)
    tok = load_tokenizer(path)
    train, dev, test = _split(read_prompt_completions(sc.train), sc, NAME)
    rows = []
    for e in train:
        ids, labels, _ = encode_prompt(tok, e.text, e.completion, cfg.model.max_length)
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    set_seed(seed)  # as the Trainer's examples do before building the model
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(path, attn_implementation=pick_attention("auto", True, "cpu")),
        LoraConfig(task_type="CAUSAL_LM", r=p.r, lora_alpha=p.alpha, lora_dropout=p.dropout,
                   target_modules=list(p.target_modules)))
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(out, max_steps=steps, per_device_train_batch_size=t.batch_size,
                                 learning_rate=t.lr, weight_decay=t.weight_decay, warmup_steps=0,
                                 lr_scheduler_type="linear", bf16=precision == "bf16", use_cpu=True, seed=seed,
                                 report_to=[], save_strategy="no", logging_strategy="no",
                                 dataloader_num_workers=0, disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=rows,
                          data_collator=DataCollatorForSeq2Seq(tok, label_pad_token_id=-100))
        started = time.time()
        trainer.train()
        seconds = time.time() - started
    scored = _scored(trainer.model)
    score = {n: prompt_scores(scored, tok, split, cfg.model.max_length, t, sc, precision)["exact_match"]
             for n, split in (("dev", dev), ("test", test))}
    return {**score, "seconds": round(seconds, 1)}
